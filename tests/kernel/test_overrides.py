"""The Sandbox API: tracing, and subclasses that fake or deny calls."""
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import pytest
from pvmexec.kernel import Errno, Sandbox

from helpers import *  # noqa: F401,F403


def test_trace_lines(busybox, tmp_path):
    trace = tmp_path / "trace"
    got = sandboxed([busybox, "cat", "/etc/hostname"], "--trace", "-o", str(trace))
    lines = trace.read_text().splitlines()
    assert any('open' in l and '"/etc/hostname", O_RDONLY' in l and l.endswith("= 3") for l in lines), lines
    assert got.stdout == open("/etc/hostname", "rb").read()
    assert any(l.startswith("[pid ") and ("sendfile(1, 3, NULL" in l or "write(1, " in l) for l in lines), lines
    assert lines[-1].endswith("+++ exited with 0 +++")
    got = sandboxed([busybox, "cat", "/nonexistent"], "--trace")
    assert b'"/nonexistent", O_RDONLY) = -1 ENOENT (No such file or directory)' in got.stderr


def test_overriding_handlers_fakes_hostname_and_time(busybox, tmp_path):
    box = FakeWorld(vdso=False)
    status, out = run_captured(box, [busybox, "hostname"], tmp_path)
    assert (status, out) == (0, b"sandboxed\n")
    status, out = run_captured(box, [busybox, "date", "-u", "+%Y-%m-%d"], tmp_path)
    assert (status, out) == (0, b"2001-09-09\n")


def test_a_handler_can_deny_a_call(busybox, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")

    class NoSecrets(Sandbox):
        def sys_openat(self, p, dirfd, path, flags, mode):
            if path is not None and "secret" in path:
                raise Errno(errno.EPERM)
            return Sandbox.sys_openat(self, p, dirfd, path, flags, mode)
    box = NoSecrets()
    status, out = run_captured(box, [busybox, "cat", str(secret)], tmp_path)
    assert os.waitstatus_to_exitcode(status) == 1 and out == b""
    status, out = run_captured(box, [busybox, "cat", "/etc/hostname"], tmp_path)
    assert status == 0 and out == open("/etc/hostname", "rb").read()


def test_strace_options(busybox, tmp_path):
    """-e trace=SET, -s, -y, -c, signals and exits, in strace's shape."""
    script = 'trap "echo handled" USR1; kill -USR1 $$; cat /etc/hostname >/dev/null; exit 3'
    got = sandboxed([busybox, "sh", "-c", script], "-e", "trace=openat,kill,exit_group", "-y", "-s", "8")
    lines = [l.split("] ", 1)[1] for l in got.stderr.decode().splitlines() if l.startswith("[pid")]
    assert got.returncode == 3 and got.stdout == b"handled\n"
    assert any(l.startswith("kill(") and ", SIGUSR1) = 0" in l for l in lines), lines
    assert any(l.startswith("--- SIGUSR1 {si_signo=SIGUSR1, si_code=SI_USER") for l in lines), lines
    assert any(l.startswith('openat(AT_FDCWD, "/etc/hostname", O_RDONLY') for l in lines), lines
    assert lines[-1] == "+++ exited with 3 +++" and "exit_group(3) = ?" in lines
    assert not any(l.startswith(("read(", "write(", "close(")) for l in lines)      # outside the set
    got = sandboxed([busybox, "cat", "/etc/hostname"], "-c")
    table = got.stderr.decode()
    assert got.returncode == 0 and table.startswith("% time") and "openat" in table and "total" in table
    assert "[pid" not in table                                        # -c: the summary instead of lines
    got = sandboxed([busybox, "cat", "/etc/hostname"], "-y", "-e", "trace=%desc")
    assert b"3</etc/hostname>" in got.stderr
    got = sandboxed([busybox, "true"], "-e", "trace=frobnicate")
    assert got.returncode == 125 and b"unknown x86-64 system call 'frobnicate'" in got.stderr


def test_a_fatal_signal_is_traced_before_the_death_it_causes(busybox):
    got = sandboxed([busybox, "sh", "-c", "kill -TERM $$"], "-e", "trace=kill")
    lines = [l.split("] ", 1)[1] for l in got.stderr.decode().splitlines() if l.startswith("[pid")]
    assert got.returncode == -signal.SIGTERM or got.returncode == 128 + signal.SIGTERM, got
    assert lines[-2].startswith("--- SIGTERM {si_signo=SIGTERM, si_code=SI_USER"), lines
    assert lines[-1] == "+++ killed by SIGTERM +++"
