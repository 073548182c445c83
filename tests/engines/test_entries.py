"""The C entries of the hot paths (Space.syscall through an agent, Space.exec on a stub or helper thread):
they take the calls they can, give exactly what the Python path gives, and hand everything else to it."""
import errno
import os
import signal
import struct
import threading
import time

import pytest

import pvmexec
from pvmexec import _core
from pvmexec.arch import current
from pvmexec.engines.agent import AgentEngine
from pvmexec.engines.stub import StubEngine
from pvmexec.guest import Guest

NR_GETPID, NR_GETPPID, NR_GETTID = 39, 110, 186


class Context(pvmexec.SigContext):
    """A subclass: the C entry leaves it to the Python path."""
    __slots__ = ()


def python_path_only(monkeypatch, cls):
    """Make the engine's Python path refuse, so a call that still works was taken by the C entry."""
    def refuse(*args, **kw):
        raise AssertionError("the Python path ran")
    monkeypatch.setattr(cls, "exec", refuse)


def shape(stop, g):
    """What a stop says, independent of where things are mapped."""
    regs = stop.ctx.as_dict()
    for name in ("rip", "rcx"):
        regs[name] -= g.code
    regs["rsp"] -= g.stack_top
    info = stop.siginfo
    return (stop.reason, stop.signo, stop.syscall, info.code, info.errno, info.syscall, info.arch,
            sorted(regs.items()), stop.ctx.fpstate is not None)


@pytest.fixture
def attached(spawn):
    """A waiting victim with the agent attached; afterwards the victim must be unharmed."""
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        yield v, space
    v.send(b"x")
    assert v.readline().startswith("done 1")


@pytest.fixture
def stub_space():
    s = pvmexec.Space.create()
    try:
        yield s
    finally:
        s.detach()


def run_both_paths(space, g, start, fix):
    """Three stops through the C entry, the same three through the Python path (a SigContext subclass)."""
    shapes = []
    for make in (pvmexec.SigContext, Context):
        ctx = make(**start.as_dict())
        ctx.fpstate = space.initial_fpstate()
        out = []
        for _ in range(3):
            stop = space.exec(ctx)
            out.append(shape(stop, g))
            ctx = make(**stop.ctx.as_dict())
            ctx.fpstate = stop.ctx.fpstate
            fix(ctx)
        shapes.append(out)
    return shapes


def test_exec_entry_and_python_path_give_the_same_stops(stub_space):
    with Guest(stub_space) as g:
        fast, slow = run_both_paths(stub_space, g, g.context("syscall_loop", rdi=789),
                                    lambda ctx: setattr(ctx, "rax", 456))
        assert fast == slow and fast[0][2] == 123 and fast[0][0] == pvmexec.StopReason.SYSCALL
        fast, slow = run_both_paths(stub_space, g, g.context("fault_loop", rdi=g.data, rsi=7),
                                    lambda ctx: (setattr(ctx, "rax", g.data), setattr(ctx, "rcx", 7)))
        assert fast == slow and fast[0][1] == signal.SIGSEGV and fast[0][0] == pvmexec.StopReason.SIGNAL


def test_exec_entry_takes_the_plain_calls(stub_space, monkeypatch):
    with Guest(stub_space) as g:
        stub_space.exec(g.context("syscall_loop", rdi=1))           # (the site gets patched)
        python_path_only(monkeypatch, StubEngine)
        stop = stub_space.exec(g.context("syscall_loop", rdi=2))
        assert stop.syscall == 123 and stop.ctx.rdi == 2
        stop = stub_space.exec(g.context("syscall_loop", rdi=3), sigmask=pvmexec.ALL_SIGNALS - {signal.SIGINT})
        assert stop.syscall == 123
        # Everything else is the Python path's: a subclass, a sigmask that is not a frozenset, a guest thread
        # other than 0, a bad FPU state (the Python path words the error).
        for call in (lambda: stub_space.exec(Context(**g.context("syscall_loop").as_dict())),
                     lambda: stub_space.exec(g.context("syscall_loop"), sigmask=[signal.SIGSEGV]),
                     lambda: stub_space.exec(g.context("syscall_loop"), thread=1)):
            with pytest.raises(AssertionError, match="the Python path ran"):
                call()
    monkeypatch.undo()
    with Guest(stub_space) as g:
        ctx = g.context("syscall_loop")
        ctx.fpstate = b"\0" * 100
        with pytest.raises(ValueError, match="fpstate must be 512"):
            stub_space.exec(ctx)


def test_signal_outside_sigmask_reaches_the_caller_through_the_entry(stub_space):
    got = []
    old = signal.signal(signal.SIGTRAP, lambda s, f: got.append(s))
    try:
        with Guest(stub_space) as g:
            stop = stub_space.exec(g.context("int3"), sigmask=pvmexec.ALL_SIGNALS - {signal.SIGTRAP})
            assert stop.signo == signal.SIGTRAP and got == [signal.SIGTRAP]
            stop = stub_space.exec(g.context("int3"))              # in the mask: reported, not delivered
            assert stop.signo == signal.SIGTRAP and got == [signal.SIGTRAP]
    finally:
        signal.signal(signal.SIGTRAP, old)


def test_exec_entry_after_kill_and_detach(stub_space):
    with Guest(stub_space) as g:
        assert stub_space.exec(g.context("syscall_loop")).syscall == 123
        entry = stub_space.backend.fast_exec
        assert entry is not None
    stub_space.kill()
    assert entry.closed
    with pytest.raises(pvmexec.TargetGone):
        stub_space.exec(pvmexec.SigContext(rip=0x1000, rsp=0x2000))
    stub_space.detach()
    with pytest.raises(ValueError, match="detached"):
        stub_space.exec(pvmexec.SigContext(rip=0x1000, rsp=0x2000))


def test_helper_entry_runs_and_a_helper_that_left_is_replaced(spawn, monkeypatch):
    from pvmexec.engines.helper import HelperEngine
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        assert space.exec(g.context("syscall_loop", rdi=5)).syscall == 123
        first = space.backend._helper
        assert space.backend.fast_exec is first.fast_exec is not None
        with monkeypatch.context() as m:
            python_path_only(m, HelperEngine)
            assert space.exec(g.context("syscall_loop", rdi=6)).ctx.rdi == 6
        first.kill()                                  # (as if it left unused, or was killed)
        stop = space.exec(g.context("syscall_loop", rdi=7))
        assert stop.syscall == 123 and stop.ctx.rdi == 7
        assert space.backend._helper is not first and space.backend.fast_exec is space.backend._helper.fast_exec
    v.send(b"x")
    assert v.readline().startswith("done 1")


# -- Space.syscall through the agent ---------------------------------------------------------------------

def test_syscall_entry_and_python_path_agree(spawn, monkeypatch):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        expect = {NR_GETPID: v.pid, NR_GETPPID: os.getpid()}
        # (Its look at the agent's seccomp state, due every millisecond, takes the Python path: not now.)
        space.backend._channel.check_at = time.monotonic_ns() + 60 * 10 ** 9
        with monkeypatch.context() as m:
            m.setattr(AgentEngine, "syscall", lambda *a: pytest.fail("the Python path ran"))
            for nr, want in expect.items():
                assert space.syscall(nr) == want and space.syscall_raw(nr) == want
            # -errno results: raw, or raised with the call's name
            assert space.syscall_raw(3, -1) == -errno.EBADF
            with pytest.raises(pvmexec.RemoteSyscallError) as e:
                space.syscall(3, (1 << 64) - 1)                     # close(-1), as an unsigned word
            assert e.value.errno == errno.EBADF and "close" in str(e.value)
        # What the entry leaves to the Python path is worded there, as before.
        with pytest.raises(OverflowError):
            space.syscall(NR_GETPID, 1 << 64)
        with pytest.raises(TypeError):
            space.syscall(NR_GETPID, 1.5)
        with pytest.raises(TypeError, match="at most 6"):
            space.syscall(NR_GETPID, 1, 2, 3, 4, 5, 6, 7)
        with pytest.raises(ValueError, match="x32"):
            space.syscall(0x40000000 | NR_GETPID)
        assert space.syscall("getpid") == v.pid and space.syscall_raw("close", -1) == -errno.EBADF
        fd = space.syscall("openat", -100, "/proc/self/stat", os.O_RDONLY)   # a string: the Python path
        assert space.syscall("close", fd) == 0
    with pytest.raises(ValueError, match="detached"):
        space.syscall(NR_GETPID)
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_caller_threads_take_turns_in_the_agents_slot(attached):
    """Several caller threads at once: each gets its own call's answer (one request in the slot at a time)."""
    v, space = attached
    errors = []
    answers = {NR_GETPID: v.pid, NR_GETPPID: os.getpid(), NR_GETTID: space.backend.agent_tid}

    def caller(nr, raw):
        try:
            for _ in range(2000):
                got = space.syscall_raw(nr) if raw else space.syscall(nr)
                if got != answers[nr]:
                    errors.append((nr, got))
                    return
        except Exception as e:
            errors.append(e)

    threads = [threading.Thread(target=caller, args=(nr, i % 2)) for i, nr in enumerate(answers)]
    threads += [threading.Thread(target=caller, args=(NR_GETPID, 0))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads)
    assert errors == []


def test_a_call_inside_a_call_on_one_thread_is_refused(attached):
    """A thread whose request is in the slot (e.g. a signal handler that runs during the wait) cannot post
    another over it: a clear error, and the first request is unharmed."""
    v, space = attached
    channel = space.backend._channel
    channel.acquire()
    try:
        with pytest.raises(RuntimeError, match="already in flight on this thread"):
            space.syscall(NR_GETPID)
    finally:
        channel.release()
    assert space.syscall(NR_GETPID) == v.pid


def test_signal_guard_counts_the_entrys_calls(attached):
    """A fast call is an operation for the signal guard (what SIGTERM waits for), as a Python-path one."""
    _v, space = attached
    seen = []
    ts = space.syscall("mmap", 0, 4096, 3, 0x22, -1, 0)
    space.write(ts, struct.pack("<qq", 0, 200_000_000))
    old = signal.signal(signal.SIGALRM, lambda s, f: seen.append(_core.guard_counts()))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.02)
        assert space.syscall(35, ts, 0) == 0            # nanosleep(0.2 s) by the agent: the handler runs meanwhile
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
    space.syscall("munmap", ts, 4096)
    assert seen == [(1, 1)]                             # one operation, the main thread's
    assert _core.guard_counts() == (0, 0)


# -- SigContext registers (a C descriptor) -----------------------------------------------------------------

def test_registers_are_64_bit_words_of_the_block():
    ctx = pvmexec.SigContext(rax=5)
    ctx.rbx = -1
    assert ctx.rbx == (1 << 64) - 1 and ctx.rax == 5
    ctx.rcx = (1 << 70) | 3                           # masked to 64 bits, as before
    assert ctx.rcx == 3
    ctx.rdx = True
    assert ctx.rdx == 1
    words = ctx._words()
    assert words[current().REG_INDEX["rax"]] == 5 and words[current().REG_INDEX["rbx"]] == (1 << 64) - 1
    for bad in ("x", 1.5, None):
        with pytest.raises(TypeError):
            ctx.rax = bad
    with pytest.raises(AttributeError):
        del ctx.rax
    assert Context(rsi=9).rsi == 9 and Context(rsi=9).copy().rsi == 9


# -- process_vm_exec on the helper's entry, and fork ----------------------------------------------------

def test_process_vm_exec_entry_updates_ctx_and_siginfo_as_the_python_path(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space, Guest(space) as g:
        runs = {}
        for engine in ("ptrace", "agent"):
            ctx = g.context("syscall_loop", rdi=789)
            ctx.fpstate = space.initial_fpstate()
            info = pvmexec.SigInfo()
            out = []
            for i in range(4):
                assert pvmexec.process_vm_exec(v.pid, ctx, 0, info, None, engine=engine) == 0
                out.append(shape(pvmexec.Stop(ctx.copy(), info, pvmexec.StopReason.SYSCALL), g)[3:] +
                           (info.signo, len(ctx.fpstate) >= 512))       # (xstate sizes differ: AMX under ptrace)
                ctx.rax = 456
            runs[engine] = out
            if engine == "agent":
                assert pvmexec.vmexec._held[(v.pid, "agent")].space.backend.fast_exec is not None
            # A fault outside the mask: delivered to us, siginfo left as it was.
            got = []
            old = signal.signal(signal.SIGTRAP, lambda s, f: got.append(s))
            try:
                before = (info.signo, info.syscall)
                ctx = g.context("int3")
                pvmexec.process_vm_exec(v.pid, ctx, 0, info, pvmexec.ALL_SIGNALS - {signal.SIGTRAP}, engine=engine)
                assert got == [signal.SIGTRAP] and (info.signo, info.syscall) == before
                pvmexec.process_vm_exec(v.pid, g.context("int3"), 0, info, None, engine=engine)
                assert info.signo == signal.SIGTRAP and got == [signal.SIGTRAP]
            finally:
                signal.signal(signal.SIGTRAP, old)
            pvmexec.process_vm_exec_release(v.pid)
        assert runs["agent"] == runs["ptrace"] and runs["agent"][0][2] == 123
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_a_forked_caller_never_touches_the_parents_attachment(spawn):
    """A fork of the caller copies its Spaces, not its attachments: the child is refused with a clear
    error, and dropping the copies (the collector, its exit) detaches nothing of the parent's."""
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        assert space.syscall(NR_GETPID) == v.pid
        child = os.fork()
        if child == 0:
            status = 1
            try:
                try:
                    space.syscall(NR_GETPID)
                except ValueError as e:
                    status = 0 if "parent process" in str(e) else 2
                space.detach()
                del space
                import gc
                gc.collect()
            finally:
                os._exit(status)
        _, status = os.waitpid(child, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        assert space.syscall(NR_GETPID) == v.pid           # the agent is still ours, and still there
        assert space.syscall(NR_GETPPID) == os.getpid()
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_process_vm_exec_syscall_entry(spawn, monkeypatch):
    """PROCESS_VM_EXEC_SYSCALL on the agent's slot: the result in ctx's result register; a call of the
    caller's descriptors still goes the Python way (the caller's table, the target's memory)."""
    from pvmexec import vmexec
    v = spawn("wait")
    ctx = pvmexec.SigContext(rax=NR_GETPID)
    assert pvmexec.process_vm_exec(v.pid, ctx, vmexec.PROCESS_VM_EXEC_SYSCALL, engine="agent") == 0   # attaches
    assert ctx.rax == v.pid
    # (The look at the agent's seccomp state, due every millisecond, takes the Python path: not now.)
    vmexec._held[(v.pid, "agent")].space.backend._channel.check_at = time.monotonic_ns() + 60 * 10 ** 9
    try:
        real = vmexec.syscall_with_callers_fds
        with monkeypatch.context() as m:
            m.setattr(vmexec, "syscall_with_callers_fds",
                      lambda space, nr, args: real(space, nr, args) if nr in vmexec._DESCRIPTOR_CALLS
                      else pytest.fail("the Python path ran"))
            for nr, want in ((NR_GETPPID, os.getpid()), (NR_GETPID, v.pid)):
                ctx = pvmexec.SigContext(rax=nr)
                pvmexec.process_vm_exec(v.pid, ctx, vmexec.PROCESS_VM_EXEC_SYSCALL, engine="agent")
                assert ctx.rax == want
            r, w = os.pipe()
            try:
                ctx = pvmexec.SigContext(rax=3, rdi=w)              # close(w): in our table, not the target's
                pvmexec.process_vm_exec(v.pid, ctx, vmexec.PROCESS_VM_EXEC_SYSCALL, engine="agent")
                assert ctx.rax == 0
                with pytest.raises(OSError):
                    os.fstat(w)
            finally:
                os.close(r)
            ctx = pvmexec.SigContext(rax=3, rdi=(1 << 64) - 1)     # close(-1): -EBADF, unsigned in rax
            pvmexec.process_vm_exec(v.pid, ctx, vmexec.PROCESS_VM_EXEC_SYSCALL, engine="agent")
            assert ctx.rax == (1 << 64) - errno.EBADF
        with pytest.raises(ValueError, match="x32"):              # refused by the Python path, as before
            pvmexec.process_vm_exec(v.pid, pvmexec.SigContext(rax=0x40000000 | NR_GETPID),
                                    vmexec.PROCESS_VM_EXEC_SYSCALL, engine="agent")
        ctx = pvmexec.SigContext(rax=NR_GETPID)
        pvmexec.process_vm_exec(v.pid, ctx, vmexec.PROCESS_VM_EXEC_SYSCALL, engine="agent")
        assert ctx.rax == v.pid
    finally:
        pvmexec.process_vm_exec_release(v.pid)
    v.send(b"x")
    assert v.readline().startswith("done 1")
