"""The janitor process (see janitor.py): reads the caller's records until the caller is gone, then removes
what is still recorded."""
import os
import shutil
import signal
import struct
import sys
import tempfile
import time

from . import _core, janitor, proc
from .arch import current as _current_arch
from .engines import agent
from .errors import AlreadyTraced
from .space import attach

arch = _current_arch()
AGENT_WAIT = 600.0      # s to wait for an agent thread to leave (it leaves only while its process runs)


def _undo(space, kind, args):
    pid = space.pid
    if kind == "agent":                 # _clean waited for the thread to leave
        _tid, base, size = args
        for lo, hi, _perms, path in proc.mappings(pid):
            if base <= lo and hi <= base + size and path.startswith("/memfd:pvmexec-agent"):
                space.syscall("munmap", lo, hi - lo)
    elif kind == "map":
        addr, size = args
        # Still anonymous memory throughout (the kernel may have merged it with a neighbour's).
        inside = sorted((lo, hi, path) for lo, hi, _perms, path in proc.mappings(pid) if lo < addr + size and hi > addr)
        covered = inside and inside[0][0] <= addr and inside[-1][1] >= addr + size and all(
            a[1] == b[0] for a, b in zip(inside, inside[1:]))
        # Our own trampoline may sit where a record says a mapping was (if it was gone already).
        ours = any(lo < addr + size and hi > addr for lo, hi in space.own_mappings())
        if covered and not ours and not any(path for _lo, _hi, path in inside):
            space.syscall("munmap", addr, size)
    elif kind == "helpermap":           # the helper's region or window (a memfd of ours: its inode)
        from .engines import helper
        ino, addr, size = args
        for lo, hi in helper.ours_within(pid, addr, size, ino):
            space.syscall("munmap", lo, hi - lo)
    elif kind == "helper":              # the agent's helper, if the agent died before reaping it
        from .engines import helper
        host_pid, ns_pid, started = args
        helper.reap(lambda nr, a: space.syscall_raw(nr, *a), pid, host_pid, ns_pid, started)
    elif kind == "agentfd":             # the agent's memfd, while injection holds it
        fd, = args
        try:
            if os.readlink("/proc/%d/fd/%d" % (pid, fd)) == "/memfd:pvmexec-agent (deleted)":
                space.syscall("close", fd)
        except OSError:
            return
    elif kind == "newfd":               # recorded before the call that makes it: known by its kind only
        fd, what = args
        if janitor.fd_is(pid, fd, what):
            space.syscall("close", fd)
    elif kind == "fd":
        fd, dev, ino = args
        try:
            st = os.stat("/proc/%d/fd/%d" % (pid, fd))
        except OSError:
            return
        if (st.st_dev, st.st_ino) == (dev, ino):
            space.syscall("close", fd)


class _StillInside(Exception):
    pass


def _running_in(space, things):
    """Whether a (frozen) thread's instruction pointer is inside one of the recorded mappings."""
    ranges = [(args[-2], args[-2] + args[-1]) for kind, args in things if kind in ("map", "agent", "helpermap")]
    rip = arch.REG_INDEX[arch.PC]
    for tid in space.backend.frozen_tids():
        try:
            at = struct.unpack_from("<Q", _core.getregs(tid), 8 * rip)[0]
        except OSError:
            continue
        if any(lo <= at < hi for lo, hi in ranges):
            return True
    return False


def _agent_tid(pid, base):
    """The agent thread's tid, from its region's header (the kernel writes it there at clone, clears it
    at exit); 0 if none ever started or it left."""
    try:
        fd = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
    except OSError:
        return 0
    try:
        raw = os.pread(fd, 4, base + agent.HEADER + agent.L["header.agent_tid"])
    except OSError:
        return 0
    finally:
        os.close(fd)
    return struct.unpack("<I", raw)[0] if len(raw) == 4 else 0




def _remove_private_dir(dev, ino):
    """A sandbox's private directory (kernel.files.PRIVATE), found by its device and inode where it is made."""
    for parent in ("/dev/shm", tempfile.gettempdir()):
        try:
            names = [n for n in os.listdir(parent) if n.startswith(janitor.PRIVATE_DIR_PREFIX)]
        except OSError:
            continue
        for name in names:
            path = os.path.join(parent, name)
            try:
                st = os.lstat(path)
            except OSError:
                continue
            if (st.st_dev, st.st_ino) == (dev, ino):
                shutil.rmtree(path, ignore_errors=True)
                return


def _clean(records):
    by_pid = {}
    for pid, started, kind, args in records.values():
        if kind == "privatedir":                # the caller's own, not in a target
            _remove_private_dir(*args)
            continue
        by_pid.setdefault((pid, started), []).append((kind, args))
    for (pid, started), things in by_pid.items():
        for _kind, (tid, base, _size) in [t for t in things if t[0] == "agent"]:
            # The agent must have left before its region goes, and before we freeze the process.
            tid = tid or _agent_tid(pid, base)
            deadline = time.monotonic() + AGENT_WAIT
            while tid and os.path.exists("/proc/%d/task/%d" % (pid, tid)) and time.monotonic() < deadline:
                time.sleep(0.01)
        deadline = time.monotonic() + 5
        while True:
            try:
                if janitor.start_time(pid) != started:
                    break
                with attach(pid, engine="ptrace", freeze=True) as space:
                    if _running_in(space, things):
                        raise _StillInside()
                    for kind, args in things:
                        try:
                            _undo(space, kind, args)
                        except OSError:
                            pass
                break
            except (AlreadyTraced, _StillInside):
                # The dead caller closed our pipe before the kernel let go of its tracees, or a thread
                # has yet to run out of the caller's trampoline (it restores itself when it runs).
                if time.monotonic() > deadline:
                    break
                time.sleep(0.005)
            except (OSError, ValueError):
                break       # gone, or not ours to trace


def main():
    janitor.stop_recording()
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    records = {}
    for line in sys.stdin.buffer:
        fields = line.split()
        try:
            if fields[0] == b"+":
                key, pid, started = int(fields[1]), int(fields[2]), int(fields[3])
                records[key] = (pid, started, fields[4].decode(), tuple(int(a) for a in fields[5:]))
            elif fields[0] == b"-":
                records.pop(int(fields[1]), None)
        except (IndexError, ValueError):
            continue
    if records:
        _clean(records)
