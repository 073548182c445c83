"""Handlers: waiting for descriptors (poll, ppoll, select, pselect6, epoll) and eventfd."""
import errno
import os
import select
import struct

from ..errors import Errno
from ..files import OpenFile, timeout_ms


_POLLIN, _POLLOUT, _POLLPRI = select.POLLIN, select.POLLOUT, select.POLLPRI
_READY_IN = select.POLLIN | select.POLLHUP | select.POLLERR
_READY_OUT = select.POLLOUT | select.POLLERR
_EPOLL_EVENT = struct.Struct("<IQ")                 # struct epoll_event is packed on x86-64


def _poll(self, p, fds, nfds, timeout_ms):
    if nfds > p.fds.limit:
        raise Errno(errno.EINVAL)
    raw = p.read(fds, 8 * nfds) if nfds else b""
    entries = [struct.unpack_from("<ihh", raw, 8 * i) for i in range(nfds)]
    poller = select.poll()
    revents = [0] * nfds
    by_host = {}
    for i, (fd, events, _r) in enumerate(entries):
        if fd < 0:
            continue
        try:
            f = p.fds.get(fd)
        except Errno:
            revents[i] = select.POLLNVAL
            continue
        by_host.setdefault(f.host_fd, []).append(i)
        poller.register(f.host_fd, events & 0xFFFF)
    ready = 0
    if not any(revents):
        poller.register(p.wake_r, select.POLLIN)
        ready = poller.poll(timeout_ms)
        if any(fd == p.wake_r for fd, _ev in ready):
            self._wait_readable(p, p.wake_r, timeout_ms=0)      # drains; Interrupted if a signal is due
            ready = [(fd, ev) for fd, ev in ready if fd != p.wake_r]
        for host_fd, ev in ready:
            for i in by_host.get(host_fd, ()):
                revents[i] = ev & (entries[i][1] | select.POLLERR | select.POLLHUP | select.POLLNVAL)
    out = b"".join(struct.pack("<ihh", fd, events, r) for (fd, events, _), r in zip(entries, revents))
    p.write(fds, out)
    return sum(1 for r in revents if r)


def _wait(self, p, poller, timeout_ms):
    """poller.poll with p's wake-up pipe: Interrupted if a signal is due."""
    poller.register(p.wake_r, select.POLLIN)
    ready = poller.poll(timeout_ms)
    if any(fd == p.wake_r for fd, _ in ready):
        self._wait_readable(p, p.wake_r, timeout_ms=0)
        ready = [(fd, ev) for fd, ev in ready if fd != p.wake_r]
    return ready


def _select(self, p, n, inp, outp, exp, timeout_ms):
    if n > 1024 or n < 0:
        raise Errno(errno.EINVAL)
    words = (n + 63) // 64
    sets = [int.from_bytes(p.read(a, 8 * words), "little") if a and words else 0 for a in (inp, outp, exp)]
    poller = select.poll()
    wanted = {}
    for fd in range(n):
        ev = (_POLLIN if sets[0] >> fd & 1 else 0) | (_POLLOUT if sets[1] >> fd & 1 else 0) | \
            (_POLLPRI if sets[2] >> fd & 1 else 0)
        if ev:
            host = p.fds.get(fd).host_fd
            wanted.setdefault(host, []).append((fd, ev))
            poller.register(host, ev)
    ready = _wait(self, p, poller, timeout_ms)
    out = [0, 0, 0]
    for host, ev in ready:
        for fd, want in wanted.get(host, ()):
            if want & _POLLIN and ev & _READY_IN:
                out[0] |= 1 << fd
            if want & _POLLOUT and ev & _READY_OUT:
                out[1] |= 1 << fd
            if want & _POLLPRI and ev & _POLLPRI:
                out[2] |= 1 << fd
    for addr, bits in zip((inp, outp, exp), out):
        if addr and words:
            p.write(addr, bits.to_bytes(8 * words, "little"))
    return sum(bin(b).count("1") for b in out)


class _Epoll(OpenFile):
    """An epoll instance: a host epoll the kernel fills with host descriptors, and the guest's data words."""

    __slots__ = ("epoll", "data")

    def __init__(self, cloexec):
        self.epoll = select.epoll()
        super().__init__(os.dup(self.epoll.fileno()), "anon_inode:[eventpoll]", os.O_RDWR)
        self.data = {}                  # host fd -> the guest's epoll_data

    def release(self):
        OpenFile.release(self)
        self.epoll.close()


def _epoll_of(p, epfd):
    e = p.fds.get(epfd)
    if not isinstance(e, _Epoll):
        raise Errno(errno.EINVAL)
    return e


class PollCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_poll(self, p, fds, nfds, timeout):
        timeout &= 0xFFFFFFFF
        timeout = timeout - (1 << 32) if timeout >= 1 << 31 else timeout
        return _poll(self, p, fds, nfds, None if timeout < 0 else timeout)

    def sys_ppoll(self, p, fds, nfds, tsp, sigmask, sigsetsize):
        return _poll(self, p, fds, nfds, timeout_ms(p, tsp, 10 ** 9))

    def sys_select(self, p, n, inp, outp, exp, tvp):
        return _select(self, p, n & 0xFFFFFFFF, inp, outp, exp, timeout_ms(p, tvp, 10 ** 6))

    def sys_pselect6(self, p, n, inp, outp, exp, tsp, sig):
        return _select(self, p, n & 0xFFFFFFFF, inp, outp, exp, timeout_ms(p, tsp, 10 ** 9))

    def sys_epoll_create1(self, p, flags):
        if flags & ~os.O_CLOEXEC:
            raise Errno(errno.EINVAL)
        e = _Epoll(flags & os.O_CLOEXEC)
        try:
            return p.fds.install(e, cloexec=flags & os.O_CLOEXEC)
        except Errno:
            e.epoll.close()
            raise

    def sys_epoll_create(self, p, size):
        if size & 0xFFFFFFFF == 0 or size >= 1 << 31:
            raise Errno(errno.EINVAL)
        return self.sys_epoll_create1(p, 0)

    def sys_epoll_ctl(self, p, epfd, op, fd, event):
        e = _epoll_of(p, epfd)
        host = p.fds.get(fd).host_fd
        if host == e.host_fd:
            raise Errno(errno.EINVAL)
        try:
            if op == 2:                                 # EPOLL_CTL_DEL
                e.epoll.unregister(host)
                e.data.pop(host, None)
                return 0
            events, data = _EPOLL_EVENT.unpack(p.read(event, 12))
            if op == 1:                                 # EPOLL_CTL_ADD
                e.epoll.register(host, events)
            elif op == 3:                               # EPOLL_CTL_MOD
                e.epoll.modify(host, events)
            else:
                raise Errno(errno.EINVAL)
        except OSError as err:
            raise Errno(err.errno) from None
        e.data[host] = data
        return 0

    def sys_epoll_wait(self, p, epfd, events, maxevents, timeout):
        e = _epoll_of(p, epfd)
        maxevents &= 0xFFFFFFFF
        if not 0 < maxevents <= 65536:
            raise Errno(errno.EINVAL)
        timeout &= 0xFFFFFFFF
        timeout = timeout - (1 << 32) if timeout >= 1 << 31 else timeout
        poller = select.poll()
        poller.register(e.host_fd, select.POLLIN)
        if not _wait(self, p, poller, None if timeout < 0 else timeout):
            return 0
        ready = e.epoll.poll(0, maxevents)
        p.write(events, b"".join(_EPOLL_EVENT.pack(ev, e.data.get(host, 0)) for host, ev in ready))
        return len(ready)

    def sys_epoll_pwait(self, p, epfd, events, maxevents, timeout, sigmask, size):
        return self.sys_epoll_wait(p, epfd, events, maxevents, timeout)

    def sys_eventfd2(self, p, initval, flags):
        if flags & ~(os.O_CLOEXEC | os.O_NONBLOCK | 1):
            raise Errno(errno.EINVAL)
        host = os.eventfd(initval & 0xFFFFFFFF, (flags & (os.O_NONBLOCK | 1)) | os.O_CLOEXEC)
        return p.fds.install_host(host, "anon_inode:[eventfd]", os.O_RDWR, cloexec=flags & os.O_CLOEXEC)

    def sys_eventfd(self, p, initval):
        return self.sys_eventfd2(p, initval, 0)
