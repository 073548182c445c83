"""Waiting on a word of shared memory written by the other side (agent or stub)."""
import struct
import time

from .. import _core


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
