"""`pvmexec bench dump`: stop-the-world dump against pre-dumps plus a short freeze.

The target keeps a working set (1 GiB; 128 MiB with --quick) and dirties 1%
of it every 100 ms while counting its own work. In one run: (a) a dump that
freezes the target and copies everything, (b) pre-dumps while it runs, then
the final frozen round, once with pre-dump pages copied by process_vm_readv
(the default) and once moved by vmsplice. Reported: freeze time, total time, copy throughput
(into the image), and the target's work rate during the
pre-dumps against its undisturbed rate.
"""
import os
import shutil
import struct
import subprocess
import tempfile
import time

from .. import _core
from .common import compile_c, report


KINDS = ("stop-the-world", "pre-dump", "pre-dump (vmsplice)")


def _work(pid, addr):
    return struct.unpack("<Q", _core.vm_read(pid, addr, 8))[0]


def _rate(pid, addr, seconds):
    a, t0 = _work(pid, addr), time.monotonic()
    time.sleep(seconds)
    return (_work(pid, addr) - a) / (time.monotonic() - t0)


def run(quick=False, on_row=None):
    """Both ways of dumping, in one run; on_row((kind, row)) sees each as it is measured."""
    size_mb = 128 if quick else 1024
    pre_dumps = None
    cpus = sorted(os.sched_getaffinity(0))
    mine, theirs = cpus[0], cpus[-1]
    where = None                    # the temp dir (a disk's page cache): faster here than tmpfs
    out = {"working_set_mib": size_mb, "dirty": "1% of the pages every 100 ms", "pre_dumps": "until converged",
           "placement": "target on cpu %d, dumper on cpu %d; image in %s (copy GB/s includes writing it)" % (
               theirs, mine, where or tempfile.gettempdir())}
    old_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {mine})
    try:
        with tempfile.TemporaryDirectory(prefix="pvmexec-bench-dump-", dir=where) as work_dir:
            _runs(out, work_dir, size_mb, pre_dumps, quick, theirs, on_row)
    finally:
        os.sched_setaffinity(0, old_affinity)
    out["freeze_ratio"] = out["stop-the-world"]["freeze_s"] / out["pre-dump"]["freeze_s"]
    return out


def _runs(out, work_dir, size_mb, pre_dumps, quick, cpu, on_row):
    from ..checkpoint import dump
    exe = compile_c(work_dir, "dirty_writer")
    for kind in KINDS:
        target = subprocess.Popen([exe, str(size_mb)], stdout=subprocess.PIPE, text=True,
                                  preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
        try:
            addr = int(target.stdout.readline(), 16)
            undisturbed = _rate(target.pid, addr, 0.5 if quick else 1.0)
            image = os.path.join(work_dir, kind)
            marks = []
            w0 = _work(target.pid, addr)
            t0 = time.monotonic()
            m = dump(target.pid, image, pre_dumps=0, until_converged=kind != "stop-the-world",
                     transfer="vmsplice" if "vmsplice" in kind else "readv",
                     progress=lambda r, p, b: marks.append((time.monotonic(), _work(target.pid, addr), b)))
            row = dict(freeze_s=m["freeze_seconds"], total_s=m["total_seconds"], bytes=m["bytes_written"],
                       rounds=len(m["rounds"]),
                       throughput_gbs=m["bytes_written"] / 1e9 / sum(r["seconds"] for r in m["rounds"]),
                       undisturbed_work_per_s=undisturbed)
            if kind != "stop-the-world" and len(marks) > 1:
                t_pre, w_pre, _ = marks[-2]                     # the last round while it ran
                row["pre_dump_work_per_s"] = (w_pre - w0) / (t_pre - t0)
                row["progress_kept"] = row["pre_dump_work_per_s"] / undisturbed
            out[kind] = row
            if on_row:
                on_row((kind, row))
            shutil.rmtree(image)
        finally:
            target.kill()
            target.wait(10)


def _header(quick):
    return "\n".join(["pvmexec bench dump — a %d MiB working set, 1%% of the pages dirtied every 100 ms; "
                      "pre-dumps copy by process_vm_readv (or vmsplice)" % (128 if quick else 1024), "",
                      "%-20s %10s %10s %8s %11s %14s" % ("", "freeze", "total", "rounds", "copy GB/s", "target work")])


def _line(kind_row):
    kind, row = kind_row
    kept = "%.0f%% of rate" % (100 * row["progress_kept"]) if "progress_kept" in row else "frozen"
    return "%-20s %9.3fs %9.3fs %8d %11.2f %14s" % (kind, row["freeze_s"], row["total_s"], row["rounds"],
                                                   row["throughput_gbs"], kept)


def format_table(r, rows=True):
    """The report as a table; rows=False: only what follows the rows (they were streamed)."""
    lines = [_header(r["working_set_mib"] == 128)] + [_line((k, r[k])) for k in KINDS] if rows else []
    lines.append("")
    lines.append("placement: " + r["placement"])
    lines.append("freeze time, stop-the-world / pre-dumps: %.1fx" % r["freeze_ratio"])
    for kind in KINDS[1:]:
        if "progress_kept" in r[kind]:
            lines.append("target's work rate during the pre-dumps (%s): %.0f%% of undisturbed" % (
                "vmsplice" if "vmsplice" in kind else "process_vm_readv", 100 * r[kind]["progress_kept"]))
    return "\n".join(lines)


def main(args):
    return report(args, run, _header, _line, format_table)
