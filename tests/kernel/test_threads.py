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
