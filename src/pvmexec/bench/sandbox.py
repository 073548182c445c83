"""`pvmexec bench sandbox`: the application kernel against native runs, our ptrace engine and strace.

The same programs, in one run: natively; under `pvmexec run` (stub spaces,
trivial calls answered in C); under `pvmexec run` on the ptrace engine; and
under `strace -f -o /dev/null`. Wall-clock seconds, median of several runs,
slowdown versus native, and the ratios the fast engine is judged by.
"""
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time

from .common import Rows, compile_c, machine, streamed


_PROJECT = {                                    # a small C project for make -j2
    "Makefile": "prog: main.o a.o b.o c.o\n\t$(CC) -o $@ $^\n%.o: %.c\n\t$(CC) -O1 -c -o $@ $<\n",
    "main.c": "int a(void), b(void), c(void);\nint main(void) { return a() + b() + c(); }\n",
    "a.c": "#include <stdio.h>\nint a(void) { return printf(\"%s\", \"\") ; }\n",
    "b.c": "#include <string.h>\nint b(void) { return (int)strlen(\"\"); }\n",
    "c.c": "#include <stdlib.h>\nint c(void) { return abs(0); }\n",
}


class Workload:
    """One row: argv run in the work directory (a fresh `run/` below it where it writes files); per:
    what the µs figure counts (syscalls or iterations) and how many."""

    def __init__(self, name, what, argv, per=None, count=None, fresh_dir=False):
        self.name, self.what, self.per, self.count = name, what, per, count
        self.argv = ["/bin/sh", "-c", "rm -rf run && mkdir run && cd run && " + argv] if fresh_dir else argv


def _workloads(work, quick):
    n = 2000 if quick else 20000
    out = [Workload("syscall-heavy", "5 identity calls + 1-byte pipe write and read, x%d (%d syscalls)" % (n, 7 * n),
                    [compile_c(work, "syscall_heavy"), str(n)], "syscall", 7 * n)]
    spawns = 50 if quick else 300
    out.append(Workload("fork+exec+wait", "fork, execve of a static program that exits, waitpid; x%d" % spawns,
                        [compile_c(work, "spawn_loop"), str(spawns), compile_c(work, "exit_at_once", "-static")],
                        "iteration", spawns))
    loops = 100 if quick else 500
    bash = shutil.which("bash")
    if bash:
        out.append(Workload("bash $(...) loop", "bash: %d iterations of x=$(printf %%d $i)" % loops,
                            [bash, "-c", "for i in $(seq %d); do x=$(printf %%d $i); done" % loops], "iteration", loops))
    gcc = shutil.which("gcc")
    if gcc:
        with open(os.path.join(work, "hello.c"), "w") as f:
            f.write('#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n')
        out.append(Workload("gcc hello", "gcc -o hello hello.c (compile and link)", "%s -o hello ../hello.c" % gcc,
                            fresh_dir=True))
        make = shutil.which("make")
        if make:
            os.mkdir(os.path.join(work, "project"))
            for name, text in _PROJECT.items():
                with open(os.path.join(work, "project", name), "w") as f:
                    f.write(text)
            out.append(Workload("make -j2", "make -j2 of a 4-file C project (gcc)",
                                "cp ../project/* . && %s -s -j2 CC=%s" % (make, gcc), fresh_dir=True))
    git = shutil.which("git")
    if git:
        out.append(Workload("git init+commit", "git init, 20 files, git add, git commit",
                            "%s init -q && for i in $(seq 20); do echo $i > f$i; done && %s add . && "
                            "%s -c user.name=bench -c user.email=bench@example.invalid commit -qm one" % (git, git, git),
                            fresh_dir=True))
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    out.append(Workload("python3 imports", "%s -c 'import json, sqlite3, email.parser'" % py,
                        [py, "-c", "import json, sqlite3, email.parser"]))
    tar = shutil.which("tar")
    stdlib = sysconfig.get_paths()["stdlib"]
    tree = [d for d in ("json", "email", "xml", "asyncio", "concurrency") if os.path.isdir(os.path.join(stdlib, d))]
    if tar and tree:
        out.append(Workload("tar czf", "%s -czf - of %s in %s" % (tar, " ".join(tree), stdlib),
                            [tar, "-C", stdlib, "-czf", "-"] + tree))
    return out


def _time(fn, repeat):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def run(quick=False, on_row=None):
    """Measure every workload; on_row(row) sees each as it is measured."""
    from ..kernel import Policy, Sandbox
    repeat = 1 if quick else 3
    strace = shutil.which("strace")
    results = Rows(on_row)
    with tempfile.TemporaryDirectory(prefix="pvmexec-bench-") as work:
        sink_path = os.path.join(work, "stdout")
        for w in _workloads(work, quick):
            row = dict(workload=w.name, command=w.what, per=w.per, count=w.count)

            def native():
                with open(sink_path, "wb") as sink:
                    subprocess.run(w.argv, stdout=sink, stderr=subprocess.DEVNULL, check=True, timeout=600, cwd=work)

            def sandboxed(engine):
                def go():
                    with open(sink_path, "wb") as sink, open(os.devnull, "wb") as null:
                        box = Sandbox(Policy(writable=[work]), engine=engine)
                        try:
                            status = box.run(w.argv, stdout=sink.fileno(), stderr=null.fileno(), cwd=work)
                        finally:
                            box.policy.close()
                    if status != 0:
                        raise RuntimeError("%s under the sandbox (%s engine) ended with status %#x" % (
                            w.name, engine, status))
                return go

            def straced():
                with open(sink_path, "wb") as sink:
                    subprocess.run([strace, "-f", "-o", "/dev/null"] + w.argv, stdout=sink, stderr=subprocess.DEVNULL,
                                   check=True, timeout=600, cwd=work)

            row["native_s"] = _time(native, repeat)
            row["pvmexec_s"] = _time(sandboxed("stub"), repeat)
            row["pvmexec_ptrace_s"] = _time(sandboxed("ptrace"), 1 if w.per else repeat)
            row["strace_s"] = _time(straced, repeat) if strace else None
            results.append(row)
    heavy = results[0]
    ratios = {
        "syscall-heavy: strace / pvmexec": heavy["strace_s"] / heavy["pvmexec_s"] if heavy["strace_s"] else None,
        "syscall-heavy: pvmexec ptrace engine / pvmexec": heavy["pvmexec_ptrace_s"] / heavy["pvmexec_s"],
    }
    return {"machine": machine(), "results": results, "ratios": ratios, "repeat": repeat, "placement": PLACEMENT}


PLACEMENT = ("not pinned: the caller and each guest's stub run where the scheduler puts them "
             "(2 CPUs here); each stub spins briefly before sleeping when on the other CPU")


def _header(repeat):
    m = machine()
    return "\n".join(["pvmexec bench sandbox — wall-clock seconds, median of %d; %s, %d CPUs, Linux %s" % (
        repeat, m["cpu"], m["cpus"], m["kernel"]), PLACEMENT, "",
        "%-18s %9s %16s %16s %16s" % ("workload", "native", "pvmexec run", "ptrace engine", "strace -f")])


def _line(r):
    def cell(v):
        return "%8.3f (%5.1fx)" % (v, v / r["native_s"]) if v is not None else "%16s" % "n/a"
    return "%-18s %9.3f %16s %16s %16s" % (r["workload"], r["native_s"], cell(r["pvmexec_s"]),
                                           cell(r["pvmexec_ptrace_s"]), cell(r["strace_s"]))


def format_table(report, rows=True):
    """The report as a table; rows=False: only what follows the rows (they were streamed)."""
    out = [_header(report["repeat"])] + [_line(r) for r in report["results"]] if rows else []
    for r in report["results"]:
        if r["per"] == "syscall":                       # what the calls add: the program's own time taken out
            out.append("")
            out.append("%s: %.2f µs per syscall under pvmexec run, %.2f on the ptrace engine, %s under strace" % (
                r["workload"], (r["pvmexec_s"] - r["native_s"]) / r["count"] * 1e6,
                (r["pvmexec_ptrace_s"] - r["native_s"]) / r["count"] * 1e6,
                "%.2f" % ((r["strace_s"] - r["native_s"]) / r["count"] * 1e6) if r["strace_s"] else "n/a"))
        elif r["per"] == "iteration":
            out.append("")
            out.append("%s: %.0f µs per iteration natively, %.0f under pvmexec run, %.0f on the ptrace engine, %s "
                       "under strace" % (r["workload"], r["native_s"] / r["count"] * 1e6,
                                         r["pvmexec_s"] / r["count"] * 1e6, r["pvmexec_ptrace_s"] / r["count"] * 1e6,
                                         "%.0f" % (r["strace_s"] / r["count"] * 1e6) if r["strace_s"] else "n/a"))
    out.append("")
    out.append("Commands:")
    for r in report["results"]:
        out.append("  %-18s %s" % (r["workload"], r["command"]))
    out.append("")
    for label, v in report["ratios"].items():
        out.append("%-50s %s" % (label, "%.1fx" % v if v else "n/a (strace not installed)"))
    return "\n".join(out)


def main(args):
    if args.json:
        print(json.dumps(run(quick=args.quick), indent=2))
    else:
        report = run(quick=args.quick, on_row=streamed(_header(1 if args.quick else 3), _line))
        print(format_table(report, rows=False))
    return 0
