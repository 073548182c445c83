"""The application kernel: real programs nobody here wrote, run in a stub space, compared with a native run."""
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

PY = sys.executable
PYTHON3 = "/usr/bin/python3"


def sandboxed(argv, *options, cwd=None, input=None, env=None):
    """`pvmexec run [options] -- argv`, as a user runs it."""
    return subprocess.run([PY, "-m", "pvmexec", "run", *options, "--", *argv], capture_output=True, cwd=cwd,
                          input=input, env=env, timeout=120)


def native(argv, cwd=None, input=None, env=None):
    return subprocess.run(argv, capture_output=True, cwd=cwd, input=input, env=env, timeout=120)


def same_as_native(argv, cwd=None, input=None, env=None):
    want, got = native(argv, cwd, input, env), sandboxed(argv, cwd=cwd, input=input, env=env)
    assert (got.returncode, got.stdout, got.stderr) == (want.returncode, want.stdout, want.stderr), argv
    return got


@pytest.fixture
def tree(tmp_path):
    """A small directory tree to list, sort, hash and archive."""
    root = tmp_path / "tree"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "a.txt").write_text("banana\napple\ncherry\n")
    (root / "sub" / "b.txt").write_bytes(bytes(range(256)) * 40)
    (root / "sub" / "deeper" / "c.txt").write_text("deep\n" * 1000)
    os.symlink("a.txt", root / "link")
    return root


def build(cc, tmp_path, source, *flags, name="prog"):
    src = tmp_path / (name + ".c")
    src.write_text(textwrap.dedent(source))
    out = tmp_path / name
    subprocess.run([cc, "-O1", *flags, "-o", str(out), str(src)], check=True, timeout=120)
    return str(out)


def build_program(cc, tmp_path, name, *flags):
    """A program shared with the benchmarks (pvmexec/bench/programs/NAME.c)."""
    from pvmexec.bench.common import program_source
    out = tmp_path / name
    subprocess.run([cc, "-O1", *flags, "-o", str(out), program_source(name)], check=True, timeout=120)
    return str(out)


HELLO = r"""
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    int main(int argc, char **argv) {
        char *heap = malloc(1 << 20);
        memset(heap, 7, 1 << 20);
        long sum = 0;
        for (int i = 0; i < (1 << 20); i += 4096) sum += heap[i];
        printf("%d args, first %s, sum %ld, env %s\n", argc, argv[1], sum, getenv("PVM_TEST") ?: "-");
        FILE *f = fopen(argv[2], "r");
        char line[256];
        while (f && fgets(line, sizeof line, f)) fputs(line, stdout);
        return 42;
    }
"""


@pytest.mark.parametrize("link", ["-static", "-static-pie", "-pie"])
def test_static_static_pie_and_dynamic_programs(cc, tmp_path, tree, link):
    prog = build(cc, tmp_path, HELLO, link)
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


def test_termination_by_signal_is_the_programs(cc, tmp_path):
    prog = build(cc, tmp_path, r"""
        #include <stdlib.h>
        #include <stdio.h>
        #include <string.h>
        #include <signal.h>
        int main(int argc, char **argv) {
            if (!strcmp(argv[1], "abort")) abort();
            if (!strcmp(argv[1], "segv")) *(volatile int *)8 = 1;
            if (!strcmp(argv[1], "kill")) { signal(SIGTERM, SIG_IGN); raise(SIGTERM); puts("ignored"); raise(SIGKILL); }
            return 0;
        }
    """)
    for how, sig in (("abort", signal.SIGABRT), ("segv", signal.SIGSEGV), ("kill", signal.SIGKILL)):
        got = same_as_native([prog, how])
        assert got.returncode == -sig, how


def test_exit_status_and_stdin_stdout_stderr(busybox):
    script = 'while read l; do echo "$l"; done; echo to-stderr >&2; exit 9'
    got = same_as_native([busybox, "sh", "-c", script], input=b"piped in\n")
    assert (got.stdout, got.stderr, got.returncode) == (b"piped in\n", b"to-stderr\n", 9)


# -- the policy ----------------------------------------------------------------------------------------

def test_root_confines_paths(busybox, tmp_path):
    root = tmp_path / "root"
    (root / "bin").mkdir(parents=True)
    (root / "data").mkdir()
    (root / "data" / "inside").write_text("inside\n")
    os.link(busybox, root / "bin" / "busybox") if os.stat(busybox).st_dev == os.stat(root).st_dev else \
        (root / "bin" / "busybox").write_bytes(open(busybox, "rb").read())
    (root / "bin" / "busybox").chmod(0o755)
    os.symlink("/etc/hostname", root / "data" / "escape")       # resolved inside the root: not the host's file
    os.symlink("../../../../../../etc", root / "data" / "up")
    for path in ("/etc/hostname", "/data/../../../etc/hostname", "/data/escape", "/data/up/hostname"):
        got = sandboxed(["/bin/busybox", "cat", path], "--root", str(root))
        assert got.returncode == 1 and b"No such file or directory" in got.stderr, (path, got)
    got = sandboxed(["/bin/busybox", "cat", "/data/inside"], "--root", str(root))
    assert got.stdout == b"inside\n"
    got = sandboxed(["/bin/busybox", "ls", "/proc/self/", "/proc/1"], "--root", str(root))
    assert got.returncode != 0


def test_writes_only_below_writable_paths(busybox, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    keep = tmp_path / "keep"
    keep.write_text("unchanged\n")
    os.symlink(str(keep), out / "trap")
    got = sandboxed([busybox, "sh", "-c", "echo x > %s/new" % out])
    assert got.returncode != 0 and not (out / "new").exists()
    w = ("--writable", str(out))
    assert sandboxed([busybox, "sh", "-c", "echo x > %s/new" % out], *w).returncode == 0
    assert sandboxed([busybox, "mkdir", str(out / "d")], *w).returncode == 0
    assert sandboxed([busybox, "mv", str(out / "new"), str(out / "d" / "moved")], *w).returncode == 0
    assert (out / "d" / "moved").read_text() == "x\n"
    got = sandboxed([busybox, "sh", "-c", "echo y > %s/trap" % out], *w)
    assert got.returncode != 0 and b"Permission denied" in got.stderr
    assert keep.read_text() == "unchanged\n", "a symlink in a writable directory must not reach a read-only file"
    assert sandboxed([busybox, "rm", str(out / "trap")], *w).returncode == 0 and not os.path.lexists(out / "trap")
    assert sandboxed([busybox, "rm", str(keep)], *w).returncode != 0 and keep.exists()


def test_network_is_denied_by_default(tmp_path):
    code = "import socket\ntry:\n socket.socket()\nexcept OSError as e: print(e.errno)\n"
    got = sandboxed([PYTHON3, "-S", "-c", code])
    assert got.stdout.strip() == str(errno.EACCES).encode()


def test_policy_file(busybox, tmp_path):
    out = tmp_path / "w"
    out.mkdir()
    policy = tmp_path / "policy.json"
    policy.write_text(json.dumps({"writable": [str(out)]}))
    got = sandboxed([busybox, "touch", str(out / "made")], "--policy", str(policy))
    assert got.returncode == 0 and (out / "made").exists()
    policy.write_text(json.dumps({"writeable": []}))
    got = sandboxed([busybox, "true"], "--policy", str(policy))
    assert got.returncode == 2 and b"unknown policy keys: writeable" in got.stderr


# -- the trace, unsupported calls, hostile arguments ---------------------------------------------------

def test_trace_lines(busybox, tmp_path):
    trace = tmp_path / "trace"
    got = sandboxed([busybox, "cat", "/etc/hostname"], "--trace=%s" % trace)
    lines = trace.read_text().splitlines()
    assert any('open' in l and '"/etc/hostname", O_RDONLY' in l and l.endswith("= 3") for l in lines), lines
    assert got.stdout == open("/etc/hostname", "rb").read()
    assert any(l.startswith("[pid ") and ("sendfile(1, 3, NULL" in l or "write(1, " in l) for l in lines), lines
    assert lines[-1].endswith("+++ exited with 0 +++")
    got = sandboxed([busybox, "cat", "/nonexistent"], "--trace")
    assert b'"/nonexistent", O_RDONLY) = -1 ENOENT (No such file or directory)' in got.stderr


def test_unsupported_syscalls_get_enosys_and_are_reported_once(cc, tmp_path):
    prog = build(cc, tmp_path, r"""
        #include <stdio.h>
        #include <unistd.h>
        #include <errno.h>
        #include <sys/syscall.h>
        int main(void) {
            for (int i = 0; i < 3; i++) {
                long r = syscall(SYS_io_setup, 1, 0);
                printf("%ld %d\n", r, errno);
            }
            return 0;
        }
    """)
    got = sandboxed([prog], "--trace")
    assert got.stdout == b"-1 38\n" * 3
    assert got.stderr.count(b"io_setup(") == 3 and got.stderr.count(b"not provided by the sandbox") == 1


HOSTILE = r"""
    #define _GNU_SOURCE
    #include <stdio.h>
    #include <unistd.h>
    #include <errno.h>
    #include <fcntl.h>
    #include <sys/mman.h>
    #include <sys/syscall.h>
    static void show(const char *what, long r) { printf("%s %ld %d\n", what, r, r < 0 ? errno : 0); }
    int main(void) {
        show("write-bad-buffer", syscall(SYS_write, 1, (void *)16, 100));
        show("open-null", syscall(SYS_openat, AT_FDCWD, (void *)0, 0));
        show("open-kernel-address", syscall(SYS_openat, AT_FDCWD, (void *)0xffffffff81000000UL, 0));
        show("read-huge", syscall(SYS_read, 0, (void *)0x1000, 1UL << 62));
        show("map-over-window", (long)mmap((void *)0x050f0000, 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0));
        show("unmap-window", syscall(SYS_munmap, 0x050f0000, 0x10000));
        show("bad-fd", syscall(SYS_close, 12345));
        show("dup2-negative", syscall(SYS_dup2, 1, -5));
        show("sigaction-kill", syscall(SYS_rt_sigaction, 9, (void *)16, 0, 8));
        char path[8192];
        for (int i = 0; i < 8191; i++) path[i] = 'a';
        path[8191] = 0;
        show("long-path", syscall(SYS_openat, AT_FDCWD, path, 0));
        puts("still running");
        return 0;
    }
"""


def test_hostile_arguments_get_errors_and_the_guest_keeps_running(cc, tmp_path):
    prog = build(cc, tmp_path, HOSTILE, "-static")
    got = sandboxed([prog], input=b"")
    lines = dict(l.split(" ", 1) for l in got.stdout.decode().splitlines() if " " in l)
    assert lines["write-bad-buffer"] == "-1 %d" % errno.EFAULT
    assert lines["open-null"] == "-1 %d" % errno.EFAULT
    assert lines["open-kernel-address"] == "-1 %d" % errno.EFAULT
    assert lines["read-huge"] == "0 0"                                       # end of (empty) input
    assert lines["map-over-window"] == "-1 %d" % errno.EINVAL
    assert lines["unmap-window"] == "-1 %d" % errno.EINVAL
    assert lines["bad-fd"] == "-1 %d" % errno.EBADF
    assert lines["dup2-negative"] == "-1 %d" % errno.EBADF
    assert lines["sigaction-kill"] == "-1 %d" % errno.EINVAL
    assert lines["long-path"] == "-1 %d" % errno.ENAMETOOLONG
    assert got.stdout.endswith(b"still running\n") and got.returncode == 0


# -- the Python API: handlers to override ------------------------------------------------------------

class FakeWorld(Sandbox):
    """The README's example: another hostname, and a clock stuck in 2001."""

    def sys_uname(self, p, buf):
        Sandbox.sys_uname(self, p, buf)
        p.write(buf + 65, b"sandboxed".ljust(65, b"\0"))
        return 0

    def clock_ns(self, p, clk):
        return 1000000000 * 10 ** 9                            # 2001-09-09, for every time call


def run_captured(box, argv, tmp_path):
    out = tmp_path / "stdout"
    with open(out, "wb") as f:
        status = box.run(argv, stdout=f.fileno())
    return status, out.read_bytes()


def test_overriding_handlers_fakes_hostname_and_time(busybox, tmp_path):
    box = FakeWorld(vdso=False)
    status, out = run_captured(box, [busybox, "hostname"], tmp_path)
    assert (status, out) == (0, b"sandboxed\n")
    status, out = run_captured(box, [busybox, "date", "-u", "+%Y-%m-%d"], tmp_path)
    assert (status, out) == (0, b"2001-09-09\n")


def test_a_handler_can_deny_a_call(busybox, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("s3cret\n")

    class NoSecrets(Sandbox):
        def sys_openat(self, p, dirfd, path, flags, mode):
            if path is not None and "secret" in path:
                raise Errno(errno.EPERM)
            return Sandbox.sys_openat(self, p, dirfd, path, flags, mode)
    box = NoSecrets()
    status, out = run_captured(box, [busybox, "cat", str(secret)], tmp_path)
    assert os.waitstatus_to_exitcode(status) == 1 and out == b""
    status, out = run_captured(box, [busybox, "cat", "/etc/hostname"], tmp_path)
    assert status == 0 and out == open("/etc/hostname", "rb").read()


def test_nothing_is_left_behind(busybox, tmp_path):
    import gc
    box = Sandbox()
    gc.collect()                                    # earlier tests' garbage may hold descriptors
    fds_before = sorted(os.listdir("/proc/self/fd"))
    children_before = _children()
    status, out = run_captured(box, [busybox, "echo", "hi"], tmp_path)
    assert (status, out) == (0, b"hi\n")
    assert sorted(os.listdir("/proc/self/fd")) == fds_before
    assert _children() == children_before


def _children():
    me = str(os.getpid())
    kids = set()
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                with open("/proc/%s/stat" % pid) as f:
                    if f.read().rsplit(")", 1)[1].split()[1] == me:
                        kids.add(pid)
            except OSError:
                pass
    return kids


# -- processes and signals -------------------------------------------------------------------------------

SHELL_SCRIPT = r"""
set -e
echo start
ls . | sort -r | head -n 2
cat a.txt | sort | tr a-z A-Z > /dev/null
x=$(echo captured); echo "$x"
(exit 5) || echo "subshell $?"
sleep 0.1 & echo "background $(test -n "$!" && echo started)"; wait; echo "waited $?"
trap 'echo caught USR1' USR1; kill -USR1 $$; echo after-trap
sleep 5 & victim=$!; kill $victim; wait $victim || echo "killed $?"
yes | head -n 3
find . -name '*.txt' | sort | xargs cat | wc -l
sh -c 'exit 7' || echo "child shell $?"
exec echo exec-ed
"""


def test_busybox_sh_with_processes_pipes_and_signals(busybox, tree):
    env = dict(os.environ, PATH=os.path.dirname(busybox) + ":/usr/bin:/bin")
    links = tree.parent / "bin"
    links.mkdir()
    for applet in ("sh", "ls", "sort", "head", "cat", "tr", "sleep", "yes", "find", "xargs", "wc", "echo", "test"):
        os.symlink(busybox, links / applet)
    env["PATH"] = "%s:/usr/bin:/bin" % links
    argv = [str(links / "sh"), "-c", SHELL_SCRIPT]
    want, got = native(argv, cwd=str(tree), env=env), sandboxed(argv, cwd=str(tree), env=env)
    # Whether ash reports the killed job ("Terminated") depends on when it reaps it, natively too.
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
    assert got.stderr.replace(b"Terminated\n", b"") == want.stderr.replace(b"Terminated\n", b"") == b""
    assert got.stdout.endswith(b"exec-ed\n") and b"caught USR1\nafter-trap\n" in got.stdout
    assert b"killed 143" in got.stdout and b"child shell 7" in got.stdout


def test_fork_wait_and_signal_handlers_in_c(cc, tmp_path):
    prog = build(cc, tmp_path, r"""
        #define _GNU_SOURCE
        #include <signal.h>
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        #include <unistd.h>
        #include <sys/wait.h>
        static volatile sig_atomic_t got, seen_code;
        static char altstack[65536];
        static void on_usr1(int sig, siginfo_t *si, void *uc) { got = sig; seen_code = si->si_code; }
        static void on_segv(int sig, siginfo_t *si, void *uc) {
            char *sp = (char *)&sig;
            printf("segv at %p on altstack %d\n", si->si_addr, sp >= altstack && sp < altstack + sizeof altstack);
            fflush(stdout);
            _exit(11);
        }
        int main(void) {
            int heap_value = 1;
            pid_t c = fork();
            if (c == 0) { heap_value = 2; printf("child sees %d\n", heap_value); fflush(stdout); _exit(3); }
            int st;
            waitpid(c, &st, 0);
            printf("parent sees %d, child exited %d\n", heap_value, WEXITSTATUS(st));
            struct sigaction sa = {0};
            sa.sa_sigaction = on_usr1;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGUSR1, &sa, 0);
            sigset_t block, old;
            sigemptyset(&block); sigaddset(&block, SIGUSR1);
            sigprocmask(SIG_BLOCK, &block, &old);
            kill(getpid(), SIGUSR1);
            printf("blocked: got %d\n", got);
            sigprocmask(SIG_SETMASK, &old, 0);
            printf("unblocked: got %d code %d\n", got, seen_code);
            c = fork();
            if (c == 0) { pause(); _exit(0); }
            kill(c, SIGTERM);
            waitpid(c, &st, 0);
            printf("child killed by %d\n", WTERMSIG(st));
            stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
            sigaltstack(&ss, 0);
            sa.sa_sigaction = on_segv;
            sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
            sigaction(SIGSEGV, &sa, 0);
            *(volatile int *)64 = 1;
            return 0;
        }
    """)
    got = same_as_native([prog])
    assert got.returncode == 11
    assert got.stdout.decode().splitlines() == [
        "child sees 2", "parent sees 1, child exited 3", "blocked: got 0", "unblocked: got 10 code 0",
        "child killed by 15", "segv at 0x40 on altstack 1"]


def test_guest_processes_left_running_are_ended_with_the_run(busybox, tmp_path):
    box = Sandbox()
    status, out = run_captured(box, [busybox, "sh", "-c", "sleep 30 & echo started"], tmp_path)
    assert (status, out) == (0, b"started\n")
    assert box._procs == {} and _children() == set()


# -- threads ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def threads_prog(cc, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("threads") / "threads")
    subprocess.run([cc, "-O1", "-pthread", "-o", out, os.path.join(os.path.dirname(__file__), "victims", "threads.c")],
                   check=True, timeout=120)
    return out


def test_pthreads_mutexes_condvars_joins_and_tls(threads_prog):
    got = same_as_native([threads_prog])
    assert got.stdout == b"counter 120000 sum 150 distinct-tid 1\nrounds done 520000\n"


def test_exit_from_a_thread_ends_the_process(threads_prog):
    got = same_as_native([threads_prog, "exit-from-thread"])
    assert got.returncode == 7


def test_python3_threads(tree):
    code = ("import threading, queue\n"
            "q = queue.Queue()\n"
            "def work(n): q.put(sum(i * i for i in range(n)))\n"
            "ts = [threading.Thread(target=work, args=(5000 * (k + 1),)) for k in range(4)]\n"
            "[t.start() for t in ts]; [t.join() for t in ts]\n"
            "print(sorted(q.get() for _ in ts), threading.active_count())\n")
    same_as_native([PYTHON3, "-S", "-c", code], cwd=str(tree))


def test_calls_answered_in_c_match_the_python_handlers(cc, tmp_path):
    prog = build_program(cc, tmp_path, "syscall_heavy", "-static")
    fast = sandboxed([prog, "300"])
    slow = sandboxed([prog, "300"], "--trace=%s" % (tmp_path / "trace"))     # tracing turns the C path off
    assert fast.returncode == slow.returncode == 0 and fast.stdout == slow.stdout
    assert (tmp_path / "trace").read_text().count("getpid()") == 301

    class OtherPid(Sandbox):
        def sys_getpid(self, p):
            return 4242
    status, out = run_captured(OtherPid(), [prog, "10"], tmp_path)
    assert status == 0 and out.split()[1] == b"4242"


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


ESCAPES = r"""
    #define _GNU_SOURCE
    #include <stdio.h>
    #include <stdlib.h>
    #include <string.h>
    #include <unistd.h>
    #include <sys/stat.h>
    #include <sys/syscall.h>
    #include <sys/wait.h>
    static unsigned long gadget, region;
    static const char *dir;
    static void attempt(const char *name, int which) {
        fflush(stdout);
        pid_t c = fork();
        if (c == 0) {
            long r = -1;
            if (which == 0) {                         /* i386 getpid through int $0x80 */
                r = 20;
                __asm__ volatile("int $0x80" : "+a"(r) : : "memory");
            } else if (which == 1) {                  /* sysenter */
                __asm__ volatile("sysenter" : : : "memory");
            } else if (which == 2) {                  /* the vsyscall page's gettimeofday */
                long (*vgtod)(void *, void *) = (void *)0xffffffffff600000UL;
                char tv[16];
                r = vgtod(tv, 0);
            } else if (which == 3) {                  /* mkdir through the stub's own syscall instruction */
                register long rdi __asm__("rdi") = (long)dir;
                register long rsi __asm__("rsi") = 0755;
                __asm__ volatile("mov $83, %%eax; call *%2" : "+D"(rdi), "+S"(rsi) : "r"(gadget) : "rax", "rcx", "r11", "memory");
                r = 0;
            } else if (which == 4) {                  /* junk over this thread's channel slot, then a syscall */
                memset((void *)(region + 4096 + 94208), 0xff, 256);
                r = syscall(SYS_getppid);
            }
            printf("%s returned %ld\n", name, r);
            fflush(stdout);
            _exit(0);
        }
        int st;
        waitpid(c, &st, 0);
        printf("%s: %s %d\n", name, WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
    }
    int main(int argc, char **argv) {
        gadget = strtoul(argv[1], 0, 0);
        region = strtoul(argv[2], 0, 0);
        dir = argv[3];
        attempt("int80", 0);
        attempt("sysenter", 1);
        attempt("vsyscall", 2);
        attempt("gadget", 3);
        attempt("channel", 4);
        struct stat st;
        printf("dir created: %d\n", stat(dir, &st) == 0);
        return 0;
    }
"""


def test_trap_bypass_attempts_are_contained(cc, tmp_path):
    import pvmexec
    from pvmexec import _core
    probe = pvmexec.Space.create(fixed_layout=True)         # every guest's stub has this same layout
    try:
        gadget = probe._engine.gadget
        region = struct.unpack_from("<Q", probe._engine._map, 16)[0]
    finally:
        probe.detach()
    assert _core.LAYOUT["STUB_BLOCK_SIZE"] == 94208
    prog = build(cc, tmp_path, ESCAPES, "-static")
    target = str(tmp_path / "escaped")
    got = sandboxed([prog, hex(gadget), hex(region), target])
    lines = got.stdout.decode().splitlines()
    assert "int80 returned -%d" % errno.ENOSYS in lines                  # i386 calls are not served
    assert any(l.startswith("sysenter: signal") for l in lines)
    assert any(l.startswith("vsyscall") for l in lines)
    assert "gadget: signal %d" % signal.SIGKILL in lines               # the stub's filter killed it
    assert "channel: exit 0" in lines
    assert lines[-1] == "dir created: 0" and not os.path.exists(target)
    assert got.returncode == 0


def _run_then_signal(argv, sig):
    proc = subprocess.Popen([PY, "-m", "pvmexec", "run", "--"] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_signals_sent_to_pvmexec_run_reach_the_program(busybox):
    # A handler in a guest that makes no system calls at all: the guest is interrupted to run it.
    rc, out, _ = _run_then_signal([busybox, "sh", "-c", 'trap "echo got INT; exit 3" INT; echo ready; '
                                   'while :; do :; done'], signal.SIGINT)
    assert (rc, out) == (3, b"got INT\n")
    rc, out, _ = _run_then_signal([busybox, "sh", "-c", "echo ready; while :; do :; done"], signal.SIGINT)
    assert rc == -signal.SIGINT                                   # died of it, as the program would
    rc, out, _ = _run_then_signal([busybox, "sh", "-c", "echo ready; exec sleep 30"], signal.SIGTERM)
    assert rc == -signal.SIGTERM
    assert _children() == set()


def test_a_failing_handler_kills_the_process_not_the_kernel(busybox, tmp_path, capsys):
    class Broken(Sandbox):
        def sys_uname(self, p, buf):
            raise RuntimeError("bug")
    box = Broken()
    status, out = run_captured(box, [busybox, "uname", "-n"], tmp_path)
    assert status == signal.SIGKILL
    assert "internal error in uname" in capsys.readouterr().err
    status, out = run_captured(box, [busybox, "echo", "still fine"], tmp_path)     # the kernel goes on
    assert (status, out) == (0, b"still fine\n")
