"""Bad input gets a clear error naming what was wrong, and nothing is left behind."""
import contextlib
import errno
import struct
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

import pvmexec
from pvmexec import (AlreadyTraced, InvalidContext, PROCESS_VM_EXEC_SYSCALL, RemoteSyscallError,
                     SigContext, TargetGone, UnsupportedTarget, process_vm_exec)
from pvmexec import proc
from pvmexec.guest import Guest
from conftest import snapshot


def free_pid():
    pid = 4_000_000
    while os.path.exists("/proc/%d" % pid):
        pid -= 1
    return pid


def test_no_such_process():
    pid = free_pid()
    with pytest.raises(TargetGone) as e:
        pvmexec.attach(pid)
    assert e.value.errno == errno.ESRCH and "no such process: %d" % pid in str(e.value)
    assert isinstance(e.value, ProcessLookupError)


def test_zombie(spawn):
    v = spawn("wait")
    os.kill(v.pid, signal.SIGKILL)
    v.wait_state("Z")
    with pytest.raises(TargetGone, match="zombie"):
        pvmexec.attach(v.pid, engine="ptrace")


def test_self_and_kernel_thread():
    with pytest.raises(UnsupportedTarget, match="calling process itself"):
        pvmexec.attach(os.getpid())
    with pytest.raises(UnsupportedTarget, match="kernel thread"):
        pvmexec.attach(2)


def test_argument_types():
    with pytest.raises(TypeError):
        pvmexec.attach("1")
    with pytest.raises(ValueError):
        pvmexec.attach(0)
    with pytest.raises(TypeError):
        pvmexec.attach()
    with pytest.raises(ValueError, match="engine"):
        pvmexec.attach(1, engine="magic")


TRACER = textwrap.dedent("""
    import sys
    from pvmexec import _core
    _core.ptrace(0x4206, int(sys.argv[1]), 0, 0)
    print("seized", flush=True)
    sys.stdin.read()
""")


def test_already_traced(spawn):
    v = spawn("wait")
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(v.pid)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline() == "seized\n"
        with pytest.raises(AlreadyTraced) as e:
            pvmexec.attach(v.pid, engine="ptrace")
        assert e.value.tracer == tracer.pid and str(tracer.pid) in str(e.value)
        assert isinstance(e.value, PermissionError)
    finally:
        tracer.stdin.close()
        tracer.wait(10)
        tracer.stdout.close()
    # The other tracer left; we can attach now and the target is fine.
    with pvmexec.attach(v.pid, engine="ptrace") as space:
        assert space.syscall("getpid") == v.pid


def test_a_tracer_of_one_other_thread_is_named(spawn):
    v = spawn("threads")                                 # a worker thread beside the main one
    worker = max(int(t) for t in os.listdir("/proc/%d/task" % v.pid))
    assert worker != v.pid
    tracer = subprocess.Popen([sys.executable, "-c", TRACER, str(worker)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert tracer.stdout.readline() == "seized\n"
        with pytest.raises(AlreadyTraced, match="its thread %d\\) by process %d" % (worker, tracer.pid)):
            pvmexec.attach(v.pid, engine="ptrace", thread=v.pid)
    finally:
        tracer.stdin.close()
        tracer.wait(10)
        tracer.stdout.close()


def test_a_second_attachment_from_this_process_says_so(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace", freeze=True):
        with pytest.raises(AlreadyTraced, match="this process already traces it"):
            pvmexec.attach(v.pid, engine="ptrace")


UNPRIVILEGED = textwrap.dedent("""
    import os, sys
    import pvmexec            # before dropping privileges: the interpreter may live under /root
    os.setgroups([]); os.setgid(65534); os.setuid(65534)
    try:
        pvmexec.attach(int(sys.argv[1]))
    except pvmexec.AccessDenied as e:
        print("denied:", e)
""")


def test_unprivileged_caller_gets_the_reason(spawn):
    if os.geteuid() != 0:
        pytest.skip("needs root to switch to an unprivileged uid")
    v = spawn("wait")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(p for p in sys.path if p))
    out = subprocess.run([sys.executable, "-c", UNPRIVILEGED, str(v.pid)], capture_output=True, text=True,
                         timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert "denied: not permitted to trace process %d" % v.pid in out.stdout
    assert "uid 0/0/0" in out.stdout and "CAP_SYS_PTRACE" in out.stdout
    assert v.status()["TracerPid"] == "0"


def test_pidfd(spawn):
    v = spawn("wait")
    fd = os.pidfd_open(v.pid)
    try:
        with pvmexec.attach(pidfd=fd, engine="ptrace") as space:
            assert space.syscall("getpid") == v.pid
        v.kill()
        with pytest.raises(TargetGone):
            pvmexec.attach(pidfd=fd, engine="ptrace")
    finally:
        os.close(fd)


def test_remote_errors_are_named(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space:
        with pytest.raises(RemoteSyscallError) as e:
            space.syscall("openat", -100, "/nonexistent/path", 0, 0)
        assert e.value.errno == errno.ENOENT and e.value.syscall == "openat"
        assert "ENOENT" in str(e.value)
        assert space.syscall_raw("close", 9999) == -errno.EBADF
        with pytest.raises(ValueError, match="unknown x86-64 system call"):
            space.syscall("no_such_call")
        with pytest.raises(ValueError, match="x32"):
            space.syscall(0x40000000 | 39)
        with pytest.raises(TypeError):
            space.syscall("getpid", 1.5)
    with pytest.raises(ValueError, match="detached"):
        space.syscall("getpid")


def test_unimplemented_syscall_number(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space:
        with pytest.raises(RemoteSyscallError) as e:
            space.syscall(470)
        assert e.value.errno == errno.ENOSYS


def test_invalid_register_state_is_refused_before_touching_the_target(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space, Guest(space) as g:
        before = snapshot(v.pid)
        for bad, match in ((dict(cs=0x23), "32-bit"), (dict(cs=0x10), "cs="), (dict(ss=0), "ss="),
                           (dict(fs_base=1 << 60), "fs_base"), (dict(rip=0xffffffff81000000), "rip"),
                           (dict(ds=0x10), "ds")):
            ctx = g.context("syscall_loop", **bad)
            with pytest.raises(InvalidContext, match=match):
                space.exec(ctx)
        assert snapshot(v.pid) == before
    with pytest.raises(TypeError):
        SigContext(orig_rax=1)


def test_process_vm_exec_argument_checks(spawn):
    v = spawn("wait")
    ctx = SigContext(rax=39)
    for kw in (dict(flags=2), dict(sizemask=16)):
        with pytest.raises(OSError) as e:
            process_vm_exec(v.pid, ctx, **kw)
        assert e.value.errno == errno.EINVAL
    with pytest.raises(TargetGone):
        process_vm_exec(free_pid(), ctx, PROCESS_VM_EXEC_SYSCALL)
    assert process_vm_exec(v.pid, ctx, PROCESS_VM_EXEC_SYSCALL) == 0
    assert ctx.rax == v.pid


def test_elf_class_check():
    from pvmexec.proc import check_elf_header
    x32 = b"\x7fELF\x01\x01\x01" + bytes(9) + b"\x02\x00\x3e\x00"
    i386 = b"\x7fELF\x01\x01\x01" + bytes(9) + b"\x02\x00\x03\x00"
    arm64 = b"\x7fELF\x02\x01\x01" + bytes(9) + b"\x02\x00\xb7\x00"
    with pytest.raises(UnsupportedTarget, match="x32"):
        check_elf_header(1, x32)
    with pytest.raises(UnsupportedTarget, match="32-bit"):
        check_elf_header(1, i386)
    with pytest.raises(UnsupportedTarget, match="machine 183"):
        check_elf_header(1, arm64)
    with open(sys.executable, "rb") as f:
        check_elf_header(1, f.read(20))         # this interpreter is fine


CAN_READ_FILTERS = proc.has_cap(21)           # CAP_SYS_ADMIN: PTRACE_SECCOMP_GET_FILTER needs it


def test_seccomp_filter_is_respected(spawn):
    v = spawn("seccomp")
    with pvmexec.attach(v.pid, engine="ptrace") as space:
        if not CAN_READ_FILTERS:
            # Unprivileged: the filters cannot be read, so nothing is injected, with the reason.
            with pytest.raises(pvmexec.SeccompBlocked, match="cannot be read.*CAP_SYS_ADMIN.*check_seccomp=False"):
                space.syscall("getpid")
    if not CAN_READ_FILTERS:
        with pvmexec.attach(v.pid, engine="ptrace", check_seccomp=False) as space:   # the user's own risk
            assert space.syscall("getpid") == v.pid
            assert space.syscall_raw("getuid") == -errno.EPERM                   # the filter's own answer
    else:
        with pvmexec.attach(v.pid, engine="ptrace") as space:
            assert space.syscall("getpid") == v.pid
            with pytest.raises(pvmexec.SeccompBlocked, match="kill the process"):
                space.syscall("getppid")
            with pytest.raises(pvmexec.SeccompBlocked, match="SIGSYS"):
                space.syscall("getgid")
            # ERRNO verdicts are answered as the target would get them, without running the call.
            assert space.syscall_raw("getuid") == -errno.EPERM
            assert space.syscall("getpid") == v.pid
    v.send(b"x")
    assert v.readline().startswith("done 1 usr1 0")
    assert v.wait() == 0


def test_seccomp_strict_mode_is_respected(spawn):
    v = spawn("strict")
    time.sleep(0.05)
    with pvmexec.attach(v.pid, engine="ptrace") as space:
        with pytest.raises(pvmexec.SeccompBlocked, match="strict"):
            space.syscall("getpid")
    v.send(b"x")
    assert v.readline() == "strict ok"
    assert v.wait() == 0


def test_32bit_process_is_refused(tmp_path):
    # A minimal static i386 program: pause() in a loop through int $0x80.
    code = bytes([0xB8, 29, 0, 0, 0, 0xCD, 0x80, 0xEB, 0xF7])
    base, eh, ph = 0x08048000, 52, 32
    header = struct.pack("<4sBBBB8sHHIIIIIHHHHHH", b"\x7fELF", 1, 1, 1, 0, bytes(8), 2, 3, 1,
                         base + eh + ph, eh, 0, 0, eh, ph, 1, 0, 0, 0)
    size = eh + ph + len(code)
    prog = header + struct.pack("<IIIIIIII", 1, 0, base, base, size, size, 5, 0x1000) + code
    exe = tmp_path / "i386"
    exe.write_bytes(prog)
    exe.chmod(0o755)
    p = subprocess.Popen([str(exe)])
    try:
        deadline = time.monotonic() + 5
        while open("/proc/%d/stat" % p.pid).read().rsplit(")", 1)[1].split()[0] != "S":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        with pytest.raises(UnsupportedTarget, match="32-bit"):
            pvmexec.attach(p.pid)
        assert "TracerPid:\t0" in open("/proc/%d/status" % p.pid).read()
    finally:
        p.kill()
        p.wait(10)


def test_target_exiting_between_operations(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="ptrace") as space:
        assert space.syscall("getpid") == v.pid
        v.send(b"x")
        assert v.wait() == 0
        with pytest.raises(TargetGone):
            space.syscall("getpid")


def test_memory_errors_are_domain_errors(spawn):
    v = spawn("wait")
    space = pvmexec.attach(v.pid, engine="ptrace")
    try:
        with pytest.raises(OSError, match="at 0x10 in process %d" % v.pid) as e:
            space.read(0x10, 8)
        assert e.value.errno == errno.EFAULT
        with pytest.raises(OSError, match="at 0x10 in process"):
            space.write(0x10, b"x")
        with pytest.raises(ValueError):
            space.read(-1, 8)
        with pytest.raises(TypeError):
            space.read("0x10", 8)
        v.kill()
        with pytest.raises(TargetGone):
            space.read(0x400000, 8)
    finally:
        with contextlib.suppress(TargetGone):
            space.detach()


@pytest.mark.parametrize("engine", ["ptrace", "agent"])
def test_map_anonymous_checks_its_length_and_detach_removes_what_is_left(spawn, engine):
    v = spawn("wait")
    before = snapshot(v.pid)
    with pvmexec.attach(v.pid, engine=engine) as space:
        for bad, kind in (("4096", TypeError), (True, TypeError), (4096.0, TypeError), (0, ValueError),
                          (-4096, ValueError), (1 << 60, ValueError)):
            with pytest.raises(kind):
                space.map_anonymous(bad)
        kept = space.map_anonymous(10000)                   # left for detach to remove
        gone = space.map_anonymous(4096)
        space.write(kept, b"x" * 10000)
        assert space.read(kept + 9999, 1) == b"x"
        assert any(lo <= kept and kept + 12288 <= hi and perms.startswith("rw") for lo, hi, perms, _p in
                   proc.mappings(v.pid))
        space.syscall("munmap", gone, 4096)
        space.untrack_mapping(gone)
    assert snapshot(v.pid) == before
