"""Handlers: signal dispositions, masks, alternate stacks, waiting for signals, sending them, sigreturn."""
import errno
import os
import signal
import struct

from ...abi import SI_TKILL, SI_USER, UNBLOCKABLE
from ...arch import current as _current_arch
from ..errors import Errno
from ..signals import sender_info
from ..task import leader_of
from .process import process_named


ARCH = _current_arch()
_SIGKILL, _SIGSTOP = signal.SIGKILL, signal.SIGSTOP


def _targets(self, p, pid):
    with self._cond:
        live = [q for q in self._procs.values() if q.status is None]
    if pid > 0:
        return [q for q in live if q.pid == pid]
    if pid == 0:
        return [q for q in live if q.pgid == p.pgid]
    if pid == -1:
        return [q for q in live if q.pid != 1]
    return [q for q in live if q.pgid == -pid]


def _valid_signal(signo):
    if not 1 <= signo <= 64:
        raise Errno(errno.EINVAL)


def _stack_t(raw):
    sp, flags, size = struct.unpack("<Qi4xQ", raw)
    return sp, flags, size


class SignalCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_kill(self, p, pid, sig):
        pid &= 0xFFFFFFFF
        pid = pid - (1 << 32) if pid >= 1 << 31 else pid
        if not 0 <= sig <= 64:
            raise Errno(errno.EINVAL)
        targets = _targets(self, p, pid)
        if not targets:
            raise Errno(errno.ESRCH)
        if sig:
            info = sender_info(sig, SI_USER, p.pid, os.getuid())
            for q in targets:
                self._queue(q, sig, info, wake_it=q is not p)
        return 0

    def sys_tgkill(self, p, tgid, tid, sig):
        if not 0 <= sig <= 64:
            raise Errno(errno.EINVAL)
        q = process_named(self, p, tid)
        if tgid not in (q.pid, 0) and tgid & 0xFFFFFFFF != q.pid:
            raise Errno(errno.ESRCH)
        if sig:
            self._queue(q, sig, sender_info(sig, SI_TKILL, p.pid, os.getuid()),
                        wake_it=q is not p)
        return 0

    def sys_tkill(self, p, tid, sig):
        return self.sys_tgkill(p, 0, tid, sig)

    def sys_rt_sigreturn(self, p):
        fp_size = len(p.ctx.fpstate or p.space.initial_fpstate())
        mask, altstack = ARCH.pop_signal_frame(p.read, p.ctx, fp_size)
        p.sigmask = mask & ~UNBLOCKABLE
        if altstack is not None:
            p.altstack = altstack
        return None

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

    def sys_rt_sigpending(self, p, set_, size):
        if size > 8:
            raise Errno(errno.EINVAL)
        bits = 0
        for sig in list(p.pending) + list(leader_of(p).pending):
            bits |= 1 << (sig - 1)
        p.write(set_, struct.pack("<Q", bits)[:size])
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
