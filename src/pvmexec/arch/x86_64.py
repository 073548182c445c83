"""x86-64: registers, the syscall ABI and what a valid user context is."""
import signal
import struct

from ._syscalls_x86_64 import TABLE as SYSCALLS  # noqa: F401 (part of the interface)

NAME = "x86_64"
TITLE = "x86-64"                    # as people write it
AUDIT_ARCH = 0xC000003E
AUDIT_ARCH_I386 = 0x40000003
X32_SYSCALL_BIT = 0x40000000
FOREIGN_SYSCALL_BIT = X32_SYSCALL_BIT     # numbers of another ABI (x32): refused

# struct user_regs_struct order (checked against the C layout by tests/test_layout.py).
REG_NAMES = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8",
             "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags",
             "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs")
REG_INDEX = {n: i for i, n in enumerate(REG_NAMES)}
REGS_SIZE = 8 * len(REG_NAMES)

PC, SP = "rip", "rsp"               # the instruction and stack pointers
SYSCALL_NR = "rax"
SYSCALL_ORIG_NR = "orig_rax"        # the call a thread stopped in (-1 outside one), as ptrace shows it
SYSCALL_ARGS = ("rdi", "rsi", "rdx", "r10", "r8", "r9")
SYSCALL_RET = "rax"
SYSCALL_INSN = b"\x0f\x05"
SYSCALL_INSN_LEN = 2

USER_CS = 0x33
USER32_CS = 0x23
USER_DS = 0x2B
TASK_SIZE_MAX = (1 << 47) - 4096
# A new SigContext: user selectors, interrupts enabled (IF) and the always-one bit.
CONTEXT_DEFAULTS = {"cs": USER_CS, "ss": USER_DS, "eflags": 0x202}
# The registers a SigContext names (struct sigcontext's and the TLS bases), and those its repr shows.
CONTEXT_REGS = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp",
                "rbx", "rdx", "rax", "rcx", "rsp", "rip", "eflags", "cs", "gs", "fs", "ss",
                "fs_base", "gs_base", "ds", "es")
CONTEXT_SHOWN = ("rip", "rsp", "rax", "rdi", "rsi", "rdx", "r10", "r8", "r9", "rcx", "rbx", "rbp")

# -ERESTART* values a thread stopped inside a syscall may show in rax.
ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK = 512, 513, 514, 516
RESTART_CODES = frozenset((ERESTARTSYS, ERESTARTNOINTR, ERESTARTNOHAND, ERESTART_RESTARTBLOCK))

NT_XSTATE = 0x202                   # NT_X86_XSTATE: the regset of the full xsave area
ELF_MACHINE = 62                    # EM_X86_64

# Signals the CPU raises for the running code. These must never be blocked in
# a borrowed thread: the kernel would reset the target's handler to SIG_DFL.
SYNC_SIGNALS = frozenset((signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL,
                          signal.SIGTRAP, signal.SIGSYS))


_CS, _SS, _RIP, _FS_BASE, _GS_BASE = (REG_INDEX[n] for n in ("cs", "ss", "rip", "fs_base", "gs_base"))
_DS, _ES, _FS, _GS = (REG_INDEX[n] for n in ("ds", "es", "fs", "gs"))
_SEL_OK = (0, USER_DS)


def validate(q):
    """Raise InvalidContext for register values no x86-64 user thread can hold (q: the 27 registers)."""
    if q[_CS] == USER_CS and q[_SS] == USER_DS and q[_RIP] <= TASK_SIZE_MAX \
            and q[_FS_BASE] <= TASK_SIZE_MAX and q[_GS_BASE] <= TASK_SIZE_MAX \
            and q[_DS] in _SEL_OK and q[_ES] in _SEL_OK and q[_FS] in _SEL_OK and q[_GS] in _SEL_OK:
        return
    from ..errors import InvalidContext
    if q[_CS] != USER_CS:
        if q[_CS] == USER32_CS:
            raise InvalidContext("cs=0x23 selects 32-bit mode, which is not supported")
        raise InvalidContext("cs=%#x is not the 64-bit user code selector 0x33" % q[_CS])
    if q[_SS] != USER_DS:
        raise InvalidContext("ss=%#x is not the user data selector 0x2b" % q[_SS])
    for name in ("rip", "fs_base", "gs_base"):
        if q[REG_INDEX[name]] > TASK_SIZE_MAX:
            raise InvalidContext("%s=%#x is not a user-space address" % (name, q[REG_INDEX[name]]))
    for name in ("ds", "es", "fs", "gs"):
        if q[REG_INDEX[name]] not in _SEL_OK:
            raise InvalidContext("%s=%#x: data segment selectors must be 0 or 0x2b" % (name, q[REG_INDEX[name]]))


def init_xstate(template):
    """A clean FPU state (what a new thread starts with) in the kernel's xstate layout."""
    buf = bytearray(len(template))
    buf[0:2] = (0x037F).to_bytes(2, "little")          # FCW: all exceptions masked
    buf[24:28] = (0x1F80).to_bytes(4, "little")        # MXCSR default
    buf[28:32] = template[28:32]                       # MXCSR_MASK as the CPU reports
    buf[464:512] = template[464:512]                   # software-reserved: kernel's xstate sizes
    if len(buf) >= 576:
        buf[512:520] = (0x3).to_bytes(8, "little")     # XSTATE_BV: x87 and SSE present, rest init
    return bytes(buf)


# -- the rt_sigframe Linux builds for a signal handler (arch/x86/kernel/signal_64.c) --------------

RED_ZONE = 128
_UC_FLAGS = 1 | 2 | 4                     # UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS
_SIGCONTEXT = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx",
               "rax", "rcx", "rsp", "rip", "eflags")
_UCONTEXT_SIZE = 304                      # uc_flags, uc_link, uc_stack (24), uc_mcontext (256), uc_sigmask (8)
_UC_STACK, _UC_MCONTEXT, _UC_SIGMASK = 16, 40, 296
_SC_FPSTATE = 184                         # in struct sigcontext: 18 registers, 4 selectors, err..cr2, fpstate
FP_XSTATE_MAGIC2 = 0x46505845
_EFLAGS_USER = 0x50DD5                    # the flags sigreturn may change (AC, OF, DF, TF, SF, ZF, AF, PF, CF, RF)
_SS_ONSTACK, _SS_DISABLE = 1, 2
_TRAP_PF = 14


def push_signal_frame(ctx, sig, info, handler, restorer, old_mask, altstack, to_altstack, fp):
    """Lay out the frame a handler of sig finds, as Linux does, and set ctx to enter the handler.

    altstack: (sp, flags, size) of the thread's alternate stack; to_altstack: switch onto it.
    fp: the xstate image to save. Returns [(address, bytes)] for the caller to write.
    """
    ss_sp, ss_flags, ss_size = altstack
    on_alt = not ss_flags & _SS_DISABLE and ss_sp < ctx.rsp <= ss_sp + ss_size
    use_alt = to_altstack and not ss_flags & _SS_DISABLE and not on_alt
    sp = ss_sp + ss_size if use_alt else ctx.rsp - RED_ZONE
    sp = (sp - len(fp) - 4) & ~63
    fp_addr = sp
    sp = ((sp - (8 + _UCONTEXT_SIZE + 128)) & ~15) - 8
    uc = sp + 8
    info_addr = uc + _UCONTEXT_SIZE
    regs = [getattr(ctx, n) for n in _SIGCONTEXT]
    sigcontext = struct.pack("<18Q", *regs) + struct.pack("<HHHH", USER_CS, 0, 0, USER_DS) + \
        struct.pack("<QQQQQ", 0, _TRAP_PF if sig == signal.SIGSEGV else 0, old_mask, 0, fp_addr) + bytes(64)
    stack = struct.pack("<QiiQ", ss_sp, (_SS_ONSTACK if on_alt else 0) | (ss_flags & _SS_DISABLE), 0, ss_size)
    ucontext = struct.pack("<QQ", _UC_FLAGS, 0) + stack + sigcontext + struct.pack("<Q", old_mask)
    assert len(ucontext) == _UCONTEXT_SIZE
    writes = [(sp, struct.pack("<Q", restorer) + ucontext + bytes(info[:128]).ljust(128, b"\0")),
              (fp_addr, bytes(fp) + struct.pack("<I", FP_XSTATE_MAGIC2))]
    ctx.rdi, ctx.rsi, ctx.rdx, ctx.rax = sig, info_addr, uc, 0
    ctx.rsp, ctx.rip = sp, handler
    ctx.eflags &= ~(0x400 | 0x100 | 0x40000)       # DF, TF, AC clear, as the kernel leaves them
    return writes


def pop_signal_frame(read, ctx, fp_size):
    """rt_sigreturn: restore ctx from the frame at ctx.rsp (read(addr, n) reads the thread's memory).

    Returns (the signal mask to restore, the alternate stack to restore or None).
    """
    raw = read(ctx.rsp, _UCONTEXT_SIZE)
    ss_sp, ss_flags, ss_size = struct.unpack_from("<Qi4xQ", raw, _UC_STACK)
    regs = struct.unpack_from("<18Q", raw, _UC_MCONTEXT)
    fp_addr = struct.unpack_from("<Q", raw, _UC_MCONTEXT + _SC_FPSTATE)[0]
    mask = struct.unpack_from("<Q", raw, _UC_SIGMASK)[0]
    for name, value in zip(_SIGCONTEXT, regs):
        if name == "eflags":
            value = (ctx.eflags & ~_EFLAGS_USER) | (value & _EFLAGS_USER)
        setattr(ctx, name, value)
    if fp_addr:
        ctx.fpstate = read(fp_addr, fp_size)
    altstack = None if ss_flags & _SS_DISABLE else (ss_sp, ss_flags & ~_SS_ONSTACK, ss_size)
    return mask, altstack


# -- a traced thread that puts itself back: if its tracer dies mid-operation ----------------------

_NR_RT_SIGRETURN, _NR_RESTART_SYSCALL = 15, 219
FP_XSTATE_MAGIC1 = 0x46505853
_XFEATURE_TILEDATA = 18                   # AMX tiles: in a signal frame only for a process that uses them
_SS_INVALID = 0x7FFF0000                  # flags sigaltstack refuses: rt_sigreturn then keeps the altstack


_NR_RT_SIGTIMEDWAIT, _EPIPE, _EFBIG = 128, 32, 27
# Signals a call raises in the thread that makes it, with the error it returns (a write to a pipe nobody
# reads; a file grown past RLIMIT_FSIZE): ours to take back, not the thread's to die of.
CALL_SIGNALS = {-_EPIPE: 13, -_EFBIG: 25}       # SIGPIPE, SIGXFSZ


# `mov $15, %rax` or `mov $15, %eax`, then syscall: a C library's signal restorer (glibc's, musl's __restore_rt).
RESTORERS = (b"\x48\xc7\xc0" + struct.pack("<I", _NR_RT_SIGRETURN) + SYSCALL_INSN,
             b"\xb8" + struct.pack("<I", _NR_RT_SIGRETURN) + SYSCALL_INSN)


def return_gadget(code):
    """Offset in code of a syscall instruction followed only by xors of registers other than the stack
    pointer and then `ret` (the vDSO's syscall fallbacks are), or -1. Code jumped to there with rsp at
    a signal frame whose return address is a restorer finishes the call and restores the frame."""
    i = code.find(SYSCALL_INSN)
    while i >= 0:
        j = i + SYSCALL_INSN_LEN
        for _ in range(8):
            op = code[j:j + 3]
            if op[:1] == b"\xc3":
                return i
            if len(op) >= 2 and op[0] == 0x31 and op[1] >= 0xC0 and op[1] & 7 != 4:
                j += 2                                          # xor %r32, %r32 (not %esp)
            elif len(op) == 3 and op[0] in (0x41, 0x44, 0x45, 0x48, 0x49, 0x4C, 0x4D) and op[1] == 0x31 and \
                    op[2] >= 0xC0 and (op[2] & 7 != 4 or op[0] & 1):
                j += 3                                          # the same with a REX prefix (rm 4 only as r12)
            else:
                break
        i = code.find(SYSCALL_INSN, i + 1)
    return -1


def self_restore_code(at, frame):
    """Code at `at`: `syscall`; if it failed with EPIPE or EFBIG and the frame's first word (a signal set,
    the pretcode slot rt_sigreturn never reads) is not empty, rt_sigtimedwait on that set with a zero
    timeout takes back the SIGPIPE or SIGXFSZ the call raised; then rsp = frame + 8 and rt_sigreturn. A
    thread stopped anywhere in it by a tracer that dies goes on to restore the state the frame holds.
    Returns (code, offset of the instruction after the rt_sigtimedwait syscall)."""
    restore = b"\x48\xbc" + struct.pack("<Q", frame + 8) + b"\xb8" + struct.pack("<I", _NR_RT_SIGRETURN) + \
        SYSCALL_INSN + b"\x0f\x0b"
    wait = (b"\x31\xf6" +                                        # xor %esi, %esi
            b"\x48\xba" + b"TSADDR__" +                          # movabs $zero_timespec, %rdx
            b"\x41\xba\x08\x00\x00\x00" +                        # mov $8, %r10d
            b"\xb8" + struct.pack("<I", _NR_RT_SIGTIMEDWAIT) +    # mov $128, %eax
            SYSCALL_INSN)
    take = (b"\x48\xbf" + struct.pack("<Q", frame) +             # movabs $frame, %rdi
            b"\x48\x83\x3f\x00" +                                # cmpq $0, (%rdi)
            b"\x74" + struct.pack("<B", len(wait)) + wait)       # je restore
    check = (b"\x48\x83\xf8" + struct.pack("<b", -_EPIPE) +      # cmp $-EPIPE, %rax
             b"\x74\x06" +                                       # je take
             b"\x48\x83\xf8" + struct.pack("<b", -_EFBIG) +      # cmp $-EFBIG, %rax
             b"\x75" + struct.pack("<B", len(take)))             # jne restore
    code = SYSCALL_INSN + check + take
    took = len(code)
    code += restore
    code = code.replace(b"TSADDR__", struct.pack("<Q", at + len(code)))
    return code + bytes(16), took


def sigframe_xstate(xstate, components):
    """The ptrace xstate image (XCR0 in bytes 464-471) as a signal frame's fpstate (the kernel's
    software-reserved header instead, trailing magic); components: [(i, size, offset)] from CPUID."""
    xcr0, = struct.unpack_from("<Q", xstate, 464)
    bv, = struct.unpack_from("<Q", xstate, 512)
    features = xcr0 if bv >> _XFEATURE_TILEDATA & 1 else xcr0 & ~(1 << _XFEATURE_TILEDATA)
    size = max([576] + [off + n for i, n, off in components if features >> i & 1])
    buf = bytearray(xstate[:size].ljust(size, b"\0"))
    buf[464:512] = struct.pack("<IIQI", FP_XSTATE_MAGIC1, size + 4, features, size).ljust(48, b"\0")
    struct.pack_into("<Q", buf, 512, bv & features)
    return bytes(buf) + struct.pack("<I", FP_XSTATE_MAGIC2)


def self_restore_frame(regs, mask, xstate, components, frame):
    """The rt_sigframe (at address `frame`, 64-byte aligned) that self_restore_code's rt_sigreturn takes:
    regs (name -> value, a thread's saved registers) as the thread resumes them, with an interrupted
    syscall set to restart as the kernel does when no handler runs; mask; xstate (the ptrace image)."""
    r = dict(regs)
    if r["orig_rax"] < 1 << 63 and (-r["rax"]) % (1 << 64) in RESTART_CODES:
        code = (-r["rax"]) % (1 << 64)
        r["rax"] = _NR_RESTART_SYSCALL if code == ERESTART_RESTARTBLOCK else r["orig_rax"]
        r["rip"] -= SYSCALL_INSN_LEN
    fp_addr = frame + 448                 # after pretcode, ucontext and siginfo, aligned for xrstor
    sigcontext = struct.pack("<18Q", *(r[n] for n in _SIGCONTEXT)) + \
        struct.pack("<HHHH", USER_CS, 0, 0, r.get("ss", USER_DS)) + \
        struct.pack("<QQQQQ", 0, 0, mask, 0, fp_addr) + bytes(64)
    stack = struct.pack("<QiiQ", 0, _SS_INVALID, 0, 0)
    ucontext = struct.pack("<QQ", _UC_FLAGS, 0) + stack + sigcontext + struct.pack("<Q", mask)
    head = (bytes(8) + ucontext).ljust(448, b"\0")
    return head + sigframe_xstate(xstate, components)


# -- syscall sites the stub patches (`mov $nr, %eax; syscall` becomes a jump through a slot) --------

PATCH_SITE_LEN = 8                        # bytes read before a site's return address
_PREFIXES = frozenset(range(0x40, 0x50)) | {0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65, 0x66, 0x67, 0xF0, 0xF2, 0xF3}


def patchable_site(before, nr):
    """Whether the PATCH_SITE_LEN bytes before a syscall's return address are `mov $nr, %eax; syscall`
    (the mov not the tail of a longer instruction), which the stub may replace."""
    return len(before) == 8 and before[1] == 0xB8 and before[6:] == SYSCALL_INSN and before[0] not in _PREFIXES \
        and int.from_bytes(before[2:6], "little") == nr


def jump_through(slot):
    """(code, where): `jmp *slot` ends at a patched site's return address and starts `where` bytes before
    it; code is the part to write. The slots lie at 0x050fXXXX, so the jump's last two bytes are the
    syscall instruction's own (0f 05) and stay as they are: only the mov's five bytes change."""
    if slot >> 16 != 0x050F:
        raise ValueError("patch slot %#x is not at 0x050fXXXX" % slot)
    return b"\xff\x24\x25" + slot.to_bytes(4, "little")[:2], 7


# -- a guest's syscall as the application kernel sees it --------------------------------------------

def syscall_args(ctx):
    """The six argument registers of the syscall ctx stopped at."""
    return (ctx.rdi, ctx.rsi, ctx.rdx, ctx.r10, ctx.r8, ctx.r9)


def set_syscall_result(ctx, value):
    ctx.rax = value & 0xFFFFFFFFFFFFFFFF


def restart_syscall(ctx, nr):
    """Make the thread enter syscall nr again when it resumes (the instruction just before rip)."""
    ctx.rip -= SYSCALL_INSN_LEN
    ctx.rax = nr


def clone_child_context(parent, newsp, tls):
    """The context a clone child starts from: the parent's, with clone() returning 0 in it, on its own
    stack (newsp, if given) and with its own TLS (tls, if given: CLONE_SETTLS)."""
    ctx = parent.copy()
    ctx.fpstate = parent.fpstate
    ctx.rax = 0
    if newsp:
        ctx.rsp = newsp
    if tls is not None:
        ctx.fs_base = tls
    return ctx
