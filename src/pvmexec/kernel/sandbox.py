"""An application kernel in Python: guest programs run in a stub space, every system call lands here.

Sandbox.run() loads a program (loader.py) into a fresh stub space and runs it
in mode 1; each syscall the guest makes stops it, the handler `sys_<name>`
of this class carries it out on the guest's behalf, and the guest resumes
with the result. Handlers receive the Process and the arguments, decoded by
kind (paths as str, descriptors as signed ints, the rest as unsigned ints);
they return a non-negative result or raise Errno. Override one in a
subclass to emulate, deny, rewrite or observe a call.

Guest memory is hostile input: every pointer is read through the space
(EFAULT if it is bad), every length bounded, every structure parsed here.
"""
from __future__ import annotations

from typing import IO, Mapping, Sequence

import errno
import os
import posixpath
import signal
import threading
import time

from .. import _core
from ..abi import (ALL_SIGNALS, AT_EMPTY_PATH, AT_FDCWD, AT_SYMLINK_NOFOLLOW, MAP_FIXED, MAP_PRIVATE, PROT_READ, PROT_WRITE,
                   SIG_IGN, page_up)
from ..arch import current as _current_arch
from ..engines.stub import WINDOW as STUB_WINDOW
from ..errors import PvmexecError, TargetGone
from ..proc import mappings
from ..space import Space
from ..syscalls import TABLE, name_of
from . import loader
from .errors import Errno, Exited, Interrupted, ThreadExit
from .files import OpenFile, Policy
from .processes import ProcessMachinery
from .procfs import GuestPaths, Proc
from .signals import SignalDelivery, killed_status, sender_info
from .syscalls import (FsCalls, InfoCalls, IoCalls, MmCalls, NetCalls, PollCalls, ProcessCalls, SignalCalls,
                       ThreadCalls, TimerCalls)
from .syscalls.mm import drop_mapped, keep_mapped, map_files_in_space
from .syscalls.timer import end_timers
from .task import Process, kill_space, wake
from .threads import ThreadMachinery, end_group, other_threads, wait_for_threads
from .trace import Tracer


class SharedFutexes:
    """Futex waiters on shared mappings, keyed by (st_dev, st_ino, offset): every guest process's."""

    def __init__(self):
        self.futexes = {}
        self.futex_lock = threading.Lock()


class Spawner:
    """One long-lived thread that runs what must outlive the guest thread asking for it (a stub dies with
    the thread that made it), and makes the next stub space ahead while the guest runs."""

    def __init__(self):
        self._lock = threading.RLock()
        self._jobs = None
        self._spares = {}                       # kind -> (box, done) of a space being made ahead
        self.ending = False                     # the run is ending: nothing more is made ahead

    def _post(self, fn):
        import queue
        with self._lock:
            if self._jobs is None:
                self._jobs = queue.SimpleQueue()
                threading.Thread(target=self._serve, args=(self._jobs,), name="pvmexec-spawner", daemon=True).start()
        done = threading.Event()
        box = []
        self._jobs.put((fn, box, done))
        return box, done

    @staticmethod
    def _result(box, done):
        done.wait()
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def call(self, fn):
        return self._result(*self._post(fn))

    def space(self, kind, make, ahead):
        """make() run here, or the space made ahead for this kind; ahead: make the next one now (a process
        that forks or execs is likely to do it again)."""
        with self._lock:
            spare = self._spares.pop(kind, None)
            if ahead and not self.ending:
                self._spares[kind] = self._post(make)
        if spare is not None:
            try:
                space = self._result(*spare)
                os.kill(space.pid, 0)
                return space
            except (OSError, PvmexecError):
                pass                            # it did not start, or died meanwhile: make one now
        return self.call(make)

    def drop_spares(self):
        """The run is over: the spaces made ahead go (none outlives a run), and so does the thread."""
        with self._lock:
            spares, self._spares = list(self._spares.values()), {}
        for box, done in spares:
            try:
                self._result(box, done).detach()
            except (OSError, PvmexecError):
                pass
        with self._lock:
            if self._jobs is not None:
                self._jobs.put(None)            # after what is queued: the thread ends
                self._jobs = None

    @staticmethod
    def _serve(jobs):
        while True:
            job = jobs.get()
            if job is None:
                return
            fn, box, done = job
            try:
                box.append(fn())
            except BaseException as e:                  # handed to the caller, who raises it
                box.append(e)
            done.set()


class Sandbox(FsCalls, IoCalls, PollCalls, NetCalls, MmCalls, SignalCalls, ProcessCalls, ThreadCalls, InfoCalls,
              TimerCalls, SignalDelivery, ProcessMachinery, ThreadMachinery, GuestPaths):
    """The kernel. `policy` says which host files the guest reaches (files.Policy); `trace` is a
    file to write one strace-like line per syscall to; `vdso=False` hides the vDSO, so that time
    calls reach the kernel (and can be faked); `hostname` replaces the host's in uname()."""

    def __init__(self, policy: Policy | None = None, trace: str | IO[str] | None = None, vdso: bool = True,
                 hostname: str | None = None, patch_syscalls: bool = True, engine: str = "stub") -> None:
        if engine not in ("stub", "ptrace"):
            raise ValueError("engine must be stub or ptrace, not %r" % (engine,))
        self.engine = engine
        self.policy = policy if policy is not None else Policy()
        self.tracer = trace if isinstance(trace, Tracer) or trace is None else Tracer(trace)
        self.vdso = vdso
        self.hostname = hostname
        self.patch_syscalls = patch_syscalls
        self._next_pid = 2
        self._cond = threading.Condition()
        self._procs = {}
        self._procs_by_tid = {}
        self.proc = Proc(self)
        self.shared_futexes = SharedFutexes()
        self.ptys = set()                       # /dev/pts numbers of the ptys guests made
        self.tty_pgrp = {}                      # a terminal's st_rdev -> its foreground process group
        self.unix_bound = {}                    # socket files guests bound, (st_dev, st_ino) -> the name bound
        self.accept_locks = {}                  # a listening socket's (st_dev, st_ino) -> whose turn to accept
        self.socket_creds = {}                  # a guest unix socket's inode -> the pid its peer's SO_PEERCRED shows
        self.socket_senders = {}                # a guest unix socket's inode -> the last guest pid that sent on it
        self.unix_listening = {}                # what a unix socket is bound to (socket.bound) -> who listened
        self._spawner = Spawner()
        self._first_pid = None
        self._handlers = {}
        for nr, (name, kinds) in TABLE.items():
            h = getattr(self, "sys_" + name, None)
            if h is not None:
                self._handlers[nr] = (h, tuple(k for _n, k in kinds or ()))
        self.unsupported = set()
        # Trivial calls may be answered in C, unless traced or handled differently by a subclass.
        self._fast = self.tracer is None and engine == "stub" and all(
            getattr(type(self), name) is getattr(Sandbox, name) for name in _FAST_HANDLERS)

    # -- running a program ----------------------------------------------------------------------

    def run(self, argv: Sequence[str], env: Mapping[str, str] | None = None, cwd: str | None = None,
            stdin: int | None = 0, stdout: int | None = 1, stderr: int | None = 2) -> int:
        """Run argv[0] (a guest path, looked up in PATH if it has no slash) to completion.

        Returns its wait status, as os.waitpid would: os.waitstatus_to_exitcode() reads it.
        Guest processes it leaves behind are killed when it ends.
        """
        env = dict(os.environ) if env is None else dict(env)
        envp = ["%s=%s" % kv for kv in env.items()]
        p = self._first_process()
        p.cwd = self._initial_cwd(cwd)

        def build():
            for guest_fd, host_fd in ((0, stdin), (1, stdout), (2, stderr)):
                if host_fd is not None:
                    mine = os.dup(host_fd)
                    p.fds.install(OpenFile(mine, self._inherited_name(mine, guest_fd), os.O_RDWR), at=guest_fd)
            path = self._which(p, argv[0], env.get("PATH", "/usr/local/bin:/usr/bin:/bin"))
            self._execve(p, path, list(argv), envp)
        return self._run_first(p, build)

    def _first_process(self, pid=None):
        """The run's first process (with its own pid, or the next), run by the calling thread."""
        with self._cond:
            pid = self._next_pid if pid is None else pid
            self._next_pid = max(self._next_pid, pid + 1)
            p = Process(pid)
            self._procs[p.pid] = p
            self._first_pid = p.pid
        p.thread = threading.current_thread()
        return p

    def _run_first(self, p, build):
        """build() makes p's image; then it runs to its end, and with it every guest process goes."""
        try:
            build()
            status = self._process_ended(p, self._loop(p))
        except BaseException:
            self._finish(p, signal.SIGKILL)
            self._end_all()
            self.policy.drop_private()
            raise
        self._finish(p, status)
        self._end_all()
        self.policy.drop_private()              # the run's own /tmp and /dev/shm go with it
        if self.tracer:
            self.tracer.close()
        return status

    def host_signal(self, sig: int) -> None:
        """A signal from outside (the terminal's Ctrl-C or Ctrl-Z, a kill of `pvmexec run`): for the guest
        processes of the terminal's foreground group (as a guest shell set it), else of the first one's session."""
        try:
            foreground = self.tty_pgrp.get(os.fstat(0).st_rdev) if os.isatty(0) else None
        except OSError:
            foreground = None
        with self._cond:
            first = min(self._procs.values(), key=lambda q: q.pid, default=None)
            targets = [q for q in self._procs.values() if q.status is None and first and q.sid == first.sid and
                       not getattr(q, "is_thread", False) and (foreground is None or q.pgid == foreground)]
        info = sender_info(sig, 0x80, 0, 0)                 # SI_KERNEL
        for q in targets:
            self._queue(q, sig, info, wake_it=True)

    def _end_all(self):
        """Kill every guest process still running and wait for its caller thread; no space made ahead stays."""
        self._spawner.ending = True
        with self._cond:
            left = [q for q in self._procs.values() if q.status is None]
        for q in left:
            q.fatal = signal.SIGKILL
            kill_space(q.space)
            wake(q)
        for q in left:
            if q.thread is not None and q.thread is not threading.current_thread():
                q.thread.join(10)
        self._spawner.drop_spares()
        self._spawner.ending = False
        with self._cond:
            self._procs.clear()

    def _new_space(self, patch=True, ahead=True):
        """A space for a guest process; patch=False: no patching window either (its program loads there)."""
        if self.engine == "stub":
            # A stub dies with the thread that made it (PR_SET_PDEATHSIG): made by the guest thread that
            # forked, a daemon's stub would die with its parent (`(cmd &)`); made there, with the kernel.
            patch = patch and self.patch_syscalls
            return self._spawner.space(patch, lambda: Space.create(patch_syscalls=patch, fixed_layout=True), ahead)
        from ..engines.stub import plain_process
        proc = plain_process(fixed_layout=True)
        try:
            return Space.adopt(proc, check_seccomp=False)
        except BaseException:
            proc.kill()
            proc.wait(10)
            raise

    def _initial_cwd(self, cwd):
        return self._guest_path(os.path.realpath(cwd or os.getcwd()))

    def _guest_path(self, host):
        """The guest's name for a host path: below the policy's root, else its `/`."""
        guest = self.policy.guest_path(host)
        return "/" if guest is None else guest

    def _which(self, p, name, path_env):
        if "/" in name:
            return self._abs(p, AT_FDCWD, name)
        for d in path_env.split(":"):
            candidate = posixpath.join(d or ".", name)
            try:
                fd = self.policy.path_fd(self._abs(p, AT_FDCWD, candidate))
            except Errno:
                continue
            try:
                if os.access("/proc/self/fd/%d" % fd, os.X_OK):
                    return self._abs(p, AT_FDCWD, candidate)
            finally:
                os.close(fd)
        raise FileNotFoundError(errno.ENOENT, "%s: command not found in the sandbox's PATH" % name)

    def _loop(self, p):
        handlers, tracer = self._handlers, self.tracer
        syscall_args, set_result = ARCH.syscall_args, ARCH.set_syscall_result
        try:
            while True:
                if p.pending or p.fatal:
                    if p.fatal:
                        self._die_of_fatal(p)
                    try:
                        self._deliver_pending(p)
                    except (Exited, ThreadExit, TargetGone):
                        raise
                    except Exception as e:              # a bug of ours: the process dies, not the kernel
                        self._internal_error(p, "signal delivery", e)
                        raise Exited(signal.SIGKILL) from e
                if self.engine == "stub":      # C answers trivial calls (if allowed) and interrupts for signals
                    p.fast_flag[0] = 1 if p.pending or p.fatal or p.group_status is not None else 0
                    fast = (p.fds.fast, p.fast_ids, p.fast_flag, self._fast)
                else:
                    fast = None
                try:
                    if fast is None:
                        stop = p.space.exec(p.ctx)
                    else:
                        stop = p.space.backend.exec(p.ctx, ALL_SIGNALS, p.thread_index, fast)[0]
                except TargetGone:
                    if p.fatal:
                        continue
                    if not p.is_thread and p.exec_handoff is not None:
                        self._take_exec(p)                  # another thread exec'd: the new image runs here
                        continue
                    if p.group_status is not None or p.exec_exit:
                        return ThreadExit()                 # another thread ended the process, or exec'd
                    raise
                ctx = p.ctx = stop.ctx
                if stop.reason != "syscall":
                    if stop.signo == _PREEMPT and stop.siginfo.pid == getattr(p.space.backend, "preempt_pid", _SELF):
                        continue                            # stopped for a signal: delivered at the top
                    self._deliver(p, stop.signo, stop.siginfo.raw, sync=True)
                    continue
                nr = stop.syscall
                if stop.siginfo.arch != ARCH.AUDIT_ARCH:    # int $0x80: i386 calls are not served
                    set_result(ctx, -errno.ENOSYS)
                    continue
                entry = handlers.get(nr)
                args = syscall_args(ctx)
                if entry is None:
                    ret = -errno.ENOSYS
                    if tracer:
                        tracer.unsupported(p, nr, args, first=nr not in self.unsupported)
                    self.unsupported.add(nr)
                    set_result(ctx, ret)
                    continue
                handler, kinds = entry
                decoded = args[:len(kinds)]
                started = time.perf_counter() if tracer else 0.0
                shown = None
                try:
                    if "str" in kinds or "fd" in kinds:
                        decoded = tuple(self._decode(p, a, k) for a, k in zip(decoded, kinds))
                    if tracer and nr in tracer.EARLY:
                        shown = tracer.enter(p, nr, decoded)
                    ret = handler(p, *decoded)
                except Errno as e:
                    ret = -e.errno
                except Interrupted:
                    ret = self._interrupted_syscall(p, nr)
                except (Exited, ThreadExit) as e:
                    if tracer:
                        tracer.call(p, nr, decoded, None)
                    if isinstance(e, ThreadExit):
                        return e
                    if p.fatal:
                        self._die_of_fatal(p)               # a kill that cut execve short: its signal, not SIGSEGV
                    raise
                except TargetGone:
                    if p.fatal:
                        self._die_of_fatal(p)               # a fatal signal killed its stub during the call
                    raise                                   # its stub was killed (the run ends, SIGKILL): not a bug
                except Exception as e:                      # a bug of ours: the process dies, not the kernel
                    if p.fatal:
                        self._die_of_fatal(p)               # the call failed because the kill took its stub
                    self._internal_error(p, nr, e)
                    raise Exited(signal.SIGKILL) from e
                if tracer:
                    tracer.call(p, nr, decoded, ret, time.perf_counter() - started, shown)
                if ret is not None:                         # None: the handler set the registers (execve)
                    set_result(p.ctx, ret)
        except Exited as e:
            if tracer:
                tracer.exited(p, e.status)
            return e.status
        except TargetGone:
            return killed_status(p.fatal) if p.fatal else signal.SIGKILL   # else killed from outside

    def _internal_error(self, p, nr, e):
        import sys
        import traceback
        where = traceback.extract_tb(e.__traceback__)[-1]
        print("pvmexec: internal error in %s for process %d (%s: %s at %s:%d); the process is killed" % (
            nr if isinstance(nr, str) else name_of(nr), p.pid, type(e).__name__, e, os.path.basename(where.filename),
            where.lineno), file=sys.stderr)
        p.internal_error = e

    @staticmethod
    def _decode(p, value, kind):
        if kind == "str":
            return None if value == 0 else p.read_str(value).decode("utf-8", "surrogateescape")
        if kind == "fd":
            value &= 0xFFFFFFFF
            return value - (1 << 32) if value >= 1 << 31 else value
        return value

    def _signal(self, p, signo):
        """The calling process sends itself signo (raise, write to a broken pipe)."""
        info = sender_info(signo, -6, p.pid, os.getuid())   # SI_TKILL
        self._queue(p, signo, info, wake_it=False)
        if p.fatal:
            self._die_of_fatal(p)

    def _die_of_fatal(self, p):
        info = p.pending.pop(p.fatal, None)
        if self.tracer and info is not None and p.fatal != signal.SIGKILL:
            self.tracer.signal(p, info)                 # strace shows the signal, then the death
        raise Exited(killed_status(p.fatal))

    # -- exec ------------------------------------------------------------------------------------

    def _open_program(self, guest_abs):
        """(host fd, the file's first bytes, its stat) of a file execve may run (the caller closes fd)."""
        fd = self.policy.open(guest_abs, os.O_RDONLY, 0)
        try:
            if not os.access("/proc/self/fd/%d" % fd, os.X_OK):
                raise Errno(errno.EACCES)
            st = os.fstat(fd)
            if not (st.st_mode & 0o170000) == 0o100000:
                raise Errno(errno.EACCES)
            return fd, os.pread(fd, _PROGRAM_HEAD, 0), st
        except BaseException:
            os.close(fd)
            raise

    def _check_program(self, guest_abs):
        """What execve checks first: the program is there and may be run."""
        os.close(self._open_program(guest_abs)[0])

    def _program(self, fd, head, st):
        """The parsed ELF; its headers are read whole where the first bytes do not hold them."""
        try:
            return loader.Elf(head, st.st_size)
        except Errno:
            if len(head) == st.st_size:
                raise
        chunks, off = [], 0
        while True:
            chunk = os.pread(fd, 1 << 22, off)
            if not chunk:
                break
            chunks.append(chunk)
            off += len(chunk)
        return loader.Elf(b"".join(chunks), off)

    def _execve(self, p, path, argv, envp):
        """Replace p's image: everything is built in a new space first, so a failure leaves p as it was."""
        opened = []
        try:
            self._build_image(p, path, argv, envp, opened)
        finally:
            for fd, _st in opened:
                os.close(fd)

    def _build_image(self, p, path, argv, envp, opened):
        fd, data, st = self._open_program(path)
        opened.append((fd, st))
        for _ in range(loader.MAX_SCRIPT_DEPTH):
            script = loader.script_interpreter(data)
            if script is None:
                break
            interp, arg = script
            argv = [interp] + ([arg] if arg else []) + [path] + argv[1:]
            path = self._abs(p, AT_FDCWD, interp)
            fd, data, st = self._open_program(path)
            opened.append((fd, st))
        else:
            raise Errno(errno.ELOOP)
        main_fd, main_st = opened[-1]
        main = self._program(main_fd, data, main_st)
        interp = interp_fd = interp_st = None
        if main.interp:
            interp_fd, head, interp_st = self._open_program(self._abs(p, AT_FDCWD, main.interp))
            opened.append((interp_fd, interp_st))
            interp = self._program(interp_fd, head, interp_st)
        if interp is not None and interp.interp:
            raise Errno(errno.ELIBBAD)
        # A non-PIE program whose segments cover the stub's patching window runs unpatched, without it.
        patch = not any(elf is not None and elf.type == loader.ET_EXEC and elf.span()[0] < STUB_WINDOW[1] and
                        elf.span()[1] > STUB_WINDOW[0] for elf in (main, interp))
        reuse = self._space_reusable(p, patch)
        if reuse:                                       # the point of no return: the old image goes
            space, protected = p.space, p.protected
            kept = self._empty_space(p)
        else:
            space = self._new_space(patch, ahead=p.pid != self._first_pid)
        try:
            if not reuse:
                kept = mappings(space.pid)
                protected = tuple((lo, hi) for lo, hi, _perms, _path in kept)

            def clash(lo, hi):
                if any(lo < e and hi > s for s, e in protected):
                    raise Errno(errno.ENOMEM)

            def mapper(fd):
                return lambda segments: map_files_in_space(space, [
                    (fd, addr, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_FIXED, off) for addr, length, off in segments])
            main.load(space, clash, mapper(main_fd))
            interp_bias = interp.load(space, clash, mapper(interp_fd)) if interp else 0
            vdso = next((lo for lo, _hi, _perms, path in kept if path == "[vdso]"), 0) if self.vdso else 0
            q = Process.__new__(Process)
            q.space = space
            ids = (os.getuid(), os.geteuid(), os.getgid(), os.getegid())
            sp, arg_area = loader.build_stack(space, argv, envp, argv[0] if not path else path, main, interp_bias,
                                              vdso, ids)
            entry = interp.bias + interp.entry if interp else main.bias + main.entry
        except BaseException as e:
            if reuse:                                   # as Linux past that point: the process dies
                raise Exited(killed_status(signal.SIGSEGV)) from e
            space.detach()
            raise
        from ..context import SigContext
        ctx = SigContext(rip=entry, rsp=sp)
        ctx.fpstate = space.initial_fpstate()
        old = None if reuse else p.space
        p.space, p.ctx, p.protected = space, ctx, protected
        if not reuse:
            p.specials = None                               # a new space's vDSO is where the stub's layout has it
        p.patch_window = patch
        p.brk_start = p.brk_cur = p.brk_mapped = page_up(main.end)
        p.exe = path
        p.arg_area = arg_area
        drop_mapped(p)
        p.file_maps = self._image_maps(path, main, main_st)
        keep_mapped(p, main_fd, main_st)
        if interp:
            p.file_maps += self._image_maps(self._abs(p, AT_FDCWD, main.interp), interp, interp_st)
            keep_mapped(p, interp_fd, interp_st)
        p.comm = posixpath.basename(path).encode()[:15]
        p.sigactions = {s: a for s, a in p.sigactions.items() if a[0] == SIG_IGN}
        p.altstack = (0, 2, 0)
        p.clear_child_tid = 0
        p.robust_list = (0, 0)
        p.fds.close_on_exec()
        if not reuse:
            p.free_thread_indices = []                      # the old space's stub threads went with it
        end_timers(p, exec_only=True)                       # POSIX timers end with the image
        p.pending = {s: i for s, i in p.pending.items()}
        if old is not None:
            old.detach()
        p.vfork_done.set()                                  # a vfork parent may go on

    def _space_reusable(self, p, patch):
        """Whether execve may empty p's own stub space and load there (no new stub to start): a stub
        space of one guest thread, its patching window as the new program needs."""
        space = p.space
        return (self.engine == "stub" and space is not None and p.patch_window == patch and
                getattr(space.backend, "threads", None) is not None and len(space.backend.threads) == 1 and
                not other_threads(p))

    @staticmethod
    def _empty_space(p):
        """Unmap every guest mapping of p's space (the stub's own stay) and forget its patched sites;
        returns the mappings that stay."""
        space = p.space
        calls, kept = [], []
        for m in mappings(space.pid):
            lo, hi = m[0], m[1]
            if hi <= ARCH.TASK_SIZE_MAX and not any(lo < e and hi > s for s, e in p.protected):
                calls.append(("munmap", (lo, hi - lo)))
            else:
                kept.append(m)
        for i in range(0, len(calls), 64):
            for ret in space.syscalls(calls[i:i + 64]):
                if ret:
                    raise Exited(killed_status(signal.SIGSEGV))
        space.backend.forget_patches()
        return kept

    # -- paths ---------------------------------------------------------------------------------

    def _abs(self, p, dirfd, path):
        """The absolute guest path for (dirfd, path), normalised lexically (the host resolves symlinks)."""
        if path is None:
            raise Errno(errno.EFAULT)
        if path == "":
            raise Errno(errno.ENOENT)
        if path.startswith("/"):
            base = "/"
        elif dirfd == AT_FDCWD:
            base = p.cwd
        else:
            f = p.fds.get(dirfd)
            if not f.is_dir():
                raise Errno(errno.ENOTDIR)
            base = f.path
        out = posixpath.normpath(posixpath.join(base, path))
        if out.startswith("//"):
            out = "/" + out.lstrip("/")
        return out + ("/" if path.endswith("/") and out != "/" else "")

    @staticmethod
    def _image_maps(path, elf, st):
        """An executable's loaded segments as file mappings of it (for /proc/PID/maps)."""
        return [(lo, hi, path, off, st.st_dev, st.st_ino, False) for lo, hi, off in elf.file_ranges()]

    def _inherited_name(self, host_fd, guest_fd):
        """What /proc/PID/fd shows for a descriptor the guest got from the host: pipe:[N] and the like as
        they are, a file by its guest path."""
        try:
            host = os.readlink("/proc/self/fd/%d" % host_fd)
        except OSError:
            return "/dev/fd/%d" % guest_fd
        if not host.startswith("/"):
            return host
        return self.policy.guest_path(host) or "/dev/fd/%d" % guest_fd

    def _guest_path_of(self, host_fd):
        return self._guest_path(os.readlink("/proc/self/fd/%d" % host_fd))

    def _path_fd(self, p, dirfd, path, flags=0):
        """An O_PATH host fd for a path argument of an *at call (AT_EMPTY_PATH: the descriptor itself)."""
        if path == "" and flags & AT_EMPTY_PATH:
            return os.dup(p.fds.get(dirfd).host_fd)
        return self._guest_path_fd(p, self._abs(p, dirfd, path), follow=not flags & AT_SYMLINK_NOFOLLOW)

    def _writable_fd(self, fd):
        if not self.policy._may_write(os.readlink("/proc/self/fd/%d" % fd)):
            raise Errno(errno.EACCES)

    def _process_ended(self, p, status):
        """The leader's loop ended with status (or ThreadExit): the process's wait status, once every
        other thread of it is gone."""
        if isinstance(status, ThreadExit):
            wait_for_threads(p)
            return p.group_status if p.group_status is not None else 0
        if other_threads(p):
            end_group(p, status)
            wait_for_threads(p)
        return p.group_status if p.group_status is not None else status

    def _raise_sigpipe(self, p):
        self._signal(p, signal.SIGPIPE)


ARCH = _current_arch()
_PREEMPT = _core.LAYOUT["STUB_PREEMPT_SIG"]
_PROGRAM_HEAD = 1 << 14                 # what execve reads of a program: its headers, or a script's #! line
_SELF = os.getpid()
_FAST_HANDLERS = ("sys_read", "sys_write", "sys_getpid", "sys_getppid", "sys_gettid", "sys_getuid", "sys_geteuid",
                  "sys_getgid", "sys_getegid")

