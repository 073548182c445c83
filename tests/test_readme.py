"""The README's quick example runs as written."""
import os
import re
import subprocess
import sys

README = os.path.join(os.path.dirname(__file__), "..", "README.md")


def test_the_quick_example_runs_as_written(tmp_path):
    text = open(README).read()
    section = text[text.index("## Quick example"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    got = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    assert got.stdout.splitlines() == ["True", got.stdout.splitlines()[1], "syscall 123", "123", "4 b'ping'"]
    assert "close(12345)" in got.stdout.splitlines()[1] and "EBADF" in got.stdout.splitlines()[1]
