"""Register state (SigContext) and signal information (SigInfo)."""
from __future__ import annotations

from typing import TYPE_CHECKING, Any

import enum
import signal
import struct

from . import _core
from .arch import current as _current_arch

_arch = _current_arch()

_new = object.__new__

_SIGCONTEXT_REGS = _arch.CONTEXT_REGS


class SigContext:
    """x86-64 user register state, as in struct sigcontext plus fs_base/gs_base.

    `fpstate` is the FPU/xstate area in the kernel's XSAVE layout, or None for a
    clean FPU state on entry that is not reported back.
    """

    __slots__ = ("_buf", "fpstate")

    if TYPE_CHECKING:                   # the registers are properties made below, from the arch's list
        fpstate: bytes | None
        r15: int
        r14: int
        r13: int
        r12: int
        rbp: int
        rbx: int
        r11: int
        r10: int
        r9: int
        r8: int
        rax: int
        rcx: int
        rdx: int
        rsi: int
        rdi: int
        rip: int
        cs: int
        eflags: int
        rsp: int
        ss: int
        fs_base: int
        gs_base: int
        ds: int
        es: int
        fs: int
        gs: int

    def __init__(self, **regs: Any) -> None:
        self._buf = bytearray(_arch.REGS_SIZE)
        self.fpstate = regs.pop("fpstate", None)
        for k, v in _arch.CONTEXT_DEFAULTS.items():
            setattr(self, k, v)
        for k, v in regs.items():
            if k not in _arch.REG_INDEX or k == _arch.SYSCALL_ORIG_NR:
                raise TypeError("SigContext has no register %r" % k)
            setattr(self, k, v)

    @classmethod
    def _from_regs(cls, raw, fpstate=None):
        ctx = _new(cls)
        ctx._buf = raw if type(raw) is bytearray else bytearray(raw)
        ctx.fpstate = fpstate
        return ctx

    def _words(self) -> memoryview:
        """The registers as 64-bit words, in the arch's order (REG_INDEX)."""
        return memoryview(self._buf).cast("Q")

    def copy(self) -> SigContext:
        return SigContext._from_regs(bytearray(self._buf), self.fpstate)

    def as_dict(self) -> dict[str, int]:
        return {n: getattr(self, n) for n in _SIGCONTEXT_REGS}

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, SigContext):
            return NotImplemented
        return self.as_dict() == other.as_dict() and self.fpstate == other.fpstate

    def __repr__(self) -> str:
        d = self.as_dict()
        regs = " ".join("%s=%#x" % (k, d[k]) for k in _arch.CONTEXT_SHOWN)
        return "<SigContext %s eflags=%#x fs_base=%#x%s>" % (
            regs, d["eflags"], d["fs_base"], " fpstate=%dB" % len(self.fpstate) if self.fpstate else "")


for _name in _SIGCONTEXT_REGS:
    setattr(SigContext, _name, _core.Register(_arch.REG_INDEX[_name]))


_SIGINFO = struct.Struct("<iii4x")
_SIGINFO_HEAD = struct.Struct("<iii4xQiI")
_SIGSYS, _SIGCHLD = signal.SIGSYS, signal.SIGCHLD
_FAULTS = frozenset((signal.SIGSEGV, signal.SIGBUS, signal.SIGILL, signal.SIGFPE, signal.SIGTRAP))


class SigInfo:
    """The fields of siginfo_t that matter here. Mutable, so process_vm_exec can fill it in place."""

    __slots__ = ("signo", "errno", "code", "addr", "pid", "uid", "syscall", "arch", "raw")
    if TYPE_CHECKING:
        signo: int
        errno: int
        code: int
        addr: int
        pid: int
        uid: int
        syscall: int
        arch: int
        raw: bytes | None
        si_signo: int
        si_code: int
        si_errno: int
        si_pid: int
        si_uid: int
        si_addr: int
        si_syscall: int
        si_arch: int
        si_call_addr: int

    def __init__(self, signo: int = 0, code: int = 0, errno: int = 0, addr: int = 0, pid: int = 0, uid: int = 0,
                 syscall: int = 0, arch: int = 0, raw: bytes | None = None) -> None:
        self.signo, self.code, self.errno = signo, code, errno
        self.addr, self.pid, self.uid = addr, pid, uid
        self.syscall, self.arch, self.raw = syscall, arch, raw

    @property
    def call_addr(self) -> int:
        """For SIGSYS: the address after the system call instruction."""
        return self.addr

    # The standard library's names (signal.struct_siginfo, os.waitid_result).
    si_signo = property(lambda self: self.signo, doc="the signal number")
    si_code = property(lambda self: self.code, doc="why it was sent (SI_USER, SYS_SECCOMP, SEGV_MAPERR...)")
    si_errno = property(lambda self: self.errno, doc="an errno the sender attached")
    si_pid = property(lambda self: self.pid, doc="the sending process (signals sent by a process, SIGCHLD)")
    si_uid = property(lambda self: self.uid, doc="the sender's real uid")
    si_addr = property(lambda self: self.addr, doc="the faulting address (SIGSEGV, SIGBUS, SIGILL, SIGFPE)")
    si_syscall = property(lambda self: self.syscall, doc="SIGSYS: the system call's number")
    si_arch = property(lambda self: self.arch, doc="SIGSYS: its AUDIT_ARCH_*")
    si_call_addr = property(lambda self: self.addr, doc="SIGSYS: the address after the syscall instruction")

    @property
    def si_status(self) -> int:
        """SIGCHLD: the exit status or the signal; else 0."""
        if self.signo == _SIGCHLD and self.raw and len(self.raw) >= 28:
            return struct.unpack_from("<i", self.raw, 24)[0]
        return 0

    @classmethod
    def from_bytes(cls, raw: bytes) -> SigInfo:
        """Decode a kernel siginfo_t. Only fields meaningful for the signal are read."""
        signo, errno, code, word, syscall, arch = _SIGINFO_HEAD.unpack_from(raw, 0)
        return cls._decoded(signo, code, errno, word, syscall, arch, raw)

    @classmethod
    def _decoded(cls, signo, code, errno, word, syscall, arch, raw):
        """From fields already read out of a siginfo_t (word: the 8 bytes at offset 16)."""
        info = cls.__new__(cls)
        info._load(signo, code, errno, word, syscall, arch, raw)
        return info

    def _load(self, signo, code, errno, word, syscall, arch, raw):
        """Set every field from those read out of a siginfo_t (see _decoded)."""
        self.signo, self.errno, self.code, self.raw = signo, errno, code, bytes(raw)
        self.addr = self.pid = self.uid = self.syscall = self.arch = 0
        if signo == _SIGSYS and code > 0:
            self.addr, self.syscall, self.arch = word, syscall, arch
        elif code <= 0 or signo == _SIGCHLD:             # sent by a process: pid and uid
            pid = word & 0xFFFFFFFF
            self.pid, self.uid = pid - (1 << 32) if pid >> 31 else pid, word >> 32
        elif signo in _FAULTS:
            self.addr = word

    def to_bytes(self) -> bytes:
        """Encode as a kernel siginfo_t (the original bytes, with the decoded fields written over)."""
        raw = bytearray(self.raw or bytes(128))
        _SIGINFO.pack_into(raw, 0, self.signo, self.errno, self.code)
        if self.code <= 0:
            struct.pack_into("<iI", raw, 16, self.pid, self.uid)
        elif self.signo == signal.SIGSYS:
            struct.pack_into("<QiI", raw, 16, self.addr, self.syscall, self.arch)
        elif self.addr:
            struct.pack_into("<Q", raw, 16, self.addr)
        return bytes(raw)

    def _fill(self, other):
        for k in self.__slots__:
            setattr(self, k, getattr(other, k))

    def _fill_from(self, stop):
        """_fill(stop.siginfo), without decoding a SigInfo of the stop's own on the way."""
        if stop._info is None:
            self._load(*stop._fields[:7])
        else:
            self._fill(stop._info)

    def __eq__(self, other):
        if not isinstance(other, SigInfo):
            return NotImplemented
        return all(getattr(self, k) == getattr(other, k) for k in self.__slots__ if k != "raw")

    def __repr__(self):
        try:
            name = signal.Signals(self.signo).name
        except ValueError:
            name = str(self.signo)
        if self.signo == signal.SIGSYS:
            from .syscalls import name_of
            return "<SigInfo %s code=%d syscall=%s call_addr=%#x arch=%#x>" % (
                name, self.code, name_of(self.syscall), self.addr, self.arch)
        if self.code <= 0:
            return "<SigInfo %s code=%d pid=%d uid=%d>" % (name, self.code, self.pid, self.uid)
        return "<SigInfo %s code=%d addr=%#x>" % (name, self.code, self.addr)


class StopReason(enum.StrEnum):
    """Why a run ended. A str enum: stop.reason == "syscall" reads as before."""

    SYSCALL = "syscall"         # the guest made a system call: not executed, the caller answers it
    SIGNAL = "signal"           # a signal (a fault, or one sent to the thread)


class Stop:
    """Why Space.exec returned: a trapped system call or a signal, with the state at that point.

    ctx: the registers (and fpstate, if asked for) at the stop; reason: a StopReason; siginfo:
    the synthetic SIGSYS of a syscall stop or the signal's; syscall: its number, or None; signo.
    """

    # _fields: (signo, code, errno, word, syscall, arch, raw, ...) as read from a siginfo by the
    # stub engine; the SigInfo is built from them only when asked for.
    __slots__ = ("ctx", "_info", "_fields", "reason")
    if TYPE_CHECKING:
        ctx: SigContext
        reason: StopReason

    def __init__(self, ctx: SigContext, siginfo: SigInfo | None, reason: StopReason) -> None:
        self.ctx, self._info, self._fields, self.reason = ctx, siginfo, None, reason

    @property
    def siginfo(self) -> SigInfo:
        if self._info is None:
            self._info = SigInfo._decoded(*self._fields[:7])
        return self._info

    @property
    def syscall(self) -> int | None:
        if self.reason != StopReason.SYSCALL:
            return None
        return self._fields[4] if self._info is None else self._info.syscall

    @property
    def signo(self) -> int:
        return self._fields[0] if self._info is None else self._info.signo

    def __repr__(self):
        return "<Stop %s %r at %s=%#x>" % (self.reason, self.siginfo, _arch.PC, getattr(self.ctx, _arch.PC))


# What the C entries (a Register; a Runner's Stop) read and fill in these objects.
_core.entry_setup(SigContext, Stop, StopReason.SYSCALL, StopReason.SIGNAL, _arch.REG_INDEX[_arch.SYSCALL_NR],
                  tuple(_arch.REG_INDEX[r] for r in _arch.SYSCALL_ARGS), _arch.REG_INDEX[_arch.SYSCALL_RET])
