"""The policy: what the guest reaches of the host's files and network, and that nothing is left behind."""
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
from helpers import _children


def test_root_confines_paths(busybox, tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "inside").write_text("inside\n")
    if os.stat(busybox).st_dev == os.stat(root).st_dev and os.stat(busybox).st_uid == os.getuid():
        os.link(busybox, root / "bin" / "busybox")
    else:
        (root / "bin" / "busybox").write_bytes(open(busybox, "rb").read())
    (root / "bin" / "busybox").chmod(0o755)
    os.symlink("/etc/hostname", root / "data" / "escape")       # resolved inside the root: not the host's file
    os.symlink("../../../../../../etc", root / "data" / "up")
    for path in ("/etc/hostname", "/data/../../../etc/hostname", "/data/escape", "/data/up/hostname"):
        got = sandboxed(["/bin/busybox", "cat", path], "--root", str(root))
        assert got.returncode == 1 and b"No such file or directory" in got.stderr, (path, got)
    got = sandboxed(["/bin/busybox", "cat", "/data/inside"], "--root", str(root))
    assert got.stdout == b"inside\n"
    got = sandboxed(["/bin/busybox", "ls", "/proc/self/", "/proc/1"], "--root", str(root))
    assert got.returncode != 0


def test_writes_only_below_writable_paths(busybox, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = tmp_path / "keep"
    keep.write_text("unchanged\n")
    os.symlink(str(keep), out / "trap")
    got = sandboxed([busybox, "sh", "-c", "echo x > %s/new" % out])
    assert got.returncode != 0 and not (out / "new").exists()
    w = ("--writable", str(out))
    assert sandboxed([busybox, "sh", "-c", "echo x > %s/new" % out], *w).returncode == 0
    assert sandboxed([busybox, "mkdir", str(out / "d")], *w).returncode == 0
    assert sandboxed([busybox, "mv", str(out / "new"), str(out / "d" / "moved")], *w).returncode == 0
    assert (out / "d" / "moved").read_text() == "x\n"
    got = sandboxed([busybox, "sh", "-c", "echo y > %s/trap" % out], *w)
    assert got.returncode != 0 and b"Permission denied" in got.stderr
    assert keep.read_text() == "unchanged\n", "a symlink in a writable directory must not reach a read-only file"
    assert sandboxed([busybox, "rm", str(out / "trap")], *w).returncode == 0 and not os.path.lexists(out / "trap")
    assert sandboxed([busybox, "rm", str(keep)], *w).returncode != 0 and keep.exists()


def test_network_is_denied_by_default(tmp_path):
    code = "import socket\ntry:\n socket.socket()\nexcept OSError as e: print(e.errno)\n"
    got = sandboxed([PYTHON3, "-S", "-c", code])
    assert got.stdout.strip() == str(errno.EACCES).encode()


def test_policy_file(busybox, tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"writable": [str(out)]}))
    got = sandboxed([busybox, "touch", str(out / "made")], "--policy", str(policy))
    assert got.returncode == 0 and (out / "made").exists()
    policy.write_text(json.dumps({"writeable": []}))
    got = sandboxed([busybox, "true"], "--policy", str(policy))
    assert got.returncode == 125 and b"unknown policy keys: writeable" in got.stderr      # our failure, as env


def test_nothing_is_left_behind(busybox, tmp_path):
    import gc
    box = Sandbox()
    gc.collect()                                    # earlier tests' garbage may hold descriptors
    fds_before = sorted(os.listdir("/proc/self/fd"))
    children_before = _children()
    status, out = run_captured(box, [busybox, "echo", "hi"], tmp_path)
    assert (status, out) == (0, b"hi\n")
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
    assert _children() == children_before




def test_renames_across_the_writable_boundary_are_refused(tmp_path):
    """A file moved out of a read-only directory would become writable; one moved out of the writable
    directory would put guest data where the policy says nothing changes: both are EACCES."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep").write_text("host data")
    rw = tmp_path / "rw"
    rw.mkdir()
    (rw / "mine").write_text("guest data")
    code = textwrap.dedent("""
        import ctypes, os, sys
        ro, rw = sys.argv[1:3]
        libc = ctypes.CDLL(None, use_errno=True)
        for old, new in ((ro + "/keep", rw + "/keep"), (rw + "/mine", ro + "/mine")):
            try:
                os.rename(old, new)
                print("moved")
            except OSError as e:
                print(e.errno)
        open(rw + "/a", "w").write("a")
        open(rw + "/b", "w").write("b")
        print(libc.renameat2(-100, (rw + "/a").encode(), -100, (rw + "/b").encode(), 1), ctypes.get_errno())
        print(libc.renameat2(-100, (rw + "/a").encode(), -100, (rw + "/b").encode(), 2), open(rw + "/a").read())
    """)
    got = sandboxed([PYTHON3, "-c", code, str(ro), str(rw)], "-q", "--writable", str(rw))
    assert got.stdout.decode().split() == ["13", "13", "-1", "17", "0", "b"], got.stderr
    assert sorted(os.listdir(ro)) == ["keep"] and (ro / "keep").read_text() == "host data"
    assert (rw / "mine").read_text() == "guest data"


def test_tmp_is_the_runs_own_over_the_hosts_read_only(tmp_path):
    """The guest writes temporary files to a /tmp of its own (tac, sort, mktemp need one), removed at the
    end; the host's /tmp shows through read-only where the guest made no such name, and symlinks in the
    guest's /tmp resolve as in any directory."""
    import tempfile
    host_tmp = tempfile.gettempdir()

    def ours():
        return {n for n in os.listdir(host_tmp) if n.startswith("pvmexec-private-")}
    before = ours()
    (tmp_path / "host.txt").write_text("the host's\n")
    (tmp_path / "w").mkdir()
    link = tmp_path / "w" / "to-guest-tmp"
    script = textwrap.dedent("""
        seq 3 | tac | tr '\\n' ' '; echo
        t=$(mktemp) && echo private > "$t" && cat "$t"
        cat %(host)s
        echo changed > %(host)s 2>/dev/null || echo "host file read-only"
        mkdir -p /tmp/d/e && ln -s /etc/hostname /tmp/d/abs && ln -s e /tmp/d/rel && ln -s /tmp/d /tmp/dl
        cmp -s /tmp/d/abs /etc/hostname && echo "absolute link: the root's file"
        touch /tmp/dl/rel/made && ls /tmp/d/e
        cd /tmp/dl && pwd && pwd -P
        ln -s /tmp/d %(link)s && ls %(link)s/e
        ls /tmp | grep -c pytest-of || true
    """ % {"host": tmp_path / "host.txt", "link": link})
    got = sandboxed(["bash", "-c", script], "-q", "--writable", str(tmp_path / "w"))
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode().splitlines() == [
        "3 2 1 ", "private", "the host's", "host file read-only", "absolute link: the root's file", "made",
        "/tmp/dl", "/tmp/d", "made", "0"]
    assert (tmp_path / "host.txt").read_text() == "the host's\n"
    assert not os.path.exists(os.path.join(host_tmp, "d")) and ours() == before
