"""The command line, run as a user would."""
import contextlib
import json
import os
import re
import shutil
import stat
import signal
import subprocess
import sys
import time

import pytest


def pvmexec(*args, timeout=120):
    return subprocess.run([sys.executable, "-m", "pvmexec", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def test_help():
    out = pvmexec("--help")
    assert out.returncode == 0 and "syscall" in out.stdout and "bench" in out.stdout
    out = pvmexec("syscall", "--help")
    assert out.returncode == 0 and "PID" in out.stdout


def test_syscall_prints_result_and_errors_by_name(spawn):
    v = spawn("wait")
    out = pvmexec("syscall", v.pid, "getpid")
    assert out.returncode == 0 and out.stdout.strip() == "getpid() = %d" % v.pid
    out = pvmexec("syscall", v.pid, "openat", -100, "/nonexistent", 0)
    assert out.returncode == 1
    # the arguments as the sandbox's trace and strace show them
    assert out.stdout.strip() == 'openat(AT_FDCWD, "/nonexistent", O_RDONLY) = -1 ENOENT (No such file or directory)'
    out = pvmexec("syscall", v.pid, "write", 1, "hi from the target\n", 19)
    assert out.returncode == 0 and out.stdout.strip().endswith("= 19")
    assert v.readline() == "hi from the target"
    out = pvmexec("syscall", v.pid, "getppid", "--hex")
    assert out.stdout.strip() == "getppid() = %#x" % os.getpid()


def test_syscall_bad_input(spawn):
    out = pvmexec("syscall", 1, "frobnicate")
    assert out.returncode == 2 and "unknown x86-64 system call 'frobnicate'" in out.stderr
    out = pvmexec("syscall", 4_000_000, "getpid")
    assert out.returncode == 1 and "no such process: 4000000" in out.stderr


def test_bench_json_quick():
    out = pvmexec("bench", "--json", "--quick", timeout=300)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert {"machine", "results"} <= set(report)
    modes = {(r["mode"], r["engine"], r["loop"]) for r in report["results"]}
    for mode in ("exec-syscall", "exec-fault", "syscall"):
        assert (mode, "ptrace", "c") in modes and (mode, "ptrace", "python") in modes
    assert ("syscall-batch", "ptrace", "python") in modes
    for mode in ("syscall", "syscall-batch"):
        assert (mode, "agent", "c") in modes and (mode, "agent", "python") in modes
    for mode in ("exec-syscall", "exec-fault"):
        assert (mode, "stub", "c") in modes and (mode, "stub", "python") in modes
    for r in report["results"]:
        assert r["placement"]
        if r["mode"] == "idle-cpu":
            assert 0 <= r["cpu_percent"] < 100
        else:
            assert r["us_per_op"] > 0
    assert report["ratios"]


def test_bench_sandbox_and_dump_json_quick():
    out = pvmexec("bench", "sandbox", "--json", "--quick", timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    names = [r["workload"] for r in report["results"]]
    assert names[0] == "syscall-heavy" and {"fork+exec+wait", "python3 imports"} <= set(names)
    for r in report["results"]:
        assert r["native_s"] > 0 and r["pvmexec_s"] > 0 and r["pvmexec_ptrace_s"] > 0
    assert set(report["ratios"]) == {"syscall-heavy: strace / pvmexec", "syscall-heavy: pvmexec ptrace engine / pvmexec"}
    out = pvmexec("bench", "dump", "--json", "--quick", timeout=600)
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    assert report["stop-the-world"]["rounds"] == 1 and report["pre-dump"]["rounds"] >= 2
    assert report["freeze_ratio"] > 0 and 0 < report["pre-dump"]["progress_kept"]
    assert report["placement"]
    out = pvmexec("bench", "restore", "--json", "--quick", timeout=600)
    if os.geteuid() != 0:
        assert out.returncode == 1 and "needs root" in out.stdout
        return
    assert out.returncode == 0, out.stderr
    report = json.loads(out.stdout)
    rows = report["128 MiB"]
    for kind in ("stop-the-world", "stop-the-world, lazy", "pre-dumps", "pre-dumps, lazy"):
        r = rows[kind]
        assert r["goes_on"] and 0 < r["restore_s"] < r["downtime_s"] and r["restore_s"] <= r["all_in_s"]
    assert rows["pre-dumps"]["rounds"] >= 2 and rows["downtime_ratio"] > 0


def test_run_trace_is_a_flag_and_never_destroys_a_file(tmp_path):
    exe = tmp_path / "echo-copy"
    shutil.copy("/bin/echo", exe)
    before = exe.read_bytes()
    # typed the strace way: --trace then the program, which must run, not become the trace file
    out = pvmexec("run", "--trace", str(exe), "hi")
    assert out.returncode == 0 and out.stdout == "hi\n" and "+++ exited with 0 +++" in out.stderr
    out = pvmexec("run", "--trace", "ls", "-l", str(exe))
    assert out.returncode == 0 and str(exe) in out.stdout
    out = pvmexec("run", "--trace", "-o", str(exe), "/bin/true")            # an executable as the output
    assert out.returncode == 125 and "refusing to overwrite" in out.stderr and "Traceback" not in out.stderr
    assert exe.read_bytes() == before
    out = pvmexec("run", "--trace", "-o", str(tmp_path), "/bin/true")       # a directory
    assert out.returncode == 125 and "Is a directory" in out.stderr
    out = pvmexec("run", "--trace", "-o", "/dev/null", "/bin/true")         # a device, as strace -o allows
    assert out.returncode == 0 and out.stderr == "" and stat.S_ISCHR(os.stat("/dev/null").st_mode)
    link = tmp_path / "link-to-exe"
    link.symlink_to(exe)
    out = pvmexec("run", "--trace", "-o", str(link), "/bin/true")           # an executable behind a symlink
    assert out.returncode == 125 and "refusing to overwrite" in out.stderr and exe.read_bytes() == before
    trace = tmp_path / "trace.txt"
    out = pvmexec("run", "--trace", "-o", str(trace), "/bin/true")
    assert out.returncode == 0 and "+++ exited with 0 +++" in trace.read_text() and out.stderr == ""


@pytest.mark.parametrize("args, status, message", [
    (["--", "/no/such/program"], 127, "No such file or directory"),
    (["--root", "/no/such", "--", "/bin/true"], 125, "is not a directory"),
    (["--trace=/tmp", "/bin/true"], 125, "ignored explicit argument"),
    (["--writable", "relative", "--", "/bin/true"], 125, "not an absolute guest path"),
    ([], 125, "no program given"),
])
def test_run_errors_are_one_line_with_conventional_statuses(args, status, message):
    out = pvmexec("run", *args)
    assert out.returncode == status and message in out.stderr and "Traceback" not in out.stderr


def test_run_cannot_execute_is_126(tmp_path):
    script = tmp_path / "notes.txt"
    script.write_text("just text\n")
    script.chmod(0o755)
    for target in (script, tmp_path):
        out = pvmexec("run", "--", str(target))
        assert out.returncode == 126 and "Traceback" not in out.stderr, out.stderr


@pytest.mark.parametrize("args, message", [
    (["syscall", "0", "getpid"], "must be above 0"),
    (["syscall", "-5", "getpid"], "must be above 0"),
    (["syscall", "1", "getpid", "i:abc"], "i: needs an integer"),
    (["syscall", "1", "frobnicate"], "unknown x86-64 system call"),
    (["bench", "--iterations", "0"], "must be above 0"),
    (["dump", "--pre-dumps", "-1", "1", "/nonexistent/dir"], "must not be negative"),
    (["dump", "x", "/tmp/d"], "is not a whole number"),
])
def test_bad_input_is_one_line_never_a_traceback(args, message):
    out = pvmexec(*args)
    assert out.returncode == 2 and message in out.stderr and "Traceback" not in out.stderr, out.stderr


def test_image_statuses_as_cmp(tmp_path):
    out = pvmexec("image", "show", str(tmp_path))
    assert out.returncode == 2 and "not a pvmexec image" in out.stderr
    out = pvmexec("image", "verify", str(tmp_path / "none"), "1")
    assert out.returncode == 2 and "Traceback" not in out.stderr
    out = pvmexec("dump", "999999999", str(tmp_path / "img"))
    assert out.returncode == 1 and "no such process" in out.stderr and not (tmp_path / "img").exists()


def test_warnings_in_pvmexecs_words_and_quiet(spawn):
    v = spawn("seccomp")                                 # the agent cannot go in: auto falls back, warning
    out = pvmexec("syscall", "--engine", "auto", v.pid, "getuid")
    assert out.stderr.startswith("pvmexec: warning: agent engine unavailable"), out.stderr
    assert "RuntimeWarning" not in out.stderr and "warnings.warn" not in out.stderr
    out = pvmexec("syscall", "-q", "--engine", "auto", v.pid, "getuid")
    assert "warning" not in out.stderr


def test_completion_and_manual_page_come_from_the_parser():
    out = pvmexec("completion", "bash")
    assert out.returncode == 0 and "pvmexec" in out.stdout and "--writable" in out.stdout
    out = pvmexec("man")
    assert out.returncode == 0 and out.stdout.startswith(".TH PVMEXEC") and "syscall" in out.stdout


def _read_until_exit(fd, proc, seconds):
    import select
    out, deadline = b"", time.monotonic() + seconds
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:                            # the pty's other side closed
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    return out


def test_dump_on_a_terminal_shows_progress_within_a_round(cc, tmp_path):
    """On a terminal, a round in progress shows pages copied of those expected, MiB/s and the time left."""
    import pty
    from pvmexec.bench.common import compile_c
    exe = compile_c(str(tmp_path), "dirty_writer")
    target = subprocess.Popen([exe, "768"], stdout=subprocess.PIPE, text=True)      # 768 MiB, written
    try:
        target.stdout.readline()
        master, slave = pty.openpty()
        dumper = subprocess.Popen([sys.executable, "-m", "pvmexec", "dump", str(target.pid), str(tmp_path / "img"),
                                   "--pre-dumps", "1"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                  stderr=slave)
        os.close(slave)
        try:
            shown = _read_until_exit(master, dumper, 120).decode(errors="replace")
            assert dumper.wait(60) == 0, shown
        finally:
            os.close(master)
            if dumper.poll() is None:
                dumper.kill()
                dumper.wait()
            dumper.stdout.close()
        assert re.search(r"\rround 1: \d+/\d+ pages \(\d+%\), \d+ MiB/s, about \d+ s left", shown), shown
        assert "round 2:" in shown and "frozen" not in shown.split("\n")[-1]
    finally:
        target.kill()
        target.wait()
        target.stdout.close()


def test_bench_rows_stream_as_they_are_measured():
    proc = subprocess.Popen([sys.executable, "-m", "pvmexec", "bench", "dump", "--quick"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]      # title, blank, heading, first row
        assert lines[3].startswith("stop-the-world") and proc.poll() is None, lines  # the rest still to come
        rest = proc.stdout.read()
        assert proc.wait(600) == 0 and "pre-dump (vmsplice)" in rest and "freeze time" in rest
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        proc.stdout.close()
        proc.stderr.close()


def test_an_interactive_shell_in_a_terminal():
    """pvmexec run of bash on a pseudo-terminal: it prompts, runs what is typed, exits with its status."""
    with _on_a_terminal(["/bin/bash", "--norc", "--noprofile", "-i"]) as (proc, master, until):
        assert b"$ " in until(b"$ ")
        os.write(master, b"echo hello $((6*7))\n")
        assert b"hello 42" in until(b"hello 42")
        os.write(master, b"exit 5\n")
        assert proc.wait(20) == 5


@contextlib.contextmanager
def _on_a_terminal(argv):
    """argv (a pvmexec run) as the foreground job of a pseudo-terminal of its own: yields (proc, master,
    until); the terminal is closed and the run killed and reaped at the end, whatever happened."""
    import fcntl
    import pty
    import select
    import termios
    master, slave = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "pvmexec", "run", "-q", "--"] + argv, stdin=slave, stdout=slave,
                            stderr=slave, start_new_session=True,
                            preexec_fn=lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0), env=dict(os.environ, PS1="$ "))
    os.close(slave)

    def until(text, seconds=20):
        seen, deadline = b"", time.monotonic() + seconds
        while text not in seen and time.monotonic() < deadline:
            if select.select([master], [], [], 0.2)[0]:
                try:
                    seen += os.read(master, 4096)
                except OSError:
                    break
        return seen
    try:
        yield proc, master, until
    finally:
        os.close(master)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_job_control_in_an_interactive_shell():
    """Ctrl-Z stops the shell's foreground job (the shell says so), jobs lists it, kill %1 ends it."""
    with _on_a_terminal(["/bin/bash", "--norc", "--noprofile", "-i"]) as (proc, master, until):
        assert b"$ " in until(b"$ ")
        os.write(master, b"sleep 30; echo slept\n")
        time.sleep(1)
        os.write(master, b"\x1a")                                  # Ctrl-Z
        assert re.search(rb"\[1\]\+ +Stopped +sleep 30", until(b"Stopped")), "no stop"
        os.write(master, b"jobs; echo listed$((1+1))\n")           # the echo of what is typed is not the answer
        assert re.search(rb"\[1\]\+ +Stopped", until(b"listed2"))
        os.write(master, b"kill %1; wait; echo gone$((2+2))\n")
        assert b"gone4" in until(b"gone4")
        os.write(master, b"exit 3\n")
        assert proc.wait(20) == 3


def test_ctrl_z_stops_pvmexec_run_and_the_shell_can_continue_it():
    """Ctrl-Z on `pvmexec run PROGRAM` stops the program and pvmexec with it (the shell that ran it sees a
    stopped job); SIGCONT resumes both; the program's output and status are then its own."""
    with _on_a_terminal(["/bin/bash", "-c", "sleep 1.5; echo finished; exit 4"]) as (proc, master, until):
        time.sleep(0.7)
        os.write(master, b"\x1a")
        stopped = False
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline and not stopped:
            pid, status = os.waitpid(proc.pid, os.WUNTRACED | os.WNOHANG)
            stopped = pid == proc.pid and os.WIFSTOPPED(status)
            time.sleep(0.05)
        assert stopped
        time.sleep(2)                                              # stopped: the sleep does not end meanwhile
        assert b"finished" not in until(b"finished", 0.5)
        os.kill(proc.pid, signal.SIGCONT)
        assert b"finished" in until(b"finished")
        assert proc.wait(20) == 4


def test_a_background_job_that_reads_the_terminal_is_stopped():
    """`cat &` in an interactive shell: the read of the terminal stops it (SIGTTIN), the shell keeps its
    input; fg gives the terminal to cat, which then reads and echoes what is typed."""
    with _on_a_terminal(["/bin/bash", "--norc", "--noprofile", "-i"]) as (proc, master, until):
        assert b"$ " in until(b"$ ")
        os.write(master, b"cat &\n")
        time.sleep(1)
        os.write(master, b"echo still$((1+1))\n")
        seen = until(b"Stopped")
        assert b"still2" in seen and re.search(rb"\[1\]\+ +Stopped +cat", seen + until(b"$ ", 2)), seen
        os.write(master, b"fg\n")
        time.sleep(0.5)
        os.write(master, b"typed to cat\n")
        assert until(b"typed to cat\r\ntyped to cat").count(b"typed to cat") == 2
        os.write(master, b"\x04")
        until(b"$ ", 3)
        os.write(master, b"exit 6\n")
        assert proc.wait(20) == 6


def test_a_background_job_that_writes_to_a_tostop_terminal_is_stopped():
    """With `stty tostop`, a background job's write to the terminal stops it (SIGTTOU); fg lets it write."""
    with _on_a_terminal(["/bin/bash", "--norc", "--noprofile", "-i"]) as (proc, master, until):
        assert b"$ " in until(b"$ ")
        os.write(master, b"stty tostop; (sleep 0.3; echo from$((5+5))bg) &\n")
        time.sleep(1.2)
        os.write(master, b"echo mark$((3+3))\n")
        seen = until(b"Stopped")
        assert b"mark6" in seen and b"from10bg" not in seen, seen
        os.write(master, b"fg\n")
        assert b"from10bg" in until(b"from10bg")
        os.write(master, b"stty -tostop; exit 7\n")
        assert proc.wait(20) == 7
