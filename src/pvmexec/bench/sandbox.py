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


def _workloads(work, quick):
    n = 2000 if quick else 20000
    heavy = compile_c(work, "syscall_heavy")
    out = [("syscall-heavy", "5 identity calls + 1-byte pipe write and read, x%d (%d syscalls)" % (n, 7 * n),
            [heavy, str(n)], 7 * n)]
    tar = shutil.which("tar")
    stdlib = sysconfig.get_paths()["stdlib"]
    tree = [d for d in ("json", "email", "xml", "asyncio", "concurrency") if os.path.isdir(os.path.join(stdlib, d))]
    if tar and tree:
        out.append(("tar", "%s -cf - of %s in %s" % (tar, " ".join(tree), stdlib), [tar, "-C", stdlib, "-cf", "-"] + tree,
                    None))
    py = "/usr/bin/python3" if os.path.exists("/usr/bin/python3") else sys.executable
    out.append(("python3 start-up", "%s -c pass" % py, [py, "-c", "pass"], None))
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
    from ..kernel import Sandbox
    repeat = 1 if quick else 3
    strace = shutil.which("strace")
    results = Rows(on_row)
    with tempfile.TemporaryDirectory(prefix="pvmexec-bench-") as work:
        sink_path = os.path.join(work, "stdout")
        for name, what, argv, syscalls in _workloads(work, quick):
            row = dict(workload=name, command=what, syscalls=syscalls)

            def native():
                with open(sink_path, "wb") as sink:
                    subprocess.run(argv, stdout=sink, stderr=subprocess.DEVNULL, check=True, timeout=600)

            def sandboxed(engine):
                def go():
                    with open(sink_path, "wb") as sink, open(os.devnull, "wb") as null:
                        status = Sandbox(engine=engine).run(argv, stdout=sink.fileno(), stderr=null.fileno())
                    if status != 0:
                        raise RuntimeError("%s under the sandbox (%s engine) ended with status %#x" % (
                            argv[0], engine, status))
                return go

            def straced():
                with open(sink_path, "wb") as sink:
                    subprocess.run([strace, "-f", "-o", "/dev/null"] + argv, stdout=sink, stderr=subprocess.DEVNULL,
                                   check=True, timeout=600)

            row["native_s"] = _time(native, repeat)
            row["pvmexec_s"] = _time(sandboxed("stub"), repeat)
            row["pvmexec_ptrace_s"] = _time(sandboxed("ptrace"), 1 if name == "syscall-heavy" else repeat)
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
        if r["syscalls"]:
            out.append("")
            out.append("%s: %.2f µs per syscall under pvmexec run, %.2f on the ptrace engine, %s under strace" % (
                r["workload"], (r["pvmexec_s"] - r["native_s"]) / r["syscalls"] * 1e6,
                (r["pvmexec_ptrace_s"] - r["native_s"]) / r["syscalls"] * 1e6,
                "%.2f" % ((r["strace_s"] - r["native_s"]) / r["syscalls"] * 1e6) if r["strace_s"] else "n/a"))
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
