"""strace-like output for the sandbox's system calls: name(decoded arguments) = result.

What strace users expect: flags by name (O_*, AT_*, MAP_*, PROT_*, CLONE_*, W*),
signals and ioctls by name, structures that matter ({st_mode=..., st_size=...},
timespecs, sigactions, iovecs, socket addresses, wait statuses), -1 with the
errno's name, addresses in hex; `-e trace=` sets (names and %classes), `-s`
string size, `-y` paths beside descriptors, `--- SIGxxx {...} ---` for
delivered signals, `+++ exited with N +++`, and the `-c` summary table.
format_call() is also what `pvmexec syscall` prints.
"""
import errno
import os
import signal
import stat as _stat
import struct

from ..syscalls import TABLE, name_of, number


def _flags(value, table, zero="0"):
    names = [n for bit, n in table if bit and value & bit == bit]
    known = 0
    for bit, _n in table:
        known |= bit
    rest = value & ~known
    if rest:
        names.append("%#x" % rest)
    return "|".join(names) if names else zero


def _table(text):
    """"NAME=value NAME=value ..." -> ((value, NAME), ...), for the flag tables below."""
    return tuple((int(v, 0), n) for n, v in (item.split("=") for item in text.split()))


O_CREAT, O_TMPFILE_BIT = 0o100, 0o20000000
_OPEN = _table("O_CREAT=0o100 O_EXCL=0o200 O_NOCTTY=0o400 O_TRUNC=0o1000 O_APPEND=0o2000 O_NONBLOCK=0o4000 "
               "O_DSYNC=0o10000 O_DIRECTORY=0o200000 O_NOFOLLOW=0o400000 O_NOATIME=0o1000000 "
               "O_CLOEXEC=0o2000000 O_PATH=0o10000000 O_TMPFILE=0o20200000")
_AT = _table("AT_SYMLINK_NOFOLLOW=0x100 AT_REMOVEDIR=0x200 AT_SYMLINK_FOLLOW=0x400 AT_NO_AUTOMOUNT=0x800 "
             "AT_EMPTY_PATH=0x1000 AT_STATX_FORCE_SYNC=0x2000 AT_STATX_DONT_SYNC=0x4000")
_PROT = _table("PROT_READ=1 PROT_WRITE=2 PROT_EXEC=4")
_MAP = _table("MAP_SHARED=0x01 MAP_PRIVATE=0x02 MAP_FIXED=0x10 MAP_ANONYMOUS=0x20 MAP_32BIT=0x40 "
              "MAP_GROWSDOWN=0x100 MAP_DENYWRITE=0x800 MAP_EXECUTABLE=0x1000 MAP_LOCKED=0x2000 "
              "MAP_NORESERVE=0x4000 MAP_POPULATE=0x8000 MAP_NONBLOCK=0x10000 MAP_STACK=0x20000 "
              "MAP_HUGETLB=0x40000 MAP_FIXED_NOREPLACE=0x100000")
_CLONE = _table("CLONE_VM=0x100 CLONE_FS=0x200 CLONE_FILES=0x400 CLONE_SIGHAND=0x800 CLONE_PIDFD=0x1000 "
                "CLONE_PTRACE=0x2000 CLONE_VFORK=0x4000 CLONE_PARENT=0x8000 CLONE_THREAD=0x10000 "
                "CLONE_NEWNS=0x20000 CLONE_SYSVSEM=0x40000 CLONE_SETTLS=0x80000 CLONE_PARENT_SETTID=0x100000 "
                "CLONE_CHILD_CLEARTID=0x200000 CLONE_DETACHED=0x400000 CLONE_UNTRACED=0x800000 "
                "CLONE_CHILD_SETTID=0x1000000 CLONE_NEWCGROUP=0x2000000 CLONE_NEWUTS=0x4000000 "
                "CLONE_NEWIPC=0x8000000 CLONE_NEWUSER=0x10000000 CLONE_NEWPID=0x20000000 CLONE_NEWNET=0x40000000 "
                "CLONE_IO=0x80000000")
_WAIT = _table("WNOHANG=1 WUNTRACED=2 WEXITED=4 WCONTINUED=8 WNOWAIT=0x1000000 __WNOTHREAD=0x20000000 "
               "__WALL=0x40000000 __WCLONE=0x80000000")
_SA = _table("SA_NOCLDSTOP=1 SA_NOCLDWAIT=2 SA_SIGINFO=4 SA_RESTORER=0x04000000 SA_ONSTACK=0x08000000 "
             "SA_RESTART=0x10000000 SA_NODEFER=0x40000000 SA_RESETHAND=0x80000000")
_ACCESS = _table("R_OK=4 W_OK=2 X_OK=1")
_IOCTL = {0x5401: "TCGETS", 0x5402: "TCSETS", 0x5403: "TCSETSW", 0x5404: "TCSETSF", 0x540F: "TIOCGPGRP",
          0x5410: "TIOCSPGRP", 0x5413: "TIOCGWINSZ", 0x5414: "TIOCSWINSZ", 0x541B: "FIONREAD", 0x5421: "FIONBIO",
          0x5450: "FIONCLEX", 0x5451: "FIOCLEX", 0x5429: "TIOCGSID", 0x540E: "TIOCSCTTY"}
_FCNTL = {0: "F_DUPFD", 1: "F_GETFD", 2: "F_SETFD", 3: "F_GETFL", 4: "F_SETFL", 5: "F_GETLK", 6: "F_SETLK",
          7: "F_SETLKW", 1030: "F_DUPFD_CLOEXEC", 1031: "F_SETPIPE_SZ", 1032: "F_GETPIPE_SZ", 1033: "F_ADD_SEALS",
          1034: "F_GET_SEALS"}
_FUTEX = {0: "FUTEX_WAIT", 1: "FUTEX_WAKE", 3: "FUTEX_REQUEUE", 4: "FUTEX_CMP_REQUEUE", 5: "FUTEX_WAKE_OP",
          9: "FUTEX_WAIT_BITSET", 10: "FUTEX_WAKE_BITSET"}
_WHENCE = {0: "SEEK_SET", 1: "SEEK_CUR", 2: "SEEK_END", 3: "SEEK_DATA", 4: "SEEK_HOLE"}
_HOW = {0: "SIG_BLOCK", 1: "SIG_UNBLOCK", 2: "SIG_SETMASK"}
_CLOCKS = {0: "CLOCK_REALTIME", 1: "CLOCK_MONOTONIC", 2: "CLOCK_PROCESS_CPUTIME_ID", 3: "CLOCK_THREAD_CPUTIME_ID",
           4: "CLOCK_MONOTONIC_RAW", 5: "CLOCK_REALTIME_COARSE", 6: "CLOCK_MONOTONIC_COARSE", 7: "CLOCK_BOOTTIME"}
_ARCH_PRCTL = {0x1001: "ARCH_SET_GS", 0x1002: "ARCH_SET_FS", 0x1003: "ARCH_GET_FS", 0x1004: "ARCH_GET_GS",
               0x3001: "ARCH_CET_STATUS"}
_FAMILIES = {1: "AF_UNIX", 2: "AF_INET", 10: "AF_INET6", 16: "AF_NETLINK"}
_SOCK_TYPES = {1: "SOCK_STREAM", 2: "SOCK_DGRAM", 3: "SOCK_RAW", 5: "SOCK_SEQPACKET"}
_RET_HEX = {"mmap", "brk", "mremap", "shmat"}
_AT_FLAGS_AT = {"newfstatat": 3, "fchmodat": 3, "faccessat2": 3, "utimensat": 3, "execveat": 4, "statx": 2,
                "unlinkat": 2, "linkat": 4, "fchownat": 4}          # which argument holds AT_* flags

# strace's classes (-e trace=%file ...), by the calls' names.
CLASSES = {
    "file": "open openat openat2 creat stat lstat newfstatat statx access faccessat faccessat2 readlink readlinkat "
            "chdir mkdir mkdirat rmdir unlink unlinkat rename renameat renameat2 link linkat symlink symlinkat "
            "chmod fchmodat chown lchown fchownat truncate utimensat execve execveat statfs getxattr lgetxattr "
            "listxattr llistxattr mknod mknodat getcwd",
    "process": "fork vfork clone clone3 execve execveat exit exit_group wait4 waitid kill tkill tgkill",
    "network": "socket socketpair bind listen accept accept4 connect getsockname getpeername sendto recvfrom "
               "sendmsg recvmsg sendmmsg recvmmsg shutdown setsockopt getsockopt",
    "signal": "rt_sigaction rt_sigprocmask rt_sigreturn rt_sigsuspend rt_sigpending rt_sigtimedwait sigaltstack "
              "kill tkill tgkill pause signalfd signalfd4",
    "memory": "mmap munmap mprotect mremap madvise brk mlock munlock msync",
    "desc": "read write pread64 pwrite64 readv writev close dup dup2 dup3 fcntl ioctl lseek select pselect6 poll "
            "ppoll epoll_create epoll_create1 epoll_ctl epoll_wait epoll_pwait eventfd eventfd2 pipe pipe2 "
            "getdents64 fstat fstatfs fsync fdatasync ftruncate sendfile",
}
CLASSES["net"] = CLASSES["network"]


def trace_set(spec):
    """The syscall numbers a `-e trace=...` expression names (None: all). ValueError for a bad name."""
    spec = spec.split("=", 1)[1] if spec.startswith("trace=") else spec
    negate = spec.startswith("!")
    names = set()
    for item in spec.lstrip("!").split(","):
        item = item.strip()
        if item in ("all", ""):
            names |= {n for n, _k in TABLE.values()}
        elif item == "none":
            continue
        elif item.startswith("%"):
            if item[1:] not in CLASSES:
                raise ValueError("unknown syscall class %s (known: %s)" % (
                    item, ", ".join("%" + c for c in sorted(CLASSES))))
            names |= set(CLASSES[item[1:]].split())
        else:
            number(item)                                   # a ValueError naming it if unknown
            names.add(item)
    nrs = {nr for nr, (n, _k) in TABLE.items() if n in names}
    return set(TABLE) - nrs if negate else nrs


def quote(data, limit=32):
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


def signame(sig):
    """The kernel's numbering, as strace names it: real-time signals are SIGRTMIN (32) and SIGRT_n."""
    if sig == 32:
        return "SIGRTMIN"
    if 32 < sig <= 64:
        return "SIGRT_%d" % (sig - 32)
    try:
        return signal.Signals(sig).name
    except ValueError:
        return str(sig)


def _sigset(mask):
    """[USR1 TERM], or ~[KILL STOP] for a set holding most signals, as strace prints them."""
    inside = [s for s in range(1, 65) if mask >> (s - 1) & 1]
    if len(inside) > 32:
        return "~[" + " ".join(signame(s)[3:] for s in range(1, 65) if s not in inside) + "]"
    return "[" + " ".join(signame(s)[3:] for s in inside) + "]"


def _signed(a):
    return a - (1 << 64) if a >= 1 << 63 else a


def _int32(a):
    a &= 0xFFFFFFFF
    return a - (1 << 32) if a >= 1 << 31 else a


def _wait_status(s):
    if s & 0x7F == 0:
        return "[{WIFEXITED(s) && WEXITSTATUS(s) == %d}]" % (s >> 8 & 0xFF)
    if s & 0xFF == 0x7F:
        return "[{WIFSTOPPED(s) && WSTOPSIG(s) == %s}]" % signame(s >> 8 & 0xFF)
    return "[{WIFSIGNALED(s) && WTERMSIG(s) == %s%s}]" % (signame(s & 0x7F), " && WCOREDUMP(s)" if s & 0x80 else "")


def _mode(m):
    kinds = ((_stat.S_IFREG, "S_IFREG"), (_stat.S_IFDIR, "S_IFDIR"), (_stat.S_IFLNK, "S_IFLNK"),
             (_stat.S_IFCHR, "S_IFCHR"), (_stat.S_IFBLK, "S_IFBLK"), (_stat.S_IFIFO, "S_IFIFO"),
             (_stat.S_IFSOCK, "S_IFSOCK"))
    kind = next((n for v, n in kinds if _stat.S_IFMT(m) == v), "%#o" % _stat.S_IFMT(m))
    return "%s|%04o" % (kind, _stat.S_IMODE(m))


class _Memory:
    """Reads guest memory for the decoders; anything unreadable shows as its address."""

    def __init__(self, read):
        self.read = read

    def get(self, addr, n):
        if not addr or self.read is None:
            return None
        try:
            data = self.read(addr, n)
            return data if len(data) == n else None
        except Exception:
            return None


def _stat_struct(mem, addr):
    raw = mem.get(addr, 144)
    if raw is None:
        return "%#x" % addr
    dev, ino, nlink, mode, uid, gid, _pad, rdev, size = struct.unpack_from("<QQQIIIIQq", raw)
    return "{st_dev=%#x, st_ino=%d, st_mode=%s, st_nlink=%d, st_uid=%d, st_gid=%d, st_size=%d, ...}" % (
        dev, ino, _mode(mode), nlink, uid, gid, size)


def _timespec(mem, addr):
    raw = mem.get(addr, 16)
    if raw is None:
        return "NULL" if not addr else "%#x" % addr
    return "{tv_sec=%d, tv_nsec=%d}" % struct.unpack("<qq", raw)


def _sigaction(mem, addr):
    raw = mem.get(addr, 32)
    if raw is None:
        return "NULL" if not addr else "%#x" % addr
    handler, flags, restorer, mask = struct.unpack("<QQQQ", raw)
    shown = {0: "SIG_DFL", 1: "SIG_IGN"}.get(handler, "%#x" % handler)
    return "{sa_handler=%s, sa_mask=%s, sa_flags=%s%s}" % (shown, _sigset(mask), _flags(flags, _SA),
                                                          ", sa_restorer=%#x" % restorer if restorer else "")


def _iovec(mem, addr, n, limit, data_len):
    raw = mem.get(addr, 16 * min(n, 8)) if n > 0 else None
    if raw is None:
        return "%#x" % addr
    parts, left = [], data_len
    for i in range(min(n, 8)):
        base, length = struct.unpack_from("<QQ", raw, 16 * i)
        shown = min(length, left, limit)
        data = mem.get(base, shown) if shown > 0 else b""
        parts.append("{iov_base=%s, iov_len=%d}" % (quote(data, limit) if data is not None else "%#x" % base,
                                                   length))
        left -= min(length, left)
    return "[" + ", ".join(parts) + (", ..." if n > 8 else "") + "]"


def _array_length(mem, addr, limit=4096):
    """Entries of a NULL-terminated array of pointers (envp), or None if unreadable."""
    n = 0
    while n < limit:
        raw = mem.get(addr + 8 * n, 8)
        if raw is None:
            return None
        if raw == bytes(8):
            return n
        n += 1
    return None


def _string_array(mem, addr, strsize, shown=32):
    """argv as strace shows it: ["ls", "-l", ...]."""
    if not addr:
        return "NULL"
    items = []
    for n in range(shown + 1):
        raw = mem.get(addr + 8 * n, 8)
        if raw is None:
            return "%#x" % addr
        ptr = struct.unpack("<Q", raw)[0]
        if not ptr:
            return "[" + ", ".join(items) + "]"
        if n == shown:
            break
        data = b""
        while len(data) < strsize + 1:
            chunk = mem.get(ptr + len(data), 1)
            if chunk is None or chunk == b"\0":
                break
            data += chunk
        items.append(quote(data, strsize))
    return "[" + ", ".join(items) + ", ...]"


def _sockaddr(mem, addr, length):
    raw = mem.get(addr, min(length, 110)) if length else None
    if raw is None or len(raw) < 2:
        return "NULL" if not addr else "%#x" % addr
    family = struct.unpack_from("<H", raw)[0]
    name = _FAMILIES.get(family, str(family))
    if family == 1:
        path = raw[2:].split(b"\0", 1)[0] if raw[2:3] != b"\0" else b"@" + raw[3:].rstrip(b"\0")
        return "{sa_family=%s, sun_path=%s}" % (name, quote(path, 108))
    if family == 2 and len(raw) >= 8:
        port, = struct.unpack_from(">H", raw, 2)
        return "{sa_family=%s, sin_port=htons(%d), sin_addr=inet_addr(\"%s\")}" % (
            name, port, ".".join(str(b) for b in raw[4:8]))
    return "{sa_family=%s, ...}" % name


def format_call(name, kinds, args, ret, read=None, strsize=32, fd_path=None, shown=None):
    """One call as strace shows it (ret None: unfinished, `?`). read(addr, n) reads the caller's memory
    for strings, buffers and structures; fd_path(fd) gives a descriptor's path for -y; shown: the
    arguments already formatted (before a call that replaces the memory they were in: execve)."""
    if shown is not None:
        return "%s(%s) = %s" % (name, shown, _result(name, ret))
    mem = _Memory(read)
    kinds = [k for _n, k in kinds or ()]
    args = list(args)
    if name in ("open", "openat"):
        mode_at = 2 if name == "open" else 3
        if len(args) > mode_at and args[mode_at - 1] & (O_CREAT | O_TMPFILE_BIT) == 0:
            args = args[:mode_at]                      # no mode, as strace shows it
    ok = ret is not None and not -4096 < ret < 0
    shown = []
    for i, a in enumerate(args):
        kind = kinds[i] if i < len(kinds) else "int"
        shown.append(_argument(name, i, kind, a, args, ret, ok, mem, strsize, fd_path))
    result = _result(name, ret)
    return "%s(%s) = %s" % (name, ", ".join(shown), result)


def _argument(name, i, kind, a, args, ret, ok, mem, strsize, fd_path):
    if kind == "str":
        return "NULL" if a is None else quote(a.encode("utf-8", "surrogateescape") if isinstance(a, str) else a, 4096)
    if kind == "fd":
        fd = _int32(a) if isinstance(a, int) else a
        if fd == -100:
            return "AT_FDCWD"
        path = fd_path(fd) if fd_path and fd >= 0 else None
        return "%d<%s>" % (fd, path) if path else str(fd)
    if isinstance(a, str):                             # pvmexec syscall: a string placed in the target
        return quote(a.encode(), strsize)
    # buffers and structures
    if name in ("read", "pread64") and i == 1:
        data = mem.get(a, min(ret, strsize)) if ok and ret > 0 else b""
        return (quote(data, strsize) + ("..." if ok and ret > strsize else "")) if data is not None else "%#x" % a
    if name in ("write", "pwrite64", "sendto") and i == 1:
        n = args[2]
        data = mem.get(a, min(n, strsize)) if n else b""
        return (quote(data, strsize) + ("..." if n > strsize else "")) if data is not None else "%#x" % a
    if name in ("readv", "writev") and i == 1:
        return _iovec(mem, a, args[2], strsize, ret if ok and name == "readv" else (1 << 62))
    if name in ("stat", "lstat", "fstat", "newfstatat") and i == (2 if name == "newfstatat" else 1):
        return _stat_struct(mem, a) if ok else "%#x" % a
    if name in ("nanosleep",) or name == "clock_nanosleep" and i == 2:
        return _timespec(mem, a)
    if name in ("clock_gettime", "clock_getres") and i == 1:
        return _timespec(mem, a) if ok else "%#x" % a
    if name in ("clock_gettime", "clock_getres", "clock_nanosleep") and i == 0:
        return _CLOCKS.get(a, str(a))
    if name == "rt_sigaction":
        if i == 0:
            return signame(a)
        if i in (1, 2):
            return _sigaction(mem, a) if i == 1 or ok else ("NULL" if not a else "%#x" % a)
    if name == "rt_sigprocmask":
        if i == 0:
            return _HOW.get(a, str(a))
        if i in (1, 2):
            raw = mem.get(a, 8) if i == 1 or ok else None
            return _sigset(struct.unpack("<Q", raw)[0]) if raw else ("NULL" if not a else "%#x" % a)
    if name in ("kill", "tkill") and i == 1 or name == "tgkill" and i == 2:
        return signame(a)
    if name in ("wait4",) and i == 1:
        raw = mem.get(a, 4) if ok else None
        return _wait_status(struct.unpack("<i", raw)[0]) if raw else ("NULL" if not a else "%#x" % a)
    if name == "wait4" and i == 2 or name == "waitid" and i == 3:
        return _flags(a, _WAIT)
    if name in ("kill", "wait4") and i == 0:
        return str(_int32(a))
    if name in ("sendto", "recvfrom") and i == 4:
        return _sockaddr(mem, a, args[5] if name == "sendto" else 128) if a else "NULL"
    if name in ("execve", "execveat") and i == (1 if name == "execve" else 2):
        return _string_array(mem, a, strsize)
    if name in ("execve", "execveat") and i == (2 if name == "execve" else 3):
        n = _array_length(mem, a)
        return "NULL" if not a else "%#x /* %s vars */" % (a, n if n is not None else "?")
    if kind == "ptr":
        return "NULL" if a == 0 else "%#x" % a
    # integers with names
    if name in ("open", "openat") and i == (1 if name == "open" else 2):
        acc = ("O_RDONLY", "O_WRONLY", "O_RDWR", "O_ACCMODE")[a & 3]
        rest = _flags(a & ~3 & ~0o100000, _OPEN, "")
        return acc + ("|" + rest if rest else "")
    if name in ("open", "creat", "mkdir", "chmod") and i == (2 if name == "open" else 1) or \
            name in ("openat", "mkdirat", "fchmodat") and i == (3 if name == "openat" else 2) or name == "umask":
        return ("0%o" % a if a else "0").zfill(3)      # C's %#03o, as strace
    if name in ("mmap", "mprotect") and i == 2:
        return _flags(a, _PROT, "PROT_NONE")
    if name == "mmap" and i == 3:
        return _flags(a, _MAP)
    if name == "mmap" and i == 0:
        return "NULL" if a == 0 else "%#x" % a
    if name in ("munmap", "mprotect", "madvise", "mremap", "brk") and i == 0:
        return "NULL" if a == 0 else "%#x" % a
    if name == "clone" and i in (1, 4):                  # the new stack and TLS
        return "NULL" if a == 0 else "%#x" % a
    if name == "clone" and i == 0:
        low = a & 0xFF
        return _flags(a & ~0xFF, _CLONE) + ("|" + signame(low) if low else "")
    if _AT_FLAGS_AT.get(name) == i:
        return _flags(a, _AT)
    if name in ("access", "faccessat", "faccessat2") and i == (1 if name == "access" else 2):
        return _flags(a, _ACCESS, "F_OK")
    if name == "ioctl" and i == 1:
        return _IOCTL.get(a & 0xFFFFFFFF, "%#x" % a)
    if name == "ioctl" and i == 2:                       # most requests take a pointer
        return "NULL" if a == 0 else "%#x" % a
    if name == "fcntl" and i == 1:
        return _FCNTL.get(a, str(a))
    if name == "lseek" and i == 2:
        return _WHENCE.get(a, str(a))
    if name == "futex" and i == 1:
        cmd = a & 0x7F
        return _FUTEX.get(cmd, str(cmd)) + ("_PRIVATE" if a & 128 else "") + ("|FUTEX_CLOCK_REALTIME" if a & 256 else "")
    if name == "arch_prctl" and i == 0:
        return _ARCH_PRCTL.get(a, "%#x" % a)
    if name in ("socket", "socketpair") and i == 0:
        return _FAMILIES.get(a, str(a))
    if name in ("socket", "socketpair") and i == 1:
        extra = [n for bit, n in ((0o2000000, "SOCK_CLOEXEC"), (0o4000, "SOCK_NONBLOCK")) if a & bit]
        return "|".join([_SOCK_TYPES.get(a & 0xF, str(a & 0xF))] + extra)
    return str(_signed(a))


def _result(name, ret):
    if ret is None:
        return "?"
    if -4096 < ret < 0:
        return "-1 %s (%s)" % (errno.errorcode.get(-ret, str(-ret)), os.strerror(-ret))
    return "%#x" % ret if name in _RET_HEX else str(ret)


def format_siginfo(info):
    """--- SIGCHLD {si_signo=SIGCHLD, si_code=..., si_pid=...} --- (a delivered signal's siginfo bytes)."""
    signo, err, code = struct.unpack_from("<iii", info)
    fields = ["si_signo=%s" % signame(signo), "si_code=%s" % _si_code(signo, code)]
    if err:
        fields.append("si_errno=%d" % err)
    if code <= 0 or signo == signal.SIGCHLD:
        pid, uid = struct.unpack_from("<iI", info, 16)
        fields += ["si_pid=%d" % pid, "si_uid=%d" % uid]
        if signo == signal.SIGCHLD:
            fields.append("si_status=%d" % struct.unpack_from("<i", info, 24)[0])
    elif signo in (signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP):
        fields.append("si_addr=%#x" % struct.unpack_from("<Q", info, 16)[0])
    return "--- %s {%s} ---" % (signame(signo), ", ".join(fields))


def _si_code(signo, code):
    generic = {0: "SI_USER", -6: "SI_TKILL", 0x80: "SI_KERNEL", -1: "SI_QUEUE", -2: "SI_TIMER"}
    if code in generic:
        return generic[code]
    if signo == signal.SIGCHLD:
        return {1: "CLD_EXITED", 2: "CLD_KILLED", 3: "CLD_DUMPED", 4: "CLD_TRAPPED", 5: "CLD_STOPPED",
                6: "CLD_CONTINUED"}.get(code, str(code))
    if signo == signal.SIGSEGV:
        return {1: "SEGV_MAPERR", 2: "SEGV_ACCERR"}.get(code, str(code))
    return str(code)


class Tracer:
    """Trace lines to a text file (a path, or an open file such as sys.stderr).

    calls: the syscall numbers to show (None: all); summary: count calls, errors and time for the -c
    table instead of printing lines; strsize: bytes of strings and buffers shown; show_paths: -y.
    """

    def __init__(self, out, calls=None, summary=False, strsize=32, show_paths=False):
        self.out = open(out, "w") if isinstance(out, str) else out
        self.calls, self.summary, self.strsize, self.show_paths = calls, summary, strsize, show_paths
        self.counts = {}                                  # nr -> [calls, errors, seconds]

    def _emit(self, p, text):
        if self.summary:
            return
        self.out.write("[pid %d] %s\n" % (p.tid, text))
        self.out.flush()

    EARLY = frozenset(number(n) for n in ("execve", "execveat"))   # formatted before their memory goes

    def enter(self, p, nr, args):
        """For EARLY calls: the arguments formatted before the call runs."""
        name, kinds = TABLE.get(nr, (name_of(nr), ()))
        line = format_call(name, kinds, args, None, read=p.read, strsize=self.strsize)
        return line[len(name) + 1:line.rindex(") = ")]

    def call(self, p, nr, args, ret, seconds=0.0, shown=None):
        if ret is None and nr in self.EARLY:
            ret = 0                                       # execve that worked: the new image runs
        c = self.counts.setdefault(nr, [0, 0, 0.0])
        c[0] += 1
        c[1] += ret is not None and -4096 < ret < 0
        c[2] += seconds
        if self.summary or self.calls is not None and nr not in self.calls:
            return
        name, kinds = TABLE.get(nr, (name_of(nr), ()))
        fd_path = (lambda fd: _fd_path(p, fd)) if self.show_paths else None
        self._emit(p, format_call(name, kinds, args, ret, read=p.read, strsize=self.strsize, fd_path=fd_path,
                                  shown=shown))

    def unsupported(self, p, nr, args, first):
        c = self.counts.setdefault(nr, [0, 0, 0.0])
        c[0] += 1
        c[1] += 1
        if self.summary or self.calls is not None and nr not in self.calls:
            return
        note = " (not provided by the sandbox)" if first else ""
        self._emit(p, "%s(%s) = -1 ENOSYS (Function not implemented)%s" % (
            name_of(nr), ", ".join("%#x" % a for a in args[:len(TABLE.get(nr, ("", ()))[1] or ())]), note))

    def signal(self, p, info):
        self._emit(p, format_siginfo(info))

    def exited(self, p, status):
        if status & 0x7F:
            self._emit(p, "+++ killed by %s%s +++" % (signame(status & 0x7F), " (core dumped)" if status & 0x80 else ""))
        else:
            self._emit(p, "+++ exited with %d +++" % (status >> 8))

    def close(self):
        """The -c table, as strace prints it, when summarising."""
        if not self.summary:
            return
        total = sum(c[2] for c in self.counts.values()) or 1e-9
        lines = ["% time     seconds  usecs/call     calls    errors syscall",
                 "------ ----------- ----------- --------- --------- ----------------"]
        for nr, (calls, errors, secs) in sorted(self.counts.items(), key=lambda kv: (-kv[1][2], -kv[1][0])):
            lines.append("%6.2f %11.6f %11d %9d %9s %s" % (100 * secs / total, secs, secs / calls * 1e6, calls,
                                                          errors or "", name_of(nr)))
        lines.append("------ ----------- ----------- --------- --------- ----------------")
        lines.append("100.00 %11.6f %11d %9d %9s total" % (
            sum(c[2] for c in self.counts.values()), sum(c[2] for c in self.counts.values()) /
            max(sum(c[0] for c in self.counts.values()), 1) * 1e6, sum(c[0] for c in self.counts.values()),
            sum(c[1] for c in self.counts.values()) or ""))
        self.out.write("\n".join(lines) + "\n")
        self.out.flush()


def _fd_path(p, fd):
    try:
        return p.fds.get(fd).path
    except Exception:
        return None
