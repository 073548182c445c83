"""The agent engine: a thread of ours inside the target, driven through shared memory.

Injected once with the ptrace engine (memfd region created in the target and
fetched with pidfd_getfd, agent code copied in, a thread cloned into the
target's thread group); then ptrace lets go and the target runs free while
system calls go through the channel. Mode 1 runs in the agent's helper (or on
the agent thread, traced alone), so the target's own threads never stop.

A filter the target puts on all its threads (SECCOMP_FILTER_FLAG_TSYNC) reaches
the agent thread too, and a call it forbids would kill the target: the agent
thread's seccomp state is read again before a call whenever the last look is
older than POLICY_CHECK_NS. Found filtered, the agent leaves (its one call an
exit the filter allows) and the engine goes on through ptrace, each call
checked against the filters as the ptrace engine checks them.
"""
import ctypes
import errno
import mmap
import os
import struct
import threading
import time
import warnings

from .. import _core, _sigguard, janitor, proc
from ..abi import (F_ADD_SEALS, F_SEAL_GROW, F_SEAL_SEAL,  # noqa: F401
                   F_SEAL_SHRINK, MFD_ALLOW_SEALING)
from ..abi import (CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID, CLONE_FILES, CLONE_FS, CLONE_SIGHAND, CLONE_SYSVSEM,  # noqa: F401
                   CLONE_THREAD, CLONE_VM, F_DUPFD_CLOEXEC, MADV_DONTFORK, MAP_ANONYMOUS, MAP_FIXED, MAP_PRIVATE,
                   MAP_SHARED, MFD_CLOEXEC, PROT_EXEC, PROT_READ, PROT_WRITE)
from . import BaseEngine
from .channel import channel_error, region_tampered, wait_word
from ..errors import EngineError, SeccompBlocked, TargetGone, UnsupportedTarget
from .helper import SIZE as HELPER_SIZE, HelperEngine, HelperFailed, HelperGone
from .ptrace import PtraceEngine, find_syscall_insn
from . import target_filters
from .target_filters import thread_mode
from ..arch import current as _current_arch
from ..syscalls import number

arch = _current_arch()

L = _core.LAYOUT
SYMS = _core.AGENT_SYMBOLS
MAX_BATCH = L["MAX_BATCH"]
REGION = L["REGION_SIZE"]
HEADER, SLOT = L["HEADER_OFF"], L["SLOT_OFF"]
CALLS = SLOT + L["slot.calls"]
CALL = struct.Struct("<q6Qq")

CLONE_FLAGS = (CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
               | CLONE_CHILD_CLEARTID | CLONE_CHILD_SETTID)
NR = {n: number(n) for n in ("mmap", "munmap", "memfd_create", "ftruncate", "close", "pidfd_open", "fcntl",
                              "madvise", "exit", "clone")}

# Spin budget (pause iterations) of both sides before sleeping on a futex. It is used only
# while the two run on different CPUs (each side records its CPU in the slot); a machine
# with one CPU never spins.
SPIN_SAME_CPU, SPIN_OTHER_CPU = 0, 20000

# How old the caller's last look at the agent thread's seccomp state may be when a call goes to the
# agent (a look costs about 10 us: reading /proc/PID/task/TID/status).
POLICY_CHECK_NS = 1_000_000


class InjectionFailed(UnsupportedTarget):
    """The agent could not be put into the target (the reason says why); "auto" falls back to ptrace."""

    pass


class AgentLeft(EngineError):
    """The agent has left (the target put a seccomp filter on it): the call goes through ptrace."""

    pass


class AgentEngine(BaseEngine):
    """A thread of ours injected into the target, serving syscalls over shared memory: the target runs
    free meanwhile. Mode 1 runs on that thread through ptrace."""

    name = "agent"

    def __init__(self, pid, pidfd, tracer, high_fd, idle_ms=500):
        """tracer: a PtraceEngine on a target thread, used once to inject the agent."""
        self.pid = pid
        self.pidfd = pidfd
        self._main = tracer
        self._map = None
        self._base = self._slot = self._alive = 0
        self._channel = None           # the slot's C entry: its lock, and Space.syscall's fast path
        self.fast_syscall = None       # the same, once the agent runs
        self._keep = None
        self._seq = ctypes.c_uint32(0)       # our own request counter: the shared slot is not trusted
        self._counter = ctypes.addressof(self._seq)
        self.code_base = self.data_base = None
        self.agent_tid = None
        self._records = janitor.Records(pid)   # what injection places in the target, for a SIGKILL of ours
        self._janitor_key = None       # our record of the region with the janitor (caller-death cleanup)
        self._pidfd_key = None
        self._thread_engine = None
        self._helper = None            # mode 1: the helper process (engines.helper), started at the first exec
        self._helper_lock = threading.Lock()
        self.fast_exec = None          # Space.exec's C entry: the helper's, while one runs
        self.helper_refused = None     # why mode 1 runs on the agent thread through ptrace instead
        self.caller_mappings = {}      # the Space's tracked mappings (address -> (size, key)): code we may patch
        self.left = None               # why the agent left while attached; calls then go through ptrace
        self._status_fd = -1           # the agent thread's /proc status, for its seccomp state
        self._delegated = 0            # acquire()s passed on to the ptrace engine once the agent left
        self._scratch_lock = threading.Lock()
        self._scratch_top, self._scratch_given = 0, {}     # borrowed_scratch's pieces of the data area
        self.spin = SPIN_OTHER_CPU if os.cpu_count() > 1 else SPIN_SAME_CPU
        try:
            self._inject(high_fd, idle_ms)
        except BaseException:
            self._undo()
            raise
        self.fast_syscall = self._channel

    # -- injection -------------------------------------------------------------------

    def _inject(self, high_fd, idle_ms):
        t = self._main
        b = t.acquire()
        try:
            if b.group_stopped:
                raise InjectionFailed(self.pid, "it is stopped (job control): an agent thread would stop with it")
            mode, _count = thread_mode(self.pid, b.tid)
            if mode:
                raise InjectionFailed(self.pid, "it runs under seccomp (mode %d): the agent's calls could not be "
                                      "checked against its filters; use the ptrace engine" % mode)
            # Each thing is recorded with the janitor from the moment it exists, for a SIGKILL of ours.
            janitor.start()
            # The memfd's name goes in our trampoline's scratch memory (nothing to map, nothing to record).
            name = t.borrowed_scratch(64)
            scratch = scratch_key = None
            if name is None:
                scratch = name = self._ok(t.syscall(NR["mmap"], (0, 4096, PROT_READ | PROT_WRITE,
                                                                 MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)), "mmap")
                scratch_key = self._records.add("map", scratch, 4096)
            try:
                _core.vm_write(self.pid, name, b"pvmexec-agent\0")
                expected, key = self._records.expect_fd(0, "agentfd")
                fd_t = t.syscall(NR["memfd_create"], (name, MFD_CLOEXEC | MFD_ALLOW_SEALING))
                fd_key = self._records.made_fd(fd_t, expected, key)
                self._ok(fd_t, "memfd_create")
            finally:
                if scratch is not None:
                    t.syscall(NR["munmap"], (scratch, 4096))
                    janitor.unrecord(scratch_key)
            try:
                self._ok(t.syscall(NR["ftruncate"], (fd_t, REGION)), "ftruncate")
                # Its size is fixed from now on: another thread of the target that finds the memfd (its fd,
                # /proc/self/map_files) cannot shrink it under our mapping (the caller would die of SIGBUS).
                self._ok(t.syscall(NR["fcntl"], (fd_t, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)),
                         "fcntl(F_ADD_SEALS)")
                code = self._ok(t.syscall(NR["mmap"], (0, REGION, PROT_READ | PROT_EXEC, MAP_SHARED, fd_t, 0)),
                                "mmap")
                # The janitor reads the agent's tid from the region's header (CLONE_CHILD_SETTID).
                self._janitor_key = self._records.add("agent", 0, code, REGION)
                self.code_base = code
                self._ok(t.syscall(NR["mmap"], (code + HEADER, REGION - HEADER, PROT_READ | PROT_WRITE,
                                                MAP_SHARED | MAP_FIXED, fd_t, HEADER)), "mmap")
                self.data_base = code + HEADER
                # A child the target forks must not inherit our region (nor keep it after we leave).
                self._ok(t.syscall(NR["madvise"], (code, REGION, MADV_DONTFORK)), "madvise")
                fd_c = _core.pidfd_getfd(self.pidfd, fd_t)
                try:
                    why = region_tampered(fd_c, REGION)
                    if why:
                        raise InjectionFailed(self.pid, "the agent: " + why)
                    self._map = mmap.mmap(fd_c, REGION, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
                finally:
                    os.close(fd_c)
            finally:
                t.syscall(NR["close"], (fd_t,))
                janitor.unrecord(fd_key)
            self._keep = ctypes.c_char.from_buffer(self._map)
            self._base = ctypes.addressof(self._keep)
            self._slot = self._base + SLOT
            self._alive = self._base + HEADER + L["header.agent_tid"]
            self._channel = _core.Channel(self._slot, self._counter, self._alive, self.pidfd, self.spin, self.pid,
                                          self._post_failed, self._keep)
            caller_pidfd = self._caller_pidfd(t, high_fd)
            blob = _core.AGENT_BLOB
            if len(blob) > L["AGENT_CODE_MAX"]:
                raise EngineError("agent code (%d bytes) exceeds its %d-byte area" % (len(blob), L["AGENT_CODE_MAX"]))
            self._map[0:len(blob)] = blob
            final = SYMS["final"]
            self._put32(HEADER, L["AGENT_MAGIC"])
            self._put32(HEADER + L["header.version"], 1)
            self._put32(HEADER + L["header.caller_pidfd"], caller_pidfd & 0xFFFFFFFF)
            self._put32(HEADER + L["header.idle_ms"], idle_ms)
            struct.pack_into("<QQQ", self._map, HEADER + L["header.code_base"], code, code + HEADER, final)
            self.set_spin(self.spin)
            regs = bytearray(b.saved_regs)
            q = memoryview(regs).cast("Q")
            idx = t.reg_index
            q[idx[arch.PC]] = code + SYMS["bootstrap"]
            q[idx["rdi"]] = code + HEADER
            q[idx["rsi"]] = code + L["STACK_OFF"] + L["STACK_SIZE"] - 64
            q[idx["rdx"]] = CLONE_FLAGS
            q[idx["rcx"]] = code + HEADER + L["header.agent_tid"]
            q[idx[arch.SYSCALL_ORIG_NR]] = (1 << 64) - 1
            back = t.way_back(b)
            if back is not None:
                # After clone the thread jumps to our trampoline's way back: should we die while it
                # runs the bootstrap, it restores itself instead of running on in our code.
                q[idx["r13"]] = back
                tid = t.run_code_to_syscall(b, regs, NR["clone"])
            else:
                q[idx["r13"]] = 0
                tid = t.run_code(b, regs)
            if tid <= 0:
                raise InjectionFailed(self.pid, "clone of the agent thread failed: %s" % os.strerror(-tid))
            self.agent_tid = tid
        finally:
            t.release()
        if not wait_word(self._map, self._base, HEADER + L["header.state"], 1, 5):
            raise EngineError("the agent thread %d did not start" % self.agent_tid)
        self._thread_engine = PtraceEngine(self.pid, self.agent_tid, True, check_seccomp=False)
        self._status_fd = os.open("/proc/%d/task/%d/status" % (self.pid, self.agent_tid), os.O_RDONLY | os.O_CLOEXEC)
        self._channel.check_at = time.monotonic_ns() + POLICY_CHECK_NS

    def _caller_pidfd(self, t, high_fd):
        """A pidfd for the caller inside the target (at a high number), so the agent sees us die."""
        mine = os.pidfd_open(os.getpid())
        try:
            st = os.fstat(mine)         # (one inode per process: the target's pidfd of us has it too)
        finally:
            os.close(mine)
        expected, key = self._records.expect_fd(0, "fd", st.st_dev, st.st_ino)
        p = t.syscall(NR["pidfd_open"], (os.getpid(), 0))
        key = self._records.made_fd(p, expected, key)
        if p < 0:
            return -1
        try:
            expected, high_key = self._records.expect_fd(high_fd, "fd", st.st_dev, st.st_ino)
            high = t.syscall(NR["fcntl"], (p, F_DUPFD_CLOEXEC, high_fd))
            self._pidfd_key = self._records.made_fd(high, expected, high_key)  # the agent closes it as it leaves
            return high
        finally:
            t.syscall(NR["close"], (p,))
            janitor.unrecord(key)

    def _ok(self, ret, what):
        if ret < 0:
            raise InjectionFailed(self.pid, "%s in the target failed: %s" % (what, os.strerror(-ret)))
        return ret

    def set_spin(self, iterations):
        """Spin budget of both sides before sleeping (neither spins while both are on one CPU)."""
        self.spin = iterations
        if self._channel is not None:
            self._channel.spin = iterations
        self._put32(SLOT + L["slot.spin"], iterations)
        self._put32(SLOT + L["slot.agent_cpu"], 0xFFFFFFFF)     # unknown until the agent answers

    def _put32(self, off, v):
        struct.pack_into("<I", self._map, off, v)

    def _get32(self, off):
        return struct.unpack_from("<I", self._map, off)[0]

    # -- operations --------------------------------------------------------------------

    def syscall(self, nr, args):
        if self._serving():
            try:
                return self._post(_core.agent_syscall, nr, *args)
            except AgentLeft:
                pass
        return self._main.syscall(nr, args)

    def syscalls(self, calls):
        if self._serving():
            try:
                return self._post(_core.agent_batch, calls)
            except AgentLeft:
                pass
        return self._main.syscalls(calls)

    def _post(self, fn, *args):
        ch = self._channel
        ch.acquire()                    # one request in the slot at a time, whatever thread posts it
        try:
            if ch.closed:
                raise AgentLeft("the agent has left process %d: %s" % (self.pid, self.left))
            return fn(self._slot, self._counter, self._alive, self.pidfd, self.spin, self.pid, *args)
        except AgentLeft:
            raise
        except BaseException as e:
            raise self._post_failed(e) from None
        finally:
            ch.release()

    def _serving(self):
        """Whether calls go to the agent: not once it has left. A look at the agent thread's seccomp
        state older than POLICY_CHECK_NS is taken again first; found filtered, the agent leaves."""
        ch = self._channel
        if self.left is not None or ch is None:
            return self.left is None
        now = time.monotonic_ns()
        if now < ch.check_at:
            return True
        try:
            mode, _count = target_filters.status_mode(os.pread(self._status_fd, 16384, 0))
        except OSError:
            return True                 # the agent thread is gone: the call says how
        if not mode:
            ch.check_at = now + POLICY_CHECK_NS
            return True
        self._leave("process %d put a seccomp filter (mode %d) on the agent thread, as on all its threads "
                    "(SECCOMP_FILTER_FLAG_TSYNC), after the agent was injected" % (self.pid, mode))
        return False

    def _leave(self, why):
        """The agent goes at once, making no call of its own but an exit its filter allows; what it
        made is removed through ptrace (each call checked against the target's filters), and mode 1
        and 2 go on through ptrace."""
        ch = self._channel
        ch.acquire()                    # no request of another caller thread in flight meanwhile
        try:
            if self.left is not None:
                return
            self.left = why
            self.fast_syscall = self.fast_exec = None
            ch.check_at = 0
            warnings.warn("pvmexec: %s: the agent leaves, and calls go through ptrace, checked against the "
                          "filter" % why, RuntimeWarning, stacklevel=5)
            with self._helper_lock:
                self.helper_refused = why
                if self._helper is not None:
                    self.helper_ended(self._helper)
            self._undo()
            self._thread_engine = None
        finally:
            ch.release()

    def acquire(self):
        if self.left is None:
            return None
        b = self._main.acquire()
        self._delegated += 1
        return b

    def release(self):
        if self._delegated:
            self._delegated -= 1
            self._main.release()

    def borrowed_scratch(self, size):
        """The main ptrace engine's while it holds the thread, else a piece of our region's data area
        (mapped and recorded already: nothing to map or record), or None if none is left."""
        if self._delegated:
            return self._main.borrowed_scratch(size)
        size = (size + 63) & ~63
        with self._scratch_lock:
            if self.code_base is None or self._scratch_top + size > L["DATA_SIZE"]:
                return None
            addr = self.code_base + L["DATA_OFF"] + self._scratch_top
            self._scratch_top += size
            self._scratch_given[addr] = size
            return addr

    def release_scratch(self, addr, size):
        with self._scratch_lock:
            if self._scratch_given.pop(addr, None) is not None:
                base = (self.code_base or 0) + L["DATA_OFF"]
                self._scratch_top = max((a + n - base for a, n in self._scratch_given.items()), default=0)

    def _post_failed(self, e):
        """The exception to raise for a request that failed (the channel's lock held): the agent's or the
        target's end named; an interrupted one (Ctrl-C) cancelled first."""
        if isinstance(e, OSError):
            err = channel_error(e, self.pid, "the agent thread in process %d is gone (the process ran execve, "
                                "or killed it)" % self.pid)
            if err is None:
                return e
            if e.errno == errno.ECHILD:
                self.agent_tid = None
            return err
        self._cancel_in_flight()
        return e

    def _cancel_in_flight(self):
        """The caller was interrupted while the agent runs a call: make that call return EINTR."""
        t = self._thread_engine
        try:
            t._seize_and_stop(self.agent_tid)
        except OSError:
            return
        try:
            regs = bytearray(_core.getregs(self.agent_tid))
            q = memoryview(regs).cast("Q")
            idx = t.reg_index
            if q[idx[arch.SYSCALL_ORIG_NR]] != (1 << 64) - 1 and (1 << 64) - q[idx[arch.SYSCALL_RET]] in arch.RESTART_CODES:
                q[idx[arch.SYSCALL_RET]] = (1 << 64) - errno.EINTR       # and no restart
                q[idx[arch.SYSCALL_ORIG_NR]] = (1 << 64) - 1
                _core.setregs(self.agent_tid, regs)
        finally:
            t._try_detach(self.agent_tid)
        deadline = time.monotonic() + 5
        resp = SLOT + L["slot.resp_seq"]
        while self._get32(resp) != self._seq.value and time.monotonic() < deadline:
            time.sleep(0.001)

    def helper_op(self, stack, entry, region, size, window):
        """PVM_OP_SPAWN: the agent clones the helper (stack != 0; returns its pid or -errno), or ends it."""
        if not self._serving():
            if stack:
                raise HelperFailed(self.left)
            raise AgentLeft("the agent has left process %d: %s" % (self.pid, self.left))
        struct.pack_into("<q6Q", self._map, CALLS, 0, stack, entry, region, size, window, 0)
        struct.pack_into("<II", self._map, SLOT + L["slot.op"], L["OP_SPAWN"], 1)
        self._post(_core.agent_call)
        return struct.unpack_from("<q", self._map, CALLS + L["call.ret"])[0]

    def mode1(self):
        """The engine mode 1 runs on: the helper, started now if need be, or the agent thread by ptrace."""
        with self._helper_lock:                 # (one helper per agent: caller threads start it once)
            if self.left is not None:
                return self._main
            h = self._helper
            if h is not None and h.helper_pid and h.proc.poll() is None:
                return h
            if h is not None:                   # killed (by an interrupted run, or by anyone): a new one
                self.helper_ended(h)
            if self.helper_refused is None:
                try:
                    self._helper = HelperEngine(self)
                    self.fast_exec = self._helper.fast_exec
                    return self._helper
                except HelperFailed as e:
                    self.helper_refused = e.reason
                    warnings.warn("pvmexec: mode 1 in process %d runs on the agent thread through ptrace (the "
                                  "helper could not be started: %s)" % (self.pid, e.reason), RuntimeWarning,
                                  stacklevel=4)
            return self._thread_engine

    def helper_ended(self, h):
        """Forget helper h (it ended, or was killed under a run): the next exec() starts another."""
        if self._helper is h:
            self._helper = None
            self.fast_exec = None
        h.close()

    def helper_gone(self, h):
        """Helper h ended under a run (HelperGone): forget it; whether it left unused, as we asked it to
        (then nothing ran, and the run can go to the next helper)."""
        idle = h.left_idle()
        self.helper_ended(h)
        return idle

    def exec(self, ctx, sigmask, thread=0):
        h = self._helper                # one helper, already running
        if h is None or thread or not h.helper_pid or not self._serving():
            if thread != 0:
                raise ValueError("a live target has one guest thread, 0 (not %r)" % (thread,))
            h = self.mode1()
            if h is self._thread_engine or h is self._main:
                with _sigguard.operation():     # (Space.exec expected the helper: the target's thread runs it)
                    return h.exec(ctx, sigmask, thread)
        try:
            return h.exec(ctx, sigmask, thread)
        except HelperGone:
            if not self.helper_gone(h):
                raise                   # killed under the run: the next exec() starts another
        return self.mode1().exec(ctx, sigmask, thread)      # it left unused as we asked: nothing ran

    @property
    def exec_in_own_process(self):
        return self.helper_refused is None          # the helper's, made (or found missing) at the next exec

    def gone(self, wait=0.0):
        """Whether the target has ended (its pidfd says so), waiting up to `wait` seconds for it."""
        return proc.ended(self.pidfd, wait)

    def region(self):
        """(start, end) of the agent's own region in the target, or None: not the target's memory."""
        return (self.code_base, self.code_base + L["REGION_SIZE"]) if self.code_base else None

    def own_mappings(self):
        ours = [self.region()] if self.code_base else []
        if self._helper is not None and self._helper.base is not None:
            ours.append((self._helper.base, self._helper.base + HELPER_SIZE))
        for engine in (self._main, self._thread_engine):
            if engine is not None:
                ours += engine.own_mappings()
        return ours

    def own_fds(self):
        """The descriptors the agent holds in the target's table (not the target's)."""
        if self._map is None:
            return set()
        return {struct.unpack_from("<i", self._map, HEADER + L["header.caller_pidfd"])[0]}

    def initial_fpstate(self):
        return self.mode1().initial_fpstate()

    @property
    def tid(self):
        return self.agent_tid if self.left is None else self._main.tid

    def reaps(self, tid):
        return True

    # -- removal -----------------------------------------------------------------------------

    def close(self):
        try:
            if self._helper is not None:
                self.helper_ended(self._helper)
        finally:
            try:
                self._undo()
            finally:
                self._main.close()

    def _undo(self):
        """Stop the agent thread, unmap the region in the target and here."""
        try:
            left_itself = False
            if self.agent_tid and self._map is not None:
                if self.left is None and self._ptrace_refused():
                    self._unmap_trampoline_here()       # ptrace could not, after the agent has gone
                pidfd = self.own_fds().pop()
                try:
                    if self.left is not None:
                        raise AgentLeft(self.left)      # its own calls would meet the target's filter
                    self._stop_agent()
                    left_itself = True      # all of its region but the page it ran its last code on
                except (OSError, EngineError):
                    # Stopped with the target, stuck, or filtered: make it exit without its region, by ptrace.
                    refused = self._force_exit()
                    if not self.agent_tid and pidfd >= 0:
                        self._close_in_target(pidfd)    # (the agent closes it only as it leaves by itself)
                    if refused:
                        self.code_base = self._janitor_key = None      # its code stays with it
                    elif self.agent_tid:
                        # It will only exit when the target continues; until then it must keep its
                        # memory (the kernel clears its tid word there on exit). Leave the region.
                        # The janitor removes the region once the thread has left, after we exit.
                        warnings.warn("pvmexec: process %d is stopped; the agent thread %d leaves when it "
                                      "continues, and its %d-byte region stays mapped until this process "
                                      "exits (the janitor removes it then)"
                                      % (self.pid, self.agent_tid, REGION), RuntimeWarning)
                        self.code_base = self._janitor_key = None
            if self.code_base is not None:
                addr, size = (self.code_base + SYMS["final"], 4096) if left_itself else (self.code_base, REGION)
                ours = self._region_still_ours(addr)
                if ours is None:
                    warnings.warn("pvmexec: %d bytes of the agent at %#x stay in process %d (it is no longer "
                                  "dumpable: neither its maps nor its memory are ours to touch); they go when it "
                                  "execs or exits" % (size, addr, self.pid), RuntimeWarning)
                    self._janitor_key = None            # the janitor's record stays: it may yet succeed
                elif ours:
                    try:
                        self._main.syscalls([(NR["munmap"], (addr, size))])
                    except TargetGone:
                        pass
                    except OSError as e:        # no longer ours to trace (undumpable, traced by another)
                        warnings.warn("pvmexec: %d bytes of the agent at %#x stay in process %d (%s); they go "
                                      "when it execs or exits" % (size, addr, self.pid, e), RuntimeWarning)
                        self._janitor_key = None        # the janitor's record stays: it may yet succeed
            self.code_base = None
            janitor.unrecord(self._janitor_key)
            self._janitor_key = None
            if not self.agent_tid:
                janitor.unrecord(self._pidfd_key)
                self._pidfd_key = None
        finally:
            if self._channel is not None:
                self._channel.close()
            if self._status_fd >= 0:
                os.close(self._status_fd)
                self._status_fd = -1
            self.fast_syscall = None
            self._keep = None
            if self._map is not None:
                self._map.close()
                self._map = None

    def _ptrace_refused(self):
        """Whether ptrace no longer reaches the target: traced by another (PTRACE_TRACEME, a debugger),
        or turned undumpable (for an unprivileged caller)."""
        try:
            tracer = int(proc.status(self.pid).get("TracerPid", "0").split()[0])
        except (OSError, ValueError, IndexError, TargetGone):
            return False
        return bool(tracer) or os.geteuid() != 0 and not os.access("/proc/%d/mem" % self.pid, os.R_OK)

    def _unmap_trampoline_here(self):
        """The ptrace engine's trampoline unmapped by the agent (a call of its own, no ptrace)."""
        span = self._main.trampoline_range()
        if span is None:
            return
        try:
            if self.syscall(NR["munmap"], span) == 0:
                self._main.trampoline_unmapped()
        except (OSError, EngineError):
            pass                                # then it stays, and drop_trampoline says so

    def _close_in_target(self, fd):
        try:
            self._main.syscalls([(NR["close"], (fd,))])
            janitor.unrecord(self._pidfd_key)
            self._pidfd_key = None
        except OSError as e:                    # (the janitor's record stays: it may yet succeed)
            warnings.warn("pvmexec: the agent's descriptor %d stays in process %d (%s)" % (fd, self.pid, e),
                          RuntimeWarning)

    def _exit_refused(self, insn):
        """Why the target's filters would not let the agent thread's exit(0) through (None: they would,
        or they cannot be read: a thread's exit is what every thread that ends calls)."""
        if self.left is None:
            return None
        try:
            b = self._main.acquire()
        except OSError:
            return None
        try:
            if isinstance(b.seccomp, target_filters.FilterUnreadable):
                return None
            try:
                r = self._main._seccomp_gate(b, NR["exit"], (0,), insn)
            except SeccompBlocked as e:
                return str(e)
            return None if r is None else "its filter would fail exit with %d" % r
        finally:
            self._main.release()

    def _force_exit(self):
        """Point the agent thread at exit(0) through the vDSO's syscall instruction, with ptrace."""
        tid = self.agent_tid
        insn = find_syscall_insn(self.pid)
        why = self._exit_refused(insn)
        if why:
            warnings.warn("pvmexec: the agent thread %d and its %d-byte region stay in process %d: %s"
                          % (tid, REGION, self.pid, why), RuntimeWarning)
            return why
        t = self._thread_engine or PtraceEngine(self.pid, tid, True, check_seccomp=False)
        try:
            t._seize_and_stop(tid)
        except OSError:
            self.agent_tid = None          # already gone
            return
        try:
            regs = bytearray(_core.getregs(tid))
            q = memoryview(regs).cast("Q")
            idx = t.reg_index
            q[idx[arch.PC]] = insn
            q[idx[arch.SYSCALL_NR]] = NR["exit"]          # this thread only
            q[idx["rdi"]] = 0
            q[idx[arch.SYSCALL_ORIG_NR]] = (1 << 64) - 1            # no syscall restart on the way out
            _core.setregs(tid, regs)
        finally:
            t._try_detach(tid)
        deadline = time.monotonic() + 1
        while os.path.exists("/proc/%d/task/%d" % (self.pid, tid)):
            if time.monotonic() > deadline:
                return                                    # stopped: it exits when continued
            time.sleep(0.005)
        self.agent_tid = None

    def _region_still_ours(self, addr):
        """Whether our memfd is still mapped at addr: after an execve the old region is gone and its
        addresses may hold the new program's memory."""
        try:
            with open("/proc/%d/maps" % self.pid) as f:
                for line in f:
                    lo = int(line.split("-", 1)[0], 16)
                    if lo == addr:
                        return "/memfd:pvmexec-agent" in line
        except (FileNotFoundError, ProcessLookupError):
            pass
        except PermissionError:
            return None                         # not ours to look at any more (it turned undumpable)
        return False

    def _stop_agent(self):
        tid_off = HEADER + L["header.agent_tid"]
        # count 1: leave by unmapping the region but the last page itself (no ptrace needed for that)
        struct.pack_into("<II", self._map, SLOT + L["slot.op"], L["OP_EXIT"], 1)
        try:
            _core.agent_call(self._slot, self._counter, self._alive, self.pidfd, self.spin, self.pid)
        except OSError as e:
            if e.errno not in (errno.ESRCH, errno.ECHILD):      # target gone; agent already gone
                raise
        deadline = time.monotonic() + 5
        while os.path.exists("/proc/%d/task/%d" % (self.pid, self.agent_tid)):
            if time.monotonic() > deadline:
                raise EngineError("agent thread %d did not exit" % self.agent_tid)
            cur = self._get32(tid_off)
            if cur:
                _core.futex_wait(self._base + tid_off, cur, 20)
            else:
                time.sleep(0.001)
        self.agent_tid = None
