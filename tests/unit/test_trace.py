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
