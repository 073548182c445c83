"""Moving the target's pages into the image: process_vm_readv, /proc/PID/mem where refused, or
vmsplice by the agent into a pipe that the kernel splices into the file."""
import errno
import os
import struct
from array import array

from .. import _core, janitor
from ..abi import PAGE
from ..errors import TargetGone


def copy_range(pid, image, start, end, final):
    """Copy [start, end) into the image. While the target runs, a mapping may vanish under us: that
    round skips it (the frozen round sees the truth); frozen, every failure is an error."""
    addr = start
    while addr < end:
        n = min(end - addr, 1 << 20)
        try:
            image.add(addr, _core.vm_read(pid, addr, n))
        except OSError:
            if not final and not os.path.exists("/proc/%d/task/%d" % (pid, pid)):
                raise TargetGone(pid) from None
            for page in range(addr, addr + n, PAGE):        # page by page: what cannot be read stays out
                try:
                    image.add(page, _read_forced(pid, page, PAGE))
                except OSError:
                    if not final:
                        return                              # gone while we copied: the next round sees
        addr += n


def copy_ranges(pid, image, ranges, final):
    """Scattered written pages: up to 1024 ranges (16 MiB) per process_vm_readv; what fails is copied alone."""
    i = 0
    while i < len(ranges):
        batch, size = [], 0
        while i < len(ranges) and len(batch) < 1024 and size < 16 << 20:
            s, e = ranges[i]
            batch.append((s, e))
            size += e - s
            i += 1
        flat = array("Q", [v for s, e in batch for v in (s, e - s)])
        data = _core.vm_read_ranges(pid, flat)
        done = at = 0
        for s, e in batch:
            if at + (e - s) > len(data):
                break
            done += 1
            at += e - s
        image.add_ranges(batch[:done], data)
        for s, e in batch[done:]:
            copy_range(pid, image, s, e, final)


def _read_forced(pid, addr, n):
    """Through /proc/PID/mem, which reads pages the process itself may not (PROT_NONE, exec-only)."""
    fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    try:
        data = os.pread(fd, n, addr)
    finally:
        os.close(fd)
    if len(data) != n:
        raise OSError(errno.EIO, "short read")
    return data


IOV_BYTES = 16 * 1024                   # the splicer's iovec array in the target


class Splicer:
    """vmsplice by the agent: the target's pages go into a pipe the target made, whose read end we took
    (pidfd_getfd); splice moves them on into the image. Only while the target runs: a page in the pipe is
    a reference, and a write to it before the splice lands in the image too (the next round copies it
    again anyway, since the write is tracked)."""

    F_SETPIPE_SZ = 1031

    def __init__(self, space):
        self.space = space
        self.read_fd = -1
        self.write_fd = self.iov = None
        def pipe():
            space.syscall("pipe2", mem, os.O_CLOEXEC)
            return list(struct.unpack("<ii", space.read(mem, 8)))
        with space.scratch(8) as mem:
            r, self.write_fd = space.track_new_fds(2, janitor.PIPE, pipe)
        try:
            self.read_fd = space.take_fd(r)
        finally:
            space.syscall_raw("close", r)
            space.untrack_fd(r)
        size = space.syscall_raw("fcntl", self.write_fd, self.F_SETPIPE_SZ, 1 << 20)
        self.capacity = size if size > 0 else 65536
        self.iov = space.map_anonymous(IOV_BYTES)

    def move(self, image, ranges):
        """Copy page-aligned ranges into the image; returns the ranges it could not (copy those otherwise)."""
        pending = []
        for s, e in ranges:                        # no range bigger than the pipe
            pending.extend((a, min(a + self.capacity, e)) for a in range(s, e, self.capacity))
        i = 0
        while i < len(pending):
            batch, size = [], 0
            while i < len(pending) and len(batch) < 1024 and size + pending[i][1] - pending[i][0] <= self.capacity:
                batch.append(pending[i])
                size += pending[i][1] - pending[i][0]
                i += 1
            self.space.write(self.iov, b"".join(struct.pack("<QQ", s, e - s) for s, e in batch))
            moved = self.space.syscall_raw("vmsplice", self.write_fd, self.iov, len(batch), 0)
            if moved <= 0:
                return batch + pending[i:]
            took, left = [], moved                 # page-aligned ranges: what moved is whole pages
            for s, e in batch:
                if left <= 0:
                    break
                took.append((s, s + min(e - s, left)))
                left -= e - s
            image.splice_in(self.read_fd, moved, took)
            if moved < size:                       # stopped at a page it could not take
                s_last, e_last = took[-1]
                rest = [(e_last, batch[len(took) - 1][1])] if e_last < batch[len(took) - 1][1] else []
                return rest + batch[len(took):] + pending[i:]
        return []

    def close(self):
        if self.read_fd >= 0:
            os.close(self.read_fd)
            self.read_fd = -1
        if self.write_fd is not None:
            self.space.syscall_raw("close", self.write_fd)
            self.space.untrack_fd(self.write_fd)
            self.write_fd = None
        if self.iov is not None:
            self.space.syscall_raw("munmap", self.iov, IOV_BYTES)
            self.space.untrack_mapping(self.iov)
            self.iov = None
