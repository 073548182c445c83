"""Lazy restore: the restored process runs before its memory is all in.

Its private anonymous mappings are registered with a userfaultfd made inside it (the fd is ours,
not its own: it belongs to the process's mm, whoever holds it). A page server, a process of ours,
fills a page when a thread first touches it (from user or kernel mode) and copies the rest in the
background, each page from a pages.img chunk checked against its digest first; once every page is
in, it closes the userfaultfd and exits, and the process owes nothing to anyone.

The process may change its memory meanwhile, and the kernel tells the server (the non-cooperative
events): a range it drops (madvise DONTNEED, munmap) is never filled afterwards, a range it moves
(mremap) is filled at its new place, and a child it forks gets a userfaultfd of its own that is
served from the same image (a page the child has not got yet is the image's, as in the parent
at the fork). A copy the kernel refuses while such an event waits (EAGAIN) is retried after it.
"""
from __future__ import annotations

import array
import bisect
import ctypes
import errno
import fcntl
import mmap
import os
import signal
import struct
import threading

from ..abi import PAGE, UFFDIO_API, UFFDIO_REGISTER

UFFDIO_COPY = 0xC028AA03
UFFDIO_ZEROPAGE = 0xC020AA04
UFFDIO_WAKE = 0x8010AA02
UFFDIO_REGISTER_MODE_MISSING = 1
UFFD_FEATURE_EVENT_FORK, UFFD_FEATURE_EVENT_REMAP, UFFD_FEATURE_EVENT_REMOVE = 1 << 1, 1 << 2, 1 << 3
UFFD_FEATURE_EVENT_UNMAP = 1 << 6
FEATURES = UFFD_FEATURE_EVENT_FORK | UFFD_FEATURE_EVENT_REMAP | UFFD_FEATURE_EVENT_REMOVE | UFFD_FEATURE_EVENT_UNMAP
EVENT_PAGEFAULT, EVENT_FORK, EVENT_REMAP, EVENT_REMOVE, EVENT_UNMAP = 0x12, 0x13, 0x14, 0x15, 0x16
_MSG = 32
RUN = 256 * PAGE                # pages copied in one step of the background copy
FAULT_RUN = 16 * PAGE           # and on a fault: the page and those after it (sequential touches)


def prepare(uffd: int, ranges: list[tuple[int, int]]) -> None:
    """The API handshake and the registration of ranges, on our descriptor for the process's userfaultfd."""
    api = bytearray(struct.pack("<QQQ", 0xAA, FEATURES, 0))
    fcntl.ioctl(uffd, UFFDIO_API, api, True)
    got = struct.unpack_from("<Q", api, 8)[0]
    if got & FEATURES != FEATURES:
        raise OSError(errno.EOPNOTSUPP, "this kernel's userfaultfd lacks the fork, remap, remove and unmap events")
    for start, end in ranges:
        fcntl.ioctl(uffd, UFFDIO_REGISTER, bytearray(struct.pack("<QQQQ", start, end - start,
                                                                   UFFDIO_REGISTER_MODE_MISSING, 0)), True)


class _Space:
    """One mm served: its userfaultfd and the runs of pages still to fill, sorted and disjoint
    (start, offset in pages.img, pages), kept as three lists."""

    def __init__(self, uffd, runs=b"", lists=None):
        self.uffd = uffd
        if lists is None:
            flat = array.array("Q", runs)           # u64 triples
            lists = flat[0::3].tolist(), flat[1::3].tolist(), flat[2::3].tolist()
        self.starts, self.offs, self.ns = lists

    def copy(self, uffd):
        return _Space(uffd, lists=(list(self.starts), list(self.offs), list(self.ns)))

    def __bool__(self):
        return bool(self.starts)

    def find(self, addr):
        """The index of the run holding addr, or -1."""
        i = bisect.bisect_right(self.starts, addr) - 1
        return i if i >= 0 and addr < self.starts[i] + self.ns[i] * PAGE else -1

    def take(self, addr, limit):
        """Pop up to limit bytes of pages from addr (in a run): (offset, pages)."""
        i = self.find(addr)
        start, off, n = self.starts[i], self.offs[i], self.ns[i]
        skip = (addr - start) // PAGE
        k = min(n - skip, limit // PAGE)
        self._replace(i, [(start, off, skip), (addr + k * PAGE, off + (skip + k) * PAGE, n - skip - k)])
        return off + skip * PAGE, k

    def take_last(self, limit):
        """Pop up to limit bytes of pages from the end, across runs that follow each other in memory
        (popping at the end of the lists costs nothing, whatever their length): [(address, offset,
        pages)] in order, one stretch of memory."""
        got, size = [], 0
        while self.starts and size < limit and (not got or self.starts[-1] + self.ns[-1] * PAGE == got[-1][0]):
            n = self.ns[-1]
            k = min(n, (limit - size) // PAGE)
            got.append((self.starts[-1] + (n - k) * PAGE, self.offs[-1] + (n - k) * PAGE, k))
            size += k * PAGE
            if k == n:
                del self.starts[-1], self.offs[-1], self.ns[-1]
            else:
                self.ns[-1] = n - k
        return got[::-1]

    def put_back(self, addr, off, n):
        i = bisect.bisect_left(self.starts, addr)
        self._replace(i, [(addr, off, n)], 0)

    def drop(self, start, end):
        """Forget the pages in [start, end) (the process dropped or unmapped them): never filled."""
        self.cut(start, end)

    def cut(self, start, end):
        """Remove and return the runs' parts inside [start, end)."""
        out = []
        i = max(0, bisect.bisect_right(self.starts, start) - 1)
        while i < len(self.starts) and self.starts[i] < end:
            s, off, n = self.starts[i], self.offs[i], self.ns[i]
            e = s + n * PAGE
            if e <= start:
                i += 1
                continue
            lo, hi = max(s, start), min(e, end)
            out.append((lo, off + (lo - s), (hi - lo) // PAGE))
            keep = [(s, off, (lo - s) // PAGE), (hi, off + (hi - s), (e - hi) // PAGE)]
            i += self._replace(i, keep)
        return out

    def move(self, old, new, length):
        moved = self.cut(old, old + length)
        self.drop(new, new + length)            # what was at the target is gone
        for addr, off, n in moved:
            self.put_back(addr - old + new, off, n)

    def _replace(self, i, parts, remove=1):
        """Replace `remove` runs at i with the non-empty parts; returns how many went in."""
        parts = [p for p in parts if p[2] > 0]
        self.starts[i:i + remove] = [p[0] for p in parts]
        self.offs[i:i + remove] = [p[1] for p in parts]
        self.ns[i:i + remove] = [p[2] for p in parts]
        return len(parts)


class _Gone(Exception):
    """The mm of a space is gone (the process exited or executed another program)."""


class PageServer:
    """Serves the process's userfaultfd (and those of the children it forks) from pages.img."""

    def __init__(self, uffd, pages_fd, chunks, runs):
        self.pages_fd, self.chunks = pages_fd, chunks
        self.spaces = [_Space(uffd, runs)]
        self.buf = mmap.mmap(-1, RUN)
        self.buf_addr = ctypes.addressof(ctypes.c_char.from_buffer(self.buf))
        self.faults = self.copied = 0

    def run(self):
        """Serve until every page of every space is in."""
        for sp in [sp for sp in self.spaces if not sp]:
            self._close(sp)
        while self.spaces:                      # each space has pages to copy: never idle
            for sp in list(self.spaces):
                try:
                    self._serve_faults(sp)
                    if sp in self.spaces and sp:
                        self._background(sp)
                except _Gone:
                    self._close(sp)
                    continue
                if sp in self.spaces and not sp:
                    self._close(sp)

    def _close(self, sp):
        # What a thread waits for now is a page the image does not hold: the kernel's zero page.
        self._serve_faults(sp, quiet=True)
        os.close(sp.uffd)
        self.spaces.remove(sp)

    def _messages(self, sp):
        """Read what waits; apply the events at once; return the faulting addresses in order."""
        faults = []
        while True:
            try:
                raw = os.read(sp.uffd, _MSG * 64)
            except BlockingIOError:
                return faults
            except OSError as e:
                if e.errno in (errno.ESRCH, errno.EBADF):
                    raise _Gone() from None
                raise
            if not raw:
                raise _Gone()
            for i in range(0, len(raw) - _MSG + 1, _MSG):
                event = raw[i]
                a, b, c = struct.unpack_from("<QQQ", raw, i + 8)
                if event == EVENT_PAGEFAULT:
                    faults.append(b & ~(PAGE - 1))
                elif event == EVENT_FORK:
                    child = a & 0xFFFFFFFF
                    os.set_blocking(child, False)
                    self.spaces.append(sp.copy(child))
                elif event == EVENT_REMAP:
                    sp.move(a, b, c)
                elif event in (EVENT_REMOVE, EVENT_UNMAP):
                    sp.drop(a, b)

    def _serve_faults(self, sp, quiet=False):
        try:
            self._serve(sp, self._messages(sp))
        except _Gone:
            if not quiet:
                raise

    def _serve(self, sp, faults):
        """Answer each fault: the image's pages from there on, or the zero page where the image has none."""
        while faults:
            addr = faults.pop(0)
            self.faults += 1
            if sp.find(addr) >= 0:
                off, n = sp.take(addr, FAULT_RUN)
                later, done = self._copy(sp, [(addr, off, n)])
            else:
                later, done = self._zero(sp, addr)
            faults += later
            if not done:                        # an event was in the way: after it, again
                os.sched_yield()
                faults.append(addr)

    def _background(self, sp):
        faults, done = self._copy(sp, sp.take_last(RUN))        # from the top down
        if not done:
            os.sched_yield()
        self._serve(sp, faults)

    def _copy(self, sp, pieces):
        """UFFDIO_COPY of one stretch of memory made of pieces [(address, offset in pages.img, pages)]:
        (faults read meanwhile, whether its first page is done). Pages an event came before (EAGAIN) go
        back, to be taken as the event leaves them."""
        addr = pieces[0][0]
        for a, off, n in pieces:
            self.buf[a - addr:a - addr + n * PAGE] = self.chunks.read(self.pages_fd, off, n * PAGE)
        length = pieces[-1][0] + pieces[-1][2] * PAGE - addr
        done = 0
        while done < length:
            req = bytearray(struct.pack("<QQQQq", addr + done, self.buf_addr + done, length - done, 0, 0))
            try:
                fcntl.ioctl(sp.uffd, UFFDIO_COPY, req, True)
                self.copied += (length - done) // PAGE
                break
            except OSError as e:
                moved = struct.unpack_from("<q", req, 32)[0]
                if moved > 0:
                    done += moved
                    self.copied += moved // PAGE
                elif e.errno in (errno.EEXIST, errno.ENOENT, errno.EINVAL):
                    done += PAGE                # the process has it (wrote there first), or unmapped it
                elif e.errno == errno.EAGAIN:
                    for a, off, n in pieces:
                        skip = max(0, addr + done - a) // PAGE
                        if skip < n:
                            sp.put_back(a + skip * PAGE, off + skip * PAGE, n - skip)
                    return self._messages(sp), done > 0
                elif e.errno == errno.ESRCH:
                    raise _Gone() from None
                else:
                    raise
        return [], True

    def _zero(self, sp, addr):
        req = bytearray(struct.pack("<QQQq", addr, PAGE, 0, 0))
        try:
            fcntl.ioctl(sp.uffd, UFFDIO_ZEROPAGE, req, True)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise _Gone() from None
            if e.errno == errno.EAGAIN:
                return self._messages(sp), False
            if e.errno not in (errno.EEXIST, errno.ENOENT, errno.EINVAL):
                raise
            self._wake(sp, addr)
        return [], True

    def _wake(self, sp, addr):
        try:
            fcntl.ioctl(sp.uffd, UFFDIO_WAKE, struct.pack("<QQ", addr, PAGE))
        except OSError:
            pass


def start(uffd: int, pages_path: str, chunks, runs: bytes, victim: int) -> int:
    """Fork the page server; returns its pid. It holds the only descriptor of the userfaultfd: the
    caller closes its own. It ignores every signal a terminal or a job-control shell sends (it exits
    once all is in, in about a second per GiB); if it finds a damaged chunk or fails, it kills the process it serves (which
    would otherwise see zeros) and says why."""
    pages_fd = os.open(pages_path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        pid = os.fork()
    except OSError:
        os.close(pages_fd)
        raise
    if pid:
        os.close(pages_fd)
        return pid
    status = 1
    try:
        for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGPIPE, signal.SIGTSTP,
                    signal.SIGUSR1, signal.SIGUSR2, signal.SIGALRM, signal.SIGTTIN, signal.SIGTTOU):
            signal.signal(sig, signal.SIG_IGN)
        # The descriptors it inherited are closed on a thread of their own: closing a pipe waits for
        # its lock, which a thread of the process may hold while it waits for a page (read(2) into memory
        # not yet in): only the server can end that wait.
        threading.Thread(target=_close_all_but, args=({uffd, pages_fd, 2},), daemon=True).start()
        _name(b"pvmexec-pages")
        PageServer(uffd, pages_fd, chunks, runs).run()
        status = 0
    except BaseException as e:                  # noqa: B036 - the process must not see zeros
        _kill_tree(victim)
        try:
            os.write(2, ("pvmexec: lazy restore of process %d failed, killed it: %s\n" % (victim, e)).encode())
        except OSError:
            pass
    finally:
        os._exit(status)


def _close_all_but(keep):
    at = 0
    for k in sorted(keep):
        os.closerange(at, k)
        at = k + 1
    os.closerange(at, 1 << 20)


def _name(name):
    try:
        ctypes.CDLL(None, use_errno=True).prctl(15, ctypes.c_char_p(name), 0, 0, 0)     # PR_SET_NAME
    except (OSError, AttributeError):
        pass


def _kill_tree(pid):
    """SIGKILL pid and every process descended from it (its children share its lazily filled pages)."""
    children = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    ppid = int(f.read().rsplit(")", 1)[1].split()[1])
            except (OSError, ValueError, IndexError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    todo = [pid]
    while todo:
        p = todo.pop()
        todo += children.get(p, [])
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass


__all__ = ["prepare", "start", "PageServer", "FEATURES"]
