"""The caller's side of the shared-memory channel, beyond the C in native/channel.c: waiting on a
word the other side (agent or stub) writes, and what the channel's status codes mean
(docs/protocol.md)."""
import errno
import struct
import time

from .. import _core
from ..errors import TargetGone, TargetMisbehaved, TargetStopped


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
