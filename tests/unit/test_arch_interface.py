"""Each architecture module provides the whole interface (pvmexec.arch.INTERFACE), consistently."""
import signal
import struct

import pytest

from pvmexec import arch
from pvmexec.arch import x86_64
from pvmexec.context import SigContext
from pvmexec.errors import InvalidContext

MODULES = [x86_64]


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.NAME)
def test_provides_the_interface(mod):
    missing = sorted(name for name in arch.INTERFACE if not hasattr(mod, name))
    assert missing == []
    for name in arch.INTERFACE:
        value = getattr(mod, name)
        assert callable(value) == name[0].islower(), name      # constants upper case, functions lower


@pytest.mark.parametrize("mod", MODULES, ids=lambda m: m.NAME)
def test_register_and_syscall_facts_agree(mod):
    assert mod.REG_INDEX == {n: i for i, n in enumerate(mod.REG_NAMES)}
    assert mod.REGS_SIZE == 8 * len(mod.REG_NAMES)
    assert all(r in mod.REG_INDEX for r in (mod.SYSCALL_NR, mod.SYSCALL_RET) + mod.SYSCALL_ARGS)
    assert len(mod.SYSCALL_INSN) == mod.SYSCALL_INSN_LEN
    assert signal.SIGSEGV in mod.SYNC_SIGNALS and signal.SIGKILL not in mod.SYNC_SIGNALS
    names = {name for name, _k in mod.SYSCALLS.values()}
    assert {"read", "write", "mmap", "rt_sigreturn", "exit_group"} <= names


def test_this_machine_has_an_arch_module():
    assert arch.current() is x86_64


def test_validate_refuses_what_no_user_thread_holds():
    x86_64.validate(SigContext(rip=0x1000)._words())
    for regs, what in (({"cs": 0x23}, "32-bit"), ({"cs": 0x10}, "cs="), ({"ss": 0}, "ss="),
                       ({"rip": 1 << 63}, "rip="), ({"fs": 0x13}, "fs=")):
        with pytest.raises(InvalidContext, match=what):
            x86_64.validate(SigContext(**regs)._words())


def test_signal_frame_round_trip():
    """A frame pushed for a handler and popped by rt_sigreturn gives back the interrupted context."""
    mem = {}

    def write(addr, data):
        for i, b in enumerate(data):
            mem[addr + i] = b

    def read(addr, n):
        return bytes(mem.get(addr + i, 0) for i in range(n))
    ctx = SigContext(rip=0x401000, rsp=0x7ffff000, rax=7, rbx=8, rcx=9, rdx=10, rsi=11, rdi=12, r8=13, r15=14,
                     eflags=0x202 | 0x100)
    before = ctx.as_dict()
    fp = bytes(range(256)) * 2 + bytes(64)
    info = struct.pack("<iii", signal.SIGUSR1, 0, 0).ljust(128, b"\0")
    for addr, data in x86_64.push_signal_frame(ctx, signal.SIGUSR1, info, handler=0x402000, restorer=0x403000,
                                               old_mask=0x1234, altstack=(0, 2, 0), to_altstack=False, fp=fp):
        write(addr, data)
    assert ctx.rip == 0x402000 and ctx.rdi == signal.SIGUSR1 and ctx.rsp % 16 == 8
    assert read(ctx.rsp, 8) == struct.pack("<Q", 0x403000)             # the return address: the restorer
    assert read(ctx.rsi, 4) == struct.pack("<i", signal.SIGUSR1)        # siginfo for SA_SIGINFO handlers
    assert not ctx.eflags & 0x100                                       # TF clear in the handler
    ctx.rsp += 8                                                        # the handler returned into the restorer
    mask, altstack = x86_64.pop_signal_frame(read, ctx, len(fp))
    assert mask == 0x1234 and altstack is None
    assert ctx.as_dict() == before and ctx.fpstate == fp


def test_init_xstate_keeps_the_kernels_sizes():
    template = bytearray(1024)
    template[464:468] = struct.pack("<I", 0x46505853)
    template[28:32] = struct.pack("<I", 0xFFBF)
    clean = x86_64.init_xstate(bytes(template))
    assert len(clean) == 1024 and clean[464:512] == template[464:512]
    assert struct.unpack_from("<H", clean, 0)[0] == 0x37F and struct.unpack_from("<I", clean, 24)[0] == 0x1F80


@pytest.mark.parametrize("altstack, to_alt, lands", [
    ((0, 2, 0), True, "stack"),                  # SA_ONSTACK, but no alternate stack (SS_DISABLE)
    ((0x500000, 0, 0x10000), True, "alt"),       # SA_ONSTACK and one: the frame goes there
    ((0x500000, 0, 0x10000), False, "stack"),    # without SA_ONSTACK
])
def test_signal_frames_go_where_linux_puts_them(altstack, to_alt, lands):
    ctx = SigContext(rip=0x401000, rsp=0x7ffff000)
    writes = x86_64.push_signal_frame(ctx, signal.SIGALRM, bytes(128), 0x402000, 0x403000, 0, altstack, to_alt,
                                      bytes(576))
    lo, hi = (0x500000, 0x510000) if lands == "alt" else (0x7fffe000, 0x7ffff000 - x86_64.RED_ZONE)
    assert all(lo <= addr < hi for addr, _data in writes) and lo <= ctx.rsp < hi


@pytest.mark.parametrize("code,found", [
    (b"\xb8\xe5\x00\x00\x00\x0f\x05\x31\xd2\x31\xc9\x45\x31\xdb\xc3", 5),   # the vDSO's clock_getres fallback
    (b"\x0f\x05\xc3", 0),
    (b"\x0f\x05\x45\x31\xe4\xc3", 0),           # xor %r12d, %r12d
    (b"\x0f\x05\x31\xc4\xc3", -1),              # xor %eax, %esp: the stack pointer moves
    (b"\x0f\x05\x48\x31\xe4\xc3", -1),          # xor %rsp, %rsp
    (b"\x0f\x05\xc9\xc3", -1),                  # leave: it reads memory and moves the stack
    (b"\x0f\x05\x48\x3d\x01\xf0\xff\xff\xc3", -1),
    (b"\x0f\x05\x31", -1),
    (b"\x90\x0f\x05\x0f\x05\xc3", 3),           # the second syscall is the one followed by ret
])
def test_return_gadget_is_a_syscall_then_only_register_xors_and_ret(code, found):
    assert x86_64.return_gadget(code) == found


def test_restorers_are_rt_sigreturn():
    for code in x86_64.RESTORERS:
        assert code.endswith(x86_64.SYSCALL_INSN)
        assert struct.unpack_from("<I", code, len(code) - 6)[0] == 15
