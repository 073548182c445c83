"""The proposal's interface: process_vm_exec(pid, ctx, flags, siginfo, sigmask)."""
import errno
import signal

from .context import SigContext, SigInfo
from .space import attach, syscall_with_callers_fds

PROCESS_VM_EXEC_SYSCALL = 0x1
_SIGSET_SIZE = 8


def _mask_to_set(sigmask):
    if sigmask is None:
        return frozenset(range(1, 65)) - {signal.SIGKILL, signal.SIGSTOP}
    if isinstance(sigmask, int):
        return frozenset(s for s in range(1, 65) if sigmask >> (s - 1) & 1)
    return frozenset(int(s) for s in sigmask)


def process_vm_exec(pid, ctx, flags=0, siginfo=None, sigmask=None, sizemask=_SIGSET_SIZE, *, engine="ptrace"):
    """Run ctx in the address space of pid (flags=0) or one syscall there (PROCESS_VM_EXEC_SYSCALL).

    flags=0: runs until the first syscall or signal; ctx is updated in place;
    siginfo (a SigInfo, updated in place) gets a synthetic SIGSYS for a syscall,
    or the signal if it is in sigmask (an int bit mask, bit n-1 for signal n,
    or an iterable of signals; None means all). A signal outside sigmask is
    delivered to the caller and siginfo is left untouched.
    PROCESS_VM_EXEC_SYSCALL: runs the syscall in ctx (rax; rdi, rsi, rdx, r10,
    r8, r9) with the caller's descriptors against the target's memory; the
    result goes to ctx.rax. Returns 0; errors raise OSError (EINVAL for bad
    flags or sizemask, ESRCH as TargetGone, ...). Each call attaches and
    detaches; engine="ptrace" (default) adds nothing to the target for that.
    """
    if flags & ~PROCESS_VM_EXEC_SYSCALL:
        raise OSError(errno.EINVAL, "process_vm_exec: unknown flags %#x" % flags)
    if sizemask != _SIGSET_SIZE:
        raise OSError(errno.EINVAL, "process_vm_exec: sizemask must be %d" % _SIGSET_SIZE)
    if not isinstance(ctx, SigContext):
        raise TypeError("ctx must be a SigContext")
    if siginfo is not None and not isinstance(siginfo, SigInfo):
        raise TypeError("siginfo must be a SigInfo or None")
    mask = _mask_to_set(sigmask)
    with attach(pid, engine=engine) as space:
        if flags & PROCESS_VM_EXEC_SYSCALL:
            args = [ctx.rdi, ctx.rsi, ctx.rdx, ctx.r10, ctx.r8, ctx.r9]
            ctx.rax = syscall_with_callers_fds(space, ctx.rax, args)
            return 0
        stop = space.exec(ctx, sigmask=mask)
    ctx._buf[:] = stop.ctx._buf
    if ctx.fpstate is not None:
        ctx.fpstate = stop.ctx.fpstate
    if siginfo is not None and (stop.reason == "syscall" or stop.siginfo.signo in mask):
        siginfo._fill(stop.siginfo)
    return 0
