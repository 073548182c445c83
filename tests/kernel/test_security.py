"""Hostile guests: bad arguments, unsupported calls, trap bypass, a failing handler."""
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


def test_unsupported_syscalls_get_enosys_and_are_reported_once(cc, tmp_path):
    prog = build(cc, tmp_path, r"""
        #include <stdio.h>
        #include <unistd.h>
        #include <errno.h>
        #include <sys/syscall.h>
        int main(void) {
            for (int i = 0; i < 3; i++) {
                long r = syscall(SYS_io_setup, 1, 0);
                printf("%ld %d\n", r, errno);
            }
            return 0;
        }
    """)
    got = sandboxed([prog], "--trace")
    assert got.stdout == b"-1 38\n" * 3
    assert got.stderr.count(b"io_setup(") == 3 and got.stderr.count(b"not provided by the sandbox") == 1
    untraced = sandboxed([prog])                             # listed once at exit, even without tracing
    assert untraced.stdout == b"-1 38\n" * 3
    assert untraced.stderr == b"pvmexec: warning: calls the sandbox does not provide got ENOSYS: io_setup\n"


def test_hostile_arguments_get_errors_and_the_guest_keeps_running(cc, tmp_path):
    prog = build(cc, tmp_path, victim_source("hostile"), "-static")
    got = sandboxed([prog], input=b"")
    lines = dict(l.split(" ", 1) for l in got.stdout.decode().splitlines() if " " in l)
    assert lines["write-bad-buffer"] == "-1 %d" % errno.EFAULT
    assert lines["open-null"] == "-1 %d" % errno.EFAULT
    assert lines["open-kernel-address"] == "-1 %d" % errno.EFAULT
    assert lines["read-huge"] == "0 0"                                       # end of (empty) input
    assert lines["map-over-window"] == "-1 %d" % errno.EINVAL
    assert lines["unmap-window"] == "-1 %d" % errno.EINVAL
    assert lines["bad-fd"] == "-1 %d" % errno.EBADF
    assert lines["dup2-negative"] == "-1 %d" % errno.EBADF
    assert lines["sigaction-kill"] == "-1 %d" % errno.EINVAL
    assert lines["long-path"] == "-1 %d" % errno.ENAMETOOLONG
    assert lines["socket-huge-protocol"] == "-1 %d" % errno.EPROTONOSUPPORT      # the low 32 bits, as Linux
    assert lines["socketpair-bad-protocol"] == "-1 %d" % errno.EPROTONOSUPPORT
    assert got.stdout.endswith(b"still running\n") and got.returncode == 0


def test_trap_bypass_attempts_are_contained(cc, tmp_path):
    import pvmexec
    from pvmexec import _core
    probe = pvmexec.Space.create(fixed_layout=True)         # every guest's stub has this same layout
    try:
        gadget = probe._engine.gadget
        region = struct.unpack_from("<Q", probe._engine._map, 16)[0]
    finally:
        probe.detach()
    assert _core.LAYOUT["STUB_BLOCK_SIZE"] == 94208
    prog = build(cc, tmp_path, victim_source("escapes"), "-static")
    target = str(tmp_path / "escaped")
    got = sandboxed([prog, hex(gadget), hex(region), target])
    lines = got.stdout.decode().splitlines()
    assert "int80 returned -%d" % errno.ENOSYS in lines                  # i386 calls are not served
    assert any(l.startswith("sysenter: signal") for l in lines)
    assert any(l.startswith("vsyscall") for l in lines)
    assert "gadget: signal %d" % signal.SIGKILL in lines               # the stub's filter killed it
    assert "channel: exit 0" in lines
    assert lines[-1] == "dir created: 0" and not os.path.exists(target)
    assert got.returncode == 0


def test_a_failing_handler_kills_the_process_not_the_kernel(busybox, tmp_path, capsys):
    class Broken(Sandbox):
        def sys_uname(self, p, buf):
            raise RuntimeError("bug")
    box = Broken()
    status, out = run_captured(box, [busybox, "uname", "-n"], tmp_path)
    assert status == signal.SIGKILL
    assert "internal error in uname" in capsys.readouterr().err
    status, out = run_captured(box, [busybox, "echo", "still fine"], tmp_path)     # the kernel goes on
    assert (status, out) == (0, b"still fine\n")


def test_no_path_reaches_the_hosts_proc_or_sys(busybox, tmp_path):
    """Whatever path a guest uses — a symlink it makes, one it finds on the host, .. — it never reaches
    the host's procfs or sysfs: /proc by any path is the guest's own (its processes, its descriptors)."""
    w = tmp_path / "w"
    w.mkdir()
    for name, target in (("found-mounts", "/proc/self/mounts"), ("found-environ", "/proc/1/environ"),
                         ("found-fd", "/proc/self/fd"), ("found-sys", "/sys/kernel"), ("found-dev-fd", "/dev/fd")):
        os.symlink(target, w / name)
    script = ("cd %s; ln -s /proc p; ln -s /sys s; ln -s ../../../../../../proc up; "
              "for f in p/1/environ p/self/mounts p/1/fd/0 p/99999/environ s/kernel/hostname up/1/status "
              "found-mounts found-environ found-fd/0 found-sys/hostname found-dev-fd/0 /proc/self/status "
              "/proc/1/cmdline /proc/self/mem p/self/mem; do cat $f >/dev/null 2>&1 && echo READ $f; done; "
              "ls s found-sys 2>/dev/null; echo PIDS $(ls p up /proc | grep '^[0-9]'); "
              "cat found-mounts p/self/mounts up/self/mountinfo; cat p/cpuinfo | head -1" % w)
    got = sandboxed([busybox, "sh", "-c", script], "--writable", str(w), input=b"")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.decode().splitlines()
    assert [l for l in lines if l.startswith("READ")] == [
        "READ p/self/mounts", "READ found-mounts", "READ found-fd/0", "READ found-dev-fd/0", "READ /proc/self/status"]
    pids = next(l for l in lines if l.startswith("PIDS")).split()[1:]
    assert pids and all(int(pid) < 100 for pid in pids), pids              # the guest's pids, not the host's
    assert str(os.getpid()) not in pids
    mounts = [l for l in lines if not l.startswith(("READ", "PIDS"))]
    assert any(l.startswith("proc /proc proc") for l in mounts) and mounts[-1] == "processor\t: 0"
    assert not any(word in l for l in mounts for word in ("sysfs", "cgroup", "devpts", "/sys"))


# FUZZ_SEED=N in the environment runs seed N as the second one.
@pytest.mark.parametrize("seed", [4, int(os.environ.get("FUZZ_SEED", 0)) or int.from_bytes(os.urandom(4), "little") | 1])
def test_a_guest_fuzzer_never_breaks_the_kernel_or_the_policy(cc, tmp_path, capfd, seed):
    """50,000 random syscalls (numbers 0-470, random arguments): every one gets an errno or a result, never
    an internal error; nothing outside the writable directory changes; the kernel holds no more
    descriptors afterwards than before."""
    from pvmexec.kernel import Policy
    prog = build(cc, tmp_path, victim_source("fuzz"), "-static", name="fuzz")
    keep = tmp_path / "keep"
    keep.mkdir()
    (keep / "data").write_text("host data")
    work = tmp_path / "w"
    work.mkdir()
    import gc
    from pvmexec import janitor
    gc.collect()                                    # what earlier tests left for the collector goes first
    janitor.start()                                 # its pipe (one per caller, for good) is not the kernel's

    def descriptors():
        out = {}
        for fd in os.listdir("/proc/self/fd"):
            try:
                out[fd] = os.readlink("/proc/self/fd/" + fd)
            except OSError:
                pass
        return out
    before = descriptors()
    box = Sandbox(Policy(writable=[str(work)]))
    out = tmp_path / "out"
    with open(out, "wb") as f:
        status = box.run([prog, str(seed), "50000", "500"], cwd=str(work), stdout=f.fileno(), stdin=None)
    box.policy.close()
    err = capfd.readouterr().err
    assert status == 0, (seed, err[-2000:])
    assert "internal error" not in err and "Traceback" not in err, (seed, err[-2000:])
    words = out.read_text().split()
    assert words[0] == "batches" and int(words[-1]) >= 50000, (seed, words)
    assert sorted(os.listdir(tmp_path)) == sorted(["fuzz", "fuzz.c", "keep", "w", "out"])
    assert os.listdir(keep) == ["data"] and (keep / "data").read_text() == "host data"
    after = descriptors()
    new = {fd: what for fd, what in after.items() if before.get(fd) != what and not (     # capfd's own files
        what.endswith("(deleted)") and str(tmp_path) not in what)}
    assert new == {}, (seed, new)                   # none left open by the kernel


def test_a_guest_learns_no_host_pid_through_the_stub(cc, tmp_path):
    """The stub's own syscall instruction (getpid, gettid, getppid are allowed there), its region
    (which the guest can read) and a PI futex naming a tid show only the stub's own pid namespace."""
    import pvmexec
    probe = pvmexec.Space.create(fixed_layout=True)
    try:
        gadget = probe._engine.gadget
        region = struct.unpack_from("<Q", probe._engine._map, 16)[0]
    finally:
        probe.detach()
    prog = build(cc, tmp_path, victim_source("pidleak"), "-static")
    got = sandboxed([prog, hex(gadget), hex(region), str(os.getpid())])
    lines = dict(l.split(" ", 1) for l in got.stdout.decode().splitlines())
    assert got.returncode == 0, got
    assert lines["getpid"] == "1" and lines["getppid"] == "0" and 1 < int(lines["gettid"]) < 64, lines
    assert lines["header"] == "0 1"
    assert lines["pi-host"] == str(-errno.ESRCH)                        # our pid names nothing there
    assert lines["pi-one"] == str(-errno.EAGAIN)                        # while the stub's own tid 1 exists
