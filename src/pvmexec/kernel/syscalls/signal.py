"""Handlers: signal dispositions, masks, alternate stacks, waiting for signals, sending them, sigreturn."""
import errno
import os
import signal
import struct

from ...abi import SI_TKILL, SI_USER, UNBLOCKABLE
from ...arch import current as _current_arch
from ..errors import Errno
from ..files import OpenFile
from ..signals import sender_info
from ..task import leader_of
from .process import process_named


ARCH = _current_arch()
_SIGKILL, _SIGSTOP = signal.SIGKILL, signal.SIGSTOP


def _targets(self, p, pid):
    """The processes kill(pid) names: zombies too (not yet reaped, they take the signal and drop it)."""
    with self._cond:
        live = list(self._procs.values())
    if pid > 0:
        named = [q for q in live if q.pid == pid]
        if not named:                       # a thread's tid names its process, as Linux's kill takes it
            with self._cond:
                t = self._procs_by_tid.get(pid)
            named = [leader_of(t)] if t is not None else []
        return named
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


_SIGNALFD = "anon_inode:[signalfd]"


def _signalfd_info(si):
    """struct signalfd_siginfo (128 bytes) from a kernel siginfo: signo, errno, code, pid, uid, then for
    SIGCHLD the status and for queued signals the value."""
    signo, err, code = struct.unpack_from("<iii", si)
    pid, uid, value = struct.unpack_from("<IIq", si, 16)
    return struct.pack("<IiiIIiIIIIiiQ", signo, err, code, pid, uid, 0, 0, 0, 0, 0, value & 0xFFFFFFFF,
                       value & 0xFFFFFFFF, value & (2 ** 64 - 1)).ljust(128, b"\0")


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
                if q.status is None:
                    self._queue(q, sig, info, wake_it=q is not p)
        return 0

    def sys_pidfd_open(self, p, pid, flags):
        """A descriptor for a guest process that polls readable once it has ended (a host eventfd the
        kernel sets when it does)."""
        if flags & ~os.O_NONBLOCK or pid & 0xFFFFFFFF in (0, 0xFFFFFFFF):
            raise Errno(errno.EINVAL)
        q = process_named(self, p, pid & 0xFFFFFFFF)
        if getattr(q, "is_thread", False):
            raise Errno(errno.EINVAL)               # pidfds name processes, not threads
        host = os.eventfd(0, os.O_CLOEXEC | os.O_NONBLOCK)
        f = OpenFile(host, "anon_inode:[pidfd]", os.O_RDWR | (flags & os.O_NONBLOCK))
        f.pidfd = q
        try:
            fd = p.fds.install(f, cloexec=True)     # as Linux: a pidfd is close-on-exec
        except Errno:
            os.close(host)
            raise
        with self._cond:
            q.pidfds.add(f)
            if q.status is not None:
                os.eventfd_write(host, 1)
        return fd

    def sys_pidfd_send_signal(self, p, pidfd, sig, info, flags):
        f = p.fds.get(pidfd)
        if f.pidfd is None:
            raise Errno(errno.EBADF)
        if flags or info or not 0 <= sig <= 64:
            raise Errno(errno.EINVAL)               # a siginfo of the caller's own is not taken
        q = f.pidfd
        if q.status is not None:
            raise Errno(errno.ESRCH)
        if sig:
            self._queue(q, sig, sender_info(sig, SI_USER, p.pid, os.getuid()), wake_it=q is not p)
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

    def sys_signalfd4(self, p, fd, mask, size, flags):
        """A descriptor that reads the caller's pending signals of mask (signalfd_siginfo each) instead of
        their delivery; it polls readable while one is pending (a host eventfd the kernel sets and clears)."""
        if size != 8 or flags & ~(os.O_NONBLOCK | os.O_CLOEXEC):
            raise Errno(errno.EINVAL)
        bits = struct.unpack("<Q", p.read(mask, 8))[0] & ~UNBLOCKABLE
        owner = leader_of(p)
        if fd != -1:
            f = p.fds.get(fd)
            if f.path != _SIGNALFD:
                raise Errno(errno.EINVAL)
            f.signalfd = bits
            self._signalfd_ready(owner)
            return fd
        host = os.eventfd(0, os.O_CLOEXEC | os.O_NONBLOCK)
        f = OpenFile(host, _SIGNALFD, os.O_RDONLY | (flags & os.O_NONBLOCK))
        f.signalfd = bits
        try:
            fd = p.fds.install(f, cloexec=flags & os.O_CLOEXEC)
        except Errno:
            os.close(host)
            raise
        owner.signalfds.add(f)
        self._signalfd_ready(owner)
        return fd

    def sys_signalfd(self, p, fd, mask, size):
        return self.sys_signalfd4(p, fd, mask, size, 0)

    def read_signalfd(self, p, f, buf, count):
        """read(2) of a signalfd: as many pending signals of its mask as fit, dequeued; waits for one."""
        if count < 128:
            raise Errno(errno.EINVAL)
        while True:
            out = bytearray()
            for q in (p, leader_of(p)):
                for sig in sorted(q.pending):
                    if len(out) + 128 > count:
                        break
                    if f.signalfd & (1 << (sig - 1)):
                        out += _signalfd_info(q.pending.pop(sig))
            self._signalfd_ready(leader_of(p))
            if out:
                p.write(buf, bytes(out))
                return len(out)
            if f.flags & os.O_NONBLOCK:
                raise Errno(errno.EAGAIN)
            self._wait_readable(p, f.host_fd)           # a signal it does not read ends the wait

    def _signalfd_ready(self, owner):
        """Set each signalfd of the process readable exactly while one of its signals is pending."""
        pending = 0
        for q in [owner] + [t for t in owner.threads.values() if t is not owner]:
            for sig in q.pending:
                pending |= 1 << (sig - 1)
        for f in list(owner.signalfds):
            ready = bool(pending & f.signalfd)
            try:
                if ready:
                    os.eventfd_write(f.host_fd, 1)
                else:
                    os.eventfd_read(f.host_fd)
            except (BlockingIOError, OSError):
                pass

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
