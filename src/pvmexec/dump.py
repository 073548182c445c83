"""Live checkpoint: pre-dump a running process's memory without stopping it, then a short-freeze final dump.

Writes are tracked with userfaultfd write-protection in asynchronous mode,
created inside the target by the agent (the fd belongs to the mm that makes
it): a written page loses its protection without any fault reaching us, and
PAGEMAP_SCAN with PM_SCAN_WP_MATCHING on /proc/PID/pagemap reports the pages
written since the last scan and protects them again, atomically. Each round
copies only those pages; the final round runs with every thread frozen
(ptrace), then records the threads' and the process's state. Everything is
undone before the target goes on: no userfaultfd, no write protection, no
agent thread.

Image format (version 1), a directory:
  manifest.json   what was dumped (see Image.manifest); "complete": false until the end
  pages.img       page contents, appended round after round (4096 bytes each)
  pages.idx       little-endian (u64 address, u64 offset in pages.img) pairs; the last pair for an
                  address wins; offset 2**64-1 means the page reads as zeros
Checksums (SHA-256) of pages.img and pages.idx are in the manifest.
"""
import ctypes
import errno
from array import array
import fcntl
import hashlib
import json
import os
import resource
import signal
import struct
import time

from . import _core
from .errors import PvmexecError, TargetGone

PAGE = 4096
IMAGE_VERSION = 1
ZERO = (1 << 64) - 1
UFFD_USER_MODE_ONLY = 1
UFFD_FEATURE_WP_UNPOPULATED, UFFD_FEATURE_WP_ASYNC = 1 << 13, 1 << 15
UFFDIO_API, UFFDIO_REGISTER, UFFDIO_UNREGISTER = 0xC018AA3F, 0xC020AA00, 0x8010AA01
UFFDIO_REGISTER_MODE_WP = 2
PAGEMAP_SCAN = 0xC0606610
PM_SCAN_WP_MATCHING, PM_SCAN_CHECK_WPASYNC = 1, 2
PAGE_IS_WRITTEN, PAGE_IS_PRESENT, PAGE_IS_SWAPPED = 1 << 1, 1 << 3, 1 << 4
_SCAN_ARG = struct.Struct("<12Q")
_REGIONS = 4096
NT_X86_XSTATE = 0x202
_SPECIAL = ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]")
CONVERGED_BYTES = 8 << 20


class DumpError(PvmexecError):
    pass


class Mapping:
    __slots__ = ("start", "end", "perms", "offset", "path")

    def __init__(self, line):
        fields = line.split(None, 5)
        self.start, self.end = (int(x, 16) for x in fields[0].split("-"))
        self.perms = fields[1]
        self.offset = int(fields[2], 16)
        self.path = fields[5].rstrip("\n") if len(fields) > 5 else ""

    @property
    def key(self):
        return (self.start, self.end)

    def as_dict(self):
        return dict(start=self.start, end=self.end, perms=self.perms, offset=self.offset, path=self.path)


def read_maps(pid, skip=()):
    """The target's mappings, without the kernel's special ones and without ranges in skip."""
    try:
        with open("/proc/%d/maps" % pid) as f:
            maps = [Mapping(line) for line in f]
    except FileNotFoundError:
        raise TargetGone(pid) from None
    return [m for m in maps if m.path not in _SPECIAL and not any(m.start < e and m.end > s for s, e in skip)]


class _Scanner:
    """PAGEMAP_SCAN on /proc/PID/pagemap, from the caller."""

    def __init__(self, pid):
        self.fd = os.open("/proc/%d/pagemap" % pid, os.O_RDONLY | os.O_CLOEXEC)
        self.vec = (ctypes.c_uint64 * (3 * _REGIONS))()

    def regions(self, start, end, anyof, wp=False):
        """[(start, end)] of pages in [start, end) with any of the categories in `anyof`; with wp,
        they are write-protected again in the same step."""
        out = []
        while start < end:
            arg = bytearray(_SCAN_ARG.pack(_SCAN_ARG.size, (PM_SCAN_WP_MATCHING | PM_SCAN_CHECK_WPASYNC) if wp else 0,
                                           start, end, 0, ctypes.addressof(self.vec), _REGIONS, 0, 0,
                                           0, anyof, anyof))
            try:
                n = fcntl.ioctl(self.fd, PAGEMAP_SCAN, arg)
            except OSError as e:
                raise DumpError(e.errno, "PAGEMAP_SCAN on the target's pagemap: %s" % e.strerror) from None
            walk_end = _SCAN_ARG.unpack(arg)[4]
            for i in range(n):
                out.append((self.vec[3 * i], self.vec[3 * i + 1]))
            if walk_end <= start:
                break
            start = walk_end
        return out

    def close(self):
        os.close(self.fd)


class _Tracker:
    """A userfaultfd inside the target (made by the agent) with WP-async ranges registered on it."""

    def __init__(self, space):
        self.space = space
        self.uffd = space.syscall("userfaultfd", os.O_CLOEXEC | UFFD_USER_MODE_ONLY)
        self.ranges = {}
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
                self.uffd = None


class _Splicer:
    """vmsplice by the agent: the target's pages go into a pipe the target made, whose read end we took
    (pidfd_getfd); splice moves them on into the image. Only while the target runs: a page in the pipe is
    a reference, and a write to it before the splice lands in the image too (the next round copies it
    again anyway, since the write is tracked)."""

    F_SETPIPE_SZ = 1031

    def __init__(self, space):
        self.space = space
        self.read_fd = -1
        self.write_fd = self.iov = None
        with space.scratch(8) as mem:
            space.syscall("pipe2", mem, os.O_CLOEXEC)
            r, self.write_fd = struct.unpack("<ii", space.read(mem, 8))
        try:
            self.read_fd = space.take_fd(r)
        finally:
            space.syscall_raw("close", r)
        size = space.syscall_raw("fcntl", self.write_fd, self.F_SETPIPE_SZ, 1 << 20)
        self.capacity = size if size > 0 else 65536
        self.iov = space.syscall("mmap", 0, 16 * 1024, 3, 0x22, -1, 0)

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
            self.write_fd = None
        if self.iov is not None:
            self.space.syscall_raw("munmap", self.iov, 16 * 1024)
            self.iov = None


class ImageWriter:
    def __init__(self, directory):
        if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
            raise FileExistsError(errno.EEXIST, "%s exists and is not an empty directory" % directory)
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.files = {"pages.img": open(os.path.join(directory, "pages.img"), "wb", buffering=0),  # splice joins in
                      "pages.idx": open(os.path.join(directory, "pages.idx"), "wb")}
        self.sums = {name: hashlib.sha256() for name in self.files}                     # as we write
        self.spliced = False
        self.spliced_bytes = 0
        self.offset = 0
        self.bytes_written = 0
        self.manifest = dict(version=IMAGE_VERSION, complete=False)
        self._write_manifest()

    def add(self, addr, data):
        """Pages starting at addr (a multiple of the page size)."""
        self._write_pages(data)
        n = len(data) // PAGE
        self._write_index(_pairs(range(addr, addr + n * PAGE, PAGE), range(self.offset, self.offset + n * PAGE, PAGE)))
        self.offset += len(data)
        self.bytes_written += len(data)

    def splice_in(self, pipe_fd, nbytes, ranges):
        """Ranges whose nbytes of contents wait in a pipe: moved into pages.img by the kernel (splice)."""
        out = self.files["pages.img"].fileno()
        left = nbytes
        while left:
            moved = os.splice(pipe_fd, out, left)
            if moved <= 0:
                raise DumpError(errno.EIO, "splice from the target's pipe stopped short")
            left -= moved
        addrs = [a for s, e in ranges for a in range(s, e, PAGE)]
        self._write_index(_pairs(addrs, range(self.offset, self.offset + nbytes, PAGE)))
        self.offset += nbytes
        self.bytes_written += nbytes
        self.spliced = True
        self.spliced_bytes += nbytes

    def add_ranges(self, ranges, data):
        """Ranges [(start, end)] whose contents follow each other in data."""
        self._write_pages(data)
        addrs = [a for s, e in ranges for a in range(s, e, PAGE)]
        self._write_index(_pairs(addrs, range(self.offset, self.offset + len(addrs) * PAGE, PAGE)))
        self.offset += len(data)
        self.bytes_written += len(data)

    def zero(self, addr, length):
        n = length // PAGE
        self._write_index(_pairs(range(addr, addr + length, PAGE), [ZERO] * n))

    def hold(self):
        """Keep what is added in memory until flush(): the frozen round only copies, the disk waits."""
        self.held = []

    def flush(self):
        held, self.held = self.held, None
        for name, data in held or ():
            self._write(name, data)

    held = None

    def _write(self, name, data):
        if self.held is not None:
            self.held.append((name, data))
            return
        self.files[name].write(data)
        self.sums[name].update(data)

    def _write_pages(self, data):
        self._write("pages.img", data)

    def _write_index(self, data):
        self._write("pages.idx", data)

    def finish(self, manifest):
        for f in self.files.values():
            f.close()
        sums = {name: h.hexdigest() for name, h in self.sums.items()}
        if self.spliced:                        # the kernel moved those pages: read them back once
            sums["pages.img"] = _sha256(os.path.join(self.dir, "pages.img"))
        manifest.update(version=IMAGE_VERSION, complete=True, checksums=sums)
        self.manifest = manifest
        self._write_manifest()

    def abort(self, why):
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        self.manifest.update(complete=False, error=why)
        try:
            self._write_manifest()
        except OSError:
            pass

    def _write_manifest(self):
        tmp = os.path.join(self.dir, "manifest.json.tmp")
        with open(tmp, "w") as f:
            json.dump(self.manifest, f, indent=1)
        os.replace(tmp, os.path.join(self.dir, "manifest.json"))


def _pairs(addrs, offsets):
    """Index records: (address, offset) pairs as little-endian u64s."""
    out = array("Q", bytes(16 * len(addrs)))
    out[0::2] = array("Q", addrs)
    out[1::2] = array("Q", offsets)
    return out.tobytes()


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _copy(pid, image, start, end, final):
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


def _copy_ranges(pid, image, ranges, final):
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
            _copy(pid, image, s, e, final)


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


def dump(pid, directory, pre_dumps=2, until_converged=False, leave_running=True, progress=None, on_frozen=None,
         transfer="readv"):
    """Dump process pid into directory (which must not exist or be empty).

    pre_dumps rounds copy what was written while the target runs (or, with
    until_converged, rounds go on until one copies at most 8 MiB or more than
    70% of the one before, at most 16); then every thread is frozen for the final round and
    the state records. progress(round, pages, bytes) is called after each
    round; on_frozen(pid) runs while the target is frozen, after the dump.
    The target then continues (leave_running) or is killed. transfer: how
    pages written while the target runs reach the image: "readv" (the caller
    copies them with process_vm_readv: all the work is ours, the target keeps
    its CPU) or "vmsplice" (the agent vmsplices them into a pipe and the kernel
    splices them into the file: no copy through user space, several times
    faster, but that work runs in a thread of the target, which measurably
    slows it); the frozen round always reads. Returns the manifest.
    """
    if transfer not in ("vmsplice", "readv"):
        raise ValueError("transfer must be vmsplice or readv, not %r" % (transfer,))
    from .engines.ptrace import PtraceEngine
    from .space import attach
    image = ImageWriter(directory)
    rounds = []
    t_start = time.monotonic()
    space = tracker = scanner = engine = splicer = None
    try:
        space = attach(pid, engine="agent")
        agent = space._engine
        skip = agent_ranges(agent)
        tracker = _Tracker(space)
        scanner = _Scanner(pid)
        if transfer == "vmsplice":
            # The agent's vmsplice work is ours: do it where the dumper runs, not on the target's CPUs.
            try:
                os.sched_setaffinity(agent.agent_tid, os.sched_getaffinity(0))
            except OSError:
                pass
            splicer = _Splicer(space)
            skip.append((splicer.iov, splicer.iov + 16 * 1024))
        whole = set()

        def one_round(final):
            t0 = time.monotonic()
            pages = 0
            maps = read_maps(pid, skip)
            keys = {m.key for m in maps}
            for key in [k for k in tracker.ranges if k not in keys]:
                tracker.forget(key)
            for m in maps:
                if "r" not in m.perms:
                    continue
                new = m.key not in tracker.ranges and m.key not in whole
                if new and not (m.perms[3] == "p" and "w" in m.perms and tracker.register(m)):
                    whole.add(m.key)
                if m.key in whole or (new and m.path and not m.path.startswith("[")):
                    # Untracked, or a file mapping's first copy: all of it.
                    for s, e in (splicer.move(image, [m.key]) if splicer is not None and not final else [m.key]):
                        _copy(pid, image, s, e, final)
                    pages += (m.end - m.start) // PAGE
                    if m.key in tracker.ranges:
                        scanner.regions(m.start, m.end, PAGE_IS_WRITTEN, wp=True)   # protect what we copied
                    continue
                written = scanner.regions(m.start, m.end, PAGE_IS_WRITTEN, wp=not final)   # frozen: no need
                if splicer is not None and not final:
                    written_left = splicer.move(image, written)
                else:
                    written_left = written
                _copy_ranges(pid, image, written_left, final)
                pages += sum(e - s for s, e in written) // PAGE
            if final:
                for m in maps:                       # pages dropped since they were copied read as zeros
                    if m.key in tracker.ranges and not m.path:
                        present = scanner.regions(m.start, m.end, PAGE_IS_PRESENT | PAGE_IS_SWAPPED)
                        for s, e in _gaps(m.start, m.end, present):
                            image.zero(s, e - s)
            rounds.append(dict(round=len(rounds) + 1, final=final, pages=pages, seconds=time.monotonic() - t0))
            if progress:
                progress(len(rounds), pages, image.bytes_written)
            return pages, maps

        previous = None
        for i in range(16 if until_converged else pre_dumps):
            pages, _ = one_round(False)
            # Converged: the round is small enough to copy frozen in a blink, or barely shrinks
            # (another round would only disturb the target again for little).
            if until_converged and (pages * PAGE <= CONVERGED_BYTES or
                                    previous is not None and pages > previous * 0.7):
                break
            previous = pages
        engine = PtraceEngine(pid, pid, reap_leader=False, check_seccomp=False)
        t_freeze = time.monotonic()
        engine.freeze(exclude=(agent.agent_tid,))
        frozen_at = time.monotonic() - t_freeze
        # First what only each thread can say: running a call in it lets the kernel update its rseq
        # area on the way back, so the memory is copied after that.
        thread_only = {tid: _thread_only(space, engine, tid) for tid in sorted(engine._frozen)}
        image.hold()
        _, maps = one_round(True)
        t_state = time.monotonic()
        ours = {tracker.uffd, splicer and splicer.write_fd, struct.unpack_from("<i", agent._map, _core.LAYOUT["HEADER_OFF"] +
                                                  _core.LAYOUT["header.caller_pidfd"])[0]}
        state = _process_state(pid, space, engine, maps, ours, thread_only)
        state["freeze_breakdown"] = dict(stop_threads=frozen_at, last_round=rounds[-1]["seconds"],
                                         state=time.monotonic() - t_state)
        if on_frozen is None and leave_running:     # nobody needs the image while it is frozen: let it go first
            engine.thaw()
        freeze_s = time.monotonic() - t_freeze
        image.flush()
        flags = _vm_flags(pid)
        mappings = [dict(m.as_dict(), vm_flags=flags.get(m.start, "")) for m in maps]
        manifest = dict(pid=pid, mappings=mappings, rounds=rounds, freeze_seconds=freeze_s,
                        total_seconds=time.monotonic() - t_start, bytes_written=image.bytes_written,
                        transfer=transfer, bytes_spliced=image.spliced_bytes, **state)
        image.finish(manifest)
        if on_frozen:
            on_frozen(pid)
        return manifest
    except BaseException as e:
        image.abort("%s: %s" % (type(e).__name__, e))
        raise
    finally:
        if scanner is not None:
            scanner.close()
        if splicer is not None:
            try:
                splicer.close()
            except (OSError, PvmexecError):
                pass
        if tracker is not None:
            try:
                tracker.close()
            except (OSError, PvmexecError):
                pass
        if not leave_running and engine is not None:
            try:
                os.kill(pid, signal.SIGKILL)            # while still frozen: it never runs again
            except ProcessLookupError:
                pass
            # Take our (tracer's) notice of each death, the leader's last (it waits for the others),
            # so that the real parent gets its own; if we are that parent, its wait is ours to leave.
            ours = _parent_of(pid) == os.getpid()
            for tid in sorted(engine._frozen, key=lambda t: t == pid):
                if tid == pid and ours:
                    continue
                try:
                    _core.wait(tid, True, False)
                except OSError:
                    pass
            engine._frozen.clear()
        if engine is not None:
            engine.thaw()                           # before the agent leaves: it unmaps itself with ptrace
        if space is not None:
            try:
                space.detach()
            except TargetGone:
                if leave_running:
                    raise


def _vm_flags(pid):
    """start -> the kernel's VmFlags for each mapping (rd wr ex sh gd dd hg ...), from smaps."""
    out, start = {}, None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                start = int(line.split("-", 1)[0], 16)
            elif line.startswith("VmFlags:") and start is not None:
                out[start] = line.split(":", 1)[1].strip()
    return out


def _parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def agent_ranges(agent):
    """The agent's own region in the target: not part of the image."""
    return [(agent.code_base, agent.code_base + _core.LAYOUT["REGION_SIZE"])] if agent.code_base else []


def _gaps(start, end, regions):
    at = start
    for s, e in sorted(regions):
        if s > at:
            yield at, s
        at = max(at, e)
    if at < end:
        yield at, end


def _thread_only(space, engine, tid):
    """What only the thread itself can tell (its alternate signal stack, its clear_child_tid), asked by
    running the call in it (ptrace, it is frozen anyway), and its robust list (asked by the agent)."""
    out = {}
    with space.scratch(64) as mem:
        engine.tid = tid
        try:
            if engine.syscall(131, (0, mem)) == 0:                          # sigaltstack(NULL, &old)
                sp, flags, size = struct.unpack("<Qi4xQ", space.read(mem, 24))
                out["sigaltstack"] = dict(sp=sp, flags=flags, size=size)
            if engine.syscall(157, (40, mem + 32, 0, 0, 0)) == 0:           # prctl(PR_GET_TID_ADDRESS)
                out["clear_child_tid"] = struct.unpack("<Q", space.read(mem + 32, 8))[0]
        finally:
            engine.tid = engine.pid
        if space.syscall_raw("get_robust_list", tid, mem + 40, mem + 48) == 0:
            head, length = struct.unpack("<QQ", space.read(mem + 40, 16))
            out["robust_list"] = dict(head=head, len=length)
    return out


def _process_state(pid, space, engine, maps, our_fds, thread_only):
    """Everything but memory, while frozen: per thread and per process."""
    threads = []
    for tid in sorted(engine._frozen):
        t = dict(tid=tid, regs=_core.getregs(tid).hex(), sigmask=_core.getsigmask(tid))
        try:
            t["xstate"] = _core.getregset(tid, NT_X86_XSTATE).hex()
        except OSError:
            pass
        t["pending"] = [s.hex() for s in _core.peeksiginfo(tid, False, 64)]
        rseq = _core.rseq_config(tid)
        if rseq:
            t["rseq"] = dict(zip(("addr", "size", "signature"), rseq))
        t.update(thread_only.get(tid, {}))
        threads.append(t)
    state = dict(threads=threads)
    state["shared_pending"] = [s.hex() for s in _core.peeksiginfo(pid, True, 64)]
    with open("/proc/%d/auxv" % pid, "rb") as f:
        state["auxv"] = f.read().hex()
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    names = ("start_code", "end_code", "start_stack", "start_brk", "brk", "arg_start", "arg_end", "env_start",
             "env_end")
    idx = (23, 24, 25, 44, 45, 46, 47, 48, 49)                 # after the command: field number - 3
    state["mm"] = {n: int(fields[i]) for n, i in zip(names, idx) if i < len(fields)}
    with open("/proc/%d/personality" % pid) as f:
        state["personality"] = int(f.read(), 16)
    state["cwd"] = os.readlink("/proc/%d/cwd" % pid)
    state["root"] = os.readlink("/proc/%d/root" % pid)
    state["rlimits"] = {name: list(resource.prlimit(pid, getattr(resource, name)))
                        for name in dir(resource) if name.startswith("RLIMIT_")}
    fds = []
    for fd in sorted(int(x) for x in os.listdir("/proc/%d/fd" % pid)):
        if fd in our_fds:                                        # the dump's own, gone when it ends
            continue
        try:
            target = os.readlink("/proc/%d/fd/%d" % (pid, fd))
            with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
                info = dict(line.split(":", 1) for line in f.read().splitlines() if ":" in line)
        except OSError:
            continue
        fds.append(dict(fd=fd, path=target, pos=int(info.get("pos", "0")), flags=int(info.get("flags", "0"), 8)))
    state["fds"] = fds
    sigactions = {}
    with space.scratch(64) as mem:                              # only the process itself can tell
        for sig in range(1, 65):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            if space.syscall_raw("rt_sigaction", sig, 0, mem, 8) == 0:
                handler, flags, restorer, mask = struct.unpack("<QQQQ", space.read(mem, 32))
                if handler or flags or mask:
                    sigactions[sig] = dict(handler=handler, flags=flags, restorer=restorer, mask=mask)
        state["sigactions"] = sigactions
        itimers = {}
        for which, name in ((0, "real"), (1, "virtual"), (2, "prof")):
            if space.syscall_raw("getitimer", which, mem) == 0:
                itimers[name] = list(struct.unpack("<qqqq", space.read(mem, 32)))
        state["itimers"] = itimers
    return state


# -- reading an image back --------------------------------------------------------------------------

class Image:
    def __init__(self, directory):
        self.dir = directory
        try:
            with open(os.path.join(directory, "manifest.json")) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise DumpError(errno.EINVAL, "%s is not a pvmexec image: %s" % (directory, e)) from None
        if self.manifest.get("version") != IMAGE_VERSION:
            raise DumpError(errno.EINVAL, "image version %r, this pvmexec reads %d" % (
                self.manifest.get("version"), IMAGE_VERSION))

    def check(self):
        """The checksums; a DumpError names what is wrong."""
        if not self.manifest.get("complete"):
            raise DumpError(errno.EINVAL, "the image is incomplete (%s)" % self.manifest.get("error", "unknown"))
        for name, want in self.manifest["checksums"].items():
            if _sha256(os.path.join(self.dir, name)) != want:
                raise DumpError(errno.EINVAL, "%s does not match its checksum" % name)

    def page_index(self):
        """address -> offset in pages.img (or ZERO): the last entry wins."""
        out = {}
        with open(os.path.join(self.dir, "pages.idx"), "rb") as f:
            raw = f.read()
        for addr, off in struct.iter_unpack("<QQ", raw[:len(raw) // 16 * 16]):
            out[addr] = off
        return out

    def summary(self):
        m = self.manifest
        lines = ["pvmexec image %s (version %d, %s)" % (self.dir, m["version"],
                                                          "complete" if m.get("complete") else "INCOMPLETE")]
        if not m.get("complete"):
            lines.append("  error: %s" % m.get("error", "?"))
            return "\n".join(lines)
        idx = self.page_index()
        lines.append("  process %d: %d threads, %d mappings, %d pages (%.1f MiB) in the image" % (
            m["pid"], len(m["threads"]), len(m["mappings"]), sum(1 for v in idx.values() if v != ZERO),
            sum(1 for v in idx.values() if v != ZERO) * PAGE / 2 ** 20))
        for r in m["rounds"]:
            lines.append("  round %d%s: %d pages in %.3f s" % (r["round"], " (frozen)" if r["final"] else "",
                                                               r["pages"], r["seconds"]))
        lines.append("  freeze %.3f s, total %.3f s, %.1f MiB written" % (
            m["freeze_seconds"], m["total_seconds"], m["bytes_written"] / 2 ** 20))
        lines.append("  cwd %s, %d descriptors, %d signal handlers" % (m["cwd"], len(m["fds"]), len(m["sigactions"])))
        for mp in m["mappings"]:
            lines.append("  %012x-%012x %s %s" % (mp["start"], mp["end"], mp["perms"], mp["path"]))
        return "\n".join(lines)


def verify(directory, pid, frozen=False):
    """Compare the image's memory with process pid's, page by page, through /proc/PID/mem.

    Freezes the process meanwhile unless frozen (already stopped by the caller). Returns a list
    of differences (address, what): empty when they match.
    """
    img = Image(directory)
    img.check()
    engine = None
    if not frozen:
        from .engines.ptrace import PtraceEngine
        engine = PtraceEngine(pid, pid, reap_leader=False, check_seccomp=False)
        engine.freeze()
    diffs = []
    try:
        idx = img.page_index()
        mem = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
        with open(os.path.join(directory, "pages.img"), "rb") as pages:
            try:
                for mp in img.manifest["mappings"]:
                    if "r" not in mp["perms"]:
                        continue
                    for addr in range(mp["start"], mp["end"], PAGE):
                        off = idx.get(addr)
                        if off is None or off == ZERO:
                            want = bytes(PAGE)
                        else:
                            pages.seek(off)
                            want = pages.read(PAGE)
                        try:
                            got = os.pread(mem, PAGE, addr)
                        except OSError as e:
                            if off is not None and off != ZERO:     # e.g. a file mapping past the file's end
                                diffs.append((addr, "unreadable in the process: %s" % e.strerror))
                            continue
                        if got != want:
                            diffs.append((addr, "differs" if off is not None else "not in the image"))
            finally:
                os.close(mem)
    finally:
        if engine is not None:
            engine.thaw()
    return diffs
