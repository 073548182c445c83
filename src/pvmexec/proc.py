"""Facts about processes from /proc, and why the kernel refused to let us trace one."""
import errno
import os

from .errors import AccessDenied, AlreadyTraced, TargetGone

CAP_SYS_PTRACE = 19


def status(pid):
    """/proc/PID/status as a dict of strings."""
    try:
        fd = os.open("/proc/%d/status" % pid, os.O_RDONLY)
    except (FileNotFoundError, ProcessLookupError):
        raise TargetGone(pid) from None
    try:
        data = os.read(fd, 65536).decode()
    except ProcessLookupError:
        raise TargetGone(pid) from None
    finally:
        os.close(fd)
    return dict(line.split(":\t", 1) for line in data.splitlines() if ":\t" in line)


def has_cap(cap):
    return bool(int(status(os.getpid())["CapEff"], 16) >> cap & 1)


def is_descendant(pid):
    me = os.getpid()
    while pid > 1:
        try:
            pid = int(status(pid)["PPid"])
        except TargetGone:
            return False
        if pid == me:
            return True
    return False


def denied_reason(pid, st):
    """Why PTRACE_SEIZE said EPERM, in words a user can act on."""
    if has_cap(CAP_SYS_PTRACE):
        return "refused although the caller has CAP_SYS_PTRACE (a security module, or the target is in another user namespace)"
    my_uid, my_gid = os.getuid(), os.getgid()
    uids = [int(x) for x in st["Uid"].split()[:3]]
    gids = [int(x) for x in st["Gid"].split()[:3]]
    if any(u != my_uid for u in uids) or any(g != my_gid for g in gids):
        return ("the target runs as uid %s gid %s; the caller (uid %d gid %d) needs the same ids "
                "or CAP_SYS_PTRACE" % ("/".join(map(str, uids)), "/".join(map(str, gids)), my_uid, my_gid))
    try:
        with open("/proc/sys/kernel/yama/ptrace_scope") as f:
            scope = int(f.read())
    except (OSError, ValueError):
        scope = 0
    if scope == 3:
        return "Yama ptrace_scope is 3: ptrace attach is disabled on this machine"
    if scope == 2:
        return "Yama ptrace_scope is 2: only a caller with CAP_SYS_PTRACE may attach"
    if scope == 1 and not is_descendant(pid):
        return ("Yama ptrace_scope is 1: only descendants may be traced (run as root, or the target "
                "can allow this caller with prctl(PR_SET_PTRACER))")
    return ("the target is not dumpable (setuid/setgid program or prctl(PR_SET_DUMPABLE, 0)) "
            "or a security module refused")


def seize_error(pid, exc):
    """The domain error for an OSError from PTRACE_SEIZE on pid."""
    if exc.errno == errno.ESRCH:
        return TargetGone(pid)
    if exc.errno != errno.EPERM:
        return exc
    try:
        st = status(pid)
    except TargetGone as gone:
        return gone
    if st.get("State", "?")[:1] in ("Z", "X"):
        return TargetGone(pid, "process %d has exited (zombie)" % pid)
    tracer = int(st.get("TracerPid", "0"))
    if tracer and tracer != os.getpid():
        return AlreadyTraced(pid, tracer)
    return AccessDenied(pid, denied_reason(pid, st))
