"""attach() and Space: the public face of an engine attached to one process."""
from __future__ import annotations

import subprocess
from typing import TYPE_CHECKING, Any, Iterable, Iterator, Literal, Sequence

if TYPE_CHECKING:
    from .engines import Engine
import atexit
import contextlib
import errno
import os
import signal
import socket
import struct
import threading
import warnings
import weakref

from . import _core, _sigguard, janitor, proc
from .abi import (AF_UNIX, ALL_SIGNALS, F_DUPFD_CLOEXEC, MAP_ANONYMOUS, MAP_PRIVATE, MSG_CMSG_CLOEXEC,
                  PROT_READ, PROT_WRITE, SCM_RIGHTS, SOCK_CLOEXEC, SOCK_DGRAM, SOL_SOCKET)
from .arch import current as _current_arch
from .context import SigContext, Stop
from .errors import EngineError, RemoteSyscallError, TargetGone
from .engines.ptrace import PtraceEngine
from .syscalls import name_of, number

NR = {n: number(n) for n in ("mmap", "munmap", "close", "fcntl", "socketpair", "recvmsg")}

# Spaces not yet detached: detached at interpreter exit and when SIGTERM/SIGHUP end the caller, so that
# an exit that skips a with block (sys.exit, an uncaught exception, a signal) leaves nothing behind.
_open_spaces: weakref.WeakSet[Space] = weakref.WeakSet()


def _detach_all():
    for space in list(_open_spaces):
        with contextlib.suppress(Exception):
            space.detach()


atexit.register(_detach_all)
_sigguard.set_cleanup(_detach_all)


def _forked():
    """In a forked child, every open Space is a copy of the parent's: its agent, helper, tracer and
    mappings are the parent's, never to be used or detached from here (a detach would end the parent's)."""
    for space in list(_open_spaces):
        space._detached = space._forked = True
    _open_spaces.clear()


os.register_at_fork(after_in_child=_forked)


def _is_register_value(a):
    """An int that fits a 64-bit register (signed or unsigned)."""
    return type(a) is int and -(1 << 63) <= a < (1 << 64)


def attach(target: int | None = None, *, pidfd: int | None = None, engine: str = "auto", freeze: bool = False,
           thread: int | None = None, check_seccomp: bool = True) -> Space:
    """Attach to a process by pid (or pidfd=) and return a Space.

    engine: "agent" (inject a thread of ours and talk to it through shared
        memory: the target runs free, syscalls are much faster; they run in that
        new thread of the target), "ptrace" (borrow a target thread for each
        operation: nothing is added to the target, thread-specific calls act on
        that thread) or "auto" (agent, falling back to ptrace with a warning
        when it cannot be injected; Space.engine says which).
    freeze: stop every thread of the target for as long as the Space lives.
    thread: the thread to borrow (default: the main thread).
    check_seccomp: evaluate the target's seccomp filters before each injected
        syscall and refuse (SeccompBlocked) what they would kill or trap.
    """
    _current_arch()
    if engine not in ("auto", "ptrace", "agent"):
        raise ValueError("unknown engine %r (choose auto, ptrace or agent)" % (engine,))
    if (target is None) == (pidfd is None):
        raise TypeError("attach() takes a pid or pidfd=, exactly one")
    if pidfd is not None:
        pid = proc.pid_of_pidfd(pidfd)
        own_pidfd = os.dup(pidfd)
    else:
        if isinstance(target, bool) or not isinstance(target, int):
            raise TypeError("pid must be an int, not %s" % type(target).__name__)
        if target <= 0:
            raise ValueError("invalid pid %d" % target)
        pid = target
        try:
            own_pidfd = os.pidfd_open(pid)
        except ProcessLookupError:
            raise TargetGone(pid) from None
    try:
        return Space._attach(pid, own_pidfd, freeze=freeze, thread=thread, check_seccomp=check_seccomp,
                             engine=engine)
    except BaseException:
        os.close(own_pidfd)
        raise


class Space:
    """A target address space with an engine attached. Use as a context manager.

    Made by attach() (a live process) or Space.create() (a stub space of ours).
    """

    def __init__(self, engine: Engine, pidfd: int, *, fallback_reason: str | None = None,
                 owned_process: subprocess.Popen[bytes] | None = None) -> None:
        """Wrap an engine (pvmexec.engines) already attached; the Space owns pidfd from now on.

        owned_process: a subprocess.Popen of ours that detach() also ends.
        """
        self._engine = engine
        self.engine = engine.name
        self.pid = engine.pid
        self.pidfd = pidfd
        self.fallback_reason = fallback_reason
        self._owned = owned_process
        self._detached = False
        self._forked = False           # a forked child's copy: the parent's attachment, not ours
        self._lend_sock = None         # caller's end of the descriptor-passing socket
        self._lend_remote = None       # target's end (a high fd in the target)
        self._fds = {}                 # descriptors of ours open in the target (lend(), track_fd()) -> janitor key
        self._mappings = {}            # address -> (size, janitor key) of mappings detach() removes
        if hasattr(engine, "caller_mappings"):
            engine.caller_mappings = self._mappings     # (the agent's helper patches syscall sites only there)
        self._records = janitor.Records(self.pid)   # what we place in a live target, for a SIGKILL of ours
        _sigguard.install()
        _open_spaces.add(self)

    @classmethod
    def _attach(cls, pid, pidfd, *, freeze, thread, check_seccomp, engine):
        st, tgid = proc.check_target(pid)
        tid = thread if thread is not None else proc.pick_thread(tgid)
        if not os.path.exists("/proc/%d/task/%d" % (tgid, tid)):
            raise ValueError("thread %d is not a thread of process %d" % (tid, tgid))
        reap_leader = int(st["PPid"]) != os.getpid()
        tracer = PtraceEngine(tgid, tid, reap_leader, check_seccomp)
        chosen, fallback_reason = tracer, None
        _sigguard.install()        # from the first contact: SIGTERM now must still restore the target
        try:
            _probe(tracer, tgid, freeze)
            if engine in ("agent", "auto"):
                from .engines.agent import AgentEngine, InjectionFailed
                try:
                    with _sigguard.deferred():      # a half-made agent is worse than a late Ctrl-C
                        chosen = AgentEngine(tgid, pidfd, tracer, _high_fd(tgid))
                except InjectionFailed as e:
                    if engine == "agent":
                        raise
                    fallback_reason = e.reason
                    warnings.warn("pvmexec: agent engine unavailable for process %d (%s); using the ptrace engine"
                                  % (tgid, e.reason), RuntimeWarning, stacklevel=4)
            return cls(chosen, pidfd, fallback_reason=fallback_reason)
        except BaseException:
            chosen.close()
            raise
        finally:
            _sigguard.uninstall()

    @classmethod
    def adopt(cls, process: subprocess.Popen[bytes], *, check_seccomp: bool = True) -> Space:
        """Attach (ptrace engine) to a child process of ours, a subprocess.Popen the Space then owns:
        detach() ends it."""
        pidfd = os.pidfd_open(process.pid)
        try:
            space = cls._attach(process.pid, pidfd, freeze=False, thread=None, engine="ptrace",
                                check_seccomp=check_seccomp)
        except BaseException:
            os.close(pidfd)
            raise
        space._owned = process
        return space

    @classmethod
    def create(cls, patch_syscalls: bool = True, fixed_layout: bool = False) -> Space:
        """A fresh, almost empty address space (a stub process of ours) for guest code.

        Mode 1 runs at full speed there: guest syscalls are trapped by the stub's
        seccomp filter and faults by its signal handler, without ptrace. Mode 2 is
        limited to the stub's own memory management (mmap, mprotect, munmap,
        madvise, mremap) and runs on a service thread; new_thread() adds guest
        threads for exec(thread=). The space dies with its caller, precisely with
        the caller thread that created it (PR_SET_PDEATHSIG). It runs in a user and
        a pid namespace of its own where the kernel allows (getpid() there is 1):
        guest code learns no host pid.

        patch_syscalls: a guest syscall site of the form `mov $nr, %eax; syscall`
        that trapped once is rewritten to enter the stub without a signal (as
        gVisor's systrap does); its stops are the same. The guest sees the
        rewritten bytes if it reads its code, and the space holds a 64 KiB window
        at 0x050f0000 (without patching, that range is left free). Space.patching
        says whether it is on, and why not.

        fixed_layout: start the stub without address-space randomisation, so that
        every such space has its own pages and the vDSO at the same addresses
        (what copying a guest into another space, for fork, needs).
        """
        from .engines.stub import StubEngine
        engine = StubEngine(patch=patch_syscalls, fixed_layout=fixed_layout)
        try:
            pidfd = os.dup(engine.pidfd)
        except BaseException:
            engine.close()
            raise
        return cls(engine, pidfd)

    @property
    def backend(self) -> Any:
        """The engine object (pvmexec.engines) behind this space, for tools that need engine-specific calls."""
        return self._engine

    @property
    def patching(self) -> str:
        """Stub spaces: "on" when trapped syscall sites are rewritten, else "off (why)"."""
        return self._engine.patching

    def new_thread(self) -> int:
        """Stub spaces: start another stub thread for another guest thread; returns its number for exec(thread=)."""
        self._live()
        if self.engine != "stub":
            raise ValueError("new_thread() is for stub spaces (Space.create())")
        return self._engine.new_thread()

    def kill(self) -> None:
        """End the space's process, if it is ours (a stub space or an adopted child); detach() still follows."""
        if self._owned is not None:
            self._owned.kill()
        elif self.engine == "stub":
            self._engine.kill()
        else:
            raise ValueError("kill() ends spaces of ours only; this one is attached to process %d" % self.pid)

    # -- lifetime ---------------------------------------------------------------

    def detach(self) -> None:
        """Let the target go. Idempotent; the target is left exactly as found. Ctrl-C or SIGTERM
        meanwhile takes effect once it is done."""
        if self._detached:
            return
        with _sigguard.deferred():
            self._detach()

    def _detach(self):
        self._detached = True
        _open_spaces.discard(self)
        try:
            calls = [(NR["munmap"], (addr, size)) for addr, (size, _key) in self._mappings.items()]
            calls += [(NR["close"], (fd,)) for fd in sorted(self._fds)]      # the lending socket's end too
            if calls:
                with contextlib.suppress(OSError):
                    self._engine.syscalls(calls)
        finally:
            for _size, key in self._mappings.values():
                janitor.unrecord(key)
            for key in self._fds.values():
                janitor.unrecord(key)
            self._mappings.clear()
            self._fds.clear()
            self._lend_remote = None
            if self._lend_sock is not None:
                self._lend_sock.close()
                self._lend_sock = None
            try:
                self._engine.close()
            finally:
                os.close(self.pidfd)
                _sigguard.uninstall()
                if self._owned is not None:
                    self._owned.kill()
                    self._owned.wait(10)

    close = detach

    @property
    def detached(self) -> bool:
        return self._detached

    def track_mapping(self, addr: int, size: int) -> None:
        """Record a mapping the caller made in the target, for detach() to remove if the caller has not
        (an exit that skips a with block, SIGTERM). untrack_mapping() once the caller unmapped it."""
        _check_range(addr, size)
        self.untrack_mapping(addr)
        self._mappings[addr] = (size, self._records.add("map", addr, size) if self._records_kept() else None)

    def own_mappings(self) -> list[tuple[int, int]]:
        """(start, end) of every mapping of ours in the target now (the engine's, tracked ones): what a
        dump or a comparison must leave out."""
        return self._engine.own_mappings() + [(a, a + size) for a, (size, _key) in self._mappings.items()]

    def untrack_mapping(self, addr: int) -> None:
        """Forget the tracked mapping at addr (the caller unmapped it): detach() leaves that range alone."""
        _size, key = self._mappings.pop(addr, (0, None))
        janitor.unrecord(key)

    def track_fd(self, fd: int) -> None:
        """Record a descriptor the caller opened in the target, for detach() to close if the caller has
        not; untrack_fd() once the caller closed it."""
        key = self._records.add_fd(fd) if self._records_kept() else None
        self.untrack_fd(fd)
        self._fds[fd] = key

    def untrack_fd(self, fd: int) -> None:
        """Forget the tracked descriptor fd (the caller closed it): detach() will not close that number."""
        janitor.unrecord(self._fds.pop(fd, None))

    def _records_kept(self):
        """Whether the janitor is told what we place: in live targets, not in spaces of ours (they die with us)."""
        return self._owned is None and self.engine != "stub"

    def __enter__(self) -> Space:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.detach()
        return False

    def __del__(self):
        if not getattr(self, "_detached", True):
            with contextlib.suppress(Exception):
                self.detach()

    def __repr__(self) -> str:
        return "<Space pid=%d engine=%s%s>" % (self.pid, self.engine, " detached" if self._detached else "")

    def _live(self):
        if self._detached:
            if self._forked:
                raise ValueError("operation on a Space of the parent process (this process forked from it)")
            raise ValueError("operation on a detached Space")

    # -- system calls (mode 2) ---------------------------------------------------

    def syscall_raw(self, nr_or_name: int | str, *args: int | bytes | bytearray | str) -> int:
        """Run one syscall in the target (its fd table, its memory); return the raw result."""
        call = self._engine.fast_syscall
        if call is not None and not self._detached:
            ret = call(nr_or_name, *args)
            if ret is not None:
                return ret
        self._live()
        nr = number(nr_or_name)
        if len(args) > 6:
            raise TypeError("a system call takes at most 6 arguments, got %d" % len(args))
        if all(map(_is_register_value, args)):
            with _sigguard.operation():
                return self._engine.syscall(nr, args)
        # One borrow for the scratch memory and the call: the target cannot map over it meanwhile.
        with self.borrowed(), contextlib.ExitStack() as stack:
            args = [self._place(stack, a) for a in args]
            with _sigguard.operation():
                return self._engine.syscall(nr, args)

    def syscall(self, nr_or_name: int | str, *args: int | bytes | bytearray | str) -> int:
        """Like syscall_raw, but a -errno result raises RemoteSyscallError."""
        call = self._engine.fast_syscall          # (syscall_raw's first lines: a call less on the hot path)
        if call is None or self._detached or (ret := call(nr_or_name, *args)) is None:
            ret = self.syscall_raw(nr_or_name, *args)
        if -4096 < ret < 0:
            raise RemoteSyscallError(-ret, name_of(number(nr_or_name)), args)
        return ret

    def syscalls(self, calls: Iterable[tuple[int | str, Sequence[int]]]) -> list[int]:
        """Run several (nr_or_name, args) calls in one borrow; returns the raw results."""
        self._live()
        batch = []
        for nr_or_name, args in calls:
            for a in args:
                if not _is_register_value(a):
                    raise TypeError("batched system calls take integer arguments (64-bit), not %r" % (a,))
            if len(args) > 6:
                raise TypeError("a system call takes at most 6 arguments, got %d" % len(args))
            batch.append((number(nr_or_name), args))
        with _sigguard.operation():
            return self._engine.syscalls(batch)

    def _place(self, stack, arg):
        if isinstance(arg, bool) or not isinstance(arg, (int, bytes, bytearray, str)):
            raise TypeError("syscall arguments are int, bytes or str, not %s" % type(arg).__name__)
        if isinstance(arg, int):
            if not _is_register_value(arg):
                raise OverflowError("argument %d does not fit in a register" % arg)
            return arg
        data = arg.encode() + b"\0" if isinstance(arg, str) else bytes(arg)
        addr = stack.enter_context(self.scratch(len(data)))
        self.write(addr, data)
        return addr

    @contextlib.contextmanager
    def scratch(self, size: int) -> Iterator[int]:
        """Memory in the target for the duration of the block: the engine's own where it has some (the
        ptrace engine's trampoline within a borrow, the agent's region), else an anonymous mapping,
        unmapped afterwards."""
        self._live()
        addr = self._engine.borrowed_scratch(size)
        if addr is not None:                # nothing to map, nothing to record
            try:
                yield addr
            finally:
                self._engine.release_scratch(addr, size)
            return
        length = max(4096, (size + 4095) & ~4095)
        addr = self.map_anonymous(length)
        try:
            yield addr
        finally:
            if addr in self._mappings:          # not yet removed by a detach() meanwhile
                with _sigguard.deferred():
                    self._engine.syscall(NR["munmap"], (addr, length))
                    self.untrack_mapping(addr)

    def map_anonymous(self, length: int) -> int:
        """mmap of length bytes of anonymous read+write memory in the target, tracked (untrack_mapping()
        once unmapped). Recorded with the janitor before the call, at an address chosen for it (free
        now, in the middle of the widest hole), so that no moment of the call leaves it unrecorded."""
        if isinstance(length, bool) or not isinstance(length, int):
            raise TypeError("a mapping's length is an int, not %s" % type(length).__name__)
        if not 0 < length <= _current_arch().TASK_SIZE_MAX:
            raise ValueError("a mapping's length must be positive and fit the address space, not %d" % length)
        self._live()
        length = (length + 4095) & ~4095
        with _sigguard.deferred():
            hint, key = 0, None
            if self._records_kept():
                try:
                    hint = proc.free_address(proc.mappings(self.pid), length)
                except OSError:
                    hint = 0
                key = self._records.add("map", hint, length) if hint else None
            try:
                addr = self._check(self._engine.syscall(
                    NR["mmap"], (hint, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)), "mmap")
            except BaseException:
                janitor.unrecord(key)
                raise
            if addr == hint and key is not None:
                self.untrack_mapping(addr)
                self._mappings[addr] = (length, key)
            else:
                janitor.unrecord(key)
                self.track_mapping(addr, length)
        return addr

    def track_new_fds(self, count: int, what: int, call) -> list[int]:
        """call() makes count descriptors in the target, of kind what (janitor.USERFAULTFD, PIPE, SOCKET),
        and returns their numbers: recorded with the janitor before it (as the lowest free numbers, closed
        only if of that kind), tracked by their files after it; a Ctrl-C meanwhile waits."""
        with _sigguard.deferred():
            keys = self._records.expect_new_fds(count, what) if self._records_kept() else []
            try:
                fds = call()
                # The numbers may come from the target's memory: only descriptors of that kind are taken.
                for fd in fds:
                    if not (isinstance(fd, int) and 0 <= fd < 1 << 20 and janitor.fd_is(self.pid, fd, what)):
                        raise EngineError("process %d reported descriptor %r, which is not a %s (its memory "
                                          "was written meanwhile)" % (self.pid, fd, janitor.NEW_FD_KINDS[what]
                                                                      .strip(":[")))
                for fd in fds:
                    self.track_fd(fd)
            finally:
                for key in keys:
                    janitor.unrecord(key)
        return fds

    def _check(self, ret, what):
        if -4096 < ret < 0:
            raise RemoteSyscallError(-ret, what, ())
        return ret

    @contextlib.contextmanager
    def borrowed(self) -> Iterator[Space]:
        """Hold the borrowed thread stopped across several operations (fewer round trips)."""
        self._live()
        self._engine.acquire()
        try:
            yield self
        finally:
            with _sigguard.operation():
                self._engine.release()

    # -- memory --------------------------------------------------------------------

    def read(self, addr: int, n: int) -> bytes:
        """Read n bytes of target memory (process_vm_readv; /proc/PID/mem where refused).

        Raises TargetGone if the process is gone, an OSError naming the address if the memory is not there.
        """
        self._live()
        _check_range(addr, n)
        try:
            return _core.vm_read(self.pid, addr, n)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetGone(self.pid) from None
            if e.errno not in (errno.EFAULT, errno.EPERM, errno.ENOSYS):
                raise
            return self._mem_io(addr, n, None, e)

    def write(self, addr: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes to target memory; read-only pages are written through /proc/PID/mem.

        Raises TargetGone if the process is gone, an OSError naming the address if the memory is not there.
        """
        self._live()
        data = bytes(data)
        _check_range(addr, len(data))
        try:
            _core.vm_write(self.pid, addr, data)
        except OSError as e:
            if e.errno == errno.ESRCH:
                raise TargetGone(self.pid) from None
            if e.errno not in (errno.EFAULT, errno.EPERM, errno.ENOSYS):
                raise
            self._mem_io(addr, len(data), data, e)

    def _mem_io(self, addr, n, data, first_error):
        try:
            fd = os.open("/proc/%d/mem" % self.pid, os.O_RDWR if data is not None else os.O_RDONLY)
        except (FileNotFoundError, ProcessLookupError):
            raise TargetGone(self.pid) from None
        try:
            out, done = [], 0
            while done < n:
                if data is None:
                    chunk = os.pread(fd, n - done, addr + done)
                else:
                    chunk = data[done:done + os.pwrite(fd, data[done:], addr + done)]
                if not chunk:
                    break
                out.append(chunk)
                done += len(chunk)
        except OSError:
            done = -1
        finally:
            os.close(fd)
        if done != n:
            raise OSError(errno.EFAULT, "cannot %s %d bytes at %#x in process %d (%s)" % (
                "read" if data is None else "write", n, addr, self.pid, first_error.strerror))
        return b"".join(out) if data is None else None

    # -- code (mode 1) ---------------------------------------------------------------

    def exec(self, ctx: SigContext, *, sigmask: Iterable[int] = ALL_SIGNALS, thread: int = 0) -> Stop:
        """Run code in the target from ctx until its first syscall (not executed) or signal.

        Returns a Stop. A signal that is not in sigmask ends the run too and is
        then delivered to the calling thread, as the proposal specifies.
        thread: in a stub space, which stub thread runs it (see new_thread()).
        """
        run = self._engine.fast_exec
        if run is not None and not thread and not self._detached:
            stop = run(ctx, sigmask)
            if stop is not None:
                return stop
        self._live()
        if type(ctx) is not SigContext and not isinstance(ctx, SigContext):
            raise TypeError("ctx must be a SigContext")
        mask = sigmask if type(sigmask) is frozenset else frozenset(sigmask)
        if self._engine.exec_in_own_process:
            # Our own process: nothing to restore if the caller is killed, so no guard needed.
            stop, deliver = self._engine.exec(ctx, mask, thread)
        else:
            with _sigguard.operation():
                stop, deliver = self._engine.exec(ctx, mask, thread)
        if deliver:
            signal.pthread_kill(threading.get_ident(), deliver)
        return stop

    def initial_fpstate(self) -> bytes:
        """A clean FPU state in this CPU's xstate layout: set ctx.fpstate to it to carry FPU state across exec()."""
        self._live()
        return self._engine.initial_fpstate()

    # -- descriptors ---------------------------------------------------------------------

    def _setup_lending(self):
        if self._lend_remote is not None:
            return
        eng = self._engine
        # Every descriptor is tracked from the moment it exists: whatever ends us, detach() or the
        # janitor closes what is still open.
        with self.borrowed(), self.scratch(8) as sv:
            def socketpair():
                self._check(eng.syscall(NR["socketpair"], (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv)),
                            "socketpair")
                return list(struct.unpack("<ii", self.read(sv, 8)))
            a, b = self.track_new_fds(2, janitor.SOCKET, socketpair)
            try:
                high = _high_fd(self.pid)
                ra = self._dup_remote(a, high)
                rb = self._dup_remote(b, high)
            finally:
                self._close_remote(a)
                self._close_remote(b)
            try:
                mine = _core.pidfd_getfd(self.pidfd, ra)
            finally:
                self._close_remote(ra)
        self._lend_sock = socket.socket(fileno=mine)
        self._lend_remote = rb

    def _close_remote(self, fd):
        with _sigguard.deferred():
            self._engine.syscall(NR["close"], (fd,))
            self.untrack_fd(fd)

    def _open_remote(self, nr, args, what, file=None, low=0):
        """A call that makes a descriptor in the target, tracked before anything can interrupt us. With
        file, the (st_dev, st_ino) it will refer to: the number the kernel will give (the lowest free
        from low) is recorded with the janitor before the call, so that a SIGKILL right after it leaves
        nothing unrecorded."""
        with _sigguard.deferred():
            expected, key = self._expect_fd(low, file) if file is not None else (None, None)
            try:
                fd = self._check(self._engine.syscall(nr, args), what)
            except BaseException:
                janitor.unrecord(key)
                raise
            self._adopt_fd(fd, expected, key)
        return fd

    def _adopt_fd(self, fd, expected, key):
        """Track the descriptor a call just made: with the record made before the call if the kernel
        chose the number expected, else with a new one."""
        if fd == expected:
            self.untrack_fd(fd)
            self._fds[fd] = key
        else:
            self.track_fd(fd)
            janitor.unrecord(key)

    def _expect_fd(self, low, file):
        """(the lowest descriptor number from low free in the target now, its janitor record as file)."""
        return self._records.expect_fd(low, "fd", *file) if self._records_kept() else (None, None)

    def _dup_remote(self, fd, low):
        """fcntl(F_DUPFD_CLOEXEC) of our descriptor fd in the target, at low or above."""
        st = os.stat("/proc/%d/fd/%d" % (self.pid, fd))
        return self._open_remote(NR["fcntl"], (fd, F_DUPFD_CLOEXEC, low), "fcntl", (st.st_dev, st.st_ino), low)

    def _receive_fd(self, file):
        """recvmsg one SCM_RIGHTS descriptor (of file, its (st_dev, st_ino)) in the target; move it high.
        Returns its number there."""
        eng = self._engine
        with self.scratch(256) as buf:
            iov, data, ctl, msg = buf, buf + 16, buf + 32, buf + 96
            cmsg_space = 24
            self.write(iov, struct.pack("<QQ", data, 1))
            self.write(msg, struct.pack("<QIxxxxQQQQi", 0, 0, iov, 1, ctl, cmsg_space, 0))
            with _sigguard.deferred():
                expected, key = self._expect_fd(0, file)
                try:
                    self._check(eng.syscall(NR["recvmsg"], (self._lend_remote, msg, MSG_CMSG_CLOEXEC)), "recvmsg")
                    raw = self.read(ctl, cmsg_space)
                    # The target can write its own memory: check the control message before trusting it.
                    length, level, typ, fd = struct.unpack_from("<QiiI", raw)
                    if (length, level, typ) != (20, SOL_SOCKET, SCM_RIGHTS) or fd > 1 << 20:
                        raise EngineError("unexpected control message in the target while lending a descriptor")
                except BaseException:
                    janitor.unrecord(key)
                    raise
                self._adopt_fd(fd, expected, key)
            try:
                return self._dup_remote(fd, _high_fd(self.pid))
            finally:
                self._close_remote(fd)

    @contextlib.contextmanager
    def lend(self, fd: int) -> Iterator[int]:
        """Make the caller's descriptor fd usable in the target for the block; yields its number there."""
        self._live()
        st = os.fstat(fd)        # EBADF here, in the caller, names the right culprit
        with self.borrowed():
            self._setup_lending()
            socket.send_fds(self._lend_sock, [b"\0"], [fd])
            remote = self._receive_fd((st.st_dev, st.st_ino))
        try:
            yield remote
        finally:
            if remote in self._fds:             # not yet closed by a detach() meanwhile
                with contextlib.suppress(TargetGone):
                    self._close_remote(remote)

    def take_fd(self, remote_fd: int) -> int:
        """A caller-side duplicate of the target's descriptor remote_fd (pidfd_getfd)."""
        self._live()
        return _core.pidfd_getfd(self.pidfd, remote_fd)


def _check_range(addr, n):
    if type(addr) is not int or type(n) is not int:
        raise TypeError("addresses and lengths are ints")
    if not 0 <= addr < 1 << 64 or n < 0 or addr + n > 1 << 64:
        raise ValueError("%d bytes at %#x is not a range of the address space" % (n, addr))


def _probe(tracer, pid, freeze):
    """First contact (errors name the reason); refuse processes of another architecture."""
    if freeze:
        tracer.freeze()
    tracer.acquire()
    try:
        proc.check_elf(pid)
        tracer.prepare()
    finally:
        tracer.release()


def _high_fd(pid):
    """Where lent descriptors go: high enough not to disturb the target's lowest-free allocation."""
    soft = 1024
    try:
        with open("/proc/%d/limits" % pid) as f:
            for line in f:
                if line.startswith("Max open files"):
                    v = line.split()[3]
                    soft = int(v) if v.isdigit() else 1 << 20
    except OSError:
        pass
    # Far above what it uses; with a tiny limit, the upper half of what it may have (the agent needs
    # its pidfd of the caller somewhere, or it would never see the caller die).
    return min(soft, 1024) - 64 if soft > 128 else max(3, soft // 2)
