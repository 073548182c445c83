"""Calls answered in C give exactly what the Python handlers give, and overrides turn the C path off."""
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


def test_calls_answered_in_c_match_the_python_handlers(cc, tmp_path):
    prog = build_program(cc, tmp_path, "syscall_heavy", "-static")
    fast = sandboxed([prog, "300"])
    slow = sandboxed([prog, "300"], "--trace", "-o", str(tmp_path / "trace"))     # tracing turns the C path off
    assert fast.returncode == slow.returncode == 0 and fast.stdout == slow.stdout
    assert (tmp_path / "trace").read_text().count("getpid()") == 301

    class OtherPid(Sandbox):
        def sys_getpid(self, p):
            return 4242
    status, out = run_captured(OtherPid(), [prog, "10"], tmp_path)
    assert status == 0 and out.split()[1] == b"4242"
