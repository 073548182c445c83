"""The kernel's own exceptions: a Linux errno for the guest, and the control flow of processes and threads.

This module imports nothing from the kernel: every other kernel module may use it.
"""
import errno
import os


class Interrupted(Exception):
    """A blocking call in the kernel gave way to a signal (EINTR, or restarted under SA_RESTART)."""


class ThreadExit(Exception):
    """exit(2) by one thread of several: the thread ends, its process goes on."""


class Exited(Exception):
    """The guest process ended; `status` is its wait status (exit code << 8, or the signal number)."""

    def __init__(self, status):
        super().__init__(status)
        self.status = status


class Errno(Exception):
    """A system call's failure as the guest sees it (the handler's -errno)."""

    def __init__(self, err):
        super().__init__(err, os.strerror(err))
        self.errno = err


def host_call(call, *args, **kw):
    """A host call for the guest: its OSError as the guest's errno; an argument out of the host call's
    range (a length past 2**63, a NUL in a name) as EINVAL, as Linux answers such values."""
    try:
        return call(*args, **kw)
    except OSError as e:
        raise Errno(e.errno or errno.EIO) from None
    except (OverflowError, ValueError):
        raise Errno(errno.EINVAL) from None
