"""Real programs nobody here wrote (busybox, coreutils, python3, our C builds) under the sandbox, compared with a native run."""
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import pytest
from pvmexec.kernel import Errno, Sandbox

from helpers import *  # noqa: F401,F403


@pytest.mark.parametrize("link", ["-static", "-static-pie", "-pie"])
def test_static_static_pie_and_dynamic_programs(cc, tmp_path, tree, link):
    prog = build(cc, tmp_path, victim_source("hello"), link)
    env = dict(os.environ, PVM_TEST="set")
    got = same_as_native([prog, "one", str(tree / "a.txt")], env=env)
    assert got.returncode == 42 and b"apple" in got.stdout


@pytest.mark.parametrize("applet", [
    ["echo", "hello", "world"], ["cat", "a.txt", "sub/deeper/c.txt"], ["ls", "-la", "."], ["ls", "-R", "sub"],
    ["sort", "a.txt"], ["sha256sum", "a.txt", "sub/b.txt"], ["wc", "-lwc", "a.txt", "sub/deeper/c.txt"],
    ["find", ".", "-name", "*.txt"], ["head", "-n", "2", "a.txt"], ["stat", "-c", "%n %s %F", "a.txt", "link"],
    ["readlink", "link"], ["md5sum", "sub/b.txt"], ["od", "-A", "x", "-t", "x1", "-N", "32", "sub/b.txt"],
])
def test_busybox_applets_match_native(busybox, tree, applet):
    same_as_native([busybox] + applet, cwd=str(tree))


def test_busybox_gzip_and_tar_output_match_native(busybox, tree):
    for argv in (["gzip", "-c", "sub/b.txt"], ["tar", "cf", "-", "sub"], ["tar", "tvf", "-"]):
        data = native([busybox, "tar", "cf", "-", "sub"], cwd=str(tree)).stdout if argv[:2] == ["tar", "tvf"] else None
        same_as_native([busybox] + argv, cwd=str(tree), input=data)


def test_busybox_sh_without_processes(busybox, tree):
    script = 'x=0; for f in *.txt sub/*.txt; do x=$((x+1)); echo "$x $f"; done; read line; echo "got $line"; exit 3'
    got = same_as_native([busybox, "sh", "-c", script], cwd=str(tree), input=b"from stdin\n")
    assert got.returncode == 3 and b"got from stdin" in got.stdout


@pytest.mark.parametrize("argv", [["/bin/ls", "-la"], ["/usr/bin/sort", "-r", "a.txt"],
                                  ["/usr/bin/sha256sum", "sub/b.txt"], ["/bin/cat", "a.txt"],
                                  ["/usr/bin/wc", "sub/deeper/c.txt"], ["/usr/bin/head", "-c", "100", "sub/b.txt"]])
def test_coreutils_match_native(tree, argv):
    same_as_native(argv, cwd=str(tree))


def test_python3_runs(tree):
    code = ("import json, hashlib, os, sys\n"
            "data = open('a.txt').read().split()\n"
            "print(json.dumps(sorted(data)), hashlib.sha256(b'x'*1000).hexdigest())\n"
            "print(sorted(os.listdir('sub')), sys.argv[1:])\n"
            "sys.exit(5)\n")
    got = same_as_native([PYTHON3, "-S", "-c", code, "arg"], cwd=str(tree))
    assert got.returncode == 5


def test_shebang_scripts_and_execve(busybox, tmp_path, tree):
    script = tmp_path / "script"
    script.write_text("#!%s sh\necho \"script $0 $1\"\nexec /bin/echo replaced by echo\necho never\n" % busybox)
    script.chmod(0o755)
    got = same_as_native([str(script), "arg"], cwd=str(tree))
    assert got.stdout == b"script %s arg\nreplaced by echo\n" % str(script).encode()


def test_exit_status_and_stdin_stdout_stderr(busybox):
    script = 'while read l; do echo "$l"; done; echo to-stderr >&2; exit 9'
    got = same_as_native([busybox, "sh", "-c", script], input=b"piped in\n")
    assert (got.stdout, got.stderr, got.returncode) == (b"piped in\n", b"to-stderr\n", 9)


def test_python3_threads(tree):
    code = ("import threading, queue\n"
            "q = queue.Queue()\n"
            "def work(n): q.put(sum(i * i for i in range(n)))\n"
            "ts = [threading.Thread(target=work, args=(5000 * (k + 1),)) for k in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(sorted(q.get() for _ in ts), threading.active_count())\n")
    same_as_native([PYTHON3, "-S", "-c", code], cwd=str(tree))


def test_python3_asyncio_epoll_select_eventfd_and_socketpairs(tree):
    code = ("import asyncio, os, select, socket\n"
            "async def main():\n"
            "    await asyncio.sleep(0.01)\n"
            "    proc = await asyncio.create_subprocess_exec('/bin/echo', 'from asyncio', stdout=asyncio.subprocess.PIPE)\n"
            "    return (await proc.communicate())[0]\n"
            "print(asyncio.run(main()))\n"
            "a, b = socket.socketpair(); a.send(b'pair'); print(b.recv(10))\n"
            "print(select.select([b], [a], [], 0.5)[1] == [a], select.select([b], [], [], 0.01)[0])\n"
            "e = os.eventfd(3); os.eventfd_write(e, 4); print(os.eventfd_read(e))\n")
    got = same_as_native([PYTHON3, "-S", "-c", code], cwd=str(tree))
    assert got.stdout == b"b'from asyncio\\n'\nb'pair'\nTrue []\n7\n"


def test_readlink_of_what_is_no_symlink(tree):
    code = ("import os\n"
            "for path in ('a.txt', 'link', 'nonexistent', 'sub', '/proc/self/status', '/proc/self/fd', '/proc/nope'):\n"
            "    try:\n"
            "        print(path, os.readlink(path))\n"
            "    except OSError as e:\n"
            "        print(path, e.errno)\n")
    got = same_as_native([PYTHON3, "-S", "-c", code], cwd=str(tree))
    assert got.stdout == b"a.txt 22\nlink a.txt\nnonexistent 2\nsub 22\n/proc/self/status 22\n/proc/self/fd 22\n/proc/nope 2\n"


def test_socket_names_of_socketpair_ends(tree):
    code = ("import errno, os, socket\n"
            "a, b = socket.socketpair()\n"
            "print(repr(a.getsockname()), repr(b.getpeername()), a.family == socket.AF_UNIX)\n"
            "with open('a.txt', 'rb') as f:\n"
            "    for fd in (f.fileno(), 999):\n"
            "        try:\n"
            "            socket.socket(fileno=fd)\n"
            "        except OSError as e:\n"
            "            print(errno.errorcode[e.errno])\n")
    got = same_as_native([PYTHON3, "-S", "-c", code], cwd=str(tree))
    assert got.stdout == b"'' '' True\nENOTSOCK\nEBADF\n"


def test_mincore_reports_which_pages_are_in_memory(tree):
    code = ("import ctypes, mmap\n"
            "libc = ctypes.CDLL(None, use_errno=True)\n"
            "libc.mmap.restype = ctypes.c_void_p\n"
            "libc.mmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,"
            " ctypes.c_long)\n"
            "libc.mincore.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_void_p)\n"
            "p = libc.mmap(None, 3 * 4096, 3, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS, -1, 0)\n"
            "ctypes.memset(p, 1, 1); ctypes.memset(p + 2 * 4096, 1, 1)\n"
            "vec = (ctypes.c_ubyte * 3)()\n"
            "print(libc.mincore(p, 3 * 4096, vec), [v & 1 for v in vec])\n"
            "print(libc.mincore(p, 4096, ctypes.c_void_p(8)), ctypes.get_errno())\n"
            "print(libc.mincore(p, 4096, ctypes.c_void_p(0x050f0000)), ctypes.get_errno())\n")  # the stub's window
    got = same_as_native([PYTHON3, "-S", "-c", code], cwd=str(tree))
    assert got.stdout == b"0 [1, 0, 1]\n-1 14\n-1 14\n"


def test_pseudo_terminals_of_the_guests_own(tmp_path):
    """openpty/forkpty work on ptys the guest makes; a /dev/pts number of the host's stays out of reach."""
    import pty as host_pty
    master, slave = host_pty.openpty()                 # a host terminal the guest must not reach
    number = os.ttyname(slave)
    try:
        code = textwrap.dedent("""
            import os, pty, sys
            pid, fd = pty.fork()
            if pid == 0:
                print("child", os.isatty(0), os.ttyname(0).startswith("/dev/pts/"))
                os._exit(3)
            out = b""
            while not out.endswith(b"\\n"):             # the child's line, however the terminal hands it over
                out += os.read(fd, 100)
            print(out.replace(b"\\r", b""), os.waitpid(pid, 0)[1] >> 8)
            m, s = os.openpty()
            os.write(m, b"typed\\n")
            print(os.read(s, 10), os.path.basename(os.ttyname(s)) in os.listdir("/dev/pts"))
            try:
                os.open(sys.argv[1], os.O_RDWR)
                print("reached the host's terminal")
            except OSError as e:
                print(e.errno)
        """)
        got = sandboxed([PYTHON3, "-c", code, number], "-q")
    finally:
        os.close(master)
        os.close(slave)
    assert got.stdout.decode().splitlines() == ["b'child True True\\n' 3", "b'typed\\n' True", "2"], got.stderr
