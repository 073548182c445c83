import os
import select
import shutil
import signal
import subprocess
import sys
import time

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))


def compile_victim(cc, out_dir, name):
    """Build tests/victims/NAME.c (with threads) into out_dir; returns the executable's path."""
    out = os.path.join(str(out_dir), name)
    subprocess.run([cc, "-O1", "-pthread", "-o", out, os.path.join(HERE, "victims", name + ".c")], check=True,
                   timeout=120)
    return out


class Running:
    """A victim that prints "ready <pid>" first, then takes stdin and prints on stdout; always killed and
    reaped on exit from the block."""

    def __init__(self, exe):
        self.proc = subprocess.Popen([exe], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.pid = self.proc.pid

    def __enter__(self):
        line = self.proc.stdout.readline()
        assert line.startswith("ready"), line
        return self

    def finish(self, timeout=30):
        """Close its stdin and wait: (exit status, what it said last)."""
        self.proc.stdin.close()
        status = self.proc.wait(timeout)
        return status, self.proc.stdout.readline()

    def __exit__(self, *exc):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self.proc.stdout.close()
        return False


@pytest.fixture(scope="session")
def victim_exe(tmp_path_factory):
    cc = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    assert cc, "tests need a C compiler to build their victim program"
    out = str(tmp_path_factory.mktemp("victims") / "victim")
    subprocess.run([cc, "-O1", "-pthread", "-o", out, os.path.join(HERE, "victims", "victim.c")], check=True)
    return out


class Victim:
    """A child process under test: line-based I/O with timeouts; always killed and reaped."""

    def __init__(self, exe, *args, **popen):
        self.proc = subprocess.Popen([exe, *map(str, args)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, **popen)
        self.pid = self.proc.pid
        self._buf = b""
        self.lines = []
        first = self.readline()
        if first.startswith("counter"):
            self.counter_addr = int(first.split()[1], 16)
            first = self.readline()
        assert first == "ready %d" % self.pid, first

    def readline(self, timeout=10.0):
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("victim %d said nothing within %.1fs (so far %r)" % (self.pid, timeout, self._buf))
            r, _, _ = select.select([self.proc.stdout], [], [], left)
            if r:
                chunk = os.read(self.proc.stdout.fileno(), 4096)
                if not chunk:
                    raise EOFError("victim %d closed stdout (exit %s) after %r" % (
                        self.pid, self.proc.poll(), self._buf))
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return line.decode()

    def send(self, data):
        self.proc.stdin.write(data)
        self.proc.stdin.flush()

    def wait(self, timeout=10.0):
        return self.proc.wait(timeout)

    def status(self):
        with open("/proc/%d/status" % self.pid) as f:
            return dict(l.rstrip("\n").split(":\t", 1) for l in f if ":\t" in l)

    def state(self):
        return self.status()["State"][0]

    def wait_state(self, states, timeout=5.0):
        deadline = time.monotonic() + timeout
        while self.state() not in states:
            assert time.monotonic() < deadline, "victim %d never reached state %s (is %s)" % (
                self.pid, states, self.state())
            time.sleep(0.005)

    def kill(self):
        if self.proc.poll() is None:
            with_pid = self.pid
            try:
                os.kill(with_pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                pass
        for f in (self.proc.stdin, self.proc.stdout, self.proc.stderr):
            try:
                f.close()
            except OSError:
                pass


@pytest.fixture
def spawn(victim_exe):
    made = []

    def make(*args, **kw):
        v = Victim(victim_exe, *args, **kw)
        made.append(v)
        return v

    yield make
    for v in made:
        v.kill()


def snapshot(pid):
    """What a target must get back unchanged: threads, mappings, descriptors, signal state."""
    def read(p):
        with open(p) as f:
            return f.read()
    st = dict(l.split(":\t", 1) for l in read("/proc/%d/status" % pid).splitlines() if ":\t" in l)
    return {
        "maps": read("/proc/%d/maps" % pid),
        "fds": sorted(os.listdir("/proc/%d/fd" % pid), key=int),
        "threads": sorted(os.listdir("/proc/%d/task" % pid)),
        "sig": {k: st[k].strip() for k in ("SigPnd", "ShdPnd", "SigBlk", "SigIgn", "SigCgt", "TracerPid")},
    }


def kill_caller_after_first_line(script, *args):
    """Run a caller script in its own process, read the first line it prints, SIGKILL it; returns that line."""
    caller = subprocess.Popen([sys.executable, "-c", script, *map(str, args)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        line = caller.stdout.readline()
        caller.kill()
        caller.wait(10)
    finally:
        if caller.poll() is None:
            caller.kill()
            caller.wait(10)
        caller.stdin.close()
        caller.stdout.close()
    return line


# -- programs nobody here wrote, for the sandbox tests -----------------------------------------------

BUSYBOX_CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "pvmexec-tests")


@pytest.fixture(scope="session")
def busybox():
    """Debian's busybox-static: fetched once with apt-get (part of the test set-up), cached outside the tree."""
    exe = os.path.join(BUSYBOX_CACHE, "busybox-static", "bin", "busybox")
    if not os.path.exists(exe):
        os.makedirs(BUSYBOX_CACHE, exist_ok=True)
        work = os.path.join(BUSYBOX_CACHE, "download")
        shutil.rmtree(work, ignore_errors=True)
        os.makedirs(work)
        got = subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, capture_output=True, text=True,
                             timeout=300)
        if got.returncode != 0 and os.geteuid() == 0:
            subprocess.run(["apt-get", "update"], capture_output=True, timeout=600)
            got = subprocess.run(["apt-get", "download", "busybox-static"], cwd=work, capture_output=True,
                                 text=True, timeout=300)
        debs = [f for f in os.listdir(work) if f.endswith(".deb")]
        assert debs, "could not fetch Debian's busybox-static for the sandbox tests: %s" % got.stderr[-500:]
        subprocess.run(["dpkg-deb", "-x", os.path.join(work, debs[0]), os.path.join(BUSYBOX_CACHE, "busybox-static")],
                       check=True, timeout=120)
    assert os.access(exe, os.X_OK), exe
    return exe


@pytest.fixture(scope="session")
def cc():
    found = shutil.which(os.environ.get("CC", "cc")) or shutil.which("gcc")
    assert found, "tests need a C compiler"
    return found
