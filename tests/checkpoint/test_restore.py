"""Restore: a dumped process goes on with its pid, tids, memory, threads, signals, timers and files as
if it had never stopped; what cannot be restored is refused before anything runs."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest

from pvmexec import checkpoint
from pvmexec.checkpoint import RestoreError, restore

from conftest import compile_victim

ROOT = os.geteuid() == 0
PY = sys.executable


@pytest.fixture(scope="module")
def restorable(cc, tmp_path_factory):
    return compile_victim(cc, tmp_path_factory.mktemp("restorable"), "restorable")


@pytest.fixture
def data_file(tmp_path):
    path = tmp_path / "data.txt"
    path.write_bytes(b"abcdefghijkl")
    return str(path)


def _start(exe, data):
    p = subprocess.Popen([exe, data], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    line = p.stdout.readline()
    assert line.startswith(b"ready"), line
    return p


def _end(p):
    """A victim killed (if it still runs), reaped, its pipes closed."""
    if p.poll() is None:
        p.kill()
    p.wait(10)
    for f in (p.stdin, p.stdout, p.stderr):
        if f is not None and not f.closed:
            f.close()


def _undisturbed(exe, data):
    p = _start(exe, data)
    out, _ = p.communicate(b"go\n", timeout=30)
    assert p.returncode == 0
    return out


def _dumped(exe, data, directory):
    """A victim dumped (one pre-dump) and killed: (its pid, the image's manifest)."""
    p = _start(exe, data)
    try:
        m = checkpoint.dump(p.pid, directory, pre_dumps=1, leave_running=False)
    finally:
        _end(p)
    return p.pid, m


def _maps(pid):
    out = []
    with open("/proc/%d/maps" % pid) as f:
        for line in f:
            parts = line.rstrip("\n").split(None, 5)
            if len(parts) > 5 and parts[5] == "[vsyscall]":
                continue
            lo, hi = (int(x, 16) for x in parts[0].split("-"))
            out.append((lo, hi, parts[1], parts[5] if len(parts) > 5 else ""))
    return out


class _Restored:
    """A restore whose stdin and stdout are pipes of ours; go() sends "go" and reads all it says.
    Leaving the block kills and reaps it (and its namespace) if it is still there."""

    def __init__(self, img, **kw):
        self.stdin_r, self.stdin_w = os.pipe()
        self.out_r, self.out_w = os.pipe()
        try:
            self.r = restore(img, stdio=(self.stdin_r, self.out_w, 2), **kw)
        except BaseException:
            self._close()
            raise
        finally:
            for fd in (self.stdin_r, self.out_w):
                os.close(fd)

    def go(self):
        os.write(self.stdin_w, b"go\n")
        got = b""
        while True:
            chunk = os.read(self.out_r, 4096)
            if not chunk:
                return got
            got += chunk

    def _close(self):
        for fd in (self.stdin_w, self.out_r):
            os.close(fd)

    def __enter__(self):
        return self.r

    def __exit__(self, *exc):
        self._close()
        if os.path.exists("/proc/%d" % self.r.pid) or self.r.init is not None:
            try:
                os.kill(self.r.pid, 9)
                self.r.wait()
            except (ProcessLookupError, ChildProcessError):
                pass
        return False


def _script_dumped(script, img, pre_dumps=0):
    """python3 -c script, which says "ready" and waits for a line: what an undisturbed run says after
    "ready" when given "go", and the manifest of a run dumped (and killed) while it waits."""
    want = subprocess.run(["python3", "-c", script], input=b"go\n", capture_output=True, timeout=60).stdout
    assert want.startswith(b"ready\n"), want
    return want[len(b"ready\n"):], _dumped_when_ready(["python3", "-c", script], img, pre_dumps)


def _dumped_when_ready(argv, img, pre_dumps=0):
    """argv run until it says "ready", dumped there (and killed): the image's manifest."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout.readline().startswith(b"ready")
        return checkpoint.dump(p.pid, img, pre_dumps=pre_dumps, leave_running=False)
    finally:
        _end(p)


def _released(pid, name="sleep"):
    """Restored and let go: its own name, no tracer, and not dying (a restorer killed while it still
    traced the process leaves it untraced for a moment with PTRACE_O_EXITKILL's SIGKILL pending)."""
    try:
        with open("/proc/%d/status" % pid) as f:
            status = dict(line.split(":", 1) for line in f)
    except OSError:
        return False
    dying = (int(status["SigPnd"], 16) | int(status["ShdPnd"], 16)) & (1 << (signal.SIGKILL - 1)) or \
        status["State"].split()[0] in ("Z", "X")
    return status["Name"].strip() == name and status["TracerPid"].strip() == "0" and not dying


def _gone(pid):
    try:
        os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        pass
    return not os.path.exists("/proc/%d" % pid)


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE (the unprivileged answer is "
                    "test_an_unprivileged_restore_is_a_clear_refusal)")
def test_a_restored_process_goes_on_as_an_undisturbed_run_does(restorable, data_file, tmp_path):
    want = _undisturbed(restorable, data_file)
    pid, m = _dumped(restorable, data_file, str(tmp_path / "img"))
    assert len(m["threads"]) == 4
    run = _Restored(str(tmp_path / "img"))
    with run as restored:
        # Its own pid and tids; nothing of the restorer in it: the image's mappings, the image's descriptors.
        assert restored.pid == pid
        assert sorted(int(t) for t in os.listdir("/proc/%d/task" % pid)) == sorted(t["tid"] for t in m["threads"])
        want_maps = sorted([(x["start"], x["end"], x["path"]) for x in m["mappings"]] +
                           [(x["start"], x["end"], x["path"]) for x in m["vdso"]])
        assert sorted((lo, hi, path) for lo, hi, _perms, path in _maps(pid)) == want_maps
        perms = {(x["start"], x["end"]): x["perms"] for x in m["mappings"]}
        assert all(perms[(lo, hi)] == p for lo, hi, p, path in _maps(pid) if (lo, hi) in perms)
        assert sorted(int(fd) for fd in os.listdir("/proc/%d/fd" % pid)) == sorted(f["fd"] for f in m["fds"])
        assert os.readlink("/proc/%d/fd/3" % pid) == data_file
        with open("/proc/%d/comm" % pid) as f:
            assert f.read().strip() == m["comm"]
        leader = next(t for t in m["threads"] if t["tid"] == pid)
        with open("/proc/%d/status" % pid) as f:
            status = dict(line.split(":", 1) for line in f)
        assert int(status["SigBlk"], 16) == leader["sigmask"] and status["SigCgt"]
        assert run.go() == want
        assert restored.wait() == 0


def _userfaultfds(pid):
    return [fd for fd in os.listdir("/proc/%d/fd" % pid) if os.readlink("/proc/%d/fd/%s" % (pid, fd)).endswith(
        "[userfaultfd]")]


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_lazily_restored_process_goes_on_as_an_undisturbed_run_does(restorable, data_file, tmp_path):
    """It runs before its memory is in (threads, timers, a blocked read into the heap: faults from
    user and kernel mode); the page server fills it, exits, and nothing of it stays."""
    want = _undisturbed(restorable, data_file)
    pid, m = _dumped(restorable, data_file, str(tmp_path / "img"))
    run = _Restored(str(tmp_path / "img"), lazy=True)
    with run as restored:
        server = restored.server
        assert restored.pid == pid and server is not None and _userfaultfds(pid) == []
        assert sorted(int(fd) for fd in os.listdir("/proc/%d/fd" % pid)) == sorted(f["fd"] for f in m["fds"])
        assert run.go() == want
        assert restored.wait() == 0
        assert restored.server is None and _gone(server)          # reaped by wait()


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_lazy_restore_follows_what_the_process_does_to_its_memory(cc, tmp_path):
    """Right after the restore, before the server's background copy gets there, the process drops
    (madvise DONTNEED), moves (mremap) and unmaps parts of its memory and forks a child that checks
    its own copy: the dropped part reads as zeros, the moved part has its data at the new place, the
    child and the rest see exactly the memory of the dump."""
    exe = compile_victim(cc, tmp_path, "lazy_memory")
    _dumped_when_ready([exe, "256"], str(tmp_path / "img"), pre_dumps=1)
    run = _Restored(str(tmp_path / "img"), lazy=True)
    with run as restored:
        assert run.go() == b"got go kept 0 dropped 0 moved 0 child 0 reader ok\n"
        assert restored.wait() == 0


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_damaged_page_kills_the_lazily_restored_process_before_it_sees_it(cc, tmp_path):
    """A byte flipped in a page the server fills: the chunk's digest differs, the process is killed
    (never given the page) and the command says why."""
    exe = compile_victim(cc, tmp_path, "lazy_memory")
    m = _dumped_when_ready([exe, "16"], str(tmp_path / "img"), pre_dumps=0)
    _addr, off, n = max(checkpoint.Image(str(tmp_path / "img")).runs(), key=lambda r: r[2])   # the 16 MiB
    with open(tmp_path / "img" / "pages.img", "r+b") as f:
        f.seek(off + n // 2 * 4096 + 7)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    r = subprocess.run([PY, "-m", "pvmexec", "restore", "--lazy", str(tmp_path / "img")], input=b"go\n",
                       capture_output=True, timeout=60)
    assert r.returncode == -signal.SIGKILL and r.stdout == b"", r
    assert b"does not match its checksum" in r.stderr and b"killed it" in r.stderr and r.stderr.count(b"\n") == 1
    assert _gone(m["pid"])


def test_restore_refuses_what_it_cannot_restore_before_anything_runs(restorable, data_file, tmp_path):
    img = str(tmp_path / "img")
    p = _start(restorable, data_file)
    try:
        checkpoint.dump(p.pid, img, pre_dumps=0, leave_running=True)
        with pytest.raises(RestoreError, match="pid %d is in use" % p.pid):
            restore(img)
        p.stdin.write(b"go\n")                              # the original goes on, untouched
        p.stdin.close()
        assert b"got go pid same workers ok" in p.stdout.read() and p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
    pid = p.pid

    def refused(edit, message):
        work = str(tmp_path / "edited")
        shutil.rmtree(work, ignore_errors=True)
        shutil.copytree(img, work)
        edit(work)
        with pytest.raises(RestoreError, match=message):
            restore(work)
        assert _gone(pid)

    def manifest(edit):
        def apply(work):
            path = os.path.join(work, "manifest.json")
            with open(path) as f:
                m = json.load(f)
            edit(m)
            with open(path, "w") as f:
                json.dump(m, f)
        return apply

    def flip(work):
        with open(os.path.join(work, "pages.img"), "r+b") as f:
            f.seek(100)
            b = f.read(1)
            f.seek(100)
            f.write(bytes([b[0] ^ 1]))

    refused(flip, "pages.img does not match its checksum")
    refused(manifest(lambda m: m.update(version=1)), "image version 1")
    refused(manifest(lambda m: [v.update(sha256="0" * 64) for v in m["vdso"] if v["path"] == "[vdso]"]),
            "vDSO is not this kernel's")
    refused(manifest(lambda m: m["fds"].append(dict(fd=7, path="socket:[1234]", pos=0, flags=2))),
            r"fd 7 \(socket:\[1234\]\): a socket the image does not describe cannot be restored")
    refused(manifest(lambda m: m.update(cwd=str(tmp_path / "no-such-dir"))), "cwd .* is not a directory")
    refused(manifest(lambda m: m["threads"][0].update(tid="1")), "the image's thread 0 is malformed")
    refused(manifest(lambda m: m["sigactions"].update({"99": {}})), "the image's sigactions is malformed")
    refused(manifest(lambda m: m["itimers"].update(real=[0, 0, "1", 0])), "the image's itimers is malformed")
    refused(manifest(lambda m: m["mappings"][0].update(start=m["mappings"][0]["start"] + 1)), "mapping 0")
    with open(data_file + ".new", "wb") as f:               # the same name, another file
        f.write(b"abcdefghijkl")
    os.replace(data_file + ".new", data_file)
    refused(lambda work: None, "(fd 3|mapping .*) .* is another file than at the dump")
    os.unlink(data_file)
    with open(data_file, "wb") as f:                        # shorter than where the process reads
        f.write(b"ab")
    refused(lambda work: None, "(fd 3|mapping .*) .* (changed|is another file)")
    os.unlink(data_file)
    refused(lambda work: None, "(fd 3|mapping .*) .*: No such file")


@pytest.mark.skipif(ROOT, reason="as root the pid can be chosen: the restore test itself")
def test_an_unprivileged_restore_is_a_clear_refusal(restorable, data_file, tmp_path):
    pid, _m = _dumped(restorable, data_file, str(tmp_path / "img"))
    with pytest.raises(RestoreError, match="needs CAP_CHECKPOINT_RESTORE or root"):
        restore(str(tmp_path / "img"))
    assert _gone(pid)


# python3 hashing in a thread; the main thread says "ready" and reads a line (dumped there).
HASHING = ("import hashlib, os, sys, threading, time\n"
           "h = hashlib.sha256()\n"
           "def work():\n"
           "    for i in range(300000): h.update(b'%d' % i)\n"
           "t = threading.Thread(target=work); t.start()\n"
           "print('ready', flush=True)\n"
           "line = sys.stdin.readline()\n")


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
@pytest.mark.parametrize("how", [[], ["--lazy"]])
def test_cli_restores_programs_nobody_here_wrote(tmp_path, busybox, how):
    """python3 with a thread, mid-computation and asleep; coreutils sleep in nanosleep; busybox sh
    waiting on a pipe; each dumped with --kill by the CLI, restored by it (eagerly, and lazily),
    finishing with its undisturbed output and status."""
    script = HASHING + "t.join(); time.sleep(0.2)\nprint(line.strip(), h.hexdigest(), time.monotonic() > 0)\n"
    want = subprocess.run(["python3", "-c", script], input=b"go\n", capture_output=True, timeout=60).stdout
    for argv, stdin, expected in ((["python3", "-c", script], b"go\n", want.split(b"\n", 1)[1]),
                                  (["sleep", "0.8"], b"", b""),
                                  ([busybox, "sh", "-c", "echo ready; read x; echo got $x; exit 3"], b"pipe\n",
                                   b"got pipe\n")):
        img = str(tmp_path / os.path.basename(argv[0]))
        pid = cli_dumped(argv, img, ready=argv[0] != "sleep")
        r = subprocess.run([PY, "-m", "pvmexec", "restore", *how, img], input=stdin, capture_output=True, timeout=60)
        assert (r.returncode, r.stdout, r.stderr) == (3 if argv[0] == busybox else 0, expected, b""), argv
        assert _gone(pid)


def cli_dumped(argv, img, ready=True):
    """argv run (until it says "ready", if ready) and dumped there by the CLI with --kill: its pid."""
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        if ready:
            assert p.stdout.readline().startswith(b"ready")
        d = subprocess.run([PY, "-m", "pvmexec", "dump", "--kill", "--pre-dumps", "1", str(p.pid), img],
                           capture_output=True, timeout=120)
        assert d.returncode == 0, d.stderr
        assert p.wait(10) == -9
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        for f in (p.stdin, p.stdout, p.stderr):
            f.close()
    return p.pid


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_file_the_restore_s_stdout_goes_to_keeps_what_it_holds(tmp_path, busybox):
    """`pvmexec restore DIR >> log` or `> log` after other output: the restored process writes on at
    the same offset (the same open file, as a shell's children share it), never over what is there."""
    p = subprocess.Popen([busybox, "sh", "-c", "echo ready; read x; echo got $x"], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout.readline() == b"ready\n"
        checkpoint.dump(p.pid, str(tmp_path / "img"), pre_dumps=0, leave_running=False)
    finally:
        _end(p)
    log = tmp_path / "log"
    log.write_bytes(b"before the restore\n")
    r, w = os.pipe()
    out = os.open(log, os.O_WRONLY)
    try:
        os.lseek(out, 0, os.SEEK_END)
        restored = restore(str(tmp_path / "img"), stdio=(r, out, 2))
        os.write(w, b"it\n")
        assert restored.wait() == 0
        os.write(out, b"after\n")                      # and ours goes on after its output
    finally:
        for fd in (r, w, out):
            os.close(fd)
    assert log.read_bytes() == b"before the restore\ngot it\nafter\n"


def test_cli_restore_errors_are_one_line(tmp_path):
    r = subprocess.run([PY, "-m", "pvmexec", "restore", str(tmp_path / "nothing")], capture_output=True, timeout=60)
    assert r.returncode == 1 and r.stderr.count(b"\n") == 1 and r.stderr.startswith(b"pvmexec restore: ")
    assert b"Traceback" not in r.stderr


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_kill_of_pvmexec_restore_reaches_the_restored_process(tmp_path):
    """As for a program a shell exec'd: SIGTERM to the command ends the program, which dies of it."""
    p = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    img = str(tmp_path / "img")
    try:
        checkpoint.dump(p.pid, img, pre_dumps=0, leave_running=False)
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)
        p.stdout.close()
        p.stderr.close()
    r = subprocess.Popen([PY, "-m", "pvmexec", "restore", img], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not _released(p.pid) and time.monotonic() < deadline:
            time.sleep(0.02)
        assert _released(p.pid)
        r.send_signal(signal.SIGTERM)
        out, err = r.communicate(timeout=30)
        assert r.returncode == -signal.SIGTERM and err == b""
    finally:
        if r.poll() is None:
            r.kill()
            r.wait(10)
    deadline = time.monotonic() + 10
    while os.path.exists("/proc/%d" % p.pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not os.path.exists("/proc/%d" % p.pid)


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
@pytest.mark.parametrize("how", [[], ["--lazy"]])
def test_a_restorer_killed_at_any_moment_leaves_nothing_half_made(restorable, data_file, tmp_path, how):
    """SIGKILL of `pvmexec restore` before, during or after the restore: the process is either gone
    or whole (it answers as an undisturbed run does), never half-made; lazily, the page server
    (not killed) finishes its work."""
    want = _undisturbed(restorable, data_file)
    pid, _m = _dumped(restorable, data_file, str(tmp_path / "img"))
    outcomes = set()
    for delay in (0.0, 0.15, 0.3, 0.4, 0.5, 0.7, 1.0, 4.0):
        r = subprocess.Popen([PY, "-m", "pvmexec", "restore", *how, str(tmp_path / "img")], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            time.sleep(delay)
            r.kill()
            r.wait(10)
            deadline = time.monotonic() + 10
            while os.path.exists("/proc/%d" % pid) and not _released(pid, "restorable") and \
                    time.monotonic() < deadline:
                time.sleep(0.01)
            if not os.path.exists("/proc/%d" % pid):
                outcomes.add("gone")
                continue
            assert _released(pid, "restorable")
            outcomes.add("whole")
            r.stdin.write(b"go\n")
            r.stdin.close()
            assert r.stdout.read() == want                  # its stdout is the restorer's pipe
            deadline = time.monotonic() + 10
            while os.path.exists("/proc/%d" % pid) and time.monotonic() < deadline:
                time.sleep(0.01)
        finally:
            if os.path.exists("/proc/%d" % pid):
                os.kill(pid, 9)
                time.sleep(0.1)
            for f in (r.stdin, r.stdout):
                if not f.closed:
                    f.close()
    assert outcomes == {"gone", "whole"}                    # the early kills, the late one


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_process_dumped_stopped_is_restored_stopped(restorable, data_file, tmp_path):
    want = _undisturbed(restorable, data_file)
    p = _start(restorable, data_file)
    try:
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(p.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        checkpoint.dump(p.pid, str(tmp_path / "img"), pre_dumps=0, leave_running=False)
    finally:
        _end(p)
    run = _Restored(str(tmp_path / "img"))
    with run as restored:
        assert restored.stopped
        time.sleep(0.2)
        assert _state(p.pid) == "T"
        os.kill(p.pid, signal.SIGCONT)
        assert run.go() == want and restored.wait() == 0


def _state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


@pytest.mark.skipif(not ROOT, reason="a pid namespace and choosing pids in it need root")
@pytest.mark.parametrize("lazy", [False, True])
def test_restore_in_a_new_pid_namespace_while_the_original_runs(restorable, data_file, tmp_path, lazy):
    """--pid-ns: the pids are taken here (the original goes on), free in a namespace of its own; it
    sees its own pid and tids there, finishes as an undisturbed run, and the namespace ends with it."""
    want = _undisturbed(restorable, data_file)
    p = _start(restorable, data_file)
    try:
        m = checkpoint.dump(p.pid, str(tmp_path / "img"), pre_dumps=1, leave_running=True)
        run = _Restored(str(tmp_path / "img"), pid_ns=True, lazy=lazy)
        with run as restored:
            init = restored.init.pid
            assert restored.pid != p.pid
            names = {}
            for tid in os.listdir("/proc/%d/task" % restored.pid):
                with open("/proc/%d/task/%s/status" % (restored.pid, tid)) as f:
                    ns = next(line for line in f if line.startswith("NSpid:")).split()[1:]
                names[int(ns[0])] = int(ns[-1])
            assert sorted(names.values()) == sorted(t["tid"] for t in m["threads"])
            assert run.go() == want and restored.wait() == 0
            assert not os.path.exists("/proc/%d" % init)        # the namespace ended with it
        p.stdin.write(b"go\n")                                  # the original, untouched, goes on
        p.stdin.close()
        assert p.stdout.read() == want and p.wait(30) == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_cli_pid_ns_cannot_detach(tmp_path):
    r = subprocess.run([PY, "-m", "pvmexec", "restore", "--pid-ns", "--detach", str(tmp_path)], capture_output=True,
                       timeout=60)
    assert r.returncode == 2 and b"--pid-ns cannot --detach" in r.stderr and r.stderr.count(b"\n") == 1


@pytest.mark.skipif(not ROOT, reason="restoring another user's process needs root")
def test_a_process_of_another_user_is_restored_with_its_own_ids_not_roots(cc, tmp_path):
    """A process of uid 65534 dumped and restored by root: every thread has the image's uids, gids and
    groups again, no capability, and its /proc files are its own (dumpable), never root's."""
    import tempfile
    shared = tempfile.mkdtemp(prefix="pvmexec-creds-")
    try:
        os.chmod(shared, 0o777)
        exe = compile_victim(cc, shared, "restorable")
        os.chmod(exe, 0o755)
        data = os.path.join(shared, "data.txt")
        with open(data, "wb") as f:
            f.write(b"abcdefghijkl")
        os.chmod(data, 0o644)

        def nobody():
            os.setgroups([65534])
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
        want = subprocess.run([exe, data], input=b"go\n", capture_output=True, preexec_fn=nobody,
                              timeout=60).stdout.split(b"\n", 1)[1]      # what follows "ready"
        p = subprocess.Popen([exe, data], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                             preexec_fn=nobody)
        img = os.path.join(shared, "img")
        try:
            assert p.stdout.readline().startswith(b"ready")
            checkpoint.dump(p.pid, img, pre_dumps=0, leave_running=False)
        finally:
            _end(p)
        run = _Restored(img)
        with run as restored:
            for tid in restored.threads:
                with open("/proc/%d/task/%d/status" % (restored.pid, tid)) as f:
                    status = dict(line.rstrip("\n").split(":", 1) for line in f)
                assert status["Uid"].split() == ["65534"] * 4 and status["Gid"].split() == ["65534"] * 4
                assert status["Groups"].split() == ["65534"] and int(status["CapEff"], 16) == 0
            assert os.stat("/proc/%d" % restored.pid).st_uid == 65534
            assert run.go() == want and restored.wait() == 0
    finally:
        shutil.rmtree(shared, ignore_errors=True)


PIPES = r"""
import os, sys
r, w = os.pipe()
os.write(w, b"waiting in the pipe " * 1000)         # 20000 bytes nobody has read yet
r2, w2 = os.pipe2(os.O_NONBLOCK)
print("ready", flush=True)
line = sys.stdin.readline()
got = b""
while len(got) < 20000:
    got += os.read(r, 65536)
os.write(w2, b"x")
print(line.strip(), len(got), got == b"waiting in the pipe " * 1000, os.read(r2, 10), os.get_blocking(r2),
      os.get_inheritable(r), flush=True)
"""


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_a_pipe_whose_ends_are_the_processs_comes_back_with_what_waited_in_it(tmp_path):
    want, m = _script_dumped(PIPES, str(tmp_path / "img"))
    assert sorted(len(v["data"]) // 2 for v in m["pipes"].values())[-1] == 20000
    run = _Restored(str(tmp_path / "img"))
    with run as restored:
        assert run.go() == want and restored.wait() == 0


SOCKETS = r"""
import os, socket, sys, threading
a, b = socket.socketpair()                          # a stream pair, data waiting in both directions
a.sendall(b"to b " * 3000)
b.sendall(b"to a")
c, d = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
d.setblocking(False)
os.set_inheritable(c.fileno(), True)
def echo():                                         # a thread blocked in recv on one end
    while True:
        msg = c.recv(100)
        c.send(msg.upper())
        if msg == b"end":
            return
t = threading.Thread(target=echo)
t.start()
print("ready", flush=True)
line = sys.stdin.readline()
got = b""
while len(got) < 15000:
    got += b.recv(65536)
d.setblocking(True)
answers = []
for word in (b"one", b"end"):
    d.send(word)
    answers.append(d.recv(100))
t.join()
print(line.strip(), got == b"to b " * 3000, a.recv(10), answers, d.getblocking(), os.get_inheritable(c.fileno()),
      a.type == socket.SOCK_STREAM and c.type == socket.SOCK_SEQPACKET, flush=True)
"""


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_socket_pairs_whose_ends_are_the_processs_come_back_with_what_waited_in_them(tmp_path):
    """A stream pair with data waiting both ways, a seqpacket pair a thread is blocked reading; each
    made again with its type, flags and data; a socket whose peer is elsewhere is refused by name."""
    want, m = _script_dumped(SOCKETS, str(tmp_path / "img"))
    unix = [v for v in m["sockets"].values() if v["family"] == 1]
    assert len(unix) == 4 and sorted(len(v["data"]) // 2 for v in unix) == [0, 0, 4, 15000]
    run = _Restored(str(tmp_path / "img"))
    with run as restored:
        assert run.go() == want and restored.wait() == 0
    # the same socket, its peer outside the image: refused before anything runs, naming the fd
    path = tmp_path / "img" / "manifest.json"
    m = json.loads(path.read_text())
    ino = next(k for k, v in m["sockets"].items() if v["family"] == 1 and v["data"])
    m["sockets"][m["sockets"][ino]["peer"]]["peer"] = "1"
    m["sockets"][ino]["peer"] = "1"
    path.write_text(json.dumps(m))
    with pytest.raises(RestoreError, match=r"fd \d+ \(socket:\[%s\]\): a Unix socket whose peer is not the "
                       r"process's" % ino):
        restore(str(tmp_path / "img"))


@pytest.mark.skipif(not ROOT, reason="choosing a pid and changing capabilities need root")
@pytest.mark.parametrize("privileges", [
    ["--bounding-set", "-all,+net_bind_service,+kill", "--inh-caps", "-all", "--no-new-privs"],
    ["--reuid", "65534", "--regid", "65534", "--clear-groups", "--inh-caps", "-all,+net_bind_service",
     "--ambient-caps", "+net_bind_service"],
])
def test_a_process_with_fewer_capabilities_is_restored_with_exactly_those(tmp_path, busybox, privileges):
    """A root shell that dropped all but two capabilities (and set no_new_privs), and a nobody shell
    with one ambient capability: restored, each has the capability sets it had, never root's."""
    script = "echo ready; read x; grep -E '^(Cap|NoNewPrivs|Uid)' /proc/self/status"
    argv = ["setpriv", *privileges, "--", busybox, "sh", "-c", script]
    want = subprocess.run(argv, input=b"x\n", capture_output=True, timeout=60).stdout
    assert b"CapEff:\t0000000000000400" in want or b"CapBnd:\t0000000000000420" in want
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout.readline() == b"ready\n"
        checkpoint.dump(p.pid, str(tmp_path / "img"), pre_dumps=0, leave_running=False)
    finally:
        _end(p)
    r = subprocess.run([PY, "-m", "pvmexec", "restore", str(tmp_path / "img")], input=b"x\n", capture_output=True,
                       timeout=60)
    assert (r.returncode, r.stdout, r.stderr) == (0, want.split(b"\n", 1)[1], b"")


SECCOMP = r"""
import ctypes, struct, sys
libc = ctypes.CDLL(None, use_errno=True)
prog = struct.pack("<HBBI", 0x20, 0, 0, 0)               # ld [nr]
prog += struct.pack("<HBBI", 0x15, 0, 1, 110)            # jeq getppid
prog += struct.pack("<HBBI", 0x06, 0, 0, 0x00050001)     # ret ERRNO(EPERM): its effect can be seen
prog += struct.pack("<HBBI", 0x06, 0, 0, 0x7FFF0000)     # ret ALLOW
buf = ctypes.create_string_buffer(prog)
fprog = struct.pack("<HxxxxxxQ", len(prog) // 8, ctypes.addressof(buf))
libc.prctl(38, 1, 0, 0, 0)                               # PR_SET_NO_NEW_PRIVS
assert libc.prctl(22, 2, ctypes.c_char_p(fprog), 0, 0) == 0
print("ready", flush=True)
line = sys.stdin.readline()
ppid = libc.syscall(110)
print(line.strip(), ppid, ctypes.get_errno(), open("/proc/self/status").read().split("Seccomp:")[1].split()[0],
      flush=True)
"""


@pytest.mark.skipif(not ROOT, reason="choosing a pid and reading seccomp filters need root")
def test_a_process_under_seccomp_comes_back_under_its_filter_never_without(tmp_path):
    """A filter that fails getppid with EPERM: the dump (stop-the-world, through ptrace: an agent's calls
    could not be checked) records it, the restore installs it last; getppid still fails. Filters the
    dump could not read are refused, never dropped."""
    want, m = _script_dumped(SECCOMP, str(tmp_path / "img"), pre_dumps=2)
    assert want == b"go -1 1 2\n", want
    assert len(m["rounds"]) == 1 and m["threads"][0]["seccomp"]["mode"] == 2
    run = _Restored(str(tmp_path / "img"))
    with run as restored:
        assert run.go() == want and restored.wait() == 0
    path = tmp_path / "img" / "manifest.json"
    edited = json.loads(path.read_text())
    edited["threads"][0]["seccomp"]["filters"] = None
    path.write_text(json.dumps(edited))
    with pytest.raises(RestoreError, match="its filters could not be read at the dump"):
        restore(str(tmp_path / "img"))
    assert _gone(m["pid"])


EVENTS = r"""
import asyncio, ctypes, os, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)

async def main():
    loop = asyncio.get_running_loop()                       # an epoll, and a socket pair to wake it
    r, w = os.pipe()
    got = loop.create_future()
    loop.add_reader(r, lambda: got.done() or got.set_result(os.read(r, 100)))
    efd = os.eventfd(3, os.EFD_NONBLOCK | os.EFD_SEMAPHORE)
    tfd = libc.timerfd_create(1, os.O_NONBLOCK)             # CLOCK_MONOTONIC, every 20 ms
    libc.timerfd_settime(tfd, 0, ctypes.c_char_p(struct.pack("<qqqq", 0, 20000000, 0, 20000000)), None)
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
    sfd = libc.signalfd(-1, ctypes.c_char_p(struct.pack("<Q", 1 << (signal.SIGUSR1 - 1))), os.O_NONBLOCK)
    line = loop.create_future()
    loop.add_reader(0, lambda: line.done() or line.set_result(os.read(0, 100)))
    print("ready", flush=True)
    said = await line                                       # dumped and restored while waiting here
    loop.call_soon_threadsafe(os.write, w, b"woken")
    woke = await asyncio.wait_for(got, 5)
    counts = []
    for _ in range(4):
        try:
            counts.append(os.eventfd_read(efd))
        except BlockingIOError:
            counts.append("empty")
    time.sleep(0.05)
    ticks = struct.unpack("<Q", os.read(tfd, 8))[0]
    os.kill(os.getpid(), signal.SIGUSR1)
    signo = struct.unpack_from("<I", os.read(sfd, 128))[0]
    await asyncio.sleep(0.01)
    print(said.strip().decode(), woke.decode(), counts, ticks >= 1, signo == signal.SIGUSR1, flush=True)

asyncio.run(main())
"""


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
@pytest.mark.parametrize("lazy", [False, True])
def test_an_asyncio_program_with_eventfd_timerfd_and_signalfd_goes_on(tmp_path, lazy):
    """Python's asyncio waits in epoll (with a socket pair to wake it and a pipe it watches), beside an
    eventfd (semaphore, count 3), a running timerfd and a signalfd: all made again, it goes on."""
    want, m = _script_dumped(EVENTS, str(tmp_path / "img"), pre_dumps=1)
    assert want == b"go woken [1, 1, 1, 'empty'] True True\n", want
    kinds = sorted(f["path"] for f in m["fds"] if f["path"].startswith("anon_inode:"))
    assert kinds == ["anon_inode:[eventfd]", "anon_inode:[eventpoll]", "anon_inode:[signalfd]",
                     "anon_inode:[timerfd]"], kinds
    run = _Restored(str(tmp_path / "img"), lazy=lazy)
    with run as restored:
        assert run.go() == want and restored.wait() == 0


TIMERS = r"""
import ctypes, signal, struct, sys, time
libc = ctypes.CDLL(None, use_errno=True)
ticks = []
signal.signal(signal.SIGUSR1, lambda s, f: ticks.append(s))

def create(signo):
    sigev = struct.pack("<QiiI", 7, signo, 0, 0).ljust(64, b"\0")   # SIGEV_SIGNAL
    tid = ctypes.c_int(-1)
    assert libc.timer_create(1, ctypes.c_char_p(sigev), ctypes.byref(tid)) == 0
    return tid.value

ids = [create(signal.SIGUSR1) for _ in range(3)]
libc.timer_delete(ids[0])                                         # ids 1 and 2 are left: not 0, 1
libc.timer_settime(ids[1], 0, ctypes.c_char_p(struct.pack("<qqqq", 0, 20000000, 0, 20000000)), None)
libc.timer_settime(ids[2], 0, ctypes.c_char_p(struct.pack("<qqqq", 0, 0, 3600, 0)), None)   # in an hour
print("ready", flush=True)
line = sys.stdin.readline()
before = len(ticks)
time.sleep(0.2)
left = ctypes.create_string_buffer(32)
libc.timer_gettime(ids[2], left)
hour = struct.unpack("<qqqq", left.raw)[2]
print(line.strip(), ids[1:], len(ticks) > before, 3000 < hour <= 3600, libc.timer_delete(ids[1]),
      libc.timer_delete(ids[2]), libc.timer_delete(ids[0]), flush=True)
"""


@pytest.mark.skipif(not ROOT, reason="choosing a pid needs CAP_CHECKPOINT_RESTORE")
def test_posix_timers_come_back_with_their_ids_and_times(tmp_path):
    """timer_create timers (ids 1 and 2, 0 deleted): one fires every 20 ms and goes on firing, one is
    an hour away and still is; both can be deleted by their ids (ruby's timer thread deletes its own
    at exit, and crashed when the restore lost it)."""
    want, m = _script_dumped(TIMERS, str(tmp_path / "img"))
    assert want == b"go [1, 2] True True 0 0 -1\n", want
    assert sorted(t["id"] for t in m["posix_timers"]) == [1, 2]
    run = _Restored(str(tmp_path / "img"))
    with run as restored:
        assert run.go() == want and restored.wait() == 0
