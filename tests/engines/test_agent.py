"""The agent engine on live processes: the target runs free, nothing is left behind."""
import errno
import os
import re
import signal
import subprocess
import sys
import struct
import textwrap
import threading
import time
import warnings

import pytest

import pvmexec
from pvmexec.engines.ptrace import TRAMPOLINE_SIZE
from pvmexec import proc
from pvmexec.guest import Guest
from pvmexec.vmexec import syscall_with_callers_fds
from conftest import Running, compile_victim, kill_caller_after_first_line, snapshot


def task_state(pid, tid):
    with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_attach_runs_free_and_detach_leaves_no_trace(spawn):
    v = spawn("threads")
    before = snapshot(v.pid)
    space = pvmexec.attach(v.pid, engine="agent")
    try:
        assert space.engine == "agent"
        st = v.status()
        assert st["TracerPid"] == "0"
        agent = space._engine.agent_tid
        assert str(agent) in os.listdir("/proc/%d/task" % v.pid)
        assert space.syscall("getpid") == v.pid
        assert space.syscall("gettid") == agent
        assert space.syscalls([("getpid", ()), ("getppid", ()), ("close", (99999,))]) == [v.pid, os.getpid(), -9]
        # 200 calls in one batch: chunked over several round trips.
        assert space.syscalls([("getpid", ())] * 200) == [v.pid] * 200
        with pytest.raises(pvmexec.RemoteSyscallError):
            space.syscall("openat", -100, "/nonexistent", 0, 0)
        # The target's own threads never stopped: the worker keeps counting.
        a = struct.unpack("<Q", space.read(v.counter_addr, 8))[0]
        time.sleep(0.05)
        assert struct.unpack("<Q", space.read(v.counter_addr, 8))[0] > a
    finally:
        space.detach()
    space.detach()                                   # idempotent
    assert snapshot(v.pid) == before
    v.send(b"x")
    assert v.readline().startswith("done 1 usr1 0")


def test_scratch_and_string_arguments_map_nothing(spawn):
    """The agent's scratch memory is a piece of its own region (mapped and recorded already): nested
    blocks get distinct pieces, string arguments use them too, and the target's maps never change."""
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        region = space._engine.region()
        maps = snapshot(v.pid)["maps"]
        with space.scratch(100) as a, space.scratch(5000) as b:
            assert region[0] <= a < a + 100 <= b < b + 5000 <= region[1]
            space.write(a, b"x" * 100)
            space.write(b, b"y" * 5000)
            assert space.read(a, 100) == b"x" * 100 and space.read(b, 5000) == b"y" * 5000
            assert space.syscall_raw("access", "/", 0) == 0
            assert snapshot(v.pid)["maps"] == maps
        with space.scratch(64) as c:
            assert c == a                               # given back, given again
        with space.scratch(1 << 20) as big:             # more than the region has: a mapping of its own
            assert not region[0] <= big < region[1]
            assert any(lo <= big < hi for lo, hi in space.own_mappings())
        assert snapshot(v.pid)["maps"] == maps
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_idle_agent_sleeps(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        space.syscall("getpid")
        agent = space._engine.agent_tid
        deadline = time.monotonic() + 5
        while True:                                   # past its spin budget, asleep on a futex
            with open("/proc/%d/task/%d/wchan" % (v.pid, agent)) as f:
                wchan = f.read()
            if task_state(v.pid, agent) == "S" and "futex" in wchan:
                break
            assert time.monotonic() < deadline, (task_state(v.pid, agent), wchan)
            time.sleep(0.01)


def test_signals_to_the_target_are_not_taken_by_the_agent(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        for _ in range(20):
            os.kill(v.pid, signal.SIGUSR1)
            space.syscall("getpid")
            time.sleep(0.001)
        agent = space._engine.agent_tid
        with open("/proc/%d/task/%d/status" % (v.pid, agent)) as f:
            blocked = int([l for l in f if l.startswith("SigBlk")][0].split()[1], 16)
        unblockable = 1 << (signal.SIGKILL - 1) | 1 << (signal.SIGSTOP - 1)
        assert blocked == (1 << 64) - 1 - unblockable
    v.send(b"x")
    line = v.readline()
    assert line.startswith("done 1 usr1 ") and int(line.split()[3]) >= 1


def syscall_loop(space, g, n, check=None):
    """n round trips of the guest's syscall loop, each stop checked (and check() true after each);
    returns the last stop."""
    ctx = g.context("syscall_loop", rdi=789)
    for _ in range(n):
        stop = space.exec(ctx)
        assert stop.syscall == 123 and stop.ctx.rdi == 789
        assert check is None or check()
        ctx = stop.ctx
        ctx.rax = 456
    return stop


def helper_of(space):
    h = space.backend._helper
    assert h is not None, "mode 1 did not start the helper (%s)" % space.backend.helper_refused
    return h


def children_of(pid):
    out = []
    for tid in os.listdir("/proc/%d/task" % pid):
        try:
            with open("/proc/%d/task/%s/children" % (pid, tid)) as f:
                out += [int(c) for c in f.read().split()]
        except FileNotFoundError:
            pass
    return out


def test_mode1_runs_in_the_helper_and_the_target_never_stops(spawn):
    v = spawn("threads")
    before = snapshot(v.pid)
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        threads = sorted(os.listdir("/proc/%d/task" % v.pid))
        # The target's main thread is never stopped.
        syscall_loop(space, g, 50, lambda: task_state(v.pid, v.pid) != "t")
        stop = space.exec(g.context("fault_loop", rdi=g.data, rsi=7))
        assert stop.signo == signal.SIGSEGV and stop.ctx.rax == 1
        # The guest's stores land in the target's own memory.
        ctx = stop.ctx
        ctx.rax, ctx.rcx = g.data, 7          # (the guest reads its store back, and traps unless it is 7)
        stop = space.exec(ctx)
        assert stop.signo == signal.SIGSEGV and stop.ctx.rax == 2
        assert v.status()["TracerPid"] == "0"
        h = helper_of(space)
        assert sorted(os.listdir("/proc/%d/task" % v.pid)) == threads    # no thread of the target's added
        with open("/proc/%d/comm" % h.pid) as f:
            assert f.read().strip() == "pvmexec-helper"
        st = proc.status(h.pid)
        assert st["PPid"].strip() == str(v.pid)
        assert os.listdir("/proc/%d/fd" % h.pid) == []                   # none of the target's descriptors
        assert int(st["Seccomp"]) == 2
        # Its own process group: a signal to the target's group (a terminal's ^C) is not its.
        assert os.getpgid(h.pid) == h.pid and os.getpgid(v.pid) != h.pid
        helper_pid = h.pid
    assert not os.path.exists("/proc/%d" % helper_pid)                   # reaped, not a zombie
    assert snapshot(v.pid) == before
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_live_patching_rewrites_only_the_callers_own_code(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        original = space.read(g.code, g.code_size)
        syscall_loop(space, g, 50)
        h = helper_of(space)
        assert h.patching == "on" and h.patched_sites == 1
        assert space.read(g.code, g.code_size) != original
        # Code the caller did not map through this Space (the target's own, as far as we know) runs
        # and traps the same, and is never rewritten: the target's threads could be running it.
        addr = space.syscall("mmap", 0, 4096, 7, 0x22, -1, 0)         # RWX, private anonymous, untracked
        code = b"\xb8\x27\x00\x00\x00\x0f\x05\x0f\x0b"              # mov $39, %eax; syscall; ud2
        space.write(addr, code)
        for _ in range(3):
            stop = space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top))
            assert stop.syscall == 39
        assert space.read(addr, len(code)) == code and h.patched_sites == 1
        space.syscall("munmap", addr, 4096)
        # A helper that ends takes its patch table with it: the sites it rewrote are put back.
        h.kill()
        assert space.read(g.code, g.code_size) == original
        stop = space.exec(g.context("syscall_loop", rdi=789))            # a new helper, patching anew
        assert stop.syscall == 123
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_two_helpers_run_the_same_patched_code(spawn):
    """A Space's helper patched the guest's site; process_vm_exec's own attachment (another agent, another
    helper, its window's range taken) runs the same code: its thread goes through the first helper's
    trampoline to the site's own syscall, and the stop is the site's, as if never patched."""
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        stop = syscall_loop(space, g, 10)
        assert helper_of(space).patched_sites == 1
        ctx = g.context("syscall_loop", rdi=789)
        info = pvmexec.SigInfo()
        for _ in range(50):
            assert pvmexec.process_vm_exec(v.pid, ctx, 0, info, None, engine="agent") == 0
            assert info.syscall == 123 and ctx.rdi == 789
            assert info.call_addr == ctx.rip == stop.ctx.rip           # the site's own return address
            ctx.rax = 456
        pvmexec.process_vm_exec_release(v.pid)
        syscall_loop(space, g, 10)                                       # and the first one goes on
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_the_helper_traps_every_syscall_where_the_patching_window_is_taken(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        taken = space.syscall("mmap", 0x050F0000, 4096, 1, 0x22 | 0x100000, -1, 0)   # MAP_FIXED_NOREPLACE
        assert taken == 0x050F0000
        try:
            syscall_loop(space, g, 20)
            h = helper_of(space)
            assert h.patching.startswith("off (the range of the patching window") and h.patched_sites == 0
        finally:
            space.syscall("munmap", taken, 4096)
    v.send(b"x")
    assert v.readline().startswith("done 1")


PIDS = "/sys/fs/cgroup/pids"


@pytest.mark.skipif(os.geteuid() != 0 or not os.path.isdir(PIDS), reason="needs root and the cgroup v1 pids controller")
def test_mode1_falls_back_to_ptrace_where_the_helper_cannot_be_started(spawn):
    group = os.path.join(PIDS, "pvmexec-test-%d" % os.getpid())
    os.mkdir(group)
    try:
        v = spawn("wait")
        with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
            with open(os.path.join(group, "cgroup.procs"), "w") as f:
                f.write(str(v.pid))
            with open(os.path.join(group, "pids.max"), "w") as f:
                f.write(str(len(os.listdir("/proc/%d/task" % v.pid))))         # no new task there
            with pytest.warns(RuntimeWarning, match="helper could not be started"):
                stop = space.exec(g.context("syscall_loop", rdi=789))
            assert stop.syscall == 123
            assert "Resource temporarily unavailable" in space.backend.helper_refused
            assert children_of(v.pid) == [] and "pvmexec-helper" not in open("/proc/%d/maps" % v.pid).read()
            ctx = stop.ctx
            ctx.rax = 456
            assert space.exec(ctx).syscall == 123                             # and on, without a new try
        v.send(b"x")
        assert v.readline().startswith("done 1")
        assert v.wait() == 0                    # reaped: an exited task keeps the group busy until then
    finally:
        with open(os.path.join(PIDS, "cgroup.procs"), "w") as f:
            for pid in open(os.path.join(group, "cgroup.procs")).read().split():
                try:
                    f.write(pid)
                    f.flush()
                except ProcessLookupError:
                    pass                        # it ended meanwhile
        for _ in range(100):                    # (the kernel lets go of an ended task's group a moment later)
            try:
                os.rmdir(group)
                break
            except OSError as e:
                if e.errno != errno.EBUSY:
                    raise
                time.sleep(0.02)
        else:
            os.rmdir(group)


def test_a_target_killed_under_a_run_is_target_gone(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        syscall_loop(space, g, 1)
        helper = helper_of(space).pid
        killer = threading.Timer(0.3, v.proc.kill)
        killer.start()
        try:
            with pytest.raises(pvmexec.TargetGone):
                space.exec(g.context("spin"))                # never stops by itself
        finally:
            killer.join()
    v.proc.wait(10)
    deadline = time.monotonic() + 5
    while os.path.exists("/proc/%d" % helper):
        assert time.monotonic() < deadline, "the helper outlived its target"
        time.sleep(0.01)


def test_ctrl_c_ends_an_endless_guest_and_the_target_goes_on(spawn):
    v = spawn("wait")
    before = snapshot(v.pid)
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        syscall_loop(space, g, 1)
        interrupt = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        interrupt.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                space.exec(g.context("spin"))
        finally:
            interrupt.join()
        syscall_loop(space, g, 5)                   # the next exec() has a new helper
    assert snapshot(v.pid) == before
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_the_targets_own_waits_never_see_the_helper(spawn):
    """wait(-1) and SIGCHLD see nothing; a wait with __WALL sees a child that does not end (0 for
    WNOHANG, where it said ECHILD before) and never reaps it; after detach all is as before."""
    v = spawn("children")
    v.send(b"?\n")
    assert v.readline() == "children wait -1/10 wall -1/10 chld 0"
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        ctx = syscall_loop(space, g, 20).ctx
        v.send(b"?\n")
        assert v.readline() == "children wait -1/10 wall 0/0 chld 0"
        space.backend._helper.kill()            # a helper that ends (killed by anyone) is not the target's
        v.send(b"?\n")
        assert v.readline() == "children wait -1/10 wall -1/10 chld 0"
        stop = space.exec(ctx)                  # a new one
        assert stop.syscall == 123
    v.send(b"?\n")
    assert v.readline() == "children wait -1/10 wall -1/10 chld 0"
    v.send(b"q\n")
    assert v.wait() == 0


@pytest.mark.parametrize("how", ["exec", "exec-after-idle", "exit"])
def test_the_helper_goes_when_the_target_execs_or_exits(spawn, how):
    v = spawn("exec")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        ctx = g.context("syscall_loop", rdi=789)
        space.exec(ctx)
        helper = helper_of(space).pid
        if how == "exec-after-idle":
            # Unused for a second, it leaves, and the agent reaps it; the next exec() starts another.
            deadline = time.monotonic() + 5
            while os.path.exists("/proc/%d" % helper):
                assert time.monotonic() < deadline, "an unused helper stayed"
                time.sleep(0.05)
            assert children_of(v.pid) == []
            stop = space.exec(ctx)
            assert stop.syscall == 123
            assert helper_of(space).pid != helper
            helper = helper_of(space).pid
            deadline = time.monotonic() + 5
            while os.path.exists("/proc/%d" % helper):
                assert time.monotonic() < deadline, "an unused helper stayed"
                time.sleep(0.05)
        if how.startswith("exec"):
            v.send(b"go\n")
            assert v.readline() == "ready %d" % v.pid
        else:
            v.proc.kill()
            v.proc.wait(10)
        deadline = time.monotonic() + 5
        while os.path.exists("/proc/%d" % helper) and proc.status(helper)["State"][0] not in "ZX":
            assert time.monotonic() < deadline, "the helper outlived its target's %s" % how
            time.sleep(0.01)
        try:
            space.detach()
        except pvmexec.TargetGone:
            pass
    if how.startswith("exec"):
        # A helper the execve found is reaped by detach (through ptrace: the agent died with the old
        # program). Its end is then the one trace the new program can see: the kernel turns the exit
        # signal of a child whose parent ran execve into SIGCHLD, if the helper dies after the execve.
        assert children_of(v.pid) == []
        v.send(b"?\n")
        line = v.readline()
        assert line.startswith("children wait -1/10 wall -1/10 chld "), line
        assert int(line.split()[-1]) <= (0 if how == "exec-after-idle" else 1), line
    deadline = time.monotonic() + 5
    while os.path.exists("/proc/%d" % helper):                          # (after exit: init reaps it)
        assert time.monotonic() < deadline, "helper %d still there" % helper
        time.sleep(0.01)


HELPER_CALLER = textwrap.dedent("""
    import sys, time, pvmexec
    from pvmexec.guest import Guest
    space = pvmexec.attach(int(sys.argv[1]), engine="agent")
    g = Guest(space)
    ctx = g.context("fault_loop", rdi=g.data, rsi=5)
    space.exec(ctx)
    print(space.backend._helper.pid, flush=True)
    while True:
        stop = space.exec(ctx)
        ctx = stop.ctx
        ctx.rax, ctx.rcx = g.data, 5
""")


def test_a_helper_the_targets_execve_left_is_reaped_after_the_caller_is_killed(spawn):
    """The agent died with the old program, the caller by SIGKILL: the janitor reaps the helper."""
    v = spawn("exec")
    script = HELPER_CALLER.replace("while True:", "time.sleep(60)\nwhile True:", 1)
    caller = subprocess.Popen([sys.executable, "-c", script, str(v.pid)], stdout=subprocess.PIPE, text=True)
    try:
        helper = int(caller.stdout.readline())
        v.send(b"go\n")
        assert v.readline() == "ready %d" % v.pid
        deadline = time.monotonic() + 5
        while proc.status(helper)["State"][0] not in "ZX":
            assert time.monotonic() < deadline, "the helper outlived the target's execve"
            time.sleep(0.01)
    finally:
        caller.kill()
        caller.wait(10)
        caller.stdout.close()
    deadline = time.monotonic() + 5
    while os.path.exists("/proc/%d" % helper):
        assert time.monotonic() < deadline, "the helper's zombie stayed after the caller died"
        time.sleep(0.02)
    v.send(b"?\n")
    line = v.readline()
    assert line.startswith("children wait -1/10 wall -1/10 chld "), line


def test_the_helper_goes_when_the_caller_is_killed(spawn):
    v = spawn("children")
    before = snapshot(v.pid)
    helper = int(kill_caller_after_first_line(HELPER_CALLER, v.pid))
    deadline = time.monotonic() + 3
    while os.path.exists("/proc/%d" % helper) or snapshot(v.pid) != before:
        assert time.monotonic() < deadline, "3 s after the caller died: helper %s, target %s" % (
            os.path.exists("/proc/%d" % helper), snapshot(v.pid))
        time.sleep(0.02)
    v.send(b"?\n")
    assert v.readline() == "children wait -1/10 wall -1/10 chld 0"
    v.send(b"q\n")
    assert v.wait() == 0


def test_proposal_syscall_semantics_on_the_agent(spawn):
    v = spawn("wait")
    before = snapshot(v.pid)
    r, w = os.pipe()
    try:
        with pvmexec.attach(v.pid, engine="agent") as space:
            with space.scratch(16) as mem:
                space.write(mem, struct.pack("<I", 0x1E511E51))
                assert syscall_with_callers_fds(space, 1, [w, mem, 4]) == 4
            assert struct.unpack("<I", os.read(r, 4))[0] == 0x1E511E51
    finally:
        os.close(r)
        os.close(w)
    assert snapshot(v.pid) == before


def test_seccomp_target_refused_cleanly(spawn):
    v = spawn("seccomp")
    before = snapshot(v.pid)
    with pytest.raises(pvmexec.UnsupportedTarget, match="seccomp"):
        pvmexec.attach(v.pid, engine="agent")
    assert snapshot(v.pid) == before


@pytest.mark.parametrize("mode1", [False, True], ids=["mode2", "with-helper"])
def test_a_filter_the_target_puts_on_the_agent_never_kills_it(spawn, mode1):
    # SECCOMP_FILTER_FLAG_TSYNC puts a filter on every thread, the agent's too: a call it kills for must
    # not reach it. The agent leaves; calls go on through ptrace, checked against the filter.
    can_read = proc.has_cap(21)             # CAP_SYS_ADMIN: PTRACE_SECCOMP_GET_FILTER
    v = spawn("tsync")
    before = snapshot(v.pid)
    with pvmexec.attach(v.pid, engine="agent") as space:
        agent = space.backend.agent_tid
        assert space.syscall("getpid") == v.pid
        g = Guest(space)
        if mode1:
            syscall_loop(space, g, 3)
            helper = helper_of(space).pid
        v.send(b"x")
        assert v.readline().strip() == "filtered 0"
        time.sleep(0.02)                    # (the agent's seccomp state is looked at again after 1 ms)
        with pytest.warns(RuntimeWarning, match="TSYNC.*the agent leaves") as caught:
            with pytest.raises(pvmexec.SeccompBlocked, match="kill the process" if can_read else "cannot be read"):
                space.syscall("getppid")
        assert str(agent) not in os.listdir("/proc/%d/task" % v.pid)
        assert "filter" in space.backend.left
        if mode1:
            assert not os.path.exists("/proc/%d" % helper) or proc.status(helper)["State"].startswith("Z")
            syscall_loop(space, g, 3)       # mode 1 on a thread of the target's, by ptrace (SYSEMU)
        if can_read:
            assert space.syscall("getpid") == v.pid
            assert space.syscall_raw("getuid") == -errno.EPERM       # the filter's own answer
            with pytest.raises(pvmexec.SeccompBlocked, match="SIGSYS"):
                space.syscall("getgid")
            g.close()
        else:
            # Nothing is injected where the filter cannot be read, our own clean-up included: what stays
            # is named (the agent's region and descriptor, the helper's window).
            assert any("stay in process %d" % v.pid in str(w.message) for w in caught)
            with pytest.raises(pvmexec.SeccompBlocked):
                g.close()
    assert v.status()["TracerPid"] == "0"
    after = snapshot(v.pid)
    assert after["threads"] == before["threads"] and after["sig"] == before["sig"]
    if can_read:
        assert after == before
    v.send(b"y")
    assert v.readline().startswith("done 1")


def test_interrupted_call_is_cancelled(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid, engine="agent") as space:
        timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGINT))
        timer.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                space.syscall("pause")
        finally:
            timer.join()
        assert space.syscall("getpid") == v.pid
    v.send(b"x")
    assert v.readline().startswith("done 1")


CALLER = textwrap.dedent("""
    import sys, pvmexec
    space = pvmexec.attach(int(sys.argv[1]), engine="agent")
    print(space._engine.agent_tid, flush=True)
    sys.stdin.read()
""")


@pytest.mark.parametrize("nofile", [None, 64, 16])
def test_agent_removes_itself_when_the_caller_dies(spawn, nofile):
    # With a tiny RLIMIT_NOFILE too: the agent's pidfd of the caller still finds a place.
    import resource
    limit = (lambda: resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))) if nofile else None
    v = spawn("wait", preexec_fn=limit)
    before = snapshot(v.pid)
    agent = int(kill_caller_after_first_line(CALLER, v.pid))
    deadline = time.monotonic() + 3
    while str(agent) in os.listdir("/proc/%d/task" % v.pid):
        assert time.monotonic() < deadline, "agent thread still there 3 s after the caller died"
        time.sleep(0.02)
    # The page with the agent's last instructions (and the injection's trampoline) cannot go by
    # themselves: the janitor process removes them once the agent has left.
    while snapshot(v.pid) != before:
        after = snapshot(v.pid)
        assert time.monotonic() < deadline, "3 s after the caller died the target still holds %s" % [
            line for line in after["maps"].splitlines() if line not in before["maps"].splitlines()]
        time.sleep(0.02)
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_auto_prefers_the_agent_and_falls_back_with_a_warning(spawn):
    v = spawn("wait")
    with pvmexec.attach(v.pid) as space:
        assert space.engine == "agent" and space.fallback_reason is None
        assert space.syscall("getpid") == v.pid
    s = spawn("seccomp")
    before = snapshot(s.pid)
    with pytest.warns(RuntimeWarning, match="seccomp"):
        space = pvmexec.attach(s.pid)
    with space:
        assert space.engine == "ptrace" and "seccomp" in space.fallback_reason
        if proc.has_cap(21):                   # CAP_SYS_ADMIN reads the filters: getpid is allowed by them
            assert space.syscall("getpid") == s.pid
        else:                                  # unprivileged: they cannot be read, nothing is injected
            with pytest.raises(pvmexec.SeccompBlocked, match="CAP_SYS_ADMIN"):
                space.syscall("getpid")
    assert snapshot(s.pid) == before


def test_target_running_execve_loses_the_agent_cleanly(spawn, tmp_path):
    # A victim that execs /bin/sleep when told to: the agent thread dies with the old image.
    script = tmp_path / "exec.py"
    script.write_text("import os, sys\nprint('ready %d' % os.getpid(), flush=True)\nsys.stdin.read(1)\n"
                      "os.execv('/bin/sleep', ['sleep', '30'])\n")
    p = subprocess.Popen([sys.executable, str(script)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready %d\n" % p.pid
        space = pvmexec.attach(p.pid, engine="agent")
        assert space.syscall("getpid") == p.pid
        p.stdin.write("x")
        p.stdin.flush()
        deadline = time.monotonic() + 10
        while True:                   # the new program is up and asleep (its start-up maps are done)
            with open("/proc/%d/syscall" % p.pid) as f:
                nr = f.read().split()[0]
            if open("/proc/%d/comm" % p.pid).read().strip() == "sleep" and nr in ("35", "230"):
                break
            assert time.monotonic() < deadline
            time.sleep(0.01)
        maps_after_exec = open("/proc/%d/maps" % p.pid).read()
        with pytest.raises(pvmexec.TargetGone, match="execve"):
            space.syscall("getpid")
        space.detach()
        # Nothing of the new program was unmapped by our clean-up.
        assert open("/proc/%d/maps" % p.pid).read() == maps_after_exec
    finally:
        p.kill()
        p.wait(10)
        p.stdin.close()
        p.stdout.close()


def test_children_forked_while_attached_do_not_inherit_the_region(spawn):
    v = spawn("fork")
    with pvmexec.attach(v.pid, engine="agent") as space, Guest(space) as g:
        assert space.syscall("getpid") == v.pid
        syscall_loop(space, g, 3)                   # the helper, and its window, there too
        with open("/proc/%d/maps" % v.pid) as f:
            maps = f.read()
        assert "pvmexec-agent" in maps and "pvmexec-helper" in maps and "050f0000-" in maps
        v.send(b"f")
        child = int(v.readline().split()[1])
        try:
            with open("/proc/%d/maps" % child) as f:
                assert "pvmexec" not in f.read()
            assert len(os.listdir("/proc/%d/task" % child)) == 1       # threads are not forked either
            assert children_of(child) == []
        finally:
            os.kill(child, signal.SIGKILL)
    v.send(b"x")
    assert v.readline().startswith("done")


def test_stopped_target(spawn):
    # Stopped before attach: auto chooses ptrace, which works on stopped processes; stopped stays stopped.
    v = spawn("wait")
    os.kill(v.pid, signal.SIGSTOP)
    v.wait_state("T")
    with pytest.warns(RuntimeWarning, match="stopped"):
        space = pvmexec.attach(v.pid)
    with space:
        assert space.engine == "ptrace" and space.syscall("getpid") == v.pid
    v.wait_state("T")         # after our detach the kernel puts it back into the group stop
    with pytest.raises(pvmexec.UnsupportedTarget, match="stopped"):
        pvmexec.attach(v.pid, engine="agent")
    os.kill(v.pid, signal.SIGCONT)
    v.wait_state("S")
    # Stopped while attached: the request is withdrawn, not left to run at SIGCONT.
    with pvmexec.attach(v.pid, engine="agent") as space, space.scratch(64) as text:
        space.write(text, b"must not appear\nafter\n")
        os.kill(v.pid, signal.SIGSTOP)
        v.wait_state("T")
        with pytest.raises(pvmexec.TargetStopped):
            space.syscall("write", 1, text, 16)
        os.kill(v.pid, signal.SIGCONT)
        v.wait_state("S")
        assert space.syscall("write", 1, text + 16, 6) == 6
        assert space.syscall("getpid") == v.pid
    assert v.readline() == "after"
    v.send(b"x")
    assert v.readline().startswith("done 1")


def test_detach_from_a_target_stopped_while_a_helper_exists(spawn):
    """The helper goes and its memory with it (by ptrace: the agent thread is stopped with the target);
    the target stays stopped, and goes on at SIGCONT."""
    v = spawn("wait")
    space = pvmexec.attach(v.pid, engine="agent")
    g = Guest(space)
    syscall_loop(space, g, 3)
    helper = helper_of(space).pid
    os.kill(v.pid, signal.SIGSTOP)
    v.wait_state("T")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")             # (the agent's own region: its warning is tested above)
        with pytest.raises(pvmexec.TargetStopped):
            g.close()
        space.detach()
    assert not os.path.exists("/proc/%d" % helper) and children_of(v.pid) == []
    with open("/proc/%d/maps" % v.pid) as f:
        assert "pvmexec-helper" not in f.read()
    v.wait_state("T")
    os.kill(v.pid, signal.SIGCONT)
    v.wait_state("S")
    v.send(b"x")
    assert v.readline().startswith("done 1")


ATTACH_LOOP = textwrap.dedent("""
    import sys, pvmexec
    ok = refused = 0
    for _ in range(int(sys.argv[2])):
        try:
            with pvmexec.attach(int(sys.argv[1]), engine="agent") as space:
                assert space.syscall("getpid") == int(sys.argv[1])
                ok += 1
        except pvmexec.UnsupportedTarget as e:
            refused += 1
    print(ok, refused)
""")


def test_a_target_that_truncates_the_agents_memory_never_crashes_the_caller(cc, tmp_path):
    with Running(compile_victim(cc, tmp_path, "truncator")) as target:
        got = subprocess.run([sys.executable, "-c", ATTACH_LOOP, str(target.pid), "30"], capture_output=True,
                             text=True, timeout=300)
        assert got.returncode == 0, (got.returncode, got.stderr[-2000:])     # no SIGBUS, no traceback
        ok, refused = map(int, got.stdout.split())
        assert ok + refused == 30 and ok > 0
        status, last = target.finish()
        assert status == 0                                 # the target lives on, unharmed
        # Sealed, the region cannot shrink; one the target shrank before the seals is never mapped
        # (that attach is refused, the caller goes on).
        shrunk = int(last.split()[1])
        assert shrunk <= refused, (shrunk, refused)


def test_a_target_that_takes_requests_away_gets_an_error_not_a_hang(cc, tmp_path):
    with Running(compile_victim(cc, tmp_path, "scribbler")) as target:
        t0 = time.monotonic()
        with pvmexec.attach(target.pid, engine="agent") as space:
            with pytest.raises(pvmexec.TargetMisbehaved, match="interfered with the agent"):
                while time.monotonic() - t0 < 15:        # until the scribbler wins a race for a request
                    space.syscall("getpid")
        assert time.monotonic() - t0 < 25                # an error in seconds, and detach did not hang
        assert target.finish() == (0, "alive\n")


SECOND_TRACER = "import ctypes, sys, time; print(ctypes.CDLL(None).ptrace(0x4206, int(sys.argv[1]), 0, 0), flush=True); " \
                "sys.stdin.read()"


def test_detach_when_another_tracer_took_the_target_says_what_stays(spawn):
    """The agent leaves by itself (no ptrace needed); what only ptrace could remove stays, and detach says
    exactly what and where, instead of raising."""
    v = spawn("wait")
    before = snapshot(v.pid)
    space = pvmexec.attach(v.pid, engine="agent")
    agent = space.backend.agent_tid
    other = subprocess.Popen([sys.executable, "-c", SECOND_TRACER, str(v.pid)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, text=True)
    try:
        assert other.stdout.readline().strip() == "0"
        with pytest.warns(RuntimeWarning) as record:
            space.detach()
        after = snapshot(v.pid)
        assert str(agent) not in after["threads"] and after["fds"] == before["fds"]
        extra = [line for line in after["maps"].splitlines() if line not in before["maps"].splitlines()]
        named = " ".join(str(w.message) for w in record)
        ranges = [(int(a, 16), int(a, 16) + int(n)) for n, a in re.findall(r"(\d+)(?:-byte| bytes)\D*? at (0x[0-9a-f]+)",
                                                                           named)]
        spans = [tuple(int(x, 16) for x in line.split()[0].split("-")) for line in extra]
        assert extra and all(any(lo <= s and e <= hi for lo, hi in ranges) for s, e in spans), (extra, named)
        assert sum(e - s for s, e in spans) <= 4096 + TRAMPOLINE_SIZE
    finally:
        other.stdin.close()
        other.wait(10)
    v.send(b"x")
    assert v.readline().startswith("done 1")


CHANGING_TARGET = textwrap.dedent("""
    import ctypes, sys, time
    print("ready", flush=True)
    sys.stdin.readline()
    if sys.argv[1] == "undumpable":
        ctypes.CDLL(None).prctl(4, 0, 0, 0, 0)          # PR_SET_DUMPABLE 0
    elif sys.argv[1] == "traceme":
        assert ctypes.CDLL(None).ptrace(0, 0, 0, 0) == 0    # PTRACE_TRACEME: its parent traces it
    print("changed", flush=True)
    time.sleep(60)
""")


CHANGED_CALLER = textwrap.dedent("""
    import sys, warnings, pvmexec
    warnings.simplefilter("always")
    space = pvmexec.attach(int(sys.argv[1]), engine="agent")
    assert space.syscall("getpid") == int(sys.argv[1])
    print("attached", flush=True)
    sys.stdin.readline()
    space.detach()
    print("detached", flush=True)
""")


@pytest.mark.parametrize("change", ["undumpable", "stopped", "traceme"])
def test_detach_from_a_target_that_changed_under_the_agent(change):
    """A target that turns undumpable, is stopped, or has its parent trace it (PTRACE_TRACEME) while the
    agent is in it: detach never raises and says what stays; once the target runs and the caller has
    gone (the janitor), nothing of ours is left but what was named. Traced by another, only the page
    the agent ran its last instructions on can stay (the agent unmaps the rest, ptrace's trampoline
    too)."""
    p = subprocess.Popen([sys.executable, "-c", CHANGING_TARGET, change], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, text=True)
    caller = None
    try:
        assert p.stdout.readline() == "ready\n"
        before = snapshot(p.pid)
        caller = subprocess.Popen([sys.executable, "-c", CHANGED_CALLER, str(p.pid)], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        assert caller.stdout.readline() == "attached\n"
        p.stdin.write("go\n")
        p.stdin.flush()
        assert p.stdout.readline() == "changed\n"
        if change == "traceme":
            before["sig"]["TracerPid"] = str(os.getpid())     # its own doing: the test is its tracer now
        if change == "stopped":
            os.kill(p.pid, signal.SIGSTOP)
            deadline = time.monotonic() + 5
            while proc.status(p.pid)["State"][0] != "T" and time.monotonic() < deadline:
                time.sleep(0.01)
        out, err = caller.communicate("\n", timeout=30)
        assert out == "detached\n" and "Traceback" not in err, err
        if change == "stopped":
            assert "leaves when it continues" in err, err
            os.kill(p.pid, signal.SIGCONT)
        # What stays is only what a warning names (unprivileged, an undumpable target is not ours to
        # clean any more); as root nothing stays.
        named = {int(a, 16) for a in re.findall(r"at (0x[0-9a-f]+) stay", err)}
        if change == "traceme":
            assert len(named) == 1 and "4096 bytes of the agent" in err and "trampoline" not in err, err
        else:
            assert not named or os.getuid() != 0, err
        deadline = time.monotonic() + 3
        while True:
            try:
                after = snapshot(p.pid)
            except PermissionError:             # unprivileged, an undumpable target's maps and fds are closed
                assert change == "undumpable" and named, err
                if sorted(os.listdir("/proc/%d/task" % p.pid)) == before["threads"]:     # the agent left
                    break
                assert time.monotonic() < deadline, (change, err)
                time.sleep(0.02)
                continue
            extra = [l for l in after["maps"].splitlines() if l not in before["maps"].splitlines()]
            if {k: v for k, v in after.items() if k not in ("maps", "fds")} == \
                    {k: v for k, v in before.items() if k not in ("maps", "fds")} and \
                    all(int(l.split("-")[0], 16) in named for l in extra) and \
                    (after["fds"] == before["fds"] or named):
                break
            assert time.monotonic() < deadline, (change, err, extra, after["fds"], before["fds"])
            time.sleep(0.02)
    finally:
        for q in (caller, p):
            if q is not None:
                q.kill()
                q.wait(10)
        p.stdin.close()
        p.stdout.close()
