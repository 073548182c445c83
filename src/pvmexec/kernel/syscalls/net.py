"""Handlers: sockets. Unix sockets connect guest processes to each other (always allowed); inet sockets
reach the network only with the policy's network (else EACCES). Every socket is a host socket the
kernel holds; the guest names it by its own descriptor number.

Unix socket paths are guest paths: a bind creates the socket file in a writable directory (through the
directory's descriptor, so no symlink swapped in meanwhile can move it), a connect reaches only sockets
some guest of this kernel bound (never the host's: /run/dbus, an ssh agent...). Abstract names are
private to the kernel: each is prefixed on the host with a token of its own. Descriptors passed with
SCM_RIGHTS are translated both ways; the guest never holds a host descriptor.
"""
import errno
import os
import secrets
import select
import socket
import stat
import struct
import threading

from ...abi import AT_FDCWD, int32
from ..errors import Errno, Interrupted, host_call
from ..files import OpenFile
from .io import scatter

_PAIR_END = "socket:[unix]"
_AF_UNIX, _AF_INET, _AF_INET6 = socket.AF_UNIX, socket.AF_INET, socket.AF_INET6
_TYPES = (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET)
_SOCK_NONBLOCK, _SOCK_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_MSG_DONTWAIT, _MSG_NOSIGNAL, _MSG_CTRUNC = 0x40, 0x4000, 0x8
_SCM_RIGHTS, _SCM_CREDENTIALS = 1, 2
_NETLINK_SOCK_DIAG, _SOCK_DIAG_BY_FAMILY, _UDIAG_SHOW_PEER, _UNIX_DIAG_PEER = 4, 20, 4, 2
_MAX_IO = 1 << 20
# Options passed to the host socket as they are: (level, name) -> the largest value the guest may give.
_OPTIONS = {(1, n): 256 for n in (2, 3, 4, 5, 6, 7, 8, 9, 13, 15, 16, 17, 18, 19, 20, 21, 29, 30, 38, 39, 47)}
# SOL_SOCKET: REUSEADDR TYPE ERROR DONTROUTE BROADCAST SNDBUF RCVBUF KEEPALIVE LINGER REUSEPORT PASSCRED
# PEERCRED RCVLOWAT SNDLOWAT RCVTIMEO SNDTIMEO TIMESTAMP ACCEPTCONN PROTOCOL DOMAIN TIMESTAMPNS? (see man 7 socket)
_OPTIONS.update({(6, n): 64 for n in (1, 2, 3, 4, 5, 6, 7, 9, 10, 12, 16, 18, 23)})       # IPPROTO_TCP
_OPTIONS.update({(0, n): 64 for n in (1, 2, 3, 4, 6, 7, 8, 10, 11, 12, 14, 15, 19, 32, 33, 34)})  # IPPROTO_IP
_OPTIONS.update({(41, n): 64 for n in (16, 17, 18, 19, 23, 26, 49, 67)})               # IPPROTO_IPV6


class _Socket:
    """What the kernel knows of a guest socket beyond its host descriptor."""

    def __init__(self, family, kind):
        self.family, self.kind = family, kind
        self.name = None                # the guest's sockaddr for getsockname (bytes), once bound
        self.peer = None                # the guest's sockaddr of the peer, once connected
        self.peer_ino = None            # the host inode of the connected peer socket (sock_diag), once asked
        self.bound = None               # what connect names it by: the socket file's (st_dev, st_ino), or
                                        # the host's abstract name
        self.server_pid = None          # connected: the pid that listened on what it connected to
        self.ino = None                 # its host inode, once known (the credential tables' key)


def _sock(f):
    """A socket object over the kernel's descriptor (detached before closing, so the descriptor stays)."""
    return socket.socket(fileno=f.host_fd)


def _release(s):
    s.detach()


class NetCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    _abstract_token = None

    def _socket_of(self, p, fd):
        f = p.fds.get(fd)
        if not stat.S_ISSOCK(_fstat(f).st_mode):
            raise Errno(errno.ENOTSOCK)
        return f

    def _new_socket(self, p, host, family, kind, flags, path=None):
        f = self.socket_file(p, host, family, kind, flags, path)
        try:
            return p.fds.install(f, cloexec=flags & _SOCK_CLOEXEC)
        except Errno:
            f.release()
            raise

    def socket_file(self, p, host, family, kind, flags, path=None):
        """The OpenFile of p's new socket, the host's descriptor host (the kernel holds it)."""
        if flags & _SOCK_NONBLOCK:
            os.set_blocking(host, False)
        ino = os.fstat(host).st_ino
        f = OpenFile(host, path or "socket:[%d]" % ino, os.O_RDWR)
        f.socket = _Socket(family, kind)
        f.socket.ino = ino
        if family == _AF_UNIX:
            self.socket_creds[ino] = p.pid          # what SO_PEERCRED shows of it to its peer (its maker's)
            f.on_release = lambda: (self.socket_creds.pop(ino, None), self.socket_senders.pop(ino, None))
        return f

    def sys_socket(self, p, family, type_, protocol):
        family, kind = family & 0xFFFFFFFF, type_ & 0xF
        if type_ & ~(0xF | _SOCK_NONBLOCK | _SOCK_CLOEXEC) & 0xFFFFFFFF or kind not in _TYPES + (socket.SOCK_RAW,):
            raise Errno(errno.EINVAL)
        if family == _AF_UNIX:
            if kind == socket.SOCK_RAW:
                raise Errno(errno.ESOCKTNOSUPPORT)
        elif family in (_AF_INET, _AF_INET6):
            if not self.policy.network:
                raise Errno(errno.EACCES)
            if kind == socket.SOCK_RAW:
                raise Errno(errno.EPERM)            # raw sockets would see the host's traffic
        else:
            raise Errno(errno.EAFNOSUPPORT if self.policy.network or family == 16 else errno.EACCES)
        try:
            s = socket.socket(family, kind | socket.SOCK_CLOEXEC, int32(protocol))
        except OSError as e:
            raise Errno(e.errno or errno.EINVAL) from None
        return self._new_socket(p, s.detach(), family, kind, type_)

    def sys_socketpair(self, p, family, type_, protocol, sv):
        """Unix socket pairs connect guest processes to each other only: allowed without the network."""
        if family != _AF_UNIX:
            raise Errno(errno.EAFNOSUPPORT if self.policy.network else errno.EACCES)
        kind = type_ & 0xF
        if type_ & ~(0xF | _SOCK_NONBLOCK | _SOCK_CLOEXEC) & 0xFFFFFFFF or kind not in _TYPES:
            raise Errno(errno.EINVAL)
        if int32(protocol) not in (0, _AF_UNIX):
            raise Errno(errno.EPROTONOSUPPORT)
        a, b = socket.socketpair(_AF_UNIX, kind)
        fds = []
        try:
            for s in (a, b):
                fds.append(self._new_socket(p, s.detach(), _AF_UNIX, kind, type_, _PAIR_END))
            p.write(sv, struct.pack("<ii", *fds))
        except BaseException:
            for fd in fds:
                p.fds.close(fd)
            raise
        return 0

    # -- addresses -----------------------------------------------------------------------------

    def _guest_addr(self, p, addr, addrlen):
        if addrlen > 128 or addrlen < 2:
            raise Errno(errno.EINVAL)
        return p.read(addr, addrlen)

    def _abstract(self, name):
        if NetCalls._abstract_token is None:
            NetCalls._abstract_token = secrets.token_hex(8).encode()
        return b"\0pvmexec-" + NetCalls._abstract_token + b"-" + name

    def _unix_target(self, p, raw):
        """A connect or sendto address: (host address, the guest's form, a descriptor to close after)
        for a socket some guest of this kernel bound, or a private abstract name."""
        path = raw[2:]
        if not path:
            raise Errno(errno.EINVAL)
        if path[0] == 0:
            return self._abstract(path[1:]), raw, None
        guest = self._abs(p, AT_FDCWD, path.split(b"\0", 1)[0].decode("utf-8", "surrogateescape"))
        fd = self._guest_path_fd(p, guest)
        try:
            st = os.fstat(fd)
            if not stat.S_ISSOCK(st.st_mode) or (st.st_dev, st.st_ino) not in self.unix_bound:
                raise Errno(errno.ECONNREFUSED)     # the host's own sockets are never reached
        except BaseException:
            os.close(fd)
            raise
        return "/proc/self/fd/%d" % fd, self.unix_bound[(st.st_dev, st.st_ino)], fd

    def sys_bind(self, p, fd, addr, addrlen):
        f = self._socket_of(p, fd & 0xFFFFFFFF)
        raw = self._guest_addr(p, addr, addrlen & 0xFFFFFFFF)
        family = struct.unpack_from("<H", raw)[0]
        s = _sock(f)
        try:
            if family != f.socket.family:
                raise Errno(errno.EINVAL if f.socket.family != _AF_UNIX else errno.EINVAL)
            if family != _AF_UNIX:
                host_call(s.bind, _inet_addr(raw, family))
                f.socket.name = None
                return 0
            path = raw[2:]
            if not path:
                host_call(s.bind, "")                  # autobind: an abstract name of the host's choosing
                return 0
            if path[0] == 0:
                f.socket.bound = self._abstract(path[1:])
                host_call(s.bind, f.socket.bound)
                f.socket.name = raw
                return 0
            guest = path.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")
            parent, name = self.policy.parent_for_write(self._abs(p, AT_FDCWD, guest))
            try:
                host_call(s.bind, "/proc/self/fd/%d/%s" % (parent, name))
                st = os.stat(name, dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
            f.socket.name = raw[:2 + len(path.split(b"\0", 1)[0]) + 1]     # as the guest spelled it
            self.unix_bound[(st.st_dev, st.st_ino)] = f.socket.name
            f.socket.bound = (st.st_dev, st.st_ino)
            return 0
        finally:
            _release(s)

    def sys_listen(self, p, fd, backlog):
        f = self._socket_of(p, fd & 0xFFFFFFFF)
        s = _sock(f)
        try:
            host_call(s.listen, min(backlog & 0x7FFFFFFF, 4096))
        finally:
            _release(s)
        self._record_creds(p, f)                    # a client's SO_PEERCRED: who listened, as Linux
        return 0

    def _record_creds(self, p, f):
        if f.socket.family == _AF_UNIX:
            self.socket_creds[_ino(f)] = p.pid
            if f.socket.bound is not None:
                self.unix_listening[f.socket.bound] = p.pid

    def _peer_pid(self, f, sent=False):
        """The guest pid the connected peer of a unix socket stands for: SO_PEERCRED's (who connected,
        or listened), or with sent the last process that sent on it (SCM_CREDENTIALS'); 0 if unknown."""
        if f.socket is None or f.socket.family != _AF_UNIX:
            return 0
        if f.socket.server_pid is not None and not (sent and self.socket_senders):
            return f.socket.server_pid
        if f.socket.peer_ino is None:
            f.socket.peer_ino = unix_peer_inode(_ino(f)) or 0
        ino = f.socket.peer_ino
        return (self.socket_senders.get(ino) if sent else None) or self.socket_creds.get(ino, 0)

    def sys_connect(self, p, fd, addr, addrlen):
        f = self._socket_of(p, fd & 0xFFFFFFFF)
        raw = self._guest_addr(p, addr, addrlen & 0xFFFFFFFF)
        family = struct.unpack_from("<H", raw)[0]
        if family != f.socket.family:
            raise Errno(errno.EAFNOSUPPORT)
        target, guest, keep = (_inet_addr(raw, family), raw, None) if family != _AF_UNIX else \
            self._unix_target(p, raw)
        if keep is None:
            server = target                     # an abstract name (or an inet address)
        else:
            st = os.fstat(keep)
            server = (st.st_dev, st.st_ino)     # the socket file it names
        s = _sock(f)
        try:
            blocking = os.get_blocking(f.host_fd)
            if not blocking:
                host_call(s.connect, target)
            elif family == _AF_UNIX:
                self._unix_connect(p, f, s, target)
            else:
                # A blocking connect waits in steps a signal can end (the host's would not give way).
                os.set_blocking(f.host_fd, False)
                try:
                    err = s.connect_ex(target)
                finally:
                    os.set_blocking(f.host_fd, True)
                if err == errno.EINPROGRESS:
                    self._wait_readable(p, f.host_fd, select.POLLOUT)
                    err = s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                if err:
                    raise Errno(err)
        finally:
            _release(s)
            if keep is not None:
                os.close(keep)
        f.socket.peer = guest
        self._record_creds(p, f)                    # the server's SO_PEERCRED: who connected
        if family == _AF_UNIX:
            f.socket.server_pid = self.unix_listening.get(server)
        return 0

    def _unix_connect(self, p, f, s, target):
        """A blocking AF_UNIX connect: the host's would wait for room in a full backlog where no signal
        can end it, so it is tried without blocking and again after a pause a signal ends (EINTR)."""
        pause = 0.001
        while True:
            os.set_blocking(f.host_fd, False)
            try:
                s.connect(target)
                return
            except BlockingIOError:
                pass
            except OSError as e:
                raise Errno(e.errno or errno.EINVAL) from None
            finally:
                os.set_blocking(f.host_fd, True)
            self._sleep(p, pause)
            pause = min(pause * 2, 0.05)

    def sys_accept4(self, p, fd, addr, addrlen, flags):
        f = self._socket_of(p, fd & 0xFFFFFFFF)
        if flags & ~(_SOCK_NONBLOCK | _SOCK_CLOEXEC):
            raise Errno(errno.EINVAL)
        s = _sock(f)
        st = os.fstat(f.host_fd)
        with self._cond:
            lock = self.accept_locks.setdefault((st.st_dev, st.st_ino), threading.Lock())
        try:
            while True:
                if os.get_blocking(f.host_fd):
                    self._wait_readable(p, f.host_fd)
                # Guests sharing the listening socket (a preforking server) take turns: the one that finds
                # a connection still there takes it, the others wait again; none blocks in the host's accept.
                with lock:
                    if os.get_blocking(f.host_fd) and not _readable_now(f.host_fd):
                        continue
                    try:
                        conn, _ = s.accept()
                        break
                    except BlockingIOError:
                        if not os.get_blocking(f.host_fd):
                            raise Errno(errno.EAGAIN) from None
                    except OSError as e:
                        raise Errno(e.errno or errno.EINVAL) from None
        finally:
            _release(s)
        conn.setblocking(True)
        new = self._new_socket(p, conn.detach(), f.socket.family, f.socket.kind, flags)
        p.fds.get(new).socket.name = f.socket.name
        if f.socket.family == _AF_UNIX:           # the client's SO_PEERCRED: the listener's, as Linux
            self.socket_creds[_ino(p.fds.get(new))] = self.socket_creds.get(_ino(f), p.pid)
        peer = _unnamed(f.socket.family)
        if addr:
            self._put_addr(p, addr, addrlen, peer)
        return new

    def sys_accept(self, p, fd, addr, addrlen):
        return self.sys_accept4(p, fd, addr, addrlen, 0)

    def _put_addr(self, p, addr, addrlen, raw):
        (room,) = struct.unpack("<i", p.read(addrlen, 4))
        if room < 0:
            raise Errno(errno.EINVAL)
        p.write(addr, raw[:room])
        p.write(addrlen, struct.pack("<i", len(raw)))

    def sys_getsockname(self, p, fd, addr, addrlen):
        return self._socket_name(p, fd, addr, addrlen, peer=False)

    def sys_getpeername(self, p, fd, addr, addrlen):
        return self._socket_name(p, fd, addr, addrlen, peer=True)

    def _socket_name(self, p, fd, addr, addrlen, peer):
        f = self._socket_of(p, fd)
        info = f.socket
        if info is None:
            raise Errno(errno.EOPNOTSUPP)           # a socket inherited from the host: its name is not shown
        if info.family != _AF_UNIX:
            s = _sock(f)
            try:
                raw = host_call(s.getpeername if peer else s.getsockname)
            finally:
                _release(s)
            raw = _pack_inet(raw, info.family)
        else:
            if peer and info.peer is None and f.path != _PAIR_END:
                s = _sock(f)
                try:
                    host_call(s.getpeername)       # ENOTCONN when it is not connected
                finally:
                    _release(s)
            raw = (info.peer if peer else info.name) or _unnamed(_AF_UNIX)
        self._put_addr(p, addr, addrlen, raw)
        return 0

    # -- data ----------------------------------------------------------------------------------

    def sys_sendto(self, p, fd, buf, length, flags, addr, addrlen):
        f = self._socket_of(p, fd)
        if not addr:
            if not flags:
                return self.sys_write(p, fd, buf, length)
            return self._send(p, f, [p.read(buf, min(length, _MAX_IO))], [], flags, None)
        raw = self._guest_addr(p, addr, addrlen & 0xFFFFFFFF)
        return self._send_to(p, f, [p.read(buf, min(length, _MAX_IO))], [], flags, raw)

    def _send_to(self, p, f, data, anc, flags, raw):
        family = struct.unpack_from("<H", raw)[0]
        if family == _AF_UNIX:
            target, _guest, keep = self._unix_target(p, raw)
            try:
                return self._send(p, f, data, anc, flags, target)
            finally:
                if keep is not None:
                    os.close(keep)
        return self._send(p, f, data, anc, flags, _inet_addr(raw, family))

    def _note_sender(self, p, f):
        if f.socket is not None and f.socket.family == _AF_UNIX:
            self.socket_senders[_ino(f)] = p.pid    # whom SCM_CREDENTIALS names

    def _send(self, p, f, data, anc, flags, address):
        self._note_sender(p, f)
        s = _sock(f)
        try:
            wait = os.get_blocking(f.host_fd) and not flags & _MSG_DONTWAIT
            while True:
                if wait:
                    self._wait_readable(p, f.host_fd, select.POLLOUT)
                try:
                    args = (data, anc, (flags | _MSG_DONTWAIT | _MSG_NOSIGNAL) & 0xFFFFFFFF)
                    return s.sendmsg(*args, address) if address is not None else s.sendmsg(*args)
                except BlockingIOError:
                    if not wait:
                        raise Errno(errno.EAGAIN) from None
                except BrokenPipeError:
                    if not flags & _MSG_NOSIGNAL:
                        self._raise_sigpipe(p)
                    raise Errno(errno.EPIPE) from None
                except OSError as e:
                    raise Errno(e.errno or errno.EIO) from None
        finally:
            _release(s)

    def sys_recvfrom(self, p, fd, buf, length, flags, addr, addrlen):
        f = self._socket_of(p, fd)
        if not flags and not addr:
            return self.sys_read(p, fd, buf, length)
        data, _anc, _mflags, source = self._recv(p, f, min(length, _MAX_IO), 0, flags)
        p.write(buf, data[:length])
        if addr and addrlen:
            self._put_addr(p, addr, addrlen, source)
        return len(data)

    def _recv(self, p, f, size, ancsize, flags):
        s = _sock(f)
        try:
            wait = os.get_blocking(f.host_fd) and not flags & _MSG_DONTWAIT
            while True:
                if wait:
                    self._wait_readable(p, f.host_fd)
                try:
                    data, anc, mflags, source = s.recvmsg(size, ancsize, (flags | _MSG_DONTWAIT) & 0xFFFFFFFF)
                    break
                except BlockingIOError:
                    if not wait:
                        raise Errno(errno.EAGAIN) from None
                except OSError as e:
                    raise Errno(e.errno or errno.EIO) from None
        finally:
            _release(s)
        info = f.socket
        if info is not None and info.family != _AF_UNIX and isinstance(source, tuple):
            source = _pack_inet(source, info.family)
        elif isinstance(source, bytes) and source.startswith(self._abstract(b"")):
            source = struct.pack("<H", _AF_UNIX) + b"\0" + source[len(self._abstract(b"")):]
        elif info is not None and info.peer:
            source = info.peer
        else:
            source = b""                                 # a sender's path on the host is not the guest's
        return data, anc, mflags, source

    def sys_sendmsg(self, p, fd, msg, flags):
        f = self._socket_of(p, fd)
        name, namelen, iov, iovlen, control, controllen, _ = struct.unpack("<QI4xQQQQi4x", p.read(msg, 56))
        data = [p.read(b, n) for b, n in _iovecs(p, iov, iovlen)]
        anc = self._control_out(p, control, controllen)
        if name and namelen:
            return self._send_to(p, f, data, anc, flags, self._guest_addr(p, name, namelen))
        return self._send(p, f, data, anc, flags, None)

    def sys_recvmsg(self, p, fd, msg, flags):
        f = self._socket_of(p, fd)
        name, namelen, iov, iovlen, control, controllen, _ = struct.unpack("<QI4xQQQQi4x", p.read(msg, 56))
        segments = _iovecs(p, iov, iovlen)
        total = min(sum(n for _, n in segments), _MAX_IO)
        data, anc, mflags, source = self._recv(p, f, total, min(controllen, 4096), flags & ~0x40000000)
        scatter(p, segments, data)
        out, truncated = self._control_in(p, anc, controllen, flags & 0x40000000, f)
        if control and out:
            p.write(control, out)
        if name and namelen:
            p.write(name, source[:namelen])
        p.write(msg + 8, struct.pack("<I", len(source) if name else 0))
        p.write(msg + 40, struct.pack("<Q", len(out)))
        p.write(msg + 48, struct.pack("<i", mflags | (_MSG_CTRUNC if truncated else 0)))
        return len(data)

    def sys_sendmmsg(self, p, fd, vec, vlen, flags):
        return _each_message(p, vec, vlen, lambda at, done: self.sys_sendmsg(p, fd, at, flags))

    def sys_recvmmsg(self, p, fd, vec, vlen, flags, timeout):
        # After the first message, the rest only if they are there (MSG_WAITFORONE: the same at once).
        return _each_message(p, vec, vlen, lambda at, done: self.sys_recvmsg(
            p, fd, at, flags | (_MSG_DONTWAIT if done else 0)))

    def _control_out(self, p, control, length):
        """The guest's control messages as the host's: its descriptors become the kernel's host ones."""
        anc, at = [], 0
        raw = p.read(control, min(length, 4096)) if control and length else b""
        while at + 16 <= len(raw):
            clen, level, kind = struct.unpack_from("<Qii", raw, at)
            if clen < 16 or at + clen > len(raw):
                raise Errno(errno.EINVAL)
            body = raw[at + 16:at + clen]
            if level == socket.SOL_SOCKET and kind == _SCM_RIGHTS:
                fds = struct.unpack("<%di" % (len(body) // 4), body[:len(body) // 4 * 4])
                anc.append((level, kind, struct.pack("<%di" % len(fds), *(p.fds.get(n).host_fd for n in fds))))
            elif level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS:
                pass                                    # the host fills in the sender's (the kernel's) own
            else:
                raise Errno(errno.EINVAL)
            at += (clen + 7) & ~7
        return anc

    def _control_in(self, p, anc, room, cloexec, f):
        """The host's control messages as the guest's: received descriptors become the receiver's own
        (those that do not fit are closed, as Linux does)."""
        out, truncated = bytearray(), False
        for level, kind, body in anc:
            fits = len(out) + 16 + len(body) <= room
            if level == socket.SOL_SOCKET and kind == _SCM_RIGHTS:
                hosts = struct.unpack("<%di" % (len(body) // 4), body[:len(body) // 4 * 4])
                mine = []
                for h in hosts:
                    if not fits:
                        os.close(h)
                        continue
                    try:
                        f = OpenFile(h, self._inherited_name(h, -1), os.O_RDWR)
                        f.socket = _socket_info(h)
                        mine.append(p.fds.install(f, cloexec=cloexec))
                    except Errno:
                        os.close(h)
                        truncated = True
                body = struct.pack("<%di" % len(mine), *mine)
            elif level == socket.SOL_SOCKET and kind == _SCM_CREDENTIALS:
                _pid, uid, gid = struct.unpack("<iII", body[:12])
                body = struct.pack("<iII", self._peer_pid(f, sent=True), uid, gid)   # never the host's pid
            if not fits:
                truncated = True
                continue
            msg = struct.pack("<Qii", 16 + len(body), level, kind) + body
            out += msg + bytes((-len(msg)) % 8)
        return bytes(out[:room]), truncated

    def sys_shutdown(self, p, fd, how):
        f = self._socket_of(p, fd)
        if how & 0xFFFFFFFF > 2:
            raise Errno(errno.EINVAL)
        s = _sock(f)
        try:
            host_call(s.shutdown, how)
        finally:
            _release(s)
        return 0

    def sys_setsockopt(self, p, fd, level, name, value, length):
        f = self._socket_of(p, fd)
        limit = _OPTIONS.get((level & 0xFFFFFFFF, name & 0xFFFFFFFF))
        if limit is None:
            raise Errno(errno.ENOPROTOOPT)
        if length & 0xFFFFFFFF > limit:
            raise Errno(errno.EINVAL)
        data = p.read(value, length & 0xFFFFFFFF) if length else b""
        s = _sock(f)
        try:
            host_call(s.setsockopt, level, name, data)
        finally:
            _release(s)
        return 0

    def sys_getsockopt(self, p, fd, level, name, value, lenp):
        f = self._socket_of(p, fd)
        if (level & 0xFFFFFFFF, name & 0xFFFFFFFF) not in _OPTIONS:
            raise Errno(errno.ENOPROTOOPT)
        (room,) = struct.unpack("<i", p.read(lenp, 4))
        if room < 0:
            raise Errno(errno.EINVAL)
        s = _sock(f)
        try:
            data = host_call(s.getsockopt, level, name, max(1, min(room, 256)))
        finally:
            _release(s)
        if level == socket.SOL_SOCKET and name == socket.SO_PEERCRED and len(data) >= 4:
            data = struct.pack("<i", self._peer_pid(f)) + data[4:]     # a guest's pid, never the host's
        p.write(value, data[:room])
        p.write(lenp, struct.pack("<i", min(len(data), room)))
        return 0


def _each_message(p, vec, vlen, call):
    """sendmmsg/recvmmsg: call(address of the mmsghdr, messages done) for each, its length stored in it;
    an error after the first message ends the batch, with what was done."""
    done = 0
    for i in range(min(vlen, 1024)):
        try:
            n = call(vec + 64 * i, done)
        except (Errno, Interrupted):
            if done:
                break
            raise
        p.write(vec + 64 * i + 56, struct.pack("<I", n))
        done += 1
    return done


def _fstat(f):
    try:
        return os.fstat(f.host_fd)
    except OSError:
        raise Errno(errno.EBADF) from None


def _ino(f):
    """A guest socket's host inode (kept since it was made; a socket passed in is asked once)."""
    if f.socket.ino is None:
        f.socket.ino = os.fstat(f.host_fd).st_ino
    return f.socket.ino


def unix_peer_inode(ino):
    """The inode of the unix socket connected to socket inode ino (sock_diag's UNIX_DIAG_PEER), or None."""
    try:
        nl = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC, _NETLINK_SOCK_DIAG)
    except OSError:
        return None
    try:
        req = struct.pack("<BBHIIIII", _AF_UNIX, 0, 0, 0xFFFFFFFF, ino, _UDIAG_SHOW_PEER, 0xFFFFFFFF, 0xFFFFFFFF)
        nl.send(struct.pack("<IHHII", 16 + len(req), _SOCK_DIAG_BY_FAMILY, 1, 1, 0) + req)   # NLM_F_REQUEST
        data = nl.recv(65536)
    except OSError:
        return None
    finally:
        nl.close()
    if len(data) < 32 or struct.unpack_from("<H", data, 4)[0] != _SOCK_DIAG_BY_FAMILY:
        return None                                 # NLMSG_ERROR: no such socket
    end, at = min(struct.unpack_from("<I", data)[0], len(data)), 32      # nlmsghdr, unix_diag_msg
    while at + 8 <= end:
        length, kind = struct.unpack_from("<HH", data, at)
        if length < 4:
            break
        if kind == _UNIX_DIAG_PEER:
            return struct.unpack_from("<I", data, at + 4)[0]
        at += (length + 3) & ~3
    return None


def _readable_now(fd):
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(0))


def _iovecs(p, iov, n):
    if n > 1024:
        raise Errno(errno.EMSGSIZE)
    words = p.read_u64s(iov, 2 * n) if n else ()
    return [(words[2 * i], min(words[2 * i + 1], _MAX_IO)) for i in range(n)]


def _unnamed(family):
    return struct.pack("<H", family)


def _inet_addr(raw, family):
    """A guest's sockaddr_in/in6 as Python's socket module takes it."""
    if family == _AF_INET and len(raw) >= 16:
        port = struct.unpack_from(">H", raw, 2)[0]
        return socket.inet_ntop(_AF_INET, raw[4:8]), port
    if family == _AF_INET6 and len(raw) >= 28:
        port, flow = struct.unpack_from(">HI", raw, 2)
        scope = struct.unpack_from("<I", raw, 24)[0]
        return socket.inet_ntop(_AF_INET6, raw[8:24]), port, flow, scope
    raise Errno(errno.EINVAL if family in (_AF_INET, _AF_INET6) else errno.EAFNOSUPPORT)


def _pack_inet(addr, family):
    if family == _AF_INET:
        return struct.pack("<H", _AF_INET) + struct.pack(">H", addr[1]) + socket.inet_pton(_AF_INET, addr[0]) + bytes(8)
    return (struct.pack("<H", _AF_INET6) + struct.pack(">HI", addr[1], addr[2]) +
            socket.inet_pton(_AF_INET6, addr[0]) + struct.pack("<I", addr[3]))


def _socket_info(host):
    """A passed descriptor's family and type, if it is a socket."""
    try:
        if not stat.S_ISSOCK(os.fstat(host).st_mode):
            return None
        s = socket.socket(fileno=host)
    except OSError:
        return None
    try:
        return _Socket(int(s.family), int(s.type) & 0xF)
    finally:
        s.detach()
