"""Handlers: process life (fork, vfork, clone, wait4, waitid, exit, execve) and process groups and sessions."""
import errno
import os
import signal
import struct

from ...abi import (AT_EMPTY_PATH, AT_FDCWD, CLD_CONTINUED, CLD_STOPPED, CLONE_VFORK, CLONE_VM, WCONTINUED, WEXITED,
                    WNOHANG, WNOWAIT, WUNTRACED)
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


def _wait(self, p, pid, options, reap, exits=True):
    """(child, wait status) of the first matching child that ended (if exits), stopped (WUNTRACED) or
    continued (WCONTINUED) and was not yet waited for; None under WNOHANG when none has."""
    with self._cond:
        while True:
            candidates = [c for c in p.children.values() if _matches(p, c, pid)]
            if not candidates:
                raise Errno(errno.ECHILD)
            for c in candidates:
                if c.status is not None and exits:
                    if reap:
                        del p.children[c.pid]
                        self._procs.pop(c.pid, None)
                        total = leader_of(p).children_usage
                        total.add(c.usage or Usage())
                        total.add(c.children_usage)
                    return c, c.status
                event = c.wait_event
                if event and (event[0] == CLD_STOPPED and options & WUNTRACED or
                              event[0] == CLD_CONTINUED and options & WCONTINUED):
                    if not options & WNOWAIT:
                        c.wait_event = None
                    return c, (event[1] << 8 | 0x7F) if event[0] == CLD_STOPPED else 0xFFFF
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
        if options & ~(WNOHANG | WUNTRACED | WCONTINUED | 0xE0000000) & 0xFFFFFFFF:
            raise Errno(errno.EINVAL)
        got = _wait(self, p, pid, options, reap=True)
        if got is None:
            return 0
        c, status = got
        if wstatus:
            p.write(wstatus, struct.pack("<i", status))
        if rusage:
            both = Usage()                              # the child's own and its children's, as Linux
            both.add(c.usage or Usage())
            both.add(c.children_usage)
            p.write(rusage, both.pack())
        return c.pid

    def sys_waitid(self, p, idtype, id_, infop, options, rusage):
        if not options & (WEXITED | WUNTRACED | WCONTINUED):
            raise Errno(errno.EINVAL)
        if idtype == 3:                                 # P_PIDFD
            f = p.fds.get(id_ & 0xFFFFFFFF)
            if f.pidfd is None:
                raise Errno(errno.EINVAL)
            idtype, id_ = 1, f.pidfd.pid
        pid = -1 if idtype == 0 else id_ if idtype == 1 else -id_ if idtype == 2 else None
        if pid is None:
            raise Errno(errno.EINVAL)
        got = _wait(self, p, pid, options, reap=not options & WNOWAIT, exits=bool(options & WEXITED))
        if infop:
            if got is None:
                p.write(infop, bytes(128))
            elif got[0].status is not None and got[1] == got[0].status:
                p.write(infop, self._child_info(got[0]))
            else:
                code, sig = (CLD_CONTINUED, signal.SIGCONT) if got[1] == 0xFFFF else (CLD_STOPPED, got[1] >> 8)
                p.write(infop, struct.pack("<iii4xiIi", SIGCHLD, 0, code, got[0].pid, os.getuid(), sig)
                        .ljust(128, b"\0"))
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
        if path == "" and flags & AT_EMPTY_PATH:
            guest = p.fds.get(dirfd).path
        else:
            guest = self._abs(p, dirfd, path)
        args = p.read_str_array(argv)
        env = p.read_str_array(envp)
        if other_threads(p):
            self._check_program(guest)                    # what can fail first fails before the threads go
            if getattr(p, "is_thread", False):
                self._hand_exec_to_leader(p, guest, args or [guest], env)
            self._end_other_threads(p)
        self._execve(p, guest, args or [guest], env)
        return None
