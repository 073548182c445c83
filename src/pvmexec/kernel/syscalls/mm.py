"""Handlers: memory (mmap, munmap, mprotect, mremap, madvise, mincore, brk); the stub's own mappings are untouchable."""
import errno
import os
import resource
import stat

from ...abi import (MAP_ANONYMOUS, MAP_DENYWRITE, MAP_FIXED, MAP_FIXED_NOREPLACE, MAP_PRIVATE, MAP_SHARED,
                    MAP_SHARED_VALIDATE, MREMAP_FIXED, PAGE, PROT_READ, PROT_WRITE, page_up)
from ...arch import current as _current_arch
from ...proc import maps_prot
from ...syscalls import number
from ..errors import Errno


TASK_SIZE = _current_arch().TASK_SIZE_MAX


def _untouchable(p, start, length):
    """The stub's own pages (its code, stack, channel, patching window, vDSO) are not the guest's."""
    end = start + page_up(length)
    if any(start < e and end > s for s, e in p.protected):
        raise Errno(errno.EINVAL)


def shared_key(p, addr):
    """(st_dev, st_ino, offset in the file) for an address in a shared mapping, else None: what futexes of
    different processes on the same shared page have in common."""
    for start, end, _path, off, dev, ino, shared in p.file_maps:
        if shared and start <= addr < end:
            return dev, ino, off + addr - start
    return None


def _forget_files(p, lo, hi):
    """Pages [lo, hi) no longer come from the files recorded for /proc/PID/maps."""
    kept = []
    for start, end, path, off, dev, ino, shared in p.file_maps:
        if start < lo:
            kept.append((start, min(end, lo), path, off, dev, ino, shared))
        if end > hi:
            at = max(start, hi)
            kept.append((at, end, path, off + at - start, dev, ino, shared))
    p.file_maps = kept


def map_file(p, host_fd, addr, length, prot, flags, off):
    """A mapping of the kernel's host descriptor in the guest's space (the descriptor is lent for the one
    call: the guest never holds it)."""
    return map_in_space(p.space, host_fd, addr, length, prot, flags, off)


def map_files(p, maps):
    """map_file for each (host_fd, addr, length, prot, flags, off), in one batch where the engine can; each
    must land where asked."""
    map_files_in_space(p.space, maps)


def map_files_in_space(space, maps, then=()):
    """then: more calls ((name, args)) made after the mappings, in the same batch where the engine can;
    returns their raw results."""
    backend = space.backend
    if hasattr(backend, "map_files") and maps:
        results = backend.map_files(maps, [(number(name), args) for name, args in then])
    else:
        results = [map_in_space(space, *m) for m in maps] + (space.syscalls(list(then)) if then else [])
    for ret, m in zip(results, maps):
        if -4096 < ret < 0:
            raise Errno(-ret)
        if ret != m[1]:
            raise Errno(errno.ENOMEM)
    return results[len(maps):]


def map_in_space(space, host_fd, addr, length, prot, flags, off):
    backend = space.backend
    if hasattr(backend, "map_file"):
        ret = backend.map_file(host_fd, addr, length, prot, flags, off)
    else:
        with space.lend(host_fd) as remote:
            ret = space.syscall_raw("mmap", addr, length, prot, flags, remote, off)
    if -4096 < ret < 0:
        raise Errno(-ret)
    return ret


def _map_shared_memory(p, addr, length, prot, flags):
    """MAP_SHARED|MAP_ANONYMOUS: memory of a memfd the kernel holds, so that a fork maps the same pages."""
    memfd = os.memfd_create("pvmexec-shared", os.MFD_CLOEXEC)
    try:
        os.ftruncate(memfd, page_up(length))
        at = map_file(p, memfd, addr, length, prot, (flags & ~MAP_ANONYMOUS & ~0x3) | MAP_SHARED, 0)
        st = os.fstat(memfd)
        _forget_files(p, at, at + page_up(length))
        p.file_maps.append((at, at + page_up(length), "/dev/zero (deleted)", 0, st.st_dev, st.st_ino, True))
        keep_mapped(p, memfd, st)
    finally:
        os.close(memfd)
    return at


def keep_mapped(p, host_fd, st):
    """Remember the file behind a mapping, so that fork can map it again in the child; files no mapping
    uses any more are let go (at most a few dozen are kept)."""
    key = (st.st_dev, st.st_ino)
    if key not in p.mapped_files:
        if len(p.mapped_files) >= 32:
            in_use = files_in_maps(p)
            for k in [k for k in p.mapped_files if k not in in_use]:
                os.close(p.mapped_files.pop(k))
        p.mapped_files[key] = os.dup(host_fd)


def files_in_maps(p):
    """{(st_dev, st_ino): [(lo, hi, prot, offset)]} of the guest's file mappings, from the stub's maps."""
    found = {}
    try:
        with open("/proc/%d/maps" % p.space.pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return found
    for line in lines:
        fields = line.split()
        if len(fields) < 6 or fields[4] == "0":
            continue
        lo, hi = (int(x, 16) for x in fields[0].split("-"))
        if any(lo < e and hi > s for s, e in p.protected):
            continue
        major, minor = (int(x, 16) for x in fields[3].split(":"))
        prot = maps_prot(fields[1])
        found.setdefault((os.makedev(major, minor), int(fields[4])), []).append((lo, hi, prot, int(fields[2], 16)))
    return found


def drop_mapped(p):
    for fd in p.mapped_files.values():
        os.close(fd)
    p.mapped_files = {}


def _mode2(p, name, *args):
    ret = p.space.syscall_raw(name, *args)
    if -4096 < ret < 0:
        raise Errno(-ret)
    return ret


class MmCalls:
    """Mixed into Sandbox: `self` is the kernel."""

    def sys_mmap(self, p, addr, length, prot, flags, fd, off):
        prot &= 0xFFFFFFFF
        flags &= 0xFFFFFFFF
        if length == 0 or length > TASK_SIZE or off % PAGE or addr % PAGE and flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            raise Errno(errno.EINVAL)
        if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
            _untouchable(p, addr, length)
        shared = flags & 0x3 in (MAP_SHARED, MAP_SHARED_VALIDATE)
        if flags & MAP_ANONYMOUS and not shared:
            at = _mode2(p, "mmap", addr, length, prot, flags, -1, 0)
            _forget_files(p, at, at + page_up(length))
            return at
        if flags & MAP_ANONYMOUS:
            return _map_shared_memory(p, addr, length, prot, flags)
        f = p.fds.get(fd)
        st = os.fstat(f.host_fd)
        if stat.S_ISCHR(st.st_mode) and f.path == "/dev/zero" and shared:
            return _map_shared_memory(p, addr, length, prot, flags & ~MAP_ANONYMOUS)
        if not stat.S_ISREG(st.st_mode):
            raise Errno(errno.ENODEV)
        if f.flags & 3 == os.O_WRONLY or shared and prot & PROT_WRITE and f.flags & 3 != os.O_RDWR:
            raise Errno(errno.EACCES)
        if shared:
            at = map_file(p, f.host_fd, addr, length, prot, flags, off)
            _forget_files(p, at, at + page_up(length))
            p.file_maps.append((at, at + page_up(length), f.path, off, st.st_dev, st.st_ino, True))
            keep_mapped(p, f.host_fd, st)
            return at
        # The file's own pages, copied only when written to (fork copies just those).
        at = map_file(p, f.host_fd, addr, length, prot, (flags & ~0x3 & ~MAP_DENYWRITE) | MAP_PRIVATE, off)
        _forget_files(p, at, at + page_up(length))
        p.file_maps.append((at, at + page_up(length), f.path, off, st.st_dev, st.st_ino, False))
        keep_mapped(p, f.host_fd, st)
        return at

    def sys_munmap(self, p, addr, length):
        _untouchable(p, addr, length)
        ret = _mode2(p, "munmap", addr, length)
        _forget_files(p, addr, addr + page_up(length))
        return ret

    def sys_mprotect(self, p, addr, length, prot):
        _untouchable(p, addr, length)
        return _mode2(p, "mprotect", addr, length, prot & 0xFFFFFFFF)

    def sys_mremap(self, p, old, old_len, new_len, flags, new):
        _untouchable(p, old, old_len)
        if flags & MREMAP_FIXED:
            _untouchable(p, new, new_len)
        return _mode2(p, "mremap", old, old_len, new_len, flags & 0xFFFFFFFF, new)

    def sys_madvise(self, p, addr, length, advice):
        _untouchable(p, addr, length)
        return _mode2(p, "madvise", addr, length, advice & 0xFFFFFFFF)

    def sys_get_mempolicy(self, p, policy, nmask, maxnode, addr, flags):
        """One memory node and the default policy everywhere (numactl, top and libnuma ask)."""
        flags &= 0xFFFFFFFF
        node, addr_given, allowed = 1, 2, 4                 # MPOL_F_NODE, MPOL_F_ADDR, MPOL_F_MEMS_ALLOWED
        if flags & ~7 or flags & allowed and flags & (node | addr_given) or addr and not flags & addr_given:
            raise Errno(errno.EINVAL)
        if nmask:
            if not 1 <= maxnode <= 1 << 16:
                raise Errno(errno.EINVAL)
            words = (maxnode + 63) // 64
            p.write(nmask, (1 if flags & allowed else 0).to_bytes(8, "little") + bytes(8 * (words - 1)))
        if policy:
            p.write(policy, bytes(4))                       # MPOL_DEFAULT, or node 0 with MPOL_F_NODE
        return 0

    def sys_mincore(self, p, addr, length, vec):
        """Run in the guest's space: the kernel writes a byte per page into vec, never into the stub's pages."""
        if length:
            try:
                _untouchable(p, vec, page_up(length) // PAGE)
            except Errno:
                raise Errno(errno.EFAULT) from None     # to the guest those pages are not there
        return _mode2(p, "mincore", addr, length, vec)

    def sys_brk(self, p, addr):
        """The program break, kept by the kernel: pages are mapped and unmapped behind it."""
        if addr < p.brk_start or addr > p.brk_start + (1 << 40):
            return p.brk_cur
        want = page_up(addr)
        if want > p.brk_mapped:
            try:
                _untouchable(p, p.brk_mapped, want - p.brk_mapped)
                got = p.space.syscall_raw("mmap", p.brk_mapped, want - p.brk_mapped, PROT_READ | PROT_WRITE,
                                          MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE, -1, 0)
            except Errno:
                return p.brk_cur
            if got != p.brk_mapped:
                if not -4096 < got < 0:
                    p.space.syscall_raw("munmap", got, want - p.brk_mapped)
                return p.brk_cur
            p.brk_mapped = want
        elif want < p.brk_mapped:
            p.space.syscall_raw("munmap", want, p.brk_mapped - want)
            p.brk_mapped = want
        p.brk_cur = addr
        return addr

    # Locking pages in memory changes nothing the guest can see: accepted within RLIMIT_MEMLOCK (without
    # CAP_IPC_LOCK, more than the limit is ENOMEM and a zero limit EPERM, as Linux says), nothing locked.
    def _lock_within_limit(self, p, size):
        if os.geteuid() == 0:
            return 0
        limit = resource.getrlimit(resource.RLIMIT_MEMLOCK)[0] if 8 not in p.rlimits else p.rlimits[8][0]
        if limit == 0:
            raise Errno(errno.EPERM)
        if limit != resource.RLIM_INFINITY and size > limit:
            raise Errno(errno.ENOMEM)
        return 0

    def sys_mlock(self, p, addr, length):
        return self._lock_within_limit(p, page_up(length))

    def sys_munlock(self, p, addr, length):
        return 0

    def sys_mlock2(self, p, addr, length, flags):
        if flags & ~1:                                  # MLOCK_ONFAULT
            raise Errno(errno.EINVAL)
        return self._lock_within_limit(p, page_up(length))

    def sys_mlockall(self, p, flags):
        if not flags & 7 or flags & ~7:                 # MCL_CURRENT, MCL_FUTURE, MCL_ONFAULT
            raise Errno(errno.EINVAL)
        if flags & 1:                                   # MCL_CURRENT: all it has mapped now
            try:
                with open("/proc/%d/status" % p.space.pid) as f:
                    size = next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmSize:"))
            except (OSError, StopIteration, ValueError):
                size = 0
            return self._lock_within_limit(p, size)
        return self._lock_within_limit(p, 0)

    def sys_munlockall(self, p):
        return 0

    def sys_msync(self, p, addr, length, flags):
        if addr % PAGE or flags & ~7 or flags & 5 == 5:           # MS_ASYNC|MS_SYNC together: EINVAL
            raise Errno(errno.EINVAL)
        if flags & 4:                                              # MS_SYNC: the shared files reach the disk
            shared = {(dev, ino) for _s, _e, _p, _o, dev, ino, is_shared in p.file_maps if is_shared}
            for fd in [fd for key, fd in p.mapped_files.items() if key in shared]:
                try:
                    os.fdatasync(fd)
                except OSError:
                    pass
        return 0
