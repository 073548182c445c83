"""The policy's path rules, on a temporary tree (no guest process): what may be seen, opened, written."""
import errno
import os

import pytest

from pvmexec.kernel import Errno, Policy


@pytest.fixture
def root(tmp_path):
    (tmp_path / "etc").mkdir()
    (tmp_path / "etc" / "motd").write_text("hello\n")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "old").write_text("old\n")
    os.symlink("/etc/motd", tmp_path / "abs-link")                 # absolute: resolved inside the root
    os.symlink("../../../../etc/motd", tmp_path / "out" / "up")    # climbs: stays inside too
    return tmp_path


def _read(policy, path):
    fd = policy.open(path, os.O_RDONLY, 0)
    try:
        return os.read(fd, 100)
    finally:
        os.close(fd)


def test_reads_resolve_inside_the_root(root):
    p = Policy(str(root))
    try:
        assert _read(p, "/etc/motd") == b"hello\n"
        assert _read(p, "/abs-link") == b"hello\n"
        assert _read(p, "/out/up") == b"hello\n"
        assert _read(p, "/../../etc/motd") == b"hello\n"
    finally:
        p.close()


def test_writes_only_below_writable_paths(root):
    p = Policy(str(root), writable=["/out"])
    try:
        os.close(p.open("/out/new", os.O_WRONLY | os.O_CREAT, 0o644))
        assert (root / "out" / "new").exists()
        for path in ("/etc/motd", "/etc/new"):
            with pytest.raises(Errno) as e:
                os.close(p.open(path, os.O_WRONLY | os.O_CREAT, 0o644))
            assert e.value.errno == errno.EACCES
        assert not (root / "etc" / "new").exists()
        with pytest.raises(Errno):                    # through a symlink that leaves the writable tree
            os.close(p.open("/out/up", os.O_WRONLY | os.O_TRUNC, 0))
        assert (root / "etc" / "motd").read_text() == "hello\n"
    finally:
        p.close()


def test_proc_shows_only_the_general_files(root):
    p = Policy("/")
    try:
        for path in ("/proc/self/environ", "/proc/1/maps", "/proc/self/mem"):
            with pytest.raises(Errno) as e:
                p.path_fd(path)
            assert e.value.errno == errno.ENOENT
        os.close(p.path_fd("/proc/cpuinfo"))
    finally:
        p.close()


def test_a_root_that_is_no_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not a directory"):
        Policy(str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="unknown policy keys"):
        Policy.from_dict({"rooot": "/"})
