"""Signal machinery: dispositions, queueing, delivery to guest handlers (the frame is the arch's),
syscall restart and interruption, and waits a signal can interrupt.
"""
import errno
import os
import select
import signal
import struct

from ..abi import (CLD_CONTINUED, CLD_STOPPED, SA_NOCLDSTOP, SA_NODEFER, SA_ONSTACK, SA_RESETHAND, SA_RESTART,
                   SIG_DFL, SIG_IGN, UNBLOCKABLE)
from ..arch import current as _current_arch
from ..syscalls import number
from .errors import Errno, Exited, Interrupted
from .task import _drain, kill_space, leader_of, wake


ARCH = _current_arch()
_NEVER_RESTARTED = frozenset(number(n) for n in (
    "pause", "rt_sigsuspend", "rt_sigtimedwait", "nanosleep", "clock_nanosleep", "poll", "ppoll", "select",
    "pselect6", "epoll_wait", "epoll_pwait", "epoll_pwait2", "io_getevents", "semop", "semtimedop", "msgrcv",
    "msgsnd"))
_DEFAULT_IGNORE = frozenset((signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH, signal.SIGCONT))
_STOP = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))
_CORE = frozenset((signal.SIGQUIT, signal.SIGILL, signal.SIGTRAP, signal.SIGABRT, signal.SIGBUS,
                   signal.SIGFPE, signal.SIGSEGV, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSYS))


def sender_info(sig, code, pid, uid):
    """A siginfo for a signal sent by a process (kill, tgkill) or the kernel: signo, code, pid, uid."""
    return struct.pack("<iii4xiI", sig, 0, code, pid, uid).ljust(128, b"\0")


def _discard(leader, signals):
    """Drop pending signals from a process and its threads."""
    for q in [leader] + [t for t in leader.threads.values() if t is not leader]:
        for sig in signals:
            q.pending.pop(sig, None)


def _bit(sig):
    return 1 << (sig - 1)


def _disposition(p, sig):
    return p.sigactions.get(sig, (SIG_DFL, 0, 0, 0))


def killed_status(sig):
    """The wait status of a process killed by sig (with the core-dump bit where Linux sets it)."""
    return sig | (0x80 if sig in _CORE else 0)


def _terminate(sig):
    raise Exited(killed_status(sig))


class SignalDelivery:
    """Mixed into Sandbox: `self` is the kernel."""

    def _wait_readable(self, p, host_fd, events=select.POLLIN, timeout_ms=None):
        """Block until host_fd is ready or a signal arrives for p (Interrupted)."""
        poller = select.poll()
        poller.register(host_fd, events)
        poller.register(p.wake_r, select.POLLIN)
        while True:
            ready = dict(poller.poll(timeout_ms))
            if p.wake_r in ready:
                _drain(p)
                if self._signal_ready(p):
                    raise Interrupted()
            if host_fd in ready or timeout_ms is not None:
                return bool(ready.get(host_fd))

    def _sleep(self, p, seconds):
        """Sleep, unless a deliverable signal arrives first (then Interrupted)."""
        if seconds > 0:
            r, _, _ = select.select([p.wake_r], [], [], seconds)
            if r:
                _drain(p)
                if self._signal_ready(p):
                    raise Interrupted()
                return self._sleep(p, 0)
        if self._signal_ready(p):
            raise Interrupted()

    def _queue(self, q, sig, info, wake_it):
        """Make sig pending on q (ignored signals are dropped, as Linux drops them)."""
        if sig == signal.SIGCONT:
            self._continue(leader_of(q))                # at once, blocked or ignored, as Linux
        elif sig in _STOP:
            _discard(leader_of(q), (signal.SIGCONT,))
        handler = _disposition(q, sig)[0]
        blocked = q.sigmask & _bit(sig)                 # never ignored: its handler may change before it is unblocked
        if sig != signal.SIGKILL and not blocked and (handler == SIG_IGN or
                                                      handler == SIG_DFL and sig in _DEFAULT_IGNORE):
            return
        if sig == signal.SIGKILL or handler == SIG_DFL and sig not in _STOP and not blocked:
            q.fatal = sig                               # nothing the guest can do: end it now (a blocked one
                                                        # waits, pending, as Linux keeps it)
            kill_space(q.space)
        q.pending.setdefault(sig, info)
        q.fast_flag[0] = 1
        if leader_of(q).signalfds:
            self._signalfd_ready(leader_of(q))
        if wake_it:
            wake(q)

    def _signal_ready(self, p):
        return p.fatal or p.group_status is not None or p.exec_exit or p.exec_handoff is not None or any(not p.sigmask & _bit(s)
                                                                            for s in p.pending)

    def _deliver_pending(self, p):
        """Run the first deliverable pending signal: a handler frame, or the default action."""
        for sig in sorted(p.pending):
            if p.sigmask & _bit(sig) and sig not in (signal.SIGKILL, signal.SIGSTOP):
                continue
            info = p.pending.pop(sig)
            if leader_of(p).signalfds:
                self._signalfd_ready(leader_of(p))
            self._deliver(p, sig, info)
            return True
        return False

    def _deliver(self, p, sig, info, sync=False):
        if self.tracer:
            self.tracer.signal(p, info)
        handler, flags, restorer, mask = _disposition(p, sig)
        blocked = p.sigmask & _bit(sig)
        if sync and (handler == SIG_IGN or blocked):
            _terminate(sig)                             # a fault that cannot be handled kills, as force_sig does
        if handler == SIG_IGN:
            return
        if handler == SIG_DFL:
            if sig in _STOP:
                self._stop(p, sig)
                return
            if sig in _DEFAULT_IGNORE:
                return
            _terminate(sig)
        try:
            self._push_frame(p, sig, info, handler, flags, restorer)
        except Errno:
            _terminate(signal.SIGSEGV)                  # no room for the frame: as Linux, the process dies
        if flags & SA_RESETHAND:
            p.sigactions[sig] = (SIG_DFL, 0, 0, 0)
        p.sigmask |= mask | (0 if flags & SA_NODEFER else _bit(sig))
        p.sigmask &= ~UNBLOCKABLE

    # -- job control ---------------------------------------------------------------------------

    stop_with_first = False     # pvmexec run on a terminal: when the first process stops, pvmexec stops too

    def _stop(self, p, sig):
        """A stop signal's default action: the process stops until SIGCONT or SIGKILL, and its parent
        hears of it (SIGCHLD with CLD_STOPPED unless SA_NOCLDSTOP; wait with WUNTRACED)."""
        leader = leader_of(p)
        with self._cond:
            leader.stopped = sig
            leader.wait_event = (CLD_STOPPED, sig)
            self._tell_parent(leader, CLD_STOPPED, sig)
            self._cond.notify_all()
            first = min(self._procs, default=None) == leader.pid
        if first and self.stop_with_first:
            os.kill(os.getpid(), signal.SIGSTOP)       # the shell that ran pvmexec sees the job stop
        while True:
            with self._cond:
                if not leader.stopped or p.fatal or leader.fatal or leader.group_status is not None:
                    return
                self._cond.wait(0.1)

    def _continue(self, leader):
        """SIGCONT: stop signals pending are dropped, a stopped process goes on, its parent hears of it."""
        with self._cond:
            _discard(leader, _STOP)
            if leader.stopped:
                leader.stopped = 0
                leader.wait_event = (CLD_CONTINUED, signal.SIGCONT)
                self._tell_parent(leader, CLD_CONTINUED, signal.SIGCONT)
                self._cond.notify_all()

    def _terminal_access(self, p, f, sig):
        """A process outside its terminal's foreground group reads it (SIGTTIN), or writes it with TOSTOP set
        (SIGTTOU): its group is sent the signal and the call waits for it (stopped, then restarted). A read
        with SIGTTIN blocked or ignored is EIO; a write with SIGTTOU blocked or ignored goes ahead."""
        try:
            foreground = self.tty_pgrp.get(os.fstat(f.host_fd).st_rdev)
        except OSError:
            return
        if foreground is None or p.pgid == foreground:
            return
        if p.sigmask & _bit(sig) or _disposition(p, sig)[0] == SIG_IGN:
            if sig == signal.SIGTTOU:
                return                                  # a write goes ahead then, as Linux lets it
            raise Errno(errno.EIO)
        with self._cond:
            group = [q for q in self._procs.values() if q.pgid == p.pgid and q.status is None and
                     not getattr(q, "is_thread", False)]
        for q in group:
            self._queue(q, sig, sender_info(sig, 0x80, 0, 0), wake_it=q is not leader_of(p))
        raise Interrupted()

    def _tell_parent(self, leader, code, status):
        parent = leader.parent
        if parent is None or parent.status is not None:
            return
        if _disposition(parent, signal.SIGCHLD)[1] & SA_NOCLDSTOP:
            return
        info = struct.pack("<iii4xiIi", signal.SIGCHLD, 0, code, leader.pid, os.getuid(), status).ljust(128, b"\0")
        self._queue(parent, signal.SIGCHLD, info, wake_it=True)

    def _push_frame(self, p, sig, info, handler, flags, restorer):
        old_mask = p.sigmask if p.saved_sigmask is None else p.saved_sigmask
        p.saved_sigmask = None
        fp = p.ctx.fpstate or p.space.initial_fpstate()
        for addr, data in ARCH.push_signal_frame(p.ctx, sig, info, handler, restorer, old_mask, p.altstack,
                                                 bool(flags & SA_ONSTACK), fp):
            p.write(addr, data)
        p.ctx.fpstate = p.space.initial_fpstate()

    def _interrupted_syscall(self, p, nr):
        """A blocking call gave way to a signal: restart it after the handler if SA_RESTART, else EINTR.
        Waits for signals, sleeps and polls are never restarted (signal(7))."""
        sig = next((s for s in sorted(p.pending) if not p.sigmask & _bit(s)), None)
        # No handler runs for a signal left to its default action (a stop, say): the call goes on afterwards.
        if sig is not None and nr not in _NEVER_RESTARTED and (_disposition(p, sig)[1] & SA_RESTART or
                                                                _disposition(p, sig)[0] in (SIG_DFL, SIG_IGN)):
            ARCH.restart_syscall(p.ctx, nr)
            return None
        return -errno.EINTR
