"""The image format on a synthetic image (no process): writer, reader, index rule, checksums."""
import json
import os

import pytest

from pvmexec.checkpoint import IMAGE_VERSION, MANIFEST_FIELDS, ZERO, DumpError, Image, ImageWriter
from pvmexec.checkpoint.image import CHUNK

PAGE = 4096


def _image(path):
    w = ImageWriter(str(path))
    w.add(0x10000, b"a" * PAGE + b"b" * PAGE)
    w.add_ranges([(0x20000, 0x21000), (0x30000, 0x31000)], b"c" * PAGE + b"d" * PAGE)
    w.add(0x10000, b"e" * PAGE)                     # written again later: the last record wins
    w.zero(0x11000, PAGE)
    w.finish(_manifest())
    return w


def _manifest(**changes):
    """Every required field, as a dump writes them (values made up)."""
    m = dict(pid=1, mappings=[dict(start=0x10000, end=0x12000, perms="rw-p", offset=0, path="", vm_flags="rd wr")],
             rounds=[dict(round=1, final=True, pages=2, seconds=0.01)], freeze_seconds=0.01,
             freeze_breakdown=dict(stop_threads=0, last_round=0, state=0), total_seconds=0.02, bytes_written=8192,
             bytes_spliced=0, transfer="readv", threads=[], shared_pending=[], auxv="", mm={}, personality=0,
             cwd="/", root="/", rlimits={}, fds=[], sigactions={}, itimers={}, exe="/bin/true", comm="true",
             vdso=[], stopped=False,
             creds=dict(uid=[0, 0, 0, 0], gid=[0, 0, 0, 0], groups=[], dumpable=1), pipes={}, sockets={}, posix_timers=[])
    m.update(changes)
    return m


def test_round_trip_and_the_last_record_wins(tmp_path):
    _image(tmp_path / "img")
    img = Image(str(tmp_path / "img"))
    img.check()
    idx = img.page_index()
    assert sorted(idx) == [0x10000, 0x11000, 0x20000, 0x30000] and idx[0x11000] == ZERO
    with open(tmp_path / "img" / "pages.img", "rb") as f:
        for addr, want in ((0x10000, b"e"), (0x20000, b"c"), (0x30000, b"d")):
            f.seek(idx[addr])
            assert f.read(PAGE) == want * PAGE
    m = img.manifest
    assert m["version"] == IMAGE_VERSION and m["complete"] is True and set(m["checksums"]) == {"pages.sums", "pages.idx"}


def test_a_flipped_byte_fails_the_check(tmp_path):
    _image(tmp_path / "img")
    with open(tmp_path / "img" / "pages.img", "r+b") as f:
        f.seek(5)
        f.write(b"X")
    with pytest.raises(DumpError, match="pages.img does not match its checksum"):
        Image(str(tmp_path / "img")).check()


def test_each_mib_of_pages_is_checked_on_its_own(tmp_path):
    """pages.sums holds one digest per MiB of pages.img, written across record boundaries; a change in
    any chunk, a pages.img cut short or a missing pages.sums is found (a lazy restore checks by chunk)."""
    w = ImageWriter(str(tmp_path / "img"))
    pages = CHUNK // PAGE
    w.add(0x100000, b"a" * (PAGE * (pages - 1)))        # chunk 0 ends inside the second record
    w.add(0x900000, b"b" * (PAGE * 3))
    w.finish(_manifest())
    img = Image(str(tmp_path / "img"))
    img.check()
    chunks = img.chunk_sums()
    assert len(chunks) == 2 and len((tmp_path / "img" / "pages.sums").read_bytes()) == 64
    with open(tmp_path / "img" / "pages.img", "rb") as f:
        data = f.read()
    chunks.check(1, data[CHUNK:])
    with pytest.raises(DumpError, match="chunk 1"):
        chunks.check(1, data[CHUNK:-1] + b"X")
    with open(tmp_path / "img" / "pages.img", "r+b") as f:
        f.truncate(CHUNK)
    with pytest.raises(DumpError, match="pages.img does not match its checksum"):
        Image(str(tmp_path / "img")).check()
    os.remove(tmp_path / "img" / "pages.sums")
    with pytest.raises(DumpError, match="pages.sums"):
        Image(str(tmp_path / "img")).check()


def test_an_aborted_image_says_why(tmp_path):
    w = ImageWriter(str(tmp_path / "img"))
    w.add(0x10000, b"a" * PAGE)
    w.abort("OSError: no space left")
    with pytest.raises(DumpError, match="incomplete.*no space left"):
        Image(str(tmp_path / "img")).check()


def test_another_version_or_no_manifest_is_refused(tmp_path):
    _image(tmp_path / "img")
    path = tmp_path / "img" / "manifest.json"
    m = json.loads(path.read_text())
    m["version"] = IMAGE_VERSION + 1
    path.write_text(json.dumps(m))
    with pytest.raises(DumpError, match="image version"):
        Image(str(tmp_path / "img"))
    os.remove(path)
    with pytest.raises(DumpError, match="not a pvmexec image"):
        Image(str(tmp_path / "img"))


def test_the_writer_never_overwrites(tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep").write_text("mine")
    with pytest.raises(FileExistsError):
        ImageWriter(str(tmp_path / "full"))
    assert (tmp_path / "full" / "keep").read_text() == "mine"


@pytest.mark.parametrize("edit, message", [
    (lambda m: m.pop("threads"), "lacks threads"),
    (lambda m: m.update(checksums={}), "checksums must be"),
    (lambda m: m.update(pid="1"), "pid is not a int"),
    (lambda m: m.update(mappings=[dict(start=5, end=1, perms="r", offset=0, path="")]), "mapping 0 is malformed"),
    (lambda m: m.update(rounds=[None]), "round 0 is malformed"),
])
def test_a_malformed_manifest_is_refused_not_shown(tmp_path, edit, message):
    _image(tmp_path / "img")
    path = tmp_path / "img" / "manifest.json"
    m = json.loads(path.read_text())
    edit(m)
    path.write_text(json.dumps(m))
    with pytest.raises(DumpError, match=message):
        Image(str(tmp_path / "img")).summary()


def test_the_field_list_is_well_formed():
    for name, (where, required, meaning) in MANIFEST_FIELDS.items():
        assert where in ("image", "process", "dump") and isinstance(required, bool) and meaning, name
