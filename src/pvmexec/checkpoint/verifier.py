"""image verify: an image against the process it was dumped from, page by page, without reading a page
the process does not hold into existence."""
from __future__ import annotations

import bisect
import os

from ..abi import PAGE
from ..proc import PagemapScan, mappings
from .image import FROM_FILE, Image
from .tracking import Mapping, held_ranges


def verify(directory: str, pid: int, frozen: bool = False) -> list[tuple[int, str]]:
    """Compare the image's memory with process pid's, page by page, through /proc/PID/mem, without
    reading a page the process does not hold into existence: a page it does not hold must be one the
    image says is zero (or the file's, for a file mapping); one it holds must equal the image's.
    A shared file mapping is the file's and is not compared.

    Freezes the process meanwhile unless frozen (already stopped by the caller). Returns a list
    of differences (address, what): empty when they match.
    """
    img = Image(directory)
    img.check()
    engine = None
    if not frozen:
        from ..engines.ptrace import PtraceEngine
        engine = PtraceEngine(pid, pid, reap_leader=False, check_seccomp=False)
        engine.freeze()
    diffs: list[tuple[int, str]] = []
    try:
        idx = img.page_index()
        keys = sorted(idx)
        scan = PagemapScan(pid)
        mem = os.open("/proc/%d/mem" % pid, os.O_RDONLY)
        try:
            with open(os.path.join(directory, "pages.img"), "rb") as pages:
                real = [(lo, hi) for lo, hi, _perms, _path in mappings(pid)]
                for mp in img.manifest["mappings"]:
                    if "r" in mp["perms"] and mp.get("source") != "shared-file":
                        _verify_mapping(mp, idx, keys, pages, mem, scan, pid, real, diffs)
        finally:
            os.close(mem)
            scan.close()
    finally:
        if engine is not None:
            engine.thaw()
    return diffs


def _verify_mapping(mp, idx, keys, pages, mem, scan, pid, real, diffs):
    """Only the pages the image has or the process holds are looked at: work bounded by the two, not by
    what a manifest declares (a hostile one may declare terabytes)."""
    start, end, from_file = mp["start"], mp["end"], mp.get("source") == "file"
    m = Mapping("%x-%x %s %x 00:00 0 %s" % (start, end, mp["perms"], mp["offset"], mp["path"]))
    held = [(max(s, lo), min(e, hi)) for s, e in held_ranges(scan, pid, m, mp.get("source", "memory"))
            for lo, hi in real if lo < e and hi > s]     # what the process really maps there
    holds = set()
    for s, e in held:
        holds.update(range(s, e, PAGE))
    for addr in sorted(holds.union(keys[bisect.bisect_left(keys, start):bisect.bisect_left(keys, end)])):
        off = idx.get(addr)
        if addr not in holds:
            if off is not None and off < FROM_FILE and (from_file or _page(pages, off) != bytes(PAGE)):
                diffs.append((addr, "in the image, not held by the process"))
            continue
        want = bytes(PAGE) if off is None or off >= FROM_FILE else _page(pages, off)
        try:
            got = os.pread(mem, PAGE, addr)
        except OSError as e:
            diffs.append((addr, "unreadable in the process: %s" % e.strerror))
            continue
        if got != want or off == FROM_FILE:
            diffs.append((addr, "differs" if off is not None else "not in the image"))


def _page(pages, off):
    pages.seek(off)
    return pages.read(PAGE)
