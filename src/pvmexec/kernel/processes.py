"""Sandbox handlers: processes (fork, wait, exit, kill, groups) and signal delivery to guest handlers.

Each guest process has a stub space of its own and a caller thread that runs
it. fork copies the parent's guest mappings into a new space (the stubs all
share one layout, so nothing the guest remembers moves); wait4/waitid block
on the kernel's process table. A signal for a process is queued on it; it is
delivered at the process's next stop, on a frame built as Linux builds it,
and a process blocked inside the kernel (read, wait, sleep) is woken to take it.
"""
import errno
import os
import select
import signal
import struct
import threading

from .files import Errno

SIGCHLD = signal.SIGCHLD
CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_VFORK, CLONE_PARENT, CLONE_THREAD = 0x4000, 0x8000, 0x10000
CLONE_SETTLS, CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID = 0x80000, 0x100000, 0x200000
CLONE_CHILD_SETTID = 0x1000000
CLONE_NAMESPACES = 0x7E020000 | 0x00000080          # NEWNS..NEWNET, NEWCGROUP, NEWTIME
WNOHANG, WEXITED, WNOWAIT = 1, 4, 0x01000000
SA_NODEFER, SA_RESETHAND, SA_ONSTACK, SA_RESTART, SA_SIGINFO = 0x40000000, 0x80000000, 0x08000000, 0x10000000, 4
SS_ONSTACK, SS_DISABLE = 1, 2
SIG_DFL, SIG_IGN = 0, 1
_SYNC = frozenset((signal.SIGSEGV, signal.SIGBUS, signal.SIGFPE, signal.SIGILL, signal.SIGTRAP, signal.SIGSYS))
_DEFAULT_IGNORE = frozenset((signal.SIGCHLD, signal.SIGURG, signal.SIGWINCH, signal.SIGCONT))
_STOP = frozenset((signal.SIGSTOP, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU))
_CORE = frozenset((signal.SIGQUIT, signal.SIGILL, signal.SIGTRAP, signal.SIGABRT, signal.SIGBUS,
                   signal.SIGFPE, signal.SIGSEGV, signal.SIGXCPU, signal.SIGXFSZ, signal.SIGSYS))
UNBLOCKABLE = (1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1))
SI_USER, SI_TKILL, CLD_EXITED, CLD_KILLED, CLD_DUMPED = 0, -6, 1, 2, 3
PAGE = 4096


class Interrupted(Exception):
    """A blocking call in the kernel gave way to a signal (EINTR, or restarted under SA_RESTART)."""


def sender_info(sig, code, pid, uid):
    """A siginfo for a signal sent by a process (kill, tgkill) or the kernel: signo, code, pid, uid."""
    return struct.pack("<iii4xiI", sig, 0, code, pid, uid).ljust(128, b"\0")


def _bit(sig):
    return 1 << (sig - 1)


# -- waiting that a signal can interrupt -------------------------------------------------------------

def wait_readable(self, p, host_fd, events=select.POLLIN, timeout_ms=None):
    """Block until host_fd is ready or a signal arrives for p (Interrupted)."""
    poller = select.poll()
    poller.register(host_fd, events)
    poller.register(p.wake_r, select.POLLIN)
    while True:
        ready = dict(poller.poll(timeout_ms))
        if p.wake_r in ready:
            _drain(p)
            if self._signal_ready(p):
                raise Interrupted()
        if host_fd in ready or timeout_ms is not None:
            return bool(ready.get(host_fd))


def _drain(p):
    try:
        while os.read(p.wake_r, 64):
            pass
    except BlockingIOError:
        pass


def close_wake(p):
    """Close a task's wake-up pipe (Process or Thread)."""
    for fd in (p.wake_r, p.wake_w):
        try:
            os.close(fd)
        except OSError:
            pass
    p.wake_r = p.wake_w = -1


def wake(p):
    try:
        os.write(p.wake_w, b"!")
    except (BlockingIOError, OSError):
        pass


def sleep_interruptibly(self, p, seconds):
    """Sleep, unless a deliverable signal arrives first (then Interrupted)."""
    if seconds > 0:
        r, _, _ = select.select([p.wake_r], [], [], seconds)
        if r:
            _drain(p)
            if self._signal_ready(p):
                raise Interrupted()
            return sleep_interruptibly(self, p, 0)
    if self._signal_ready(p):
        raise Interrupted()


# -- fork -------------------------------------------------------------------------------------------------

def sys_fork(self, p):
    return self._clone(p, SIGCHLD, 0, 0, 0, 0)


def sys_vfork(self, p):
    return self._clone(p, CLONE_VM | CLONE_VFORK | SIGCHLD, 0, 0, 0, 0)


def sys_clone(self, p, flags, newsp, parent_tid, child_tid, tls):
    return self._clone(p, flags, newsp, parent_tid, child_tid, tls)


def sys_clone3(self, p, args, size):
    raise Errno(errno.ENOSYS)                       # libc falls back to clone


def _clone(self, p, flags, newsp, parent_tid, child_tid, tls):
    flags &= 0xFFFFFFFFFFFFFFFF
    if flags & CLONE_NAMESPACES:
        raise Errno(errno.EPERM)
    if flags & CLONE_THREAD:
        return self._new_thread(p, flags, newsp, parent_tid, child_tid, tls)
    if flags & (CLONE_SIGHAND | CLONE_FILES | CLONE_FS) and not flags & CLONE_VFORK:
        raise Errno(errno.EINVAL)                   # sharing these between processes is not provided
    child = self._new_process(parent=p)
    try:
        child.space = self._new_space()
        child.protected = p.protected
        self._copy_memory(p, child)
    except BaseException:
        self._discard(child)
        raise
    child.ctx = p.ctx.copy()
    child.ctx.fpstate = p.ctx.fpstate
    child.ctx.rax = 0
    if newsp:
        child.ctx.rsp = newsp
    if flags & CLONE_SETTLS:
        child.ctx.fs_base = tls
    child.exit_signal = flags & 0xFF
    if flags & CLONE_PARENT_SETTID:
        for q in (p, child):
            q.write(parent_tid, struct.pack("<i", child.pid))
    if flags & CLONE_CHILD_SETTID:
        child.write(child_tid, struct.pack("<i", child.pid))
    if flags & CLONE_CHILD_CLEARTID:
        child.clear_child_tid = child_tid
    if flags & CLONE_VFORK:
        child.vfork_parent = p
    self._start(child)
    if flags & CLONE_VFORK:                         # the parent waits until the child execs or exits
        child.vfork_done.wait()
    return child.pid


def _new_process(self, parent):
    from .sandbox import Process
    with self._cond:
        pid = self._next_pid
        self._next_pid += 1
        child = Process(pid)
        child.ppid = child.fast_ids[1] = parent.pid
        child.parent = parent
        child.pgid, child.sid = parent.pgid, parent.sid
        parent.children[pid] = child
        self._procs[pid] = child
    child.cwd, child.umask, child.exe, child.comm = parent.cwd, parent.umask, parent.exe, parent.comm
    child.sigactions = dict(parent.sigactions)
    child.sigmask = parent.sigmask
    child.altstack = parent.altstack
    child.rlimits = dict(parent.rlimits)
    child.brk_start, child.brk_cur, child.brk_mapped = parent.brk_start, parent.brk_cur, parent.brk_mapped
    child.fds.limit = parent.fds.limit
    for fd, (f, cloexec) in parent.fds.fds.items():
        child.fds.install(f, cloexec=cloexec, at=fd)
    return child


def _discard(self, child):
    with self._cond:
        self._procs.pop(child.pid, None)
        if child.parent is not None:
            child.parent.children.pop(child.pid, None)
    child.fds.close_all()
    if child.space is not None:
        child.space.detach()
    close_wake(child)


def _copy_memory(self, p, child):
    """The parent's guest mappings, with their contents and protections, into the child's space."""
    src, dst = p.space, child.space
    calls = []
    with open("/proc/%d/maps" % src.pid) as f:
        maps = [line.split() for line in f]
    for fields in maps:
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if any(lo < e and hi > s for s, e in p.protected) or lo >= 1 << 47:
            continue
        perms = fields[1]
        prot = (1 if perms[0] == "r" else 0) | (2 if perms[1] == "w" else 0) | (4 if perms[2] == "x" else 0)
        at = dst.syscall_raw("mmap", lo, hi - lo, 3, 0x22 | 0x100000, -1, 0)
        if at != lo:
            raise Errno(errno.ENOMEM)
        addr = lo
        while addr < hi:
            n = min(hi - addr, 1 << 20)
            data = src.read(addr, n)
            if data.count(0) != n:
                dst.write(addr, data)
            addr += n
        if prot != 3:
            calls.append(("mprotect", (lo, hi - lo, prot)))
    for i in range(0, len(calls), 64):
        dst.syscalls(calls[i:i + 64])
    # Patched syscall sites in the copied code jump through the window: give the child the same table.
    if src.engine == dst.engine == "stub":
        dst.backend.copy_patches_from(src.backend)


def _start(self, child):
    t = threading.Thread(target=self._run_process, args=(child,), name="guest-%d" % child.pid, daemon=True)
    child.thread = t
    t.start()


def _run_process(self, p):
    try:
        status = self._process_ended(p, self._loop(p))
    except BaseException as e:                      # a bug of ours: the guest dies, the kernel lives on
        p.internal_error = e
        status = signal.SIGKILL
        self._kill_space(p.space)
        from .threads import wait_for_threads
        wait_for_threads(p)
    self._finish(p, status)


def _finish(self, p, status):
    """The process is gone: release what it held, wake its parent (SIGCHLD) and any vfork parent."""
    if p.clear_child_tid and p.space is not None:
        try:
            p.write(p.clear_child_tid, b"\0\0\0\0")
        except Errno:
            pass
    p.threads.pop(p.pid, None)
    p.fds.close_all()
    if p.space is not None:
        p.space.detach()
    with self._cond:
        p.status = status
        for c in p.children.values():
            c.parent = None
            c.ppid = c.fast_ids[1] = 1
        if p.parent is not None and p.exit_signal:
            self._queue(p.parent, p.exit_signal, self._child_info(p), wake_it=True)
        self._cond.notify_all()
    p.vfork_done.set()
    close_wake(p)


def _child_info(self, p):
    code, status = (CLD_EXITED, p.status >> 8) if p.status & 0x7F == 0 else \
        (CLD_DUMPED if p.status & 0x80 else CLD_KILLED, p.status & 0x7F)
    return struct.pack("<iii4xiIi", SIGCHLD, 0, code, p.pid, os.getuid(), status).ljust(128, b"\0")


# -- wait ------------------------------------------------------------------------------------------------

def _matches(p, c, pid):
    if pid == -1:
        return True
    if pid > 0:
        return c.pid == pid
    return c.pgid == (p.pgid if pid == 0 else -pid)


def _wait(self, p, pid, options, reap):
    with self._cond:
        while True:
            candidates = [c for c in p.children.values() if _matches(p, c, pid)]
            if not candidates:
                raise Errno(errno.ECHILD)
            for c in candidates:
                if c.status is not None:
                    if reap:
                        del p.children[c.pid]
                        self._procs.pop(c.pid, None)
                    return c
            if options & WNOHANG:
                return None
            if self._signal_ready(p):
                raise Interrupted()
            self._cond.wait(0.2)


def sys_wait4(self, p, pid, wstatus, options, rusage):
    pid &= 0xFFFFFFFF
    pid = pid - (1 << 32) if pid >= 1 << 31 else pid
    c = _wait(self, p, pid, options, reap=True)
    if c is None:
        return 0
    if wstatus:
        p.write(wstatus, struct.pack("<i", c.status))
    if rusage:
        p.write(rusage, bytes(144))
    return c.pid


def sys_waitid(self, p, idtype, id_, infop, options, rusage):
    if not options & WEXITED:
        raise Errno(errno.EINVAL)
    pid = -1 if idtype == 0 else id_ if idtype == 1 else -id_ if idtype == 2 else None
    if pid is None:
        raise Errno(errno.EINVAL)
    c = _wait(self, p, pid, options, reap=not options & WNOWAIT)
    if infop:
        p.write(infop, self._child_info(c) if c else bytes(128))
    return 0


# -- process groups ---------------------------------------------------------------------------------

def _proc(self, p, pid):
    if pid == 0 or pid == p.pid:
        return p
    with self._cond:
        q = self._procs.get(pid) or self._procs_by_tid.get(pid)
    if q is None or q.status is not None:
        raise Errno(errno.ESRCH)
    return q


def sys_getpgid(self, p, pid):
    return _proc(self, p, pid).pgid


def sys_getpgrp(self, p):
    return p.pgid


def sys_getsid(self, p, pid):
    return _proc(self, p, pid).sid


def sys_setpgid(self, p, pid, pgid):
    q = _proc(self, p, pid)
    if q is not p and q.parent is not p:
        raise Errno(errno.ESRCH)
    if pgid >= 1 << 31:
        raise Errno(errno.EINVAL)
    q.pgid = pgid or q.pid
    return 0


def sys_setsid(self, p):
    if p.pgid == p.pid:
        raise Errno(errno.EPERM)
    p.sid = p.pgid = p.pid
    return p.pid


def sys_getppid(self, p):
    return p.ppid


# -- signals between processes -------------------------------------------------------------------------

def _targets(self, p, pid):
    with self._cond:
        live = [q for q in self._procs.values() if q.status is None]
    if pid > 0:
        return [q for q in live if q.pid == pid]
    if pid == 0:
        return [q for q in live if q.pgid == p.pgid]
    if pid == -1:
        return [q for q in live if q.pid != 1]
    return [q for q in live if q.pgid == -pid]


def sys_kill(self, p, pid, sig):
    pid &= 0xFFFFFFFF
    pid = pid - (1 << 32) if pid >= 1 << 31 else pid
    if not 0 <= sig <= 64:
        raise Errno(errno.EINVAL)
    targets = _targets(self, p, pid)
    if not targets:
        raise Errno(errno.ESRCH)
    if sig:
        info = sender_info(sig, SI_USER, p.pid, os.getuid())
        for q in targets:
            self._queue(q, sig, info, wake_it=q is not p)
    return 0


def sys_tgkill(self, p, tgid, tid, sig):
    if not 0 <= sig <= 64:
        raise Errno(errno.EINVAL)
    q = _proc(self, p, tid)
    if tgid not in (q.pid, 0) and tgid & 0xFFFFFFFF != q.pid:
        raise Errno(errno.ESRCH)
    if sig:
        self._queue(q, sig, sender_info(sig, SI_TKILL, p.pid, os.getuid()),
                    wake_it=q is not p)
    return 0


def sys_tkill(self, p, tid, sig):
    return sys_tgkill(self, p, 0, tid, sig)


def _disposition(p, sig):
    return p.sigactions.get(sig, (SIG_DFL, 0, 0, 0))


def _queue(self, q, sig, info, wake_it):
    """Make sig pending on q (ignored signals are dropped, as Linux drops them)."""
    handler = _disposition(q, sig)[0]
    if sig != signal.SIGKILL and (handler == SIG_IGN or handler == SIG_DFL and sig in _DEFAULT_IGNORE):
        return
    if sig == signal.SIGKILL or handler == SIG_DFL and sig not in _STOP:
        q.fatal = sig                               # nothing the guest can do: end it now
        self._kill_space(q.space)
    q.pending.setdefault(sig, info)
    q.fast_flag[0] = 1
    if wake_it:
        wake(q)


def _signal_ready(self, p):
    return p.fatal or p.group_status is not None or any(not p.sigmask & _bit(s) for s in p.pending)


# -- delivering to guest handlers --------------------------------------------------------------------------

_UC_FLAGS = 1 | 2 | 4                                # UC_FP_XSTATE, UC_SIGCONTEXT_SS, UC_STRICT_RESTORE_SS
_SIGCONTEXT = ("r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15", "rdi", "rsi", "rbp", "rbx", "rdx",
               "rax", "rcx", "rsp", "rip", "eflags")
FP_XSTATE_MAGIC2 = 0x46505845


def deliver_pending(self, p):
    """Run the first deliverable pending signal: a handler frame, or the default action."""
    for sig in sorted(p.pending):
        if p.sigmask & _bit(sig) and sig not in (signal.SIGKILL, signal.SIGSTOP):
            continue
        info = p.pending.pop(sig)
        self._deliver(p, sig, info)
        return True
    return False


def killed_status(sig):
    """The wait status of a process killed by sig (with the core-dump bit where Linux sets it)."""
    return sig | (0x80 if sig in _CORE else 0)


def _terminate(sig):
    from .sandbox import Exited
    raise Exited(killed_status(sig))


def _deliver(self, p, sig, info, sync=False):
    handler, flags, restorer, mask = _disposition(p, sig)
    blocked = p.sigmask & _bit(sig)
    if sync and (handler == SIG_IGN or blocked):
        _terminate(sig)                             # a fault that cannot be handled kills, as force_sig does
    if handler == SIG_IGN:
        return
    if handler == SIG_DFL:
        if sig in _DEFAULT_IGNORE or sig in _STOP:
            return
        _terminate(sig)
    try:
        self._push_frame(p, sig, info, handler, flags, restorer)
    except Errno:
        _terminate(signal.SIGSEGV)                  # no room for the frame: as Linux, the process dies
    if flags & SA_RESETHAND:
        p.sigactions[sig] = (SIG_DFL, 0, 0, 0)
    p.sigmask |= mask | (0 if flags & SA_NODEFER else _bit(sig))
    p.sigmask &= ~UNBLOCKABLE


def _push_frame(self, p, sig, info, handler, flags, restorer):
    ctx = p.ctx
    ss_sp, ss_flags, ss_size = p.altstack
    on_alt = not ss_flags & SS_DISABLE and ss_sp < ctx.rsp <= ss_sp + ss_size
    if flags & SA_ONSTACK and not ss_flags & SS_DISABLE and not on_alt:
        sp = ss_sp + ss_size
    else:
        sp = ctx.rsp - 128                          # below the red zone
    fp = ctx.fpstate or p.space.initial_fpstate()
    sp = (sp - len(fp) - 4) & ~63
    fp_addr = sp
    frame_size = 8 + 304 + 128
    sp = ((sp - frame_size) & ~15) - 8
    uc = sp + 8
    info_addr = uc + 304
    regs = [getattr(ctx, n) for n in _SIGCONTEXT]
    old_mask = p.sigmask if p.saved_sigmask is None else p.saved_sigmask
    p.saved_sigmask = None
    sigcontext = struct.pack("<18Q", *regs) + struct.pack("<HHHH", 0x33, 0, 0, 0x2B) + \
        struct.pack("<QQQQQ", 0, 14 if sig == signal.SIGSEGV else 0, old_mask, 0, fp_addr) + bytes(64)
    stack = struct.pack("<QiiQ", ss_sp, (SS_ONSTACK if on_alt else 0) | (ss_flags & SS_DISABLE), 0, ss_size)
    ucontext = struct.pack("<QQ", _UC_FLAGS, 0) + stack + sigcontext + struct.pack("<Q", old_mask)
    assert len(ucontext) == 304
    p.write(sp, struct.pack("<Q", restorer) + ucontext + bytes(info[:128]).ljust(128, b"\0"))
    p.write(fp_addr, bytes(fp) + struct.pack("<I", FP_XSTATE_MAGIC2))
    ctx.rdi, ctx.rsi, ctx.rdx, ctx.rax = sig, info_addr, uc, 0
    ctx.rsp, ctx.rip = sp, handler
    ctx.eflags &= ~(0x400 | 0x100 | 0x40000)       # DF, TF, AC clear, as the kernel leaves them
    ctx.fpstate = p.space.initial_fpstate()


def sys_rt_sigreturn(self, p):
    uc = p.ctx.rsp
    raw = p.read(uc, 304)
    ss_sp, ss_flags, ss_size = struct.unpack_from("<Qi4xQ", raw, 16)
    regs = struct.unpack_from("<18Q", raw, 40)
    fp_addr = struct.unpack_from("<Q", raw, 40 + 160 + 32)[0]
    mask = struct.unpack_from("<Q", raw, 296)[0]
    ctx = p.ctx
    for name, value in zip(_SIGCONTEXT, regs):
        if name == "eflags":
            value = (ctx.eflags & ~0x50DD5) | (value & 0x50DD5)
        setattr(ctx, name, value)
    size = len(ctx.fpstate or p.space.initial_fpstate())
    if fp_addr:
        ctx.fpstate = p.read(fp_addr, size)
    p.sigmask = mask & ~UNBLOCKABLE
    if not ss_flags & SS_DISABLE:
        p.altstack = (ss_sp, ss_flags & ~SS_ONSTACK, ss_size)
    return None


def interrupted_syscall(self, p, nr):
    """A blocking call gave way to a signal: restart it after the handler if SA_RESTART, else EINTR."""
    sig = next((s for s in sorted(p.pending) if not p.sigmask & _bit(s)), None)
    if sig is not None and _disposition(p, sig)[1] & SA_RESTART:
        p.ctx.rip -= 2
        p.ctx.rax = nr
        return None
    return -errno.EINTR
