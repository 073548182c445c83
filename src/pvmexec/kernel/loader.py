"""Loading an ELF program into a stub space as execve(2) does: segments, interpreter, initial stack."""
import errno
import os
import struct

from ..abi import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, PAGE, PROT_EXEC, PROT_NONE, PROT_READ, PROT_WRITE,
                   page_down, page_up)
from ..arch import current as _current_arch
from .errors import Errno


ARCH = _current_arch()

PT_LOAD, PT_INTERP, PT_PHDR = 1, 3, 6
ET_EXEC, ET_DYN = 2, 3
PF_X, PF_W, PF_R = 1, 2, 4
STACK_SIZE = 8 << 20
MAX_SCRIPT_DEPTH = 4

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN, AT_SYSINFO_EHDR, AT_MINSIGSTKSZ = 23, 25, 26, 31, 33, 51

_EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
_PHDR = struct.Struct("<IIQQQQQQ")


class Elf:
    """A parsed ELF64 x86-64 program; anything else is ENOEXEC (the guest's execve fails, nothing crashes)."""

    def __init__(self, data, size=None):
        """data: the file, or its start (with size, the file's size) when load() maps the file itself."""
        size = len(data) if size is None else size
        if len(data) < _EHDR.size or data[:4] != b"\x7fELF":
            raise Errno(errno.ENOEXEC)
        (ident, self.type, machine, _v, self.entry, phoff, _sh, _fl, _ehsize, phentsize, phnum,
         _she, _shn, _shs) = _EHDR.unpack_from(data)
        if ident[4] != 2 or ident[5] != 1 or machine != ARCH.ELF_MACHINE or self.type not in (ET_EXEC, ET_DYN) \
                or phentsize != _PHDR.size or not 0 < phnum <= 256 or phoff + phnum * _PHDR.size > len(data):
            raise Errno(errno.ENOEXEC)
        self.data = data
        self.phoff, self.phnum = phoff, phnum
        self.phdrs = [_PHDR.unpack_from(data, phoff + i * _PHDR.size) for i in range(phnum)]
        self.loads = [p for p in self.phdrs if p[0] == PT_LOAD and p[5] > 0]
        if not self.loads:
            raise Errno(errno.ENOEXEC)
        for p_type, _f, off, vaddr, _pa, filesz, memsz, _al in self.loads:
            if filesz > memsz or off + filesz > size or vaddr + memsz >= 1 << 47 or (off - vaddr) % PAGE:
                raise Errno(errno.ENOEXEC)
        interp = [p for p in self.phdrs if p[0] == PT_INTERP]
        self.interp = None
        if interp:
            off, size = interp[0][2], interp[0][5]
            raw = data[off:off + size].split(b"\0", 1)[0]
            if not raw or size > 4096 or off + size > len(data):
                raise Errno(errno.ENOEXEC)
            self.interp = raw.decode("utf-8", "surrogateescape")

    def load(self, space, protected, map_file=None):
        """Map and fill the segments; returns the load bias. `protected(start, end)` rejects clashes.
        map_file([(addr, length, offset), ...]) maps the file's pages privately at each addr (read-write;
        copied only where written), all in one go; without it, they are copied from data."""
        lo = page_down(min(p[3] for p in self.loads))
        hi = page_up(max(p[3] + p[6] for p in self.loads))
        if self.type == ET_EXEC:
            protected(lo, hi)
            addr = space.syscall_raw("mmap", lo, hi - lo, PROT_READ | PROT_WRITE,
                                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
            if addr != lo:
                raise Errno(errno.ENOMEM)
            bias = 0
        else:
            addr = space.syscall_raw("mmap", 0, hi - lo, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
            if -4096 < addr < 0:
                raise Errno(-addr)
            bias = addr - lo
        prot, segments, tails = {}, [], []
        for _t, flags, off, vaddr, _pa, filesz, memsz, _al in self.loads:
            if filesz and map_file is not None:
                first = page_down(vaddr)
                segments.append((bias + first, page_up(vaddr + filesz) - first, off - (vaddr - first)))
                if memsz > filesz and (vaddr + filesz) % PAGE:          # the .bss on the file's last page
                    tails.append((len(segments), bias + vaddr + filesz, page_up(vaddr + filesz) - (vaddr + filesz)))
            elif filesz:
                space.write(bias + vaddr, self.data[off:off + filesz])
            p = (PROT_READ if flags & PF_R else 0) | (PROT_WRITE if flags & PF_W else 0) | (PROT_EXEC if flags & PF_X else 0)
            for page in range(page_down(vaddr), page_up(vaddr + memsz), PAGE):
                prot[page] = prot.get(page, 0) | p
        if segments:
            map_file(segments)
        for after, at, length in tails:     # (a later segment mapped over that page replaced it, as in order)
            if not any(a <= at < a + n for a, n, _o in segments[after:]):
                space.write(at, bytes(length))
        calls, run_start, run_prot = [], lo, prot.get(lo, PROT_NONE)
        for page in range(lo + PAGE, hi + PAGE, PAGE):
            p = prot.get(page, PROT_NONE) if page < hi else None
            if p != run_prot:
                calls.append(("mprotect", (bias + run_start, page - run_start, run_prot)))
                run_start, run_prot = page, p
        for i in range(0, len(calls), 64):
            for ret in space.syscalls(calls[i:i + 64]):
                if ret:
                    raise Errno(-ret if -4096 < ret < 0 else errno.ENOMEM)
        self.bias, self.end = bias, bias + hi
        return bias

    def span(self):
        """(lowest, highest) address of the loaded segments, page-aligned, before any load bias."""
        return (page_down(min(p[3] for p in self.loads)), page_up(max(p[3] + p[6] for p in self.loads)))

    def file_ranges(self):
        """(start, end, file offset) of the loaded segments' file pages, as /proc/PID/maps names them."""
        return [(self.bias + page_down(vaddr), self.bias + page_up(vaddr + filesz), page_down(off))
                for _t, _flags, off, vaddr, _pa, filesz, _memsz, _al in self.loads if filesz]

    def phdr_address(self):
        for p in self.phdrs:
            if p[0] == PT_PHDR:
                return self.bias + p[3]
        for p in self.loads:                       # the load containing the program headers
            if p[2] <= self.phoff < p[2] + p[5]:
                return self.bias + p[3] + self.phoff - p[2]
        return 0


def script_interpreter(data):
    """(interpreter, optional argument) of a `#!` script, as the kernel splits the line; None if not a script."""
    if not data.startswith(b"#!"):
        return None
    line = data[2:256].split(b"\n", 1)[0].strip(b" \t")
    if not line:
        raise Errno(errno.ENOEXEC)
    parts = line.split(None, 1)
    interp = parts[0].decode("utf-8", "surrogateescape")
    arg = parts[1].strip(b" \t").decode("utf-8", "surrogateescape") if len(parts) > 1 else None
    return interp, arg


def _host_auxv():
    with open("/proc/self/auxv", "rb") as f:
        raw = f.read()
    return {k: v for k, v in struct.iter_unpack("<QQ", raw[:len(raw) // 16 * 16])}


HOST_AUXV = _host_auxv()


def build_stack(space, argv, envp, execfn, main, interp_bias, vdso, ids):
    """Map the stack and write argc, argv, envp and auxv as the kernel lays them out; returns rsp and
    where the strings of argv and envp lie (start, end of argv, end of envp), as /proc/PID/cmdline reads them."""
    top = space.syscall("mmap", 0, STACK_SIZE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0) + STACK_SIZE
    info = bytearray()
    offsets = []

    def put(b):
        offsets.append(len(info))
        info.extend(b)

    for s in argv + envp:
        put(s.encode("utf-8", "surrogateescape") + b"\0")
    put(execfn.encode("utf-8", "surrogateescape") + b"\0")
    put(ARCH.NAME.encode() + b"\0")
    put(os.urandom(16))
    start = (top - len(info) - 64) & ~15
    space.write(start, bytes(info))
    addr = [start + o for o in offsets]
    argv_p, envp_p = addr[:len(argv)], addr[len(argv):len(argv) + len(envp)]
    execfn_p, platform_p, random_p = addr[-3:]
    uid, euid, gid, egid = ids
    auxv = [(AT_PHDR, main.phdr_address()), (AT_PHENT, _PHDR.size), (AT_PHNUM, main.phnum), (AT_PAGESZ, PAGE),
            (AT_BASE, interp_bias), (AT_FLAGS, 0), (AT_ENTRY, main.bias + main.entry), (AT_UID, uid),
            (AT_EUID, euid), (AT_GID, gid), (AT_EGID, egid), (AT_PLATFORM, platform_p),
            (AT_HWCAP, HOST_AUXV.get(AT_HWCAP, 0)), (AT_CLKTCK, 100), (AT_SECURE, 0), (AT_RANDOM, random_p),
            (AT_HWCAP2, HOST_AUXV.get(AT_HWCAP2, 0)), (AT_EXECFN, execfn_p)]
    if AT_MINSIGSTKSZ in HOST_AUXV:
        auxv.append((AT_MINSIGSTKSZ, HOST_AUXV[AT_MINSIGSTKSZ]))
    if vdso:
        auxv.append((AT_SYSINFO_EHDR, vdso))
    auxv.append((AT_NULL, 0))
    words = [len(argv)] + argv_p + [0] + envp_p + [0] + [w for pair in auxv for w in pair]
    sp = (start - 8 * len(words)) & ~15
    space.write(sp, struct.pack("<%dQ" % len(words), *words))
    ends = [addr[len(argv)] if envp else addr[-3], addr[-3]]  # end of argv's strings, of envp's
    return sp, (start, ends[0], ends[1])
