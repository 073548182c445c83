"""The sandbox's ELF loader and #! parsing, on real executables of this machine and on junk."""
import errno
import os
import shutil

import pytest

from pvmexec.kernel import Errno
from pvmexec.kernel import loader


def _read(path):
    with open(path, "rb") as f:
        return f.read()


def test_a_real_dynamic_executable():
    elf = loader.Elf(_read(os.path.realpath(shutil.which("ls"))))
    assert elf.interp and elf.interp.startswith("/lib") and elf.loads
    assert all(p[5] <= p[6] for p in elf.loads)                # filesz <= memsz


def test_a_real_interpreter_has_none_of_its_own():
    ld = loader.Elf(_read(os.path.realpath(loader.Elf(_read(shutil.which("ls"))).interp)))
    assert ld.interp is None and ld.type == loader.ET_DYN


@pytest.mark.parametrize("junk", [b"", b"\x7fELF", b"MZ" + bytes(100), b"\x7fELF\x01\x01\x01" + bytes(60),
                                  bytes(64)])
def test_junk_is_enoexec(junk):
    with pytest.raises(Errno) as e:
        loader.Elf(junk)
    assert e.value.errno == errno.ENOEXEC


def test_a_truncated_program_header_table_is_enoexec():
    data = _read(shutil.which("ls"))
    with pytest.raises(Errno):
        loader.Elf(data[:100])


@pytest.mark.parametrize("line, want", [
    (b"#!/bin/sh\necho", ("/bin/sh", None)),
    (b"#! /usr/bin/env  python3 -u \n", ("/usr/bin/env", "python3 -u")),
    (b"#!/bin/busybox\tsh\n", ("/bin/busybox", "sh")),
    (b"\x7fELF", None),
])
def test_script_interpreter_splits_as_the_kernel(line, want):
    assert loader.script_interpreter(line) == want


def test_an_empty_shebang_is_enoexec():
    with pytest.raises(Errno):
        loader.script_interpreter(b"#!   \n")
