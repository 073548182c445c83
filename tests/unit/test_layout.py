"""The layouts shared by C, the guest blob and Python agree (layout.h is the single source)."""
import signal
import struct

from pvmexec import _core
from pvmexec.arch import x86_64
from pvmexec.context import SigInfo
from pvmexec import vmexec


def test_register_block_matches_c():
    assert _core.LAYOUT["reg_names"] == x86_64.REG_NAMES
    assert _core.LAYOUT["user_regs_struct"] == x86_64.REGS_SIZE


def test_siginfo_offsets_match_c():
    L = _core.LAYOUT
    assert L["siginfo"] == 128
    raw = bytearray(128)
    struct.pack_into("<iii", raw, L["si_signo"], signal.SIGSYS, 0, 1)
    struct.pack_into("<Q", raw, L["si_call_addr"], 0x1234)
    struct.pack_into("<i", raw, L["si_syscall"], 123)
    struct.pack_into("<I", raw, L["si_arch"], L["AUDIT_ARCH_X86_64"])
    info = SigInfo.from_bytes(raw)
    assert (info.signo, info.code, info.call_addr, info.syscall, info.arch) == (
        signal.SIGSYS, 1, 0x1234, 123, x86_64.AUDIT_ARCH)
    assert info.to_bytes() == bytes(raw)


def test_constants_match_c():
    L = _core.LAYOUT
    assert L["PROCESS_VM_EXEC_SYSCALL"] == vmexec.PROCESS_VM_EXEC_SYSCALL
    assert L["AUDIT_ARCH_X86_64"] == x86_64.AUDIT_ARCH
    assert L["AUDIT_ARCH_I386"] == x86_64.AUDIT_ARCH_I386


def test_guest_blob_exports_its_entry_points():
    syms = _core.GUEST_SYMBOLS
    for name in ("syscall_loop", "fault_loop", "fpu_probe", "int3"):
        assert 0 <= syms[name] < len(_core.GUEST_BLOB)
    assert syms["syscall_loop"] == 0


def test_channel_and_stub_layouts_match_c():
    import struct
    from pvmexec.engines import agent as agent_engine, stub as stub_engine
    L = _core.LAYOUT
    assert agent_engine.CALL.size == L["call.size"] == 64
    assert agent_engine.CALLS == L["SLOT_OFF"] + L["slot.calls"]
    assert L["slot.op"] == 128 and L["slot.calls"] == 192
    assert L["HEADER_OFF"] == L["AGENT_CODE_MAX"] and len(_core.AGENT_BLOB) <= L["AGENT_CODE_MAX"]
    # The agent removes itself from its last code page: that page must hold only the final routine.
    assert _core.AGENT_SYMBOLS["final"] % 4096 == 0
    assert L["stop.siginfo"] == 16 and L["stop.regs"] == 144
    assert L["stub_header.gadget"] == 24
    assert L["STUB_FP_OFF"] - L["STUB_STOP_OFF"] >= L["stop.regs"] + 8 * len(x86_64.REG_NAMES)
    from pvmexec.syscalls import number
    assert set(stub_engine.STUB_ALLOWED) == {number(n) for n in (
        "mmap", "mprotect", "munmap", "rt_sigprocmask", "rt_sigreturn", "mremap", "madvise", "mincore", "getpid",
        "exit", "getppid", "sigaltstack", "gettid", "futex", "exit_group")}
    assert _core.STUB_ELF[:4] == b"\x7fELF" and struct.unpack_from("<H", _core.STUB_ELF, 16)[0] == 3  # ET_DYN


def test_patch_window_layout():
    L = _core.LAYOUT
    window, size, n = L["STUB_WINDOW_ADDR"], L["STUB_WINDOW_SIZE"], L["STUB_PATCH_MAX"]
    # Every slot's address, as the disp32 of `jmp *slot`, ends in the bytes of `syscall`.
    for i in (0, 1, n - 1):
        assert (window + L["STUB_SLOTS_OFF"] + 8 * i).to_bytes(4, "little")[2:] == b"\x0f\x05"
    assert window + size < 1 << 31                          # a sign-extended disp32 reaches it
    assert L["STUB_SLOTS_OFF"] + 8 * n <= L["STUB_TRAMP_OFF"]
    assert L["STUB_TRAMP_OFF"] + L["STUB_TRAMP_SIZE"] * n <= L["STUB_SITES_OFF"]
    assert L["STUB_SITES_OFF"] + L["patch_site.size"] * n <= size
    assert L["stub_header.window"] == 32 and L["STUB_WINDOW_OFF"] + size == L["STUB_REGION_SIZE"]


def test_python_reads_the_shared_layout_by_name_only():
    """Every LAYOUT name the Python side uses exists: the X-macro list in layout.h is the one source."""
    import os
    import re
    import pvmexec
    used = set()
    for d, _dirs, files in os.walk(os.path.dirname(pvmexec.__file__)):
        for f in files:
            if f.endswith(".py"):
                used |= set(re.findall(r'L\["([\w.]+)"\]', open(os.path.join(d, f)).read()))
    assert used and used - set(_core.LAYOUT) == set()
    assert _core.LAYOUT["slot.resp_seq"] == 64 and _core.LAYOUT["OP_EXIT"] == 2
