"""Sandbox handlers: threads of a guest process (clone with CLONE_THREAD), futexes, thread exit.

A guest thread is a stub thread of the process's space (Space.new_thread)
run by a caller thread of its own. Its kernel-side state is a Thread, which
keeps what is per thread (registers, tid, signal mask, alternate stack,
clear_child_tid) and shares everything else with its process.
"""
import errno
import struct
import threading

from .files import Errno

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND, CLONE_THREAD = 0x100, 0x200, 0x400, 0x800, 0x10000
CLONE_SETTLS, CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x80000, 0x100000, 0x200000, 0x1000000
FUTEX_WAIT, FUTEX_WAKE, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE = 0, 1, 3, 4
FUTEX_WAKE_OP, FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 5, 9, 10
FUTEX_CLOCK_REALTIME = 256

PER_THREAD = frozenset(("tid", "ctx", "thread_index", "sigmask", "saved_sigmask", "altstack", "clear_child_tid",
                        "robust_list", "thread", "wake_r", "wake_w", "pending", "leader", "internal_error",
                        "is_thread", "fast_ids"))


class ThreadExit(Exception):
    """exit(2) by one thread of several: the thread ends, its process goes on."""


class Thread:
    """A non-leader thread: its own registers and signal state; the rest is its process's."""

    def __init__(self, leader, tid, index):
        import os
        d = self.__dict__
        d["leader"], d["tid"], d["thread_index"] = leader, tid, index
        d["is_thread"] = True
        d["sigmask"], d["saved_sigmask"] = leader.sigmask, None
        d["altstack"] = (0, 2, 0)
        d["clear_child_tid"], d["robust_list"] = 0, (0, 0)
        d["pending"], d["thread"], d["ctx"], d["internal_error"] = {}, None, None, None
        d["wake_r"], d["wake_w"] = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        d["fast_ids"] = leader.fast_ids[:]
        d["fast_ids"][2] = tid

    def __getattr__(self, name):
        return getattr(self.__dict__["leader"], name)

    def __setattr__(self, name, value):
        if name in PER_THREAD:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["leader"], name, value)


def leader_of(p):
    return p.leader if getattr(p, "is_thread", False) else p


def _new_thread(self, p, flags, newsp, parent_tid, child_tid, tls):
    need = CLONE_VM | CLONE_SIGHAND
    if flags & need != need:
        raise Errno(errno.EINVAL)
    proc = leader_of(p)
    with self._cond:
        tid = self._next_pid
        self._next_pid += 1
    with proc.thread_lock:
        index = proc.free_thread_indices.pop() if proc.free_thread_indices else None
    if index is None:
        try:
            index = proc.space.new_thread()
        except Exception:
            raise Errno(errno.EAGAIN) from None
    t = Thread(proc, tid, index)
    ctx = p.ctx.copy()
    ctx.fpstate = p.ctx.fpstate
    ctx.rax = 0
    if newsp:
        ctx.rsp = newsp
    if flags & CLONE_SETTLS:
        ctx.fs_base = tls
    t.ctx = ctx
    t.sigmask = p.sigmask
    if flags & CLONE_PARENT_SETTID:
        p.write(parent_tid, struct.pack("<i", tid))
    if flags & CLONE_CHILD_SETTID:
        p.write(child_tid, struct.pack("<i", tid))
    if flags & CLONE_CHILD_CLEARTID:
        t.clear_child_tid = child_tid
    with proc.thread_lock:
        proc.threads[tid] = t
    with self._cond:
        self._procs_by_tid[tid] = t
    th = threading.Thread(target=self._run_thread, args=(t,), name="guest-%d-%d" % (proc.pid, tid), daemon=True)
    t.thread = th
    th.start()
    return tid


def _run_thread(self, t):
    proc = t.leader
    try:
        status = self._loop(t)
        if not isinstance(status, ThreadExit):
            end_group(proc, status)                 # exit_group or a fatal signal in this thread
    except BaseException as e:                      # a bug of ours: the process dies, the kernel lives on
        t.internal_error = e
        end_group(proc, 9)
    self._thread_gone(t)


def end_group(proc, status):
    """The whole process ends with status: its space goes, and threads blocked in the kernel wake up."""
    from .processes import wake
    if proc.group_status is None:
        proc.group_status = status
    proc.fast_flag[0] = 1
    from .sandbox import Sandbox
    Sandbox._kill_space(proc.space)
    with proc.thread_lock:
        threads = list(proc.threads.values())
    for t in threads:
        wake(t)


def _thread_gone(self, t):
    """The thread ended: clear_child_tid and a futex wake for its joiners, its stub thread freed for reuse."""
    proc = leader_of(t)
    if t.clear_child_tid and proc.group_status is None:
        try:
            t.write(t.clear_child_tid, b"\0\0\0\0")
            futex_wake(proc, t.clear_child_tid, 1)
        except Errno:
            pass
    with proc.thread_lock:
        proc.threads.pop(t.tid, None)
        if t is not proc:
            proc.free_thread_indices.append(t.thread_index)
        proc.thread_lock.notify_all()
    with self._cond:
        self._procs_by_tid.pop(t.tid, None)
    if t is not proc:
        from .processes import close_wake
        close_wake(t)


def other_threads(p):
    proc = leader_of(p)
    with proc.thread_lock:
        return [t for tid, t in proc.threads.items() if tid != p.tid]


def wait_for_threads(proc):
    """Until every thread but the leader has ended."""
    with proc.thread_lock:
        while any(tid != proc.pid for tid in proc.threads):
            proc.thread_lock.wait(0.5)


# -- futexes ------------------------------------------------------------------------------------------------

class _Waiter:
    __slots__ = ("event", "bitset")

    def __init__(self, bitset):
        self.event = threading.Event()
        self.bitset = bitset


def futex_wake(proc, addr, n, bitset=0xFFFFFFFF):
    woken = 0
    with proc.futex_lock:
        queue = proc.futexes.get(addr, [])
        for w in list(queue):
            if woken >= n:
                break
            if w.bitset & bitset:
                queue.remove(w)
                w.event.set()
                woken += 1
        if not queue:
            proc.futexes.pop(addr, None)
    return woken


def sys_futex(self, p, uaddr, op, val, timeout, uaddr2, val3):
    import time
    cmd = op & 0x7F
    proc = leader_of(p)
    val &= 0xFFFFFFFF
    if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
        if cmd == FUTEX_WAKE_BITSET and val3 & 0xFFFFFFFF == 0:
            raise Errno(errno.EINVAL)
        return futex_wake(proc, uaddr, val, val3 & 0xFFFFFFFF if cmd == FUTEX_WAKE_BITSET else 0xFFFFFFFF)
    if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
        with proc.futex_lock:
            if cmd == FUTEX_CMP_REQUEUE and struct.unpack("<I", p.read(uaddr, 4))[0] != val3 & 0xFFFFFFFF:
                raise Errno(errno.EAGAIN)
            queue = proc.futexes.get(uaddr, [])
            woken = 0
            while queue and woken < val:
                queue.pop(0).event.set()
                woken += 1
            moved = queue[:timeout & 0xFFFFFFFF]      # val2 travels in the timeout argument
            del queue[:len(moved)]
            if moved:
                proc.futexes.setdefault(uaddr2, []).extend(moved)
            if not queue:
                proc.futexes.pop(uaddr, None)
        return woken + len(moved)
    if cmd in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        if uaddr % 4:
            raise Errno(errno.EINVAL)
        bitset = val3 & 0xFFFFFFFF if cmd == FUTEX_WAIT_BITSET else 0xFFFFFFFF
        if bitset == 0:
            raise Errno(errno.EINVAL)
        deadline = None
        if timeout:
            sec, nsec = struct.unpack("<qq", p.read(timeout, 16))
            if sec < 0 or not 0 <= nsec < 10 ** 9:
                raise Errno(errno.EINVAL)
            if cmd == FUTEX_WAIT_BITSET:        # absolute, on CLOCK_MONOTONIC or CLOCK_REALTIME
                clock = time.CLOCK_REALTIME if op & FUTEX_CLOCK_REALTIME else time.CLOCK_MONOTONIC
                deadline = (sec * 10 ** 9 + nsec) - time.clock_gettime_ns(clock) + time.monotonic_ns()
            else:
                deadline = time.monotonic_ns() + sec * 10 ** 9 + nsec
        w = _Waiter(bitset)
        with proc.futex_lock:
            if struct.unpack("<I", p.read(uaddr, 4))[0] != val:
                raise Errno(errno.EAGAIN)
            proc.futexes.setdefault(uaddr, []).append(w)
        try:
            while not w.event.is_set():
                left = None if deadline is None else (deadline - time.monotonic_ns()) / 1e9
                if left is not None and left <= 0:
                    raise Errno(errno.ETIMEDOUT)
                w.event.wait(0.05 if left is None else min(left, 0.05))
                if not w.event.is_set() and (self._signal_ready(p) or proc.group_status is not None):
                    from .processes import Interrupted
                    raise Interrupted()
        finally:
            with proc.futex_lock:
                queue = proc.futexes.get(uaddr)
                if queue and w in queue:
                    queue.remove(w)
                    if not queue:
                        proc.futexes.pop(uaddr, None)
        return 0
    raise Errno(errno.ENOSYS)
