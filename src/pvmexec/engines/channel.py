"""The caller's side of the shared-memory channel, beyond the C in native/channel.c: waiting on a
word the other side (agent or stub) writes, and what the channel's status codes mean
(docs/protocol.md)."""
import errno
import fcntl
import os
import struct
import time

from .. import _core
from ..abi import F_GET_SEALS, F_SEAL_FUTURE_WRITE, F_SEAL_GROW, F_SEAL_SHRINK, F_SEAL_WRITE
from ..errors import TargetGone, TargetMisbehaved, TargetStopped


def region_tampered(fd, size):
    """Our own look at a region's memfd made in the target, before we map it: why it is not its size fixed
    by our seals and whole, or None. The target could have raced us between memfd_create and the seals
    (or sealed writes away)."""
    seals = fcntl.fcntl(fd, F_GET_SEALS)
    if seals & (F_SEAL_SHRINK | F_SEAL_GROW) != F_SEAL_SHRINK | F_SEAL_GROW or seals & (F_SEAL_WRITE |
                                                                                          F_SEAL_FUTURE_WRITE):
        return "its memory was tampered with while it was made (seals %#x)" % seals
    if os.fstat(fd).st_size != size:
        return "its memory was resized while it was made (%d bytes)" % os.fstat(fd).st_size
    return None


def wait_word(mem, base, off, want, seconds, gone=lambda: False):
    """Wait until the u32 at mem[off] equals want (futex sleeps of 20 ms at most).

    base is mem's address. Returns False on timeout or when gone() says the other side died.
    """
    deadline = time.monotonic() + seconds
    while True:
        cur = struct.unpack_from("<I", mem, off)[0]
        if cur == want:
            return True
        if gone() or time.monotonic() > deadline:
            return False
        _core.futex_wait(base + off, cur, 20)


def channel_error(e, pid, server_gone):
    """The domain error for an OSError from a channel post/wait, or None if it is no channel status.

    ESRCH: the process died; EAGAIN: the request was withdrawn, the process is stopped;
    ECHILD: the serving thread is gone (server_gone says how, in words); EPROTO: the target
    took the request away from the agent.
    """
    if not isinstance(e, OSError):
        return None
    if e.errno == errno.ESRCH:
        return TargetGone(pid)
    if e.errno == errno.EAGAIN:
        return TargetStopped(pid)
    if e.errno == errno.ECHILD:
        return TargetGone(pid, server_gone)
    if e.errno == errno.EPROTO:
        return TargetMisbehaved(pid, "the agent sleeps while our request is unanswered (the shared slot "
                                     "was written)")
    return None
