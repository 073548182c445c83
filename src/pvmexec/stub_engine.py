"""Stub spaces: a fresh address space of our own (a stub process) for guest code.

The caller creates the shared region, starts the stub (a static program built
at install time, run from a memfd) and drives it through the region: mode 2
for the few memory-management syscalls the stub may make, mode 1 to run guest
code, whose syscalls the stub's seccomp filter traps and whose faults its
signal handler catches. The region is guest-writable: everything read back is
validated, and a stub that misbehaves is killed, not trusted.
"""
import ctypes
import mmap
import os
import signal
import struct
import subprocess
import time

from . import _core
from .arch import x86_64 as arch
from .context import SigContext, SigInfo, Stop
from .errors import EngineError, RemoteSyscallError, TargetGone
from .syscalls import name_of

L = _core.LAYOUT
FP_MAX = L["STUB_FP_MAX"]
SIGSYS, SYS_SECCOMP = signal.SIGSYS, 1


class StubEngine:
    name = "stub"

    def __init__(self, spin=None):
        self.proc = None
        self._map = None
        self._keep = None
        self.pidfd = -1
        self._seq = ctypes.c_uint32(0)       # our own request counter: the shared slot is not trusted
        self.counter = ctypes.addressof(self._seq)
        self.spin = spin if spin is not None else (20000 if os.cpu_count() > 1 else 0)
        fd = os.memfd_create("pvmexec-stub-region", os.MFD_CLOEXEC)
        exe = os.memfd_create("pvmexec-stub", 0)
        try:
            os.ftruncate(fd, L["STUB_REGION_SIZE"])
            self._map = mmap.mmap(fd, L["STUB_REGION_SIZE"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
            self._keep = ctypes.c_char.from_buffer(self._map)
            self._base = ctypes.addressof(self._keep)
            self.block = self._base + L["STUB_BLOCK_OFF"]
            struct.pack_into("<IIi", self._map, 0, L["STUB_MAGIC"], 0, os.getpid())
            struct.pack_into("<I", self._map, L["STUB_BLOCK_OFF"] + L["slot.spin"], self.spin)
            os.write(exe, _core.STUB_ELF)
            os.set_inheritable(fd, True)
            self.proc = subprocess.Popen(["/proc/self/fd/%d" % exe, str(fd)], pass_fds=(fd, exe),
                                         stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                         stderr=subprocess.DEVNULL, close_fds=True)
            self.pid = self.proc.pid
            self.pidfd = os.pidfd_open(self.pid)
            self._wait_ready()
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
            os.close(exe)
        self.gadget = struct.unpack_from("<Q", self._map, L["stub_header.gadget"])[0]
        # The first trap's FPU state (the stub never touched the FPU): the clean state for this CPU.
        stop_off = L["STUB_BLOCK_OFF"] + L["STUB_STOP_OFF"]
        fp_size = struct.unpack_from("<I", self._map, stop_off + 8)[0]
        fp_off = L["STUB_BLOCK_OFF"] + L["STUB_FP_OFF"]
        self._init_fp = bytes(self._map[fp_off:fp_off + fp_size]) if 512 <= fp_size <= L["STUB_FP_MAX"] else None

    def _wait_ready(self):
        deadline = time.monotonic() + 10
        while struct.unpack_from("<I", self._map, 4)[0] != L["STUB_READY"]:
            rc = self.proc.poll()
            if rc is not None:
                raise EngineError("the stub exited during start-up (status %d)" % rc)
            if time.monotonic() > deadline:
                raise EngineError("the stub did not start")
            _core.futex_wait(self._base + 4, 0, 20)

    # -- mode 2: only what the stub may do ------------------------------------------------

    def syscall(self, nr, args):
        if nr not in STUB_ALLOWED:
            raise RemoteSyscallError(1, "%s (a stub space allows only %s)" % (
                name_of(nr), ", ".join(name_of(n) for n in sorted(STUB_ALLOWED))), args)
        return self._call(_core.agent_syscall, nr, *args)

    def syscalls(self, calls):
        for nr, args in calls:
            if nr not in STUB_ALLOWED:
                raise RemoteSyscallError(1, "%s (not allowed in a stub space)" % name_of(nr), args)
        return self._call(_core.agent_batch, calls)

    def _call(self, fn, *args):
        try:
            return fn(self.block, self.counter, 0, self.pidfd, self.spin, *args)
        except OSError as e:
            if e.errno == 3:
                raise TargetGone(self.pid, "the stub space's process %d died" % self.pid) from None
            raise
        except (TypeError, ValueError):
            raise
        except BaseException:
            self.kill()        # interrupted with a request in flight (or the guest running): untrustworthy now
            raise

    # -- mode 1 ------------------------------------------------------------------------------

    def exec(self, ctx, sigmask):
        arch.validate(ctx._q)
        fp = ctx.fpstate
        if fp is not None and not 512 <= len(fp) <= FP_MAX:
            raise ValueError("fpstate must be 512..%d bytes" % FP_MAX)
        signo, raw, regs, fp_out = self._call(_core.stub_run, ctx._buf, b"" if fp is None else fp, fp is not None)
        info = SigInfo.from_bytes(raw)
        if info.signo != signo:
            raise EngineError("stub reported inconsistent stop data")
        out = SigContext._from_regs(regs, fp_out)
        if signo == SIGSYS and info.code == SYS_SECCOMP:
            return Stop(out, info, "syscall"), 0
        return Stop(out, info, "signal"), (0 if signo in sigmask else signo)

    # -- boilerplate shared with the other engines -----------------------------------------------

    def acquire(self):
        return None

    def release(self):
        pass

    def initial_fpstate(self):
        if self._init_fp is None:
            raise EngineError("the stub reported no FPU state at start-up")
        return self._init_fp

    def kill(self):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def close(self):
        self.kill()
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self._keep = None
        if self._map is not None:
            self._map.close()
            self._map = None


STUB_ALLOWED = frozenset(_core.STUB_ALLOWED)
