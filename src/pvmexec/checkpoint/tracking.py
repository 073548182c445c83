"""Which pages the target wrote: userfaultfd write-protection in async mode, read by PAGEMAP_SCAN.

The userfaultfd is made inside the target by the agent (it belongs to the mm
that creates it); a written page loses its protection without any fault
reaching us, and PAGEMAP_SCAN with PM_SCAN_WP_MATCHING on /proc/PID/pagemap
reports the pages written since the last scan and protects them again, atomically.
"""
import errno
import os
import stat
import struct

from ..abi import (PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, UFFD_FEATURE_WP_ASYNC, UFFD_FEATURE_WP_UNPOPULATED, UFFD_USER_MODE_ONLY, UFFDIO_API, UFFDIO_REGISTER,
                   UFFDIO_REGISTER_MODE_WP, UFFDIO_UNREGISTER)
from .. import janitor
from ..errors import PvmexecError, TargetGone
from ..proc import PagemapScan
from .image import DumpError


_SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")


class Mapping:
    """One line of /proc/PID/maps."""

    __slots__ = ("start", "end", "perms", "offset", "path", "inode")

    def __init__(self, line):
        fields = line.split(None, 5)
        self.start, self.end = (int(x, 16) for x in fields[0].split("-"))
        self.perms = fields[1]
        self.offset = int(fields[2], 16)
        self.inode = int(fields[4])
        self.path = fields[5].rstrip("\n") if len(fields) > 5 else ""

    @property
    def shared(self):
        return self.perms[3] == "s"

    def file_identity(self):
        """The mapped file as it is now (ino, size, mtime) if its path still names the mapped file, else
        None (deleted, replaced, a memfd or shared memory): then its pages are only in the process."""
        if not self.path.startswith("/") or self.path.endswith(" (deleted)") or self.path.startswith("/SYSV"):
            return None
        try:
            st = os.stat(self.path)
        except OSError:
            return None
        if st.st_ino != self.inode or not stat.S_ISREG(st.st_mode):
            return None
        return dict(ino=st.st_ino, dev=st.st_dev, size=st.st_size, mtime_ns=st.st_mtime_ns)

    @property
    def key(self):
        return (self.start, self.end)

    def as_dict(self):
        return dict(start=self.start, end=self.end, perms=self.perms, offset=self.offset, path=self.path)

    @property
    def anonymous(self):
        return not self.path or self.path in ("[heap]", "[stack]") or self.path.startswith("[anon:")


def held_ranges(scanner, pid, m, how):
    """The ranges of mapping m holding data of the process's own, found without touching the others (a
    page never used is not read into existence). how is the image's source for m ("memory", "file" or
    "shared-file"). The one rule the dump, its final marking and verify share."""
    if how == "shared-file":
        return []                           # all of it is the file's
    if m.shared:
        data = shmem_data(pid, m)
        return [m.key] if data is None else data
    if how == "memory" and not m.anonymous:
        return [m.key]                      # a deleted file's or a memfd's: the image holds all of it
    without = PAGE_IS_PFNZERO | (PAGE_IS_FILE if how == "file" else 0)
    return scanner.regions(m.start, m.end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED, without)


def gaps(start, end, regions):
    """The parts of [start, end) that regions leave out."""
    at = start
    for s, e in sorted(regions):
        if s > at:
            yield at, s
        at = max(at, e)
    if at < end:
        yield at, end


def read_maps(pid, skip=()):
    """The target's mappings, without the kernel's special ones and without ranges in skip."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            maps = [Mapping(line) for line in f]
    except FileNotFoundError:
        raise TargetGone(pid) from None
    out = []
    for m in maps:
        if m.path not in _SPECIAL:
            out.extend(_outside(m, skip))
    return out


def _outside(m, skip):
    """The parts of m outside the ranges in skip: the kernel may merge a mapping of ours with the
    target's next to it (same protection, both anonymous), and the target's part must stay."""
    pieces = [(m.start, m.end)]
    for s, e in skip:
        cut = []
        for lo, hi in pieces:
            if lo < e and hi > s:
                cut += [p for p in ((lo, min(hi, s)), (max(lo, e), hi)) if p[0] < p[1]]
            else:
                cut.append((lo, hi))
        pieces = cut
    if pieces == [(m.start, m.end)]:
        return [m]
    out = []
    for lo, hi in pieces:
        part = Mapping.__new__(Mapping)
        part.start, part.end, part.perms, part.path, part.inode = lo, hi, m.perms, m.path, m.inode
        part.offset = m.offset + (lo - m.start) if m.path else m.offset
        out.append(part)
    return out


class Scanner(PagemapScan):
    """PAGEMAP_SCAN on the target's pagemap; its failures are the dump's."""

    def categorized(self, start, end, anyof, report, without=0, wp=False):
        try:
            return super().categorized(start, end, anyof, report, without, wp)
        except OSError as e:
            raise DumpError(e.errno, "PAGEMAP_SCAN on the target's pagemap: %s" % e.strerror) from None


class Tracker:
    """A userfaultfd inside the target (made by the agent) with WP-async ranges registered on it."""

    def __init__(self, space):
        self.space = space
        self.ranges = {}
        # Should we die, the janitor closes it: the kernel then drops its write protection too.
        self.uffd, = space.track_new_fds(1, janitor.USERFAULTFD, lambda: [
            space.syscall("userfaultfd", os.O_CLOEXEC | UFFD_USER_MODE_ONLY)])
        try:
            with space.scratch(64) as mem:
                space.write(mem, struct.pack("<QQQ", 0xAA, UFFD_FEATURE_WP_UNPOPULATED | UFFD_FEATURE_WP_ASYNC, 0))
                space.syscall("ioctl", self.uffd, UFFDIO_API, mem)
        except BaseException:
            self.close()
            raise

    def register(self, m):
        """Track writes to m; False if the kernel cannot (the mapping is then copied whole each round)."""
        with self.space.scratch(64) as mem:
            self.space.write(mem, struct.pack("<QQQQ", m.start, m.end - m.start, UFFDIO_REGISTER_MODE_WP, 0))
            ret = self.space.syscall_raw("ioctl", self.uffd, UFFDIO_REGISTER, mem)
        if ret == 0:
            self.ranges[m.key] = m
            return True
        return False

    def forget(self, key):
        m = self.ranges.pop(key, None)
        if m is not None:
            self._unregister(m.start, m.end)

    def _unregister(self, start, end):
        with self.space.scratch(64) as mem:
            self.space.write(mem, struct.pack("<QQ", start, end - start))
            self.space.syscall_raw("ioctl", self.uffd, UFFDIO_UNREGISTER, mem)

    def close(self):
        """Unregister everything (the target keeps no write protection) and close the fd in the target."""
        for m in list(self.ranges.values()):
            try:
                self._unregister(m.start, m.end)
            except (OSError, PvmexecError):
                pass
        self.ranges.clear()
        if self.uffd is not None:
            try:
                self.space.syscall_raw("close", self.uffd)
            finally:
                self.space.untrack_fd(self.uffd)
                self.uffd = None


def shmem_data(pid, m):
    """The ranges of a shared memory mapping that hold pages (SEEK_DATA on the object through
    /proc/PID/map_files, which needs CAP_SYS_ADMIN; shared memory's swapped pages count as data);
    None where that is refused: then all of it is read."""
    try:
        fd = os.open("/proc/%d/map_files/%x-%x" % (pid, m.start, m.end), os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    out = []
    try:
        lo, hi = m.offset, m.offset + (m.end - m.start)
        at = lo
        while at < hi:
            try:
                data = os.lseek(fd, at, os.SEEK_DATA)
            except OSError as e:
                if e.errno == errno.ENXIO:
                    break                   # no data after at
                return None
            if data >= hi:
                break
            hole = min(os.lseek(fd, data, os.SEEK_HOLE), hi)
            out.append((m.start + data - lo, m.start + hole - lo))
            at = hole
    finally:
        os.close(fd)
    return out
