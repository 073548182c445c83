"""Handlers: identity, system information, time, sleeping, randomness, limits, scheduling, prctl."""
import errno
import os
import resource
import struct
import time

from ...abi import PAGE
from ..errors import Errno, Interrupted


def _cpu_ns(p):
    return time.clock_gettime_ns(((~p.space.pid) << 3) | 2)       # the stub's CPU clock (CPUCLOCK_SCHED)


def _sleep_until(self, p, deadline_ns, clk, rem=0):
    """Sleep to a deadline on clk; a signal for p cuts it short (remaining time written to rem)."""
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


def _rlimit(p, res):
    if res >= 16:
        raise Errno(errno.EINVAL)
    if res in p.rlimits:
        return p.rlimits[res]
    return tuple(v & (2 ** 64 - 1) for v in resource.getrlimit(res))


class InfoCalls:
    """Mixed into Sandbox: `self` is the kernel."""

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

    def sys_getrandom(self, p, buf, length, flags):
        if flags & ~7:
            raise Errno(errno.EINVAL)
        data = os.urandom(min(length, 1 << 20))
        p.write(buf, data)
        return len(data)

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
        return self.sys_prlimit64(p, 0, res, 0, rlim)

    def sys_setrlimit(self, p, res, rlim):
        return self.sys_prlimit64(p, 0, res, rlim, 0)

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
