"""Handlers: sockets (socket, socketpair, sendto, recvfrom, shutdown, getsockname, getpeername)."""
import errno
import os
import socket
import stat
import struct

from ..errors import Errno
from ..files import OpenFile

_PAIR_END = "socket:[unix]"


class NetCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_socket(self, p, family, type_, protocol):
        if not self.policy.network:
            raise Errno(errno.EACCES)
        raise Errno(errno.EAFNOSUPPORT)

    def sys_socketpair(self, p, family, type_, protocol, sv):
        """Unix socket pairs connect guest processes to each other only: allowed without the network."""
        if family != socket.AF_UNIX:
            raise Errno(errno.EAFNOSUPPORT if self.policy.network else errno.EACCES)
        kind = type_ & 0xF
        if kind not in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
            raise Errno(errno.EINVAL)
        a, b = socket.socketpair(socket.AF_UNIX, kind)
        fds = []
        try:
            for s in (a, b):
                host = s.detach()
                if type_ & os.O_NONBLOCK:
                    os.set_blocking(host, False)
                fds.append(p.fds.install(OpenFile(host, _PAIR_END, os.O_RDWR), cloexec=type_ & os.O_CLOEXEC))
            p.write(sv, struct.pack("<ii", *fds))
        except BaseException:
            for fd in fds:
                p.fds.close(fd)
            raise
        return 0

    def sys_sendto(self, p, fd, buf, length, flags, addr, addrlen):
        if addr:
            raise Errno(errno.EISCONN)
        return self.sys_write(p, fd, buf, length)

    def sys_recvfrom(self, p, fd, buf, length, flags, addr, addrlen):
        n = self.sys_read(p, fd, buf, length)
        if addrlen:
            p.write(addrlen, struct.pack("<I", 0))
        return n

    def sys_shutdown(self, p, fd, how):
        f = p.fds.get(fd)
        s = socket.socket(fileno=os.dup(f.host_fd))
        try:
            s.shutdown(how)
        except OSError as e:
            raise Errno(e.errno) from None
        finally:
            s.close()
        return 0

    def sys_getsockname(self, p, fd, addr, addrlen):
        return self._socket_name(p, fd, addr, addrlen)

    def sys_getpeername(self, p, fd, addr, addrlen):
        return self._socket_name(p, fd, addr, addrlen)

    def _socket_name(self, p, fd, addr, addrlen):
        """Socketpair ends are unnamed: both names are the family alone, as Linux says."""
        f = p.fds.get(fd)
        if not stat.S_ISSOCK(os.fstat(f.host_fd).st_mode):
            raise Errno(errno.ENOTSOCK)
        if f.path != _PAIR_END:
            raise Errno(errno.EOPNOTSUPP)        # a socket inherited from the host: its name is not shown
        (room,) = struct.unpack("<i", p.read(addrlen, 4))
        if room < 0:
            raise Errno(errno.EINVAL)
        name = struct.pack("<H", socket.AF_UNIX)
        p.write(addr, name[:room])
        p.write(addrlen, struct.pack("<i", len(name)))
        return 0
