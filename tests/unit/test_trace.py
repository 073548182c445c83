"""strace-like trace lines, formatted without any process."""
import errno
import io

from pvmexec.kernel.trace import Tracer
from pvmexec.syscalls import number


class FakeProcess:
    tid = 7

    def __init__(self, memory=b""):
        self.memory = memory

    def read(self, addr, n):
        return self.memory[:n]


def _line(nr_name, args, ret, memory=b""):
    out = io.StringIO()
    Tracer(out).call(FakeProcess(memory), number(nr_name), args, ret)
    return out.getvalue()


def test_paths_flags_and_results():
    assert _line("openat", (-100, "/etc/passwd", 0o2000000, 0), 3) == \
        '[pid 7] openat(AT_FDCWD, "/etc/passwd", O_RDONLY|O_CLOEXEC) = 3\n'
    assert _line("openat", (-100, "x", 0o101 | 0o1000, 0o644), 4) == \
        '[pid 7] openat(AT_FDCWD, "x", O_WRONLY|O_CREAT|O_TRUNC, 0644) = 4\n'
    assert _line("open", (None, 0, 0), -errno.EFAULT) == "[pid 7] open(NULL, O_RDONLY) = -1 EFAULT (Bad address)\n"


def test_memory_calls_in_hex_and_by_flag_name():
    assert _line("mmap", (0, 8192, 3, 0x22, -1, 0), 0x7f0000000000) == \
        "[pid 7] mmap(NULL, 8192, PROT_READ|PROT_WRITE, MAP_PRIVATE|MAP_ANONYMOUS, -1, 0) = 0x7f0000000000\n"


def test_buffers_are_quoted_and_cut():
    assert _line("write", (1, 0x1000, 3), 3, b"hi\n") == '[pid 7] write(1, "hi\\n", 3) = 3\n'
    data = bytes(range(40))
    line = _line("read", (0, 0x1000, 40), 40, data)
    assert line.startswith('[pid 7] read(0, "\\0\\1\\2') and '"...' in line and line.endswith(", 40) = 40\n")


def test_exits_and_kills():
    out = io.StringIO()
    t = Tracer(out)
    t.exited(FakeProcess(), 3 << 8)
    t.exited(FakeProcess(), 9)
    t.exited(FakeProcess(), 11 | 0x80)
    assert out.getvalue().splitlines() == ["[pid 7] +++ exited with 3 +++", "[pid 7] +++ killed by SIGKILL +++",
                                           "[pid 7] +++ killed by SIGSEGV (core dumped) +++"]


def _fmt(name, args, ret, memory=None, **kw):
    from pvmexec.kernel.trace import format_call
    from pvmexec.syscalls import TABLE
    def read(addr, n):
        base = min(memory)
        return memory[base][addr - base:addr - base + n]
    return format_call(name, TABLE[number(name)][1], args, ret, read=read if memory is not None else None, **kw)


def test_flags_signals_and_requests_by_name():
    assert _fmt("clone", (0x1200011, 0, 0, 0, 0), 42) == \
        "clone(CLONE_CHILD_CLEARTID|CLONE_CHILD_SETTID|SIGCHLD, NULL, NULL, NULL, NULL) = 42"
    assert _fmt("wait4", (0xFFFFFFFF, 0, 0x40000001, 0), 0) == "wait4(-1, NULL, WNOHANG|__WALL, NULL) = 0"
    assert _fmt("kill", (7, 15), 0) == "kill(7, SIGTERM) = 0"
    assert _fmt("ioctl", (1, 0x5401, 0x1000), -25) == "ioctl(1, TCGETS, 0x1000) = -1 ENOTTY (Inappropriate ioctl for device)"
    assert _fmt("fcntl", (3, 1030, 10), 10) == "fcntl(3, F_DUPFD_CLOEXEC, 10) = 10"
    assert _fmt("newfstatat", (-100, "x", 0x7000, 0x100), -2).endswith("AT_SYMLINK_NOFOLLOW) = -1 ENOENT "
                                                                       "(No such file or directory)")
    assert _fmt("lseek", (3, (1 << 64) - 1, 1), -22).startswith("lseek(3, -1, SEEK_CUR) = -1 EINVAL")
    assert _fmt("access", ("/x", 6), 0) == 'access("/x", R_OK|W_OK) = 0'


def test_structures_that_matter():
    import struct as s
    stat = s.pack("<QQQIIIIQq", 0x801, 12, 1, 0o100644, 0, 0, 0, 0, 5).ljust(144, b"\0")
    assert _fmt("fstat", (3, 0x1000), 0, {0x1000: stat}) == \
        "fstat(3, {st_dev=0x801, st_ino=12, st_mode=S_IFREG|0644, st_nlink=1, st_uid=0, st_gid=0, st_size=5, ...}) = 0"
    ts = s.pack("<qq", 1, 500)
    assert _fmt("nanosleep", (0x1000, 0), 0, {0x1000: ts}) == "nanosleep({tv_sec=1, tv_nsec=500}, NULL) = 0"
    act = s.pack("<QQQQ", 1, 0x04000000 | 0x10000000, 0x4000, 1 << (10 - 1))
    assert _fmt("rt_sigaction", (10, 0x1000, 0, 8), 0, {0x1000: act}) == \
        "rt_sigaction(SIGUSR1, {sa_handler=SIG_IGN, sa_mask=[USR1], sa_flags=SA_RESTORER|SA_RESTART, " \
        "sa_restorer=0x4000}, NULL, 8) = 0"
    mem = s.pack("<QQQQ", 0x1030, 2, 0x1032, 3) + b"\0" * 16 + b"hiyou"
    assert _fmt("writev", (1, 0x1000, 2), 5, {0x1000: mem}) == \
        'writev(1, [{iov_base="hi", iov_len=2}, {iov_base="you", iov_len=3}], 2) = 5'
    assert _fmt("wait4", (5, 0x1000, 0, 0), 5, {0x1000: s.pack("<i", 3 << 8)}) == \
        "wait4(5, [{WIFEXITED(s) && WEXITSTATUS(s) == 3}], 0, NULL) = 5"
    assert _fmt("wait4", (5, 0x1000, 0, 0), 5, {0x1000: s.pack("<i", 9)}) == \
        "wait4(5, [{WIFSIGNALED(s) && WTERMSIG(s) == SIGKILL}], 0, NULL) = 5"
    sun = s.pack("<H", 1) + b"/run/x.sock\0"
    assert _fmt("sendto", (3, 0x2000, 0, 0, 0x1000, len(sun)), 0, {0x1000: sun + b"\0" * 4096}).endswith(
        '{sa_family=AF_UNIX, sun_path="/run/x.sock"}, %d) = 0' % len(sun))


def test_strings_are_cut_at_the_size_asked():
    assert _fmt("write", (1, 0x1000, 10), 10, {0x1000: b"0123456789"}, strsize=4) == 'write(1, "0123"..., 10) = 10'


def test_trace_sets_by_name_and_class():
    from pvmexec.kernel.trace import trace_set
    assert trace_set("trace=openat,close") == {number("openat"), number("close")}
    assert number("execve") in trace_set("trace=%process") and number("openat") not in trace_set("trace=%process")
    assert number("openat") not in trace_set("trace=!openat") and number("close") in trace_set("trace=!openat")
    for bad in ("trace=frobnicate", "trace=%nosuchclass"):
        try:
            trace_set(bad)
        except ValueError:
            continue
        raise AssertionError(bad)


def test_signal_lines_and_the_summary_table():
    import struct as s
    from pvmexec.kernel.trace import format_siginfo
    info = s.pack("<iii4xiIi", 17, 0, 1, 42, 1000, 3).ljust(128, b"\0")
    assert format_siginfo(info) == "--- SIGCHLD {si_signo=SIGCHLD, si_code=CLD_EXITED, si_pid=42, si_uid=1000, " \
                                   "si_status=3} ---"
    out = io.StringIO()
    t = Tracer(out, summary=True)
    for ret in (3, -errno.ENOENT, 4):
        t.call(FakeProcess(), number("openat"), (-100, "x", 0, 0), ret, 0.001)
    t.close()
    lines = out.getvalue().splitlines()
    assert lines[0].startswith("% time") and lines[2].split()[3:] == ["3", "1", "openat"]
    assert lines[-1].split()[-1] == "total"
