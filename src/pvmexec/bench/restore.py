"""`pvmexec bench restore`: migration downtime, stop-the-world dump + restore against pre-dumps + restore.

The target keeps a working set (1 GiB; 128 MiB with --quick) and dirties 1% of it every 100 ms
while counting its work (the dump bench's target). Each way: dump it (killed at the end of the
freeze), restore it from the image, and check that its work goes on. Reported: the freeze, the
restore (image to the first instruction of the restored process) and the downtime (from the
freeze to that instruction), in one run. Choosing the restored pid needs root.
"""
import os
import shutil
import struct
import subprocess
import tempfile
import time

from .. import _core
from .common import compile_c, report

KINDS = ("stop-the-world", "pre-dumps")
_ALL_CPUS = os.sched_getaffinity(0)


def run(quick=False, on_row=None):
    size_mb = 128 if quick else 1024
    cpus = sorted(os.sched_getaffinity(0))
    mine, theirs = cpus[0], cpus[-1]
    out = {"working_set_mib": size_mb, "placement": "target on cpu %d, dumper on cpu %d, restorer on any (it sums the "
           "image's checksums on a second thread); image in %s" % (theirs, mine, tempfile.gettempdir())}
    old_affinity = os.sched_getaffinity(0)
    os.sched_setaffinity(0, {mine})
    try:
        with tempfile.TemporaryDirectory(prefix="pvmexec-bench-restore-") as work_dir:
            exe = compile_c(work_dir, "dirty_writer")
            for kind in KINDS:
                out[kind] = _one(exe, os.path.join(work_dir, kind), size_mb, kind, theirs)
                if on_row:
                    on_row((kind, out[kind]))
    finally:
        os.sched_setaffinity(0, old_affinity)
    out["downtime_ratio"] = out["stop-the-world"]["downtime_s"] / out["pre-dumps"]["downtime_s"]
    return out


def _one(exe, image, size_mb, kind, cpu):
    from ..checkpoint import dump, restore
    target = subprocess.Popen([exe, str(size_mb)], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                              stdin=subprocess.DEVNULL, text=True, preexec_fn=lambda: os.sched_setaffinity(0, {cpu}))
    restored = None
    try:
        addr = int(target.stdout.readline(), 16)
        time.sleep(0.3)
        frozen = []
        m = dump(target.pid, image, pre_dumps=0, until_converged=kind == "pre-dumps", leave_running=False,
                 on_frozen=lambda pid: frozen.append(time.monotonic()))
        target.wait(10)
        target.stdout.close()
        pinned = os.sched_getaffinity(0)
        os.sched_setaffinity(0, _ALL_CPUS)
        t0 = time.monotonic()
        restored = restore(image, stdio=(0, 1, 2))
        t1 = time.monotonic()
        os.sched_setaffinity(0, pinned)
        before = struct.unpack("<Q", _core.vm_read(restored.pid, addr, 8))[0]
        time.sleep(0.2)
        after = struct.unpack("<Q", _core.vm_read(restored.pid, addr, 8))[0]
        # on_frozen runs once the image is written, freeze_seconds after the freeze began.
        return dict(freeze_s=m["freeze_seconds"], restore_s=t1 - t0, downtime_s=t1 - (frozen[0] - m["freeze_seconds"]),
                    image_mib=m["bytes_written"] / 2 ** 20, rounds=len(m["rounds"]), goes_on=after > before)
    finally:
        if target.poll() is None:
            target.kill()
            target.wait(10)
        if restored is not None:
            os.kill(restored.pid, 9)
            restored.wait()
        shutil.rmtree(image, ignore_errors=True)


def _header(quick):
    return "\n".join(["pvmexec bench restore — a %d MiB working set, 1%% dirtied every 100 ms; dumped with --kill, "
                      "then restored" % (128 if quick else 1024), "",
                      "%-16s %8s %10s %10s %10s %10s %9s" % ("", "rounds", "image MiB", "freeze", "restore",
                                                            "downtime", "goes on")])


def _line(kind_row):
    kind, r = kind_row
    return "%-16s %8d %10.1f %9.3fs %9.3fs %9.3fs %9s" % (kind, r["rounds"], r["image_mib"], r["freeze_s"],
                                                         r["restore_s"], r["downtime_s"], "yes" if r["goes_on"] else "NO")


def format_table(r, rows=True):
    lines = [_header(r["working_set_mib"] == 128)] + [_line((k, r[k])) for k in KINDS] if rows else []
    lines += ["", "placement: " + r["placement"],
              "downtime, stop-the-world / pre-dumps: %.1fx" % r["downtime_ratio"]]
    return "\n".join(lines)


def main(args):
    if os.geteuid() != 0:
        print("pvmexec bench restore: restoring a process's own pid needs root (or CAP_CHECKPOINT_RESTORE)")
        return 1
    return report(args, run, _header, _line, format_table)
