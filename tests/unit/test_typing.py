"""The public API is typed (py.typed): a user's script that uses attach, Space.syscall, exec,
Space.create, the checkpoint and the sandbox type-checks with mypy --strict."""
import os
import subprocess
import sys

EXAMPLE = os.path.join(os.path.dirname(__file__), "..", "..", "examples", "typed_user.py")


def test_a_users_script_passes_mypy_strict(tmp_path):
    got = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--no-incremental", "--cache-dir",
                          str(tmp_path / "cache"), EXAMPLE], capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert got.returncode == 0, got.stdout + got.stderr
    assert "Success" in got.stdout


def test_the_example_runs(tmp_path):
    got = subprocess.run([sys.executable, EXAMPLE], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    remote_pid, syscall, _pages, status = got.stdout.split()
    assert int(remote_pid) > 0 and syscall == "123" and status == "0"
