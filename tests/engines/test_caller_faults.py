"""The caller killed or signalled at a random moment of an operation: the target runs on as it was.

Each case is a scenario of tests/faults.py (its docstring says what a run checks) run a few times here;
`python tests/faults.py --runs 20` is the stress version, with the table of every scenario, including
those with a known residual window (see the README's security notes).
"""
import os
import random
import signal

import pytest

import faults

RUNS = int(os.environ.get("PVMEXEC_FAULT_RUNS", "3"))

CLEAN = [
    ("ptrace-frozen-idle", signal.SIGKILL), ("ptrace-frozen-idle", signal.SIGTERM),
    ("ptrace-syscalls", signal.SIGINT), ("ptrace-syscalls", signal.SIGTERM), ("ptrace-syscalls", signal.SIGHUP),
    ("ptrace-syscalls-kill", signal.SIGKILL), ("ptrace-borrowed-kill", signal.SIGKILL),
    ("ptrace-borrowed-syscalls", signal.SIGTERM), ("ptrace-exec", signal.SIGTERM),
    ("ptrace-blocked-read", signal.SIGKILL), ("ptrace-blocked-read", signal.SIGINT),
    ("ptrace-strings", signal.SIGKILL), ("ptrace-strings", signal.SIGINT), ("ptrace-strings", signal.SIGTERM),
    ("ptrace-lend", signal.SIGINT), ("ptrace-lend", signal.SIGTERM),
    ("ptrace-attach-detach", signal.SIGINT), ("ptrace-attach-detach", signal.SIGTERM),
    ("ptrace-trampoline-kill", signal.SIGKILL), ("ptrace-attach-detach", signal.SIGKILL),
    ("agent-attach-detach", signal.SIGKILL),
    ("ptrace-no-trampoline", signal.SIGKILL), ("ptrace-no-trampoline-borrowed", signal.SIGKILL),
    ("agent-idle", signal.SIGKILL), ("agent-idle", signal.SIGINT),
    ("agent-syscalls", signal.SIGKILL), ("agent-syscalls", signal.SIGTERM),
    ("agent-blocked-read", signal.SIGKILL), ("agent-attach-detach", signal.SIGINT),
    ("agent-exec", signal.SIGKILL), ("agent-exec", signal.SIGINT),
    ("agent-exec-syscalls", signal.SIGKILL), ("agent-exec-syscalls", signal.SIGTERM),
    ("dump-frozen", signal.SIGKILL), ("dump-frozen", signal.SIGTERM),
    ("dump-loop", signal.SIGKILL), ("dump-loop", signal.SIGTERM),
    ("dump-vmsplice-loop", signal.SIGKILL), ("dump-vmsplice-loop", signal.SIGINT),
]


@pytest.mark.parametrize("scenario,sig", CLEAN, ids=["%s-%s" % (n, signal.Signals(s).name) for n, s in CLEAN])
def test_target_survives_the_caller(victim_exe, scenario, sig):
    rng = random.Random(hash((scenario, sig)))
    for _ in range(RUNS):
        outcome, detail = faults.one_run(victim_exe, scenario, sig, rng=rng)
        assert outcome == "clean", "%s after %s: %s %s" % (scenario, signal.Signals(sig).name, outcome, detail)


HOOK_SCRIPT = r"""
import os, signal, sys, time
from pvmexec import _sigguard
_sigguard.install()
def slow_hook(u):                       # the signal lands while the hook still runs
    os.kill(os.getpid(), signal.SIG%s)
    time.sleep(0.05)
_sigguard._previous_unraisable = slow_hook
class Dropped:
    def __del__(self):
        raise ValueError("raised in a __del__")
Dropped()
for _ in range(300):
    time.sleep(0.01)
sys.exit(3)
"""


@pytest.mark.parametrize("name", ["TERM", "HUP"])
def test_a_signal_landing_in_the_unraisable_hook_still_ends_the_caller(name):
    import subprocess
    import sys
    p = subprocess.run([sys.executable, "-c", HOOK_SCRIPT % name], capture_output=True, timeout=60)
    assert p.returncode == -getattr(signal, "SIG" + name), p.stderr.decode()[-2000:]
