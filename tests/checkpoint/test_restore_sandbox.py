"""Restore into the sandbox: a process dumped running natively goes on under pvmexec's kernel, with its
pids, memory, threads, signals, timers and files, now under the sandbox's policy and tracing; what the
sandbox does not provide is refused before anything runs. None of it needs privileges."""
import gc
import json
import os
import re
import select
import shutil
import signal
import subprocess
import sys
import threading
import time

import pytest

from pvmexec import checkpoint
from pvmexec.checkpoint import RestoreError, restore_in_sandbox
from pvmexec.kernel import Policy, Sandbox

from conftest import compile_victim
from test_restore import EVENTS, HASHING, TIMERS, cli_dumped

PY = sys.executable


@pytest.fixture(scope="module")
def restorable(cc, tmp_path_factory):
    return compile_victim(cc, tmp_path_factory.mktemp("restorable"), "restorable")


def _children():
    """Our live child processes (a stub space left behind would be one)."""
    out = set()
    for tid in os.listdir("/proc/self/task"):
        try:
            with open("/proc/self/task/%s/children" % tid) as f:
                out.update(int(x) for x in f.read().split())
        except FileNotFoundError:
            pass                        # a thread that has just ended (a run's spawner)
    return {pid for pid in out if _state(pid) not in ("Z", None)}


def _state(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _dumped_when_ready(argv, img, ready=True):
    """argv run until it says "ready", dumped there by the CLI (`dump --kill`): its manifest."""
    cli_dumped(argv, img, ready)
    with open(os.path.join(img, "manifest.json")) as f:
        return json.load(f)


def _in_sandbox(img, stdin_data, **kw):
    """restore_in_sandbox with stdin holding stdin_data and stdout a pipe: (wait status, what it wrote)."""
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    try:
        os.write(in_w, stdin_data)
        os.close(in_w)
        in_w = -1
        status = restore_in_sandbox(img, Sandbox(**kw), (in_r, out_w, 2))
        os.close(out_w)
        out_w = -1
        got = b""
        while True:
            chunk = os.read(out_r, 65536)
            if not chunk:
                return status, got
            got += chunk
    finally:
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)


def test_a_process_restored_into_the_sandbox_goes_on_as_an_undisturbed_run_does(restorable, tmp_path):
    """The self-checking victim (four threads asleep and computing, a handler, an interval timer, a
    blocked pending signal, a file read part-way, shared and heap memory, its main thread blocked in
    read): in the sandbox it sees its own pid and tids, FPU values and pending signal, and ends as an
    undisturbed run does; the trace shows every recorded thread's calls by its own tid."""
    data = tmp_path / "data.txt"
    data.write_bytes(b"abcdefghijkl")
    native = subprocess.run([restorable, str(data)], input=b"go\n", capture_output=True, timeout=60)
    assert native.returncode == 0
    want = native.stdout.split(b"\n", 1)[1]
    img = str(tmp_path / "img")
    m = _dumped_when_ready([restorable, str(data)], img)
    assert len(m["threads"]) == 4
    before = _children()
    trace = tmp_path / "trace"
    status, got = _in_sandbox(img, b"go\n", trace=str(trace))
    assert (status, got) == (0, want) and b"umask 027" in got
    shown = trace.read_text()
    assert {int(x) for x in re.findall(r"^\[pid (\d+)\]", shown, re.M)} == {t["tid"] for t in m["threads"]}
    assert re.search(r"^\[pid %d\] read\(0, \"go\\n\"" % m["pid"], shown, re.M), shown[-2000:]
    assert "SIGALRM" in shown                               # its timer goes on ticking, delivered by the kernel
    assert _children() <= before                            # no stub space stays


def test_cli_restores_programs_nobody_here_wrote_into_the_sandbox(tmp_path, busybox):
    """python3 with a thread mid-computation, which then imports more and forks; busybox sh waiting on a
    pipe, which then runs a subshell and a program; coreutils sleep in nanosleep. Each dumped with --kill
    by the CLI, restored by `pvmexec restore --sandbox`, finishing with its undisturbed output and status."""
    script = (HASHING + "t.join(); time.sleep(0.1)\n"
              "import json, sqlite3\n"
              "pid = os.fork()\n"
              "if pid == 0:\n"
              "    print('child', time.time() > 1e9, flush=True); os._exit(4)\n"
              "print(line.strip(), h.hexdigest(), os.waitpid(pid, 0)[1] >> 8,\n"
              "      sqlite3.connect(':memory:').execute('select 6*7').fetchone(), json.dumps([1]))\n")
    shell = "echo ready; read x; (echo sub $x); %s -c 'print(2 + 2)'; echo got $x; exit 3" % sys.executable
    cases = ((["python3", "-c", script], b"go\n", None, 0),
             ([busybox, "sh", "-c", shell], b"pipe\n", b"sub pipe\n4\ngot pipe\n", 3),
             (["sleep", "0.5"], b"", b"", 0))
    for argv, stdin, expected, code in cases:
        if expected is None:
            native = subprocess.run(argv, input=stdin, capture_output=True, timeout=60)
            expected = native.stdout.split(b"\n", 1)[1]
        img = str(tmp_path / os.path.basename(argv[0]))
        _dumped_when_ready(argv, img, ready=argv[0] != "sleep")     # (sleep says nothing: dumped asleep)
        trace = str(tmp_path / (os.path.basename(argv[0]) + ".trace"))
        r = subprocess.run([PY, "-m", "pvmexec", "restore", "--sandbox", "--trace", "-o", trace, img], input=stdin,
                           capture_output=True, timeout=120)
        assert (r.returncode, r.stdout, r.stderr) == (code, expected, b""), argv
        with open(trace) as f:
            assert "+++ exited with %d +++" % code in f.read(), argv


def test_a_process_restored_into_the_sandbox_writes_only_where_the_policy_lets_it(tmp_path):
    """A process holding a log open for appending: refused by a policy that does not let it write there
    (nothing left running), restored with --writable, and then it appends; a file it opens afresh
    outside the writable paths stays as it was on the host."""
    out = tmp_path / "out"
    out.mkdir()
    log, other = out / "log", tmp_path / "other"
    log.write_bytes(b"before\n")
    other.write_bytes(b"host's\n")
    script = ("import sys\n"
              "log = open(sys.argv[1], 'a', buffering=1)\n"
              "print('ready', flush=True)\n"
              "line = sys.stdin.readline().strip()\n"
              "log.write('after %s\\n' % line)\n"
              "try:\n"
              "    open(sys.argv[2], 'w').write('guest\\n'); print('wrote')\n"
              "except OSError as e:\n"
              "    print('refused', e.errno)\n")
    img = str(tmp_path / "img")
    _dumped_when_ready(["python3", "-c", script, str(log), str(other)], img)
    before = _children()
    r = subprocess.run([PY, "-m", "pvmexec", "restore", "--sandbox", img], input=b"go\n", capture_output=True,
                       timeout=120)
    assert r.returncode == 1 and r.stdout == b"" and r.stderr.count(b"\n") == 1, r.stderr
    assert re.match(rb"pvmexec restore: fd 3 \(%s\): the sandbox's policy gives no writing of it" %
                    re.escape(str(log).encode()), r.stderr), r.stderr
    assert _children() <= before and log.read_bytes() == b"before\n"
    r = subprocess.run([PY, "-m", "pvmexec", "restore", "--sandbox", "--writable", str(out), img], input=b"go\n",
                       capture_output=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert log.read_bytes() == b"before\nafter go\n"
    assert other.read_bytes() == b"host's\n"                # the guest's writes outside --writable stay its own


@pytest.mark.parametrize("script", ["EVENTS", "TIMERS"])
def test_asyncio_and_posix_timers_go_on_in_the_sandbox(tmp_path, script):
    """asyncio in epoll (a socket pair to wake it, a pipe it watches) beside an eventfd, a running timerfd
    and a signalfd, all held by the kernel now; POSIX timers with their ids, one firing every 20 ms and
    one an hour away: each goes on in the sandbox as it would have natively."""
    code = {"EVENTS": EVENTS, "TIMERS": TIMERS}[script]
    native = subprocess.run(["python3", "-c", code], input=b"go\n", capture_output=True, timeout=60)
    want = native.stdout.split(b"\n", 1)[1]
    img = str(tmp_path / "img")
    m = _dumped_when_ready(["python3", "-c", code], img)
    if script == "EVENTS":
        assert len([f for f in m["fds"] if f["path"].startswith("anon_inode:")]) == 4
    else:
        assert sorted(t["id"] for t in m["posix_timers"]) == [1, 2]
    assert _in_sandbox(img, b"go\n") == (0, want)


def test_restore_into_the_sandbox_refuses_what_it_does_not_provide(tmp_path):
    """A descriptor the sandbox cannot take over, a mapping where the stub has its own, files outside the
    sandbox's root: each a clear error naming it, raised before anything runs, nothing left behind."""
    inotify = ("import ctypes, sys\nfd = ctypes.CDLL(None).inotify_init1(0)\nprint('ready', fd, flush=True)\n"
               "sys.stdin.readline()\n")
    img = str(tmp_path / "inotify")
    m = _dumped_when_ready(["python3", "-c", inotify], img)
    fd = next(f["fd"] for f in m["fds"] if f["path"] == "anon_inode:inotify")
    gc.collect()        # (garbage of earlier tests, collected later, would close descriptors of its own)
    before, ours = _children(), sorted(os.listdir("/proc/self/fd"))
    with pytest.raises(RestoreError, match=r"fd %d \(anon_inode:inotify\): descriptors of this kind cannot be "
                       "restored" % fd):
        restore_in_sandbox(img)
    assert _children() <= before
    # Refused midway (its descriptor limit below a descriptor it holds): nothing of it stays, in the
    # kernel either (no host descriptor of the half-made process is left open here).
    edited = str(tmp_path / "limited")
    shutil.copytree(img, edited)
    with open(os.path.join(edited, "manifest.json")) as f:
        m = json.load(f)
    m["fds"] = [f for f in m["fds"] if f["path"] != "anon_inode:inotify"]
    for name in ("RLIMIT_NOFILE", "RLIMIT_OFILE"):     # (one limit, two names)
        m["rlimits"][name] = [2, m["rlimits"][name][1]]
    with open(os.path.join(edited, "manifest.json"), "w") as f:
        json.dump(m, f)
    with pytest.raises(RestoreError, match="restoring into the sandbox: Bad file descriptor"):
        restore_in_sandbox(edited)
    gc.collect()
    assert _children() <= before and sorted(os.listdir("/proc/self/fd")) == ours
    clash = ("import ctypes, mmap, sys\n"
             "libc = ctypes.CDLL(None, use_errno=True)\n"
             "libc.mmap.restype = ctypes.c_void_p\n"
             "libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,"
             " ctypes.c_long]\n"
             "at = libc.mmap(0x7ffff7f00000, 4096, 3, 0x22 | 0x100000, -1, 0)\n"
             "assert at == 0x7ffff7f00000, at\n"
             "print('ready', flush=True)\nsys.stdin.readline()\n")
    img = str(tmp_path / "clash")
    _dumped_when_ready(["python3", "-c", clash], img)
    with pytest.raises(RestoreError, match="mapping 0x7ffff7f00000-0x7ffff7f01000 .* lies where the sandbox's "
                       "stub has its own"):
        restore_in_sandbox(img)
    assert _children() <= before
    root = tmp_path / "root"
    root.mkdir()
    with pytest.raises(RestoreError, match="outside the sandbox's root"):
        restore_in_sandbox(img, Sandbox(policy=Policy(root=str(root))))
    assert _children() <= before


def test_cli_restore_sandbox_usage_errors(tmp_path):
    for argv, message in ((["--sandbox", "--lazy"], b"--sandbox cannot --lazy"),
                          (["--sandbox", "--detach"], b"--sandbox cannot --detach"),
                          (["--trace"], b"--trace is an option of --sandbox")):
        r = subprocess.run([PY, "-m", "pvmexec", "restore", *argv, str(tmp_path)], capture_output=True, timeout=60)
        assert r.returncode == 2 and r.stderr.startswith(b"pvmexec restore: " + message), r.stderr
        assert r.stderr.count(b"\n") == 1
    r = subprocess.run([PY, "-m", "pvmexec", "restore", "--sandbox", str(tmp_path / "nothing")], capture_output=True,
                       timeout=60)
    assert r.returncode == 1 and r.stderr.startswith(b"pvmexec restore: ") and r.stderr.count(b"\n") == 1


def test_a_process_dumped_stopped_stays_stopped_in_the_sandbox_until_continued(tmp_path):
    """Stopped by job control when dumped: stopped again in the sandbox (its input waiting unread) until a
    SIGCONT reaches the kernel (`kill -CONT` of `pvmexec restore`), then it goes on."""
    script = "import sys\nprint('ready', flush=True)\nprint(sys.stdin.readline().strip(), 'read', flush=True)\n"
    p = subprocess.Popen(["python3", "-c", script], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.DEVNULL)
    img = str(tmp_path / "img")
    try:
        assert p.stdout.readline() == b"ready\n"
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(p.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        m = checkpoint.dump(p.pid, img, pre_dumps=0, leave_running=False)
        assert m["stopped"] is True
    finally:
        p.kill()
        p.wait(10)
        p.stdin.close()
        p.stdout.close()
    in_r, in_w = os.pipe()
    out_r, out_w = os.pipe()
    os.write(in_w, b"go\n")
    box, made, got = Sandbox(), threading.Event(), []
    t = threading.Thread(target=lambda: got.append(restore_in_sandbox(img, box, (in_r, out_w, 2), on_stopped=made.set)))
    t.start()
    try:
        assert made.wait(30)
        time.sleep(0.3)
        assert select.select([out_r], [], [], 0)[0] == []          # stopped: nothing read, nothing said
        box.host_signal(signal.SIGCONT)
        t.join(30)
        assert got == [0]
        os.close(out_w)
        out_w = -1
        assert os.read(out_r, 100) == b"go read\n"
    finally:
        if t.is_alive():
            box.host_signal(signal.SIGKILL)
            t.join(30)
        for fd in (in_r, in_w, out_r, out_w):
            if fd >= 0:
                os.close(fd)
