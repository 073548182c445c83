"""Stub spaces: guest code at full speed in an address space of our own, and no way out of it."""
import errno
import os
import sys
import signal
import struct
import textwrap
import time

import pytest

import pvmexec
from pvmexec import _core
from pvmexec.guest import Guest
from conftest import kill_caller_after_first_line

L = _core.LAYOUT
AUDIT_ARCH_I386 = 0x40000003


@pytest.fixture
def space():
    s = pvmexec.Space.create()
    try:
        yield s
    finally:
        s.detach()
    assert s._engine.proc.poll() is not None, "the stub process must be gone after detach"


def load_code(space, code):
    """Guest code from raw bytes: mapped read+exec in the stub."""
    addr = space.syscall("mmap", 0, 4096, 3, 0x22, -1, 0)
    space.write(addr, code)
    space.syscall("mprotect", addr, 4096, 5)
    return addr


def test_fresh_space_holds_only_the_stub(space):
    with open("/proc/%d/maps" % space.pid) as f:
        names = {line.split()[5] if len(line.split()) > 5 else "" for line in f}
    assert names <= {"", "[stack]", "[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]",
                     "/memfd:pvmexec-stub", "/memfd:pvmexec-stub-region", "(deleted)"}
    # One descriptor: the socket the caller lends files to map over (the filter allows nothing else on it).
    assert sorted(os.listdir("/proc/%d/fd" % space.pid)) == ["3"]
    assert os.readlink("/proc/%d/fd/3" % space.pid).startswith("socket:")
    with open("/proc/%d/status" % space.pid) as f:
        status = f.read()
    assert "Seccomp:\t2" in status and "NoNewPrivs:\t1" in status and "Name:\tpvmexec-stub" in status


def test_selftest_syscall_loop(space):
    with Guest(space) as g:
        ctx = g.context("syscall_loop", rdi=789)
        for _ in range(500):
            stop = space.exec(ctx)
            assert stop.reason == "syscall" and stop.syscall == 123 and stop.siginfo.arch == 0xC000003E
            assert stop.ctx.rdi == 789 and stop.siginfo.call_addr == stop.ctx.rip
            ctx = stop.ctx
            ctx.rax = 456
        ctx.rax = 1                                    # a wrong answer: the guest aborts with ud2
        assert space.exec(ctx).signo == signal.SIGILL


def test_selftest_fault_loop(space):
    value = 0xAABBCCDDEE
    with Guest(space) as g:
        ctx = g.context("fault_loop", rdi=g.data, rsi=value)
        for i in range(21):
            stop = space.exec(ctx)
            assert stop.signo == signal.SIGSEGV and stop.ctx.rax == i % 7 + 1
            assert stop.ctx.rip == g.address("fault_store")
            ctx = stop.ctx
            ctx.rax, ctx.rcx = g.data, value


def test_full_register_state_round_trips(space):
    with Guest(space) as g:
        pattern = bytes(range(16))
        space.write(g.data, pattern)
        ctx = g.context("fpu_probe", rdi=g.data, r15=0x1515, r12=0x1212, fs_base=0x12345000, gs_base=0x6789000)
        ctx.fpstate = space.initial_fpstate()
        stop = space.exec(ctx)
        assert stop.syscall == 123
        out = stop.ctx
        assert (out.r15, out.r12, out.fs_base, out.gs_base) == (0x1515, 0x1212, 0x12345000, 0x6789000)
        assert out.fpstate[160:176] == pattern                # xmm0, loaded by the guest
        other = bytes(range(50, 66))
        out.fpstate = out.fpstate[:160] + other + out.fpstate[176:]
        stop = space.exec(out)
        assert stop.syscall == 123 and space.read(g.data, 16) == other


def test_mode2_is_limited_to_the_stubs_own_memory(space):
    # the stub is alone in a pid namespace of its own: pid 1 there, and its parent outside it
    assert (space.syscall("getpid"), space.syscall("getppid")) == (1, 0)
    with pytest.raises(pvmexec.RemoteSyscallError) as e:
        space.syscall("openat", -100, 0, 0, 0)
    assert e.value.errno == errno.EPERM and "stub space" in str(e.value)


def test_int80_is_trapped_not_run(space):
    addr = load_code(space, bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0x0F, 0x0B]))    # getpid via int $0x80
    stop = space.exec(pvmexec.SigContext(rip=addr, rsp=0))
    assert stop.reason == "syscall" and stop.siginfo.arch == AUDIT_ARCH_I386 and stop.syscall == 20


def test_sysenter_is_contained(space):
    addr = load_code(space, bytes([0xB8, 20, 0, 0, 0, 0x0F, 0x34, 0x0F, 0x0B]))
    stop = space.exec(pvmexec.SigContext(rip=addr, rsp=0))
    assert stop.reason == "signal" and stop.signo in (signal.SIGILL, signal.SIGSEGV)


def test_vsyscall_is_contained(space):
    with Guest(space) as g:
        space.write(g.data, bytes(16))
        # mov $0xffffffffff600000,%rax; call *%rax  (gettimeofday(rdi=data) through the vsyscall page)
        addr = load_code(space, bytes([0x48, 0xC7, 0xC0, 0x00, 0x00, 0x60, 0xFF, 0xFF, 0xD0, 0x0F, 0x0B]))
        stop = space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top, rdi=g.data))
        if stop.reason == "syscall":
            assert stop.syscall == 96                          # emulated vsyscall, trapped by the filter
        else:
            assert stop.signo == signal.SIGSEGV                # vsyscall page not executable here
        assert space.read(g.data, 16) == bytes(16)             # the time was never written


def test_jumping_into_the_stubs_syscall_gadget_is_fatal_for_forbidden_calls(space, tmp_path):
    target_dir = str(tmp_path / "escaped")
    with Guest(space) as g:
        space.write(g.data, target_dir.encode() + b"\0")
        gadget = space._engine.gadget
        # mov $83,%eax (mkdir); mov $0x1ff,%esi; jmp *%rdx
        addr = load_code(space, bytes([0xB8, 83, 0, 0, 0, 0xBE, 0xFF, 0x01, 0, 0, 0xFF, 0xE2]))
        with pytest.raises(pvmexec.TargetGone):
            space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top, rdi=g.data, rdx=gadget))
    assert not os.path.exists(target_dir)


def test_guest_overwriting_the_channel_does_not_break_the_caller(space):
    with Guest(space) as g:
        header = struct.unpack_from("<QQ", space._engine._map, 16)
        block = header[0] + L["STUB_BLOCK_OFF"]
        # cld; rep stosb (al=0xff over the slot, the stop record and part of the FPU area); syscall(123)
        code = bytes([0xFC, 0xF3, 0xAA, 0xB8, 123, 0, 0, 0, 0x0F, 0x05, 0x0F, 0x0B])
        addr = load_code(space, code)
        for length in (64, 4096, L["STUB_FP_OFF"] + 4096):
            stop = space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top, rdi=block, rcx=length, rax=0xFF))
            assert stop.reason == "syscall" and stop.syscall == 123
            # The space still works: the stub ignores the junk it finds in its channel.
            assert space.syscall("getpid") == 1
            ctx = g.context("syscall_loop", rdi=789)
            assert space.exec(ctx).syscall == 123


CALLER = textwrap.dedent("""
    import sys, pvmexec
    space = pvmexec.Space.create()
    print(space.pid, flush=True)
    sys.stdin.read()
""")


def test_space_dies_with_its_caller():
    stub = int(kill_caller_after_first_line(CALLER))
    deadline = time.monotonic() + 5
    while os.path.exists("/proc/%d" % stub):
        with open("/proc/%d/stat" % stub) as f:
            if f.read().rsplit(")", 1)[1].split()[0] == "Z":
                break                                  # dead; its parent (the caller) is gone too
        assert time.monotonic() < deadline, "stub %d outlived its caller" % stub
        time.sleep(0.02)


def test_several_guest_threads_in_one_space(space):
    import threading
    with Guest(space) as g:
        threads = [0] + [space.new_thread() for _ in range(3)]
        assert threads == [0, 1, 2, 3]
        # One stub thread per guest thread, plus the one that serves mode 2.
        assert len(os.listdir("/proc/%d/task" % space.pid)) == 1 + len(threads)
        # Each guest thread has its own stack and runs its own syscall loop, all at once.
        errors = []

        def run(t):
            try:
                stack = space.syscall("mmap", 0, 65536, 3, 0x22, -1, 0)
                ctx = g.context("syscall_loop", rdi=1000 + t, rsp=stack + 65536 - 64, fs_base=0x1000 * (t + 1))
                for _ in range(300):
                    stop = space.exec(ctx, thread=t)
                    assert stop.syscall == 123 and stop.ctx.rdi == 1000 + t and stop.ctx.fs_base == 0x1000 * (t + 1)
                    ctx = stop.ctx
                    ctx.rax = 456
            except BaseException as e:                         # reported to the test thread below
                errors.append((t, e))

        workers = [threading.Thread(target=run, args=(t,)) for t in threads]
        for w in workers:
            w.start()
        for w in workers:
            w.join(60)
        assert not errors, errors
        with pytest.raises(ValueError):
            space.exec(g.context("syscall_loop"), thread=9)


def test_guest_cannot_fork_its_stub(space):
    # clone(SIGCHLD) = fork through the stub's own syscall instruction: the filter kills the stub.
    with Guest(space) as g:
        code = bytes([0xB8, 56, 0, 0, 0, 0xBF, 17, 0, 0, 0, 0x31, 0xF6, 0xFF, 0xE2])   # mov $56,%eax; mov $17,%edi; xor %esi,%esi; jmp *%rdx
        addr = load_code(space, code)
        pid = space.pid
        with pytest.raises(pvmexec.TargetGone):
            space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top, rdx=space._engine.gadget))
    children = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open("/proc/%s/stat" % entry) as f:
                    if int(f.read().rsplit(")", 1)[1].split()[1]) == pid:
                        children.append(entry)
            except (FileNotFoundError, ProcessLookupError):
                pass
    assert children == []


def test_invalid_register_state_is_refused(space):
    with Guest(space) as g:
        for bad, match in ((dict(cs=0x23), "32-bit"), (dict(ss=0), "ss="), (dict(rip=1 << 63), "rip"),
                           (dict(fs_base=1 << 60), "fs_base"), (dict(gs=0x10), "gs")):
            with pytest.raises(pvmexec.InvalidContext, match=match):
                space.exec(g.context("syscall_loop", **bad))
        assert space.exec(g.context("syscall_loop")).syscall == 123


# -- patched syscall sites: the fast path must be indistinguishable from the trap -------------------

def _xmm(fp, n):
    return fp[160 + 16 * n:176 + 16 * n]


def _with_xmm(fp, n, value):
    fp = bytearray(fp)
    fp[160 + 16 * n:176 + 16 * n] = value
    return bytes(fp)


def _loop_stops(space, count):
    """Stops of the syscall loop, each reduced to what must not depend on where things are mapped;
    xmm5 is set by the caller before every run and read back at the next stop."""
    shapes = []
    with Guest(space) as g:
        ctx = g.context("syscall_loop", rdi=789)
        ctx.fpstate = _with_xmm(space.initial_fpstate(), 5, bytes([0]) * 16)
        for i in range(count):
            stop = space.exec(ctx)
            q = stop.ctx.as_dict()
            for name in ("rip", "rcx"):
                q[name] -= g.code
            q["rsp"] -= g.stack_top
            info = stop.siginfo
            shapes.append((stop.signo, info.code, info.errno, info.syscall, info.arch, info.call_addr - g.code,
                           sorted(q.items()), stop.ctx.fpstate))
            ctx = stop.ctx
            ctx.rax = 456
            ctx.fpstate = _with_xmm(stop.ctx.fpstate, 5, bytes([i + 1]) * 16)
    return shapes


def test_patched_site_stops_are_the_trapped_ones():
    trapped = pvmexec.Space.create(patch_syscalls=False)
    patched = pvmexec.Space.create()
    try:
        assert trapped.patching.startswith("off") and patched.patching == "on"
        slow = _loop_stops(trapped, 6)
        fast = _loop_stops(patched, 6)
        assert trapped._engine.patched_sites == 0 and patched._engine.patched_sites == 1
        assert fast == slow
        # The caller's FPU state went in and came back out through the patched path too.
        assert [_xmm(s[7], 5) for s in fast] == [bytes([i]) * 16 for i in range(6)]
    finally:
        trapped.detach()
        patched.detach()


def test_patched_site_still_traps_when_its_syscall_is_reentered(space):
    with Guest(space) as g:
        stop = space.exec(g.context("syscall_loop", rdi=789))
        site = stop.ctx.rip - 7
        assert space._engine.patched_sites == 1
        code = space.read(site, 7)
        assert code[:3] == b"\xff\x24\x25" and code[5:] == b"\x0f\x05"    # jmp *slot, still ending in syscall
        ctx = stop.ctx
        for _ in range(3):                             # restart it as a tracer would: rip - 2
            ctx.rip -= 2
            ctx.rax = 123
            stop = space.exec(ctx)
            assert stop.reason == "syscall" and stop.syscall == 123 and stop.ctx.rip == site + 7
            ctx = stop.ctx
        assert space._engine.patched_sites == 1


def test_single_stepping_over_a_patched_site(space):
    TF = 0x100
    with Guest(space) as g:
        stop = space.exec(g.context("syscall_loop", rdi=789))
        ret = stop.ctx.rip
        ctx = stop.ctx
        ctx.rax = 456
        ctx.eflags |= TF
        traps = []
        for _ in range(10):
            stop = space.exec(ctx)
            if stop.signo != signal.SIGTRAP:
                break
            traps.append(stop.ctx.rip)
            ctx = stop.ctx
        # cmp, jne, jmp, mov %rbx,%rdi, then the patched site: a syscall stop, never a trampoline address.
        assert len(traps) == 4 and all(g.code <= rip < g.code + g.code_size for rip in traps)
        assert stop.reason == "syscall" and stop.syscall == 123 and stop.ctx.rip == ret
        assert stop.ctx.eflags & TF


def test_trampolines_allow_nothing_but_their_own_gettid(space, tmp_path):
    target_dir = str(tmp_path / "escaped")
    window = L["STUB_WINDOW_ADDR"]
    tramp_syscall = window + L["STUB_TRAMP_OFF"] + 5
    entry = struct.unpack_from("<Q", space._engine._map, L["STUB_WINDOW_OFF"] + L["STUB_ENTRY_OFF"])[0]
    with Guest(space) as g:
        space.write(g.data, target_dir.encode() + b"\0")
        # mov $83,%eax (mkdir); mov $0x1ff,%esi; jmp *%rdx
        addr = load_code(space, bytes([0xB8, 83, 0, 0, 0, 0xBE, 0xFF, 0x01, 0, 0, 0xFF, 0xE2]))
        stop = space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top, rdi=g.data, rdx=tramp_syscall))
        assert stop.reason == "syscall" and stop.syscall == 83 and stop.ctx.rip == tramp_syscall + 2
        # Straight into the stub's entry with a tid that is not one of its guest threads: the entry sends
        # it to the second half of the trampoline named by ecx, whose syscall the filter traps as well.
        stop = space.exec(pvmexec.SigContext(rip=addr, rsp=g.stack_top, rdi=g.data, rdx=entry, rcx=5))
        site = struct.unpack_from("<Qq", space._engine._map, L["STUB_WINDOW_OFF"] + L["STUB_SITES_OFF"] + 5 * 16)
        assert stop.reason == "syscall" and stop.syscall == site[1] and stop.ctx.rip == site[0]
        assert space.exec(g.context("syscall_loop", rdi=789)).syscall == 123
    assert not os.path.exists(target_dir)


def test_mode2_cannot_unmap_or_replace_the_patching_window(space):
    window = L["STUB_WINDOW_ADDR"]
    for name, args in (("munmap", (window, 4096)), ("mprotect", (window - 4096, 8192, 7)),
                       ("mmap", (window + 4096, 4096, 3, 0x32, -1, 0)), ("mremap", (window, 4096, 4096, 0))):
        with pytest.raises(pvmexec.RemoteSyscallError, match="patching window") as e:
            space.syscall(name, *args)
        assert e.value.errno == errno.EBUSY
    with open("/proc/%d/maps" % space.pid) as f:
        assert any(line.startswith("050f0000-05100000 r-xs") for line in f)
    assert space.syscall("munmap", window + 0x10000, 4096) == 0     # next to it is fine


def test_a_stub_process_is_returned_only_once_it_runs_the_stub_program():
    """Before its exec a new child is a copy of the caller (its maps, its memory): never hand that out."""
    from pvmexec.engines.stub import plain_process
    ours = os.path.realpath(sys.executable)
    for _ in range(20):
        p = plain_process(fixed_layout=True)
        try:
            with open("/proc/%d/maps" % p.pid) as f:
                maps = f.read()
            assert "/memfd:pvmexec-stub" in maps and ours not in maps
            if p.isolated:                              # pid 1 of a namespace of its own
                with open("/proc/%d/status" % p.pid) as f:
                    assert "NSpid:\t%d\t1\n" % p.pid in f.read()
        finally:
            p.kill()
            p.wait(10)


def test_map_files_lends_many_descriptors_in_one_batch(space):
    """map_files: more descriptors than one message carries, several mappings of one of them; each
    mapping shows its own file's bytes, and the stub keeps none of the descriptors."""
    files = []
    try:
        for i in range(70):
            fd = os.memfd_create("pvmexec-test-%d" % i, os.MFD_CLOEXEC)
            os.write(fd, bytes([i]) * 8192)
            files.append(fd)
        base = space.syscall("mmap", 0, 72 * 4096, 0, 0x22, -1, 0)      # a range to map over
        maps = [(fd, base + i * 4096, 4096, 1, 0x12, 0) for i, fd in enumerate(files)]     # MAP_PRIVATE|MAP_FIXED
        maps += [(files[0], base + 70 * 4096, 4096, 1, 0x12, 4096), (files[0], base + 71 * 4096, 4096, 1, 0x12, 0)]
        before = len(os.listdir("/proc/%d/fd" % space.pid))
        assert space.backend.map_files(maps) == [m[1] for m in maps]
        assert len(os.listdir("/proc/%d/fd" % space.pid)) == before
        for i in range(72):
            assert space.read(base + i * 4096, 4096) == bytes([i if i < 70 else 0]) * 4096
        space.syscall("munmap", base, 72 * 4096)
    finally:
        for fd in files:
            os.close(fd)


def test_vm_copy_ranges_copies_whole_ranges_and_says_where_it_stopped():
    src, dst = pvmexec.Space.create(fixed_layout=True), pvmexec.Space.create(fixed_layout=True)
    try:
        base = src.syscall("mmap", 0, 16 * 4096, 3, 0x22, -1, 0)
        assert dst.syscall("mmap", base, 16 * 4096, 3, 0x32, -1, 0) == base          # MAP_FIXED, same place
        src.write(base, bytes(range(256)) * 16 * 16)
        src.syscall("munmap", base + 8 * 4096, 4096)                    # a hole in the source
        ranges = [(base, 4096), (base + 4096, 3 * 4096), (base + 8 * 4096, 4096), (base + 9 * 4096, 4096)]
        import array
        flat = array.array("Q", [x for r in ranges for x in r])
        assert _core.vm_copy_ranges(src.pid, dst.pid, flat) == 2         # stops at the hole
        assert dst.read(base, 4 * 4096) == src.read(base, 4 * 4096)
        assert dst.read(base + 9 * 4096, 4096) == bytes(4096)            # nothing past it
        assert _core.vm_copy_ranges(src.pid, dst.pid, array.array("Q", [base + 9 * 4096, 4096])) == 1
        assert dst.read(base + 9 * 4096, 4096) == src.read(base + 9 * 4096, 4096)
    finally:
        src.detach()
        dst.detach()
