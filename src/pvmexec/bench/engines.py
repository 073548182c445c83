"""`pvmexec bench`: the proposal's measurements, reproduced on this machine.

Every row is a true cost per round trip (the proposal's selftests printed a
fifth of it). Targets are our own child processes; caller and target are
pinned to one CPU unless a row says otherwise, because a cross-CPU wake-up
costs tens of microseconds on these VMs.
"""
import json
import os
import subprocess
import sys
import time
import warnings

from .. import _core
from ..context import SigContext
from ..guest import Guest
from ..space import attach
from ..arch import current as _current_arch
from ..syscalls import number
from .common import Rows, machine, streamed

NR_GETPPID, NR_READ = number("getppid"), number("read")
ARCH = _current_arch()
_R = ARCH.REG_INDEX


TEST_SYSCALL, TEST_SYSCALL_RET, TEST_MARKER = 123, 456, 789
FAULT_VALUE = 0xAABBCCDDEE

# The cover letter's figures: its loops ran 5 s and printed 1e9/iterations, i.e. one fifth
# of a round trip. Real costs are five times the printed numbers.
PUBLISHED = [
    {"mode": "exec-syscall", "engine": "kernel-patch ptrace_vm_exec", "printed_ns": 1446, "us_per_op": 7.23},
    {"mode": "exec-syscall", "engine": "kernel-patch process_vm_exec", "printed_ns": 289, "us_per_op": 1.45},
    {"mode": "exec-fault", "engine": "kernel-patch process_vm_exec", "printed_ns": None, "us_per_op": 3.9},
]


class _Target:
    """A child process that only waits: its address space hosts the guest code."""

    def __init__(self, cpu):
        self.proc = subprocess.Popen([sys.executable, "-S", "-c", "import os; os.read(0, 1)"],
                                     stdin=subprocess.PIPE)
        if cpu is not None:
            os.sched_setaffinity(self.proc.pid, {cpu})
        # Wait until it sleeps in read(0), so it is a quiet target (its CPU ticks may well stay at 0).
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with open("/proc/%d/syscall" % self.proc.pid) as f:
                    if f.read().split()[:2] == [str(NR_READ), "0x0"]:
                        break
            except (OSError, IndexError):
                pass
            time.sleep(0.005)

    def close(self):
        try:
            self.proc.stdin.close()
            self.proc.wait(5)
        except (OSError, subprocess.TimeoutExpired):
            self.proc.kill()
            self.proc.wait(5)


def _adder(results, engine, placement):
    """A function adding one result row for engine, placed as said unless the row says otherwise."""
    def add(mode, loop, us, placement=placement, **extra):
        results.append(dict(mode=mode, engine=engine, loop=loop, us_per_op=round(us, 3), placement=placement,
                            **extra))
    return add


def _per_op(seconds, n):
    return seconds / n * 1e6


def _c_loop(space, kind, ctx, n, a0, a1):
    engine = space.backend
    regs = bytearray(ctx._buf)
    q = memoryview(regs).cast("Q")
    q[_R[ARCH.SYSCALL_ORIG_NR]] = (1 << 64) - 1    # not in a syscall
    done, ns, _code, _status = _core.loop(engine.tid, kind, regs, n, a0, a1, engine.reaps(engine.tid))
    if done != n:
        raise RuntimeError("benchmark loop stopped early after %d of %d round trips" % (done, n))
    return ns / 1e3 / n


def _exec_syscall_python(space, guest, n):
    stop = space.exec(guest.context("syscall_loop", rdi=TEST_MARKER))
    with space.borrowed():
        t0 = time.perf_counter()
        for _ in range(n):
            ctx = stop.ctx
            ctx.rax = TEST_SYSCALL_RET
            stop = space.exec(ctx)
        t1 = time.perf_counter()
    assert stop.syscall == TEST_SYSCALL, stop
    return _per_op(t1 - t0, n)


def _exec_fault_python(space, guest, n):
    stop = space.exec(guest.context("fault_loop", rdi=guest.data, rsi=FAULT_VALUE))
    with space.borrowed():
        t0 = time.perf_counter()
        for _ in range(n):
            ctx = stop.ctx
            ctx.rax = guest.data
            ctx.rcx = FAULT_VALUE
            stop = space.exec(ctx)
        t1 = time.perf_counter()
    assert stop.signo == 11, stop
    return _per_op(t1 - t0, n)


def run(iterations=20000, quick=False, on_row=None):
    """Measure everything; returns the JSON-able report. on_row(row) sees each row as it is measured."""
    n_c = 200 if quick else iterations
    n_py = 100 if quick else max(1000, iterations // 4)
    cpu = sorted(os.sched_getaffinity(0))[0]
    old_affinity = os.sched_getaffinity(0)
    results = Rows(on_row)
    target = None
    try:
        os.sched_setaffinity(0, {cpu})
        target = _Target(cpu)
        same = "caller and target pinned to cpu %d" % cpu

        add = _adder(results, "ptrace", same)

        with attach(target.proc.pid, engine="ptrace") as space, Guest(space) as guest:
            # Mode 1, trapped syscall answered by the caller (selftest 1 / 4).
            stop = space.exec(guest.context("syscall_loop", rdi=TEST_MARKER))
            ctx = stop.ctx
            ctx.rax = TEST_SYSCALL_RET
            with space.borrowed():
                add("exec-syscall", "c", _c_loop(space, 0, ctx, n_c, TEST_SYSCALL, TEST_SYSCALL_RET))
            add("exec-syscall", "python", _exec_syscall_python(space, guest, n_py))
            # Mode 1, faulting store fixed by the caller (selftest 2).
            stop = space.exec(guest.context("fault_loop", rdi=guest.data, rsi=FAULT_VALUE))
            ctx = stop.ctx
            ctx.rax, ctx.rcx = guest.data, FAULT_VALUE
            with space.borrowed():
                add("exec-fault", "c", _c_loop(space, 1, ctx, n_c, guest.data, FAULT_VALUE))
            add("exec-fault", "python", _exec_fault_python(space, guest, n_py))
            # Mode 2: one remote syscall (getppid) per round trip.
            with space.borrowed():
                b = space.backend.borrowed_thread()
                regs = bytearray(b.saved_regs)
                q = memoryview(regs).cast("Q")
                q[_R[ARCH.SYSCALL_NR]], q[_R[ARCH.PC]] = NR_GETPPID, space.backend.syscall_insn(b)
                add("syscall", "c", _c_loop(space, 2, _RawCtx(regs), n_c, 0, 0))
                add("syscall", "python", _python_calls(space, n_py), held=True)
            add("syscall", "python", _python_calls(space, n_py // 4), held=False,
                note="attach/detach around every call")
            add("syscall-batch", "python", _python_batches(space, max(2, n_py // 64)), batch=64)
            add("vm_exec-mode1", "python", _vm_exec_mode1(target.proc.pid, "ptrace", guest, n_py),
                placement=same + "; process_vm_exec(flags 0) of the syscall loop, in a loop (one attachment kept)")
        add("vm_exec-sysc", "python", _vm_exec_calls(target.proc.pid, "ptrace", max(10, n_py // 4)),
            placement=same + "; process_vm_exec(PROCESS_VM_EXEC_SYSCALL) in a loop (one attachment kept)")

        cpus = sorted(old_affinity)
        other = cpus[1] if len(cpus) > 1 else cpu
        with attach(target.proc.pid, engine="agent") as space:
            agent = space.backend
            os.sched_setaffinity(agent.agent_tid, {other})
            placed = "caller on cpu %d, agent thread on cpu %d (both spin before sleeping)" % (cpu, other)

            add_agent = _adder(results, "agent", placed)

            space.syscall_raw(NR_GETPPID)
            add_agent("syscall", "c", _agent_c_loop(agent, n_c * 5, 1))
            add_agent("syscall", "python", _python_calls(space, n_py * 4))
            add_agent("syscall-batch", "c", _agent_c_loop(agent, max(4, n_c // 16), 64), batch=64)
            add_agent("syscall-batch", "python", _python_batches(space, max(4, n_py // 4)), batch=64)
            # On one CPU spinning cannot help: futex sleep and wake-up per call.
            os.sched_setaffinity(agent.agent_tid, {cpu})
            spin = agent.spin
            agent.set_spin(0)
            space.syscall_raw(NR_GETPPID)
            add_agent("syscall", "c", _agent_c_loop(agent, max(100, n_c // 4), 1),
                      placement="caller and agent thread on cpu %d (futex wake-ups, no spinning)" % cpu)
            agent.set_spin(spin)
            # Mode 1 in the live target: in the agent's helper process, without ptrace.
            with Guest(space) as guest:
                stop = space.exec(guest.context("syscall_loop", rdi=TEST_MARKER))     # starts the helper
                helper = agent.mode1()
                if helper is agent._thread_engine:
                    raise RuntimeError("no helper for mode 1: %s" % agent.helper_refused)
                for tid in os.listdir("/proc/%d/task" % helper.pid):
                    os.sched_setaffinity(int(tid), {other})
                add_helper = _adder(results, "helper", "caller on cpu %d, the agent's helper process (in the "
                                    "target's memory) on cpu %d (both spin before sleeping)" % (cpu, other))
                add_helper("exec-syscall", "c", _stub_c_loop(helper, stop, 0, n_c, TEST_SYSCALL, TEST_SYSCALL_RET))
                add_helper("exec-syscall", "python", _exec_syscall_python(space, guest, n_py * 4))
                stop = space.exec(guest.context("fault_loop", rdi=guest.data, rsi=FAULT_VALUE))
                add_helper("exec-fault", "c", _stub_c_loop(helper, stop, 1, n_c, guest.data, FAULT_VALUE))
                add_helper("exec-fault", "python", _exec_fault_python(space, guest, n_py * 4))
            # Idle: an attached agent should cost nothing.
            idle_s = 0.5 if quick else 5.0
            t_cpu0 = _thread_cpu_seconds(target.proc.pid, agent.agent_tid)
            time.sleep(idle_s)
            t_cpu1 = _thread_cpu_seconds(target.proc.pid, agent.agent_tid)
            results.append(dict(mode="idle-cpu", engine="agent", loop="none",
                                us_per_op=0.0, cpu_percent=round(100 * (t_cpu1 - t_cpu0) / idle_s, 3),
                                seconds=idle_s, placement="agent attached, no requests"))

        with warnings.catch_warnings():
            warnings.simplefilter("error")              # (a fallback to ptrace would not be this row)
            add_agent("vm_exec-sysc", "python", _vm_exec_calls(target.proc.pid, "agent", n_py * 4, other),
                      placement="caller on cpu %d, agent thread on cpu %d; process_vm_exec(PROCESS_VM_EXEC_SYSCALL) "
                                "in a loop (one attachment kept)" % (cpu, other))
            with attach(target.proc.pid, engine="ptrace") as space, Guest(space) as guest:
                add_agent("vm_exec-mode1", "python", _vm_exec_mode1(target.proc.pid, "agent", guest, n_py * 4, other),
                          placement="caller on cpu %d, helper on cpu %d; process_vm_exec(flags 0) of the syscall "
                                    "loop, in a loop (one attachment kept)" % (cpu, other))
        # Mode 1 in a stub space of our own, no ptrace: syscall sites patched after their first trap
        # (engine "stub"), and every syscall a seccomp trap and a signal (engine "stub-trap").
        from ..space import Space
        for patch in (True, False):
            stub_space = Space.create(patch_syscalls=patch)
            try:
                stub = stub_space.backend
                for tid in os.listdir("/proc/%d/task" % stub.pid):
                    os.sched_setaffinity(int(tid), {other})
                placed = "caller on cpu %d, stub on cpu %d (both spin before sleeping)" % (cpu, other)
                if patch and stub_space.patching != "on":
                    placed += "; patching " + stub_space.patching
                add_stub = _adder(results, "stub" if patch else "stub-trap", placed)
                with Guest(stub_space) as guest:
                    stop = stub_space.exec(guest.context("syscall_loop", rdi=TEST_MARKER))
                    add_stub("exec-syscall", "c", _stub_c_loop(stub_space.backend, stop, 0, n_c, TEST_SYSCALL, TEST_SYSCALL_RET))
                    add_stub("exec-syscall", "python", _exec_syscall_python(stub_space, guest, n_py * 4))
                    if patch:           # faults always arrive as signals: patching changes nothing there
                        stop = stub_space.exec(guest.context("fault_loop", rdi=guest.data, rsi=FAULT_VALUE))
                        add_stub("exec-fault", "c", _stub_c_loop(stub_space.backend, stop, 1, n_c, guest.data, FAULT_VALUE))
                        add_stub("exec-fault", "python", _exec_fault_python(stub_space, guest, n_py * 4))
            finally:
                stub_space.detach()
        # What any user-space engine pays for a fault at least: the kernel's signal delivery and return.
        os.sched_setaffinity(0, {other})
        try:
            results.append(dict(mode="exec-fault", engine="floor", loop="c",
                                us_per_op=round(_core.fault_floor(n_c) / 1e3 / n_c, 3),
                                placement="one process on cpu %d: fault, signal handler, rt_sigreturn" % other))
        finally:
            os.sched_setaffinity(0, {cpu})

        # The same C loop with caller and target on different CPUs, to show what placement costs.
        if len(cpus) > 1:
            target.close()
            target = _Target(cpus[1])
            with attach(target.proc.pid, engine="ptrace") as space, Guest(space) as guest:
                stop = space.exec(guest.context("syscall_loop", rdi=TEST_MARKER))
                ctx = stop.ctx
                ctx.rax = TEST_SYSCALL_RET
                with space.borrowed():
                    add("exec-syscall", "c", _c_loop(space, 0, ctx, max(100, n_c // 4), TEST_SYSCALL,
                                                      TEST_SYSCALL_RET),
                        placement="caller on cpu %d, target on cpu %d" % (cpu, cpus[1]))
    finally:
        os.sched_setaffinity(0, old_affinity)
        if target is not None:
            target.close()
    return {"machine": dict(machine(), placement="caller and target pinned to one CPU unless a row says otherwise"),
            "results": results, "published": PUBLISHED,
            "ratios": {label: round(v, 2) for label, v in _ratios(results)},
            "iterations": {"c": n_c, "python": n_py}}


def _python_calls(space, n):
    """µs per getppid through Space.syscall_raw."""
    t0 = time.perf_counter()
    for _ in range(n):
        space.syscall_raw(NR_GETPPID)
    return _per_op(time.perf_counter() - t0, n)


def _vm_exec_calls(pid, engine, n, agent_cpu=None):
    """µs per getppid through the proposal's interface, called in a loop as its selftests do.
    agent_cpu: pin the agent thread of the attachment process_vm_exec keeps there."""
    from ..vmexec import PROCESS_VM_EXEC_SYSCALL, _held, process_vm_exec, process_vm_exec_release
    ctx = SigContext(rax=NR_GETPPID)
    try:
        process_vm_exec(pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine)    # attaches
        if agent_cpu is not None:
            os.sched_setaffinity(_held[(pid, engine)].space.backend.agent_tid, {agent_cpu})
        t0 = time.perf_counter()
        for _ in range(n):
            ctx.rax = NR_GETPPID
            process_vm_exec(pid, ctx, PROCESS_VM_EXEC_SYSCALL, engine=engine)
        return _per_op(time.perf_counter() - t0, n)
    finally:
        process_vm_exec_release(pid)


def _vm_exec_mode1(pid, engine, guest, n, helper_cpu=None):
    """µs per round trip of process_vm_exec(flags 0): the guest's syscall loop, answered each time.
    helper_cpu: pin the helper of the attachment process_vm_exec keeps there."""
    from ..vmexec import _held, process_vm_exec, process_vm_exec_release
    ctx = guest.context("syscall_loop", rdi=TEST_MARKER)
    try:
        process_vm_exec(pid, ctx, 0, engine=engine)         # attaches
        if helper_cpu is not None:
            helper = _held[(pid, engine)].space.backend.mode1()
            for tid in os.listdir("/proc/%d/task" % helper.pid):
                os.sched_setaffinity(int(tid), {helper_cpu})
        t0 = time.perf_counter()
        for _ in range(n):
            ctx.rax = TEST_SYSCALL_RET
            process_vm_exec(pid, ctx, 0, engine=engine)
        t1 = time.perf_counter()
        if ctx.rdi != TEST_MARKER:
            raise RuntimeError("process_vm_exec loop: the guest did not stop at its syscall")
        return _per_op(t1 - t0, n)
    finally:
        process_vm_exec_release(pid)


def _python_batches(space, rounds):
    """µs per getppid in batches of 64 through Space.syscalls."""
    batch = [(110, ())] * 64
    t0 = time.perf_counter()
    for _ in range(rounds):
        space.syscalls(batch)
    return _per_op(time.perf_counter() - t0, rounds * 64)


def _agent_c_loop(agent, rounds, per_round):
    """µs per getppid through the agent channel, driven from C (per_round calls per round trip)."""
    ns = _core.agent_loop(agent._slot, agent._counter, agent._alive, agent.pidfd, agent.spin, agent.pid, 110, rounds,
                          per_round)
    return ns / 1e3 / (rounds * per_round)


def _stub_c_loop(stub, stop, kind, n, a0, a1):
    """The stub's (or helper's) C-level loop starts from the stop registers already in its block; answer that
    stop first."""
    regs_off = stub.block - stub._base + _core.LAYOUT["STUB_STOP_OFF"] + _core.LAYOUT["stop.regs"]
    ctx = stop.ctx
    if kind == 0:
        ctx.rax = a1
    else:
        ctx.rax, ctx.rcx = a0, a1
    stub._map[regs_off:regs_off + len(ctx._buf)] = ctx._buf
    done, ns, signo = _core.stub_loop(stub.block, stub.counter, stub.pidfd, stub.spin, n, kind, a0, a1)
    if done != n:
        raise RuntimeError("stub loop stopped after %d of %d round trips (signal %d)" % (done, n, signo))
    return ns / 1e3 / n


def _thread_cpu_seconds(pid, tid):
    with open("/proc/%d/task/%d/stat" % (pid, tid)) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class _RawCtx:
    def __init__(self, regs):
        self._buf = regs


def _header():
    m = machine()
    return "\n".join(["pvmexec bench — true cost per round trip (µs); %s, %d CPUs, Linux %s" % (
        m["cpu"], m["cpus"], m["kernel"]), "",
        "%-14s %-9s %-7s %10s  %s" % ("mode", "engine", "loop", "µs/op", "placement / notes")])


def _line(r):
    if r["mode"] == "idle-cpu":
        return "%-14s %-9s %-7s %9.3f%%  CPU of an attached, idle agent thread over %.1f s" % (
            r["mode"], r["engine"], "", r["cpu_percent"], r["seconds"])
    notes = [r["placement"]]
    if "held" in r:
        notes.append("thread held across calls" if r["held"] else r.get("note", ""))
    if "batch" in r:
        notes.append("per syscall, batches of %d" % r["batch"])
    return "%-14s %-9s %-7s %10.2f  %s" % (r["mode"], r["engine"], r["loop"], r["us_per_op"],
                                           "; ".join(n for n in notes if n))


def format_table(report, rows=True):
    """The report as a table; rows=False: only what follows the rows (they were streamed)."""
    out = [_header()] + [_line(r) for r in report["results"]] if rows else []
    ratios = _ratios(report["results"])
    if ratios:
        out.append("")
        out.append("ptrace / fast engine (agent for mode 2, stub space for mode 1), same run:")
        for label, value in ratios:
            out.append("  %-52s %6.1fx" % (label, value))
    out.append("")
    out.append("Published (cover letter; printed ns were 1/5 of a round trip, shown here as real µs):")
    for p in report["published"]:
        printed = "printed %d ns" % p["printed_ns"] if p["printed_ns"] else "from the fault selftest"
        out.append("  %-14s %-32s %6.2f µs  (%s)" % (p["mode"], p["engine"], p["us_per_op"], printed))
    return "\n".join(out)


def _ratios(results):
    def find(mode, engine, loop, **kw):
        for r in results:
            if (r["mode"], r["engine"], r["loop"]) == (mode, engine, loop) and all(r.get(k) == v for k, v in kw.items()):
                return r["us_per_op"]
        return None

    pairs = [
        ("mode 1 syscall loop, C (stub space vs ptrace)", find("exec-syscall", "ptrace", "c"),
         find("exec-syscall", "stub", "c")),
        ("mode 1 syscall loop, Python API", find("exec-syscall", "ptrace", "python"),
         find("exec-syscall", "stub", "python")),
        ("mode 1 syscall loop, C, unpatched (trap every time)", find("exec-syscall", "ptrace", "c"),
         find("exec-syscall", "stub-trap", "c")),
        ("mode 1 syscall loop, Python API, unpatched", find("exec-syscall", "ptrace", "python"),
         find("exec-syscall", "stub-trap", "python")),
        ("mode 1 fault loop, C", find("exec-fault", "ptrace", "c"), find("exec-fault", "stub", "c")),
        ("mode 1 fault loop, C: ptrace vs the in-process floor", find("exec-fault", "ptrace", "c"),
         find("exec-fault", "floor", "c")),
        ("mode 1 fault loop, Python API", find("exec-fault", "ptrace", "python"), find("exec-fault", "stub", "python")),
        ("mode 1 syscall loop in a live process, C (helper vs ptrace)", find("exec-syscall", "ptrace", "c"),
         find("exec-syscall", "helper", "c")),
        ("mode 1 syscall loop in a live process, Python API", find("exec-syscall", "ptrace", "python"),
         find("exec-syscall", "helper", "python")),
        ("mode 1 fault loop in a live process, C", find("exec-fault", "ptrace", "c"), find("exec-fault", "helper", "c")),
        ("mode 1 fault loop in a live process, Python API", find("exec-fault", "ptrace", "python"),
         find("exec-fault", "helper", "python")),
        ("process_vm_exec(flags 0) in a loop, Python", find("vm_exec-mode1", "ptrace", "python"),
         find("vm_exec-mode1", "agent", "python")),
        ("process_vm_exec(flags 0) loop (agent) vs ptrace's C loop", find("exec-syscall", "ptrace", "c"),
         find("vm_exec-mode1", "agent", "python")),
        ("mode 2 single call, C loop (agent on another CPU)", find("syscall", "ptrace", "c"),
         find("syscall", "agent", "c")),
        ("mode 2 single call, Python API (ptrace thread held)", find("syscall", "ptrace", "python", held=True),
         find("syscall", "agent", "python")),
        ("process_vm_exec(SYSCALL) in a loop, Python", find("vm_exec-sysc", "ptrace", "python"),
         find("vm_exec-sysc", "agent", "python")),
        ("process_vm_exec(SYSCALL) loop (agent) vs ptrace's C loop", find("syscall", "ptrace", "c"),
         find("vm_exec-sysc", "agent", "python")),
        ("mode 2 per syscall, batches of 64, Python API", find("syscall-batch", "ptrace", "python"),
         find("syscall-batch", "agent", "python")),
        ("mode 2 per syscall: ptrace single vs agent batch of 64, C loops", find("syscall", "ptrace", "c"),
         find("syscall-batch", "agent", "c")),
        ("mode 2 per syscall: ptrace single vs agent batch of 64, Python", find("syscall", "ptrace", "python", held=True),
         find("syscall-batch", "agent", "python")),
    ]
    return [(label, a / b) for label, a, b in pairs if a and b]


def main(args):
    if args.json:
        print(json.dumps(run(iterations=args.iterations, quick=args.quick), indent=2))
    else:
        report = run(iterations=args.iterations, quick=args.quick, on_row=streamed(_header(), _line))
        print(format_table(report, rows=False))
    return 0
