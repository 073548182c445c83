"""The /proc readers the engines and the sandbox share, against what the kernel says."""
import mmap
import os

from pvmexec import proc


def test_mappings_read_every_line_of_a_maps_file_longer_than_one_read():
    held = [mmap.mmap(-1, 4096, prot=mmap.PROT_READ | (mmap.PROT_WRITE if i % 2 else 0)) for i in range(400)]
    try:
        with open("/proc/self/maps") as f:
            lines = f.read().splitlines()
        got = proc.mappings(os.getpid(), identity=True)
        assert len(lines) > 300 and abs(len(got) - len(lines)) < 8      # (maps may change between reads)
        for lo, hi, perms, path, identity in got:
            assert lo < hi and len(perms) == 4 and identity[0] == path and identity[4] == hi - lo
        assert any(path == "[stack]" for _lo, _hi, _perms, path, _id in got)
    finally:
        for m in held:
            m.close()


def test_free_address_is_free_aligned_and_away_from_the_stack():
    maps = proc.mappings(os.getpid())
    for _ in range(50):
        addr = proc.free_address(maps, 1 << 16)
        assert addr and addr % 4096 == 0
        assert not any(lo < addr + (1 << 16) and addr < hi for lo, hi, _perms, _path in maps)
        stack = next(lo for lo, _hi, _perms, path in maps if path == "[stack]")
        below = max(hi for lo, hi, _perms, _path in maps if hi <= stack)
        assert not below <= addr < stack                   # not in the hole the stack grows into
    assert proc.free_address([(0, 4096, "r--p", ""), (8192, 12288, "r--p", "")], 1 << 20) == 0
