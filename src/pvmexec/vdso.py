"""The vDSO and its data pages ([vvar], [vvar_vclock]): the kernel maps them into every process, and a
process remembers where (its auxv, libc's pointers); a restore moves them to the places the image
recorded, in a process of ours or a stub space, and a fork of a restored guest moves them likewise."""
import errno

from .abi import PAGE
from .arch import current as _current_arch

SPECIAL = ("[vvar]", "[vvar_vclock]", "[vdso]")        # moved, never mapped or written
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2


def free_range(size, busy, low=1 << 32):
    """A page-aligned range of size bytes meeting none of busy ([(lo, hi)]), at or above low; None if none."""
    addr = low
    for lo, hi in sorted(busy):
        if hi <= addr:
            continue
        if lo >= addr + size:
            break
        addr = (hi + PAGE - 1) & ~(PAGE - 1)
    return addr if addr + size <= _current_arch().TASK_SIZE_MAX else None


def move_specials(call, ours, mappings, busy):
    """The vDSO and its data pages (ours: name -> (lo, hi) where they are) to their places in mappings
    (dicts with path, start, end), by call(name, *args) in the process: first out of the way (they may
    overlap each other's places); those mappings lack are unmapped. busy: other ranges to keep clear.
    Returns name -> (lo, hi) where they are now."""
    want = {mp["path"]: mp for mp in mappings if mp["path"] in SPECIAL}
    busy = [(m["start"], m["end"]) for m in mappings] + list(ours.values()) + list(busy)
    ours = dict(ours)
    for name, (lo, hi) in list(ours.items()):
        if name not in want:
            call("munmap", lo, hi - lo)
            del ours[name]
            continue
        tmp = free_range(hi - lo, busy)
        if tmp is None:
            raise OSError(errno.ENOMEM, "no room to move %s out of the way" % name)
        busy.append((tmp, tmp + hi - lo))
        call("mremap", lo, hi - lo, hi - lo, MREMAP_MAYMOVE | MREMAP_FIXED, tmp)
        ours[name] = (tmp, tmp + hi - lo)
    for name, mp in want.items():
        lo, hi = ours[name]
        call("mremap", lo, hi - lo, hi - lo, MREMAP_MAYMOVE | MREMAP_FIXED, mp["start"])
        ours[name] = (mp["start"], mp["start"] + hi - lo)
    return ours
