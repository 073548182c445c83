"""What a target's seccomp filters would do to a syscall we inject, decided before injecting it.

Injected syscalls go through the target's filters like its own. A filter that
kills would kill the target, so each call is first evaluated against the
filters (read with PTRACE_SECCOMP_GET_FILTER) by a classic-BPF interpreter.
Mode 1 never needs this: PTRACE_SYSEMU stops before seccomp runs.
"""
import errno
import os
import struct

from .. import _core

RET_KILL_PROCESS = 0x80000000
RET_KILL_THREAD = 0x00000000
RET_TRAP = 0x00030000
RET_ERRNO = 0x00050000
RET_USER_NOTIF = 0x7FC00000
RET_TRACE = 0x7FF00000
RET_LOG = 0x7FFC0000
RET_ALLOW = 0x7FFF0000
RET_ACTION_FULL = 0xFFFF0000
RET_DATA = 0x0000FFFF

ACTION_NAMES = {RET_KILL_PROCESS: "kill the process", RET_KILL_THREAD: "kill the thread",
                RET_TRAP: "send it SIGSYS", RET_ERRNO: "fail it", RET_USER_NOTIF: "pass it to a supervisor",
                RET_TRACE: "pass it to a seccomp tracer", RET_LOG: "log it", RET_ALLOW: "allow it"}

STRICT_ALLOWED = frozenset((0, 1, 60, 15))      # read, write, exit, rt_sigreturn


class FilterUnreadable(Exception):
    """The target's seccomp filters cannot be read (PTRACE_SECCOMP_GET_FILTER needs CAP_SYS_ADMIN)."""

    pass


def _action_rank(ret):
    a = ret & RET_ACTION_FULL
    return a - (1 << 32) if a & 0x80000000 else a


def load_filters(tid):
    """The thread's filters as lists of (code, jt, jf, k), or FilterUnreadable."""
    filters = []
    for index in range(4096):
        try:
            prog = _core.seccomp_filter(tid, index)
        except OSError as e:
            if e.errno == errno.ENOENT:
                return filters
            raise FilterUnreadable(e.strerror) from None
        filters.append([struct.unpack_from("<HBBI", prog, i) for i in range(0, len(prog), 8)])
    return filters


def run_filter(prog, data):
    """Evaluate one classic-BPF seccomp program over seccomp_data bytes; returns its 32-bit verdict."""
    a = x = 0
    mem = [0] * 16
    pc = 0
    mask = 0xFFFFFFFF
    steps = 0
    while pc < len(prog):
        steps += 1
        if steps > 100000:
            raise ValueError("seccomp program does not terminate")
        code, jt, jf, k = prog[pc]
        pc += 1
        cls = code & 0x07
        if cls == 0x00:                           # LD
            mode = code & 0xE0
            if mode == 0x20:                      # ABS (seccomp: 32-bit words only)
                a = struct.unpack_from("<I", data, k)[0] if k + 4 <= len(data) else 0
            elif mode == 0x00:
                a = k
            elif mode == 0x60:
                a = mem[k & 15]
            elif mode == 0x80:
                a = len(data)
            else:
                raise ValueError("unsupported BPF load %#x" % code)
        elif cls == 0x01:                         # LDX
            mode = code & 0xE0
            x = k if mode == 0x00 else mem[k & 15] if mode == 0x60 else len(data) if mode == 0x80 else 0
        elif cls == 0x02:                         # ST
            mem[k & 15] = a
        elif cls == 0x03:                         # STX
            mem[k & 15] = x
        elif cls == 0x04:                         # ALU
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                a = (a + src) & mask
            elif op == 0x10:
                a = (a - src) & mask
            elif op == 0x20:
                a = (a * src) & mask
            elif op == 0x30:
                a = a // src if src else 0
            elif op == 0x40:
                a |= src
            elif op == 0x50:
                a &= src
            elif op == 0x60:
                a = (a << src) & mask if src < 32 else 0
            elif op == 0x70:
                a = a >> src if src < 32 else 0
            elif op == 0x80:
                a = (-a) & mask
            elif op == 0x90:
                a = a % src if src else 0
            elif op == 0xA0:
                a ^= src
            else:
                raise ValueError("unsupported BPF ALU op %#x" % code)
        elif cls == 0x05:                         # JMP
            op, src = code & 0xF0, (x if code & 0x08 else k)
            if op == 0x00:
                pc += k
                continue
            taken = (a == src if op == 0x10 else a > src if op == 0x20 else a >= src if op == 0x30
                     else bool(a & src) if op == 0x40 else None)
            if taken is None:
                raise ValueError("unsupported BPF jump %#x" % code)
            pc += jt if taken else jf
        elif cls == 0x06:                         # RET
            return (a if code & 0x18 == 0x10 else k) & mask
        elif cls == 0x07:                         # MISC
            if code & 0xF8 == 0x00:
                x = a
            else:
                a = x
    raise ValueError("seccomp program ran off its end")


def verdict(filters, nr, arch, ip, args):
    """The action the kernel would take: the most restrictive over all filters."""
    data = struct.pack("<iIQ6Q", nr, arch, ip, *(a % (1 << 64) for a in (list(args) + [0] * 6)[:6]))
    best = RET_ALLOW
    for prog in filters:
        ret = run_filter(prog, data)
        if _action_rank(ret) < _action_rank(best):
            best = ret
    return best


def describe(ret):
    action = ret & RET_ACTION_FULL
    name = ACTION_NAMES.get(action, "act %#x on it" % action)
    if action == RET_ERRNO:
        name += " with errno %d" % (ret & RET_DATA)
    return name


def thread_mode(pid, tid):
    """(mode, number of filters) from /proc: mode 0 none, 1 strict, 2 filter."""
    return status_mode(thread_status(pid, tid))


def thread_status(pid, tid):
    """The raw bytes of the thread's /proc status (read raw: this runs per borrow)."""
    fd = os.open("/proc/%d/task/%d/status" % (pid, tid), os.O_RDONLY)
    try:
        return os.read(fd, 16384)
    finally:
        os.close(fd)


def pending_signals(data):
    """(the thread's own pending signals, its process's) as bit masks (SigPnd, ShdPnd), from the bytes
    of its /proc status."""
    masks = []
    for key in (b"\nSigPnd:", b"\nShdPnd:"):
        i = data.find(key)
        masks.append(int(data[i + len(key):data.index(b"\n", i + 1)].strip(), 16) if i >= 0 else 0)
    return tuple(masks)


def status_mode(data):
    """(mode, number of filters) from the bytes of a /proc/.../status file."""
    i = data.find(b"\nSeccomp:")
    if i < 0:
        return 0, 0
    mode = int(data[i + 9:data.index(b"\n", i + 1)])
    j = data.find(b"\nSeccomp_filters:")
    count = int(data[j + 17:data.index(b"\n", j + 1)]) if j >= 0 else 0
    return mode, count
