"""The corpus (corpus.py): every-day command lines nobody here wrote, natively and sandboxed."""
import os
import shutil
import subprocess

import pytest

from corpus import COMMANDS
from helpers import PY

PROGRAMS = ("bash", "dash", "python3", "perl", "ruby", "lua5.4", "git", "gcc", "make", "sqlite3", "jq", "tar",
            "xz", "zstd", "cpio", "zip", "unzip", "openssl", "gpg", "ssh-keygen", "curl", "ps", "flock", "bc",
            "file", "bzip2", "cal")


def test_the_corpus_programs_are_installed():
    """.ci/run installs them: a missing one is a failure here, never a silent skip."""
    assert [p for p in PROGRAMS if shutil.which(p) is None] == []


def _run(argv, work):
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    env = dict(os.environ, HOME=str(work), LC_ALL="C.UTF-8", TZ="UTC")
    try:
        got = subprocess.run(argv, cwd=work, env=env, capture_output=True, stdin=subprocess.DEVNULL, timeout=90)
        return got.returncode, got.stdout, got.stderr
    except subprocess.TimeoutExpired:
        return "timeout", b"", b""
    finally:
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.parametrize("command", COMMANDS, ids=[c.split("\n")[0][:60] for c in COMMANDS])
def test_command_line_matches_native(tmp_path, command):
    work = tmp_path / "work"
    want = _run(["bash", "-c", command], work)
    got = _run([PY, "-m", "pvmexec", "run", "-q", "--writable", str(work), "--", "bash", "-c", command], work)
    assert got[:2] == want[:2], (command, got[2][-1500:], want[2][-500:])
