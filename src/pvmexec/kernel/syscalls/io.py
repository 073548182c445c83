"""Handlers: reading and writing (read/write families, sendfile, lseek), descriptors (dup*, pipe*, fcntl, ioctl)."""
import errno
import fcntl
import os
import select
import signal
import struct
import termios

from ...abi import F_ADD_SEALS, F_GET_SEALS, O_LARGEFILE
from ..errors import Errno, Interrupted, host_call
from ..files import OpenFile
from . import hostfd


IO_MAX = 1 << 20                      # bytes moved per step (pipes and terminals: per call)
MAX_RW_COUNT = 0x7FFFF000             # what Linux moves in one read or write at most
PIPE_BUF = 4096
_IOCTL_OUT = {0x5401: 36, 0x5413: 8, 0x541B: 4, 0x80045430: 4, 0x80045432: 4}   # TCGETS, TIOCGWINSZ, FIONREAD,
                                                                                 # TIOCGPTN, TIOCGPKT
_IOCTL_IN = {0x5402: 36, 0x5403: 36, 0x5404: 36, 0x5414: 8, 0x40045431: 4,       # TCSETS(W/F), TIOCSWINSZ,
             0x5420: 4, 0x5409: 0, 0x540B: 0, 0x540A: 0}                         # TIOCSPTLCK, TIOCPKT, TCSBRK,
                                                                                 # TCFLSH, TCXONC (by value)


def _may_block(f):
    """Whether a read or write could wait (then the wait must give way to signals)."""
    try:
        return not f.regular and os.get_blocking(f.host_fd)
    except OSError:
        return False


def _read(self, p, f, n):
    if self.tty_pgrp and not f.regular and not f.plain and os.isatty(f.host_fd):
        self._terminal_access(p, f, signal.SIGTTIN)
    if _may_block(f):
        self._wait_readable(p, f.host_fd)         # a signal may cut the wait short (Interrupted)
    return host_call(os.read, f.host_fd, n)


def _tostop(host_fd):
    try:
        return bool(termios.tcgetattr(host_fd)[3] & termios.TOSTOP)
    except termios.error:
        return False


def _ready(host_fd):
    poller = select.poll()
    poller.register(host_fd, select.POLLIN)
    return bool(poller.poll(0))


def _write(self, p, call, fd, data, *extra):
    f = p.fds.get(fd)
    if f.socket is not None:
        self._note_sender(p, f)                 # whom SCM_CREDENTIALS names for what write() sends
    if self.tty_pgrp and not f.regular and not f.plain and os.isatty(f.host_fd) and _tostop(f.host_fd):
        self._terminal_access(p, f, signal.SIGTTOU)
    if _may_block(f):
        self._wait_readable(p, f.host_fd, select.POLLOUT)
    try:
        return call(f.host_fd, data, *extra)
    except BrokenPipeError:
        self._raise_sigpipe(p)
        raise Errno(errno.EPIPE) from None
    except OSError as e:
        raise Errno(e.errno or errno.EIO) from None


def _regular(f):
    return f.regular                        # known since it was opened: a file's type does not change


def _whole_writes(f):
    """Regular files, and blocking descriptors: a write(2) there moves everything (or waits)."""
    try:
        return f.regular or os.get_blocking(f.host_fd)
    except OSError:
        return False


def _read_file(p, f, segments, pos=None):
    """Fill (address, length) segments from a regular file, as Linux does: all of them unless the file
    ends; guest memory that ends stops it too, and the offset moves only by what the guest got."""
    start = host_call(os.lseek, f.host_fd, 0, os.SEEK_CUR) if pos is None else pos
    done = 0
    try:
        for base, length in segments:
            at = 0
            while at < length:
                chunk = host_call(os.pread, f.host_fd, min(length - at, IO_MAX), start + done)
                if not chunk:
                    return done
                try:
                    p.write(base + at, chunk)
                except Errno:
                    if not done:
                        raise
                    return done
                at += len(chunk)
                done += len(chunk)
        return done
    finally:
        if pos is None and done:
            host_call(os.lseek, f.host_fd, start + done, os.SEEK_SET)


def _write_all(self, p, fd, segments, pos=None):
    """Write (address, length) segments whole, as Linux does for regular files and blocking pipes,
    sockets and terminals: unless the disk or guest memory ends, or a signal comes after some bytes."""
    # What may wait goes in steps of what POLLOUT promises, so that a signal can cut the wait short.
    step = PIPE_BUF if _may_block(p.fds.get(fd)) else IO_MAX
    done = 0
    for base, length in segments:
        at = 0
        while at < length:
            try:
                data = p.read(base + at, min(length - at, step))
            except Errno:
                if not done:
                    raise
                return done
            try:
                w = _write(self, p, os.write, fd, data) if pos is None else \
                    _write(self, p, os.pwrite, fd, data, pos + done)
            except (Errno, Interrupted):
                if not done:
                    raise
                return done
            at += w
            done += w
            if w < len(data):
                return done
    return done


def scatter(p, segments, data):
    """data into the guest's (address, length) segments, in order, as far as it goes."""
    done = 0
    for base, length in segments:
        if done >= len(data):
            break
        p.write(base, data[done:done + length])
        done += length


def _capped(segments, limit=MAX_RW_COUNT):
    out, total = [], 0
    for base, length in segments:
        length = min(length, limit - total)
        out.append((base, length))
        total += length
    return out, total


def _iovec(p, vec, n, limit=IO_MAX):
    if n > 1024:
        raise Errno(errno.EINVAL)
    words = p.read_u64s(vec, 2 * n) if n else ()
    if any(words[2 * i + 1] >= 1 << 63 for i in range(n)):
        raise Errno(errno.EINVAL)
    return _capped([(words[2 * i], words[2 * i + 1]) for i in range(n)], limit)


_F_OFD_GETLK, _F_OFD_SETLK = 36, 37


def _record_lock(self, p, f, cmd, arg):
    """Record locks as the host's open-file-description locks: F_OFD_* on the guest's own open file;
    POSIX ones (F_GETLK, F_SETLK, F_SETLKW) of a regular file on the one open file its process's locks
    on that file share (FdTable.lock_handle). Both exclude other guest processes and host holders."""
    raw = bytearray(p.read(arg, 32))
    kind, whence = struct.unpack_from("<hh", raw)
    if kind not in (fcntl.F_RDLCK, fcntl.F_WRLCK, fcntl.F_UNLCK) or whence not in (0, 1, 2):
        raise Errno(errno.EINVAL)
    if kind == fcntl.F_RDLCK and f.flags & 3 == os.O_WRONLY or kind == fcntl.F_WRLCK and f.flags & 3 == os.O_RDONLY:
        if cmd not in (5, 36):
            raise Errno(errno.EBADF)
    struct.pack_into("<i", raw, 24, 0)                           # l_pid: 0 for the host's OFD calls
    host = p.fds.lock_handle(f) if cmd in (5, 6, 7) and f.regular else f.host_fd
    if cmd in (5, 36):
        out = bytearray(host_call(fcntl.fcntl, host, _F_OFD_GETLK, bytes(raw)))
        if struct.unpack_from("<h", out)[0] != fcntl.F_UNLCK:
            struct.pack_into("<i", out, 24, -1)                  # the holder is not a guest pid we know
        p.write(arg, bytes(out))
        return 0
    while True:
        try:
            fcntl.fcntl(host, _F_OFD_SETLK, bytes(raw))
            return 0
        except (BlockingIOError, PermissionError):
            if cmd in (6, 37):
                raise Errno(errno.EAGAIN) from None
        except OSError as e:
            raise Errno(e.errno or errno.EIO) from None
        self._sleep(p, 0.005)                                    # F_SETLKW: a signal ends the wait


class IoCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_read(self, p, fd, buf, count):
        f = p.fds.get(fd)
        if f.signalfd is not None:
            return self.read_signalfd(p, f, buf, count)
        if f.pidfd is not None:
            raise Errno(errno.EINVAL)
        if _regular(f):
            return _read_file(p, f, _capped([(buf, count)])[0])
        count = min(count, MAX_RW_COUNT)
        data = _read(self, p, f, min(count, IO_MAX))
        p.write(buf, data)
        done = len(data)
        # A device or pipe that keeps data ready (/dev/zero, a full pipe) fills all of count, as Linux does.
        while done < count and len(data) == IO_MAX and _ready(f.host_fd):
            try:
                data = host_call(os.read, f.host_fd, min(count - done, IO_MAX))
                p.write(buf + done, data)
            except Errno:
                break
            done += len(data)
        return done

    def sys_write(self, p, fd, buf, count):
        if _whole_writes(p.fds.get(fd)):
            return _write_all(self, p, fd, _capped([(buf, count)])[0])
        return _write(self, p, os.write, fd, p.read(buf, min(count, IO_MAX)))

    def sys_pread64(self, p, fd, buf, count, pos):
        f = p.fds.get(fd)
        if pos >= 1 << 63:
            raise Errno(errno.EINVAL)
        if _regular(f):
            return _read_file(p, f, _capped([(buf, count)])[0], pos)
        data = host_call(os.pread, f.host_fd, min(count, IO_MAX), pos)
        p.write(buf, data)
        return len(data)

    def sys_pwrite64(self, p, fd, buf, count, pos):
        p.fds.get(fd)
        if pos >= 1 << 63:
            raise Errno(errno.EINVAL)
        if _whole_writes(p.fds.get(fd)):
            return _write_all(self, p, fd, _capped([(buf, count)])[0], pos)
        return _write(self, p, os.pwrite, fd, p.read(buf, min(count, IO_MAX)), pos)

    def sys_readv(self, p, fd, vec, n):
        f = p.fds.get(fd)
        if _regular(f):
            return _read_file(p, f, _iovec(p, vec, n, MAX_RW_COUNT)[0])
        iov, total = _iovec(p, vec, n)
        data = _read(self, p, f, total)
        scatter(p, iov, data)
        return len(data)

    def sys_writev(self, p, fd, vec, n):
        if _whole_writes(p.fds.get(fd)):
            return _write_all(self, p, fd, _iovec(p, vec, n, MAX_RW_COUNT)[0])
        iov, _total = _iovec(p, vec, n)
        return _write(self, p, os.write, fd, b"".join(p.read(base, length) for base, length in iov))

    def sys_sendfile(self, p, out_fd, in_fd, offset, count):
        fi, fo = p.fds.get(in_fd), p.fds.get(out_fd)
        count = min(count, IO_MAX)
        if offset:
            off = p.read_u64s(offset, 1)[0]
            data = host_call(os.pread, fi.host_fd, count, off)
            p.write(offset, struct.pack("<Q", off + len(data)))
        else:
            data = _read(self, p, fi, count)            # a pipe's wait gives way to signals (SIGKILL too)
        return _write(self, p, os.write, fo and out_fd, data) if data else 0

    def sys_splice(self, p, fd_in, off_in, fd_out, off_out, length, flags):
        """Between the guest's own descriptors (one a pipe), by the host's splice on the kernel's descriptors;
        a wait for data or room gives way to signals."""
        fi, fo = p.fds.get(fd_in), p.fds.get(fd_out)
        if flags & ~0xF:
            raise Errno(errno.EINVAL)
        pos_in = p.read_u64s(off_in, 1)[0] if off_in else None
        pos_out = p.read_u64s(off_out, 1)[0] if off_out else None
        if any(v is not None and v >= 1 << 63 for v in (pos_in, pos_out)):
            raise Errno(errno.EINVAL)
        wait = not flags & 2 and (_may_block(fi) or _may_block(fo))
        while True:
            try:
                n = os.splice(fi.host_fd, fo.host_fd, min(length, MAX_RW_COUNT), pos_in, pos_out, flags | 2)
                break
            except BlockingIOError:
                if not wait:
                    raise Errno(errno.EAGAIN) from None
            except BrokenPipeError:
                self._raise_sigpipe(p)
                raise Errno(errno.EPIPE) from None
            except (OSError, OverflowError, ValueError) as e:
                raise Errno(getattr(e, "errno", None) or errno.EINVAL) from None
            poller = select.poll()                          # whichever end is not ready yet
            poller.register(fi.host_fd, select.POLLIN)
            poller.register(fo.host_fd, select.POLLOUT)
            ready = dict(poller.poll(0))
            if ready.get(fi.host_fd, 0) & select.POLLIN:
                self._wait_readable(p, fo.host_fd, select.POLLOUT)
            else:
                self._wait_readable(p, fi.host_fd)
        if off_in:
            p.write(off_in, struct.pack("<Q", pos_in + n))
        if off_out:
            p.write(off_out, struct.pack("<Q", pos_out + n))
        return n

    def sys_tee(self, p, fd_in, fd_out, length, flags):
        """Duplicate pipe data between the guest's own pipes (the host's tee on the kernel's descriptors)."""
        fi, fo = p.fds.get(fd_in), p.fds.get(fd_out)
        if flags & ~0xF:
            raise Errno(errno.EINVAL)
        while True:
            try:
                return hostfd.tee(fi.host_fd, fo.host_fd, min(length, MAX_RW_COUNT), flags | 2)
            except BlockingIOError:
                if flags & 2 or not (_may_block(fi) or _may_block(fo)):
                    raise Errno(errno.EAGAIN) from None
            except OSError as e:
                raise Errno(e.errno or errno.EINVAL) from None
            poller = select.poll()
            poller.register(fi.host_fd, select.POLLIN)
            if dict(poller.poll(0)).get(fi.host_fd, 0) & select.POLLIN:
                self._wait_readable(p, fo.host_fd, select.POLLOUT)
            else:
                self._wait_readable(p, fi.host_fd)

    def sys_vmsplice(self, p, fd, vec, n, flags):
        """Guest memory into a pipe (or out of one): copied, as vmsplice without SPLICE_F_GIFT may do."""
        f = p.fds.get(fd)
        if flags & ~0xF:
            raise Errno(errno.EINVAL)
        if f.flags & 3 == os.O_RDONLY:
            return self.sys_readv(p, fd, vec, n)
        return self.sys_writev(p, fd, vec, n)

    def sys_lseek(self, p, fd, offset, whence):
        f = p.fds.get(fd)
        if offset >= 1 << 63:
            offset -= 1 << 64
        pos = host_call(os.lseek, f.host_fd, offset, whence)
        if f.dir_entries is not None and pos == 0:
            f.dir_pos = 0
            if f.list_dir is not None:
                f.dir_entries = None                    # rewinddir on /proc reads it anew
        return pos

    def sys_dup(self, p, fd):
        return p.fds.install(p.fds.get(fd))

    def sys_dup3(self, p, fd, newfd, flags):
        if flags & ~os.O_CLOEXEC or fd == newfd:
            raise Errno(errno.EINVAL)
        f = p.fds.get(fd)
        return p.fds.install(f, cloexec=flags & os.O_CLOEXEC, at=newfd)

    def sys_dup2(self, p, fd, newfd):
        f = p.fds.get(fd)
        if fd == newfd:
            return newfd
        return p.fds.install(f, at=newfd)

    def sys_pipe2(self, p, fds, flags):
        if flags & ~(os.O_CLOEXEC | os.O_NONBLOCK | os.O_DIRECT):
            raise Errno(errno.EINVAL)
        r, w = os.pipe2((flags & (os.O_NONBLOCK | os.O_DIRECT)) | os.O_CLOEXEC)
        try:
            a = p.fds.install(OpenFile(r, "pipe:[%d]" % os.fstat(r).st_ino, os.O_RDONLY), cloexec=flags & os.O_CLOEXEC)
        except Errno:
            os.close(r)
            os.close(w)
            raise
        try:
            b = p.fds.install(OpenFile(w, "pipe:[%d]" % os.fstat(w).st_ino, os.O_WRONLY), cloexec=flags & os.O_CLOEXEC)
        except Errno:
            os.close(w)
            p.fds.close(a)
            raise
        try:
            p.write(fds, struct.pack("<ii", a, b))
        except Errno:
            p.fds.close(a)
            p.fds.close(b)
            raise
        return 0

    def sys_pipe(self, p, fds):
        return self.sys_pipe2(p, fds, 0)

    def sys_fcntl(self, p, fd, cmd, arg):
        f = p.fds.get(fd)
        if cmd in (0, 1030):                                     # F_DUPFD, F_DUPFD_CLOEXEC
            if arg & 0xFFFFFFFF >= p.fds.limit:
                raise Errno(errno.EINVAL)
            return p.fds.install(f, cloexec=cmd == 1030, lowest=arg & 0xFFFFFFFF)
        if cmd == 1:                                             # F_GETFD
            return 1 if p.fds.cloexec(fd) else 0
        if cmd == 2:                                             # F_SETFD
            p.fds.set_cloexec(fd, arg & 1)
            return 0
        if cmd == 3:                                             # F_GETFL
            return (host_call(fcntl.fcntl, f.host_fd, fcntl.F_GETFL) & ~os.O_CLOEXEC) | O_LARGEFILE
        if cmd == 4:                                             # F_SETFL
            settable = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME
            cur = host_call(fcntl.fcntl, f.host_fd, fcntl.F_GETFL)
            return host_call(fcntl.fcntl, f.host_fd, fcntl.F_SETFL, (cur & ~settable) | (arg & settable)) and 0
        if cmd in (5, 6, 7, 36, 37, 38):                         # F_GETLK, F_SETLK(W), F_OFD_*
            return _record_lock(self, p, f, cmd, arg)
        if cmd in (F_ADD_SEALS, F_GET_SEALS):
            return host_call(fcntl.fcntl, f.host_fd, cmd, arg & 0xFFFFFFFF)
        if cmd in (1032, 1031):                                  # F_GETPIPE_SZ, F_SETPIPE_SZ
            return host_call(fcntl.fcntl, f.host_fd, cmd, arg & 0xFFFFFFFF)
        raise Errno(errno.EINVAL)

    def sys_ioctl(self, p, fd, cmd, arg):
        f = p.fds.get(fd)
        cmd &= 0xFFFFFFFF
        if cmd in (0x5451, 0x5450):                              # FIOCLEX, FIONCLEX
            p.fds.set_cloexec(fd, cmd == 0x5451)
            return 0
        if cmd in _IOCTL_OUT:
            out = host_call(fcntl.ioctl, f.host_fd, cmd, bytes(_IOCTL_OUT[cmd]))
            p.write(arg, out)
            return 0
        if cmd in _IOCTL_IN:
            size = _IOCTL_IN[cmd]
            host_call(fcntl.ioctl, f.host_fd, cmd, p.read(arg, size) if size else arg & 0xFFFFFFFF)
            return 0
        if cmd == 0x5441:                                        # TIOCGPTPEER: the slave of a guest's pty
            slave = host_call(fcntl.ioctl, f.host_fd, cmd, (arg & 0xFFFFFFFF) | os.O_NOCTTY | os.O_CLOEXEC)
            n = struct.unpack("<I", host_call(fcntl.ioctl, f.host_fd, 0x80045430, bytes(4)))[0]
            try:
                return p.fds.install(OpenFile(slave, "/dev/pts/%d" % n, arg & 0xFFFFFFFF), cloexec=arg & os.O_CLOEXEC)
            except Errno:
                os.close(slave)
                raise
        if cmd in (0x540E, 0x5422):                              # TIOCSCTTY, TIOCNOTTY: the kernel keeps no
            if not os.isatty(f.host_fd):                         # controlling terminals; accepted
                raise Errno(errno.ENOTTY)
            return 0
        if cmd == 0x5429:                                        # TIOCGSID
            if not os.isatty(f.host_fd):
                raise Errno(errno.ENOTTY)
            p.write(arg, struct.pack("<i", p.sid))
            return 0
        if cmd == 0x5410:                                        # TIOCSPGRP: the terminal's foreground group
            if not os.isatty(f.host_fd):
                raise Errno(errno.ENOTTY)
            (pgrp,) = struct.unpack("<i", p.read(arg, 4))
            if pgrp <= 0:
                raise Errno(errno.EINVAL)
            self.tty_pgrp[os.fstat(f.host_fd).st_rdev] = pgrp
            return 0
        if cmd == 0x5421:                                        # FIONBIO
            on = struct.unpack("<i", p.read(arg, 4))[0]
            cur = host_call(fcntl.fcntl, f.host_fd, fcntl.F_GETFL)
            host_call(fcntl.fcntl, f.host_fd, fcntl.F_SETFL, cur | os.O_NONBLOCK if on else cur & ~os.O_NONBLOCK)
            return 0
        if cmd == 0x540F:                                        # TIOCGPGRP: what TIOCSPGRP set, else the caller's
            if not os.isatty(f.host_fd):
                raise Errno(errno.ENOTTY)
            p.write(arg, struct.pack("<i", self.tty_pgrp.get(os.fstat(f.host_fd).st_rdev, p.pgid)))
            return 0
        raise Errno(errno.ENOTTY)
