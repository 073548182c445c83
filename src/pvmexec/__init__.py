"""pvmexec: execute system calls and code inside another process's address space.

The user-space realisation of the proposed process_vm_exec() syscall. See
attach(), Space and process_vm_exec().
"""
import logging as _logging
import sys as _sys

if not _sys.platform.startswith("linux"):
    raise ImportError("pvmexec works on Linux only (this is %s)" % _sys.platform)

from .context import SigContext, SigInfo, Stop, StopReason
from .errors import (AccessDenied, AlreadyTraced, EngineError, InvalidContext, PvmexecError,
                     RemoteSyscallError, SeccompBlocked, TargetGone, TargetMisbehaved, TargetStopped,
                     UnsupportedTarget)
from .abi import ALL_SIGNALS
from .space import Space, attach
from .syscalls import name_of as syscall_name, number as syscall_number
from .vmexec import PROCESS_VM_EXEC_SYSCALL, process_vm_exec, process_vm_exec_release

__version__ = "0.1.0"
_logging.getLogger("pvmexec").addHandler(_logging.NullHandler())     # the application decides what to show

__all__ = [
    "attach", "Space", "process_vm_exec", "process_vm_exec_release", "PROCESS_VM_EXEC_SYSCALL", "SigContext",
    "SigInfo",
    "Stop", "StopReason", "ALL_SIGNALS", "PvmexecError", "TargetGone", "AccessDenied", "AlreadyTraced",
    "UnsupportedTarget", "InvalidContext", "RemoteSyscallError", "SeccompBlocked", "EngineError", "TargetStopped", "TargetMisbehaved",
    "syscall_number", "syscall_name",
]
