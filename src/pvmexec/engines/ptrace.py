"""The ptrace engine: borrow one thread of the target, run, put it back exactly.

A borrowed thread is seized (PTRACE_SEIZE, never SIGSTOP) and interrupted; its
general registers, xstate and signal mask are saved. While borrowed it blocks
every signal except the ones the CPU raises for the code we run (blocking those
would make the kernel reset the target's handlers). Signals sent to the thread
meanwhile stay pending; one that is dequeued anyway (SIGSTOP, a user-sent
synchronous signal) is re-injected or re-queued, never dropped. On release the
saved state is written back from a stop inside the kernel's signal path, so an
interrupted blocking syscall restarts exactly as it would have.
"""
import errno
import os
import signal
import struct
import time
import warnings

from .. import _core, _sigguard, janitor, proc
from ..abi import MAP_ANONYMOUS, MAP_PRIVATE, PAGE, PROT_READ, PROT_WRITE, WALL
from ..abi import (CLD_DUMPED, CLD_EXITED, CLD_KILLED, CLD_TRAPPED, PTRACE_CONT, PTRACE_DETACH,  # noqa: F401
                   PTRACE_EVENT_STOP, PTRACE_INTERRUPT, PTRACE_O_TRACESYSGOOD, PTRACE_SEIZE, PTRACE_SINGLESTEP,
                   PTRACE_SYSCALL, PTRACE_SYSEMU)
from ..arch import current as _current_arch
from ..context import SigContext, SigInfo, Stop, StopReason
from . import BaseEngine, target_filters
from ..errors import EngineError, RemoteSyscallError, SeccompBlocked, TargetGone, UnsupportedTarget
from ..syscalls import name_of, number

arch = _current_arch()

_NR_RT_TGSIGQUEUEINFO, _NR_TGKILL = number("rt_tgsigqueueinfo"), number("tgkill")
_NR_MMAP, _NR_MUNMAP, _NR_MPROTECT = number("mmap"), number("munmap"), number("mprotect")
_NR_RT_SIGTIMEDWAIT, _NR_RT_SIGRETURN = number("rt_sigtimedwait"), number("rt_sigreturn")
PROT_EXEC = 4
# The trampoline: a code page (self_restore_code), the frame it restores from (up to ~11.5 KiB), and
# read+write scratch memory for the calls of one borrow (string arguments, buffers).
TRAMPOLINE_SIZE = 8 * PAGE
SCRATCH_OFF, SCRATCH_SIZE = 4 * PAGE, 4 * PAGE
_WALL = WALL                           # waitid: threads too

SYSCALL_STOP = signal.SIGTRAP | 0x80
STOP_TIMEOUT = 5.0     # s a thread may take to stop once interrupted before we give up on it
STOP_SIGNALS = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))

_ALL = (1 << 64) - 1
_SYNC_BITS = sum(1 << (s - 1) for s in arch.SYNC_SIGNALS)
OP_SIGMASK = _ALL & ~_SYNC_BITS & ~(1 << (signal.SIGKILL - 1)) & ~(1 << (signal.SIGSTOP - 1))

_I = arch.REG_INDEX
_RAX, _ORIG_RAX, _RIP = _I[arch.SYSCALL_RET], _I[arch.SYSCALL_ORIG_NR], _I[arch.PC]
_NEG = 1 << 64


def signed(v):
    return v - _NEG if v >= 1 << 63 else v


class Borrowed:
    """One thread held stopped with its original state saved."""

    __slots__ = ("tid", "saved_regs", "saved_xstate", "saved_mask", "regs", "q",
                 "at_syscall_stop", "foreign", "seized_here", "init_xstate", "insn", "seccomp", "rseq_cs",
                 "group_stopped", "stepped", "running", "frame_written", "trampoline_checked", "masked",
                 "scratch_used", "pending", "own_pending", "take_back", "frame_word", "home")

    def __init__(self, tid, seized_here):
        self.tid = tid
        self.seized_here = seized_here
        self.saved_regs = _core.getregs(tid)
        self.saved_xstate = _core.getregset(tid, arch.NT_XSTATE)
        self.saved_mask = _core.getsigmask(tid)
        self.regs = bytearray(self.saved_regs)
        self.q = memoryview(self.regs).cast("Q")
        self.at_syscall_stop = False
        self.foreign = []          # SigInfo of signals dequeued while borrowed, to re-queue
        self.init_xstate = None
        self.insn = None
        self.seccomp = None        # None, "strict", a list of filters, or FilterUnreadable
        self.rseq_cs = None        # (address, value) of the thread's rseq_cs word, if set
        self.group_stopped = False  # the process was stopped by job control when we took the thread
        self.stepped = False       # last resumed with PTRACE_SINGLESTEP: the kernel's step trap is armed
        self.running = bytearray(1)  # set by _core.step while the thread runs, cleared once its stop is ours
        self.frame_written = False   # the trampoline's frame holds this thread's saved state
        self.masked = False          # OP_SIGMASK set (with the first resume, not before)
        self.scratch_used = 0        # bytes of the trampoline's scratch memory given out in this borrow
        self.trampoline_checked = False
        self.pending = 0             # the signals pending when we took it, its own and its process's (bit mask)
        self.own_pending = 0         # those in its own queue
        self.take_back = False       # its policy lets the trampoline's rt_sigtimedwait run
        self.frame_word = 0          # the signals the trampoline takes back should we die (its frame's first word)
        self.home = None             # (frame, the stack's bytes there, return gadget) on its stack; False: none

    def saved(self, name):
        return struct.unpack_from("<Q", self.saved_regs, 8 * _I[name])[0]


class PtraceEngine(BaseEngine):
    """Borrows one thread of the target per operation (or holds it, or freezes them all) and puts it back
    exactly: nothing is added to the target."""

    name = "ptrace"
    reg_index = arch.REG_INDEX

    def __init__(self, pid, tid, reap_leader, check_seccomp=True):
        self.pid = pid
        self.check_seccomp = check_seccomp
        self._filters = (0, [])    # (count, filters) cache: filters are only ever added
        self.tid = tid
        self._reap_leader = reap_leader
        self._borrowed = None
        self._depth = 0
        self._frozen = []          # tids seized and held stopped by freeze()
        self._frozen_stopped = False  # freeze() found the process stopped by job control
        self._vdso_syscall = None
        self._trampoline = None        # address of our trampoline in the target, once made
        self._trampoline_code = b""
        self._took_back = 0            # offset in it of the instruction after its rt_sigtimedwait
        self._trampoline_key = None    # its record with the janitor
        self._trampoline_tried = False
        self._trampoline_mem = None    # /proc/PID/mem, for writing into it (read+exec), or None
        self._records = janitor.Records(pid)   # what we place in the target, for a SIGKILL of ours
        self._scratch_ok = False       # the trampoline's scratch pages are read+write

    # -- waiting -------------------------------------------------------------

    def reaps(self, tid):
        """Whether an exit of tid is ours to collect (not when we are also the leader's parent)."""
        return self._reap_leader or tid != self.pid

    def _wait(self, tid, interruptible=False, deadline=None):
        timeout = -1 if deadline is None else max(0.0, deadline - time.monotonic())
        event = _core.wait(tid, self.reaps(tid), interruptible, timeout)
        if event is None:
            raise EngineError("thread %d of process %d did not stop within %.0f s of being interrupted "
                              "(in uninterruptible sleep?)" % (tid, self.pid, STOP_TIMEOUT))
        code, status = event
        if code in (CLD_EXITED, CLD_KILLED, CLD_DUMPED):
            if self._borrowed is not None and self._borrowed.tid == tid:
                self._borrowed = None
                self._depth = 0
            raise TargetGone(self.pid, "process %d exited during the operation (%s %d)" % (
                self.pid, "exit status" if code == CLD_EXITED else "signal", status))
        return code, status

    def _seize_and_stop(self, tid):
        """Seize tid and bring it to a stop in the kernel's signal path. Returns True if group-stopped."""
        with _sigguard.deferred():          # seized must mean held: no Ctrl-C in between
            return self._seize_and_stop_now(tid)

    def _seize_and_stop_now(self, tid):
        try:
            _core.ptrace(PTRACE_SEIZE, tid, 0, PTRACE_O_TRACESYSGOOD, "ptrace(PTRACE_SEIZE)")
        except OSError as e:
            if e.errno == errno.EPERM and tid != self.pid and proc.thread_exited(self.pid, tid):
                # The kernel refuses to attach to a thread past exit: it is gone, not forbidden.
                raise TargetGone(self.pid, "thread %d of process %d exited" % (tid, self.pid)) from None
            raise proc.seize_error(self.pid, e) from None
        try:
            _core.ptrace(PTRACE_INTERRUPT, tid, 0, 0, "ptrace(PTRACE_INTERRUPT)")
            return self._wait_for_event_stop(tid, deadline=time.monotonic() + STOP_TIMEOUT)
        except TargetGone:
            raise
        except BaseException:
            self._let_go(tid)
            raise

    def _wait_for_event_stop(self, tid, borrowed=None, deadline=None):
        """Wait for PTRACE_EVENT_STOP, passing on any signal the thread dequeues meanwhile."""
        while True:
            code, status = self._wait(tid, deadline=deadline)
            sig = status & 0x7F
            if code == CLD_TRAPPED and status >> 8 == PTRACE_EVENT_STOP:
                return sig in STOP_SIGNALS
            if code == CLD_TRAPPED:
                # Any other trap consumes the pending stop trap (kernel's ptrace_stop): ask again.
                _core.ptrace(PTRACE_INTERRUPT, tid, 0, 0, "ptrace(PTRACE_INTERRUPT)")
            if code == CLD_TRAPPED and status == SYSCALL_STOP:
                _core.ptrace(PTRACE_CONT, tid, 0, 0, "ptrace(PTRACE_CONT)")
                continue
            if code == CLD_TRAPPED:
                if borrowed is not None:
                    # Borrowed: user code must not run. Keep it and suppress it here.
                    self._keep_signal(borrowed, sig)
                    _core.ptrace(PTRACE_CONT, tid, 0, 0, "ptrace(PTRACE_CONT)")
                else:
                    # Not yet borrowed: deliver it as if we were not there.
                    _core.ptrace(PTRACE_CONT, tid, 0, sig, "ptrace(PTRACE_CONT)")
                continue
            raise EngineError("unexpected wait event %d/%#x for thread %d" % (code, status, tid))

    def _keep_signal(self, b, sig):
        """A signal was dequeued while b is borrowed: ours (a fault we caused) or someone else's."""
        if sig in STOP_SIGNALS or sig == signal.SIGKILL:
            return
        info = SigInfo.from_bytes(_core.getsiginfo(b.tid))
        if info.code > 0 and sig in arch.SYNC_SIGNALS:
            return                 # raised by the code we ran: it belongs to us
        b.foreign.append(info)

    @staticmethod
    def _try_detach(tid):
        try:
            _core.ptrace(PTRACE_DETACH, tid, 0, 0, "ptrace(PTRACE_DETACH)")
        except OSError:
            pass

    def _let_go(self, tid):
        """Detach tid; if it died while ours, collect it, so that no exited thread stays traced by us
        (a zombie in the target's task list that the next attach would find traced)."""
        try:
            _core.ptrace(PTRACE_DETACH, tid, 0, 0, "ptrace(PTRACE_DETACH)")
        except OSError as e:
            if e.errno == errno.ESRCH and self.reaps(tid):
                deadline = time.monotonic() + 1.0      # it may still be on its way out
                while time.monotonic() < deadline:
                    try:
                        if os.waitid(os.P_PID, tid, os.WEXITED | os.WNOHANG | _WALL) is not None:
                            return
                    except OSError:                     # not ours to collect (any more)
                        return
                    time.sleep(0.001)

    # -- borrowing -------------------------------------------------------------

    def acquire(self):
        """Borrow the thread (nested calls share one borrow)."""
        if self._depth:
            self._depth += 1
            return self._borrowed
        try:
            with _sigguard.deferred():      # a borrow is whole or none
                return self._acquire()
        except BaseException:
            # A Ctrl-C held off meanwhile is raised as the block ends: give back what was just taken.
            if self._borrowed is not None and self._depth == 1:
                self.release()
            raise

    def _acquire(self):
        tid = self.tid
        seized_here = tid not in self._frozen
        stopped = self._seize_and_stop(tid) if seized_here else self._frozen_stopped
        b = None
        try:
            b = Borrowed(tid, seized_here)
            b.group_stopped = stopped
            cs = b.saved("cs")
            if cs != arch.USER_CS:
                raise UnsupportedTarget(self.pid, "thread %d runs in %s mode (cs=%#x)" % (
                    tid, "32-bit" if cs == arch.USER32_CS else "unknown", cs))
            try:
                status = target_filters.thread_status(self.pid, tid)
            except (FileNotFoundError, ProcessLookupError):
                raise TargetGone(self.pid) from None
            b.seccomp = self._seccomp_state(tid, status)
            b.own_pending, shared = target_filters.pending_signals(status)
            b.pending = b.own_pending | shared
            b.rseq_cs = self._rseq_cs(tid)
        except BaseException:
            if b is not None:
                try:
                    _core.setsigmask(tid, b.saved_mask)
                except OSError:
                    pass
            if seized_here:
                self._try_detach(tid)
            raise
        self._borrowed = b
        self._depth = 1
        return b

    def _rseq_cs(self, tid):
        """The thread's rseq critical-section pointer. Running our code at another address makes
        the kernel clear it; put back, a preempted critical section still aborts as it must."""
        cfg = _core.rseq_config(tid)
        if not cfg or not cfg[0]:
            return None
        addr = cfg[0] + 8                       # struct rseq: cpu_id_start, cpu_id, rseq_cs
        try:
            value = struct.unpack("<Q", _core.vm_read(self.pid, addr, 8))[0]
        except OSError:
            return None
        return (addr, value) if value else None

    def _seccomp_state(self, tid, status):
        if not self.check_seccomp:
            return None
        mode, count = target_filters.status_mode(status)
        if mode == 0:
            return None
        if mode == 1:
            return "strict"
        if self._filters[0] != count:
            try:
                self._filters = (count, target_filters.load_filters(tid))
            except target_filters.FilterUnreadable as e:
                return e
        return self._filters[1]

    def _seccomp_gate(self, b, nr, args, insn):
        """None to go ahead, or the result the target's policy gives without running the call."""
        policy = b.seccomp
        if policy is None:
            return None
        if policy == "strict":
            if nr in target_filters.STRICT_ALLOWED:
                return None
            raise SeccompBlocked(name_of(nr), args, "kill the process (strict mode)")
        if isinstance(policy, target_filters.FilterUnreadable):
            raise SeccompBlocked(name_of(nr), args, "not be checked: its filters cannot be read (%s; "
                                 "needs CAP_SYS_ADMIN), and a call they forbid could kill it. Attach with "
                                 "check_seccomp=False to inject anyway" % policy)
        ret = target_filters.verdict(policy, nr, arch.AUDIT_ARCH, insn + arch.SYSCALL_INSN_LEN, args)
        action = ret & target_filters.RET_ACTION_FULL
        if action in (target_filters.RET_ALLOW, target_filters.RET_LOG):
            return None
        if action == target_filters.RET_ERRNO:
            return -min(ret & target_filters.RET_DATA, 4095)
        if action == target_filters.RET_TRACE:
            return -errno.ENOSYS
        raise SeccompBlocked(name_of(nr), args, target_filters.describe(ret))

    def release(self):
        self._depth = max(0, self._depth - 1)     # 0 already when the target died mid-operation
        if self._depth > 0:
            return
        with _sigguard.deferred():          # the thread goes back whole, then a Ctrl-C takes effect
            self._release()

    def _release(self):
        b = self._borrowed
        self._borrowed = None
        if b is None:
            return
        gone = False
        try:
            if b.at_syscall_stop and signed(b.saved(arch.SYSCALL_ORIG_NR)) != -1:
                # Restore from a stop inside the signal path, where the kernel
                # applies its syscall-restart logic to the saved registers.
                self._stop_in_signal_path(b)
            self._requeue(b)
            if b.stepped and not b.seized_here:
                # A thread we keep held (frozen) must not stay armed for single-step: if we die, the
                # kernel's detach at our exit leaves the trap set and the thread dies of SIGTRAP.
                self._stop_in_signal_path(b)
            if b.rseq_cs is not None:
                _core.vm_write(self.pid, b.rseq_cs[0], struct.pack("<Q", b.rseq_cs[1]))
            if b.home:
                self._unframe(b, b.home)
        except TargetGone:
            gone = True
            raise
        finally:
            if not gone:
                request = PTRACE_DETACH if b.seized_here else -1
                _core.restore(b.tid, b.saved_regs, b.saved_xstate, b.saved_mask, request, 0)

    def _stop_in_signal_path(self, b):
        """Move the stopped thread to a PTRACE_EVENT_STOP without running user code (PTRACE_CONT
        with a trap pending); it also disarms single-step."""
        _core.ptrace(PTRACE_INTERRUPT, b.tid, 0, 0, "ptrace(PTRACE_INTERRUPT)")
        _core.ptrace(PTRACE_CONT, b.tid, 0, 0, "ptrace(PTRACE_CONT)")
        self._wait_for_event_stop(b.tid, b, time.monotonic() + STOP_TIMEOUT)
        b.at_syscall_stop = b.stepped = False

    def _requeue(self, b):
        """Put back signals that were dequeued while borrowed, with their original siginfo."""
        if b.foreign:
            # Block everything meanwhile (restore() puts the thread's own mask back): a signal queued
            # here must not be dequeued again by the next call we run to queue the others.
            _core.setsigmask(b.tid, _ALL & ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1))))
            b.masked = True         # so _resume keeps this mask (after _go_home it would set OP_SIGMASK)
        for _round in range(8):
            pending, b.foreign = b.foreign, []
            if not pending:
                return
            for info in pending:
                self._requeue_one(b, info)
        if b.foreign:
            warnings.warn("pvmexec: signals %s to thread %d were dequeued again at every try to queue them "
                          "back and are lost" % (sorted({i.signo for i in b.foreign}), b.tid), RuntimeWarning)
            b.foreign = []

    def _requeue_one(self, b, info):
        # The siginfo goes in a page of our own: below the stack pointer may be live data (a thread on
        # a small alternate stack), and nothing of ours may stay in the target's memory.
        r, scratch = -1, None
        try:
            scratch = self._run_syscall(b, _NR_MMAP, (0, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                                                      -1, 0))
            if scratch > 0:
                _core.vm_write(self.pid, scratch, info.to_bytes())
                r = self._run_syscall(b, _NR_RT_TGSIGQUEUEINFO, (self.pid, b.tid, info.signo, scratch))
        except (RemoteSyscallError, EngineError, OSError) as e:
            if isinstance(e, TargetGone):
                raise
            r = -1
        finally:
            if scratch is not None and scratch > 0:
                self._run_syscall(b, _NR_MUNMAP, (scratch, PAGE))
        if r < 0:
            self._run_syscall(b, _NR_TGKILL, (self.pid, b.tid, info.signo))      # siginfo lost

    def cancel(self, b):
        """Stop whatever the borrowed thread runs (Ctrl-C in the caller) without running user code.
        Every wait here is bounded (STOP_TIMEOUT): the caller never hangs on a thread that will not stop."""
        if not b.running[0]:
            # The exception came while the thread sat in a stop we had already collected: no new event
            # would come for an interrupt. Keep a signal it was stopped for, then park it.
            try:
                info = SigInfo.from_bytes(_core.getsiginfo(b.tid))
            except OSError:
                info = None                           # a group stop
            if info is not None and (info.code <= 0 or info.signo not in arch.SYNC_SIGNALS):
                b.foreign.append(info)
            self._stop_in_signal_path(b)
            return
        deadline = time.monotonic() + STOP_TIMEOUT
        _core.ptrace(PTRACE_INTERRUPT, b.tid, 0, 0, "ptrace(PTRACE_INTERRUPT)")
        self._wait_for_event_stop(b.tid, b, deadline)
        b.running[0] = 0
        b.at_syscall_stop = False
        # An interrupted single-stepped syscall queues its SIGTRAP behind our stop: take it out.
        pending = [SigInfo.from_bytes(raw) for raw in _core.peeksiginfo(b.tid, False, 64)]
        if any(i.signo == signal.SIGTRAP and i.code > 0 for i in pending):
            _core.ptrace(PTRACE_CONT, b.tid, 0, 0, "ptrace(PTRACE_CONT)")
            code, status = self._wait(b.tid, deadline=deadline)
            if code != CLD_TRAPPED or status != signal.SIGTRAP:
                raise EngineError("expected our SIGTRAP, got %d/%#x" % (code, status))
            self._stop_in_signal_path(b)

    # -- freezing the whole thread group --------------------------------------

    def freeze(self, exclude=()):
        """Stop every thread of the target (but those in exclude) until thaw()."""
        while True:
            tids = set(_threads(self.pid)) - set(self._frozen) - set(exclude)
            if not tids:
                return
            for tid in sorted(tids):
                try:
                    with _sigguard.deferred():      # held means listed, for thaw()
                        if self._seize_and_stop(tid):
                            self._frozen_stopped = True
                        self._frozen.append(tid)
                except TargetGone:
                    continue
                except OSError as e:
                    if e.errno == errno.ESRCH:       # the thread exited meanwhile
                        continue
                    raise

    def thaw(self):
        while self._frozen:
            self._let_go(self._frozen.pop())

    def borrowed_thread(self):
        """The Borrowed thread while acquire() holds one (Space.borrowed()), else None."""
        return self._borrowed

    def frozen_tids(self):
        """The threads freeze() holds stopped, in the order they were taken."""
        return list(self._frozen)

    def forget_frozen(self):
        """The frozen threads are dead (killed while held): nothing left to detach, and our trampoline
        went with the process's memory."""
        self._frozen.clear()
        self._forget_trampoline()

    def syscall_in(self, tid, nr, args):
        """Mode 2 in one given (frozen or borrowable) thread, for calls only that thread can answer."""
        if self._borrowed is not None and self._borrowed.tid != tid:
            raise EngineError("thread %d is held: a call cannot run in thread %d meanwhile" % (self._borrowed.tid, tid))
        keep = self.tid
        self.tid = tid
        try:
            return self.syscall(nr, args)
        finally:
            self.tid = keep

    # -- operations ------------------------------------------------------------

    def syscall_insn(self, b):
        """Address of a syscall instruction in the target: where it stopped, else in its vDSO."""
        if b.insn is None:
            b.insn = self._find_insn(b)
        return b.insn

    def _find_insn(self, b):
        if signed(b.saved(arch.SYSCALL_ORIG_NR)) != -1:
            at = b.saved(arch.PC) - arch.SYSCALL_INSN_LEN
            try:
                if _core.vm_read(self.pid, at, 2) == arch.SYSCALL_INSN:
                    return at
            except OSError:
                pass
        if self._vdso_syscall is None:
            self._vdso_syscall = find_syscall_insn(self.pid)
        return self._vdso_syscall

    def _run_syscall(self, b, nr, args):
        """Run one syscall in the borrowed thread; returns the raw (signed) result.

        It runs at our trampoline, stepped through syscall-entry and -exit stops: should we die at any
        moment of it (SIGKILL), the kernel lets the thread go, it finishes the call and restores its own
        saved state from the trampoline's frame (registers, FPU, mask) and runs on untouched. With no
        trampoline (its mapping refused) it single-steps a syscall instruction of the target's own."""
        at = self._trampoline_for(b)
        if at is None:
            stack = self._home_frame(b)
            return self._self_restoring_call(b, stack, nr, args) if stack else self._step_syscall(b, nr, args)
        if b.seccomp is not None:
            refused = self._seccomp_gate(b, nr, args, at)
            if refused is not None:
                return refused
        self._write_frame(b, at)
        q = b.q
        prepared = _load_call(b, nr, args, at)
        # A stop inside another syscall (resumed from a mode-1 SYSEMU stop, the kernel reports that
        # call's exit first, before our instruction ran): again.
        ret = self._to_syscall_exit(b, lambda q: q[_RIP] == at + arch.SYSCALL_INSN_LEN, prepared,
                                    lambda info: _call_failed(nr, args, info, q[_RIP]))
        if ret in arch.CALL_SIGNALS and b.take_back:
            self._take_back(b, at, arch.CALL_SIGNALS[ret])
        return ret

    def _take_back(self, b, at, sig):
        """The SIGPIPE or SIGXFSZ (sig) a call raised in the thread's own queue, taken back by the
        trampoline's rt_sigtimedwait, which runs next (as it would should we die now); one the thread
        had in its queue already stays."""
        bit = 1 << (sig - 1)
        if b.own_pending & bit or not any(SigInfo.from_bytes(raw).signo == sig
                                          for raw in _core.peeksiginfo(b.tid, False, 64)):
            return
        if b.frame_word != bit:
            self._write_trampoline(at + PAGE, struct.pack("<Q", bit))
        try:
            took = at + self._took_back
            self._to_syscall_exit(b, lambda q: q[_RIP] == took, None,
                                  lambda info: _call_failed(_NR_RT_SIGTIMEDWAIT, (), info, b.q[_RIP]))
        finally:
            if b.frame_word != bit:
                self._write_trampoline(at + PAGE, struct.pack("<Q", b.frame_word))

    def _to_syscall_exit(self, b, ours, again, failed):
        """Resume b through syscall stops until the exit of the syscall ours(regs) recognises; returns its
        result. At a syscall stop it does not recognise, b's registers go back to again (if given);
        a signal the code raises is failed(info)."""
        sig_in = 0
        entered = False
        while True:
            status = self._resume(b, PTRACE_SYSCALL, sig_in)
            sig_in = 0
            if status == SYSCALL_STOP:
                if not ours(b.q):
                    if again is not None:
                        b.regs[:] = again
                    continue
                if entered:
                    return signed(b.q[_RAX])
                entered = True
                continue
            sig_in, info = self._other_stop(b, status)
            if info is not None:
                raise failed(info)

    def _write_frame(self, b, at):
        if not b.frame_written:
            saved = dict(zip(arch.REG_NAMES, memoryview(b.saved_regs).cast("Q")))
            frame = bytearray(arch.self_restore_frame(saved, b.saved_mask, b.saved_xstate, _xsave_components(),
                                                      at + PAGE))
            # Its first word: the signals a call of ours may raise in the thread that the trampoline takes
            # back should we die (none pending when we took it, in its queue or its process's: neither
            # may be taken for ours), if its policy lets rt_sigtimedwait run.
            b.take_back = b.seccomp is None or not self._seccomp_refuses(
                b, _NR_RT_SIGTIMEDWAIT, (at + PAGE, 0, 0, 8), at + self._took_back - arch.SYSCALL_INSN_LEN)
            b.frame_word = 0
            for sig in arch.CALL_SIGNALS.values() if b.take_back else ():
                if not b.pending >> (sig - 1) & 1:
                    b.frame_word |= 1 << (sig - 1)
            struct.pack_into("<Q", frame, 0, b.frame_word)
            self._write_trampoline(at + PAGE, bytes(frame))
            b.frame_written = True

    def _seccomp_refuses(self, b, nr, args, insn):
        """Whether the thread's seccomp policy would do anything but allow the call."""
        try:
            return self._seccomp_gate(b, nr, args, insn) is not None
        except SeccompBlocked:
            return True

    def way_back(self, b):
        """An address that code we run in b can jump to for the thread to restore its own state (our
        trampoline after its syscall), or None."""
        at = self._trampoline_for(b)
        if at is None:
            return None
        self._write_frame(b, at)
        return at + arch.SYSCALL_INSN_LEN

    def run_code_to_syscall(self, b, regs, nr):
        """Run target code from regs with real syscalls until the exit of its syscall nr; returns its
        result. Code that then jumps to way_back() leaves the thread whole should we die meanwhile."""
        b.regs[:] = regs
        return self._to_syscall_exit(b, lambda q: signed(q[_ORIG_RAX]) == nr, None, lambda info: EngineError(
            "%s at %#x while running injected code" % (signal.Signals(info.signo).name, b.q[_RIP])))

    def _trampoline_for(self, b):
        """Our trampoline's address (made at the first call; checked once per borrow), or None."""
        if self._trampoline is not None and not b.trampoline_checked:
            b.trampoline_checked = True
            try:
                intact = _core.vm_read(self.pid, self._trampoline, len(self._trampoline_code)) == \
                    self._trampoline_code
            except OSError:
                intact = False
            if not intact:              # gone with an execve, or unmapped by the target
                self._forget_trampoline()
                self._trampoline_tried = False
        if self._trampoline is None and not self._trampoline_tried:
            self._trampoline_tried = True
            self._make_trampoline(b)
        return self._trampoline

    def _make_trampoline(self, b):
        """One read+exec mapping filled through /proc/PID/mem (one injected call: the stretch in which our
        death harms the thread stays as short as it can be); where the kernel refuses such writes, a
        read+write mapping whose code page is then made read+exec."""
        self._records.started()     # now: nothing but the record between the call and its record
        janitor.start()
        try:
            mem = os.open("/proc/%d/mem" % self.pid, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            mem = None
        # At an address chosen now, recorded before the call: a SIGKILL of ours right after it leaves the
        # mapping to the janitor, not in the target (the kernel takes the hint where it is free).
        try:
            maps = proc.mappings(self.pid, identity=True)
        except OSError:
            maps = []
        hint = proc.free_address(maps, TRAMPOLINE_SIZE)
        key = self._records.add("map", hint, TRAMPOLINE_SIZE) if hint else None
        args = (hint, TRAMPOLINE_SIZE, PROT_READ | (PROT_EXEC if mem is not None else PROT_WRITE),
                MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
        try:
            addr = self._step_home(b, _NR_MMAP, args, maps)
        except SeccompBlocked:
            addr = -errno.EPERM     # its policy forbids mmap: calls go without it
            self._go_home(b)
        if addr == hint:
            self._trampoline_key = key
        else:
            janitor.unrecord(key)
            if not -4096 < addr < 0:
                self._trampoline_key = self._records.add("map", addr, TRAMPOLINE_SIZE)
        if -4096 < addr < 0:
            if mem is not None:
                os.close(mem)
            return
        try:
            code, self._took_back = arch.self_restore_code(addr, addr + PAGE)
            written = False
            if mem is not None:
                try:
                    written = os.pwrite(mem, code, addr) == len(code)
                except OSError:
                    pass
            if not written:
                if mem is not None:
                    raise OSError(errno.EACCES, "writing our trampoline through /proc/%d/mem" % self.pid)
                _core.vm_write(self.pid, addr, code)
                if self._step_home(b, _NR_MPROTECT, (addr, PAGE, PROT_READ | PROT_EXEC)) < 0:
                    raise OSError(errno.EACCES, "mprotect")
            self._scratch_ok = mem is None     # read+write already unless filled through /proc/PID/mem
        except BaseException as e:
            self._step_home(b, _NR_MUNMAP, (addr, TRAMPOLINE_SIZE))
            janitor.unrecord(self._trampoline_key)
            self._trampoline_key = None
            if mem is not None:
                os.close(mem)
            if isinstance(e, (OSError, SeccompBlocked)) and not isinstance(e, TargetGone):
                return                          # no trampoline: calls step instead
            raise
        self._trampoline, self._trampoline_code, self._trampoline_mem = addr, code, mem
        if not self._scratch_ok:            # through the trampoline: nothing to fear from our death now
            self._scratch_ok = self._run_syscall(b, _NR_MPROTECT, (addr + SCRATCH_OFF, SCRATCH_SIZE,
                                                                   PROT_READ | PROT_WRITE)) == 0

    def borrowed_scratch(self, size):
        """Scratch memory for the borrow held now (our trampoline's, recorded already: nothing to map or
        unmap), or None: no borrow, no trampoline, or no room left."""
        b = self._borrowed
        if b is None or self._trampoline_for(b) is None or not self._scratch_ok:
            return None
        size = (size + 63) & ~63
        if b.scratch_used + size > SCRATCH_SIZE:
            return None
        addr = self._trampoline + SCRATCH_OFF + b.scratch_used
        b.scratch_used += size
        return addr

    def _write_trampoline(self, addr, data):
        if self._trampoline_mem is None:
            _core.vm_write(self.pid, addr, data)
        elif os.pwrite(self._trampoline_mem, data, addr) != len(data):
            raise OSError(errno.EFAULT, "short write into our trampoline")

    def trampoline_range(self):
        """(address, size) of our trampoline in the target, or None."""
        return None if self._trampoline is None else (self._trampoline, TRAMPOLINE_SIZE)

    def trampoline_unmapped(self):
        """Our trampoline was unmapped another way (by the agent, when ptrace no longer reaches the target)."""
        self._forget_trampoline()
        self._trampoline_tried = False

    def _forget_trampoline(self):
        janitor.unrecord(self._trampoline_key)
        self._trampoline = self._trampoline_key = None
        self._close_trampoline_mem()

    def _close_trampoline_mem(self):
        if self._trampoline_mem is not None:
            os.close(self._trampoline_mem)
            self._trampoline_mem = None

    def own_mappings(self):
        return [(self._trampoline, self._trampoline + TRAMPOLINE_SIZE)] if self._trampoline is not None else []

    def prepare(self):
        """Make the trampoline now (attach does): the one stretch in which our death can still harm the
        thread, one single-stepped mmap, then lies inside attach(), not in an operation."""
        b = self.acquire()
        try:
            with _sigguard.deferred():
                self._trampoline_for(b)
        finally:
            self.release()

    def drop_trampoline(self):
        """Unmap our trampoline from the target now (the next call makes it again)."""
        if self._trampoline is None:
            return
        addr_of = self._trampoline
        try:
            b = self.acquire()
            try:
                addr = self._trampoline_for(b)
                if addr is not None:
                    # Off first: what this borrow still runs (re-queued signals) runs on the stack frame.
                    key, self._trampoline = self._trampoline_key, None
                    self._trampoline_tried = True
                    self._step_home(b, _NR_MUNMAP, (addr, TRAMPOLINE_SIZE))
                    janitor.unrecord(key)               # removed; else the janitor's record stays
            finally:
                self.release()
        except TargetGone:                  # its memory went with it
            pass
        except (OSError, EngineError) as e:   # no longer ours to trace: say what stays
            if self._trampoline_key is not None or self._trampoline is not None:
                warnings.warn("pvmexec: our %d-byte trampoline at %#x stays in process %d (%s); it goes when "
                              "the process execs or exits" % (TRAMPOLINE_SIZE, addr_of, self.pid, e),
                              RuntimeWarning)
        finally:
            self._trampoline = None
            self._trampoline_key = None
            self._trampoline_tried = False
            self._close_trampoline_mem()

    def _step_home(self, b, nr, args, maps=None):
        """nr(args) without our trampoline (making or removing it), then the thread straight back to its own
        registers and mask, parked in the signal path with single-step disarmed."""
        stack = self._home_frame(b, maps)
        ret = self._self_restoring_call(b, stack, nr, args) if stack else self._step_syscall(b, nr, args)
        self._go_home(b)
        if stack:                   # its own registers are back: its stack's bytes may follow at once
            b.home = None
            self._stack_back(stack)
        return ret

    def _go_home(self, b):
        _core.restore(b.tid, b.saved_regs, b"", b.saved_mask, -1, 0)
        b.masked = False
        self._stop_in_signal_path(b)

    def _home_frame(self, b, maps=None):
        """The frame calls without our trampoline run on (see _self_restoring_call): our death at any moment
        of one then leaves the thread whole. Written once per borrow and taken out at release (the
        calls that make and remove the trampoline take it out at once); None where the target's code or
        stack does not allow it (such calls are single-stepped: the one stretch in which our death can
        harm the thread)."""
        if b.home is None:
            b.home = self._frame_on_stack(b, maps) or False
        return b.home or None

    def _frame_on_stack(self, b, maps=None):
        """(frame address, the stack's bytes there, return gadget) with the thread's own state written as a
        signal frame below its red zone, whose return address is a restorer of the target's; None where its
        code has no such pieces, its policy would refuse the rt_sigreturn, or the stack's mapping has no
        room. maps: proc.mappings(identity=True) read just now."""
        if maps is None:
            try:
                maps = proc.mappings(self.pid, identity=True)
            except OSError:
                return None
        gadgets = _find_gadgets(self.pid, maps)
        if not gadgets:
            return None
        ret_insn, restorer, restorer_insn = gadgets
        if b.seccomp is not None and self._seccomp_refuses(b, _NR_RT_SIGRETURN, (), restorer_insn):
            return None
        saved = dict(zip(arch.REG_NAMES, memoryview(b.saved_regs).cast("Q")))
        size = len(arch.self_restore_frame(saved, b.saved_mask, b.saved_xstate, _xsave_components(), 0))
        sp = saved[arch.SP]
        frame = (sp - arch.RED_ZONE - size) & ~63
        if not any(m[0] <= frame and sp <= m[1] and "w" in m[2] for m in maps):
            return None
        data = bytearray(arch.self_restore_frame(saved, b.saved_mask, b.saved_xstate, _xsave_components(), frame))
        struct.pack_into("<Q", data, 0, restorer)           # the pretcode slot: where the gadget's ret goes
        try:
            old = _core.vm_read(self.pid, frame, len(data))
            _core.vm_write(self.pid, frame, bytes(data))
        except OSError:
            return None
        return frame, old, ret_insn

    def _unframe(self, b, stack):
        """The thread's own registers and mask back, then its stack's bytes (in that order: until its
        registers are back, the frame is what takes it home should we die)."""
        _core.restore(b.tid, b.saved_regs, b"", b.saved_mask, -1, 0)
        self._stack_back(stack)

    def _stack_back(self, stack):
        try:
            _core.vm_write(self.pid, stack[0], stack[1])
        except OSError:
            pass                                            # gone, or its stack unmapped meanwhile

    def _self_restoring_call(self, b, stack, nr, args):
        """nr(args) at the return gadget with the stack pointer at the frame _frame_on_stack wrote, through
        syscall stops (no single-step trap armed): should we die at any moment, the thread finishes the
        call, returns into the restorer and rt_sigreturns to its own state."""
        frame, _old, insn = stack
        if b.seccomp is not None:
            refused = self._seccomp_gate(b, nr, args, insn)
            if refused is not None:
                return refused
        _load_call(b, nr, args, insn)
        b.q[_I[arch.SP]] = frame
        prepared = bytes(b.regs)
        return self._to_syscall_exit(b, lambda q: q[_RIP] == insn + arch.SYSCALL_INSN_LEN and
                                     signed(q[_ORIG_RAX]) == nr, prepared,
                                     lambda info: _call_failed(nr, args, info, b.q[_RIP]))

    def _step_syscall(self, b, nr, args):
        """_run_syscall without a trampoline: single-step a syscall instruction of the target."""
        q = b.q
        insn = self.syscall_insn(b)
        if b.seccomp is not None:
            refused = self._seccomp_gate(b, nr, args, insn)
            if refused is not None:
                return refused
        prepared = _load_call(b, nr, args, insn)
        sig_in = 0
        while True:
            status = self._resume(b, PTRACE_SINGLESTEP, sig_in)
            sig_in = 0
            if status == signal.SIGTRAP and q[_RIP] == insn + arch.SYSCALL_INSN_LEN:
                return signed(q[_RAX])
            if status == signal.SIGTRAP and q[_RIP] == insn:
                # Stepping out of a syscall-entry stop traps before our instruction ran: again.
                b.regs[:] = prepared
                continue
            sig_in, info = self._other_stop(b, status)
            if info is not None:
                raise _call_failed(nr, args, info, q[_RIP])

    def _other_stop(self, b, status):
        """A stop the loop was not waiting for. Returns (signal to re-inject on resume, info):
        info is the siginfo of a signal raised by the code we run, or None when the stop is
        handled here (a group stop; a stop signal to pass on; someone else's signal, kept)."""
        if status >> 8 == PTRACE_EVENT_STOP:
            return 0, None
        sig = status & 0x7F
        if sig in STOP_SIGNALS:
            return sig, None               # someone stopped the target: let it stop
        info = SigInfo.from_bytes(_core.getsiginfo(b.tid))
        if info.code <= 0 or sig not in arch.SYNC_SIGNALS:
            b.foreign.append(info)
            return 0, None
        return 0, info

    def _resume(self, b, request, sig):
        """Resume the borrowed thread from b.regs until its next stop; returns the wait status."""
        try:
            b.stepped = request == PTRACE_SINGLESTEP
            mask = None if b.masked else OP_SIGMASK
            b.masked = True
            code, status = _core.step(b.tid, b.regs, request, sig, self.reaps(b.tid), b.running, mask)
        except BaseException:
            self.cancel(b)
            raise
        self._check_exit(code, status)
        b.at_syscall_stop = status == SYSCALL_STOP
        return status

    def run_code(self, b, regs):
        """Run target code from regs with real syscalls until it executes int3; returns rax then."""
        b.regs[:] = regs
        sig_in = 0
        while True:
            status = self._resume(b, PTRACE_CONT, sig_in)
            sig_in, info = self._other_stop(b, status)
            if info is None:
                continue
            if info.signo == signal.SIGTRAP and info.code == 0x80:       # SI_KERNEL: our int3
                return signed(b.q[_RAX])
            raise EngineError("%s at %#x while running injected code" % (
                signal.Signals(info.signo).name, b.q[_RIP]))

    def initial_fpstate(self):
        b = self.acquire()
        try:
            return arch.init_xstate(b.saved_xstate)
        finally:
            self.release()

    def _check_exit(self, code, status):
        if code in (CLD_EXITED, CLD_KILLED, CLD_DUMPED):
            self._borrowed = None
            self._depth = 0
            raise TargetGone(self.pid, "process %d exited during the operation" % self.pid)
        if code != CLD_TRAPPED:
            raise EngineError("unexpected wait event %d/%#x" % (code, status))

    def syscall(self, nr, args):
        b = self.acquire()
        try:
            return self._run_syscall(b, nr, args)
        finally:
            self.release()

    def syscalls(self, calls):
        b = self.acquire()
        try:
            return [self._run_syscall(b, nr, args) for nr, args in calls]
        finally:
            self.release()

    def exec(self, ctx, sigmask, thread=0):
        """Mode 1: run ctx until a syscall (not executed) or a signal. Returns (Stop, deliver_sig)."""
        self.check_thread(thread)
        arch.validate(ctx._words())
        b = self.acquire()
        try:
            if ctx.fpstate is not None:
                _core.setregset(b.tid, arch.NT_XSTATE, ctx.fpstate)
            else:
                if b.init_xstate is None:
                    b.init_xstate = arch.init_xstate(b.saved_xstate)
                _core.setregset(b.tid, arch.NT_XSTATE, b.init_xstate)
            sig_in = 0
            b.regs[:] = ctx._buf
            q = b.q
            q[_ORIG_RAX] = _NEG - 1
            while True:
                status = self._resume(b, PTRACE_SYSEMU, sig_in)
                sig_in = 0
                if status == SYSCALL_STOP:
                    op, audit_arch, ip, _sp, nr = _core.syscall_info(b.tid)
                    info = SigInfo(signo=signal.SIGSYS, code=1, addr=ip, syscall=nr, arch=audit_arch)
                    q[_RAX] = nr
                    return self._stop(b, ctx, info, StopReason.SYSCALL), 0
                sig_in, info = self._other_stop(b, status)
                if info is None:
                    continue
                stop = self._stop(b, ctx, info, StopReason.SIGNAL)
                return stop, (0 if info.signo in sigmask else info.signo)
        finally:
            self.release()

    def _stop(self, b, ctx, info, reason):
        fp = _core.getregset(b.tid, arch.NT_XSTATE) if ctx.fpstate is not None else None
        return Stop(SigContext._from_regs(bytearray(b.regs), fp), info, reason)

    def read(self, addr, n):
        return _core.vm_read(self.pid, addr, n)

    def close(self):
        try:
            if self._borrowed is not None:      # closed inside borrowed(): put the thread back first
                self._depth = 1
                self.release()
            self.drop_trampoline()
        finally:
            self.thaw()


def _load_call(b, nr, args, at):
    """b's registers set to enter syscall nr(args) at the syscall instruction `at`; returns them as bytes."""
    q = b.q
    q[:] = memoryview(b.saved_regs).cast("Q")
    q[_RAX] = nr
    q[_ORIG_RAX] = _NEG - 1
    q[_RIP] = at
    for name, value in zip(arch.SYSCALL_ARGS, args):
        q[_I[name]] = value % _NEG
    return bytes(b.regs)


def _call_failed(nr, args, info, rip):
    """The error for a signal our injected call raised in the thread."""
    if info.signo == signal.SIGSYS:
        return RemoteSyscallError(1, name_of(nr) + " (refused by the target's seccomp or syscall user dispatch)",
                                  args)
    return EngineError("%s in the target while running %s at %#x" % (signal.Signals(info.signo).name,
                                                                      name_of(nr), rip))


_components = None


def _xsave_components():
    global _components
    if _components is None:
        _components = _core.xsave_components()
    return _components


def _threads(pid):
    try:
        return [int(t) for t in os.listdir("/proc/%d/task" % pid)]
    except FileNotFoundError:
        raise TargetGone(pid) from None


_GADGETS = {}       # (path, dev, inode, file offset, size) of a code mapping -> (ret offset, restorer offsets)


def _gadgets_in(pid, lo, hi, identity):
    """(offset of a return gadget or -1, (restorer offset, its syscall's offset) or None) in one mapping;
    remembered per mapped file (and the vDSO), which is the same code in every process."""
    shared = identity[0] and identity[2] != "0" or identity[0] == "[vdso]"
    known = _GADGETS.get(identity) if shared else None
    if known is not None and _still_gadgets(pid, lo, known):
        return known
    try:
        data = _core.vm_read(pid, lo, min(hi, lo + (8 << 20)) - lo)
    except OSError:
        return -1, None
    at = [(i, i + len(r) - arch.SYSCALL_INSN_LEN) for i, r in ((data.find(r), r) for r in arch.RESTORERS) if i >= 0]
    found = arch.return_gadget(data), min(at) if at else None
    if shared:
        _GADGETS[identity] = found
    return found


def _still_gadgets(pid, lo, known):
    """Whether the code at a remembered (ret offset, restorer offsets) of a mapping at lo still is that."""
    ret, restorer = known
    try:
        if ret >= 0 and arch.return_gadget(_core.vm_read(pid, lo + ret, 32)) != 0:
            return False
        return restorer is None or _core.vm_read(pid, lo + restorer[0], restorer[1] + arch.SYSCALL_INSN_LEN -
                                                 restorer[0]) in arch.RESTORERS
    except OSError:
        return False


def _find_gadgets(pid, maps):
    """(return gadget, restorer, its syscall instruction) in pid's executable mappings (maps: its proc.mappings(identity=True);
    the vDSO first, then its C library), or None."""
    ret = restorer = None
    candidates = sorted((0 if name == "[vdso]" else 1 if "libc" in name else 2, lo, hi, identity)
                        for lo, hi, perms, name, identity in maps if "x" in perms and name != "[vsyscall]")
    for _prio, lo, hi, identity in candidates[:16]:
        r, rest = _gadgets_in(pid, lo, hi, identity)
        if ret is None and r >= 0:
            ret = lo + r
        if restorer is None and rest is not None:
            restorer = (lo + rest[0], lo + rest[1])
        if ret is not None and restorer is not None:
            return (ret,) + restorer
    return None


def find_syscall_insn(pid):
    """A syscall instruction in the target's vDSO, else in its first executable mapping."""
    candidates = [(0 if name == "[vdso]" else 1, lo, min(hi, lo + (1 << 20)))
                  for lo, hi, perms, name in proc.mappings(pid) if "x" in perms and name != "[vsyscall]"]
    for _prio, lo, hi in sorted(candidates):
        try:
            data = _core.vm_read(pid, lo, hi - lo)
        except OSError:
            continue
        i = data.find(arch.SYSCALL_INSN)
        if i >= 0:
            return lo + i
    raise UnsupportedTarget(pid, "no syscall instruction found in its vDSO or code")
