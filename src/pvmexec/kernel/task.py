"""A guest process (Process: the thread group) and its other threads (Thread), and their wake-up pipes.

Ownership: a Process is read and written by the caller thread that runs it;
another process's caller thread touches it only under the kernel's lock
(Sandbox._cond) or through its wake pipe, and its threads share
`thread_lock`/`futex_lock`. A Thread keeps only the PER_THREAD fields;
every other attribute is its process's (read and written through).
"""
import errno
import os
import signal
import struct
import threading
import weakref
from array import array

from .. import proc
from ..abi import PATH_MAX
from .errors import Errno
from .files import FdTable


ARG_MAX = 2 << 20                   # argv + envp bytes, as Linux bounds execve

PER_THREAD = frozenset(("tid", "ctx", "thread_index", "sigmask", "saved_sigmask", "altstack", "clear_child_tid",
                        "robust_list", "thread", "wake_r", "wake_w", "pending", "leader", "internal_error",
                        "is_thread", "fast_ids", "affinity", "exec_exit"))


def _drain(p):
    try:
        while os.read(p.wake_r, 64):
            pass
    except BlockingIOError:
        pass


def close_wake(p):
    """Close a task's wake-up pipe (Process or Thread)."""
    for fd in (p.wake_r, p.wake_w):
        try:
            os.close(fd)
        except OSError:
            pass
    p.wake_r = p.wake_w = -1


def wake(p):
    try:
        os.write(p.wake_w, b"!")
    except (BlockingIOError, OSError):
        pass


class Usage:
    """What struct rusage reports: CPU times in µs, peak memory in KiB, faults and context switches."""

    FIELDS = ("utime", "stime", "maxrss", "minflt", "majflt", "nvcsw", "nivcsw")

    def __init__(self, **kw):
        for name in self.FIELDS:
            setattr(self, name, kw.get(name, 0))

    def add(self, other):
        """Children's figures add up, except the peak, which is the largest (as Linux does)."""
        for name in self.FIELDS:
            mine, theirs = getattr(self, name), getattr(other, name)
            setattr(self, name, max(mine, theirs) if name == "maxrss" else mine + theirs)

    def pack(self):
        return struct.pack("<qqqq14q", self.utime // 10 ** 6, self.utime % 10 ** 6, self.stime // 10 ** 6,
                           self.stime % 10 ** 6, self.maxrss, 0, 0, 0, self.minflt, self.majflt, 0, 0, 0, 0, 0,
                           0, self.nvcsw, self.nivcsw)


def usage_of(host_pid):
    """The stub process's own figures from the host's /proc (zeros once it is gone)."""
    try:
        fields = proc.read_text("/proc/%d/stat" % host_pid).rsplit(")", 1)[1].split()
        status = proc.status(host_pid)
    except (OSError, IndexError, ValueError):
        return Usage()
    hz = os.sysconf("SC_CLK_TCK")

    def num(key):
        v = status.get(key, "0").split()
        return int(v[0]) if v and v[0].isdigit() else 0
    return Usage(utime=int(fields[11]) * 10 ** 6 // hz, stime=int(fields[12]) * 10 ** 6 // hz,
                 maxrss=num("VmHWM"), minflt=int(fields[7]), majflt=int(fields[9]),
                 nvcsw=num("voluntary_ctxt_switches"), nivcsw=num("nonvoluntary_ctxt_switches"))


class Thread:
    """A non-leader thread: its own registers and signal state; the rest is its process's."""

    def __init__(self, leader, tid, index):
        d = self.__dict__
        d["leader"], d["tid"], d["thread_index"] = leader, tid, index
        d["is_thread"] = True
        d["sigmask"], d["saved_sigmask"] = leader.sigmask, None
        d["altstack"] = (0, 2, 0)
        d["clear_child_tid"], d["robust_list"] = 0, (0, 0)
        d["pending"], d["thread"], d["ctx"], d["internal_error"] = {}, None, None, None
        d["wake_r"], d["wake_w"] = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        d["affinity"] = leader.affinity
        d["exec_exit"] = False                       # set when an execve in its process ends it
        d["fast_ids"] = leader.fast_ids[:]
        d["fast_ids"][2] = tid

    def __getattr__(self, name):
        return getattr(self.__dict__["leader"], name)

    def __setattr__(self, name, value):
        if name in PER_THREAD:
            self.__dict__[name] = value
        else:
            setattr(self.__dict__["leader"], name, value)


def leader_of(p):
    return p.leader if getattr(p, "is_thread", False) else p


class Process:
    """One guest process (one thread for now): its space, registers and kernel-side state."""

    def __init__(self, pid):
        self.pid = self.tid = pid
        self.ppid = 1
        self.space = None
        self.ctx = None
        self.fds = FdTable()
        self.cwd = "/"
        self.umask = 0o022
        self.brk_start = self.brk_cur = self.brk_mapped = 0
        self.sigactions = {}                # signo -> (handler, flags, restorer, mask)
        self.sigmask = 0
        self.altstack = (0, 2, 0)           # SS_DISABLE
        self.exe = None
        self.arg_area = None                # (start, end of argv, end of envp) strings in its memory
        self.file_maps = []                 # (start, end, guest path, offset, st_dev, st_ino, shared) of file mappings
        self.stopped = 0                    # the stop signal it is stopped by (job control), 0 if running
        self.wait_event = None              # (CLD_STOPPED, sig) or (CLD_CONTINUED, SIGCONT) not yet waited for
        self.patch_window = True            # its stub space has the patching window (same for a fork)
        self.pidfds = weakref.WeakSet()     # pidfds naming it: set readable when it ends
        self.signalfds = weakref.WeakSet()  # its signalfds' OpenFiles (set readable while a signal is pending)
        self.mapped_files = {}              # (st_dev, st_ino) -> host fd of a file its mappings map
        self.comm = b""
        self.clear_child_tid = 0
        self.robust_list = (0, 0)
        self.rlimits = {}
        self.protected = ()                 # the stub's own mappings: the guest may not touch them
        self.specials = None                # where a restore moved the vDSO and its data: name -> (lo, hi)
        self.parent = None
        self.children = {}
        self.pgid = self.sid = pid
        self.status = None                  # wait status once it has ended
        self.exit_signal = signal.SIGCHLD
        self.pending = {}                   # signo -> siginfo bytes
        self.fatal = 0                      # a signal that ends it whatever it does
        self.saved_sigmask = None           # rt_sigsuspend: the mask to restore after the handler
        self.vfork_done = threading.Event()
        self.thread = None
        self.internal_error = None
        self.wake_r, self.wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self.is_thread = False
        self.thread_index = 0               # its stub thread in the space
        self.threads = {pid: self}          # tid -> Thread (the leader is itself)
        self.thread_lock = threading.Condition()
        self.free_thread_indices = []
        self.timers = {}                    # POSIX timers: id -> syscalls.timer._Timer
        self.itimers = {}                   # alarm and setitimer: which -> _Timer
        self.futexes = {}                   # address -> [waiter]
        self.futex_lock = threading.Lock()
        self.group_status = None            # set by exit_group or a fatal signal in any thread
        self.usage = None                   # its own figures, kept when it ends
        self.nice = os.getpriority(os.PRIO_PROCESS, 0)
        self.affinity = None                # sched_setaffinity's mask, once set
        self.exec_exit = False
        self.exec_handoff = None            # (path, argv, envp, mask) of an execve another thread made
        self.children_usage = Usage()       # of the children waited for, and theirs
        # For the C fast path: answers to getpid, getppid, gettid, getuid, geteuid, getgid, getegid,
        # and a flag that sends every stop here (a signal is due).
        self.fast_ids = array("q", [pid, 1, pid, os.getuid(), os.geteuid(), os.getgid(), os.getegid()])
        self.fast_flag = array("i", [0])

    # -- guest memory (hostile) ---------------------------------------------------------------

    def read(self, addr, n):
        if n == 0:
            return b""
        if not 0 < addr < 1 << 47 or n < 0:
            raise Errno(errno.EFAULT)
        try:
            return self.space.read(addr, n)
        except OSError:
            raise Errno(errno.EFAULT) from None

    def write(self, addr, data):
        if not data:
            return
        if not 0 < addr < 1 << 47:
            raise Errno(errno.EFAULT)
        try:
            self.space.write(addr, data)
        except OSError:
            raise Errno(errno.EFAULT) from None

    def read_str(self, addr, limit=PATH_MAX):
        out = b""
        while len(out) < limit:
            chunk_len = min(4096 - (addr + len(out)) % 4096, 256)
            chunk = self.read(addr + len(out), chunk_len)
            nul = chunk.find(b"\0")
            if nul >= 0:
                return out + chunk[:nul]
            out += chunk
        raise Errno(errno.ENAMETOOLONG)

    def read_u64s(self, addr, n):
        return struct.unpack("<%dQ" % n, self.read(addr, 8 * n))

    def read_str_array(self, addr):
        """A NULL-terminated array of strings (argv, envp), bounded like the kernel's."""
        out, total = [], 0
        if addr == 0:
            return out
        while True:
            ptr = self.read_u64s(addr + 8 * len(out), 1)[0]
            if ptr == 0:
                return out
            s = self.read_str(ptr, ARG_MAX).decode("utf-8", "surrogateescape")
            total += len(s) + 9
            if total > ARG_MAX or len(out) > 65536:
                raise Errno(errno.E2BIG)
            out.append(s)


def kill_space(space):
    """End a guest process's space at once (its stub, or the process adopted for the ptrace engine)."""
    if space is not None:
        space.kill()
