"""Sandbox handlers: files and descriptors. Methods of Sandbox (self), p is the calling Process."""
import errno
import fcntl
import os
import select
import stat
import struct
import time

from .. import _core
from .files import AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, Errno, OpenFile, timeout_ms

IO_MAX = 1 << 20
AT_REMOVEDIR = 0x200
O_LARGEFILE = 0o100000
_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_ALWAYS_OPEN = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_DT = ((stat.S_ISDIR, 4), (stat.S_ISREG, 8), (stat.S_ISLNK, 10), (stat.S_ISCHR, 2), (stat.S_ISBLK, 6),
       (stat.S_ISFIFO, 1), (stat.S_ISSOCK, 12))


def _host(call, *args, **kw):
    try:
        return call(*args, **kw)
    except OSError as e:
        raise Errno(e.errno or errno.EIO) from None


# -- reading and writing ------------------------------------------------------------------------

def _may_block(f):
    """Whether a read or write could wait (then the wait must give way to signals)."""
    try:
        return not stat.S_ISREG(os.fstat(f.host_fd).st_mode) and os.get_blocking(f.host_fd)
    except OSError:
        return False


def _read(self, p, f, n):
    if _may_block(f):
        self._wait_readable(p, f.host_fd)         # a signal may cut the wait short (Interrupted)
    return _host(os.read, f.host_fd, n)


def sys_read(self, p, fd, buf, count):
    f = p.fds.get(fd)
    data = _read(self, p, f, min(count, IO_MAX))
    p.write(buf, data)
    return len(data)


def _write(self, p, call, fd, data, *extra):
    f = p.fds.get(fd)
    if _may_block(f):
        self._wait_readable(p, f.host_fd, select.POLLOUT)
    try:
        return call(f.host_fd, data, *extra)
    except BrokenPipeError:
        self._raise_sigpipe(p)
        raise Errno(errno.EPIPE) from None
    except OSError as e:
        raise Errno(e.errno or errno.EIO) from None


def sys_write(self, p, fd, buf, count):
    p.fds.get(fd)
    return _write(self, p, os.write, fd, p.read(buf, min(count, IO_MAX)))


def sys_pread64(self, p, fd, buf, count, pos):
    f = p.fds.get(fd)
    if pos >= 1 << 63:
        raise Errno(errno.EINVAL)
    data = _host(os.pread, f.host_fd, min(count, IO_MAX), pos)
    p.write(buf, data)
    return len(data)


def sys_pwrite64(self, p, fd, buf, count, pos):
    p.fds.get(fd)
    if pos >= 1 << 63:
        raise Errno(errno.EINVAL)
    return _write(self, p, os.pwrite, fd, p.read(buf, min(count, IO_MAX)), pos)


def _iovec(p, vec, n):
    if n > 1024:
        raise Errno(errno.EINVAL)
    words = p.read_u64s(vec, 2 * n) if n else ()
    out, total = [], 0
    for i in range(n):
        base, length = words[2 * i], words[2 * i + 1]
        if length >= 1 << 63:
            raise Errno(errno.EINVAL)
        length = min(length, IO_MAX - total)
        out.append((base, length))
        total += length
    return out, total


def sys_readv(self, p, fd, vec, n):
    f = p.fds.get(fd)
    iov, total = _iovec(p, vec, n)
    data = _read(self, p, f, total)
    done = 0
    for base, length in iov:
        if done >= len(data):
            break
        p.write(base, data[done:done + length])
        done += length
    return len(data)


def sys_writev(self, p, fd, vec, n):
    p.fds.get(fd)
    iov, _total = _iovec(p, vec, n)
    return _write(self, p, os.write, fd, b"".join(p.read(base, length) for base, length in iov))


def sys_sendfile(self, p, out_fd, in_fd, offset, count):
    fi, fo = p.fds.get(in_fd), p.fds.get(out_fd)
    count = min(count, IO_MAX)
    if offset:
        off = p.read_u64s(offset, 1)[0]
        data = _host(os.pread, fi.host_fd, count, off)
        p.write(offset, struct.pack("<Q", off + len(data)))
    else:
        data = _host(os.read, fi.host_fd, count)
    return _write(self, p, os.write, fo and out_fd, data) if data else 0


def sys_lseek(self, p, fd, offset, whence):
    f = p.fds.get(fd)
    if offset >= 1 << 63:
        offset -= 1 << 64
    pos = _host(os.lseek, f.host_fd, offset, whence)
    if f.dir_entries is not None and pos == 0:
        f.dir_pos = 0
    return pos


# -- opening and closing ------------------------------------------------------------------------

def sys_openat(self, p, dirfd, path, flags, mode):
    flags &= 0xFFFFFFFF
    guest = self._abs(p, dirfd, path)
    if guest in _ALWAYS_OPEN:
        host = _host(os.open, guest, (flags & ~os.O_CREAT) | os.O_CLOEXEC)
    else:
        host = self.policy.open(guest, flags & ~O_LARGEFILE, mode & ~p.umask & 0o7777)
    try:
        return p.fds.install(OpenFile(host, guest.rstrip("/") or "/", flags | O_LARGEFILE), cloexec=flags & os.O_CLOEXEC)
    except Errno:
        os.close(host)
        raise


def sys_open(self, p, path, flags, mode):
    return sys_openat(self, p, AT_FDCWD, path, flags, mode)


def sys_creat(self, p, path, mode):
    return sys_openat(self, p, AT_FDCWD, path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)


def sys_close(self, p, fd):
    p.fds.close(fd)
    return 0


def sys_close_range(self, p, first, last, flags):
    if flags & ~0x4 or first > last:
        raise Errno(errno.EINVAL)
    for fd in [fd for fd in p.fds.fds if first <= fd <= last]:
        if flags & 0x4:
            p.fds.set_cloexec(fd, True)
        else:
            p.fds.close(fd)
    return 0


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
    return sys_pipe2(self, p, fds, 0)


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
        return (_host(fcntl.fcntl, f.host_fd, fcntl.F_GETFL) & ~os.O_CLOEXEC) | O_LARGEFILE
    if cmd == 4:                                             # F_SETFL
        settable = os.O_APPEND | os.O_NONBLOCK | os.O_ASYNC | os.O_DIRECT | os.O_NOATIME
        cur = _host(fcntl.fcntl, f.host_fd, fcntl.F_GETFL)
        return _host(fcntl.fcntl, f.host_fd, fcntl.F_SETFL, (cur & ~settable) | (arg & settable)) and 0
    if cmd in (6, 7, 37, 38):                                # F_SETLK(W), F_OFD_SETLK(W): no other process
        return 0
    if cmd in (5, 36):                                       # F_GETLK: nothing is locked by anyone else
        lock = bytearray(p.read(arg, 32))
        lock[0:2] = struct.pack("<h", fcntl.F_UNLCK)
        p.write(arg, bytes(lock))
        return 0
    if cmd in (1032, 1031):                                  # F_GETPIPE_SZ, F_SETPIPE_SZ
        return _host(fcntl.fcntl, f.host_fd, cmd, arg & 0xFFFFFFFF)
    raise Errno(errno.EINVAL)


# -- terminals and polling ------------------------------------------------------------------------

_IOCTL_OUT = {0x5401: 36, 0x5413: 8, 0x541B: 4}              # TCGETS, TIOCGWINSZ, FIONREAD
_IOCTL_IN = {0x5402: 36, 0x5403: 36, 0x5404: 36}             # TCSETS, TCSETSW, TCSETSF


def sys_ioctl(self, p, fd, cmd, arg):
    f = p.fds.get(fd)
    cmd &= 0xFFFFFFFF
    if cmd in (0x5451, 0x5450):                              # FIOCLEX, FIONCLEX
        p.fds.set_cloexec(fd, cmd == 0x5451)
        return 0
    if cmd in _IOCTL_OUT:
        out = _host(fcntl.ioctl, f.host_fd, cmd, bytes(_IOCTL_OUT[cmd]))
        p.write(arg, out)
        return 0
    if cmd in _IOCTL_IN:
        _host(fcntl.ioctl, f.host_fd, cmd, p.read(arg, _IOCTL_IN[cmd]))
        return 0
    if cmd == 0x5421:                                        # FIONBIO
        on = struct.unpack("<i", p.read(arg, 4))[0]
        cur = _host(fcntl.fcntl, f.host_fd, fcntl.F_GETFL)
        _host(fcntl.fcntl, f.host_fd, fcntl.F_SETFL, cur | os.O_NONBLOCK if on else cur & ~os.O_NONBLOCK)
        return 0
    if cmd == 0x540F:                                        # TIOCGPGRP: the guest is its own group
        if not os.isatty(f.host_fd):
            raise Errno(errno.ENOTTY)
        p.write(arg, struct.pack("<i", p.pid))
        return 0
    raise Errno(errno.ENOTTY)


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


def sys_poll(self, p, fds, nfds, timeout):
    timeout &= 0xFFFFFFFF
    timeout = timeout - (1 << 32) if timeout >= 1 << 31 else timeout
    return _poll(self, p, fds, nfds, None if timeout < 0 else timeout)


def sys_ppoll(self, p, fds, nfds, tsp, sigmask, sigsetsize):
    return _poll(self, p, fds, nfds, timeout_ms(p, tsp, 10 ** 9))


# -- metadata ---------------------------------------------------------------------------------------

def sys_fstat(self, p, fd, buf):
    f = p.fds.get(fd)
    p.write(buf, _host(_core.fstatat_raw, f.host_fd, b"", AT_EMPTY_PATH))
    return 0


def sys_newfstatat(self, p, dirfd, path, buf, flags):
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x800):
        raise Errno(errno.EINVAL)
    pfd = self._path_fd(p, dirfd, path, flags)
    try:
        p.write(buf, _host(_core.fstatat_raw, pfd, b"", AT_EMPTY_PATH))
    finally:
        os.close(pfd)
    return 0


def sys_stat(self, p, path, buf):
    return sys_newfstatat(self, p, AT_FDCWD, path, buf, 0)


def sys_lstat(self, p, path, buf):
    return sys_newfstatat(self, p, AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW)


def sys_statx(self, p, dirfd, path, flags, mask, buf):
    if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x800 | 0x6000):
        raise Errno(errno.EINVAL)
    pfd = self._path_fd(p, dirfd, path, flags)
    try:
        p.write(buf, _host(_core.statx_raw, pfd, b"", AT_EMPTY_PATH | (flags & 0x6000), mask & 0xFFFFFFFF))
    finally:
        os.close(pfd)
    return 0


def sys_fstatfs(self, p, fd, buf):
    p.write(buf, _host(_core.fstatfs_raw, p.fds.get(fd).host_fd))
    return 0


def sys_statfs(self, p, path, buf):
    pfd = self._path_fd(p, AT_FDCWD, path)
    try:
        p.write(buf, _host(_core.fstatfs_raw, pfd))
    finally:
        os.close(pfd)
    return 0


def sys_faccessat2(self, p, dirfd, path, mode, flags):
    if mode & ~7 or flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x200):
        raise Errno(errno.EINVAL)
    guest = None if path == "" else self._abs(p, dirfd, path)
    if guest in _ALWAYS_OPEN:
        return 0
    pfd = self._path_fd(p, dirfd, path, flags)
    try:
        if mode & os.W_OK:
            self._writable_fd(pfd)
        if mode and not os.access("/proc/self/fd/%d" % pfd, mode):
            raise Errno(errno.EACCES)
    finally:
        os.close(pfd)
    return 0


def sys_faccessat(self, p, dirfd, path, mode):
    return sys_faccessat2(self, p, dirfd, path, mode, 0)


def sys_access(self, p, path, mode):
    return sys_faccessat2(self, p, AT_FDCWD, path, mode, 0)


def sys_readlinkat(self, p, dirfd, path, buf, size):
    if size & 0xFFFFFFFF == 0 or size >= 1 << 31:
        raise Errno(errno.EINVAL)
    guest = self._abs(p, dirfd, path) if path else None
    if guest in ("/proc/self/exe", "/proc/%d/exe" % p.pid):
        target = p.exe
    elif guest and guest.startswith("/proc/self/fd/"):
        try:
            target = p.fds.get(int(guest[14:])).path
        except ValueError:
            raise Errno(errno.ENOENT) from None
    else:
        pfd = self._path_fd(p, dirfd, path, AT_SYMLINK_NOFOLLOW)
        try:
            target = _host(os.readlink, "", dir_fd=pfd)
        finally:
            os.close(pfd)
    data = target.encode("utf-8", "surrogateescape")[:size]
    p.write(buf, data)
    return len(data)


def sys_readlink(self, p, path, buf, size):
    return sys_readlinkat(self, p, AT_FDCWD, path, buf, size)


def sys_getdents64(self, p, fd, dirp, count):
    f = p.fds.get(fd)
    if f.dir_entries is None:
        if not f.is_dir():
            raise Errno(errno.ENOTDIR)
        entries = [(".", os.fstat(f.host_fd).st_ino, 4), ("..", _host(os.stat, "..", dir_fd=f.host_fd).st_ino, 4)]
        with os.scandir(f.host_fd) as it:
            for e in it:
                try:
                    mode = e.stat(follow_symlinks=False).st_mode
                    dtype = next((t for test, t in _DT if test(mode)), 0)
                except OSError:
                    dtype = 0
                entries.append((e.name, e.inode(), dtype))
        f.dir_entries = entries
    out = bytearray()
    while f.dir_pos < len(f.dir_entries):
        name, ino, dtype = f.dir_entries[f.dir_pos]
        raw = name.encode("utf-8", "surrogateescape") + b"\0"
        reclen = (19 + len(raw) + 7) & ~7
        if len(out) + reclen > count:
            if not out:
                raise Errno(errno.EINVAL)
            break
        out += struct.pack("<QqHB", ino, f.dir_pos + 1, reclen, dtype) + raw + bytes(reclen - 19 - len(raw))
        f.dir_pos += 1
    p.write(dirp, bytes(out))
    return len(out)


def sys_getcwd(self, p, buf, size):
    data = p.cwd.encode("utf-8", "surrogateescape") + b"\0"
    if len(data) > size:
        raise Errno(errno.ERANGE)
    p.write(buf, data)
    return len(data)


def sys_chdir(self, p, path):
    pfd = self.policy.path_fd(self._abs(p, AT_FDCWD, path), directory=True)
    try:
        p.cwd = self._guest_path_of(pfd)
    finally:
        os.close(pfd)
    return 0


def sys_fchdir(self, p, fd):
    f = p.fds.get(fd)
    if not f.is_dir():
        raise Errno(errno.ENOTDIR)
    p.cwd = self._guest_path_of(f.host_fd)
    return 0


# -- changing the tree (only below writable paths) ------------------------------------------------

def _in_parent(self, p, dirfd, path, call, *args, **kw):
    parent, name = self.policy.parent_for_write(self._abs(p, dirfd, path))
    try:
        return _host(call, name, *args, dir_fd=parent, **kw)
    finally:
        os.close(parent)


def sys_mkdirat(self, p, dirfd, path, mode):
    _in_parent(self, p, dirfd, path, os.mkdir, mode & ~p.umask & 0o7777)
    return 0


def sys_mkdir(self, p, path, mode):
    return sys_mkdirat(self, p, AT_FDCWD, path, mode)


def sys_unlinkat(self, p, dirfd, path, flags):
    if flags & ~AT_REMOVEDIR:
        raise Errno(errno.EINVAL)
    _in_parent(self, p, dirfd, path, os.rmdir if flags & AT_REMOVEDIR else os.unlink)
    return 0


def sys_unlink(self, p, path):
    return sys_unlinkat(self, p, AT_FDCWD, path, 0)


def sys_rmdir(self, p, path):
    return sys_unlinkat(self, p, AT_FDCWD, path, AT_REMOVEDIR)


def sys_renameat2(self, p, olddirfd, old, newdirfd, new, flags):
    if flags:
        raise Errno(errno.EINVAL)
    po, no = self.policy.parent_for_write(self._abs(p, olddirfd, old))
    try:
        pn, nn = self.policy.parent_for_write(self._abs(p, newdirfd, new))
        try:
            _host(os.rename, no, nn, src_dir_fd=po, dst_dir_fd=pn)
        finally:
            os.close(pn)
    finally:
        os.close(po)
    return 0


def sys_renameat(self, p, olddirfd, old, newdirfd, new):
    return sys_renameat2(self, p, olddirfd, old, newdirfd, new, 0)


def sys_rename(self, p, old, new):
    return sys_renameat2(self, p, AT_FDCWD, old, AT_FDCWD, new, 0)


def sys_symlinkat(self, p, target, newdirfd, linkpath):
    if target is None:
        raise Errno(errno.EFAULT)
    _in_parent(self, p, newdirfd, linkpath, lambda name, dir_fd: os.symlink(target, name, dir_fd=dir_fd))
    return 0


def sys_symlink(self, p, target, linkpath):
    return sys_symlinkat(self, p, target, AT_FDCWD, linkpath)


def _checked_path_fd(self, p, dirfd, path, flags=0):
    pfd = self._path_fd(p, dirfd, path, flags)
    try:
        self._writable_fd(pfd)
    except Errno:
        os.close(pfd)
        raise
    return pfd


def sys_fchmodat(self, p, dirfd, path, mode):
    pfd = _checked_path_fd(self, p, dirfd, path)
    try:
        _host(os.chmod, "/proc/self/fd/%d" % pfd, mode & 0o7777)
    finally:
        os.close(pfd)
    return 0


def sys_chmod(self, p, path, mode):
    return sys_fchmodat(self, p, AT_FDCWD, path, mode)


def sys_fchmod(self, p, fd, mode):
    f = p.fds.get(fd)
    self._writable_fd(f.host_fd)
    _host(os.fchmod, f.host_fd, mode & 0o7777)
    return 0


def sys_utimensat(self, p, dirfd, path, times, flags):
    if path is None:
        pfd = os.dup(p.fds.get(dirfd).host_fd)
        self._writable_fd(pfd)
    else:
        pfd = _checked_path_fd(self, p, dirfd, path, flags & AT_SYMLINK_NOFOLLOW)
    try:
        target = "/proc/self/fd/%d" % pfd
        if times == 0:
            _host(os.utime, target)
            return 0
        a_s, a_ns, m_s, m_ns = struct.unpack("<qqqq", p.read(times, 32))
        st = _host(os.stat, target)
        now = time.time_ns()

        def pick(sec, nsec, old):
            if nsec == _UTIME_NOW:
                return now
            if nsec == _UTIME_OMIT:
                return old
            if not 0 <= nsec < 10 ** 9:
                raise Errno(errno.EINVAL)
            return sec * 10 ** 9 + nsec
        _host(os.utime, target, ns=(pick(a_s, a_ns, st.st_atime_ns), pick(m_s, m_ns, st.st_mtime_ns)))
    finally:
        os.close(pfd)
    return 0


def sys_ftruncate(self, p, fd, length):
    _host(os.ftruncate, p.fds.get(fd).host_fd, length)
    return 0


def sys_truncate(self, p, path, length):
    fd = self.policy.open(self._abs(p, AT_FDCWD, path), os.O_WRONLY, 0)
    try:
        _host(os.ftruncate, fd, length)
    finally:
        os.close(fd)
    return 0


def sys_fsync(self, p, fd):
    _host(os.fsync, p.fds.get(fd).host_fd)
    return 0


def sys_fdatasync(self, p, fd):
    _host(os.fdatasync, p.fds.get(fd).host_fd)
    return 0


def sys_fadvise64(self, p, fd, offset, length, advice):
    p.fds.get(fd)
    return 0


def sys_flock(self, p, fd, op):
    p.fds.get(fd)
    return 0


def sys_sync(self, p):
    return 0


def sys_umask(self, p, mask):
    old, p.umask = p.umask, mask & 0o777
    return old


def sys_socket(self, p, family, type_, protocol):
    if not self.policy.network:
        raise Errno(errno.EACCES)
    raise Errno(errno.EAFNOSUPPORT)


# -- extended attributes: none are shown (the policy exposes file contents, not labels) ------------

def sys_getxattr(self, p, path, name, value, size):
    pfd = self._path_fd(p, AT_FDCWD, path)
    os.close(pfd)
    raise Errno(errno.ENODATA)


def sys_lgetxattr(self, p, path, name, value, size):
    pfd = self._path_fd(p, AT_FDCWD, path, AT_SYMLINK_NOFOLLOW)
    os.close(pfd)
    raise Errno(errno.ENODATA)


def sys_fgetxattr(self, p, fd, name, value, size):
    p.fds.get(fd)
    raise Errno(errno.ENODATA)


def sys_listxattr(self, p, path, lst, size):
    os.close(self._path_fd(p, AT_FDCWD, path))
    return 0


def sys_llistxattr(self, p, path, lst, size):
    os.close(self._path_fd(p, AT_FDCWD, path, AT_SYMLINK_NOFOLLOW))
    return 0


def sys_flistxattr(self, p, fd, lst, size):
    p.fds.get(fd)
    return 0
