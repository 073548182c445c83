"""Live checkpoint: pre-dump a running process's memory without stopping it, then a short-freeze final dump.

Each round copies only the pages written since the round before (tracking.py);
the final round runs with every thread frozen (ptrace), then records the
threads' and the process's state (state.py). Everything is undone before the
target goes on: no userfaultfd, no write protection, no agent thread.
"""
from __future__ import annotations

from typing import Any, Callable

import errno
import os
import signal
import time
import warnings

from .. import _core
from ..abi import PAGE, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT, PAGE_IS_SWAPPED, PAGE_IS_WRITTEN
from ..errors import PvmexecError, TargetGone
from . import state
from .image import DumpError, ImageWriter
from .tracking import Scanner, Tracker, gaps, held_ranges, read_maps
from .transfer import Splicer, copy_range, copy_ranges


CONVERGED_BYTES = 8 << 20
MAX_ROUNDS = 16


def dump(pid: int, directory: str, pre_dumps: int = 2, until_converged: bool = False, leave_running: bool = True,
         progress: Callable[[int, int, int], None] | None = None, on_frozen: Callable[[int], None] | None = None,
         transfer: str = "readv", copying: Callable[[int, int, int, int], None] | None = None) -> dict[str, Any]:
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
    slows it); the frozen round always reads. copying(round, pages copied, pages expected, bytes
    written) reports progress within a round, at most ten times a second (expected: the mappings'
    size in the first round, the round before's pages after). Returns the manifest.
    """
    if transfer not in ("vmsplice", "readv"):
        raise ValueError("transfer must be vmsplice or readv, not %r" % (transfer,))
    run = _Dump(pid, directory, transfer, progress, copying)
    try:
        run.start()
        run.pre_dumps(pre_dumps, until_converged)
        run.freeze()
        run.final_round()
        manifest = run.finish(leave_running and on_frozen is None)
        if on_frozen:
            on_frozen(pid)
        return manifest
    except BaseException as e:
        if not run.image.bytes_written:     # failed before anything was copied: leave nothing behind
            run.image.discard()
        else:
            run.image.abort("%s: %s" % (type(e).__name__, e))
        raise
    finally:
        run.close(leave_running)


class _Dump:
    """One dump's state across its steps."""

    def __init__(self, pid, directory, transfer, progress, copying=None):
        self.pid, self.transfer, self.progress, self.copying = pid, transfer, progress, copying
        self.image = ImageWriter(directory)
        self.rounds = []
        self.t_start = time.monotonic()
        self.space = self.agent = self.tracker = self.scanner = self.engine = self.splicer = None
        self.whole = set()             # mappings copied (what they hold) every round: untracked
        self.sources = {}              # key -> (how the image holds it, the file's identity)
        self.stopped = False           # stopped by job control when the dump began
        self.ptrace_only = False       # stopped, or under seccomp: no agent, one frozen round

    def start(self):
        from ..space import attach
        self.stopped = _job_stopped(self.pid)
        if self.stopped or _under_seccomp(self.pid):
            # Stopped by job control, as gcore and CRIU take it: it does not run, so one frozen round
            # copies everything; calls go through ptrace (an agent thread would stop with it). It
            # stays stopped afterwards. Under seccomp the same (stop-the-world, then it runs on): the
            # ptrace engine checks each call against its filters, an agent could not.
            self.ptrace_only = True
            self.space = attach(self.pid, engine="ptrace", freeze=True)
            self.engine = self.space.backend
            self.scanner = Scanner(self.pid)
            self.t_freeze, self.frozen_at = time.monotonic(), 0.0
            return
        self.space = attach(self.pid, engine="agent")
        self.agent = self.space.backend
        self.tracker = Tracker(self.space)
        self.scanner = Scanner(self.pid)
        if self.transfer == "vmsplice":
            # The agent's vmsplice work is ours: do it where the dumper runs, not on the target's CPUs.
            try:
                os.sched_setaffinity(self.agent.agent_tid, os.sched_getaffinity(0))
            except OSError:
                pass
            self.splicer = Splicer(self.space)

    def pre_dumps(self, count, until_converged):
        if self.ptrace_only:
            return
        previous = None
        for _ in range(MAX_ROUNDS if until_converged else count):
            pages, _ = self.one_round(False)
            # Converged: the round is small enough to copy frozen in a blink, or barely shrinks
            # (another round would only disturb the target again for little).
            if until_converged and (pages * PAGE <= CONVERGED_BYTES or
                                    previous is not None and pages > previous * 0.7):
                break
            previous = pages

    def freeze(self):
        if self.ptrace_only:
            return                          # frozen since start()
        from ..engines.ptrace import PtraceEngine
        self.engine = PtraceEngine(self.pid, self.pid, reap_leader=False, check_seccomp=False)
        self.t_freeze = time.monotonic()
        self.engine.freeze(exclude=(self.agent.agent_tid,))
        self.frozen_at = time.monotonic() - self.t_freeze

    def final_round(self):
        # First the state: running a call in a thread (what only it can say; and every call of a
        # stopped target's dump, which has no agent) lets the kernel update its rseq area on the way
        # back, so the memory is copied after that.
        t_state = time.monotonic()
        asked = {tid: state.thread_only(self.space, self.engine, tid) for tid in sorted(self.engine.frozen_tids())}
        ours = {self.tracker and self.tracker.uffd, self.splicer and self.splicer.write_fd} | (
            self.agent.own_fds() if self.agent else set())
        self.state = state.process_state(self.pid, self.space, self.engine, ours, asked)
        state_s = time.monotonic() - t_state
        self.image.hold()
        _, self.maps = self.one_round(True)
        self.state["freeze_breakdown"] = dict(stop_threads=self.frozen_at, last_round=self.rounds[-1]["seconds"],
                                              state=state_s)

    def finish(self, thaw_first):
        """Write the image; thaw_first: nobody needs the target frozen any longer, let it go first."""
        if thaw_first:
            self._release_frozen()
        freeze_s = time.monotonic() - self.t_freeze
        self.image.flush()
        flags = state.vm_flags(self.pid)
        mappings = []
        for m in self.maps:
            how, ident = self.source(m)
            mappings.append(dict(m.as_dict(), vm_flags=flags.get(m.start, ""), source=how,
                                 **({"file": ident} if ident else {})))
        manifest = dict(pid=self.pid, mappings=mappings, rounds=self.rounds, freeze_seconds=freeze_s, stopped=self.stopped,
                        total_seconds=time.monotonic() - self.t_start, bytes_written=self.image.bytes_written,
                        transfer=self.transfer, bytes_spliced=self.image.spliced_bytes, **self.state)
        self.image.finish(manifest)
        return manifest

    def one_round(self, final):
        """Copy what changed (everything, for mappings seen first); returns (pages, maps)."""
        pid, image, scanner, splicer = self.pid, self.image, self.scanner, self.splicer
        tracker = self.tracker or _NoTracker
        t0 = last_report = time.monotonic()
        pages = 0
        maps = read_maps(pid, self.space.own_mappings() + (self.engine.own_mappings() if self.engine else []))
        expected = self.rounds[-1]["pages"] if self.rounds else sum(
            (m.end - m.start) // PAGE for m in maps if "r" in m.perms)
        keys = {m.key for m in maps}
        for key in [k for k in tracker.ranges if k not in keys]:
            tracker.forget(key)
        for m in maps:
            if self.copying and time.monotonic() - last_report >= 0.1:
                last_report = time.monotonic()
                self.copying(len(self.rounds) + 1, pages, max(expected, pages), image.bytes_written)
            if "r" not in m.perms:
                continue
            new = m.key not in tracker.ranges and m.key not in self.whole
            # Only private anonymous memory is tracked: in a file mapping, write protection leaves
            # markers on the file's own pages that PAGEMAP_SCAN reports as swapped, so its pages the
            # process changed could not be told from the file's.
            if new and not (m.perms[3] == "p" and "w" in m.perms and m.anonymous and tracker.register(m)):
                self.whole.add(m.key)
            if m.key in self.whole or new:
                # Untracked, or seen first: what it holds of its own. A tracked one is protected in
                # the same step (what is written while we copy shows in the next round); its pages
                # are those held then (protection leaves markers that later scans see as swapped).
                held = self._held(m, final) if m.key not in tracker.ranges or final else self._protect(m)
                if held is None:
                    continue                    # changed under us: the next round takes it as new
                left = splicer.move(image, held) if splicer is not None and not final else held
                copy_ranges(pid, image, left, final)
                pages += sum(e - s for s, e in held) // PAGE
                continue
            written = self._scan(m, PAGE_IS_WRITTEN, wp=not final, final=final)   # frozen: no need
            if written is None:
                continue
            left = splicer.move(image, written) if splicer is not None and not final else written
            copy_ranges(pid, image, left, final)
            pages += sum(e - s for s, e in written) // PAGE
        if final:
            for m in maps:                       # pages dropped since they were copied: zeros, or the file's
                if "r" in m.perms:
                    self._mark_dropped(m)
        self.rounds.append(dict(round=len(self.rounds) + 1, final=final, pages=pages,
                                seconds=time.monotonic() - t0))
        if self.progress:
            self.progress(len(self.rounds), pages, image.bytes_written)
        return pages, maps

    def source(self, m):
        """How the image holds m: "file" (pages not in it are the mapped file's), "shared-file" (all are
        the file's: none copied) or "memory" (pages not in it are zeros); and the file's identity."""
        if m.key not in self.sources:
            ident = m.file_identity()
            self.sources[m.key] = ("memory" if ident is None else "shared-file" if m.shared else "file", ident)
        return self.sources[m.key]

    def _protect(self, m):
        """Write-protect a newly tracked mapping; the ranges it held just before, or None if it changed."""
        try:
            found = self.scanner.categorized(m.start, m.end, PAGE_IS_WRITTEN,
                                             PAGE_IS_PRESENT | PAGE_IS_SWAPPED | PAGE_IS_PFNZERO, wp=True)
        except DumpError as e:
            if e.errno not in (errno.EPERM, errno.EINVAL, errno.ENOENT):
                raise
            self.tracker.forget(m.key)
            return None
        return [(s, e) for s, e, cats in found
                if cats & (PAGE_IS_PRESENT | PAGE_IS_SWAPPED) and not cats & PAGE_IS_PFNZERO]

    def _mark_dropped(self, m):
        """Frozen: the pages of m the process no longer holds (dropped, or back to the file's) are
        marked so in the image, whatever an earlier round copied of them."""
        how, _ident = self.source(m)
        if how == "shared-file":
            return
        for s, e in gaps(m.start, m.end, held_ranges(self.scanner, self.pid, m, how)):
            if how == "file":
                self.image.from_file(s, e - s)
            else:
                self.image.zero(s, e - s)

    def _held(self, m, final):
        return self._unless_changed(m, final, held_ranges, self.scanner, self.pid, m, self.source(m)[0])

    def _scan(self, m, categories, wp, final):
        return self._unless_changed(m, final, self.scanner.regions, m.start, m.end, categories, wp=wp)

    def _unless_changed(self, m, final, scan, *args, **kw):
        """A PAGEMAP_SCAN of mapping m. While the target runs, m may be unmapped or replaced between reading
        the maps and the scan (EPERM, EINVAL, ENOENT): then the round leaves it to the next one, which
        takes it as a new mapping (registered and copied whole), and returns None. Frozen, nothing moves."""
        try:
            return scan(*args, **kw)
        except DumpError as e:
            if final or e.errno not in (errno.EPERM, errno.EINVAL, errno.ENOENT):
                raise
            self.tracker.forget(m.key)
            return None

    def close(self, leave_running):
        """Undo everything in the target, whatever step failed."""
        for part in (self.scanner, self.splicer, self.tracker):
            if part is not None:
                try:
                    part.close()
                except (OSError, PvmexecError):
                    pass
        engine = self.engine
        if not leave_running and engine is not None:
            self._kill_frozen()
        if engine is not None:
            self._release_frozen()                  # before the agent leaves: it unmaps itself with ptrace
        if self.space is not None:
            try:
                if leave_running or engine is None:
                    self.space.detach()
                else:
                    # Killed by us: what the agent cannot take back (its zombie is still ours to
                    # wait for) goes with the process; no warning about it.
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore", RuntimeWarning)
                        self.space.detach()
            except TargetGone:
                if leave_running:
                    raise

    def _release_frozen(self):
        if self.engine.frozen_tids():
            self.engine.drop_trampoline()           # while frozen: nothing of ours stays mapped
        self.engine.thaw()

    def _kill_frozen(self):
        pid, engine = self.pid, self.engine
        try:
            os.kill(pid, signal.SIGKILL)            # while still frozen: it never runs again
        except ProcessLookupError:
            pass
        # Take our (tracer's) notice of each death, the leader's last (it waits for the others),
        # so that the real parent gets its own; if we are that parent, its wait is ours to leave.
        ours = state.parent_of(pid) == os.getpid()
        for tid in sorted(engine.frozen_tids(), key=lambda t: t == pid):
            if tid == pid and ours:
                continue
            try:
                _core.wait(tid, True, False)
            except OSError:
                pass
        engine.forget_frozen()


class _NoTracker:
    """A stopped target's dump tracks nothing: it is copied once, frozen."""
    ranges = {}

    @staticmethod
    def register(m):
        return False

    @staticmethod
    def forget(key):
        pass


def _under_seccomp(pid):
    from ..engines.target_filters import thread_mode
    try:
        return any(thread_mode(pid, int(tid))[0] for tid in os.listdir("/proc/%d/task" % pid))
    except OSError:
        return False


def _job_stopped(pid):
    """Whether pid is stopped by job control (T), not by a tracer of its own."""
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0] == "T"
    except (OSError, IndexError):
        return False

