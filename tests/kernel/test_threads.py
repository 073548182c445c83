"""Guest threads: pthreads, futexes, exit from a thread."""
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


def test_pthreads_mutexes_condvars_joins_and_tls(threads_prog):
    got = same_as_native([threads_prog])
    assert got.stdout == b"counter 120000 sum 150 distinct-tid 1\nrounds done 520000\n"


def test_exit_from_a_thread_ends_the_process(threads_prog):
    got = same_as_native([threads_prog, "exit-from-thread"])
    assert got.returncode == 7


EXEC_FROM_A_THREAD = r"""
import os, signal, sys, threading, time
pid = os.getpid()
def go():
    signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1])
    try:
        os.execv("/nonexistent", ["x"])
    except OSError as e:
        print("failed", e.errno, threading.active_count(), flush=True)
    after = "import os, sys; print('same pid:', os.getpid() == int(sys.argv[1]), signal.pthread_sigmask(0, []))"
    os.execv(sys.executable, [sys.executable, "-c", "import signal; " + after, str(pid)])
for _ in range(3):
    threading.Thread(target=time.sleep, args=(30,), daemon=True).start()
threading.Thread(target=go).start()
time.sleep(30)
print("the leader went on")
"""


def test_execve_from_a_thread_that_is_not_the_leader(tmp_path):
    """As Linux: the process keeps its pid, every other thread (the leader included) ends, the new image
    has the calling thread's signal mask; a failed exec returns to that thread with the rest running."""
    want = native([PYTHON3, "-c", EXEC_FROM_A_THREAD], cwd=tmp_path)
    got = sandboxed([PYTHON3, "-c", EXEC_FROM_A_THREAD], "-q", cwd=tmp_path)
    assert want.stdout == b"failed 2 5\nsame pid: True {<Signals.SIGUSR1: 10>}\n", want
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr


def test_execve_from_a_process_with_other_threads(tmp_path):
    """The other threads end (running, sleeping, blocked in a futex) and the new image runs under the same
    pid; a failed exec leaves them all running. (The pid itself differs from a native run's.)"""
    code = ("import threading, os, time\n"
            "def spin():\n"
            "    while True:\n"
            "        time.sleep(0.01)\n"
            "for _ in range(3):\n"
            "    threading.Thread(target=spin, daemon=True).start()\n"
            "threading.Thread(target=threading.Event().wait, daemon=True).start()\n"
            "try:\n"
            "    os.execv('/nonexistent', ['x'])\n"
            "except OSError as e:\n"
            "    print('failed', e.errno, threading.active_count(), flush=True)\n"
            "os.execv('/bin/sh', ['sh', '-c', 'echo exec from a threaded process $$'])\n")
    want = native([PYTHON3, "-c", code], cwd=tmp_path)
    got = sandboxed([PYTHON3, "-c", code], "-q", cwd=tmp_path)
    assert got.returncode == want.returncode == 0, got.stderr
    assert got.stdout.decode().split()[:-1] == want.stdout.decode().split()[:-1] == [
        "failed", "2", "5", "exec", "from", "a", "threaded", "process"]
