"""Build: the freestanding programs first (tools/build_blobs.py), then the C extension that embeds them."""
import glob
import os
import platform
import sys

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

if not sys.platform.startswith("linux") or platform.machine() not in ("x86_64", "amd64"):
    sys.exit("pvmexec supports Linux on x86-64 only (this is %s/%s); aarch64 is planned"
             % (sys.platform, platform.machine()))

HERE = os.path.dirname(os.path.abspath(__file__))
NATIVE = os.path.join("src", "pvmexec", "native")
sys.path.insert(0, os.path.join(HERE, "tools"))
import build_blobs  # noqa: E402  (tools/build_blobs.py: the freestanding programs)


class BuildExt(build_ext):
    def build_extensions(self):
        cc = os.environ.get("CC") or self.compiler.compiler_so[0]
        gen = os.path.join(self.build_temp, "blobs")
        build_blobs.build_all(gen, cc)
        for ext in self.extensions:
            ext.include_dirs.append(gen)
        super().build_extensions()


setup(
    ext_modules=[Extension(
        "pvmexec._core",
        sources=sorted(glob.glob(os.path.join(NATIVE, "*.c"))),
        include_dirs=[NATIVE],
        depends=sorted(glob.glob(os.path.join(NATIVE, "*.h")) + glob.glob(os.path.join(NATIVE, "freestanding", "*"))),
        extra_compile_args=["-std=gnu11", "-O2", "-Wall", "-Wextra", "-Wno-missing-field-initializers", "-Wno-unused-parameter",
                            "-fvisibility=hidden"],
    )],
    cmdclass={"build_ext": BuildExt},
)
