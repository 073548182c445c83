"""The package as users get it: a manylinux wheel with everything compiled in, installable and
importable without a compiler; the source distribution holds what a build needs."""
import glob
import os
import subprocess
import sys
import zipfile

ROOT = os.path.join(os.path.dirname(__file__), "..")


def test_a_manylinux_wheel_installs_and_runs_without_building(tmp_path):
    got = subprocess.run(["bash", os.path.join(ROOT, "tools", "build_wheels.sh"), str(tmp_path / "dist")],
                         capture_output=True, text=True, timeout=900, cwd=ROOT,
                         env=dict(os.environ, PYTHON=sys.executable))
    assert got.returncode == 0, got.stderr[-2000:]
    wheel, = glob.glob(str(tmp_path / "dist" / "pvmexec-*manylinux*_x86_64.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    assert any(n.startswith("pvmexec/_core") and n.endswith(".so") for n in names)
    assert {"pvmexec/py.typed", "pvmexec/bench/programs/syscall_heavy.c"} <= set(names)
    assert any(n.endswith("LICENSE") for n in names)
    assert not any(n.endswith(".c") and "native" in n for n in names)      # sources stay in the sdist
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=120)
    # --no-index --no-build-isolation: nothing may be built or fetched; the wheel is all there is
    subprocess.run([str(venv / "bin" / "pip"), "install", "-q", "--no-index", "--no-deps", "--force-reinstall",
                    wheel], check=True, timeout=300)
    got = subprocess.run([str(venv / "bin" / "python"), "-c", "import pvmexec, pvmexec._core as c; "
                          "print(pvmexec.__file__, c.STUB_ELF[:4], len(c.AGENT_BLOB) > 0)"],
                         capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert got.returncode == 0 and str(venv) in got.stdout and "b'\\x7fELF' True" in got.stdout, got.stderr
