"""Handlers: timers that send signals (alarm, setitimer/getitimer, timer_create and the rest).

A guest timer is a host timer thread that, when it fires, queues the signal on the guest process as
Linux would (SIGALRM with SI_KERNEL for alarm and ITIMER_REAL; the sigevent's signal with SI_TIMER,
the timer's id and value for POSIX timers) and wakes it if it waits in the kernel. alarm and interval
timers survive execve, POSIX timers do not; a forked child has none; all end with the process.
"""
import errno
import os
import signal
import struct
import threading
import time

from ..errors import Errno, host_call
from . import hostfd
from ..task import leader_of

SI_KERNEL, SI_TIMER = 0x80, -2
SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD, SIGEV_THREAD_ID = 0, 1, 2, 4
TIMER_ABSTIME = 1
ITIMER_REAL, ITIMER_VIRTUAL, ITIMER_PROF = 0, 1, 2
_ITIMER_SIGNALS = {ITIMER_REAL: signal.SIGALRM, ITIMER_VIRTUAL: signal.SIGVTALRM, ITIMER_PROF: signal.SIGPROF}
_CLOCKS = {0: time.CLOCK_REALTIME, 1: time.CLOCK_MONOTONIC, 7: time.CLOCK_BOOTTIME}
_MAX_TIMERS = 256


class _Timer:
    """One armed or disarmed timer of a guest process: fire(self) runs on its own host thread."""

    def __init__(self, fire, clock=time.CLOCK_MONOTONIC):
        self.fire, self.clock = fire, clock
        self.deadline = None            # ns on self.clock, or None: disarmed
        self.interval = 0               # ns
        self.overrun = 0
        self._cond = threading.Condition()
        self._thread = None
        self._closed = False

    def arm(self, deadline, interval):
        with self._cond:
            self.deadline, self.interval, self.overrun = deadline, interval, 0
            if self._thread is None and deadline is not None:
                self._thread = threading.Thread(target=self._run, name="guest-timer", daemon=True)
                self._thread.start()
            self._cond.notify_all()

    def left(self):
        """(ns left before it fires, interval ns); (0, interval) when disarmed."""
        with self._cond:
            if self.deadline is None:
                return 0, self.interval
            return max(1, self.deadline - time.clock_gettime_ns(self.clock)), self.interval

    def close(self):
        with self._cond:
            self._closed = True
            self.deadline = None
            self._cond.notify_all()

    def _run(self):
        with self._cond:
            while not self._closed:
                if self.deadline is None:
                    self._cond.wait()
                    continue
                left = self.deadline - time.clock_gettime_ns(self.clock)
                if left > 0:
                    self._cond.wait(left / 1e9)
                    continue
                if self.interval:
                    late = -left // self.interval
                    self.overrun = late
                    self.deadline += (late + 1) * self.interval
                else:
                    self.deadline = None
                self._cond.release()
                try:
                    self.fire(self)
                except Exception:
                    pass                    # the process is gone: nothing to tell
                finally:
                    self._cond.acquire()


def _timespec_ns(raw, at):
    sec, nsec = struct.unpack_from("<qq", raw, at)
    if sec < 0 or not 0 <= nsec < 10 ** 9:
        raise Errno(errno.EINVAL)
    return sec * 10 ** 9 + nsec


def _timeval_ns(raw, at):
    sec, usec = struct.unpack_from("<qq", raw, at)
    if sec < 0 or not 0 <= usec < 10 ** 6:
        raise Errno(errno.EINVAL)
    return sec * 10 ** 9 + usec * 1000


def _timeval(ns):
    return struct.pack("<qq", ns // 10 ** 9, ns % 10 ** 9 // 1000)


def _timespec(ns):
    return struct.pack("<qq", ns // 10 ** 9, ns % 10 ** 9)


def end_timers(p, exec_only=False):
    """Disarm a process's timers: all of them when it ends, the POSIX ones when it runs execve."""
    proc = leader_of(p)
    for t in list(proc.timers.values()):
        t.close()
    proc.timers.clear()
    if not exec_only:
        for t in list(proc.itimers.values()):
            t.close()
        proc.itimers.clear()


class TimerCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def _timer_signal(self, q, sig, info):
        with self._cond:
            if q.status is None:
                self._queue(q, sig, info, wake_it=True)

    def _itimer(self, p, which):
        proc = leader_of(p)
        t = proc.itimers.get(which)
        if t is None:
            sig = _ITIMER_SIGNALS[which]

            def fire(_t, proc=proc, sig=sig):
                info = struct.pack("<iii", sig, 0, SI_KERNEL).ljust(128, b"\0")
                self._timer_signal(proc, sig, info)
            t = proc.itimers[which] = _Timer(fire)
        return t

    def sys_alarm(self, p, seconds):
        t = self._itimer(p, ITIMER_REAL)
        left, _interval = t.left()
        seconds &= 0xFFFFFFFF
        t.arm(time.monotonic_ns() + seconds * 10 ** 9 if seconds else None, 0)
        return (left + 10 ** 9 - 1) // 10 ** 9 if left else 0       # rounded up, as Linux

    def sys_setitimer(self, p, which, new, old):
        if which not in _ITIMER_SIGNALS:
            raise Errno(errno.EINVAL)
        t = self._itimer(p, which)
        if old:
            left, interval = t.left()
            p.write(old, _timeval(interval) + _timeval(left))
        if new:
            raw = p.read(new, 32)
            interval, value = _timeval_ns(raw, 0), _timeval_ns(raw, 16)
            t.arm(time.monotonic_ns() + value if value else None, interval)
        return 0

    def sys_getitimer(self, p, which, cur):
        if which not in _ITIMER_SIGNALS:
            raise Errno(errno.EINVAL)
        left, interval = self._itimer(p, which).left()
        p.write(cur, _timeval(interval) + _timeval(left))
        return 0

    def sys_timer_create(self, p, clock, sevp, timerid):
        if clock not in _CLOCKS:
            raise Errno(errno.EINVAL)
        proc = leader_of(p)
        if len(proc.timers) >= _MAX_TIMERS:
            raise Errno(errno.EAGAIN)
        tid = next(i for i in range(len(proc.timers) + 1) if i not in proc.timers)
        if sevp:
            value, signo, notify, thread = struct.unpack("<Qiii", p.read(sevp, 20))
        else:
            value, signo, notify, thread = tid, signal.SIGALRM, SIGEV_SIGNAL, 0
        if notify not in (SIGEV_SIGNAL, SIGEV_NONE, SIGEV_THREAD_ID) or notify != SIGEV_NONE and not 1 <= signo <= 64:
            raise Errno(errno.EINVAL)
        if notify == SIGEV_THREAD_ID and thread not in proc.threads:
            raise Errno(errno.EINVAL)
        p.write(timerid, struct.pack("<i", tid))
        self.add_posix_timer(proc, tid, clock, value, signo, notify, thread)
        return 0

    def add_posix_timer(self, proc, tid, clock, value, signo, notify, thread):
        """Timer tid of proc, disarmed: it sends signo (with value) to the process or to thread."""
        def fire(t, proc=proc, tid=tid, value=value, signo=signo, notify=notify, thread=thread):
            if notify == SIGEV_NONE:
                return
            target = proc.threads.get(thread, proc) if notify == SIGEV_THREAD_ID else proc
            info = struct.pack("<iii4xiiQ", signo, 0, SI_TIMER, tid, t.overrun, value).ljust(128, b"\0")
            self._timer_signal(target, signo, info)
        proc.timers[tid] = t = _Timer(fire, _CLOCKS[clock])
        return t

    def _posix_timer(self, p, timerid):
        t = leader_of(p).timers.get(timerid & 0xFFFFFFFF)
        if t is None:
            raise Errno(errno.EINVAL)
        return t

    def sys_timer_settime(self, p, timerid, flags, new, old):
        t = self._posix_timer(p, timerid)
        raw = p.read(new, 32)
        interval, value = _timespec_ns(raw, 0), _timespec_ns(raw, 16)
        if old:
            left, was = t.left()
            p.write(old, _timespec(was) + _timespec(left))
        if not value:
            t.arm(None, interval)
        else:
            t.arm(value if flags & TIMER_ABSTIME else time.clock_gettime_ns(t.clock) + value, interval)
        return 0

    def sys_timer_gettime(self, p, timerid, cur):
        left, interval = self._posix_timer(p, timerid).left()
        p.write(cur, _timespec(interval) + _timespec(left))
        return 0

    def sys_timer_getoverrun(self, p, timerid):
        return self._posix_timer(p, timerid).overrun

    def sys_timer_delete(self, p, timerid):
        t = self._posix_timer(p, timerid)
        t.close()
        del leader_of(p).timers[timerid & 0xFFFFFFFF]
        return 0

    # timerfds are the host's, held by the kernel: reads, polls and expirations are the host kernel's own.
    def sys_timerfd_create(self, p, clock, flags):
        if flags & ~(os.O_NONBLOCK | os.O_CLOEXEC) or clock not in (0, 1, 7, 8, 9):
            raise Errno(errno.EINVAL)
        if clock in (8, 9):                             # the ALARM clocks need CAP_WAKE_ALARM
            raise Errno(errno.EPERM)
        host = host_call(hostfd.timerfd_create, clock, os.O_CLOEXEC | (flags & os.O_NONBLOCK))
        return p.fds.install_host(host, "anon_inode:[timerfd]", os.O_RDWR, cloexec=flags & os.O_CLOEXEC)

    def _timerfd(self, p, fd):
        f = p.fds.get(fd)
        if f.path != "anon_inode:[timerfd]":
            raise Errno(errno.EINVAL)
        return f

    def sys_timerfd_settime(self, p, fd, flags, new, old):
        f = self._timerfd(p, fd)
        if flags & ~3:                                  # TFD_TIMER_ABSTIME, TFD_TIMER_CANCEL_ON_SET
            raise Errno(errno.EINVAL)
        previous = host_call(hostfd.timerfd_settime, f.host_fd, flags, p.read(new, 32))
        if old:
            p.write(old, previous)
        return 0

    def sys_timerfd_gettime(self, p, fd, cur):
        p.write(cur, host_call(hostfd.timerfd_gettime, self._timerfd(p, fd).host_fd))
        return 0
