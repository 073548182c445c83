"""The sandbox's syscall handlers: one mixin class per topic, composed by Sandbox.

A handler is a method `sys_<name>(self, p, *args)` of one of the CALLS
classes, where <name> is the call's name in pvmexec.syscalls.TABLE: writing it
is the whole registration (Sandbox finds it by name). Arguments arrive decoded
by the table's kinds: `str` as a Python str (None for NULL), `fd` and `sint`
as signed ints, everything else as an unsigned 64-bit int. A handler returns
the result (>= 0), raises Errno for -errno, returns None when it has set the
registers itself (execve, rt_sigreturn), and ends its process or thread with
Exited or ThreadExit; a blocking wait that a signal cuts short raises Interrupted.

SUPPORT says how far each call is provided, as gVisor's linux64.go does:
a call with a handler and no entry is supported as Linux defines it; an entry
"partial: ..." has a handler that does less, "refused: ..." one that answers
an errno on purpose; a call with neither is not provided (ENOSYS).
tests/unit/test_handlers.py checks the three against each other.
"""
from .fs import FsCalls
from .info import InfoCalls
from .io import IoCalls
from .mm import MmCalls
from .net import NetCalls
from .poll import PollCalls
from .process import ProcessCalls
from .signal import SignalCalls
from .thread import ThreadCalls
from .timer import TimerCalls


CALLS = (FsCalls, IoCalls, PollCalls, NetCalls, MmCalls, SignalCalls, ProcessCalls, ThreadCalls, InfoCalls,
         TimerCalls)

SUPPORT = {
    "mmap": "partial: regular files, /dev/zero and anonymous memory; other devices ENODEV",
    "get_mempolicy": "partial: one memory node, the default policy",
    "ioctl": "partial: FIOCLEX/FIONCLEX, terminal queries (TCGETS, TIOCGWINSZ, ...) and FIONREAD on host "
             "descriptors; others ENOTTY",
    "fcntl": "partial: F_DUPFD*, F_GETFD/F_SETFD, F_GETFL/F_SETFL, F_GETPIPE_SZ, seals, POSIX and OFD "
             "record locks (F_GETLK names no holder: l_pid -1; a process's opens of one file with different "
             "access modes hold POSIX locks apart); no leases, F_SETOWN or F_NOTIFY",
    "fallocate": "partial: mode 0 only (EOPNOTSUPP for hole punching and the other modes)",
    "sched_setaffinity": "partial: the mask is kept and reported, the host places the guest",
    "setpriority": "partial: kept and reported; the host's priority only ever lowers",
    "syncfs": "partial: syncs every filesystem",
    "mlock": "partial: accepted within RLIMIT_MEMLOCK, nothing is locked",
    "mlock2": "partial: accepted within RLIMIT_MEMLOCK, nothing is locked",
    "mlockall": "partial: accepted within RLIMIT_MEMLOCK, nothing is locked",
    "fadvise64": "partial: accepted and ignored",
    "sync": "partial: a no-op (the host's files are written through at once)",
    "getxattr": "partial: no attribute is ever found (ENODATA)",
    "lgetxattr": "partial: no attribute is ever found (ENODATA)",
    "fgetxattr": "partial: no attribute is ever found (ENODATA)",
    "listxattr": "partial: lists no attributes",
    "llistxattr": "partial: lists no attributes",
    "flistxattr": "partial: lists no attributes",
    "socket": "partial: AF_UNIX always; AF_INET/AF_INET6 only with the policy's network (else EACCES), "
              "never SOCK_RAW; other families EAFNOSUPPORT",
    "setsockopt": "partial: the common SOL_SOCKET, IPPROTO_TCP, IPPROTO_IP and IPPROTO_IPV6 options; "
                  "others ENOPROTOOPT",
    "getsockopt": "partial: the options setsockopt takes, and SO_PEERCRED (the peer's guest pid)",
    "recvmsg": "partial: SCM_CREDENTIALS name the last guest process that sent on the peer socket",
    "getsockname": "partial: sockets inherited from the host EOPNOTSUPP",
    "getpeername": "partial: sockets inherited from the host EOPNOTSUPP",
    "clone3": "refused: ENOSYS, libc falls back to clone",
    "rseq": "refused: ENOSYS, libc does without",
    "execveat": "partial: not from a thread after its leader exited (ENOSYS)",
    "execve": "partial: not from a thread after its leader exited (ENOSYS)",
    "getrusage": "partial: RUSAGE_THREAD reports the whole process",
    "getcpu": "partial: always CPU 0, node 0",
    "prctl": "partial: PR_SET_NAME, PR_GET_NAME and a few queries; others EINVAL",
    "sysinfo": "partial: the host's memory and load, one process",
    "setitimer": "partial: ITIMER_VIRTUAL and ITIMER_PROF count wall-clock time, not CPU time",
    "timer_create": "partial: CLOCK_REALTIME, CLOCK_MONOTONIC, CLOCK_BOOTTIME; SIGEV_SIGNAL, SIGEV_NONE, "
                    "SIGEV_THREAD_ID",
}


def support_table():
    """[(number, name, level, note)] for every x86-64 syscall: supported, partial, refused or not provided."""
    from ...syscalls import TABLE
    handled = {name for cls in CALLS for name in dir(cls) if name.startswith("sys_")}
    rows = []
    for nr in sorted(TABLE):
        name = TABLE[nr][0]
        note = SUPPORT.get(name)
        if "sys_" + name not in handled:
            rows.append((nr, name, "not provided", "ENOSYS"))
        elif note is None:
            rows.append((nr, name, "supported", ""))
        else:
            level, _, text = note.partition(":")
            rows.append((nr, name, level, text.strip()))
    return rows


def support_markdown():
    """docs/syscalls.md: the support table as tools/gen_support_table.py writes it."""
    rows = support_table()
    counts = {}
    for row in rows:
        counts[row[2]] = counts.get(row[2], 0) + 1
    out = ["# System calls in `pvmexec run`", "",
           "Generated by `tools/gen_support_table.py` from the handlers and `pvmexec.kernel.syscalls.SUPPORT`;",
           "`tests/unit/test_handlers.py` checks that this file is what they say. Like gVisor's table: *supported*",
           "as Linux defines it, *partial* (what is left out is noted), *refused* (an errno on purpose), *not",
           "provided* (ENOSYS, reported once per run).", "",
           ", ".join("%d %s" % (counts[k], k) for k in ("supported", "partial", "refused", "not provided")
                     if k in counts) + ".", "",
           "| nr | call | support | note |", "|---:|---|---|---|"]
    for nr, name, level, note in rows:
        out.append("| %d | %s | %s | %s |" % (nr, name, level, note.replace("|", "\\|")))
    return "\n".join(out) + "\n"
