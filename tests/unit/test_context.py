"""SigContext and SigInfo: what users build and read, without any process."""
import signal
import struct

import pytest

from pvmexec import SigContext, SigInfo
from pvmexec.arch import x86_64


def test_sigcontext_defaults_and_fields():
    ctx = SigContext(rip=0x1000, rsp=0x2000, rax=5)
    assert (ctx.rip, ctx.rsp, ctx.rax, ctx.cs, ctx.ss) == (0x1000, 0x2000, 5, x86_64.USER_CS, x86_64.USER_DS)
    ctx.r9 = (1 << 64) - 1
    d = ctx.as_dict()
    assert d["r9"] == (1 << 64) - 1 and "orig_rax" not in d
    assert ctx.copy() == ctx and ctx.copy() is not ctx
    with pytest.raises(TypeError):
        SigContext(orig_rax=1)
    with pytest.raises(TypeError):
        SigContext(not_a_register=1)


@pytest.mark.parametrize("info", [
    SigInfo(signo=signal.SIGSYS, code=1, addr=0x401234, syscall=123, arch=0xC000003E),
    SigInfo(signo=signal.SIGSEGV, code=1, addr=0x7),
    SigInfo(signo=signal.SIGUSR1, code=-6, pid=4242, uid=1000),
    SigInfo(signo=signal.SIGTERM, code=0, pid=-1, uid=0),
])
def test_siginfo_round_trips(info):
    raw = info.to_bytes()
    assert len(raw) == 128
    back = SigInfo.from_bytes(raw)
    assert back == info and back.to_bytes() == raw


def test_siginfo_reads_only_what_the_signal_means():
    raw = struct.pack("<iiiiQiI", signal.SIGSEGV, 0, 1, 0, 0xdead, 99, 77).ljust(128, b"\0")
    info = SigInfo.from_bytes(raw)
    assert (info.addr, info.syscall, info.arch, info.pid) == (0xdead, 0, 0, 0)
    assert info.call_addr == info.addr


def test_siginfo_answers_to_the_standard_librarys_names():
    info = SigInfo(signo=signal.SIGSYS, code=1, addr=0x401234, syscall=123, arch=0xC000003E)
    assert (info.si_signo, info.si_code, info.si_syscall, info.si_arch, info.si_call_addr) == (
        signal.SIGSYS, 1, 123, 0xC000003E, 0x401234)
    raw = struct.pack("<iiiiiii", signal.SIGCHLD, 0, 1, 0, 4242, 1000, 3).ljust(128, b"\0")
    child = SigInfo.from_bytes(raw)
    assert (child.si_pid, child.si_uid, child.si_status, child.si_errno) == (4242, 1000, 3, 0)


def test_stop_reason_is_an_enum_that_reads_as_its_string():
    from pvmexec import Stop, StopReason
    stop = Stop(SigContext(), SigInfo(signo=signal.SIGSYS, code=1, syscall=39), StopReason.SYSCALL)
    assert stop.reason is StopReason.SYSCALL and stop.reason == "syscall" and stop.syscall == 39
