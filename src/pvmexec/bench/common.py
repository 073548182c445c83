"""What every benchmark shares: the machine it ran on, building its C programs (bench/programs/), its report."""
import json
import os
import platform
import shutil
import subprocess


PROGRAMS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "programs")


def machine():
    model = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {"cpu": model, "cpus": os.cpu_count(), "kernel": platform.release(),
            "python": platform.python_version(), "machine": platform.machine()}


class Rows(list):
    """A benchmark's result rows; each is handed to on_row as it is measured (the table streams)."""

    def __init__(self, on_row=None):
        super().__init__()
        self.on_row = on_row

    def append(self, row):
        super().append(row)
        if self.on_row:
            self.on_row(row)


def streamed(header, line):
    """on_row for a table: prints header before the first row, then line(row) for each, flushed."""
    started = []

    def on_row(row):
        if not started:
            print(header, flush=True)
            started.append(True)
        text = line(row)
        if text is not None:
            print(text, flush=True)
    return on_row


def program_source(name):
    """The path of bench/programs/NAME.c (shipped with the package; the tests build them too)."""
    return os.path.join(PROGRAMS, name + ".c")


def compile_c(work_dir, name, *flags):
    """Build bench/programs/NAME.c into work_dir; returns the executable's path."""
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    if not cc:
        raise RuntimeError("this benchmark needs a C compiler for its %s program" % name)
    exe = os.path.join(work_dir, name)
    subprocess.run([cc, "-O2", *flags, "-o", exe, program_source(name)], check=True)
    return exe


def report(args, run, header, line, format_table):
    """A benchmark's main: one JSON object, or rows streamed as measured and then the summary."""
    if args.json:
        print(json.dumps(run(quick=args.quick), indent=2))
    else:
        result = run(quick=args.quick, on_row=streamed(header(args.quick), line))
        print(format_table(result, rows=False))
    return 0
