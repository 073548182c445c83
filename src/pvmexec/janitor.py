"""What a SIGKILL of the caller leaves in a target, removed by a process of ours that outlives it.

After a SIGKILL the caller cleans nothing: the agent thread removes itself but for the page its last
instructions run on, and mappings or descriptors the caller placed stay. So the caller records what it
places in a target and unrecords it once removed, over a pipe to a janitor process: one per caller
process, started at the first record, not the caller's child (no wait() of the caller sees it) and in
a session of its own (no Ctrl-C of the terminal reaches it). Only the caller holds the pipe's writing
end, so end of file means the caller is gone, however it died. The janitor then removes what is still
recorded, with the ptrace engine and the target frozen, after checking that the process is the same
one (its start time) and that each thing is still ours (the agent's memfd name, an anonymous mapping
of the recorded size, a descriptor's device and inode).

The residual case: a SIGKILL of the janitor itself leaves the records undone.
"""
import itertools
import os
import subprocess
import sys
import threading

PRIVATE_DIR_PREFIX = "pvmexec-private-"      # a sandbox's own /dev/shm or /tmp lies in a directory named so

_lock = threading.Lock()
_pipe = None            # our writing end, or False once starting failed
_keys = itertools.count(1)
_inside = False         # this process is the janitor: it records nothing


def start_time(pid):
    """The process's start time (clock ticks since boot): a recycled pid has another one."""
    with open("/proc/%d/stat" % pid, "rb") as f:
        return int(f.read().rsplit(b")", 1)[1].split()[19])


def _start():
    global _pipe
    r, w = os.pipe2(os.O_CLOEXEC)
    try:
        here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        janitor = "import sys; sys.path.insert(0, %r); from pvmexec._janitor_process import main; main()" % here
        # A short-lived middle process forks the janitor and exits, so the janitor is not our child.
        launcher = ("import os, sys\nif os.fork() == 0:\n    os.execv(sys.executable, [sys.executable, '-c', %r])\n"
                    % janitor)
        p = subprocess.Popen([sys.executable, "-S", "-c", launcher], stdin=r, stdout=subprocess.DEVNULL,
                             stderr=subprocess.DEVNULL, start_new_session=True, close_fds=True)
        p.wait(30)
    except (OSError, subprocess.SubprocessError):
        os.close(w)
        _pipe = False
        return
    finally:
        os.close(r)
    _pipe = w


def _send(line):
    global _pipe
    try:
        os.write(_pipe, line.encode())
    except OSError:                 # the janitor is gone: nothing more can be recorded
        os.close(_pipe)
        _pipe = False


def stop_recording():
    """This process is the janitor: it records nothing of its own."""
    global _inside
    _inside = True


def start():
    """Start the janitor now (once per process), so that no later record waits for it."""
    if _inside:
        return
    with _lock:
        if _pipe is None:
            _start()


def record(pid, started, kind, *args):
    """Record one thing placed in process pid (start_time(pid) = started); returns the key for
    unrecord(), or None if nothing was recorded."""
    if _inside or started is None:
        return None
    with _lock:
        if _pipe is None:
            _start()
        if not _pipe:
            return None
        key = next(_keys)
        _send("+ %d %d %d %s %s\n" % (key, pid, started, kind, " ".join(str(int(a)) for a in args)))
        return key


# What a descriptor recorded before the call that makes it is, by the start of its /proc/PID/fd link.
NEW_FD_KINDS = {1: "anon_inode:[userfaultfd]", 2: "pipe:[", 3: "socket:[", 4: "/memfd:pvmexec-helper"}
USERFAULTFD, PIPE, SOCKET, HELPER_MEMFD = 1, 2, 3, 4


def fd_is(pid, fd, what):
    """Whether descriptor fd of process pid is of kind what (a NEW_FD_KINDS key)."""
    try:
        return os.readlink("/proc/%d/fd/%d" % (pid, fd)).startswith(NEW_FD_KINDS[what])
    except OSError:
        return False


class Records:
    """Records for one live process: its start time is read once, the first time it is needed."""

    def __init__(self, pid):
        self.pid = pid
        self._started = None

    def started(self):
        if self._started is None:
            try:
                self._started = start_time(self.pid)
            except OSError:
                pass
        return self._started

    def add(self, kind, *args):
        """record() for this process; the key, or None."""
        return record(self.pid, self.started(), kind, *args)

    def add_fd(self, fd):
        """Record descriptor fd of the process by its device and inode (the janitor closes only that)."""
        try:
            st = os.stat("/proc/%d/fd/%d" % (self.pid, fd))
        except OSError:
            return None
        return self.add("fd", fd, st.st_dev, st.st_ino)

    def expect_fd(self, low, kind, *args):
        """Record, before the call that makes it, the descriptor the kernel will give the process next (the
        lowest number free from low) as kind (fd number first, then args): a SIGKILL of ours right after
        the call then leaves nothing unrecorded. Returns (that number, the key), or (None, None)."""
        free = self._lowest_free(1, low)
        if not free:
            return None, None
        return free[0], self.add(kind, free[0], *args)

    def _lowest_free(self, count, low):
        """The count lowest descriptor numbers from low free in the process now ([] if it cannot be told)."""
        try:
            used = {int(n) for n in os.listdir("/proc/%d/fd" % self.pid)}
        except (OSError, ValueError):
            return []
        out, n = [], low
        while len(out) < count:
            if n not in used:
                out.append(n)
            n += 1
        return out

    def expect_new_fds(self, count, what):
        """expect_fd for the count descriptors a call will make (the lowest free numbers), known only by
        what (a NEW_FD_KINDS key): the janitor closes one only if it is of that kind. Returns the keys."""
        return [self.add("newfd", n, what) for n in self._lowest_free(count, 0)]

    def made_fd(self, fd, expected, key):
        """After the call that made descriptor fd: the key of the record made before it if the kernel chose
        the number expected, else of a new one (or None for a failed call)."""
        if fd == expected:
            return key
        new = self.add_fd(fd) if fd >= 0 else None
        unrecord(key)
        return new


def unrecord(key):
    if key is None:
        return
    with _lock:
        if _pipe:
            _send("- %d\n" % key)
