"""System call names, numbers and argument kinds for this machine's architecture (up to Linux 6.18)."""
from __future__ import annotations

import errno as _errno

from .arch import current as _current_arch

_ARCH = _current_arch()
TABLE = _ARCH.SYSCALLS

_BY_NAME = {name: nr for nr, (name, _args) in TABLE.items()}
# Common aliases used by libc and strace.
for _alias, _real in (("newfstatat", "newfstatat"), ("fstatat", "newfstatat"), ("pread", "pread64"),
                      ("pwrite", "pwrite64"), ("prlimit", "prlimit64"), ("umount", "umount2"),
                      ("sendfile64", "sendfile")):
    _BY_NAME.setdefault(_alias, _BY_NAME[_real])


def number(nr_or_name: int | str) -> int:
    """The syscall number for a name or number; ValueError naming what is unknown."""
    if type(nr_or_name) is int and 0 <= nr_or_name < _ARCH.FOREIGN_SYSCALL_BIT:
        return nr_or_name                  # the common case, first: this runs on every call
    if isinstance(nr_or_name, int):
        if nr_or_name < 0:
            raise ValueError("invalid system call number %d" % nr_or_name)
        if nr_or_name & _ARCH.FOREIGN_SYSCALL_BIT:
            raise ValueError("x32 system call numbers (%#x) are not supported" % nr_or_name)
        return nr_or_name
    name = str(nr_or_name)
    if name.startswith("SYS_") or name.startswith("__NR_"):
        name = name.split("_", 1)[1].lstrip("_").replace("NR_", "", 1)
    try:
        return _BY_NAME[name]
    except KeyError:
        raise ValueError("unknown %s system call %r" % (_ARCH.TITLE, nr_or_name)) from None


def name_of(nr: int) -> str:
    """The system call's name for number nr on this architecture ("syscall_NR" when the table has none)."""
    entry = TABLE.get(nr)
    return entry[0] if entry else "syscall_%d" % nr


def arg_kinds(nr: int) -> tuple[tuple[str, str], ...]:
    """((name, kind), ...) for a syscall; kind is fd, str, ptr or int. Empty if unknown."""
    entry = TABLE.get(nr)
    return entry[1] or () if entry else ()


def errno_name(err: int) -> str:
    return _errno.errorcode.get(err, "E%d" % err)
