"""The checkpoint image: its files, its fields and version, the writer and the reader.

Image format (version 3), a directory:
  manifest.json   what was dumped (MANIFEST_FIELDS below); "complete": false until the end
  pages.img       page contents, appended round after round (4096 bytes each)
  pages.sums      the SHA-256 of each 1 MiB chunk of pages.img, in order (32 bytes each): a lazy
                  restore checks each chunk it serves pages from before the process sees them
  pages.idx       little-endian (u64 address, u64 offset in pages.img) pairs; the last pair for an
                  address wins; offset 2**64-1 (ZERO) means the page reads as zeros, 2**64-2
                  (FROM_FILE) as the mapped file's
Checksums (SHA-256) of pages.sums and pages.idx are in the manifest. docs/image-format.md
describes every field; IMAGE_VERSION changes whenever a reader of the old version would
misread a new image (a field removed, renamed or given another meaning); adding a field that
old readers may ignore does not change it.
"""
from __future__ import annotations

from typing import Any

import errno
import hashlib
import json
import os
import struct
import threading
from array import array

from ..abi import PAGE
from ..errors import PvmexecError


IMAGE_VERSION = 3
CHUNK = 1 << 20                 # pages.img is checksummed in chunks of this size
ZERO = (1 << 64) - 1
FROM_FILE = (1 << 64) - 2       # the page reads as the mapped file's (its copy-on-write copy is gone)

# Every manifest field: name -> (where, required, meaning). "optional" fields are absent when the
# kernel or the target could not say (and why is in docs/image-format.md).
MANIFEST_FIELDS = {
    "version": ("image", True, "IMAGE_VERSION of the writer"),
    "complete": ("image", True, "false until the image is whole; with error when a dump failed"),
    "error": ("image", False, "why the dump failed (incomplete images only)"),
    "checksums": ("image", True, "SHA-256 of pages.sums (and so of pages.img) and of pages.idx"),
    "pid": ("process", True, "the dumped process"),
    "mappings": ("process", True, "each mapping: start, end, perms, offset, path, vm_flags, source (memory, file or "
                                  "shared-file: where pages not in the image are); file (ino, dev, size, mtime_ns)"),
    "rounds": ("dump", True, "each round: round, final, pages, seconds"),
    "freeze_seconds": ("dump", True, "how long the target was frozen"),
    "stopped": ("process", True, "stopped by job control when dumped (a restore leaves it stopped)"),
    "freeze_breakdown": ("dump", True, "stop_threads, last_round, state (seconds)"),
    "total_seconds": ("dump", True, "the whole dump"),
    "bytes_written": ("dump", True, "bytes of pages.img"),
    "bytes_spliced": ("dump", True, "of which moved by splice"),
    "transfer": ("dump", True, "readv or vmsplice"),
    "threads": ("process", True, "each thread: tid, regs, sigmask, pending, seccomp (mode, filters); optional xstate, rseq, "
                                 "sigaltstack, clear_child_tid, robust_list"),
    "shared_pending": ("process", True, "siginfo of process-wide pending signals (hex)"),
    "auxv": ("process", True, "the auxiliary vector (hex)"),
    "mm": ("process", True, "start_code ... env_end from /proc/PID/stat, brk as brk(0) answers"),
    "exe": ("process", True, "the program, as /proc/PID/exe reads"),
    "comm": ("process", True, "the process's name (/proc/PID/comm)"),
    "vdso": ("process", True, "the kernel's mappings ([vdso], [vvar], [vvar_vclock]): start, end, path; "
                              "sha256 of the vDSO"),
    "personality": ("process", True, "personality(2) flags"),
    "umask": ("process", False, "the file mode creation mask (/proc/PID/status, since Linux 4.7)"),
    "cwd": ("process", True, "working directory"),
    "root": ("process", True, "root directory"),
    "rlimits": ("process", True, "RLIMIT_* name -> [soft, hard]"),
    "fds": ("process", True, "each descriptor: fd, path, pos, flags; mode, dev, ino, size, rdev (its stat)"),
    "sigactions": ("process", True, "signal -> handler, flags, restorer, mask (non-default only)"),
    "itimers": ("process", True, "real, virtual, prof: [interval s, us, value s, us]"),
    "posix_timers": ("process", True, "each timer_create timer: id, clockid, signo, sigval, notify (sigev_notify), "
                                      "tid (its thread, for SIGEV_THREAD_ID), interval and value ([s, ns])"),
    "pipes": ("process", True, "pipe inode -> size (F_GETPIPE_SZ) and data (hex): what waited in each pipe read "
                               "through one of its descriptors"),
    "sockets": ("process", True, "socket inode -> family; for a Unix one type, name (hex when abstract), peer "
                                 "(inode), queued (bytes waiting), data (hex: a stream's waiting bytes, left "
                                 "there), fds_in_flight"),
    "creds": ("process", True, "uid, gid: [real, effective, saved, filesystem]; groups; dumpable (PR_GET_DUMPABLE); "
                               "caps (inh, prm, eff, bnd, amb); no_new_privs; seccomp (its mode); securebits"),
}


class DumpError(PvmexecError):
    """An image that cannot be written or read as one (incomplete, corrupted, another version)."""


class ImageWriter:
    """Writes an image: pages and index as rounds add them, the manifest last (complete: true)."""

    def __init__(self, directory: str) -> None:
        if os.path.exists(directory) and (not os.path.isdir(directory) or os.listdir(directory)):
            raise FileExistsError(errno.EEXIST, "%s exists and is not an empty directory" % directory)
        self.created = not os.path.exists(directory)
        os.makedirs(directory, exist_ok=True)
        self.dir = directory
        self.files = {"pages.img": open(os.path.join(directory, "pages.img"), "wb", buffering=0),  # splice joins in
                      "pages.idx": open(os.path.join(directory, "pages.idx"), "wb")}
        self.sums = {"pages.idx": hashlib.sha256()}                                     # as we write
        self.chunks = ChunkSums()
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

    def from_file(self, addr, length):
        n = length // PAGE
        self._write_index(_pairs(range(addr, addr + length, PAGE), [FROM_FILE] * n))

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
        if name == "pages.img":
            self.chunks.update(data)
        else:
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
            self.chunks = ChunkSums()
            with open(os.path.join(self.dir, "pages.img"), "rb") as f:
                for data in iter(lambda: f.read(CHUNK), b""):
                    self.chunks.update(data)
        digests = self.chunks.finish()
        with open(os.path.join(self.dir, "pages.sums"), "wb") as f:
            f.write(digests)
        sums["pages.sums"] = hashlib.sha256(digests).hexdigest()
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

    def discard(self):
        """Nothing worth keeping was written: remove the image's files, and the directory if we made it."""
        for f in self.files.values():
            try:
                f.close()
            except OSError:
                pass
        for name in ("pages.img", "pages.idx", "pages.sums", "manifest.json", "manifest.json.tmp"):
            try:
                os.unlink(os.path.join(self.dir, name))
            except FileNotFoundError:
                pass
        if self.created:
            try:
                os.rmdir(self.dir)
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


class ChunkSums:
    """The SHA-256 of each CHUNK of a stream, as it is written."""

    def __init__(self):
        self.digests, self.h, self.fill = bytearray(), hashlib.sha256(), 0

    def update(self, data):
        view = memoryview(data).cast("B")
        while len(view):
            take = min(len(view), CHUNK - self.fill)
            self.h.update(view[:take])
            self.fill += take
            view = view[take:]
            if self.fill == CHUNK:
                self.digests += self.h.digest()
                self.h, self.fill = hashlib.sha256(), 0

    def finish(self):
        if self.fill:
            self.digests += self.h.digest()
            self.h, self.fill = hashlib.sha256(), 0
        return bytes(self.digests)


class ChunkCheck:
    """pages.img's chunk digests: check(i, data) raises DumpError unless chunk i is data."""

    def __init__(self, digests, size):
        self.digests, self.size = digests, size
        self.good = bytearray(len(digests) // 32)      # chunks checked already

    def read(self, fd, off, length):
        """length bytes of pages.img (open as fd) at off, once the chunks they are in are checked."""
        for i in range(off // CHUNK, (off + length - 1) // CHUNK + 1):
            if not self.good[i]:
                self.check(i, os.pread(fd, CHUNK, i * CHUNK))
                self.good[i] = 1
        data = os.pread(fd, length, off)
        if len(data) != length:
            raise DumpError(errno.EIO, "pages.img is short at offset %d" % off)
        return data

    def __len__(self):
        return len(self.digests) // 32

    def check(self, i, data):
        if len(data) != min(CHUNK, self.size - i * CHUNK) or \
                hashlib.sha256(data).digest() != self.digests[32 * i:32 * i + 32]:
            raise DumpError(errno.EINVAL, "pages.img does not match its checksum (chunk %d, at offset %d)" % (
                i, i * CHUNK))


class Image:
    """A checkpoint image read back: its manifest (validated), checksums, page index and summary."""

    def __init__(self, directory: str) -> None:
        self.dir = directory
        self.manifest: dict[str, Any]
        self._index = None                      # pages.idx, read once (a restore checks and plans with it)
        self._index_lock = threading.Lock()
        try:
            with open(os.path.join(directory, "manifest.json")) as f:
                self.manifest = json.load(f)
        except (OSError, ValueError) as e:
            raise DumpError(errno.EINVAL, "%s is not a pvmexec image: %s" % (directory, e)) from None
        if not isinstance(self.manifest, dict):
            raise DumpError(errno.EINVAL, "%s: the manifest is not a JSON object" % directory)
        if self.manifest.get("version") != IMAGE_VERSION:
            raise DumpError(errno.EINVAL, "image version %r, this pvmexec reads %d" % (
                self.manifest.get("version"), IMAGE_VERSION))
        if self.manifest.get("complete") is True:
            _validate(directory, self.manifest)

    def check(self) -> None:
        """The checksums; a DumpError names what is wrong."""
        chunks = self.chunk_sums()
        try:
            with open(os.path.join(self.dir, "pages.img"), "rb") as f:
                for i in range(len(chunks)):
                    chunks.check(i, f.read(CHUNK))
        except OSError as e:
            raise DumpError(e.errno or errno.EIO, "the image's pages.img: %s" % e.strerror) from None

    def chunk_sums(self) -> "ChunkCheck":
        """What checks pages.img chunk by chunk, once pages.idx and pages.sums match the manifest and
        pages.sums has one digest per chunk of pages.img (a lazy restore checks each chunk as it serves it)."""
        if not self.manifest.get("complete"):
            raise DumpError(errno.EINVAL, "the image is incomplete (%s)" % self.manifest.get("error", "unknown"))
        sums = self.manifest["checksums"]
        try:
            if hashlib.sha256(self._index_bytes()).hexdigest() != sums["pages.idx"]:
                raise DumpError(errno.EINVAL, "pages.idx does not match its checksum")
            with open(os.path.join(self.dir, "pages.sums"), "rb") as f:
                digests = f.read()
            size = os.stat(os.path.join(self.dir, "pages.img")).st_size
        except OSError as e:
            raise DumpError(e.errno or errno.EIO, "the image's %s: %s" % (os.path.basename(e.filename or "?"),
                                                                         e.strerror)) from None
        if hashlib.sha256(digests).hexdigest() != sums["pages.sums"]:
            raise DumpError(errno.EINVAL, "pages.sums does not match its checksum")
        if len(digests) != 32 * -(-size // CHUNK):
            raise DumpError(errno.EINVAL, "pages.img does not match its checksum (%d bytes, %d chunk digests)" % (
                size, len(digests) // 32))
        return ChunkCheck(digests, size)

    def page_index(self) -> dict[int, int]:
        """address -> offset in pages.img (or ZERO): the last entry wins."""
        return dict(struct.iter_unpack("<QQ", self.raw_index()))

    def raw_index(self) -> bytes:
        """pages.idx as it is: (u64 address, u64 offset) pairs."""
        raw = self._index_bytes()
        return raw[:len(raw) // 16 * 16]

    def _index_bytes(self):
        """The very bytes of pages.idx that its checksum was checked on, and that are then used."""
        with self._index_lock:
            if self._index is None:
                with open(os.path.join(self.dir, "pages.idx"), "rb") as f:
                    self._index = f.read()
            return self._index

    def runs(self) -> list[tuple[int, int, int]]:
        """The index as sorted runs (address, offset or ZERO/FROM_FILE, pages), the last entry winning:
        a run's pages follow each other in memory and in pages.img, or share the marker."""
        from .. import _core
        return list(struct.iter_unpack("<QQQ", _core.index_runs(self.raw_index())))

    def readable(self) -> dict[str, Any]:
        """The manifest, with each thread's registers by name (as crit show decodes an image)."""
        from ..arch import current
        arch = current()
        m = json.loads(json.dumps(self.manifest))
        for t in m.get("threads", ()):
            raw = bytes.fromhex(t.get("regs", "")) if isinstance(t.get("regs"), str) else b""
            if len(raw) == arch.REGS_SIZE:
                t["regs"] = {n: "%#x" % v for n, v in zip(arch.REG_NAMES, struct.unpack("<%dQ" % len(arch.REG_NAMES), raw))}
        return m

    def summary(self) -> str:
        m = self.manifest
        lines = ["pvmexec image %s (version %d, %s)" % (self.dir, m["version"],
                                                          "complete" if m.get("complete") else "INCOMPLETE")]
        if not m.get("complete"):
            lines.append("  error: %s" % m.get("error", "?"))
            return "\n".join(lines)
        idx = self.page_index()
        lines.append("  process %d: %d threads, %d mappings, %d pages (%.1f MiB) in the image" % (
            m["pid"], len(m["threads"]), len(m["mappings"]), sum(1 for v in idx.values() if v < FROM_FILE),
            sum(1 for v in idx.values() if v < FROM_FILE) * PAGE / 2 ** 20))
        for r in m["rounds"]:
            lines.append("  round %d%s: %d pages in %.3f s" % (r["round"], " (frozen)" if r["final"] else "",
                                                               r["pages"], r["seconds"]))
        lines.append("  freeze %.3f s, total %.3f s, %.1f MiB written" % (
            m["freeze_seconds"], m["total_seconds"], m["bytes_written"] / 2 ** 20))
        lines.append("  cwd %s, %d descriptors, %d signal handlers" % (m["cwd"], len(m["fds"]), len(m["sigactions"])))
        for mp in m["mappings"]:
            lines.append("  %012x-%012x %s %s" % (mp["start"], mp["end"], mp["perms"], mp["path"]))
        return "\n".join(lines)


_TYPES = {"pid": int, "mappings": list, "rounds": list, "threads": list, "fds": list, "sigactions": dict,
          "freeze_seconds": (int, float), "total_seconds": (int, float), "bytes_written": int, "cwd": str,
          "checksums": dict, "exe": str, "comm": str, "vdso": list, "creds": dict, "pipes": dict,
          "sockets": dict, "posix_timers": list}


def _validate(directory, m):
    """A complete image's manifest has every required field, of its type, and its two checksums."""
    missing = sorted(n for n, (_w, required, _m) in MANIFEST_FIELDS.items() if required and n not in m)
    if missing:
        raise DumpError(errno.EINVAL, "%s: the manifest lacks %s" % (directory, ", ".join(missing)))
    for name, typ in _TYPES.items():
        if not isinstance(m[name], typ) or isinstance(m[name], bool):
            raise DumpError(errno.EINVAL, "%s: the manifest's %s is not a %s" % (
                directory, name, getattr(typ, "__name__", "number")))
    if set(m["checksums"]) != {"pages.sums", "pages.idx"} or not all(
            isinstance(v, str) and len(v) == 64 for v in m["checksums"].values()):
        raise DumpError(errno.EINVAL, "%s: the manifest's checksums must be the SHA-256 of pages.sums and "
                        "pages.idx" % directory)
    for i, mp in enumerate(m["mappings"]):
        if not (isinstance(mp, dict) and all(isinstance(mp.get(k), int) for k in ("start", "end", "offset"))
                and isinstance(mp.get("perms"), str) and isinstance(mp.get("path"), str)
                and 0 <= mp["start"] < mp["end"] < 1 << 64):
            raise DumpError(errno.EINVAL, "%s: the manifest's mapping %d is malformed" % (directory, i))
    for i, r in enumerate(m["rounds"]):
        if not (isinstance(r, dict) and all(isinstance(r.get(k), (int, float)) for k in ("round", "pages", "seconds"))):
            raise DumpError(errno.EINVAL, "%s: the manifest's round %d is malformed" % (directory, i))
