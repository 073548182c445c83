"""Sandbox handlers: memory, signals, identity, time, limits and exec. Methods of Sandbox."""
import errno
import os
import resource
import signal
import struct
import time

from .files import AT_EMPTY_PATH, AT_FDCWD, Errno
from .processes import UNBLOCKABLE

PAGE = 4096
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 0x01, 0x02, 0x10, 0x20
MAP_SHARED_VALIDATE, MAP_FIXED_NOREPLACE = 0x03, 0x100000
MREMAP_FIXED = 0x2
PROT_READ, PROT_WRITE = 1, 2
TASK_SIZE = (1 << 47) - PAGE
_SIGKILL, _SIGSTOP = signal.SIGKILL, signal.SIGSTOP


def _up(x):
    return (x + PAGE - 1) & ~(PAGE - 1)


def _untouchable(p, start, length):
    """The stub's own pages (its code, stack, channel, patching window, vDSO) are not the guest's."""
    end = start + _up(length)
    if any(start < e and end > s for s, e in p.protected):
        raise Errno(errno.EINVAL)


def _mode2(p, name, *args):
    ret = p.space.syscall_raw(name, *args)
    if -4096 < ret < 0:
        raise Errno(-ret)
    return ret


# -- memory ----------------------------------------------------------------------------------------

def sys_mmap(self, p, addr, length, prot, flags, fd, off):
    prot &= 0xFFFFFFFF
    flags &= 0xFFFFFFFF
    if length == 0 or length > TASK_SIZE or off % PAGE or addr % PAGE and flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        raise Errno(errno.EINVAL)
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        _untouchable(p, addr, length)
    if flags & MAP_ANONYMOUS:
        return _mode2(p, "mmap", addr, length, prot, flags, -1, 0)
    f = p.fds.get(fd)
    st = os.fstat(f.host_fd)
    if (st.st_mode & 0o170000) != 0o100000:
        raise Errno(errno.ENODEV)
    if flags & 0x3 in (MAP_SHARED, MAP_SHARED_VALIDATE) and prot & PROT_WRITE:
        raise Errno(errno.ENODEV)               # writes could not reach the file: refuse rather than lie
    if f.flags & 3 == os.O_WRONLY:
        raise Errno(errno.EACCES)
    # A private copy of the file's pages (a read-only shared mapping looks the same to its reader).
    flags = (flags & ~0x3 & ~0x800) | MAP_PRIVATE | MAP_ANONYMOUS     # also drop MAP_DENYWRITE
    at = _mode2(p, "mmap", addr, length, prot | PROT_WRITE, flags, -1, 0)
    try:
        want = max(0, min(length, st.st_size - off))
        done = 0
        while done < want:
            chunk = os.pread(f.host_fd, min(want - done, 1 << 22), off + done)
            if not chunk:
                break
            p.write(at + done, chunk)
            done += len(chunk)
        if not prot & PROT_WRITE:
            _mode2(p, "mprotect", at, _up(length), prot)
    except BaseException:
        p.space.syscall_raw("munmap", at, length)
        raise
    return at


def sys_munmap(self, p, addr, length):
    _untouchable(p, addr, length)
    return _mode2(p, "munmap", addr, length)


def sys_mprotect(self, p, addr, length, prot):
    _untouchable(p, addr, length)
    return _mode2(p, "mprotect", addr, length, prot & 0xFFFFFFFF)


def sys_mremap(self, p, old, old_len, new_len, flags, new):
    _untouchable(p, old, old_len)
    if flags & MREMAP_FIXED:
        _untouchable(p, new, new_len)
    return _mode2(p, "mremap", old, old_len, new_len, flags & 0xFFFFFFFF, new)


def sys_madvise(self, p, addr, length, advice):
    _untouchable(p, addr, length)
    return _mode2(p, "madvise", addr, length, advice & 0xFFFFFFFF)


def sys_brk(self, p, addr):
    """The program break, kept by the kernel: pages are mapped and unmapped behind it."""
    if addr < p.brk_start or addr > p.brk_start + (1 << 40):
        return p.brk_cur
    want = _up(addr)
    if want > p.brk_mapped:
        try:
            _untouchable(p, p.brk_mapped, want - p.brk_mapped)
            got = p.space.syscall_raw("mmap", p.brk_mapped, want - p.brk_mapped, PROT_READ | PROT_WRITE,
                                      MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
        except Errno:
            return p.brk_cur
        if got != p.brk_mapped:
            if not -4096 < got < 0:
                p.space.syscall_raw("munmap", got, want - p.brk_mapped)
            return p.brk_cur
        p.brk_mapped = want
    elif want < p.brk_mapped:
        p.space.syscall_raw("munmap", want, p.brk_mapped - want)
        p.brk_mapped = want
    p.brk_cur = addr
    return addr


# -- signals ----------------------------------------------------------------------------------------

def _valid_signal(signo):
    if not 1 <= signo <= 64:
        raise Errno(errno.EINVAL)


def sys_rt_sigaction(self, p, signo, act, oact, size):
    if size != 8:
        raise Errno(errno.EINVAL)
    _valid_signal(signo)
    if act and signo in (_SIGKILL, _SIGSTOP):
        raise Errno(errno.EINVAL)
    old = p.sigactions.get(signo, (0, 0, 0, 0))
    new = struct.unpack("<QQQQ", p.read(act, 32)) if act else None
    if oact:
        p.write(oact, struct.pack("<QQQQ", *old))
    if new is not None:
        p.sigactions[signo] = new
    return 0


def sys_rt_sigprocmask(self, p, how, set_, oset, size):
    if size != 8:
        raise Errno(errno.EINVAL)
    old = p.sigmask
    if set_:
        mask = struct.unpack("<Q", p.read(set_, 8))[0] & ~UNBLOCKABLE
        if how == 0:
            p.sigmask |= mask
        elif how == 1:
            p.sigmask &= ~mask
        elif how == 2:
            p.sigmask = mask
        else:
            raise Errno(errno.EINVAL)
    if oset:
        p.write(oset, struct.pack("<Q", old))
    return 0


def sys_sigaltstack(self, p, ss, oss):
    old = p.altstack
    if ss:
        sp, flags, size = _stack_t(p.read(ss, 24))
        if flags & ~(2 | (1 << 31)):
            raise Errno(errno.EINVAL)
        p.altstack = (sp, flags, size)
    if oss:
        p.write(oss, struct.pack("<Qi4xQ", *old))
    return 0


def _stack_t(raw):
    sp, flags, size = struct.unpack("<Qi4xQ", raw)
    return sp, flags, size










def sys_exit(self, p, code):
    from .sandbox import Exited
    from .threads import ThreadExit, other_threads
    if other_threads(p):
        raise ThreadExit()
    raise Exited((code & 0xFF) << 8)


def sys_exit_group(self, p, code):
    from .sandbox import Exited
    raise Exited((code & 0xFF) << 8)


# -- identity -----------------------------------------------------------------------------------------

def sys_getpid(self, p):
    return p.pid


def sys_gettid(self, p):
    return p.tid




def sys_getuid(self, p):
    return os.getuid()


def sys_geteuid(self, p):
    return os.geteuid()


def sys_getgid(self, p):
    return os.getgid()


def sys_getegid(self, p):
    return os.getegid()


def sys_getresuid(self, p, r, e, s):
    ids = os.getresuid()
    for addr, v in zip((r, e, s), ids):
        p.write(addr, struct.pack("<I", v))
    return 0


def sys_getresgid(self, p, r, e, s):
    ids = os.getresgid()
    for addr, v in zip((r, e, s), ids):
        p.write(addr, struct.pack("<I", v))
    return 0


def sys_getgroups(self, p, size, lst):
    groups = os.getgroups()
    if size == 0:
        return len(groups)
    if size < len(groups):
        raise Errno(errno.EINVAL)
    p.write(lst, struct.pack("<%dI" % len(groups), *groups))
    return len(groups)












def sys_uname(self, p, buf):
    u = os.uname()
    fields = (u.sysname, self.hostname or u.nodename, u.release, u.version, u.machine, "(none)")
    p.write(buf, b"".join(f.encode()[:64].ljust(65, b"\0") for f in fields))
    return 0


def sys_sysinfo(self, p, buf):
    with open("/proc/uptime") as f:
        uptime = int(float(f.read().split()[0]))
    pages = os.sysconf("SC_PHYS_PAGES")
    avail = os.sysconf("SC_AVPHYS_PAGES")
    loads = [int(x * 65536) for x in os.getloadavg()]
    p.write(buf, struct.pack("<q3QQQQQQQH6xQQI", uptime, *loads, pages * PAGE, avail * PAGE, 0, 0, 0, 0, 1, 0, 0, 1)
            .ljust(112, b"\0"))
    return 0


def _cpu_ns(p):
    return time.clock_gettime_ns(((~p.space.pid) << 3) | 2)       # the stub's CPU clock (CPUCLOCK_SCHED)


def sys_times(self, p, buf):
    hz = os.sysconf("SC_CLK_TCK")
    if buf:
        user = _cpu_ns(p) * hz // 10 ** 9
        p.write(buf, struct.pack("<qqqq", user, 0, 0, 0))
    return time.monotonic_ns() * hz // 10 ** 9


def sys_getrusage(self, p, who, buf):
    ns = _cpu_ns(p)
    p.write(buf, struct.pack("<qqqq", ns // 10 ** 9, ns % 10 ** 9 // 1000, 0, 0).ljust(144, b"\0"))
    return 0


# -- time ----------------------------------------------------------------------------------------------

def clock_ns(self, p, clk):
    """The time every time call reports (clock_gettime, gettimeofday, time): override to fake it."""
    if clk in (2, 3):                               # CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID
        return _cpu_ns(p)
    if clk >= 1 << 31 or clk > 11:
        raise Errno(errno.EINVAL)
    return time.clock_gettime_ns(clk)


def sys_clock_gettime(self, p, clk, tp):
    ns = self.clock_ns(p, clk)
    p.write(tp, struct.pack("<qq", ns // 10 ** 9, ns % 10 ** 9))
    return 0


def sys_clock_getres(self, p, clk, tp):
    self.clock_ns(p, clk)
    if tp:
        p.write(tp, struct.pack("<qq", 0, 1))
    return 0


def sys_gettimeofday(self, p, tv, tz):
    ns = self.clock_ns(p, 0)
    if tv:
        p.write(tv, struct.pack("<qq", ns // 10 ** 9, ns % 10 ** 9 // 1000))
    if tz:
        p.write(tz, bytes(8))
    return 0


def sys_time(self, p, tloc):
    sec = self.clock_ns(p, 0) // 10 ** 9
    if tloc:
        p.write(tloc, struct.pack("<q", sec))
    return sec


def _sleep_until(self, p, deadline_ns, clk, rem=0):
    """Sleep to a deadline on clk; a signal for p cuts it short (remaining time written to rem)."""
    from .processes import Interrupted
    while True:
        left = deadline_ns - time.clock_gettime_ns(clk)
        if left <= 0:
            return
        try:
            self._sleep(p, left / 1e9)
        except Interrupted:
            if rem:
                left = max(0, deadline_ns - time.clock_gettime_ns(clk))
                p.write(rem, struct.pack("<qq", left // 10 ** 9, left % 10 ** 9))
            raise


def sys_nanosleep(self, p, req, rem):
    sec, nsec = struct.unpack("<qq", p.read(req, 16))
    if sec < 0 or not 0 <= nsec < 10 ** 9:
        raise Errno(errno.EINVAL)
    _sleep_until(self, p, time.monotonic_ns() + sec * 10 ** 9 + nsec, time.CLOCK_MONOTONIC, rem)
    return 0


def sys_clock_nanosleep(self, p, clk, flags, req, rem):
    sec, nsec = struct.unpack("<qq", p.read(req, 16))
    if sec < 0 or not 0 <= nsec < 10 ** 9 or clk not in (0, 1, 7, 9):
        raise Errno(errno.EINVAL)
    ns = sec * 10 ** 9 + nsec
    _sleep_until(self, p, ns if flags & 1 else time.clock_gettime_ns(clk) + ns, clk, 0 if flags & 1 else rem)
    return 0


def sys_pause(self, p):
    while True:
        self._sleep(p, 3600)


def sys_rt_sigsuspend(self, p, mask, size):
    if size != 8:
        raise Errno(errno.EINVAL)
    new = struct.unpack("<Q", p.read(mask, 8))[0] & ~UNBLOCKABLE
    p.saved_sigmask, p.sigmask = p.sigmask, new     # the handler's frame restores the old mask
    while True:
        self._sleep(p, 3600)


def sys_getrandom(self, p, buf, length, flags):
    if flags & ~7:
        raise Errno(errno.EINVAL)
    data = os.urandom(min(length, 1 << 20))
    p.write(buf, data)
    return len(data)


# -- limits and per-thread state ------------------------------------------------------------------

def _rlimit(p, res):
    if res >= 16:
        raise Errno(errno.EINVAL)
    if res in p.rlimits:
        return p.rlimits[res]
    return tuple(v & (2 ** 64 - 1) for v in resource.getrlimit(res))


def sys_prlimit64(self, p, pid, res, new, old):
    if pid not in (0, p.pid):
        raise Errno(errno.ESRCH)
    cur = _rlimit(p, res)
    if new:
        soft, hard = struct.unpack("<QQ", p.read(new, 16))
        if soft > hard or hard > cur[1]:
            raise Errno(errno.EINVAL if soft > hard else errno.EPERM)
    if old:
        p.write(old, struct.pack("<QQ", *cur))
    if new:
        p.rlimits[res] = (soft, hard)
        if res == 7:                                # RLIMIT_NOFILE
            p.fds.limit = min(soft, 1 << 20)
    return 0


def sys_getrlimit(self, p, res, rlim):
    return sys_prlimit64(self, p, 0, res, 0, rlim)


def sys_setrlimit(self, p, res, rlim):
    return sys_prlimit64(self, p, 0, res, rlim, 0)


def sys_arch_prctl(self, p, code, addr):
    if code in (0x1001, 0x1002):                    # ARCH_SET_GS, ARCH_SET_FS
        if addr >= TASK_SIZE:
            raise Errno(errno.EPERM)
        if code == 0x1002:
            p.ctx.fs_base = addr
        else:
            p.ctx.gs_base = addr
        return 0
    if code in (0x1003, 0x1004):                    # ARCH_GET_FS, ARCH_GET_GS
        p.write(addr, struct.pack("<Q", p.ctx.fs_base if code == 0x1003 else p.ctx.gs_base))
        return 0
    raise Errno(errno.EINVAL)


def sys_set_tid_address(self, p, tidptr):
    p.clear_child_tid = tidptr
    return p.tid


def sys_set_robust_list(self, p, head, length):
    if length != 24:
        raise Errno(errno.EINVAL)
    p.robust_list = (head, length)
    return 0


def sys_get_robust_list(self, p, pid, head_ptr, len_ptr):
    if pid not in (0, p.pid):
        raise Errno(errno.ESRCH)
    p.write(head_ptr, struct.pack("<Q", p.robust_list[0]))
    p.write(len_ptr, struct.pack("<Q", 24))
    return 0


def sys_rseq(self, p, rseq, length, flags, sig):
    raise Errno(errno.ENOSYS)                       # not provided: libc then does without




def sys_sched_getaffinity(self, p, pid, size, mask):
    if pid not in (0, p.pid):
        raise Errno(errno.ESRCH)
    if size < 8 or size % 8:
        raise Errno(errno.EINVAL)
    bits = 0
    for cpu in os.sched_getaffinity(0):
        bits |= 1 << cpu
    data = bits.to_bytes(max(8, (max(os.sched_getaffinity(0)) // 64 + 1) * 8), "little")
    if len(data) > size:
        raise Errno(errno.EINVAL)
    p.write(mask, data)
    return len(data)


def sys_sched_yield(self, p):
    return 0


def sys_getcpu(self, p, cpu, node, cache):
    if cpu:
        p.write(cpu, struct.pack("<I", 0))
    if node:
        p.write(node, struct.pack("<I", 0))
    return 0


def sys_prctl(self, p, option, a2, a3, a4, a5):
    if option == 15:                                # PR_SET_NAME
        p.comm = p.read_str(a2, 16)[:15]
        return 0
    if option == 16:                                # PR_GET_NAME
        p.write(a2, p.comm.ljust(16, b"\0"))
        return 0
    if option == 3:                                 # PR_GET_DUMPABLE
        return 1
    if option in (1, 4, 38):                        # PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NO_NEW_PRIVS
        return 0
    raise Errno(errno.EINVAL)




def sys_execve(self, p, path, argv, envp):
    return sys_execveat(self, p, AT_FDCWD, path, argv, envp, 0)


def sys_execveat(self, p, dirfd, path, argv, envp, flags):
    from .threads import other_threads
    if flags & ~(AT_EMPTY_PATH | 0x100):
        raise Errno(errno.EINVAL)
    if other_threads(p):
        raise Errno(errno.ENOSYS)                   # exec from a multi-threaded process is not provided yet
    if path == "" and flags & AT_EMPTY_PATH:
        guest = p.fds.get(dirfd).path
    else:
        guest = self._abs(p, dirfd, path)
    args = p.read_str_array(argv)
    env = p.read_str_array(envp)
    self._execve(p, guest, args or [guest], env)
    return None

