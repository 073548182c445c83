"""The syscall table knows every x86-64 syscall up to Linux 6.18, with argument kinds."""
import re

import pytest

from pvmexec.syscalls import TABLE, arg_kinds, name_of, number


def test_complete_up_to_6_18():
    numbers = sorted(TABLE)
    assert numbers[0] == 0 and numbers[-1] == 469
    assert set(range(0, 336)) <= set(numbers) and set(range(424, 470)) <= set(numbers)
    assert not any(336 <= n < 424 for n in numbers)
    for nr, name in ((0, "read"), (59, "execve"), (123, "setfsgid"), (231, "exit_group"), (334, "rseq"),
                     (435, "clone3"), (444, "landlock_create_ruleset"), (451, "cachestat"), (462, "mseal"),
                     (467, "open_tree_attr"), (469, "file_setattr")):
        assert name_of(nr) == name and number(name) == nr


def test_agrees_with_system_headers():
    try:
        text = open("/usr/include/x86_64-linux-gnu/asm/unistd_64.h").read()
    except FileNotFoundError:
        text = open("/usr/include/asm/unistd_64.h").read()
    found = dict((int(n), name) for name, n in re.findall(r"#define __NR_(\w+) (\d+)", text))
    assert found, "no syscall numbers in the system headers"
    for nr, name in found.items():
        assert name_of(nr) == name, (nr, name)


def test_argument_kinds():
    assert arg_kinds(number("write")) == (("fd", "fd"), ("buf", "ptr"), ("count", "int"))
    assert [k for _, k in arg_kinds(number("openat"))] == ["fd", "str", "int", "int"]
    assert [k for _, k in arg_kinds(number("dup2"))] == ["fd", "int"]      # newfd names a slot
    assert [k for _, k in arg_kinds(number("mmap"))][4] == "fd"
    assert arg_kinds(number("getpid")) == ()
    assert TABLE[number("uselib")][1] is None                               # not implemented on x86-64


def test_names_and_numbers():
    assert number("SYS_getpid") == number("__NR_getpid") == 39
    assert number(39) == 39
    with pytest.raises(ValueError):
        number(-1)
    with pytest.raises(ValueError):
        number("nope")
    assert name_of(1000) == "syscall_1000"
