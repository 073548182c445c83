"""strace-like lines for the sandbox's system calls: name(decoded arguments) = result."""
import errno
import os

from ..syscalls import TABLE, name_of


O_CREAT, O_TMPFILE_BIT = 0o100, 0o20000000
_OPEN_FLAGS = ((0o100, "O_CREAT"), (0o200, "O_EXCL"), (0o400, "O_NOCTTY"), (0o1000, "O_TRUNC"),
               (0o2000, "O_APPEND"), (0o4000, "O_NONBLOCK"), (0o10000, "O_DSYNC"), (0o200000, "O_DIRECTORY"),
               (0o400000, "O_NOFOLLOW"), (0o1000000, "O_NOATIME"), (0o2000000, "O_CLOEXEC"), (0o10000000, "O_PATH"))
_PROT = ((1, "PROT_READ"), (2, "PROT_WRITE"), (4, "PROT_EXEC"))
_MAP = ((0x01, "MAP_SHARED"), (0x02, "MAP_PRIVATE"), (0x10, "MAP_FIXED"), (0x20, "MAP_ANONYMOUS"),
        (0x800, "MAP_DENYWRITE"), (0x100000, "MAP_FIXED_NOREPLACE"), (0x8000, "MAP_POPULATE"),
        (0x20000, "MAP_STACK"), (0x40, "MAP_32BIT"))
_SHOWN_BUFFER = {"write": 1, "pwrite64": 1, "read": 1, "pread64": 1}     # index of the buffer argument
_RET_HEX = {"mmap", "brk", "mremap"}


def _flags(value, table, zero):
    names = [n for bit, n in table if value & bit]
    rest = value & ~sum(bit for bit, _ in table)
    if rest:
        names.append("%#x" % rest)
    return "|".join(names) if names else zero


def _open_flags(v):
    acc = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[v & 3]
    rest = _flags(v & ~3 & ~0o100000, _OPEN_FLAGS, "")
    return acc + ("|" + rest if rest else "")


def _quote(data, limit=32):
    out = []
    for b in data[:limit]:
        c = chr(b)
        if c == "\n":
            out.append("\\n")
        elif c == "\t":
            out.append("\\t")
        elif c in "\"\\":
            out.append("\\" + c)
        elif 32 <= b < 127:
            out.append(c)
        else:
            out.append("\\%o" % b)
    return '"' + "".join(out) + '"' + ("..." if len(data) > limit else "")


class Tracer:
    """Writes to a text file (a path, or an open file such as sys.stderr)."""

    def __init__(self, out):
        self.out = open(out, "w") if isinstance(out, str) else out

    def _emit(self, p, text):
        self.out.write("[pid %d] %s\n" % (p.tid, text))
        self.out.flush()

    def call(self, p, nr, args, ret):
        name, kinds = TABLE.get(nr, (name_of(nr), ()))
        kinds = [k for _n, k in kinds or ()]
        shown = []
        mode_at = {"open": 2, "openat": 3}.get(name)
        if mode_at is not None and len(args) > mode_at:
            if args[mode_at - 1] & (O_CREAT | O_TMPFILE_BIT) == 0:     # no mode, as strace shows it
                args = args[:mode_at]
        for i, a in enumerate(args):
            kind = kinds[i] if i < len(kinds) else "int"
            if name in _SHOWN_BUFFER and i == _SHOWN_BUFFER[name]:
                shown.append(self._buffer(p, name, a, args, ret))
            elif kind == "str":
                shown.append("NULL" if a is None else _quote(a.encode("utf-8", "surrogateescape"), 256))
            elif kind == "fd":
                shown.append("AT_FDCWD" if a == -100 else str(a))
            elif kind == "ptr":
                shown.append("NULL" if a == 0 else "%#x" % a)
            elif name in ("open", "openat") and i == (1 if name == "open" else 2):
                shown.append(_open_flags(a))
            elif i == mode_at or name in ("mkdir", "chmod") and i == 1 or name in ("mkdirat", "fchmodat") and i == 2:
                shown.append(("0%o" % a if a else "0").zfill(3))          # C's %#03o, as strace
            elif name in ("mmap", "mprotect") and i == 2:
                shown.append(_flags(a, _PROT, "PROT_NONE"))
            elif name == "mmap" and i == 3:
                shown.append(_flags(a, _MAP, "0"))
            elif name == "mmap" and i == 0:
                shown.append("NULL" if a == 0 else "%#x" % a)
            else:
                shown.append(str(a - (1 << 64) if a >= 1 << 63 else a))
        self._emit(p, "%s(%s) = %s" % (name, ", ".join(shown), self._result(name, ret)))

    @staticmethod
    def _result(name, ret):
        if ret is None:
            return "?"
        if -4096 < ret < 0:
            return "-1 %s (%s)" % (errno.errorcode.get(-ret, str(-ret)), os.strerror(-ret))
        return "%#x" % ret if name in _RET_HEX else str(ret)

    @staticmethod
    def _buffer(p, name, addr, args, ret):
        if name.startswith("read") or name == "pread64":
            n = ret if ret is not None and ret > 0 else 0
        else:
            n = args[2]
        try:
            return _quote(p.read(addr, min(n, 32)) if n else b"") + ("..." if n > 32 else "")
        except Exception:
            return "%#x" % addr

    def unsupported(self, p, nr, args, first):
        note = " (not provided by the sandbox)" if first else ""
        self._emit(p, "%s(%s) = -1 ENOSYS (Function not implemented)%s" % (
            name_of(nr), ", ".join("%#x" % a for a in args[:len(TABLE.get(nr, ("", ()))[1] or ())]), note))

    def exited(self, p, status):
        if status & 0x7F:
            self._emit(p, "+++ killed by %s%s +++" % (_signame(status & 0x7F), " (core dumped)" if status & 0x80 else ""))
        else:
            self._emit(p, "+++ exited with %d +++" % (status >> 8))


def _signame(sig):
    import signal
    try:
        return signal.Signals(sig).name
    except ValueError:
        return "signal %d" % sig
