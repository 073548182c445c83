"""Domain errors. All are OSError subclasses carrying an errno."""
from __future__ import annotations

import errno as _errno
from typing import Sequence


class PvmexecError(OSError):
    """Base class of pvmexec's errors."""

    def __init__(self, err: int, message: str) -> None:
        super().__init__(err, message)

    def __str__(self):
        return self.strerror


class TargetGone(PvmexecError, ProcessLookupError):
    """The target does not exist, is a zombie, or died during the operation."""

    def __init__(self, pid: int, message: str | None = None) -> None:
        self.pid = pid
        super().__init__(_errno.ESRCH, message or "no such process: %d" % pid)


class AccessDenied(PvmexecError, PermissionError):
    """The caller may not trace the target; `reason` says why."""

    def __init__(self, pid: int, reason: str) -> None:
        self.pid = pid
        self.reason = reason
        super().__init__(_errno.EPERM, "not permitted to trace process %d: %s" % (pid, reason))


class AlreadyTraced(AccessDenied):
    """Another tracer (a debugger, strace, ...) holds the target."""

    def __init__(self, pid: int, tracer: int, tid: int | None = None, why: str | None = None) -> None:
        self.tracer = tracer
        thread = " (its thread %d)" % tid if tid and tid != pid else ""
        super().__init__(pid, why or "already traced%s by process %d (%s)" % (thread, tracer, _comm(tracer)))


class UnsupportedTarget(PvmexecError):
    """The target is of a kind we cannot operate on (32-bit, x32, kernel thread, ourselves)."""

    def __init__(self, pid: int, reason: str) -> None:
        self.pid = pid
        self.reason = reason
        super().__init__(_errno.EOPNOTSUPP, "unsupported target %d: %s" % (pid, reason))


class InvalidContext(PvmexecError, ValueError):
    """A register context that the CPU or kernel would not accept."""

    def __init__(self, message: str) -> None:
        super().__init__(_errno.EINVAL, "invalid register state: " + message)


class RemoteSyscallError(PvmexecError):
    """A system call run in the target returned -errno."""

    def __init__(self, err: int, syscall: str, args: Sequence[object]) -> None:
        self.syscall = syscall
        self.args_ = tuple(args)
        shown = ", ".join(hex(a) if isinstance(a, int) and a >= 1 << 32 else repr(a) for a in args)
        super().__init__(err, "%s(%s) in target: %s (%s)" % (
            syscall, shown, _errno.errorcode.get(err, "E?%d" % err), _strerror(err)))


class SeccompBlocked(RemoteSyscallError):
    """The target's seccomp policy would act on this call (kill, trap...): it was not run."""

    def __init__(self, syscall: str, args: Sequence[object], action: str) -> None:
        self.action = action
        PvmexecError.__init__(self, _errno.EPERM, "%s not run in target: its seccomp policy would %s" % (
            syscall, action))
        self.syscall = syscall
        self.args_ = tuple(args)


class TargetMisbehaved(PvmexecError):
    """The target interfered with the agent's channel (it wrote the shared slot): the request was not
    answered and will not be. The agent cannot be trusted any more; detach, or use engine="ptrace"."""

    def __init__(self, pid: int, what: str) -> None:
        self.pid = pid
        super().__init__(_errno.EPROTO, "process %d interfered with the agent: %s" % (pid, what))


class TargetStopped(PvmexecError):
    """The target is stopped (job control) and the agent, one of its threads, is stopped with it.

    The request was withdrawn before it ran. Continue the target, or use engine="ptrace".
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        super().__init__(_errno.EAGAIN, "process %d is stopped (job control), and the agent thread with it: "
                         "the call was withdrawn, not run (continue the process, or use engine='ptrace')" % pid)


class EngineError(PvmexecError):
    """The mechanism itself failed (an unexpected stop or kernel answer)."""

    def __init__(self, message: str, err: int = _errno.EPROTO) -> None:
        super().__init__(err, message)


def _strerror(err):
    import os
    try:
        return os.strerror(err)
    except ValueError:
        return "unknown error"


def _comm(pid):
    try:
        with open("/proc/%d/comm" % pid) as f:
            return f.read().strip()
    except OSError:
        return "?"
