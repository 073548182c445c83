"""The classic-BPF interpreter that predicts a target's seccomp verdicts, checked against the kernel:
random filters are installed in child processes, which make the calls; the kernel's answers must be
the interpreter's."""
import json
import random
import struct
import subprocess
import sys

import pytest

from pvmexec.engines import target_filters as tf

AUDIT_ARCH_X86_64 = 0xC000003E
NR_GETPPID = 110
# BPF opcodes used by seccomp filters
LD_W_ABS, LD_IMM, LDX_IMM, ST, LDX_MEM, LD_MEM = 0x20, 0x00, 0x01, 0x02, 0x61, 0x60
ALU_AND_K, ALU_OR_K, ALU_ADD_K, ALU_RSH_K, ALU_ADD_X, ALU_XOR_K = 0x54, 0x44, 0x04, 0x74, 0x0C, 0xA4
JEQ_K, JGT_K, JGE_K, JSET_K, JEQ_X, JA = 0x15, 0x25, 0x35, 0x45, 0x1D, 0x05
RET_K, RET_A, TAX, TXA = 0x06, 0x16, 0x07, 0x87

# The child: for each (filter, calls), fork, install the filter, make each getppid call, report results.
CHILD = r"""
import ctypes, json, os, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long
cases = json.load(sys.stdin)
out = []
for prog, calls in cases:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(r)
        code = b"".join(struct.pack("<HBBI", *ins) for ins in prog)
        buf = ctypes.create_string_buffer(code)
        fprog = struct.pack("<HxxxxxxQ", len(prog), ctypes.addressof(buf))
        libc.prctl(38, 1, 0, 0, 0)                       # PR_SET_NO_NEW_PRIVS
        if libc.syscall(317, 1, 0, ctypes.c_char_p(fprog)) != 0:   # seccomp(SET_MODE_FILTER)
            os.write(w, b"E%d" % ctypes.get_errno()); os._exit(1)
        res = []
        for args in calls:
            ret = libc.syscall(110, *[ctypes.c_ulong(a) for a in args])
            res.append(-ctypes.get_errno() if ret == -1 else ret)
        os.write(w, json.dumps(res).encode()); os._exit(0)
    os.close(w)
    data = b""
    while True:
        chunk = os.read(r, 65536)
        if not chunk: break
        data += chunk
    os.close(r); os.waitpid(pid, 0)
    out.append(data.decode())
print(json.dumps(out))
"""


def _random_filter(rng):
    """A filter that reads seccomp_data, computes, jumps and always ends in ALLOW or ERRNO(n)."""
    body = [(LD_W_ABS, 0, 0, 4),                         # only getppid of our arch: the child must live on
            (JEQ_K, 1, 0, AUDIT_ARCH_X86_64),
            (RET_K, 0, 0, tf.RET_ALLOW),
            (LD_W_ABS, 0, 0, 0),
            (JEQ_K, 1, 0, NR_GETPPID),
            (RET_K, 0, 0, tf.RET_ALLOW)]
    n = rng.randint(3, 14)
    ops = []
    for _ in range(n):
        kind = rng.random()
        if kind < 0.35:
            ops.append(("ld", rng.choice([0, 4, 16, 20, 24, 28, 32, 36, 40, 44, 48, 52, 56, 60])))   # not the ip (8, 12)
        elif kind < 0.55:
            ops.append(("alu", rng.choice([ALU_AND_K, ALU_OR_K, ALU_ADD_K, ALU_RSH_K, ALU_XOR_K]),
                        rng.choice([0, 1, 3, 7, 0xFF, 0xFFFF0000, rng.getrandbits(32)])))
        elif kind < 0.65:
            ops.append(("mem", rng.randint(0, 15)))
        else:
            ops.append(("jmp", rng.choice([JEQ_K, JGT_K, JGE_K, JSET_K]),
                        rng.choice([0, 1, 2, 5, 7, NR_GETPPID, rng.getrandbits(32), rng.getrandbits(8)])))
    prog = []
    for op in ops:
        if op[0] == "ld":
            prog.append((LD_W_ABS, 0, 0, op[1]))
        elif op[0] == "alu":
            k = op[2] % 32 if op[1] == ALU_RSH_K else op[2]
            prog.append((op[1], 0, 0, k))
        elif op[0] == "mem":
            prog.append((ST, 0, 0, op[1]))
            prog.append((LDX_MEM, 0, 0, op[1]))
            prog.append((TXA, 0, 0, 0))
        else:
            prog.append((op[1], 0, 1, op[2]))                 # true: fall into the ERRNO below
            prog.append((JA, 0, 0, 1))
            prog.append((RET_K, 0, 0, tf.RET_ERRNO | rng.randint(1, 200)))
    prog.append((RET_K, 0, 0, rng.choice([tf.RET_ALLOW, tf.RET_ERRNO | rng.randint(1, 200)])))
    return body + prog


def _random_args(rng):
    pick = [0, 1, 2, 5, 7, 0xFF, 0xFFFFFFFF, 1 << 32, (1 << 64) - 1]
    return [rng.choice(pick) if rng.random() < 0.5 else rng.getrandbits(64) for _ in range(6)]


def test_interpreter_agrees_with_the_kernel():
    rng = random.Random(20261201)
    cases = []
    for _ in range(60):
        prog = _random_filter(rng)
        cases.append((prog, [_random_args(rng) for _ in range(8)]))
    got = subprocess.run([sys.executable, "-c", CHILD], input=json.dumps(cases), capture_output=True, text=True,
                         timeout=120)
    assert got.returncode == 0, got.stderr
    answers = json.loads(got.stdout)
    checked, outcomes = 0, set()
    for (prog, calls), answer in zip(cases, answers):
        assert not answer.startswith("E"), "the kernel refused a filter the generator made: %s" % answer
        for args, kernel in zip(calls, json.loads(answer)):
            ret = tf.verdict([prog], NR_GETPPID, AUDIT_ARCH_X86_64, 0, args)
            action = ret & tf.RET_ACTION_FULL
            expected = -(ret & tf.RET_DATA) if action == tf.RET_ERRNO else "allowed"
            seen = kernel if kernel < 0 else "allowed"
            assert seen == expected, (prog, args, ret)
            checked += 1
            outcomes.add(seen if seen == "allowed" else "errno")
    assert checked == 480 and outcomes == {"allowed", "errno"}


def test_the_most_restrictive_filter_wins():
    allow = [(RET_K, 0, 0, tf.RET_ALLOW)]
    errno5 = [(RET_K, 0, 0, tf.RET_ERRNO | 5)]
    trap = [(RET_K, 0, 0, tf.RET_TRAP)]
    kill = [(RET_K, 0, 0, tf.RET_KILL_PROCESS)]
    assert tf.verdict([allow, errno5], 0, AUDIT_ARCH_X86_64, 0, ()) == tf.RET_ERRNO | 5
    assert tf.verdict([errno5, trap], 0, AUDIT_ARCH_X86_64, 0, ()) == tf.RET_TRAP
    assert tf.verdict([trap, kill, allow], 0, AUDIT_ARCH_X86_64, 0, ()) == tf.RET_KILL_PROCESS


def test_a_program_without_return_is_an_error():
    with pytest.raises(ValueError):
        tf.run_filter([(LD_W_ABS, 0, 0, 0)], struct.pack("<iIQ6Q", 0, 0, 0, *[0] * 6))
