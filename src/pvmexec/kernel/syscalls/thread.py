"""Handlers: thread state (futex, set_tid_address, robust lists, rseq, arch_prctl, gettid)."""
import errno
import struct

from ...abi import (FUTEX_CLOCK_REALTIME, FUTEX_CMP_REQUEUE, FUTEX_PRIVATE_FLAG, FUTEX_REQUEUE, FUTEX_WAIT,
                    FUTEX_WAIT_BITSET, FUTEX_WAKE, FUTEX_WAKE_BITSET, PAGE)
from ..errors import Errno, Interrupted
from ..task import leader_of
from ..threads import _Waiter, futex_wake
from .mm import shared_key


TASK_SIZE = (1 << 47) - PAGE


class ThreadCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_futex(self, p, uaddr, op, val, timeout, uaddr2, val3):
        import time
        cmd = op & 0x7F
        proc = leader_of(p)
        val &= 0xFFFFFFFF
        # A futex that is not private, on a shared mapping, is the same futex in every process mapping it.
        shared = None if op & FUTEX_PRIVATE_FLAG else shared_key(proc, uaddr)
        if shared is not None:
            if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
                raise Errno(errno.ENOSYS)               # not between processes
            home, key = self.shared_futexes, shared
        else:
            home, key = proc, uaddr
        if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
            if cmd == FUTEX_WAKE_BITSET and val3 & 0xFFFFFFFF == 0:
                raise Errno(errno.EINVAL)
            return futex_wake(home, key, val, val3 & 0xFFFFFFFF if cmd == FUTEX_WAKE_BITSET else 0xFFFFFFFF)
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
            with home.futex_lock:
                if struct.unpack("<I", p.read(uaddr, 4))[0] != val:
                    raise Errno(errno.EAGAIN)
                home.futexes.setdefault(key, []).append(w)
            try:
                while not w.event.is_set():
                    left = None if deadline is None else (deadline - time.monotonic_ns()) / 1e9
                    if left is not None and left <= 0:
                        raise Errno(errno.ETIMEDOUT)
                    w.event.wait(0.05 if left is None else min(left, 0.05))
                    if not w.event.is_set() and (self._signal_ready(p) or proc.group_status is not None):
                        raise Interrupted()
            finally:
                with home.futex_lock:
                    queue = home.futexes.get(key)
                    if queue and w in queue:
                        queue.remove(w)
                        if not queue:
                            home.futexes.pop(key, None)
            return 0
        raise Errno(errno.ENOSYS)

    def sys_gettid(self, p):
        return p.tid

    def sys_arch_prctl(self, p, code, addr):
        if code in (0x1001, 0x1002):                    # ARCH_SET_GS, ARCH_SET_FS
            if addr >= TASK_SIZE:
                raise Errno(errno.EPERM)
            if code == 0x1002:
                p.ctx.fs_base = addr
            else:
                p.ctx.gs_base = addr
            return 0
        if code in (0x1003, 0x1004):                    # ARCH_GET_FS, ARCH_GET_GS
            p.write(addr, struct.pack("<Q", p.ctx.fs_base if code == 0x1003 else p.ctx.gs_base))
            return 0
        raise Errno(errno.EINVAL)

    def sys_set_tid_address(self, p, tidptr):
        p.clear_child_tid = tidptr
        return p.tid

    def sys_set_robust_list(self, p, head, length):
        if length != 24:
            raise Errno(errno.EINVAL)
        p.robust_list = (head, length)
        return 0

    def sys_get_robust_list(self, p, pid, head_ptr, len_ptr):
        if pid not in (0, p.pid):
            raise Errno(errno.ESRCH)
        p.write(head_ptr, struct.pack("<Q", p.robust_list[0]))
        p.write(len_ptr, struct.pack("<Q", 24))
        return 0

    def sys_rseq(self, p, rseq, length, flags, sig):
        raise Errno(errno.ENOSYS)                       # not provided: libc then does without
