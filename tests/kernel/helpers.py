"""Shared by the kernel tests: running a command natively and sandboxed, building C programs."""
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


VICTIMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "victims")


def victim_source(name):
    """The source of tests/victims/NAME.c."""
    with open(os.path.join(VICTIMS, name + ".c")) as f:
        return f.read()


PY = sys.executable


PYTHON3 = "/usr/bin/python3"


def sandboxed(argv, *options, cwd=None, input=None, env=None):
    """`pvmexec run [options] -- argv`, as a user runs it."""
    return subprocess.run([PY, "-m", "pvmexec", "run", *options, "--", *argv], capture_output=True, cwd=cwd,
                          input=input, env=env, timeout=120)


def native(argv, cwd=None, input=None, env=None):
    return subprocess.run(argv, capture_output=True, cwd=cwd, input=input, env=env, timeout=120)


def same_as_native(argv, cwd=None, input=None, env=None):
    """The program's own output and status, natively and sandboxed (-q: pvmexec's notes are not the program's)."""
    want, got = native(argv, cwd, input, env), sandboxed(argv, "-q", cwd=cwd, input=input, env=env)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), argv
    return got


def build(cc, tmp_path, source, *flags, name="prog"):
    src = tmp_path / (name + ".c")
    src.write_text(textwrap.dedent(source))
    out = tmp_path / name
    subprocess.run([cc, "-O1", *flags, "-o", str(out), str(src)], check=True, timeout=120)
    return str(out)


def build_program(cc, tmp_path, name, *flags):
    """A program shared with the benchmarks (pvmexec/bench/programs/NAME.c)."""
    from pvmexec.bench.common import program_source
    out = tmp_path / name
    subprocess.run([cc, "-O1", *flags, "-o", str(out), program_source(name)], check=True, timeout=120)
    return str(out)


def run_captured(box, argv, tmp_path):
    out = tmp_path / "stdout"
    with open(out, "wb") as f:
        status = box.run(argv, stdout=f.fileno())
    return status, out.read_bytes()


class FakeWorld(Sandbox):
    """The README's example: another hostname, and a clock stuck in 2001."""

    def sys_uname(self, p, buf):
        Sandbox.sys_uname(self, p, buf)
        p.write(buf + 65, b"sandboxed".ljust(65, b"\0"))
        return 0

    def clock_ns(self, p, clk):
        return 1000000000 * 10 ** 9                            # 2001-09-09, for every time call


def _children():
    me = str(os.getpid())
    kids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/stat" % pid) as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.add(pid)
            except OSError:
                pass
    return kids


# -- fixtures (imported with the helpers) --

@pytest.fixture
def tree(tmp_path):
    """A small directory tree to list, sort, hash and archive."""
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("banana\napple\ncherry\n")
    (root / "sub" / "b.txt").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "deeper" / "c.txt").write_text("deep\n" * 1000)
    os.symlink("a.txt", root / "link")
    return root


@pytest.fixture(scope="module")
def threads_prog(cc, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("threads") / "threads")
    subprocess.run([cc, "-O1", "-pthread", "-o", out, os.path.join(VICTIMS, "threads.c")],
                   check=True, timeout=120)
    return out


