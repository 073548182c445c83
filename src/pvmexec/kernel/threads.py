"""Thread machinery: a guest thread is a stub thread of its process's space run by a caller
thread of its own; thread exit, the end of a thread group, futex wait queues.
"""
import errno
import signal
import struct
import threading

from ..abi import CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID, CLONE_PARENT_SETTID, CLONE_SETTLS, CLONE_SIGHAND, CLONE_VM
from ..arch import current as _current_arch
from .errors import Errno, Exited, ThreadExit
from .task import Thread, close_wake, kill_space, leader_of, wake

ARCH = _current_arch()


def end_group(proc, status):
    """The whole process ends with status: its space goes, and threads blocked in the kernel wake up."""
    if proc.group_status is None:
        proc.group_status = status
    proc.fast_flag[0] = 1
    kill_space(proc.space)
    with proc.thread_lock:
        threads = list(proc.threads.values())
    for t in threads:
        wake(t)


def other_threads(p):
    proc = leader_of(p)
    with proc.thread_lock:
        return [t for tid, t in proc.threads.items() if tid != p.tid]


def wait_for_threads(proc):
    """Until every thread but the leader has ended."""
    with proc.thread_lock:
        while any(tid != proc.pid for tid in proc.threads):
            proc.thread_lock.wait(0.5)


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


class ThreadMachinery:
    """Mixed into Sandbox: `self` is the kernel."""

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
        t.ctx = ARCH.clone_child_context(p.ctx, newsp, tls if flags & CLONE_SETTLS else None)
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
        self._start_thread(t)
        return tid

    def _start_thread(self, t):
        th = threading.Thread(target=self._run_thread, args=(t,), name="guest-%d-%d" % (t.leader.pid, t.tid),
                              daemon=True)
        t.thread = th
        th.start()

    def _end_other_threads(self, leader, wait=True):
        """execve from a process with other threads: they end (their space goes, the new image has none),
        the process and its pid go on; wait: until they have."""
        with leader.thread_lock:
            others = [t for tid, t in leader.threads.items() if tid != leader.pid]
        for t in others:
            t.exec_exit = True
        kill_space(leader.space)                        # the old image: the exec replaces it anyway
        for t in others:
            wake(t)
        if wait:
            wait_for_threads(leader)

    def _hand_exec_to_leader(self, t, guest, argv, envp):
        """execve from a thread other than the leader: as in Linux the process keeps its pid and the
        new image runs with the calling thread's mask; here the leader's loop runs it (take_exec), every
        other thread, this one included, ends. ENOSYS if the leader itself has already exited."""
        leader = t.leader
        with leader.thread_lock:
            if leader.pid not in leader.threads or leader.exec_handoff is not None:
                raise Errno(errno.ENOSYS)
            leader.exec_handoff = (guest, argv, envp, t.sigmask)
        self._end_other_threads(leader, wait=False)     # this one too; the leader's loop sees its space go
        wake(leader)
        raise ThreadExit()

    def _take_exec(self, p):
        """In the leader: the exec another thread handed over, once every other thread has gone."""
        guest, argv, envp, mask = p.exec_handoff
        wait_for_threads(p)
        p.exec_handoff = None
        p.sigmask = mask
        try:
            self._execve(p, guest, argv, envp)
        except Errno:
            raise Exited(signal.SIGKILL) from None      # past the point of no return: the old image is gone

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
            close_wake(t)
