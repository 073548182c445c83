"""attach() and Space: the public face of an engine attached to one process."""
import contextlib
import errno
import os
import signal
import socket
import struct
import threading
import warnings

from . import _core, _guard, proc
from .arch import current as _current_arch
from .context import SigContext
from .errors import (AlreadyTraced, EngineError, RemoteSyscallError, TargetGone,
                     UnsupportedTarget)
from .ptrace_engine import PtraceEngine, signed
from .syscalls import arg_kinds, name_of, number

ALL_SIGNALS = frozenset(range(1, 65)) - {signal.SIGKILL, signal.SIGSTOP}

PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
F_DUPFD_CLOEXEC = 1030
AF_UNIX, SOCK_DGRAM, SOCK_CLOEXEC = 1, 2, 0o2000000
MSG_CMSG_CLOEXEC = 0x40000000
SOL_SOCKET, SCM_RIGHTS = 1, 1
PF_KTHREAD = 0x00200000

NR = {n: number(n) for n in ("mmap", "munmap", "close", "fcntl", "socketpair", "recvmsg")}


def _is_register_value(a):
    """An int that fits a 64-bit register (signed or unsigned)."""
    return type(a) is int and -(1 << 63) <= a < (1 << 64)


def attach(target=None, *, pidfd=None, engine="auto", freeze=False, thread=None, check_seccomp=True):
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
        pid = _pid_of_pidfd(pidfd)
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
        return Space(pid, own_pidfd, freeze=freeze, thread=thread, check_seccomp=check_seccomp, engine=engine)
    except BaseException:
        os.close(own_pidfd)
        raise


def _pid_of_pidfd(fd):
    try:
        with open("/proc/self/fdinfo/%d" % fd) as f:
            for line in f:
                if line.startswith("Pid:"):
                    pid = int(line.split()[1])
                    if pid <= 0:
                        raise TargetGone(pid, "the process of pidfd %d has exited" % fd)
                    return pid
    except FileNotFoundError:
        raise ValueError("%d is not an open file descriptor" % fd) from None
    raise ValueError("file descriptor %d is not a pidfd" % fd)


def _check_target(pid):
    """Refuse what we cannot operate on, with the reason, before touching it."""
    st = proc.status(pid)
    state = st.get("State", "?")[:1]
    if state in ("Z", "X"):
        raise TargetGone(pid, "process %d is a zombie (exited, not yet reaped)" % pid)
    tgid = int(st["Tgid"])
    if tgid == os.getpid():
        raise UnsupportedTarget(pid, "it is the calling process itself (attach to another process)")
    try:
        with open("/proc/%d/stat" % pid) as f:
            flags = int(f.read().rsplit(")", 1)[1].split()[6])
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(pid) from None
    if flags & PF_KTHREAD:
        raise UnsupportedTarget(pid, "it is a kernel thread")
    tracer = int(st.get("TracerPid", "0"))
    if tracer:
        raise AlreadyTraced(pid, tracer)
    return st, tgid


def _check_elf(pid):
    try:
        with open("/proc/%d/exe" % pid, "rb") as f:
            head = f.read(20)
    except OSError:
        return
    check_elf_header(pid, head)


def check_elf_header(pid, head):
    """Refuse executables that are not 64-bit x86-64 ELF (i386 and x32 processes)."""
    if len(head) < 20 or head[:4] != b"\x7fELF":
        return
    cls, machine = head[4], struct.unpack_from("<H", head, 18)[0]
    if cls == 1 and machine == 62:
        raise UnsupportedTarget(pid, "it is an x32 process (not supported)")
    if cls == 1:
        raise UnsupportedTarget(pid, "it is a 32-bit process (not supported yet)")
    if machine != 62:
        raise UnsupportedTarget(pid, "its executable is for ELF machine %d, not x86-64" % machine)


class Space:
    """A target address space with an engine attached. Use as a context manager."""

    def __init__(self, pid, pidfd, *, freeze=False, thread=None, check_seccomp=True, engine="auto"):
        st, tgid = _check_target(pid)
        self.pid = tgid
        self.pidfd = pidfd
        self._detached = False
        self._lend_sock = None         # caller's end of the descriptor-passing socket
        self._lend_remote = None       # target's end (a high fd in the target)
        tid = thread if thread is not None else self._pick_thread(tgid)
        if not os.path.exists("/proc/%d/task/%d" % (tgid, tid)):
            raise ValueError("thread %d is not a thread of process %d" % (tid, tgid))
        reap_leader = int(st["PPid"]) != os.getpid()
        self._engine = PtraceEngine(tgid, tid, reap_leader, check_seccomp)
        _guard.install()
        try:
            self._probe(st, freeze)
            self.fallback_reason = None
            if engine in ("agent", "auto"):
                from .agent_engine import AgentEngine, InjectionFailed
                try:
                    self._engine = AgentEngine(tgid, pidfd, self._engine, self._high_fd())
                except InjectionFailed as e:
                    if engine == "agent":
                        raise
                    self.fallback_reason = e.reason
                    warnings.warn("pvmexec: agent engine unavailable for process %d (%s); using the ptrace engine"
                                  % (tgid, e.reason), RuntimeWarning, stacklevel=3)
            self.engine = self._engine.name
        except BaseException:
            self._engine.close()
            _guard.uninstall()
            raise

    @classmethod
    def create(cls, patch_syscalls=True, fixed_layout=False):
        """A fresh, almost empty address space (a stub process of ours) for guest code.

        Mode 1 runs at full speed there: guest syscalls are trapped by the stub's
        seccomp filter and faults by its signal handler, without ptrace. Mode 2 is
        limited to the stub's own memory management (mmap, mprotect, munmap,
        madvise, mremap) and runs on a service thread; new_thread() adds guest
        threads for exec(thread=). The space dies with its caller, precisely with
        the caller thread that created it (PR_SET_PDEATHSIG).

        patch_syscalls: a guest syscall site of the form `mov $nr, %eax; syscall`
        that trapped once is rewritten to enter the stub without a signal (as
        gVisor's systrap does); its stops are the same. The guest sees the
        rewritten bytes if it reads its code, and the space holds a 64 KiB window
        at 0x050f0000. Space.patching says whether it is on, and why not.

        fixed_layout: start the stub without address-space randomisation, so that
        every such space has its own pages and the vDSO at the same addresses
        (what copying a guest into another space, for fork, needs).
        """
        from .stub_engine import StubEngine
        engine = StubEngine(patch=patch_syscalls, fixed_layout=fixed_layout)
        self = cls.__new__(cls)
        self._engine = engine
        self.engine = engine.name
        self.pid = engine.pid
        self.pidfd = os.dup(engine.pidfd)
        self.fallback_reason = None
        self.patching = engine.patching
        self._detached = False
        self._lend_sock = self._lend_remote = None
        _guard.install()
        return self

    def new_thread(self):
        """Stub spaces: start another stub thread for another guest thread; returns its number for exec(thread=)."""
        self._live()
        if self.engine != "stub":
            raise ValueError("new_thread() is for stub spaces (Space.create())")
        return self._engine.new_thread()

    @staticmethod
    def _pick_thread(tgid):
        for tid in [tgid] + sorted(int(t) for t in os.listdir("/proc/%d/task" % tgid)):
            try:
                with open("/proc/%d/task/%d/stat" % (tgid, tid)) as f:
                    if f.read().rsplit(")", 1)[1].split()[0] not in ("Z", "X"):
                        return tid
            except FileNotFoundError:
                continue
        raise TargetGone(tgid, "process %d has no live thread" % tgid)

    def _probe(self, st, freeze):
        """First contact (errors name the reason); refuse non-x86-64 processes."""
        if freeze:
            self._engine.freeze()
        self._engine.acquire()
        try:
            _check_elf(self.pid)
        finally:
            self._engine.release()

    # -- lifetime ---------------------------------------------------------------

    def detach(self):
        """Let the target go. Idempotent; the target is left exactly as found."""
        if self._detached:
            return
        self._detached = True
        try:
            if self._lend_remote is not None:
                with contextlib.suppress(OSError):
                    self._engine.syscall(NR["close"], (self._lend_remote,))
        finally:
            self._lend_remote = None
            if self._lend_sock is not None:
                self._lend_sock.close()
                self._lend_sock = None
            try:
                self._engine.close()
            finally:
                os.close(self.pidfd)
                _guard.uninstall()

    close = detach

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.detach()
        return False

    def __del__(self):
        if not getattr(self, "_detached", True):
            with contextlib.suppress(Exception):
                self.detach()

    def __repr__(self):
        return "<Space pid=%d engine=%s%s>" % (self.pid, self.engine, " detached" if self._detached else "")

    def _live(self):
        if self._detached:
            raise ValueError("operation on a detached Space")

    # -- system calls (mode 2) ---------------------------------------------------

    def syscall_raw(self, nr_or_name, *args):
        """Run one syscall in the target (its fd table, its memory); return the raw result."""
        self._live()
        nr = number(nr_or_name)
        if len(args) > 6:
            raise TypeError("a system call takes at most 6 arguments, got %d" % len(args))
        if all(map(_is_register_value, args)):
            with _guard.operation():
                return self._engine.syscall(nr, args)
        with contextlib.ExitStack() as stack:
            args = [self._place(stack, a) for a in args]
            with _guard.operation():
                return self._engine.syscall(nr, args)

    def syscall(self, nr_or_name, *args):
        """Like syscall_raw, but a -errno result raises RemoteSyscallError."""
        ret = self.syscall_raw(nr_or_name, *args)
        if -4096 < ret < 0:
            raise RemoteSyscallError(-ret, name_of(number(nr_or_name)), args)
        return ret

    def syscalls(self, calls):
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
        with _guard.operation():
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
    def scratch(self, size):
        """Anonymous memory in the target for the duration of the block (unmapped afterwards)."""
        self._live()
        length = max(4096, (size + 4095) & ~4095)
        addr = self._check(self._engine.syscall(
            NR["mmap"], (0, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)), "mmap")
        try:
            yield addr
        finally:
            self._engine.syscall(NR["munmap"], (addr, length))

    def _check(self, ret, what):
        if -4096 < ret < 0:
            raise RemoteSyscallError(-ret, what, ())
        return ret

    @contextlib.contextmanager
    def borrowed(self):
        """Hold the borrowed thread stopped across several operations (fewer round trips)."""
        self._live()
        self._engine.acquire()
        try:
            yield self
        finally:
            with _guard.operation():
                self._engine.release()

    # -- memory --------------------------------------------------------------------

    def read(self, addr, n):
        """Read n bytes of target memory (process_vm_readv; /proc/PID/mem where refused)."""
        self._live()
        try:
            return _core.vm_read(self.pid, addr, n)
        except OSError as e:
            if e.errno not in (errno.EFAULT, errno.EPERM, errno.ENOSYS):
                raise
            return self._mem_io(addr, n, None, e)

    def write(self, addr, data):
        """Write bytes to target memory; read-only pages are written through /proc/PID/mem."""
        self._live()
        data = bytes(data)
        try:
            _core.vm_write(self.pid, addr, data)
        except OSError as e:
            if e.errno not in (errno.EFAULT, errno.EPERM, errno.ENOSYS):
                raise
            self._mem_io(addr, len(data), data, e)

    def _mem_io(self, addr, n, data, first_error):
        try:
            fd = os.open("/proc/%d/mem" % self.pid, os.O_RDWR if data is not None else os.O_RDONLY)
        except FileNotFoundError:
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

    def exec(self, ctx, *, sigmask=ALL_SIGNALS, thread=0, _fast=None):
        """Run code in the target from ctx until its first syscall (not executed) or signal.

        Returns a Stop. A signal that is not in sigmask ends the run too and is
        then delivered to the calling thread, as the proposal specifies.
        thread: in a stub space, which stub thread runs it (see new_thread()).
        """
        self._live()
        if type(ctx) is not SigContext and not isinstance(ctx, SigContext):
            raise TypeError("ctx must be a SigContext")
        mask = sigmask if type(sigmask) is frozenset else frozenset(sigmask)
        if self.engine == "stub":
            # Our own process: nothing to restore if the caller is killed, so no guard needed.
            stop, deliver = self._engine.exec(ctx, mask, thread, _fast)
        elif thread:
            raise ValueError("thread= selects a stub thread; this space's engine is %s" % self.engine)
        else:
            with _guard.operation():
                stop, deliver = self._engine.exec(ctx, mask)
        if deliver:
            signal.pthread_kill(threading.get_ident(), deliver)
        return stop

    def initial_fpstate(self):
        """A clean FPU state in this CPU's xstate layout: set ctx.fpstate to it to carry FPU state across exec()."""
        self._live()
        return self._engine.initial_fpstate()

    # -- descriptors ---------------------------------------------------------------------

    def _high_fd(self):
        """Where lent descriptors go: high enough not to disturb the target's lowest-free allocation."""
        soft = 1024
        try:
            with open("/proc/%d/limits" % self.pid) as f:
                for line in f:
                    if line.startswith("Max open files"):
                        v = line.split()[3]
                        soft = int(v) if v.isdigit() else 1 << 20
        except OSError:
            pass
        return max(64, min(soft, 1024) - 64)

    def _setup_lending(self):
        if self._lend_remote is not None:
            return
        eng = self._engine
        with self.borrowed(), self.scratch(8) as sv:
            self._check(eng.syscall(NR["socketpair"], (AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0, sv)), "socketpair")
            a, b = struct.unpack("<ii", self.read(sv, 8))
            try:
                high = self._high_fd()
                ra = self._check(eng.syscall(NR["fcntl"], (a, F_DUPFD_CLOEXEC, high)), "fcntl")
                rb = self._check(eng.syscall(NR["fcntl"], (b, F_DUPFD_CLOEXEC, high)), "fcntl")
            finally:
                eng.syscall(NR["close"], (a,))
                eng.syscall(NR["close"], (b,))
            try:
                mine = _core.pidfd_getfd(self.pidfd, ra)
            finally:
                eng.syscall(NR["close"], (ra,))
        self._lend_sock = socket.socket(fileno=mine)
        self._lend_remote = rb

    def _receive_fd(self):
        """recvmsg one SCM_RIGHTS descriptor in the target; move it high. Returns its number there."""
        eng = self._engine
        with self.scratch(256) as buf:
            iov, data, ctl, msg = buf, buf + 16, buf + 32, buf + 96
            cmsg_space = 24
            self.write(iov, struct.pack("<QQ", data, 1))
            self.write(msg, struct.pack("<QIxxxxQQQQi", 0, 0, iov, 1, ctl, cmsg_space, 0))
            self._check(eng.syscall(NR["recvmsg"], (self._lend_remote, msg, MSG_CMSG_CLOEXEC)), "recvmsg")
            raw = self.read(ctl, cmsg_space)
            # The target can write its own memory: check the control message before trusting it.
            length, level, typ, fd = struct.unpack_from("<QiiI", raw)
            if (length, level, typ) != (20, SOL_SOCKET, SCM_RIGHTS) or fd > 1 << 20:
                raise EngineError("unexpected control message in the target while lending a descriptor")
            try:
                return self._check(eng.syscall(NR["fcntl"], (fd, F_DUPFD_CLOEXEC, self._high_fd())), "fcntl")
            finally:
                eng.syscall(NR["close"], (fd,))

    @contextlib.contextmanager
    def lend(self, fd):
        """Make the caller's descriptor fd usable in the target for the block; yields its number there."""
        self._live()
        os.fstat(fd)        # EBADF here, in the caller, names the right culprit
        with self.borrowed():
            self._setup_lending()
            socket.send_fds(self._lend_sock, [b"\0"], [fd])
            remote = self._receive_fd()
        try:
            yield remote
        finally:
            with contextlib.suppress(TargetGone):
                self._engine.syscall(NR["close"], (remote,))

    def take_fd(self, remote_fd):
        """A caller-side duplicate of the target's descriptor remote_fd (pidfd_getfd)."""
        self._live()
        return _core.pidfd_getfd(self.pidfd, remote_fd)


# Syscalls that create descriptors: under the proposal's semantics they land in the caller's table.
FD_RESULT = frozenset(number(n) for n in (
    "open", "openat", "openat2", "creat", "socket", "accept", "accept4", "epoll_create",
    "epoll_create1", "eventfd", "eventfd2", "signalfd", "signalfd4", "timerfd_create", "inotify_init",
    "inotify_init1", "memfd_create", "memfd_secret", "pidfd_open", "pidfd_getfd", "fanotify_init",
    "userfaultfd", "perf_event_open", "open_by_handle_at", "fsopen", "fsmount", "fspick", "open_tree",
    "open_tree_attr", "io_uring_setup", "landlock_create_ruleset", "mq_open"))
FD_PAIR_RESULT = {number("pipe"): 0, number("pipe2"): 0, number("socketpair"): 3}
CALLER_TABLE_ONLY = frozenset(number(n) for n in ("close", "dup", "dup2", "dup3", "close_range"))


def syscall_with_callers_fds(space, nr, args):
    """Mode 2 as the proposal defines it: the caller's descriptors, the target's memory."""
    if nr in CALLER_TABLE_ONLY:
        # Pure descriptor-table calls touch no target memory: they act on the caller's table.
        return _local_fd_call(nr, args)
    kinds = arg_kinds(nr)
    with contextlib.ExitStack() as stack:
        args = list(args)
        lent = {}
        for i, (_name, kind) in enumerate(kinds):
            if kind == "fd" and i < len(args) and 0 <= signed(args[i]) < (1 << 31):
                fd = signed(args[i])
                if fd not in lent:
                    lent[fd] = stack.enter_context(space.lend(fd))
                args[i] = lent[fd]
        ret = space.syscall_raw(nr, *args)
    if ret >= 0 and nr in FD_RESULT:
        return _move_to_caller(space, ret)
    if ret >= 0 and nr in FD_PAIR_RESULT:
        where = args[FD_PAIR_RESULT[nr]]
        raw = space.read(where, 8)
        pair = struct.unpack("<ii", raw)
        mine = [_move_to_caller(space, fd) for fd in pair]
        space.write(where, struct.pack("<ii", *mine))
    return ret


def _move_to_caller(space, remote_fd):
    try:
        return space.take_fd(remote_fd)
    finally:
        space.syscall_raw("close", remote_fd)


def _local_fd_call(nr, args):
    name = name_of(nr)
    a = [signed(x) for x in args] + [0] * 3
    try:
        if name == "close":
            os.close(a[0])
        elif name == "dup":
            return os.dup(a[0])
        elif name in ("dup2", "dup3"):
            return os.dup2(a[0], a[1], inheritable=not (a[2] & os.O_CLOEXEC))
        elif name == "close_range":
            os.closerange(a[0], min(a[1], 1 << 20) + 1)
        return 0
    except OSError as e:
        return -e.errno
