"""The proposal's interface: process_vm_exec(pid, ctx, flags, siginfo, sigmask)."""
from __future__ import annotations

from typing import Iterable
import atexit
import contextlib
import errno
import os
import signal
import struct
import threading

from . import proc
from .abi import ALL_SIGNALS, s64
from .arch import current as _current_arch
from .context import SigContext, SigInfo, StopReason
from .errors import TargetGone
from .space import Space, attach
from .syscalls import TABLE, arg_kinds, name_of, number

_ARCH = _current_arch()
PROCESS_VM_EXEC_SYSCALL = 0x1
_SIGSET_SIZE = 8
_SIGSYS, _SYS_SECCOMP = signal.SIGSYS, 1


def _mask_to_set(sigmask):
    if sigmask is None:
        return ALL_SIGNALS
    if isinstance(sigmask, int):
        return frozenset(s for s in range(1, 65) if sigmask >> (s - 1) & 1)
    return frozenset(int(s) for s in sigmask)


def process_vm_exec(pid: int, ctx: SigContext, flags: int = 0, siginfo: SigInfo | None = None,
                    sigmask: int | Iterable[int] | None = None, sizemask: int = _SIGSET_SIZE, *,
                    engine: str = "auto") -> int:
    """Run ctx in the address space of pid (flags=0) or one syscall there (PROCESS_VM_EXEC_SYSCALL).

    flags=0: runs until the first syscall or signal; ctx is updated in place;
    siginfo (a SigInfo, updated in place) gets a synthetic SIGSYS for a syscall,
    or the signal if it is in sigmask (an int bit mask, bit n-1 for signal n,
    or an iterable of signals; None means all). A signal outside sigmask is
    delivered to the caller and siginfo is left untouched.
    PROCESS_VM_EXEC_SYSCALL: runs the syscall in ctx (rax; rdi, rsi, rdx, r10,
    r8, r9) with the caller's descriptors against the target's memory; the
    result goes to ctx.rax. Returns 0; errors raise OSError (EINVAL for bad
    flags or sizemask, ESRCH as TargetGone, ...).

    The first call for a process attaches (attach(pid, engine=...)) and later
    calls reuse that attachment, as a kernel's syscall would need none: it is
    released by process_vm_exec_release(pid), at interpreter exit, or when the
    process is found ended (its pidfd, so a recycled pid is never taken for
    it). engine="auto" takes the agent (ptrace where it cannot be injected):
    syscalls on its thread, mode 1 in its helper process at stub speed (see
    attach()).
    """
    if flags & ~PROCESS_VM_EXEC_SYSCALL:
        raise OSError(errno.EINVAL, "process_vm_exec: unknown flags %#x" % flags)
    if sizemask != _SIGSET_SIZE:
        raise OSError(errno.EINVAL, "process_vm_exec: sizemask must be %d" % _SIGSET_SIZE)
    if not isinstance(ctx, SigContext):
        raise TypeError("ctx must be a SigContext")
    if siginfo is not None and not isinstance(siginfo, SigInfo):
        raise TypeError("siginfo must be a SigInfo or None")
    mask = ALL_SIGNALS if sigmask is None else _mask_to_set(sigmask)
    h = _held.get((pid, engine))
    if h is not None:
        # The C entries of the attachment kept (the helper's thread, the agent's slot), ctx updated in place;
        # None: the Python path below takes the call.
        engine_ = h.space._engine
        try:
            if not flags and engine_.fast_exec is not None:
                fields = engine_.fast_exec.into(ctx, mask)
                if fields is not None:
                    if siginfo is not None and ((fields[0] == _SIGSYS and fields[1] == _SYS_SECCOMP) or
                                                fields[0] in mask):
                        siginfo._load(*fields[:7])
                    return 0
            elif flags and engine_.fast_syscall is not None:
                # (a call of the caller's descriptors goes the Python way, syscall_with_callers_fds)
                if engine_.fast_syscall.ctx_call(ctx, _DESCRIPTOR_CALLS) is not None:
                    return 0
        except TargetGone:
            process_vm_exec_release(pid)
            raise
    space, lock = _attachment(pid, engine)
    try:
        with lock:
            if flags & PROCESS_VM_EXEC_SYSCALL:
                nr = getattr(ctx, _ARCH.SYSCALL_NR)
                _ARCH.set_syscall_result(ctx, syscall_with_callers_fds(space, nr, _ARCH.syscall_args(ctx)))
                return 0
            stop = space.exec(ctx, sigmask=mask)
    except TargetGone:
        process_vm_exec_release(pid)
        raise
    ctx._buf[:] = stop.ctx._buf
    if ctx.fpstate is not None:
        ctx.fpstate = stop.ctx.fpstate
    if siginfo is not None and (stop.reason is StopReason.SYSCALL or stop.signo in mask):
        siginfo._fill_from(stop)
    return 0


class _Held:
    __slots__ = ("space", "lock")

    def __init__(self, space):
        self.space, self.lock = space, threading.Lock()


_held: dict[tuple[int, str], _Held] = {}    # (pid, engine asked) -> the attachment process_vm_exec keeps
_held_lock = threading.Lock()
os.register_at_fork(after_in_child=_held.clear)   # a forked child holds none of its parent's (space.py)


def _attachment(pid, engine):
    with _held_lock:
        h = _held.get((pid, engine))
        # (The agent's own calls see its process end, through its pidfd; ptrace names pids, so its
        # attachment is checked first: a pid another process now has is never traced for it.)
        if h is not None and h.space.engine != "agent" and _ended(h.space):
            del _held[(pid, engine)]
            _detach(h)
            h = None
        if h is None:
            for other in [q for q, held in _held.items() if _ended(held.space)]:
                _detach(_held.pop(other))       # (what a process that ended held goes with it)
            if not _held:
                atexit.register(process_vm_exec_release)
            h = _held[(pid, engine)] = _Held(attach(pid, engine=engine))
        return h.space, h.lock


def _ended(space: Space) -> bool:
    """Whether the process the attachment is for has ended (then its pid may name another one)."""
    return proc.ended(space.pidfd)


def _detach(h):
    with h.lock:
        try:
            h.space.detach()
        except (OSError, TargetGone):
            pass


def process_vm_exec_release(pid: int | None = None) -> None:
    """Release the attachment process_vm_exec keeps for pid (every one if None): the target is left as
    it was before the first call."""
    with _held_lock:
        gone = [_held.pop(key) for key in [k for k in _held if pid is None or k[0] == pid]]
    for h in gone:
        _detach(h)
    if not _held:
        atexit.unregister(process_vm_exec_release)


# Syscalls that create descriptors: under the proposal's semantics they land in the caller's table.
FD_RESULT = frozenset(number(n) for n in (
    "open", "openat", "openat2", "creat", "socket", "accept", "accept4", "epoll_create",
    "epoll_create1", "eventfd", "eventfd2", "signalfd", "signalfd4", "timerfd_create", "inotify_init",
    "inotify_init1", "memfd_create", "memfd_secret", "pidfd_open", "pidfd_getfd", "fanotify_init",
    "userfaultfd", "perf_event_open", "open_by_handle_at", "fsopen", "fsmount", "fspick", "open_tree",
    "open_tree_attr", "io_uring_setup", "landlock_create_ruleset", "mq_open"))
FD_PAIR_RESULT = {number("pipe"): 0, number("pipe2"): 0, number("socketpair"): 3}
CALLER_TABLE_ONLY = frozenset(number(n) for n in ("close", "dup", "dup2", "dup3", "close_range"))


def syscall_with_callers_fds(space, nr, args):
    """Mode 2 as the proposal defines it: the caller's descriptors, the target's memory."""
    if nr not in _DESCRIPTOR_CALLS:
        return space.syscall_raw(nr, *args)     # nothing of the caller's table in it: as it is
    if nr in CALLER_TABLE_ONLY:
        # Pure descriptor-table calls touch no target memory: they act on the caller's table.
        return _local_fd_call(nr, args)
    kinds = arg_kinds(nr)
    with contextlib.ExitStack() as stack:
        args = list(args)
        lent = {}
        for i, (_name, kind) in enumerate(kinds):
            if kind == "fd" and i < len(args) and 0 <= s64(args[i]) < (1 << 31):
                fd = s64(args[i])
                if fd not in lent:
                    lent[fd] = stack.enter_context(space.lend(fd))
                args[i] = lent[fd]
        ret = space.syscall_raw(nr, *args)
    if ret >= 0 and nr in FD_RESULT:
        return _move_to_caller(space, ret)
    if ret >= 0 and nr in FD_PAIR_RESULT:
        where = args[FD_PAIR_RESULT[nr]]
        raw = space.read(where, 8)
        pair = struct.unpack("<ii", raw)
        mine = [_move_to_caller(space, fd) for fd in pair]
        space.write(where, struct.pack("<ii", *mine))
    return ret


# Calls that take, make or change descriptors (the rest run as they are).
_DESCRIPTOR_CALLS = FD_RESULT | set(FD_PAIR_RESULT) | CALLER_TABLE_ONLY | frozenset(
    nr for nr, (_name, kinds) in TABLE.items() if any(kind == "fd" for _a, kind in kinds or ()))


def _move_to_caller(space, remote_fd):
    try:
        return space.take_fd(remote_fd)
    finally:
        space.syscall_raw("close", remote_fd)


def _local_fd_call(nr, args):
    name = name_of(nr)
    a = [s64(x) for x in args] + [0] * 3
    try:
        if name == "close":
            os.close(a[0])
        elif name == "dup":
            return os.dup(a[0])
        elif name in ("dup2", "dup3"):
            return os.dup2(a[0], a[1], inheritable=not (a[2] & os.O_CLOEXEC))
        elif name == "close_range":
            os.closerange(a[0], min(a[1], 1 << 20) + 1)
        return 0
    except OSError as e:
        return -e.errno
