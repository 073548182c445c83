"""Handlers: process life (fork, vfork, clone, wait4, waitid, exit, execve) and process groups and sessions."""
import errno
import signal
import struct

from ...abi import AT_EMPTY_PATH, AT_FDCWD, CLONE_VFORK, CLONE_VM, WEXITED, WNOHANG, WNOWAIT
from ..errors import Errno, Exited, Interrupted, ThreadExit
from ..task import Usage, leader_of
from ..threads import other_threads


SIGCHLD = signal.SIGCHLD


def _matches(p, c, pid):
    if pid == -1:
        return True
    if pid > 0:
        return c.pid == pid
    return c.pgid == (p.pgid if pid == 0 else -pid)


def _wait(self, p, pid, options, reap):
    with self._cond:
        while True:
            candidates = [c for c in p.children.values() if _matches(p, c, pid)]
            if not candidates:
                raise Errno(errno.ECHILD)
            for c in candidates:
                if c.status is not None:
                    if reap:
                        del p.children[c.pid]
                        self._procs.pop(c.pid, None)
                        total = leader_of(p).children_usage
                        total.add(c.usage or Usage())
                        total.add(c.children_usage)
                    return c
            if options & WNOHANG:
                return None
            if self._signal_ready(p):
                raise Interrupted()
            self._cond.wait(0.2)


def process_named(self, p, pid):
    """The guest process (or thread) a pid argument names; ESRCH when there is none."""
    if pid == 0 or pid == p.pid:
        return p
    with self._cond:
        q = self._procs.get(pid) or self._procs_by_tid.get(pid)
    if q is None or q.status is not None:
        raise Errno(errno.ESRCH)
    return q


class ProcessCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_fork(self, p):
        return self._clone(p, SIGCHLD, 0, 0, 0, 0)

    def sys_vfork(self, p):
        return self._clone(p, CLONE_VM | CLONE_VFORK | SIGCHLD, 0, 0, 0, 0)

    def sys_clone(self, p, flags, newsp, parent_tid, child_tid, tls):
        return self._clone(p, flags, newsp, parent_tid, child_tid, tls)

    def sys_clone3(self, p, args, size):
        raise Errno(errno.ENOSYS)                       # libc falls back to clone

    def sys_wait4(self, p, pid, wstatus, options, rusage):
        pid &= 0xFFFFFFFF
        pid = pid - (1 << 32) if pid >= 1 << 31 else pid
        c = _wait(self, p, pid, options, reap=True)
        if c is None:
            return 0
        if wstatus:
            p.write(wstatus, struct.pack("<i", c.status))
        if rusage:
            both = Usage()                              # the child's own and its children's, as Linux
            both.add(c.usage or Usage())
            both.add(c.children_usage)
            p.write(rusage, both.pack())
        return c.pid

    def sys_waitid(self, p, idtype, id_, infop, options, rusage):
        if not options & WEXITED:
            raise Errno(errno.EINVAL)
        pid = -1 if idtype == 0 else id_ if idtype == 1 else -id_ if idtype == 2 else None
        if pid is None:
            raise Errno(errno.EINVAL)
        c = _wait(self, p, pid, options, reap=not options & WNOWAIT)
        if infop:
            p.write(infop, self._child_info(c) if c else bytes(128))
        return 0

    def sys_getpgid(self, p, pid):
        return process_named(self, p, pid).pgid

    def sys_getpgrp(self, p):
        return p.pgid

    def sys_getsid(self, p, pid):
        return process_named(self, p, pid).sid

    def sys_setpgid(self, p, pid, pgid):
        q = process_named(self, p, pid)
        if q is not p and q.parent is not p:
            raise Errno(errno.ESRCH)
        if pgid >= 1 << 31:
            raise Errno(errno.EINVAL)
        q.pgid = pgid or q.pid
        return 0

    def sys_setsid(self, p):
        if p.pgid == p.pid:
            raise Errno(errno.EPERM)
        p.sid = p.pgid = p.pid
        return p.pid

    def sys_getppid(self, p):
        return p.ppid

    def sys_exit(self, p, code):
        if other_threads(p):
            raise ThreadExit()
        raise Exited((code & 0xFF) << 8)

    def sys_exit_group(self, p, code):
        raise Exited((code & 0xFF) << 8)

    def sys_getpid(self, p):
        return p.pid

    def sys_execve(self, p, path, argv, envp):
        return self.sys_execveat(p, AT_FDCWD, path, argv, envp, 0)

    def sys_execveat(self, p, dirfd, path, argv, envp, flags):
        if flags & ~(AT_EMPTY_PATH | 0x100):
            raise Errno(errno.EINVAL)
        if other_threads(p):
            raise Errno(errno.ENOSYS)                   # exec from a multi-threaded process is not provided yet
        if path == "" and flags & AT_EMPTY_PATH:
            guest = p.fds.get(dirfd).path
        else:
            guest = self._abs(p, dirfd, path)
        args = p.read_str_array(argv)
        env = p.read_str_array(envp)
        self._execve(p, guest, args or [guest], env)
        return None
