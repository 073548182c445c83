"""Every implemented sandbox call decodes its arguments as the kernel's prototype says: a string the
kernel reads as a path is read as one (not handed over as a raw pointer), a buffer is not.

The prototypes come from the kernel's include/linux/syscalls.h (Debian's linux-headers package, which
.ci/run installs); the rule here is independent of tools/gen_syscall_table.py's."""
import glob
import re

import pytest

from pvmexec.kernel import Sandbox
from pvmexec.syscalls import TABLE

HEADERS = sorted(glob.glob("/usr/src/linux-headers-*-common/include/linux/syscalls.h"))
# Calls our table describes by hand (the header's prototype is a compat or arch variant, or newer).
NOT_IN_HEADER = {"rt_sigreturn", "arch_prctl", "clone", "mmap", "fork", "vfork", "clone3"}


def _prototypes():
    assert HEADERS, "tests need the kernel's syscalls.h: apt-get install linux-headers-amd64"
    src = open(HEADERS[-1]).read()
    out = {}
    for m in re.finditer(r"asmlinkage long sys_(\w+)\(([^;]*?)\);", src, re.S):
        args = " ".join(m.group(2).split())
        out[m.group(1)] = [] if args in ("", "void") else [a.strip() for a in args.split(",")]
    return out


def _expected(decl):
    d = " ".join(decl.replace("*", " * ").split())
    if "*" not in d:
        return None                         # an integer: int or fd, not checked here
    name = re.sub(r"[^\w]", "", d.split()[-1])
    if d.startswith("const char __user *") and d.count("*") == 1:
        return "ptr" if name in ("buf", "u_msg_ptr") else "str"
    return "ptr"


def test_string_and_pointer_arguments_match_the_kernel():
    protos = _prototypes()
    handled = sorted({n[4:] for n in dir(Sandbox) if n.startswith("sys_")} - NOT_IN_HEADER)
    wrong = []
    for name in handled:
        if name not in protos:
            continue
        kinds = next(k for n, k in TABLE.values() if n == name) or ()
        decls = protos[name]
        assert len(decls) == len(kinds), "%s: the table has %d arguments, the kernel %d" % (name, len(kinds),
                                                                                             len(decls))
        for (arg, kind), decl in zip(kinds, decls):
            want = _expected(decl)
            if want is not None and kind != want:
                wrong.append("%s(%s): %s, the kernel's `%s` is %s" % (name, arg, kind, decl, want))
    assert wrong == []
    assert len([n for n in handled if n in protos]) > 100


@pytest.mark.parametrize("name", ["symlink", "symlinkat", "openat", "rename", "execve"])
def test_path_arguments_are_strings(name):
    kinds = dict(next(k for n, k in TABLE.values() if n == name))
    assert [a for a, k in kinds.items() if k == "str"], kinds
