"""The architecture interface: one module per architecture, the same names in each.

Everything that differs between CPU architectures lives in these modules (and
in the freestanding C under native/freestanding/); the rest of pvmexec asks
current() for them. A new architecture is a new module providing INTERFACE
(tests/unit/test_arch_interface.py checks each module against it).
"""
import platform

from ..errors import UnsupportedTarget

_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64"}

# name -> what it is. Constants first, then functions.
INTERFACE = {
    "NAME": "the architecture's name, as uname -m and AT_PLATFORM say it",
    "TITLE": "the name as people write it, for messages",
    "AUDIT_ARCH": "seccomp/audit architecture of the native syscall ABI",
    "ELF_MACHINE": "e_machine of native executables",
    "REG_NAMES": "general registers in the order of the kernel's user_regs_struct (NT_PRSTATUS)",
    "REG_INDEX": "name -> index in REG_NAMES",
    "REGS_SIZE": "bytes of NT_PRSTATUS",
    "NT_XSTATE": "the regset number of the full FPU/vector state",
    "PC": "the instruction pointer's name in REG_NAMES",
    "SP": "the stack pointer's name in REG_NAMES",
    "SYSCALL_NR": "register holding the syscall number",
    "SYSCALL_ORIG_NR": "the register ptrace shows the interrupted syscall's number in (-1: none)",
    "SYSCALL_ARGS": "registers holding the six arguments, in order",
    "SYSCALL_RET": "register holding the result",
    "SYSCALL_INSN": "the syscall instruction's bytes",
    "SYSCALL_INSN_LEN": "its length: a stop after a syscall has the instruction pointer this far past it",
    "USER_CS": "user code selector (or the arch's equivalent mode word)",
    "USER_DS": "user data selector",
    "CONTEXT_DEFAULTS": "register values a new SigContext starts with",
    "CONTEXT_REGS": "the registers a SigContext has as attributes",
    "CONTEXT_SHOWN": "those its repr shows, in order",
    "TASK_SIZE_MAX": "highest user address + 1",
    "RESTART_CODES": "-ERESTART* values a thread stopped in a syscall may show",
    "SYNC_SIGNALS": "signals the CPU raises for the running code",
    "FOREIGN_SYSCALL_BIT": "a bit that marks another ABI's syscall numbers (x86-64: x32), refused",
    "SYSCALLS": "number -> (name, ((arg, kind), ...) or None): the generated syscall table",
    "validate": "raise InvalidContext for register values no user thread can hold",
    "init_xstate": "a clean FPU state in the kernel's layout, from a template of the right size",
    "push_signal_frame": "lay out Linux's signal frame for a handler; returns the writes to make",
    "pop_signal_frame": "rt_sigreturn: restore registers, mask and alternate stack from a frame",
    "self_restore_code": "code that runs one syscall, then rt_sigreturns through the frame at an address",
    "self_restore_frame": "the frame that code takes a stopped thread back to its saved state with",
    "RED_ZONE": "bytes below the stack pointer the running code may use without moving it",
    "RESTORERS": "code that calls rt_sigreturn (as C libraries' signal restorers do), any of them",
    "return_gadget": "offset in code of a syscall followed only by a return that leaves the stack alone",
    "sigframe_xstate": "a ptrace FPU/xstate image as a signal frame's fpstate (what SigContext.fpstate holds)",
    "PATCH_SITE_LEN": "bytes before a syscall's return address that patchable_site looks at",
    "patchable_site": "whether those bytes are a syscall site the stub may replace with jump_through",
    "jump_through": "the code that jumps through a slot, replacing a patched site's last bytes",
    "syscall_args": "the six arguments of the syscall a context stopped at",
    "set_syscall_result": "store a syscall's result in a context",
    "restart_syscall": "make a context enter a syscall again when it resumes",
    "clone_child_context": "the context a clone child starts from (returns 0, its own stack and TLS)",
}


def current():
    """The arch module for this machine, or UnsupportedTarget naming the machine."""
    name = _MACHINES.get(platform.machine())
    if name == "x86_64":
        from . import x86_64
        return x86_64
    raise UnsupportedTarget(0, "architecture %s is not supported yet (x86-64 only; aarch64 is planned)"
                            % platform.machine())
