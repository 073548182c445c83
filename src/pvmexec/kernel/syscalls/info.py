"""Handlers: identity, system information, time, sleeping, randomness, limits, scheduling, prctl."""
import errno
import os
import resource
import struct
import time

from ...abi import PAGE
from ..errors import Errno, Interrupted
from ..task import Usage, leader_of, usage_of
from .process import process_named


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

    # Credentials are the host's and never change: a call that would keep them succeeds (GNU make's
    # posix_spawn resets its ids), one that would change them is refused as for an unprivileged caller.
    def _same_ids(self, wanted, current):
        for v in wanted:
            v &= 0xFFFFFFFF
            if v != 0xFFFFFFFF and v not in current:
                raise Errno(errno.EPERM)
        return 0

    def sys_setuid(self, p, uid):
        return self._same_ids((uid,), os.getresuid())

    def sys_setgid(self, p, gid):
        return self._same_ids((gid,), os.getresgid())

    def sys_setreuid(self, p, r, e):
        return self._same_ids((r, e), os.getresuid())

    def sys_setregid(self, p, r, e):
        return self._same_ids((r, e), os.getresgid())

    def sys_setresuid(self, p, r, e, s):
        return self._same_ids((r, e, s), os.getresuid())

    def sys_setresgid(self, p, r, e, s):
        return self._same_ids((r, e, s), os.getresgid())

    def sys_setfsuid(self, p, uid):
        return os.geteuid()                             # the old fsuid, which never changes

    def sys_setfsgid(self, p, gid):
        return os.getegid()

    def sys_setgroups(self, p, size, lst):
        if size > 65536:
            raise Errno(errno.EINVAL)
        if os.geteuid() != 0:
            raise Errno(errno.EPERM)                    # CAP_SETGID, even to keep them
        wanted = sorted(p.read(lst, 4 * size)[i:i + 4] for i in range(0, 4 * size, 4)) if size else []
        have = sorted(struct.pack("<I", g) for g in os.getgroups())
        if sorted(set(wanted)) != sorted(set(have)):
            raise Errno(errno.EPERM)
        return 0

    def _priority_target(self, p, which, who):
        """The guest process getpriority/setpriority name (only PRIO_PROCESS names one; PRIO_PGRP and
        PRIO_USER with who 0 mean the caller's own group and user, which this process stands for)."""
        which &= 0xFFFFFFFF
        who &= 0xFFFFFFFF
        if which > 2:
            raise Errno(errno.EINVAL)
        if who == 0:
            return leader_of(p)
        if which == 0:
            return leader_of(process_named(self, p, who))
        if which == 1 and who == p.pgid or which == 2 and who == os.getuid():
            return leader_of(p)
        raise Errno(errno.ESRCH)

    def sys_getpriority(self, p, which, who):
        return 20 - self._priority_target(p, which, who).nice      # the kernel's 40..1 form of nice

    def sys_setpriority(self, p, which, who, prio):
        target = self._priority_target(p, which, who)
        prio &= 0xFFFFFFFF
        nice = min(19, max(-20, prio - (1 << 32) if prio >= 1 << 31 else prio))
        if nice < target.nice and os.geteuid() != 0:
            raise Errno(errno.EACCES)                   # only a privileged caller raises its priority
        target.nice = nice
        if target.space is not None:
            try:
                os.setpriority(os.PRIO_PROCESS, target.space.pid, max(nice, os.getpriority(os.PRIO_PROCESS, 0)))
            except OSError:
                pass                                    # the host keeps it: the guest sees its own value
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
        who = who & 0xFFFFFFFF
        who = who - (1 << 32) if who >= 1 << 31 else who
        if who in (0, 1):                               # RUSAGE_SELF, RUSAGE_THREAD (the process's figures)
            usage = usage_of(p.space.pid) if p.space is not None else Usage()
        elif who == -1:                                 # RUSAGE_CHILDREN: the children waited for
            usage = leader_of(p).children_usage
        else:
            raise Errno(errno.EINVAL)
        p.write(buf, usage.pack())
        return 0

    def clock_ns(self, p, clk):
        """The time every time call reports (clock_gettime, gettimeofday, time): override to fake it."""
        if clk in (2, 3):                               # CLOCK_PROCESS_CPUTIME_ID, CLOCK_THREAD_CPUTIME_ID
            return _cpu_ns(p)
        if clk >= 1 << 31 or clk > 11:
            raise Errno(errno.EINVAL)
        try:
            return time.clock_gettime_ns(clk)
        except OSError:                                 # CLOCK_SGI_CYCLE and others the host lacks
            raise Errno(errno.EINVAL) from None

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
        bits = p.affinity or sum(1 << cpu for cpu in os.sched_getaffinity(0))
        data = bits.to_bytes(max(8, (bits.bit_length() + 63) // 64 * 8), "little")
        if len(data) > size:
            raise Errno(errno.EINVAL)
        p.write(mask, data)
        return len(data)

    def sys_sched_setaffinity(self, p, pid, size, mask):
        if pid not in (0, p.pid, p.tid):
            process_named(self, p, pid)
        bits = int.from_bytes(p.read(mask, min(size, 1024)), "little") if size else 0
        allowed = sum(1 << cpu for cpu in os.sched_getaffinity(0))
        if not bits & allowed:
            raise Errno(errno.EINVAL)
        p.affinity = bits & allowed                     # kept for sched_getaffinity; the host places the stub
        return 0

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
