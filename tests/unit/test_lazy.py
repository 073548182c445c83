"""The restore's page plan (_core.index_plan) and the page server's bookkeeping (lazy._Space), without
a process: what is written now, what is left to the server, and how the server follows the events."""
import struct

import pytest

from pvmexec import _core
from pvmexec.checkpoint import FROM_FILE, ZERO
from pvmexec.checkpoint.lazy import _Space

P = 4096
NONE, MEMORY, FILE, LAZY = 0, 1, 2, 3


def _idx(*pairs):
    return struct.pack("<%dQ" % (2 * len(pairs)), *[v for p in pairs for v in p])


def _triples(raw):
    return list(struct.iter_unpack("<QQQ", raw))


def _plan(idx, maps, cut=()):
    now, later = _core.index_plan(idx, struct.pack("<%dQ" % (3 * len(maps)), *[v for m in maps for v in m]),
                                  struct.pack("<%dQ" % len(cut), *cut))
    return _triples(now), _triples(later)


def test_the_last_record_wins_and_runs_merge_in_memory_and_in_the_file():
    idx = _idx((0x10000, 0), (0x11000, P), (0x12000, 2 * P), (0x11000, 9 * P), (0x13000, 3 * P))
    assert _triples(_core.index_runs(idx)) == [(0x10000, 0, 1), (0x11000, 9 * P, 1), (0x12000, 2 * P, 2)]


def test_each_kind_of_mapping_takes_its_own_pages():
    idx = _idx((0x10000, 0), (0x11000, ZERO), (0x20000, P), (0x21000, ZERO), (0x22000, FROM_FILE),
               (0x30000, 2 * P), (0x40000, 3 * P), (0x41000, 4 * P), (0x42000, 5 * P), (0x43000, ZERO))
    maps = [(0x10000, 0x12000, MEMORY), (0x20000, 0x23000, FILE), (0x30000, 0x31000, NONE), (0x40000, 0x44000, LAZY)]
    now, later = _plan(idx, maps, cut=[0x41000])
    # memory: zeros need no writing; a file's zero page does, its FROM_FILE page is the file's;
    # lazy: all to the server but the cut page (an rseq area), and zeros are the server's zero page
    assert now == [(0x10000, 0, 1), (0x20000, P, 1), (0x21000, ZERO, 1), (0x41000, 4 * P, 1)]
    assert later == [(0x40000, 3 * P, 1), (0x42000, 5 * P, 1)]


def test_runs_are_cut_at_mapping_bounds():
    idx = _idx(*[(0x10000 + i * P, i * P) for i in range(4)])
    now, later = _plan(idx, [(0x10000, 0x12000, MEMORY), (0x12000, 0x14000, LAZY)])
    assert now == [(0x10000, 0, 2)] and later == [(0x12000, 2 * P, 2)]


@pytest.mark.parametrize("idx", [_idx((0x50000, 0)), _idx((0x10800, 0)), _idx((0x10000, 17))])
def test_a_page_outside_every_mapping_or_unaligned_is_refused(idx):
    with pytest.raises(ValueError):
        _plan(idx, [(0x10000, 0x20000, MEMORY)])


def _runs(sp):
    return list(zip(sp.starts, sp.offs, sp.ns))


def test_the_server_takes_drops_and_moves_what_the_process_does():
    sp = _Space(0, struct.pack("<6Q", 0x10000, 0, 10, 0x30000, 10 * P, 5))
    assert sp.find(0x10000) == 0 and sp.find(0x1a000) == -1 and sp.find(0x34000) == 1
    assert sp.take(0x12000, 3 * P) == (2 * P, 3)                 # a fault: the page and those after it
    assert _runs(sp) == [(0x10000, 0, 2), (0x15000, 5 * P, 5), (0x30000, 10 * P, 5)]
    sp.drop(0x11000, 0x31000)                                      # madvise(DONTNEED), munmap
    assert _runs(sp) == [(0x10000, 0, 1), (0x31000, 11 * P, 4)]
    sp.move(0x32000, 0x100000, 2 * P)                              # mremap
    assert _runs(sp) == [(0x10000, 0, 1), (0x31000, 11 * P, 1), (0x34000, 14 * P, 1), (0x100000, 12 * P, 2)]
    child = sp.copy(1)                                             # fork: its own from now on
    assert sp.take_last(8 * P) == [(0x100000, 12 * P, 2)]          # the background copy, from the top
    assert _runs(child)[-1] == (0x100000, 12 * P, 2) and len(_runs(sp)) == 3


def test_the_background_copy_gathers_pages_that_follow_in_memory():
    sp = _Space(0, struct.pack("<9Q", 0x10000, 5 * P, 1, 0x11000, 0, 2, 0x20000, 9 * P, 1))
    assert sp.take_last(16 * P) == [(0x20000, 9 * P, 1)]
    assert sp.take_last(2 * P) == [(0x11000, 0, 2)]
    sp.put_back(0x11000, 0, 2)
    assert sp.take_last(16 * P) == [(0x10000, 5 * P, 1), (0x11000, 0, 2)] and not sp
