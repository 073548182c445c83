"""Process machinery: a new process is a copy of its parent's guest mappings in a new space
(the stubs all share one layout, so nothing the guest remembers moves), run by a caller thread
of its own; finishing it notifies its parent. The handlers (fork, wait, ...) are in syscalls/process.py.
"""
import array
import errno
import os
import signal
import struct
import threading

from ..abi import (CLD_DUMPED, CLD_EXITED, CLD_KILLED, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID, CLONE_FILES, CLONE_FS,
                   MAP_FIXED_NOREPLACE, MAP_PRIVATE, MAP_SHARED, PAGE_IS_FILE, PAGE_IS_PFNZERO, PAGE_IS_PRESENT,
                   PAGE_IS_SWAPPED,
                   CLONE_NAMESPACES, CLONE_PARENT_SETTID, CLONE_SETTLS, CLONE_SIGHAND, CLONE_THREAD, CLONE_VFORK)
from .. import _core, proc
from ..arch import current as _current_arch
from ..proc import PagemapScan, mappings, maps_prot
from ..vdso import SPECIAL, move_specials
from .errors import Errno
from .syscalls.mm import drop_mapped, map_files_in_space
from .syscalls.timer import end_timers
from .task import Process, close_wake, kill_space, usage_of
from .threads import wait_for_threads

ARCH = _current_arch()


SIGCHLD = signal.SIGCHLD


def _file_key(fields):
    """(st_dev, st_ino) of the file a /proc/PID/maps line maps."""
    major, minor = (int(x, 16) for x in fields[3].split(":"))
    return os.makedev(major, minor), int(fields[4])
_ZEROS = bytes(1 << 20)                 # a fork's chunk of zeros: nothing to write to the child


class ProcessMachinery:
    """Mixed into Sandbox: `self` is the kernel."""

    def _clone(self, p, flags, newsp, parent_tid, child_tid, tls):
        flags &= 0xFFFFFFFFFFFFFFFF
        if flags & CLONE_NAMESPACES:
            raise Errno(errno.EPERM)
        if flags & CLONE_THREAD:
            return self._new_thread(p, flags, newsp, parent_tid, child_tid, tls)
        if flags & (CLONE_SIGHAND | CLONE_FILES | CLONE_FS) and not flags & CLONE_VFORK:
            raise Errno(errno.EINVAL)                   # sharing these between processes is not provided
        child = self._new_process(parent=p)
        try:
            child.space = self._new_space(p.patch_window)
            child.protected = p.protected
            if p.specials is not None:
                self._place_specials(child, p.specials)
            self._copy_memory(p, child)
        except BaseException:
            self._discard(child)
            raise
        child.ctx = ARCH.clone_child_context(p.ctx, newsp, tls if flags & CLONE_SETTLS else None)
        child.exit_signal = flags & 0xFF
        if flags & CLONE_PARENT_SETTID:
            for q in (p, child):
                q.write(parent_tid, struct.pack("<i", child.pid))
        if flags & CLONE_CHILD_SETTID:
            child.write(child_tid, struct.pack("<i", child.pid))
        if flags & CLONE_CHILD_CLEARTID:
            child.clear_child_tid = child_tid
        if flags & CLONE_VFORK:
            child.vfork_parent = p
        self._start(child)
        if flags & CLONE_VFORK:                         # the parent waits until the child execs or exits
            child.vfork_done.wait()
        return child.pid

    def _new_process(self, parent):
        with self._cond:
            pid = self._next_pid
            self._next_pid += 1
            child = Process(pid)
            child.ppid = child.fast_ids[1] = parent.pid
            child.parent = parent
            child.pgid, child.sid = parent.pgid, parent.sid
            parent.children[pid] = child
            self._procs[pid] = child
        child.cwd, child.umask, child.exe, child.comm = parent.cwd, parent.umask, parent.exe, parent.comm
        child.arg_area, child.nice, child.file_maps = parent.arg_area, parent.nice, list(parent.file_maps)
        child.mapped_files = {key: os.dup(fd) for key, fd in parent.mapped_files.items()}
        child.sigactions = dict(parent.sigactions)
        child.sigmask = parent.sigmask
        child.altstack = parent.altstack
        child.rlimits = dict(parent.rlimits)
        child.brk_start, child.brk_cur, child.brk_mapped = parent.brk_start, parent.brk_cur, parent.brk_mapped
        child.fds.limit = parent.fds.limit
        for fd, (f, cloexec) in parent.fds.fds.items():
            child.fds.install(f, cloexec=cloexec, at=fd)
        return child

    @staticmethod
    def _place_specials(child, where):
        """The child's vDSO and its data pages where its parent's are (a restore moved them)."""
        def call(name, *args):
            ret = child.space.syscall_raw(name, *args)
            if -4096 < ret < 0:
                raise Errno(-ret)
        ours = {name: (lo, hi) for lo, hi, _perms, name in mappings(child.space.pid) if name in SPECIAL}
        move_specials(call, ours, [dict(path=name, start=lo, end=hi) for name, (lo, hi) in where.items()],
                      child.protected)
        child.specials = dict(where)

    def _discard(self, child):
        with self._cond:
            self._procs.pop(child.pid, None)
            if child.parent is not None:
                child.parent.children.pop(child.pid, None)
        child.fds.close_all()
        drop_mapped(child)
        if child.space is not None:
            child.space.detach()
        close_wake(child)

    def _copy_memory(self, p, child):
        """The parent's guest mappings, with their contents and protections, into the child's space. A
        file's private mapping maps the file again and gets only the pages the parent changed; anonymous
        memory only the pages the parent has; shared mappings map the same pages. The parent's pages are
        found first, then every mapping is made in one batch (a file lent once for all its segments), then
        the pages go. Where the child's memory can be written whatever its protection (the stub's
        /proc/PID/mem), mappings are made with their own protection at once; else read+write, and their
        protections follow in a batch of their own."""
        src, dst = p.space, child.space
        mem = getattr(dst.backend, "mem_fd", -1) if src.engine == dst.engine == "stub" else -1
        files, anon, copies, calls = [], [], [], []
        for fields in (line.split() for line in proc.read_text("/proc/%d/maps" % src.pid).splitlines()):
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            if lo >= 1 << 47 or any(lo < e and hi > s for s, e in p.protected):
                continue
            perms = fields[1]
            prot = maps_prot(perms)
            fd = child.mapped_files.get(_file_key(fields)) if fields[4] != "0" else None
            offset = int(fields[2], 16)
            if perms[3] == "s" and fd is not None:          # the same pages as the parent's, not a copy
                files.append((fd, lo, hi - lo, prot, MAP_SHARED | MAP_FIXED_NOREPLACE, offset))
                continue
            now = prot if mem >= 0 else 3
            if fd is not None:
                files.append((fd, lo, hi - lo, now, MAP_PRIVATE | MAP_FIXED_NOREPLACE, offset))
            else:
                anon.append((lo, hi, now))
            copies.append((lo, hi, fd is None and fields[4] != "0"))
            if prot != now:
                calls.append(("mprotect", (lo, hi - lo, prot)))
        own = self._own_pages(src.pid, [(lo, hi) for lo, hi, whole in copies if not whole])
        made = map_files_in_space(dst, files, [("mmap", (lo, hi - lo, prot, 0x22 | MAP_FIXED_NOREPLACE, -1, 0))
                                               for lo, hi, prot in anon])
        if any(at != lo for at, (lo, _hi, _prot) in zip(made, anon)):
            raise Errno(errno.ENOMEM)
        if own is None:                                 # (before Linux 6.7: every page is read)
            slow = [(lo, hi) for lo, hi, _whole in copies]
        else:
            # The parent's own pages, in one call (what it cannot copy whole goes page-run by page-run).
            done = _core.vm_copy_ranges(src.pid, dst.pid, array.array("Q", [x for lo, hi in own for x in (lo, hi - lo)]),
                                        mem)
            slow = own[done:] + [(lo, hi) for lo, hi, whole in copies if whole]
        for start, end in slow:
            self._copy_pages(src, dst, start, end)
        if calls:
            dst.syscalls(calls)                         # (a batch of any length: the engine splits it)
        # Patched syscall sites in the copied code jump through the window: give the child the same table.
        if src.engine == dst.engine == "stub":
            dst.backend.copy_patches_from(src.backend)

    @staticmethod
    def _own_pages(pid, ranges):
        """The runs of pages in ranges (sorted) that process pid has of its own (written, or anonymous):
        not a file's, not the zero page; one scan of its whole space. None if the kernel cannot say."""
        if not ranges:
            return []
        try:
            scan = PagemapScan(pid)
        except OSError:
            return None
        try:
            found = scan.regions(ranges[0][0], ranges[-1][1], PAGE_IS_PRESENT | PAGE_IS_SWAPPED,
                                 PAGE_IS_FILE | PAGE_IS_PFNZERO)
        except OSError:
            return None
        finally:
            scan.close()
        out, i = [], 0
        for start, end in found:                        # both sorted: clip each run to the ranges it meets
            while i < len(ranges) and ranges[i][1] <= start:
                i += 1
            j = i
            while j < len(ranges) and ranges[j][0] < end:
                lo, hi = max(start, ranges[j][0]), min(end, ranges[j][1])
                if lo < hi:
                    out.append((lo, hi))
                j += 1
        return out

    @staticmethod
    def _copy_pages(src, dst, lo, hi):
        addr = lo
        while addr < hi:
            n = min(hi - addr, 1 << 20)
            data = src.read(addr, n)
            if data != (_ZEROS if n == len(_ZEROS) else bytes(n)):     # a memcmp: far cheaper than a count
                dst.write(addr, data)
            addr += n

    def _start(self, child):
        t = threading.Thread(target=self._run_process, args=(child,), name="guest-%d" % child.pid, daemon=True)
        child.thread = t
        t.start()

    def _run_process(self, p):
        try:
            status = self._process_ended(p, self._loop(p))
        except BaseException as e:                      # a bug of ours: the guest dies, the kernel lives on
            p.internal_error = e
            status = signal.SIGKILL
            kill_space(p.space)
            wait_for_threads(p)
        self._finish(p, status)

    def _finish(self, p, status):
        """The process is gone: release what it held, wake its parent (SIGCHLD) and any vfork parent."""
        if p.clear_child_tid and p.space is not None:
            try:
                p.write(p.clear_child_tid, b"\0\0\0\0")
            except Errno:
                pass
        p.threads.pop(p.pid, None)
        p.fds.close_all()
        end_timers(p)
        if p.space is not None:
            p.usage = usage_of(p.space.pid)
        with self._cond:
            p.status = status
            for f in list(p.pidfds):
                try:
                    os.eventfd_write(f.host_fd, 1)
                except OSError:
                    pass
            for c in p.children.values():
                c.parent = None
                c.ppid = c.fast_ids[1] = 1
            if p.parent is not None and p.exit_signal:
                self._queue(p.parent, p.exit_signal, self._child_info(p), wake_it=True)
            self._cond.notify_all()
        p.vfork_done.set()
        drop_mapped(p)                  # (our own descriptors of its mapped files: nothing a guest sees)
        if p.space is not None:         # (after the parent is told: the guest cannot see our stub end)
            p.space.detach()
        close_wake(p)

    def _child_info(self, p):
        code, status = (CLD_EXITED, p.status >> 8) if p.status & 0x7F == 0 else \
            (CLD_DUMPED if p.status & 0x80 else CLD_KILLED, p.status & 0x7F)
        return struct.pack("<iii4xiIi", SIGCHLD, 0, code, p.pid, os.getuid(), status).ljust(128, b"\0")
