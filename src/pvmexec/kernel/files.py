"""The guest's view of files: a path policy over the host's tree, and the kernel's own descriptor table.

Every host file the guest reaches is opened here, by the kernel, inside the
policy's root (openat2 with RESOLVE_IN_ROOT: `..` and symlinks cannot leave
it), and written only below a writable path. The guest never holds a host
descriptor: its descriptors are numbers in FdTable.
"""
from __future__ import annotations

from typing import Any, Sequence

import errno
import os
import posixpath
import shutil
import stat
import struct
import tempfile
import threading
from array import array

from .. import _core, _sigguard, janitor
from ..abi import O_ACCMODE, RESOLVE_BENEATH, RESOLVE_IN_ROOT, RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS
from .errors import Errno, host_call


MAX_LINKS = 40                                  # symlinks followed in one lookup, as Linux's MAXSYMLINKS
_WRITING = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_TRUNC
# Directories that are the sandbox's own, empty at the start and removed at the end (as gVisor's tmpfs
# mounts), unless the policy's writable paths share the host's.
PRIVATE = ("/dev/shm", "/tmp")
# Of those, the ones the host's shows through (read-only) where the guest made nothing of the name: a
# program or file in the host's /tmp is still found, while what the guest creates is its own.
LAYERED = ("/tmp",)
# /proc describes the host, not the guest: only these general files are shown.
PROC_VISIBLE = ("/proc/cpuinfo", "/proc/meminfo", "/proc/uptime", "/proc/version", "/proc/filesystems",
                "/proc/sys")
# Below those, what names host pids (the last pid given out, the pid ctrl-alt-del signals): never shown.
PROC_HIDDEN = ("/proc/sys/kernel/ns_last_pid", "/proc/sys/kernel/cad_pid")


def proc_visible(guest):
    """Whether a guest path below /proc is one of the host's general files, shown as it is."""
    return any(guest == v or guest.startswith(v + "/") for v in PROC_VISIBLE) and guest not in PROC_HIDDEN




def timeout_ms(p, addr, per_second):
    """A guest timeout {seconds, fraction in 1/per_second} at addr, as whole milliseconds rounded up;
    None for a NULL pointer (wait forever)."""
    if not addr:
        return None
    sec, frac = struct.unpack("<qq", p.read(addr, 16))
    if sec < 0 or not 0 <= frac < per_second:
        raise Errno(errno.EINVAL)
    return sec * 1000 + (frac * 1000 + per_second - 1) // per_second


def open_reached(path, flags, mode, wait):
    """os.open of /proc/self/fd/N (an O_PATH descriptor the policy checked). A named FIFO's open would block
    in the host until its other end opens, where no guest signal could end it: it is made without
    blocking and waited for through wait(pause), which raises to end the wait (a signal, a death).
    Without wait, it never blocks (ENXIO for a write end without a reader)."""
    if flags & (os.O_NONBLOCK | os.O_PATH) or flags & O_ACCMODE == os.O_RDWR or not _is_named_fifo(path):
        return host_call(os.open, path, flags, mode)
    if wait is None:
        return host_call(os.open, path, flags | os.O_NONBLOCK, mode)
    pause, fd = 0.001, None
    try:
        while True:
            if fd is None:                      # a reader's end counts while it waits, as Linux's does
                try:
                    fd = host_call(os.open, path, flags | os.O_NONBLOCK, mode)
                except Errno as e:
                    if e.errno != errno.ENXIO:  # (a write end while there is no reader)
                        raise
            if fd is not None and (flags & O_ACCMODE == os.O_WRONLY or _core.fifo_has_writer(fd)):
                os.set_blocking(fd, True)
                fd, opened = None, fd
                return opened
            wait(pause)
            pause = min(pause * 2, 0.02)
    finally:
        if fd is not None:
            os.close(fd)


def _is_named_fifo(path):
    """A FIFO in a filesystem: its open waits for the other end (a pipe's, through /proc/PID/fd, does not)."""
    try:
        return stat.S_ISFIFO(os.stat(path).st_mode) and not os.readlink(path).startswith("pipe:")
    except OSError as e:
        raise Errno(e.errno or errno.EIO) from None


class ThroughPseudoFs(Errno):
    """ENOENT for a path the host resolved into one of its pseudo-filesystems: the guest's own /proc
    may be what it names (procfs.walk finds out)."""

    def __init__(self):
        super().__init__(errno.ENOENT)


class Policy:
    """What the guest may reach of the host's files.

    root: the host directory that is the guest's `/`. writable: guest paths
    below which the guest may create, change and delete (nothing by default).
    network: whether the guest may create sockets.
    """

    root_fd = -1                        # until opened: close() and __del__ work on a half-built policy

    def __init__(self, root: str = "/", writable: Sequence[str] = (), network: bool = False) -> None:
        if not isinstance(root, str) or not root:
            raise ValueError("policy root must be a directory's path (a string), not %r" % (root,))
        if isinstance(writable, (str, bytes)) or not isinstance(writable, (list, tuple)):
            raise ValueError("policy writable must be a list of guest paths, not %r" % (writable,))
        for w in writable:
            if not isinstance(w, str) or not w.startswith("/"):
                raise ValueError("policy writable: %r is not an absolute guest path" % (w,))
        if not isinstance(network, bool):
            raise ValueError("policy network must be true or false, not %r" % (network,))
        self.root = os.path.realpath(root)
        if not os.path.isdir(self.root):
            raise ValueError("policy root %r is not a directory" % root)
        self.writable = tuple(posixpath.normpath(w) for w in writable)
        for w in self.writable:
            if not os.path.isdir(os.path.join(self.root, w.lstrip("/"))):
                raise ValueError("policy writable: %s is not a directory under the root %s" % (w, self.root))
        self.network = network
        self.root_fd = os.open(self.root, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)

    SCHEMA = {
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "pvmexec run policy",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "root": {"type": "string", "minLength": 1,
                     "description": "host directory the guest sees as / (default /)"},
            "writable": {"type": "array", "items": {"type": "string", "pattern": "^/"},
                         "description": "guest paths below which the guest may create, change and delete"},
            "network": {"type": "boolean", "description": "whether the guest may create sockets"},
        },
    }

    @classmethod
    def from_dict(cls, d: Any) -> Policy:
        """A policy from its JSON form (SCHEMA); ValueError naming the field that is wrong."""
        if not isinstance(d, dict):
            raise ValueError("a policy is a JSON object, not %s" % type(d).__name__)
        unknown = set(d) - {"root", "writable", "network"}
        if unknown:
            raise ValueError("unknown policy keys: %s" % ", ".join(sorted(map(str, unknown))))
        return cls(d.get("root", "/"), d.get("writable", ()), d.get("network", False))

    def close(self) -> None:
        if getattr(self, "root_fd", -1) >= 0:     # (a half-built policy has none)
            os.close(self.root_fd)
            self.root_fd = -1
        self.drop_private()

    __del__ = close

    def drop_private(self) -> None:
        """Remove the private directories (a run's /tmp and /dev/shm): the next run gets new ones."""
        for g, (host, fd) in getattr(self, "_private", {}).items():
            os.close(fd)
            shutil.rmtree(os.path.dirname(host), ignore_errors=True)
            janitor.unrecord(self._private_records.pop(g, None))
        self._private = {}

    # -- guest paths ---------------------------------------------------------------------------

    @staticmethod
    def _rel(guest_abs):
        rel = guest_abs.lstrip("/")
        return (rel or ".").encode("utf-8", "surrogateescape")

    def _private_dir(self, guest_abs):
        """The guest directory of PRIVATE that guest_abs lies in, unless the policy shares the host's."""
        for g in PRIVATE:
            if (guest_abs == g or guest_abs.startswith(g + "/")) and not any(
                    w == "/" or g == w or g.startswith(w + "/") for w in self.writable):
                return g
        return None

    def _base(self, guest_abs):
        """(directory descriptor, relative path, extra RESOLVE_ flags) that openat2 resolves guest_abs
        from: the root, or a private directory of the sandbox's own (its /dev/shm, its /tmp). In a private
        directory symlinks are not followed by the host (inside it, RESOLVE_IN_ROOT would take an absolute
        target to mean the directory): ELOOP there sends the lookup to resolve(), which follows them as
        the guest's kernel does."""
        g = self._private_dir(guest_abs)
        if g is None:
            return self.root_fd, self._rel(guest_abs), 0
        rel = guest_abs[len(g):].lstrip("/")
        # A name the guest never made in a layered directory is the host's, read-only (but never another
        # run's private directory).
        if g in LAYERED and rel and not rel.startswith(janitor.PRIVATE_DIR_PREFIX) and \
                not self._made_by_guest(g, rel.split("/", 1)[0]):
            return self.root_fd, self._rel(guest_abs), 0
        return self._private_fd(g), self._rel(rel or "/"), RESOLVE_NO_SYMLINKS

    def _made_by_guest(self, g, name):
        """Whether the guest has name in its own side of the layered directory g."""
        private = getattr(self, "_private", {}).get(g)
        if private is None:
            return False                             # not even made yet
        try:
            os.stat(name, dir_fd=private[1], follow_symlinks=False)
        except FileNotFoundError:
            return False
        except OSError:
            pass
        return True

    def _private_fd(self, g):
        if not hasattr(self, "_private"):
            self._private, self._private_records = {}, {}
        if g not in self._private:
            with _sigguard.deferred():               # made and recorded at once: a SIGKILL leaves nothing
                if g == "/dev/shm" and os.access("/dev/shm", os.W_OK):
                    where = "/dev/shm"
                else:
                    where = None                     # the host's temporary directory
                # The guest's directory (mode 1777, as its /tmp would be) inside one only we may enter.
                outer = tempfile.mkdtemp(prefix=janitor.PRIVATE_DIR_PREFIX, dir=where)
                st = os.stat(outer)
                self._private_records[g] = janitor.Records(os.getpid()).add("privatedir", st.st_dev, st.st_ino)
                made = os.path.join(outer, posixpath.basename(g))
                os.mkdir(made)
                os.chmod(made, 0o1777)
            self._private[g] = (made, os.open(made, os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        return self._private[g][1]

    def _visible(self, guest_abs):
        if guest_abs == "/proc" or guest_abs.startswith("/proc/"):
            if guest_abs != "/proc" and not proc_visible(guest_abs):
                raise Errno(errno.ENOENT)

    def _host_path(self, fd):
        return os.readlink("/proc/self/fd/%d" % fd)

    def _may_write(self, host_path):
        for host, _fd in getattr(self, "_private", {}).values():
            if host_path == host or host_path.startswith(host + "/"):
                return True
        for w in self.writable:
            prefix = os.path.join(self.root, w.lstrip("/")).rstrip("/")
            if host_path == prefix or host_path.startswith(prefix + "/"):
                return True
        return False

    def reached(self, fd):
        """fd, if what it opened is the guest's to see; else it is closed and the guest gets ENOENT.

        The path does not say where the host kernel went (symlinks into /proc are ordinary links, and
        RESOLVE_IN_ROOT follows them): the filesystem the descriptor landed on does.
        """
        try:
            ftype = struct.unpack_from("<q", _core.fstatfs_raw(fd))[0] & 0xFFFFFFFF
            if ftype not in PSEUDO_FS:
                return fd
            host = os.readlink("/proc/self/fd/%d" % fd)
        except OSError:
            os.close(fd)
            raise Errno(errno.ENOENT) from None
        guest = self.guest_path(host)
        if ftype == PROC_SUPER_MAGIC and guest is not None and proc_visible(guest):
            return fd
        os.close(fd)
        raise ThroughPseudoFs()

    _links_to_layered = False           # a guest made a symlink that may point into a layered directory

    def note_symlink(self, target):
        """A guest makes a symlink to target: once one may lead into a layered directory, lookups the host
        fails are followed link by link too (the host took such a link to its own side)."""
        if any(posixpath.basename(g) in target for g in LAYERED):
            self._links_to_layered = True

    @property
    def _layered_in_use(self):
        private = getattr(self, "_private", None)       # (every lookup asks: cheap while there is none)
        return bool(private) and any(g in private for g in LAYERED)

    def _shadowed(self, host):
        """Whether a host path reached lies below the host's side of a layered directory, under a name the
        guest has made its own there (a symlink from elsewhere resolved by the host took it to the host's)."""
        for g in LAYERED:
            if g not in self._private:
                continue
            lower = os.path.join(self.root, g.lstrip("/"))
            if host.startswith(lower + "/") and not host.startswith(self._private[g][0] + "/"):
                return self._made_by_guest(g, host[len(lower) + 1:].split("/", 1)[0])
        return False

    def on_pseudo_fs(self, fd):
        try:
            return struct.unpack_from("<q", _core.fstatfs_raw(fd))[0] & 0xFFFFFFFF in PSEUDO_FS
        except OSError:
            return True

    def raw_path_fd(self, guest_abs):
        """O_PATH|O_NOFOLLOW for one step of procfs.walk (OSError as the host says; the walk checks)."""
        dirfd, rel, extra = self._base(guest_abs)
        return _core.openat2(dirfd, rel, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, 0,
                             RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | extra)

    def _error(self, guest_abs, err):
        """The error for a path that failed: ThroughPseudoFs when its deepest reachable directory is in a host
        pseudo-filesystem (EACCES or ENOTDIR there would tell the guest what the host has), or a magic link
        stopped it."""
        if err == errno.ELOOP:
            return ThroughPseudoFs()
        head = guest_abs
        while head not in ("", "/"):
            head = posixpath.dirname(head.rstrip("/"))
            try:
                dirfd, rel, extra = self._base(head or "/")
                fd = _core.openat2(dirfd, rel, os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | extra)
            except OSError:
                continue
            try:
                return ThroughPseudoFs() if self.on_pseudo_fs(fd) else Errno(err)
            finally:
                os.close(fd)
        return Errno(err)

    def guest_path(self, host):
        """The guest's name for a host path below the root, or None."""
        for g, (made, _fd) in getattr(self, "_private", {}).items():
            if host == made or host.startswith(made + "/"):
                return g + host[len(made):]
        if self.root == "/":
            return host
        if host == self.root or host.startswith(self.root + "/"):
            return host[len(self.root):] or "/"
        return None

    def path_fd(self, guest_abs, follow=True, directory=False, _walked=False):
        """An O_PATH descriptor for a guest path (the caller closes it)."""
        self._visible(guest_abs)
        flags = os.O_PATH | os.O_CLOEXEC | (0 if follow else os.O_NOFOLLOW) | (os.O_DIRECTORY if directory else 0)
        dirfd, rel, extra = self._base(guest_abs)
        try:
            fd = _core.openat2(dirfd, rel, flags, 0, RESOLVE_IN_ROOT | RESOLVE_NO_MAGICLINKS | extra)
        except OSError as e:
            if not _walked and (e.errno == errno.ELOOP and extra or        # a symlink in a private directory
                                e.errno in (errno.ENOENT, errno.ENOTDIR) and self._links_to_layered):
                walked = self._followed(guest_abs, follow)   # (a guest's link from elsewhere into its own /tmp)
                if walked != posixpath.normpath(guest_abs) or e.errno == errno.ELOOP:
                    return self.path_fd(walked, follow, directory, True)
            raise self._error(guest_abs, e.errno) from None
        if self._layered_in_use and not _walked and self._shadowed(self._host_path(fd)):
            os.close(fd)            # the host's symlinks took it to the host's side, where the guest has its own
            return self.path_fd(self._followed(guest_abs, follow), follow, directory, True)
        return self.reached(fd)

    def _followed(self, guest_abs, follow):
        """guest_abs with its symlinks followed one by one inside the root, as the guest's kernel does."""
        def no_proc(here, parts, fd, st):
            if here == "/proc" and parts and not proc_visible(here + "/" + "/".join(parts)):
                raise ThroughPseudoFs()                 # the guest's own /proc: procfs.walk takes it there
        return self.resolve(guest_abs, follow, no_proc)[1]

    def resolve(self, guest_abs, follow, stop=None):
        """Follow a guest path's symlinks component by component inside the root (each step one openat2
        with O_NOFOLLOW): ("path", the canonical guest path), its last component left as it is unless
        follow, or if it does not exist yet. stop(here, rest, fd, st), called at each component reached,
        may end the walk with a result of its own (procfs: its /proc, the host's pseudo-filesystems)."""
        parts, done, links = [c for c in guest_abs.split("/") if c], [], 0
        follow = follow or guest_abs.endswith("/")      # "link/" names what the link points to
        while parts:
            name = parts.pop(0)
            if name == ".":
                continue
            if name == "..":
                done = done[:-1]
                continue
            here = "/" + "/".join(done + [name])
            try:
                fd = self.raw_path_fd(here)
            except OSError as e:
                if e.errno == errno.ENOENT and not parts:
                    done.append(name)                   # a name about to be made
                    break
                raise Errno(e.errno if e.errno != errno.ELOOP else errno.ENOENT) from None
            try:
                st = os.fstat(fd)
                if stop is not None:
                    result = stop(here, parts, fd, st)
                    if result is not None:
                        return result
                if stat.S_ISLNK(st.st_mode) and (parts or follow):
                    links += 1
                    if links > MAX_LINKS:
                        raise Errno(errno.ELOOP)
                    target = os.readlink("", dir_fd=fd)
                    parts = [c for c in target.split("/") if c] + parts
                    if target.startswith("/"):
                        done = []
                    continue
                if parts and not stat.S_ISDIR(st.st_mode):
                    raise Errno(errno.ENOTDIR)
            finally:
                os.close(fd)
            done.append(name)
        return ("path", "/" + "/".join(done))

    def open(self, guest_abs, flags, mode, wait=None):
        """A host descriptor for open(2) of a guest path, the policy checked before anything changes. A
        FIFO's open waits through wait (see open_reached)."""
        flags |= os.O_CLOEXEC
        if not flags & _WRITING and flags & O_ACCMODE == os.O_RDONLY:
            self._visible(guest_abs)
            # Where the path leads is checked before the file itself is opened: the host's
            # answer for a file of its own (EACCES for another process's) would tell it exists.
            where = self.path_fd(guest_abs, follow=not flags & os.O_NOFOLLOW)
            try:
                return open_reached("/proc/self/fd/%d" % where, flags & ~os.O_NOFOLLOW, 0, wait)
            finally:
                os.close(where)
        try:
            existing = self.path_fd(guest_abs, follow=not flags & os.O_NOFOLLOW)
        except Errno as e:
            if e.errno != errno.ENOENT or not flags & os.O_CREAT or isinstance(e, ThroughPseudoFs):
                raise
            existing = None
        if existing is not None:
            try:
                if flags & os.O_CREAT and flags & os.O_EXCL:
                    raise Errno(errno.EEXIST)
                if not self._may_write(self._host_path(existing)):
                    raise Errno(errno.EACCES)
                return open_reached("/proc/self/fd/%d" % existing,       # the very inode that was checked
                                    flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW), mode, wait)
            finally:
                os.close(existing)
        parent, name = self.parent_for_write(guest_abs)
        try:
            return _core.openat2(parent, name.encode("utf-8", "surrogateescape"), flags, mode & 0o7777,
                                 RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        except OSError as e:
            raise Errno(e.errno) from None
        finally:
            os.close(parent)

    def parent_for_write(self, guest_abs):
        """(O_PATH fd of the parent directory, last component), checked writable."""
        head, name = posixpath.split(guest_abs.rstrip("/") or "/")
        if not name or name in (".", ".."):
            raise Errno(errno.EINVAL if name else errno.EBUSY)
        fd = self.path_fd(head or "/", directory=True)
        if not self._may_write(self._host_path(fd)):
            os.close(fd)
            raise Errno(errno.EACCES)
        return fd, name


class OpenFile:
    """An open file description (shared by dup'ed descriptors): a host descriptor the kernel holds."""

    __slots__ = ("host_fd", "path", "flags", "dir_entries", "dir_pos", "refs", "plain", "regular", "list_dir",
                 "socket", "on_release", "signalfd", "pidfd", "__weakref__")

    def __init__(self, host_fd, path, flags):
        self.host_fd = host_fd
        self.path = path                # the guest path it was opened by (for *at calls and /proc/self/fd)
        self.flags = flags
        self.dir_entries = None
        self.list_dir = None            # a directory the kernel makes up (/proc): its entries, made when read
        self.socket = None              # a socket's family, type and guest names (syscalls.net)
        self.on_release = None          # called when it is released (a pty master gives its number back)
        self.signalfd = None            # a signalfd's mask of signals
        self.pidfd = None               # the guest Process a pidfd names
        self.dir_pos = 0
        self.refs = 0
        try:                            # read/write need nothing from the kernel: the C fast path may do them
            mode = os.fstat(host_fd).st_mode
            self.regular = stat.S_ISREG(mode)
            # A terminal is read in Python: who reads it (foreground or not) matters there.
            self.plain = self.regular or stat.S_ISFIFO(mode) or stat.S_ISCHR(mode) and not os.isatty(host_fd)
        except OSError:
            self.plain = self.regular = False

    def release(self):
        """The last descriptor for it is gone."""
        os.close(self.host_fd)
        if self.on_release is not None:
            self.on_release()

    def is_dir(self):
        try:
            return stat.S_ISDIR(os.fstat(self.host_fd).st_mode)
        except OSError:
            return False


# Host pseudo-filesystems (statfs f_type): what they show is the host's (its processes, devices,
# kernel state), never the guest's. Reached by any path or symlink, they are not there for the guest,
# except the general /proc files above.
PROC_SUPER_MAGIC = 0x9FA0
PSEUDO_FS = frozenset((PROC_SUPER_MAGIC, 0x62656572, 0x1CD1, 0x64626720, 0x74726163, 0x73636673, 0x63677270,
                       0x27E0EB, 0xCAFE4A11, 0x6165676C, 0x62656570, 0xDE5E81E4, 0xF97CFF8C, 0x42494E4D,
                       0x65735543, 0x6E736673, 0x19800202))
# proc sysfs devpts debugfs tracefs securityfs cgroup2 cgroup bpf pstore configfs efivarfs selinuxfs
# binfmt_misc fusectl nsfs mqueue
PSEUDO_FS_NAMES = frozenset(("proc", "sysfs", "devpts", "debugfs", "tracefs", "securityfs", "cgroup2", "cgroup", "bpf",
                             "pstore", "configfs", "efivarfs", "selinuxfs", "binfmt_misc", "fusectl", "nsfs", "mqueue",
                             "autofs", "hugetlbfs", "rpc_pipefs"))

# Descriptor tables are changed by several guest threads and processes at once (and open file
# descriptions are shared between processes after fork): one lock for all of them.
_TABLES = threading.RLock()


class FdTable:
    """The guest's descriptors: number -> (OpenFile, close-on-exec)."""

    FAST_SLOTS = 1024

    def __init__(self, limit=1024):
        self.fds = {}
        self.limit = limit
        self.fast = array("i", [-1]) * self.FAST_SLOTS     # guest fd -> host fd for the C fast path, see install
        self.lock_handles = {}          # (st_dev, st_ino, access mode) -> the host fd POSIX locks go through

    def lock_handle(self, f):
        """The open file description of f's (regular) file that carries this process's POSIX record
        locks: the host's open-file-description locks on it are then the process's own, as POSIX locks
        are (two opens of a file in one process share them, another process's conflict, any close of the
        file by the process drops them). It is the kernel's, never the guest's, and opened with the
        access f has, never more (so opens of one file with different access modes lock apart)."""
        st = os.fstat(f.host_fd)
        key = (st.st_dev, st.st_ino, f.flags & os.O_ACCMODE)
        with _TABLES:
            handle = self.lock_handles.get(key)
            if handle is None:
                handle = host_call(os.open, "/proc/self/fd/%d" % f.host_fd,
                                   key[2] | os.O_CLOEXEC | os.O_NOCTTY | os.O_NONBLOCK)
                self.lock_handles[key] = handle
            return handle

    def _drop_locks(self, f):
        try:
            st = os.fstat(f.host_fd)
        except OSError:
            return
        for key in [k for k in self.lock_handles if k[:2] == (st.st_dev, st.st_ino)]:
            os.close(self.lock_handles.pop(key))        # its locks go with it

    def get(self, fd):
        entry = self.fds.get(fd)
        if entry is None:
            raise Errno(errno.EBADF)
        return entry[0]

    def install_host(self, host_fd, path, flags, cloexec=False):
        """A new open file of the kernel's host descriptor, at the lowest free number; on failure the host
        descriptor is closed (nothing is left open)."""
        try:
            f = OpenFile(host_fd, path, flags)
            return self.install(f, cloexec=cloexec)
        except BaseException:
            os.close(host_fd)
            raise

    def install(self, f, cloexec=False, lowest=0, at=None):
        """Lowest free number >= lowest (EMFILE past the limit), or exactly `at` (EBADF if out of range)."""
        with _TABLES:
            return self._install(f, cloexec, lowest, at)

    def _install(self, f, cloexec, lowest, at):
        if at is not None:
            if not 0 <= at < self.limit:
                raise Errno(errno.EBADF)
        else:
            at = lowest
            while at in self.fds:
                at += 1
            if at >= self.limit:
                raise Errno(errno.EMFILE)
        if at in self.fds:
            self.close(at)
        f.refs += 1
        self.fds[at] = (f, bool(cloexec))
        if at < self.FAST_SLOTS:         # host fd << 1 | 1 for a regular file (never blocks), -1: not fast
            self.fast[at] = (f.host_fd << 1 | f.regular) if f.plain else -1
        return at

    def close(self, fd):
        with _TABLES:
            f, _ = self.fds.pop(fd, (None, None))
            if f is None:
                raise Errno(errno.EBADF)
            if 0 <= fd < self.FAST_SLOTS:
                self.fast[fd] = -1
            if self.lock_handles and f.regular:     # POSIX: any close of the file drops the process's locks
                self._drop_locks(f)
            f.refs -= 1
            if f.refs == 0:
                f.release()

    def cloexec(self, fd):
        return self.fds[fd][1] if fd in self.fds else None

    def set_cloexec(self, fd, on):
        f = self.get(fd)
        self.fds[fd] = (f, bool(on))

    def close_on_exec(self):
        for fd in [fd for fd, (_, ce) in self.fds.items() if ce]:
            self.close(fd)

    def close_all(self):
        for fd in list(self.fds):
            self.close(fd)
