"""`pvmexec bench restore`: migration downtime and restore time, eager against lazy, stop-the-world
against pre-dumps, for a 128 MiB and a 1 GiB target (128 MiB only with --quick).

The target keeps a working set and dirties 1% of it every 100 ms while counting its work (the dump
bench's target). Each way it is dumped (killed at the end of the freeze), and the image restored
twice: eagerly (every page written before it runs) and lazily (pages filled on first touch, the
rest in the background), each time checking that its work goes on. Reported: the freeze, the
restore (image to the first instruction of the restored process), the downtime (from the freeze to
that instruction, as if this restore had followed the dump at once), and for a lazy restore when
all of its memory was in. Choosing the restored pid needs root.
"""
import os
import shutil
import struct
import subprocess
import tempfile
import time

from .. import _core
from .common import compile_c, report

KINDS = ("stop-the-world", "stop-the-world, lazy", "pre-dumps", "pre-dumps, lazy")
_ALL_CPUS = os.sched_getaffinity(0)


def run(quick=False, on_row=None):
    sizes = (128,) if quick else (128, 1024)
    cpus = sorted(os.sched_getaffinity(0))
    mine, theirs = cpus[0], cpus[-1]
    out = {"sizes_mib": list(sizes), "placement": "target on cpu %d, dumper on cpu %d, restorer and page server on "
           "any (an eager restore sums the image's checksums on a second thread); image in %s" % (
               theirs, mine, tempfile.gettempdir())}
    old_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {mine})
    try:
        with tempfile.TemporaryDirectory(prefix="pvmexec-bench-restore-") as work_dir:
            exe = compile_c(work_dir, "dirty_writer")
            for size in sizes:
                rows = out["%d MiB" % size] = {}
                for kind in ("stop-the-world", "pre-dumps"):
                    for lazy, row in _one(exe, os.path.join(work_dir, kind), size, kind, theirs):
                        name = kind + (", lazy" if lazy else "")
                        rows[name] = row
                        if on_row:
                            on_row(("%d MiB" % size, name, row))
                rows["downtime_ratio"] = rows["stop-the-world"]["downtime_s"] / rows["pre-dumps, lazy"]["downtime_s"]
    finally:
        os.sched_setaffinity(0, old_affinity)
    return out


def _one(exe, image, size_mb, kind, cpu):
    """Dump the target one way, then restore the image eagerly and lazily: [(lazy, row)]."""
    from ..checkpoint import dump
    target = subprocess.Popen([exe, str(size_mb)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, text=True, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    try:
        addr = int(target.stdout.readline(), 16)
        time.sleep(0.3)
        frozen = []
        m = dump(target.pid, image, pre_dumps=0, until_converged=kind == "pre-dumps", leave_running=False,
                 on_frozen=lambda pid: frozen.append(time.monotonic()))
        target.wait(10)
        target.stdout.close()
        # on_frozen runs once the image is written, freeze_seconds after the freeze began.
        written = m["freeze_seconds"]
        rows = [(lazy, dict(freeze_s=m["freeze_seconds"], image_mib=m["bytes_written"] / 2 ** 20,
                            rounds=len(m["rounds"]), **_restored(image, addr, lazy, written)))
                for lazy in (False, True)]
        return rows
    finally:
        if target.poll() is None:
            target.kill()
            target.wait(10)
        shutil.rmtree(image, ignore_errors=True)


def _restored(image, addr, lazy, written):
    from ..checkpoint import restore
    pinned = os.sched_getaffinity(0)
    os.sched_setaffinity(0, _ALL_CPUS)
    restored = None
    try:
        t0 = time.monotonic()
        restored = restore(image, stdio=(0, 1, 2), lazy=lazy)
        t1 = time.monotonic()
        if restored.server is not None:       # it exits once all is in
            os.waitpid(restored.server, 0)
            restored.server = None
        t2 = time.monotonic()
        os.sched_setaffinity(0, pinned)
        before = struct.unpack("<Q", _core.vm_read(restored.pid, addr, 8))[0]
        time.sleep(0.2)
        after = struct.unpack("<Q", _core.vm_read(restored.pid, addr, 8))[0]
        return dict(restore_s=t1 - t0, downtime_s=written + t1 - t0, all_in_s=t2 - t0 if lazy else t1 - t0,
                    goes_on=after > before)
    finally:
        os.sched_setaffinity(0, pinned)
        if restored is not None:
            os.kill(restored.pid, 9)
            restored.wait()


def _header(quick):
    return "\n".join(["pvmexec bench restore — a working set with 1%% dirtied every 100 ms; dumped with --kill, "
                      "then restored eagerly and lazily (%s)" % ("128 MiB" if quick else "128 MiB and 1 GiB"), "",
                      "%-8s %-20s %6s %9s %8s %8s %9s %8s %7s" % ("", "", "rounds", "image MiB", "freeze", "restore",
                                                                 "downtime", "all in", "goes on")])


def _line(row):
    size, kind, r = row
    return "%-8s %-20s %6d %9.1f %7.3fs %7.3fs %8.3fs %7.3fs %7s" % (
        size, kind, r["rounds"], r["image_mib"], r["freeze_s"], r["restore_s"], r["downtime_s"], r["all_in_s"],
        "yes" if r["goes_on"] else "NO")


def format_table(r, rows=True):
    lines = [_header(r["sizes_mib"] == [128])] + [_line((size, k, r["%d MiB" % s][k])) for s in r["sizes_mib"]
                                                   for size in ["%d MiB" % s] for k in KINDS] if rows else []
    lines += ["", "placement: " + r["placement"]]
    lines += ["downtime at %d MiB, stop-the-world / pre-dumps with a lazy restore: %.1fx (%.0f ms per GiB)" % (
        s, r["%d MiB" % s]["downtime_ratio"], r["%d MiB" % s]["pre-dumps, lazy"]["downtime_s"] * 1000 * 1024 / s)
        for s in r["sizes_mib"]]
    return "\n".join(lines)


def main(args):
    if os.geteuid() != 0:
        print("pvmexec bench restore: restoring a process's own pid needs root (or CAP_CHECKPOINT_RESTORE)")
        return 1
    return report(args, run, _header, _line, format_table)
