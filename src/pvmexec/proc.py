"""Facts about processes from /proc, and why the kernel refused to let us trace one."""
import ctypes
import errno
import fcntl
import os
import select
import struct

from .abi import CAP_SYS_PTRACE, PAGE, PAGEMAP_SCAN, PF_KTHREAD, PM_SCAN_CHECK_WPASYNC, PM_SCAN_WP_MATCHING
from .arch import current as current_arch
from .errors import AccessDenied, AlreadyTraced, TargetGone, UnsupportedTarget


def read_text(path):
    """A small file of /proc read whole with plain reads (open() and its text layers cost about as much as
    the kernel's work for a /proc/PID/maps)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        chunks = []
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                return b"".join(chunks).decode(errors="surrogateescape")
            chunks.append(chunk)
    finally:
        os.close(fd)


def mappings(pid, identity=False):
    """[(start, end, perms, path)] of /proc/PID/maps ("" for an anonymous mapping; a path keeps its spaces).
    identity: each with a fifth item (path, device, inode, file offset, size), which names the same code
    in every process that maps it."""
    out = []
    for line in read_text("/proc/%d/maps" % pid).splitlines():
        parts = line.split(None, 5)
        lo, hi = (int(x, 16) for x in parts[0].split("-"))
        path = parts[5] if len(parts) > 5 else ""
        if identity:
            out.append((lo, hi, parts[1], path, (path, parts[3], parts[4], parts[2], hi - lo)))
        else:
            out.append((lo, hi, parts[1], path))
    return out


def ended(pidfd, wait=0.0):
    """Whether the process of pidfd has ended (its pidfd reads ready), waiting up to `wait` seconds."""
    return bool(select.select([pidfd], [], [], wait)[0])


def maps_prot(perms):
    """PROT_* bits of a /proc/PID/maps permission field ("r-xp")."""
    return (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)


def status(pid):
    """/proc/PID/status as a dict of strings."""
    try:
        fd = os.open("/proc/%d/status" % pid, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(pid) from None
    try:
        data = os.read(fd, 65536).decode()
    except ProcessLookupError:
        raise TargetGone(pid) from None
    finally:
        os.close(fd)
    return dict(line.split(":\t", 1) for line in data.splitlines() if ":\t" in line)


class PagemapScan:
    """PAGEMAP_SCAN (Linux 6.7) on /proc/PID/pagemap: the kernel finds the pages of given categories."""

    _ARG = struct.Struct("<12Q")
    _REGIONS = 4096

    def __init__(self, pid):
        self.fd = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY | os.O_CLOEXEC)
        self.vec = (ctypes.c_uint64 * (3 * self._REGIONS))()

    def regions(self, start, end, anyof, without=0, wp=False):
        """[(start, end)] of pages in [start, end) with any of the categories in `anyof` and none in
        `without`; with wp, they are write-protected again in the same step. OSError if refused."""
        return [(s, e) for s, e, _c in self.categorized(start, end, anyof, anyof, without, wp)]

    def categorized(self, start, end, anyof, report, without=0, wp=False):
        """As regions(), each as (start, end, categories): which of `report` its pages had when scanned
        (before wp protected them)."""
        out = []
        while start < end:
            arg = bytearray(self._ARG.pack(self._ARG.size, (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) if wp else 0,
                                           start, end, 0, ctypes.addressof(self.vec), self._REGIONS, 0, without,
                                           without, anyof, report | anyof))
            n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg)
            walk_end = self._ARG.unpack(arg)[4]
            out.extend((self.vec[3 * i], self.vec[3 * i + 1], self.vec[3 * i + 2]) for i in range(n))
            if walk_end <= start:
                break
            start = walk_end
        return out

    def close(self):
        os.close(self.fd)


def host_tid(pid, ns_tid):
    """Our name for the thread of process pid that its own pid namespace calls ns_tid (the NSpid line of
    each task's status: ours first, its innermost last); None if it has none."""
    try:
        names = os.listdir("/proc/%d/task" % pid)
    except OSError:
        raise TargetGone(pid) from None
    for name in names:
        try:
            with open("/proc/%d/task/%s/status" % (pid, name), "rb") as f:
                data = f.read()
        except OSError:
            continue
        for line in data.splitlines():
            if line.startswith(b"NSpid:"):
                ids = line.split()[1:]
                if ids and int(ids[-1]) == ns_tid:
                    return int(ids[0])
    return None


def thread_exited(pid, tid):
    """Whether thread tid of process pid has exited: no task entry, or state Z or X."""
    try:
        with open("/proc/%d/task/%d/stat" % (pid, tid), "rb") as f:
            stat = f.read()
    except OSError:
        return True
    return stat[stat.rfind(b")") + 2:][:1] in (b"Z", b"X")


def has_cap(cap):
    return bool(int(status(os.getpid())["CapEff"], 16) >> cap & 1)


def is_descendant(pid):
    me = os.getpid()
    while pid > 1:
        try:
            pid = int(status(pid)["PPid"])
        except TargetGone:
            return False
        if pid == me:
            return True
    return False


def denied_reason(pid, st):
    """Why PTRACE_SEIZE said EPERM, in words a user can act on."""
    if has_cap(CAP_SYS_PTRACE):
        return "refused although the caller has CAP_SYS_PTRACE (a security module, or the target is in another user namespace)"
    my_uid, my_gid = os.getuid(), os.getgid()
    uids = [int(x) for x in st["Uid"].split()[:3]]
    gids = [int(x) for x in st["Gid"].split()[:3]]
    if any(u != my_uid for u in uids) or any(g != my_gid for g in gids):
        return ("the target runs as uid %s gid %s; the caller (uid %d gid %d) needs the same ids "
                "or CAP_SYS_PTRACE" % ("/".join(map(str, uids)), "/".join(map(str, gids)), my_uid, my_gid))
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        scope = 0
    if scope == 3:
        return "Yama ptrace_scope is 3: ptrace attach is disabled on this machine"
    if scope == 2:
        return "Yama ptrace_scope is 2: only a caller with CAP_SYS_PTRACE may attach"
    if scope == 1 and not is_descendant(pid):
        return ("Yama ptrace_scope is 1: only descendants may be traced (run as root, or the target "
                "can allow this caller with prctl(PR_SET_PTRACER))")
    return ("the target is not dumpable (setuid/setgid program or prctl(PR_SET_DUMPABLE, 0)) "
            "or a security module refused")


def seize_error(pid, exc):
    """The domain error for an OSError from PTRACE_SEIZE on pid."""
    if exc.errno == errno.ESRCH:
        return TargetGone(pid)
    if exc.errno != errno.EPERM:
        return exc
    try:
        st = status(pid)
    except TargetGone as gone:
        return gone
    if st.get("State", "?")[:1] in ("Z", "X"):
        return TargetGone(pid, "process %d has exited (zombie)" % pid)
    tracer, tid = tracer_of_any_thread(pid, st)
    if tracer == os.getpid():
        return AlreadyTraced(pid, tracer, tid, "this process already traces it (another Space attached to "
                             "it, still open?)")
    if tracer:
        return AlreadyTraced(pid, tracer, tid)
    return AccessDenied(pid, denied_reason(pid, st))


def tracer_of_any_thread(pid, st=None):
    """(tracer pid, tid) of the first traced thread of process pid, or (0, 0): a tracer may hold only one
    thread, not the leader."""
    st = st or status(pid)
    if int(st.get("TracerPid", "0")):
        return int(st["TracerPid"]), pid
    try:
        tids = sorted(int(t) for t in os.listdir("/proc/%d/task" % pid))
    except OSError:
        return 0, 0
    for tid in tids:
        try:
            with open("/proc/%d/task/%d/status" % (pid, tid)) as f:
                for line in f:
                    if line.startswith("TracerPid:"):
                        if int(line.split()[1]):
                            return int(line.split()[1]), tid
                        break
        except OSError:
            continue
    return 0, 0


# -- what we can operate on -------------------------------------------------------

def pid_of_pidfd(fd):
    """The pid a pidfd refers to (from its fdinfo), or the error that says what fd is."""
    try:
        with open("/proc/self/fdinfo/%d" % fd) as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    if pid <= 0:
                        raise TargetGone(pid, "the process of pidfd %d has exited" % fd)
                    return pid
    except FileNotFoundError:
        raise ValueError("%d is not an open file descriptor" % fd) from None
    raise ValueError("file descriptor %d is not a pidfd" % fd)


def check_target(pid):
    """Refuse what we cannot operate on, with the reason, before touching it."""
    st = status(pid)
    state = st.get("State", "?")[:1]
    if state in ("Z", "X"):
        raise TargetGone(pid, "process %d is a zombie (exited, not yet reaped)" % pid)
    tgid = int(st["Tgid"])
    if tgid == os.getpid():
        raise UnsupportedTarget(pid, "it is the calling process itself (attach to another process)")
    try:
        with open("/proc/%d/stat" % pid) as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(pid) from None
    if flags & PF_KTHREAD:
        raise UnsupportedTarget(pid, "it is a kernel thread")
    tracer, tid = tracer_of_any_thread(pid, st)
    if tracer:
        raise (AlreadyTraced(pid, tracer, tid, "this process already traces it (another Space attached to it, "
                             "still open?)") if tracer == os.getpid() else AlreadyTraced(pid, tracer, tid))
    return st, tgid


def check_elf(pid):
    """Refuse a process whose executable is not x86-64 ELF (see check_elf_header)."""
    try:
        with open("/proc/%d/exe" % pid, "rb") as f:
            head = f.read(20)
    except OSError:
        return
    check_elf_header(pid, head)


def check_elf_header(pid, head):
    """Refuse executables that are not 64-bit ELF for this machine (i386 and x32 processes too)."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return
    cls, machine = head[4], struct.unpack_from("<H", head, 18)[0]
    arch = current_arch()
    if cls == 1 and machine == arch.ELF_MACHINE:
        raise UnsupportedTarget(pid, "it is an x32 process (not supported)")
    if cls == 1:
        raise UnsupportedTarget(pid, "it is a 32-bit process (not supported yet)")
    if machine != arch.ELF_MACHINE:
        raise UnsupportedTarget(pid, "its executable is for ELF machine %d, not %s" % (machine, arch.TITLE))


def pick_thread(tgid):
    """The thread to borrow by default: the leader, else the first live one."""
    for tid in [tgid] + sorted(int(t) for t in os.listdir("/proc/%d/task" % tgid)):
        try:
            with open("/proc/%d/task/%d/stat" % (tgid, tid)) as f:
                if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                    return tid
        except FileNotFoundError:
            continue
    raise TargetGone(tgid, "process %d has no live thread" % tgid)


def free_address(maps, size):
    """A random page-aligned address in the middle half of the widest hole of an address space (maps: its
    mappings()), not the one below its stack (where the stack grows): free now and unlikely to be wanted
    soon; 0 if none."""
    maps = [(m[0], m[1], m[3]) for m in maps if m[1] <= current_arch().TASK_SIZE_MAX]
    holes = [(a[1], b[0]) for a, b in zip(maps, maps[1:]) if b[2] != "[stack]" and b[0] - a[1] >= 4 * size]
    if not holes:
        return 0
    lo, hi = max(holes, key=lambda h: h[1] - h[0])
    quarter = (hi - lo) // 4
    return (lo + quarter + int.from_bytes(os.urandom(8), "little") % max(1, 2 * quarter - size)) & ~(PAGE - 1)
