"""Ports of the four selftests of the process_vm_exec patch set, with their exact semantics."""
import ctypes
import os
import select
import signal
import struct

import pytest

import pvmexec
from pvmexec import PROCESS_VM_EXEC_SYSCALL, SigContext, SigInfo, process_vm_exec, process_vm_exec_release, _core
from pvmexec.guest import Guest
from pvmexec.engines.ptrace import SYSCALL_STOP
from conftest import snapshot

TEST_SYSCALL, TEST_SYSCALL_RET, TEST_MARKER = 123, 456, 789
SIGSEGV_BIT = 1 << (signal.SIGSEGV - 1)
SIGSYS_BIT = 1 << (signal.SIGSYS - 1)


def fsgid(v):
    return int(v.status()["Gid"].split()[3])


@pytest.mark.parametrize("engine", ["ptrace", "agent"])
def test_process_vm_exec_syscall_loop(spawn, engine):
    """Selftest 1: guest loops syscall(123, marker), aborting unless 456 comes back. ptrace: on a
    stopped target (it stays stopped); agent: mode 1 in its helper process, the target running."""
    v = spawn("wait")
    if engine == "ptrace":
        os.kill(v.pid, signal.SIGSTOP)
        v.wait_state("T")
    fsgid_before = fsgid(v)
    with pvmexec.attach(v.pid, engine="ptrace") as space, Guest(space) as guest:
        before = snapshot(v.pid)
        ctx = guest.context("syscall_loop", rdi=TEST_MARKER)
        info = SigInfo()
        for i in range(300):                # one attachment for all the calls
            assert process_vm_exec(v.pid, ctx, 0, info, SIGSYS_BIT | SIGSEGV_BIT, engine=engine) == 0
            assert info.signo == signal.SIGSYS, info
            assert info.syscall == TEST_SYSCALL and info.arch == 0xC000003E
            assert info.call_addr == ctx.rip           # after the syscall instruction
            assert ctx.rdi == TEST_MARKER
            ctx.rax = TEST_SYSCALL_RET
        process_vm_exec_release(v.pid)
        assert snapshot(v.pid) == before
    # The trapped setfsgid(789) was emulated, never run: the child's fsgid is untouched.
    assert fsgid(v) == fsgid_before
    if engine == "ptrace":
        v.wait_state("T")                 # a SIGSTOPped target stays stopped (back in its group stop)
        os.kill(v.pid, signal.SIGCONT)
    v.send(b"x")
    assert v.readline().startswith("done 1 usr1 0")
    assert v.wait() == 0


def test_process_vm_exec_wrong_answer_is_seen(spawn):
    """The guest really checks the answer: a wrong rax makes it execute ud2 (SIGILL)."""
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space, Guest(space) as guest:
        ctx = guest.context("syscall_loop", rdi=TEST_MARKER)
        info = SigInfo()
        process_vm_exec(v.pid, ctx, 0, info, None)
        ctx.rax = 1
        process_vm_exec(v.pid, ctx, 0, info, None)
        assert info.signo == signal.SIGILL
        process_vm_exec_release(v.pid)


@pytest.mark.parametrize("engine", ["ptrace", "agent"])
def test_process_vm_exec_fault(spawn, engine):
    """Selftest 2: stores to 1..7 fault; fixed registers make the store land in the child."""
    v = spawn("wait")
    value = 0xAABBCCDDEE
    with pvmexec.attach(v.pid, engine="ptrace") as space, Guest(space) as guest:
        ctx = guest.context("fault_loop", rdi=guest.data, rsi=value)
        info = SigInfo()
        for i in range(210):
            process_vm_exec(v.pid, ctx, 0, info, SIGSEGV_BIT, engine=engine)
            assert info.signo == signal.SIGSEGV, info
            expected = i % 7 + 1
            assert ctx.rax == expected and info.addr == expected
            assert ctx.rip == guest.address("fault_store")    # at the faulting instruction
            ctx.rax = guest.data
            ctx.rcx = value
        # The last fixed store landed in the child's memory (the guest clears it only after the check).
        process_vm_exec(v.pid, ctx, 0, info, SIGSEGV_BIT, engine=engine)
        assert info.signo == signal.SIGSEGV and ctx.rax == 1
        assert space.read(guest.data, 8) == bytes(8)
        process_vm_exec_release(v.pid)
    v.send(b"x")
    assert v.readline().startswith("done 1")


@pytest.mark.parametrize("engine", ["ptrace", "agent"])
def test_process_vm_exec_syscall_mode_uses_callers_fd_and_targets_memory(engine):
    """Selftest 3: write(p[1], &test_val, 4) with a pipe only the caller has and memory only the child has."""
    test_val = ctypes.c_uint32(0x1E511E51)
    ready_r, ready_w = os.pipe()
    go_r, go_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            test_val.value = 0xC0FFEE11
            os.write(ready_w, b"r")
            os.read(go_r, 1)
        finally:
            os._exit(0)
    try:
        assert select.select([ready_r], [], [], 10)[0]
        assert os.read(ready_r, 1) == b"r"
        test_val.value = 0x5AFE5AFE
        p_r, p_w = os.pipe()                 # created after fork: exists only in the caller
        fds_before = sorted(os.listdir("/proc/%d/fd" % pid))
        ctx = SigContext(rax=1, rdi=p_w, rsi=ctypes.addressof(test_val), rdx=4)
        assert process_vm_exec(pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine) == 0
        assert ctx.rax == 4
        assert struct.unpack("<I", os.read(p_r, 4))[0] == 0xC0FFEE11
        process_vm_exec_release(pid)                    # (the attachment's own descriptor goes with it)
        assert sorted(os.listdir("/proc/%d/fd" % pid)) == fds_before
        # A descriptor the caller does not have is an error in the caller's table.
        ctx = SigContext(rax=1, rdi=p_w + 50, rsi=ctypes.addressof(test_val), rdx=4)
        try:
            process_vm_exec(pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine)
        except OSError as e:
            assert e.errno == 9
        else:
            raise AssertionError("EBADF expected")
        process_vm_exec_release(pid)
        os.close(p_r)
        os.close(p_w)
    finally:
        os.write(go_w, b"x")
        _, status = os.waitpid(pid, 0)
        for fd in (go_r, go_w, ready_r, ready_w):
            os.close(fd)
    assert os.waitstatus_to_exitcode(status) == 0


def test_ptrace_sysemu_baseline(spawn):
    """Selftest 4: the same syscall loop driven with PTRACE_SYSEMU from a C loop (the benchmark's baseline)."""
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space, Guest(space) as guest:
        ctx = guest.context("syscall_loop", rdi=TEST_MARKER)
        stop = space.exec(ctx)
        with space.borrowed():
            regs = bytearray(stop.ctx._buf)
            q = memoryview(regs).cast("Q")
            q[10] = TEST_SYSCALL_RET
            q[15] = (1 << 64) - 1
            done, ns, code, status = _core.loop(space._engine.tid, 0, regs, 2000, TEST_SYSCALL, TEST_SYSCALL_RET, False)
            assert done == 2000 and status == SYSCALL_STOP and ns > 0
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_process_vm_exec_syscall_mode_new_descriptors_land_in_the_caller(spawn):
    """Under the proposal's semantics a descriptor a call creates belongs to the caller's table."""
    v = spawn("wait")
    before = snapshot(v.pid)
    with pvmexec.attach(v.pid, engine="ptrace") as space, space.scratch(64) as mem:
        space.write(mem, b"/proc/self/status\0")
        ctx = SigContext(rax=257, rdi=(1 << 64) - 100, rsi=mem, rdx=os.O_RDONLY)   # openat(AT_FDCWD, ...)
        process_vm_exec(v.pid, ctx, PROCESS_VM_EXEC_SYSCALL)
        fd = ctx.rax
        try:
            # The target opened its own /proc/self/status; the descriptor is ours now.
            assert "Pid:\t%d" % v.pid in os.read(fd, 4096).decode()
        finally:
            os.close(fd)
        ctx = SigContext(rax=293, rdi=mem + 32, rsi=os.O_CLOEXEC)                # pipe2(&fds, O_CLOEXEC)
        process_vm_exec(v.pid, ctx, PROCESS_VM_EXEC_SYSCALL)
        assert ctx.rax == 0
        r, w = struct.unpack("<ii", space.read(mem + 32, 8))
        try:
            os.write(w, b"pipe")
            assert os.read(r, 4) == b"pipe"
        finally:
            os.close(r)
            os.close(w)
        # Pure descriptor-table calls act on the caller's table too.
        ctx = SigContext(rax=3, rdi=4_000)                                         # close(4000)
        process_vm_exec(v.pid, ctx, PROCESS_VM_EXEC_SYSCALL)
        assert ctx.rax == (1 << 64) - 9                                            # -EBADF
    process_vm_exec_release(v.pid)
    assert snapshot(v.pid) == before


@pytest.mark.parametrize("engine", ["auto", "ptrace"])
def test_process_vm_exec_keeps_one_attachment_across_calls(spawn, engine):
    """Called in a loop, as the proposal's selftests do, process_vm_exec attaches once: every call answers
    for the right process, nothing of ours stays once released, and a process that ended is never
    taken for another (the next call says it is gone, and attaches anew for a new process)."""
    v = spawn("wait")
    before = snapshot(v.pid)
    for _ in range(500):
        ctx = SigContext(rax=39)                                                  # getpid
        assert process_vm_exec(v.pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine) == 0
        assert ctx.rax == v.pid
    process_vm_exec_release(v.pid)
    assert snapshot(v.pid) == before
    ctx = SigContext(rax=39)
    process_vm_exec(v.pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine)             # held again
    v.proc.kill()
    v.proc.wait(10)
    with pytest.raises(pvmexec.TargetGone):
        process_vm_exec(v.pid, SigContext(rax=39), PROCESS_VM_EXEC_SYSCALL, engine=engine)
    w = spawn("wait")
    ctx = SigContext(rax=39)
    process_vm_exec(w.pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine)
    assert ctx.rax == w.pid
    process_vm_exec_release()
    w.send(b"x")
    assert w.readline().startswith("done 1")
