"""Big reads and writes are whole, on both the C fast path and the Python path (--trace turns the
C path off): a regular file gets all of a write, a read gets all of a file, a blocking pipe all of
its data."""
import os

import pytest

from helpers import *  # noqa: F401,F403


@pytest.fixture(scope="module")
def bigio(cc, tmp_path_factory):
    out = tmp_path_factory.mktemp("bigio")
    return build(cc, out, victim_source("bigio"), "-static", name="bigio")


@pytest.mark.parametrize("size", [0, 1, 4095, 65536, 65537, 1 << 20, (1 << 20) + 3, 16 << 20])
@pytest.mark.parametrize("path", ["fast", "python"])
def test_whole_reads_and_writes(bigio, tmp_path, size, path):
    out = tmp_path / "out"
    out.mkdir()
    options = ["--writable", str(out)] + (["--trace", "-o", str(tmp_path / "trace")] if path == "python" else [])
    got = sandboxed([bigio, str(out / "f"), str(size)], *options)
    assert got.returncode == 0 and got.stderr.endswith(b"ok %d\n" % size), got.stderr[-300:]
    assert len(got.stdout) == size
    assert os.path.getsize(out / "f") == (size + 1 if size else 0)


@pytest.mark.parametrize("bs", ["64K", "1M", "3M"])
@pytest.mark.parametrize("path", ["fast", "python"])
def test_dd_from_a_device_gets_whole_blocks(tmp_path, bs, path):
    """dd counts blocks: a read of /dev/zero cut short would silently write less than asked."""
    out = tmp_path / "out"
    out.mkdir()
    options = ["--writable", str(out)] + (["--trace", "-o", str(tmp_path / "trace")] if path == "python" else [])
    argv = ["dd", "if=/dev/zero", "of=%s" % (out / "f"), "bs=" + bs, "count=3", "status=none"]
    got = sandboxed(argv, *options)
    assert got.returncode == 0, got.stderr[-300:]
    assert os.path.getsize(out / "f") == 3 * int(bs[:-1]) * (1024 if bs.endswith("K") else 1 << 20)
