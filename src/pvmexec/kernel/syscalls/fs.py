"""Handlers: the filesystem through the policy (open*, close*, stat family, access, readlink, getdents64,
cwd, mkdir/unlink/rename/symlink, chmod, utimensat, truncate, sync, flock, xattrs, umask)."""
import errno
import fcntl
import os
import stat
import struct
import time

from ... import _core
from ...abi import (AT_EMPTY_PATH, AT_FDCWD, AT_REMOVEDIR, AT_SYMLINK_FOLLOW, AT_SYMLINK_NOFOLLOW, MFD_ALLOW_SEALING,
                    MFD_CLOEXEC, O_LARGEFILE)
from ..errors import Errno, host_call
from ..files import OpenFile
from ..procfs import under_proc
from . import hostfd


_TIOCGPTN = 0x80045430
_OPEN_FLAGS = 0o37777777                         # VALID_OPEN_FLAGS: O_ACCMODE up to __O_TMPFILE
_MFD_FLAGS = MFD_CLOEXEC | MFD_ALLOW_SEALING | 0x4 | 0x8 | 0x10 | (0x3F << 26)   # HUGETLB, NOEXEC_SEAL, EXEC, sizes


_UTIME_NOW, _UTIME_OMIT = (1 << 30) - 1, (1 << 30) - 2
_ALWAYS_OPEN = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_DT = ((stat.S_ISDIR, 4), (stat.S_ISREG, 8), (stat.S_ISLNK, 10), (stat.S_ISCHR, 2), (stat.S_ISBLK, 6),
       (stat.S_ISFIFO, 1), (stat.S_ISSOCK, 12))


def _in_parent(self, p, dirfd, path, call, *args, **kw):
    parent, name = self.policy.parent_for_write(self._abs(p, dirfd, path))
    try:
        return host_call(call, name, *args, dir_fd=parent, **kw)
    finally:
        os.close(parent)


def _checked_path_fd(self, p, dirfd, path, flags=0):
    pfd = self._path_fd(p, dirfd, path, flags)
    try:
        self._writable_fd(pfd)
    except Errno:
        os.close(pfd)
        raise
    return pfd


class FsCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_openat(self, p, dirfd, path, flags, mode):
        flags &= _OPEN_FLAGS                            # Linux's open ignores bits it does not know
        f = self.open_file(p, self._abs(p, dirfd, path), flags, mode)
        try:
            return p.fds.install(f, cloexec=flags & os.O_CLOEXEC)
        except Errno:
            f.release()
            raise

    def open_file(self, p, guest, flags, mode):
        """The OpenFile that open(2) of an absolute guest path makes, not yet installed."""
        if guest in _ALWAYS_OPEN:
            f = OpenFile(host_call(os.open, guest, (flags & ~os.O_CREAT) | os.O_CLOEXEC), guest, flags)
        elif guest in ("/dev/ptmx", "/dev/pts/ptmx"):
            f = self._new_pty(flags)
        elif self._guest_pty(guest) is not None:
            n = self._guest_pty(guest)
            f = OpenFile(host_call(os.open, "/dev/pts/%d" % n, (flags & ~os.O_CREAT) | os.O_CLOEXEC | os.O_NOCTTY),
                         guest, flags)
        else:
            f = self._open_guest(p, guest, flags & ~O_LARGEFILE, mode & ~p.umask & 0o7777)
        f.flags = flags | O_LARGEFILE
        return f

    def _new_pty(self, flags):
        """A pseudo-terminal master: the host's, held by the kernel; its slave is reachable as /dev/pts/N
        (only the ptys guests made are: the host's terminals stay out of reach)."""
        host = host_call(os.open, "/dev/ptmx", (flags & ~os.O_CREAT) | os.O_CLOEXEC | os.O_NOCTTY)
        try:
            n = struct.unpack("<I", fcntl.ioctl(host, _TIOCGPTN, bytes(4)))[0]
        except OSError as e:
            os.close(host)
            raise Errno(e.errno or errno.EIO) from None
        self.ptys.add(n)
        f = OpenFile(host, "/dev/ptmx", flags)
        f.on_release = lambda: self.ptys.discard(n)     # the number may go to a host terminal next
        return f

    def _guest_pty(self, guest):
        """N for /dev/pts/N when a guest made that pty, else None."""
        if guest.startswith("/dev/pts/") and guest[9:].isdigit() and int(guest[9:]) in self.ptys:
            return int(guest[9:])
        return None

    def sys_open(self, p, path, flags, mode):
        return self.sys_openat(p, AT_FDCWD, path, flags, mode)

    def sys_creat(self, p, path, mode):
        return self.sys_openat(p, AT_FDCWD, path, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)

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

    def sys_fstat(self, p, fd, buf):
        f = p.fds.get(fd)
        p.write(buf, host_call(_core.fstatat_raw, f.host_fd, b"", AT_EMPTY_PATH))
        return 0

    def sys_newfstatat(self, p, dirfd, path, buf, flags):
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x800):
            raise Errno(errno.EINVAL)
        pfd = self._path_fd(p, dirfd, path, flags)
        try:
            p.write(buf, host_call(_core.fstatat_raw, pfd, b"", AT_EMPTY_PATH))
        finally:
            os.close(pfd)
        return 0

    def sys_stat(self, p, path, buf):
        return self.sys_newfstatat(p, AT_FDCWD, path, buf, 0)

    def sys_lstat(self, p, path, buf):
        return self.sys_newfstatat(p, AT_FDCWD, path, buf, AT_SYMLINK_NOFOLLOW)

    def sys_statx(self, p, dirfd, path, flags, mask, buf):
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH | 0x800 | 0x6000):
            raise Errno(errno.EINVAL)
        pfd = self._path_fd(p, dirfd, path, flags)
        try:
            p.write(buf, host_call(_core.statx_raw, pfd, b"", AT_EMPTY_PATH | (flags & 0x6000), mask & 0xFFFFFFFF))
        finally:
            os.close(pfd)
        return 0

    def sys_fstatfs(self, p, fd, buf):
        p.write(buf, host_call(_core.fstatfs_raw, p.fds.get(fd).host_fd))
        return 0

    def sys_statfs(self, p, path, buf):
        pfd = self._path_fd(p, AT_FDCWD, path)
        try:
            p.write(buf, host_call(_core.fstatfs_raw, pfd))
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
        return self.sys_faccessat2(p, dirfd, path, mode, 0)

    def sys_access(self, p, path, mode):
        return self.sys_faccessat2(p, AT_FDCWD, path, mode, 0)

    def sys_readlinkat(self, p, dirfd, path, buf, size):
        if size & 0xFFFFFFFF == 0 or size >= 1 << 31:
            raise Errno(errno.EINVAL)
        target = self._guest_readlink(p, self._abs(p, dirfd, path))
        data = target.encode("utf-8", "surrogateescape")[:size]
        p.write(buf, data)
        return len(data)

    def sys_readlink(self, p, path, buf, size):
        return self.sys_readlinkat(p, AT_FDCWD, path, buf, size)

    def sys_getdents64(self, p, fd, dirp, count):
        f = p.fds.get(fd)
        if f.dir_entries is None and f.list_dir is not None:
            try:
                f.dir_entries = f.list_dir()
            except Errno:
                f.dir_entries = []                      # the process it listed is gone
        if f.dir_entries is None:
            if not f.is_dir():
                raise Errno(errno.ENOTDIR)
            entries = [(".", os.fstat(f.host_fd).st_ino, 4), ("..", host_call(os.stat, "..", dir_fd=f.host_fd).st_ino, 4)]
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
        p.cwd = self._guest_dir(p, self._abs(p, AT_FDCWD, path))
        return 0

    def sys_fchdir(self, p, fd):
        f = p.fds.get(fd)
        if not f.is_dir():
            raise Errno(errno.ENOTDIR)
        p.cwd = f.path if under_proc(f.path) else self._guest_path_of(f.host_fd)
        return 0

    def sys_mkdirat(self, p, dirfd, path, mode):
        _in_parent(self, p, dirfd, path, os.mkdir, mode & ~p.umask & 0o7777)
        return 0

    def sys_mkdir(self, p, path, mode):
        return self.sys_mkdirat(p, AT_FDCWD, path, mode)

    def sys_unlinkat(self, p, dirfd, path, flags):
        if flags & ~AT_REMOVEDIR:
            raise Errno(errno.EINVAL)
        _in_parent(self, p, dirfd, path, os.rmdir if flags & AT_REMOVEDIR else os.unlink)
        return 0

    def sys_unlink(self, p, path):
        return self.sys_unlinkat(p, AT_FDCWD, path, 0)

    def sys_rmdir(self, p, path):
        return self.sys_unlinkat(p, AT_FDCWD, path, AT_REMOVEDIR)

    def sys_renameat2(self, p, olddirfd, old, newdirfd, new, flags):
        """Both directories must be writable: a file moved in from outside would become writable."""
        if flags & ~3:                                  # RENAME_NOREPLACE, RENAME_EXCHANGE (not WHITEOUT)
            raise Errno(errno.EINVAL)
        po, no = self.policy.parent_for_write(self._abs(p, olddirfd, old))
        try:
            pn, nn = self.policy.parent_for_write(self._abs(p, newdirfd, new))
            try:
                if flags:
                    host_call(hostfd.renameat2, po, no, pn, nn, flags)
                else:
                    host_call(os.rename, no, nn, src_dir_fd=po, dst_dir_fd=pn)
            finally:
                os.close(pn)
        finally:
            os.close(po)
        return 0

    def sys_renameat(self, p, olddirfd, old, newdirfd, new):
        return self.sys_renameat2(p, olddirfd, old, newdirfd, new, 0)

    def sys_rename(self, p, old, new):
        return self.sys_renameat2(p, AT_FDCWD, old, AT_FDCWD, new, 0)

    def sys_symlinkat(self, p, target, newdirfd, linkpath):
        if target is None:
            raise Errno(errno.EFAULT)
        self.policy.note_symlink(target)
        _in_parent(self, p, newdirfd, linkpath, lambda name, dir_fd: os.symlink(target, name, dir_fd=dir_fd))
        return 0

    def sys_symlink(self, p, target, linkpath):
        return self.sys_symlinkat(p, target, AT_FDCWD, linkpath)

    def sys_fchmodat(self, p, dirfd, path, mode):
        pfd = _checked_path_fd(self, p, dirfd, path)
        try:
            host_call(os.chmod, "/proc/self/fd/%d" % pfd, mode & 0o7777)
        finally:
            os.close(pfd)
        return 0

    def sys_chmod(self, p, path, mode):
        return self.sys_fchmodat(p, AT_FDCWD, path, mode)

    def sys_fchmod(self, p, fd, mode):
        f = p.fds.get(fd)
        self._writable_fd(f.host_fd)
        host_call(os.fchmod, f.host_fd, mode & 0o7777)
        return 0

    def sys_utimensat(self, p, dirfd, path, times, flags):
        if path is None:
            host = p.fds.get(dirfd).host_fd
            self._writable_fd(host)                     # before the dup: a refusal leaves nothing open
            pfd = os.dup(host)
        else:
            pfd = _checked_path_fd(self, p, dirfd, path, flags & AT_SYMLINK_NOFOLLOW)
        try:
            target = "/proc/self/fd/%d" % pfd
            if times == 0:
                host_call(os.utime, target)
                return 0
            a_s, a_ns, m_s, m_ns = struct.unpack("<qqqq", p.read(times, 32))
            st = host_call(os.stat, target)
            now = time.time_ns()

            def pick(sec, nsec, old):
                if nsec == _UTIME_NOW:
                    return now
                if nsec == _UTIME_OMIT:
                    return old
                if not 0 <= nsec < 10 ** 9:
                    raise Errno(errno.EINVAL)
                return sec * 10 ** 9 + nsec
            host_call(os.utime, target, ns=(pick(a_s, a_ns, st.st_atime_ns), pick(m_s, m_ns, st.st_mtime_ns)))
        finally:
            os.close(pfd)
        return 0

    def sys_ftruncate(self, p, fd, length):
        f = p.fds.get(fd)
        if length >= 1 << 63:
            raise Errno(errno.EINVAL)
        host_call(os.ftruncate, f.host_fd, length)
        return 0

    def sys_truncate(self, p, path, length):
        if length >= 1 << 63:
            raise Errno(errno.EINVAL)
        try:
            fd = self.policy.open(self._abs(p, AT_FDCWD, path), os.O_WRONLY, 0)
        except Errno as e:
            raise Errno(errno.EINVAL) if e.errno == errno.ENXIO else e      # a FIFO without a reader
        try:
            host_call(os.ftruncate, fd, length)
        finally:
            os.close(fd)
        return 0

    def sys_fsync(self, p, fd):
        host_call(os.fsync, p.fds.get(fd).host_fd)
        return 0

    def sys_fdatasync(self, p, fd):
        host_call(os.fdatasync, p.fds.get(fd).host_fd)
        return 0

    def sys_fadvise64(self, p, fd, offset, length, advice):
        p.fds.get(fd)
        return 0

    def sys_flock(self, p, fd, op):
        """A lock on the open file description, as Linux's: it excludes other guest processes and the
        host's holders alike (the kernel holds one host description per guest one)."""
        f = p.fds.get(fd)
        op &= 0xFFFFFFFF
        kind = op & ~fcntl.LOCK_NB
        if kind not in (fcntl.LOCK_SH, fcntl.LOCK_EX, fcntl.LOCK_UN):
            raise Errno(errno.EINVAL)
        while True:
            try:
                fcntl.flock(f.host_fd, kind | (fcntl.LOCK_NB if kind != fcntl.LOCK_UN else 0))
                return 0
            except BlockingIOError:
                if op & fcntl.LOCK_NB:
                    raise Errno(errno.EWOULDBLOCK) from None
            except OSError as e:
                raise Errno(e.errno or errno.EIO) from None
            self._sleep(p, 0.005)                       # a signal ends the wait (EINTR, or restarted)

    def sys_linkat(self, p, olddirfd, oldpath, newdirfd, newpath, flags):
        """Both names must be writable: a new name below a writable path would make the file writable."""
        if flags & ~(AT_SYMLINK_FOLLOW | AT_EMPTY_PATH):
            raise Errno(errno.EINVAL)
        lookup = (flags & AT_EMPTY_PATH) | (0 if flags & AT_SYMLINK_FOLLOW else AT_SYMLINK_NOFOLLOW)
        src = _checked_path_fd(self, p, olddirfd, oldpath, lookup)
        try:
            if stat.S_ISDIR(os.fstat(src).st_mode):
                raise Errno(errno.EPERM)
            _in_parent(self, p, newdirfd, newpath, lambda name, dir_fd: os.link(
                "/proc/self/fd/%d" % src, name, dst_dir_fd=dir_fd, follow_symlinks=True))
        finally:
            os.close(src)
        return 0

    def sys_link(self, p, oldpath, newpath):
        return self.sys_linkat(p, AT_FDCWD, oldpath, AT_FDCWD, newpath, 0)

    def sys_mknodat(self, p, dirfd, path, mode, dev):
        """FIFOs, sockets and regular files; devices are refused as for an unprivileged caller."""
        kind = mode & 0o170000
        if kind in (stat.S_IFCHR, stat.S_IFBLK):
            raise Errno(errno.EPERM)
        if kind not in (0, stat.S_IFREG, stat.S_IFIFO, stat.S_IFSOCK):
            raise Errno(errno.EINVAL)
        perm = mode & 0o7777 & ~p.umask
        _in_parent(self, p, dirfd, path, lambda name, dir_fd: os.mknod(name, (kind or stat.S_IFREG) | perm,
                                                                       dir_fd=dir_fd))
        return 0

    def sys_mknod(self, p, path, mode, dev):
        return self.sys_mknodat(p, AT_FDCWD, path, mode, dev)

    def _chown(self, p, pfd, user, group):
        """Where writes are allowed, ownership changes as an unprivileged caller's may: the owner stays, the
        group becomes one of the caller's (never a file handed to another user, or a set-id root binary)."""
        user, group = user & 0xFFFFFFFF, group & 0xFFFFFFFF
        st = host_call(os.stat, "/proc/self/fd/%d" % pfd)
        if user != 0xFFFFFFFF and user != st.st_uid:
            raise Errno(errno.EPERM)
        if group != 0xFFFFFFFF and group != st.st_gid and (
                st.st_uid != os.geteuid() or group not in (os.getegid(), *os.getgroups())):
            raise Errno(errno.EPERM)
        host_call(os.chown, "/proc/self/fd/%d" % pfd, -1, -1 if group == 0xFFFFFFFF else group)
        return 0

    def sys_fchownat(self, p, dirfd, path, user, group, flags):
        if flags & ~(AT_SYMLINK_NOFOLLOW | AT_EMPTY_PATH):
            raise Errno(errno.EINVAL)
        pfd = _checked_path_fd(self, p, dirfd, path, flags)
        try:
            return self._chown(p, pfd, user, group)
        finally:
            os.close(pfd)

    def sys_chown(self, p, path, user, group):
        return self.sys_fchownat(p, AT_FDCWD, path, user, group, 0)

    def sys_lchown(self, p, path, user, group):
        return self.sys_fchownat(p, AT_FDCWD, path, user, group, AT_SYMLINK_NOFOLLOW)

    def sys_fchown(self, p, fd, user, group):
        f = p.fds.get(fd)
        self._writable_fd(f.host_fd)
        return self._chown(p, f.host_fd, user, group)

    def sys_fallocate(self, p, fd, mode, offset, length):
        f = p.fds.get(fd)
        if mode & 0xFFFFFFFF:
            raise Errno(errno.EOPNOTSUPP)               # only the plain allocation is offered
        if offset >= 1 << 63 or length >= 1 << 63 or not length:
            raise Errno(errno.EINVAL)
        if f.flags & 3 == os.O_RDONLY:
            raise Errno(errno.EBADF)
        host_call(os.posix_fallocate, f.host_fd, offset, length)
        return 0

    def sys_copy_file_range(self, p, fd_in, off_in, fd_out, off_out, length, flags):
        fi, fo = p.fds.get(fd_in), p.fds.get(fd_out)
        if flags:
            raise Errno(errno.EINVAL)
        pos_in = p.read_u64s(off_in, 1)[0] if off_in else None
        pos_out = p.read_u64s(off_out, 1)[0] if off_out else None
        if any(v is not None and v >= 1 << 63 for v in (pos_in, pos_out)):
            raise Errno(errno.EINVAL)
        n = host_call(os.copy_file_range, fi.host_fd, fo.host_fd, min(length, 0x7FFFF000), pos_in, pos_out)
        if off_in:
            p.write(off_in, struct.pack("<Q", pos_in + n))
        if off_out:
            p.write(off_out, struct.pack("<Q", pos_out + n))
        return n

    def sys_syncfs(self, p, fd):
        p.fds.get(fd)
        os.sync()
        return 0

    def sys_memfd_create(self, p, name, flags):
        if name is None:
            raise Errno(errno.EFAULT)
        if flags & ~_MFD_FLAGS or len(name.encode("utf-8", "surrogateescape")) > 249:
            raise Errno(errno.EINVAL)
        host = host_call(os.memfd_create, name, (flags & ~MFD_CLOEXEC) | MFD_CLOEXEC)
        return p.fds.install_host(host, "/memfd:%s (deleted)" % name, os.O_RDWR | O_LARGEFILE,
                                  cloexec=flags & MFD_CLOEXEC)

    def sys_sync(self, p):
        return 0

    def sys_umask(self, p, mask):
        old, p.umask = p.umask, mask & 0o777
        return old

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

    # inotify instances are the host's: a watch is added on the file the guest's path reaches (through the
    # policy), and events name entries relative to it, never a host path.
    def sys_inotify_init1(self, p, flags):
        if flags & ~(os.O_NONBLOCK | os.O_CLOEXEC):
            raise Errno(errno.EINVAL)
        host = host_call(hostfd.inotify_init1, os.O_CLOEXEC | (flags & os.O_NONBLOCK))
        return p.fds.install_host(host, "anon_inode:inotify", os.O_RDONLY, cloexec=flags & os.O_CLOEXEC)

    def sys_inotify_init(self, p):
        return self.sys_inotify_init1(p, 0)

    def sys_inotify_add_watch(self, p, fd, path, mask):
        f = p.fds.get(fd)
        if f.path != "anon_inode:inotify":
            raise Errno(errno.EINVAL)
        mask &= 0xFFFFFFFF
        pfd = self._path_fd(p, AT_FDCWD, path, AT_SYMLINK_NOFOLLOW if mask & 0x02000000 else 0)   # IN_DONT_FOLLOW
        try:
            return host_call(hostfd.inotify_add_watch, f.host_fd, "/proc/self/fd/%d" % pfd, mask & ~0x02000000)
        finally:
            os.close(pfd)

    def sys_inotify_rm_watch(self, p, fd, wd):
        f = p.fds.get(fd)
        if f.path != "anon_inode:inotify":
            raise Errno(errno.EINVAL)
        return host_call(hostfd.inotify_rm_watch, f.host_fd, wd & 0xFFFFFFFF)
