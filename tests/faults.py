"""Fault injection: signal the caller at a random moment of an operation and look at the target.

Each run starts a self-checking victim (victim.c "regs": known values in every register and in
xmm/MXCSR/x87, checked on SIGUSR1), a caller process that attaches to it and runs one scenario in a
loop, then sends the caller a signal at a random moment. The run is "clean" when, within a second of
the caller's end, the victim is untraced, not stopped, has its threads, mappings, descriptors and
signal state of before, and reports its registers intact. Used by test_caller_faults.py with a few
runs, and as a stress tool:

    python tests/faults.py --runs 20 [SCENARIO ...]      # prints the table of outcomes
"""
import argparse
import os
import random
import signal
import subprocess
import sys
import tempfile
import textwrap
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
from conftest import Victim, snapshot  # noqa: E402

PRELUDE = textwrap.dedent("""
    import faulthandler, os, signal, sys, time, pvmexec
    faulthandler.register(signal.SIGUSR2, all_threads=True)    # a hang's report: where every thread is
    from pvmexec.guest import Guest
    pid = int(sys.argv[1])
    def go():
        print("go", flush=True)
""")

# name -> (caller code, signals it is tried with). The code runs after PRELUDE with `pid` set; it
# prints "go" (go()) once the operation under test is under way, and loops until killed.
SCENARIOS = {
    "ptrace-frozen-idle": ("""
        space = pvmexec.attach(pid, engine="ptrace", freeze=True)
        space.syscall("getpid")
        go()
        time.sleep(60)
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "ptrace-syscalls": ("""
        with pvmexec.attach(pid, engine="ptrace") as space:
            go()
            while True:
                space.syscall("getppid")
    """, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)),
    "ptrace-borrowed-syscalls": ("""
        with pvmexec.attach(pid, engine="ptrace") as space, space.borrowed():
            go()
            while True:
                space.syscalls([("getppid", ()), ("getpid", ())])
    """, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)),
    "ptrace-exec": ("""
        with pvmexec.attach(pid, engine="ptrace") as space, Guest(space) as g:
            go()
            while True:
                space.exec(g.context("syscall_loop", rdi=1, rbx=1, r15=2))
    """, (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)),
    "ptrace-attach-detach": ("""
        go()
        while True:
            with pvmexec.attach(pid, engine="ptrace") as space:
                space.syscall("getpid")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)),
    "agent-idle": ("""
        space = pvmexec.attach(pid, engine="agent")
        space.syscall("getpid")
        go()
        time.sleep(60)
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "agent-syscalls": ("""
        with pvmexec.attach(pid, engine="agent") as space:
            go()
            while True:
                space.syscall("getppid")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM, signal.SIGHUP)),
    "agent-attach-detach": ("""
        go()
        while True:
            with pvmexec.attach(pid, engine="agent") as space:
                space.syscall("getpid")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "agent-exec": ("""
        with pvmexec.attach(pid, engine="agent") as space, Guest(space) as g:
            go()
            while True:
                space.exec(g.context("fault_loop", rdi=g.data, rsi=5))
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "agent-exec-syscalls": ("""
        with pvmexec.attach(pid, engine="agent") as space, Guest(space) as g:
            ctx = g.context("syscall_loop", rdi=1, rbx=1, r15=2)
            go()
            while True:
                stop = space.exec(ctx)
                ctx = stop.ctx
                ctx.rax = 456
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "ptrace-syscalls-kill": ("""
        with pvmexec.attach(pid, engine="ptrace") as space:
            go()
            while True:
                space.syscall("getppid")
    """, (signal.SIGKILL,)),
    "ptrace-borrowed-kill": ("""
        with pvmexec.attach(pid, engine="ptrace") as space, space.borrowed():
            go()
            while True:
                space.syscalls([("getppid", ()), ("getpid", ())])
    """, (signal.SIGKILL,)),
    "ptrace-strings": ("""
        with pvmexec.attach(pid, engine="ptrace") as space:
            go()
            while True:
                space.syscall_raw("access", "/", 0)     # a string argument: a scratch mapping
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "ptrace-lend": ("""
        r, w = os.pipe()
        with pvmexec.attach(pid, engine="ptrace") as space:
            go()
            while True:
                with space.lend(w) as fd:
                    space.syscall("write", fd, b"x", 1)
                os.read(r, 1)
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "ptrace-blocked-read": ("""
        with pvmexec.attach(pid, engine="ptrace") as space:
            go()
            while True:
                space.syscall("getppid")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM), "read"),
    "agent-blocked-read": ("""
        with pvmexec.attach(pid, engine="agent") as space:
            go()
            while True:
                space.syscall("getppid")
    """, (signal.SIGKILL,), "read"),
    "ptrace-trampoline-kill": ("""
        # The caller dies inside the call that makes our trampoline (attach's first injected call), at a
        # random one of its moments: its frame written, at the entry stop, at the exit stop.
        import random
        from pvmexec.engines import ptrace as P
        at, seen = random.randrange(3), []
        call, resume = P.PtraceEngine._self_restoring_call, P.PtraceEngine._resume
        def dying_resume(self, b, request, sig):
            if seen == [None] and at == 0:
                os.kill(os.getpid(), signal.SIGKILL)
            status = resume(self, b, request, sig)
            if seen:
                seen.append(status)
                if len(seen) - 1 == at:
                    os.kill(os.getpid(), signal.SIGKILL)
            return status
        def dying_call(self, *args):
            go()                            # (never said: the run is an error, not clean)
            seen.append(None)
            return call(self, *args)
        P.PtraceEngine._resume, P.PtraceEngine._self_restoring_call = dying_resume, dying_call
        with pvmexec.attach(pid, engine="ptrace") as space:
            print("attach made no self-restoring call", file=sys.stderr)
            sys.exit(1)
    """, (signal.SIGKILL,)),
    "ptrace-no-trampoline": ("""
        # A target whose policy refuses every mmap: no trampoline, each call runs on a frame on its stack.
        # (Unprivileged, its filter cannot be read: the same path, found by the mmap's EPERM.)
        with pvmexec.attach(pid, engine="ptrace", check_seccomp=os.geteuid() == 0) as space:
            go()
            while True:
                space.syscall("getppid")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM), "nommap-read"),
    "ptrace-no-trampoline-borrowed": ("""
        with pvmexec.attach(pid, engine="ptrace", check_seccomp=os.geteuid() == 0) as space, space.borrowed():
            go()
            while True:
                space.syscalls([("getppid", ()), ("getpid", ())])
    """, (signal.SIGKILL,), "nommap-regs"),
    "dump-loop": ("""
        # Dumps one after another: the signal lands in any phase (pre-dumps with write protection, freeze,
        # the final round, the record of state, the thaw).
        import shutil, tempfile
        from pvmexec.checkpoint import dump
        with tempfile.TemporaryDirectory() as d:
            go()
            while True:
                dump(pid, d + "/img", pre_dumps=2)
                shutil.rmtree(d + "/img")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "dump-vmsplice-loop": ("""
        import shutil, tempfile
        from pvmexec.checkpoint import dump
        with tempfile.TemporaryDirectory() as d:
            go()
            while True:
                dump(pid, d + "/img", pre_dumps=2, transfer="vmsplice")
                shutil.rmtree(d + "/img")
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
    "dump-frozen": ("""
        import tempfile
        from pvmexec.checkpoint import dump
        with tempfile.TemporaryDirectory() as d:
            dump(pid, d + "/img", pre_dumps=1, on_frozen=lambda p: (go(), time.sleep(60)))
    """, (signal.SIGKILL, signal.SIGINT, signal.SIGTERM)),
}


def _link(pid, fd):
    try:
        return os.readlink("/proc/%d/fd/%s" % (pid, fd))
    except OSError:
        return "?"


def _state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def _last_error(f):
    f.seek(0)
    lines = f.read().decode(errors="replace").strip().splitlines()
    return "; the caller said: %s" % lines[-1] if lines else ""


def one_run(victim_exe, name, sig, max_delay=0.05, rng=random):
    """Returns (outcome, detail): outcome is "clean", "killed" (the victim died), "harmed" (it lives but
    reports changed state), "leftover" (something of ours stayed) or "hang" (the caller did not end)."""
    code = PRELUDE + textwrap.dedent(SCENARIOS[name][0])
    mode = SCENARIOS[name][2] if len(SCENARIOS[name]) > 2 else "regs"
    v = Victim(victim_exe, mode)
    caller = None
    errors = tempfile.TemporaryFile()         # the caller's stderr: its last line goes into a report
    try:
        time.sleep(0.01)
        if mode.endswith("read"):
            v.wait_state("S")
        before = snapshot(v.pid)
        caller = subprocess.Popen([sys.executable, "-c", code, str(v.pid)], stdout=subprocess.PIPE,
                                  stderr=errors, text=True)
        if caller.stdout.readline() != "go\n":
            return "error", "the caller did not start (exit %s)%s" % (caller.wait(10), _last_error(errors))
        time.sleep(rng.uniform(0, max_delay))
        if caller.poll() not in (None, -sig):   # (a run in which nothing was tried is no evidence)
            return "error", "the caller ended by itself (exit %s) before the %s%s" % (
                caller.returncode, signal.Signals(sig).name, _last_error(errors))
        caller.send_signal(sig)
        try:
            caller.wait(10)
        except subprocess.TimeoutExpired:
            caller.send_signal(signal.SIGUSR2)
            time.sleep(0.5)
            errors.seek(0)
            where = [l.strip() for l in errors.read().decode(errors="replace").splitlines() if 'File "' in l]
            return "hang", "the caller still runs 10 s after %s; it was at: %s" % (
                signal.Signals(sig).name, " <- ".join(where[:12]))
        deadline = time.monotonic() + 1.0
        while True:
            if v.proc.poll() is not None:
                return "killed", "victim ended with %s" % v.proc.returncode
            after = snapshot(v.pid)
            if after == before and _state(v.pid) not in "tT":
                break
            if time.monotonic() > deadline:
                diff = sorted(k for k in before if before[k] != after[k])
                if after["sig"] != before["sig"]:
                    diff = ["%s=%s (was %s)" % (k, after["sig"][k], before["sig"][k])
                            for k in before["sig"] if after["sig"][k] != before["sig"][k]] + diff
                extra = [line.split()[0] + " " + line.split()[1] for line in after["maps"].splitlines()
                         if line not in before["maps"].splitlines()]
                extra += ["fd %s -> %s" % (fd, _link(v.pid, fd)) for fd in after["fds"] if fd not in before["fds"]]
                return "leftover", "after 1 s: %s%s; state %s%s" % (
                    ", ".join(diff) or "stopped", " %s" % extra if extra else "", _state(v.pid), _last_error(errors))
            time.sleep(0.01)
        if mode.endswith("read"):
            v.send(b"hello")            # the read it was blocked in must still take it
            expected = "read 5 hello"
        else:
            os.kill(v.pid, signal.SIGUSR1)
            expected = "regs ok"
        try:
            line = v.readline(timeout=5)
        except (EOFError, TimeoutError) as e:
            return ("killed" if v.proc.poll() is not None else "harmed"), str(e)
        if line != expected:
            return "harmed", line
        return "clean", ""
    finally:
        if caller is not None:
            if caller.poll() is None:
                caller.kill()
                caller.wait(10)
            caller.stdout.close()
        errors.close()
        v.kill()


def build_victim(out_dir):
    cc = os.environ.get("CC", "cc")
    out = os.path.join(out_dir, "victim")
    subprocess.run([cc, "-O1", "-pthread", "-o", out, os.path.join(HERE, "victims", "victim.c")], check=True,
                   timeout=120)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--runs", type=int, default=20, help="runs per scenario and signal (default 20)")
    ap.add_argument("--seed", type=int, default=None)
    ap.add_argument("scenarios", nargs="*", help="default: all of %s" % ", ".join(SCENARIOS))
    args = ap.parse_args(argv)
    for s in args.scenarios:
        if s not in SCENARIOS:
            ap.error("unknown scenario %r" % s)
    rng = random.Random(args.seed)
    outcomes = ("clean", "killed", "harmed", "leftover", "hang", "error")
    print("| scenario | signal | runs | " + " | ".join(outcomes) + " |")
    print("|---|---|---|" + "---|" * len(outcomes))
    with tempfile.TemporaryDirectory() as tmp:
        exe = build_victim(tmp)
        for name in args.scenarios or SCENARIOS:
            for sig in SCENARIOS[name][1]:
                counts = dict.fromkeys(outcomes, 0)
                details = []
                for _ in range(args.runs):
                    outcome, detail = one_run(exe, name, sig, rng=rng)
                    counts[outcome] += 1
                    if detail:
                        details.append(detail)
                print("| %s | %s | %d | %s |" % (name, signal.Signals(sig).name, args.runs,
                                                 " | ".join(str(counts[o]) for o in outcomes)), flush=True)
                for d in sorted(set(details))[:3]:
                    print("|   | %s |" % d, file=sys.stderr)


if __name__ == "__main__":
    main()
