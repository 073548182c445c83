"""Live checkpoint: pre-dumps while the target writes, a short-freeze final dump, and a target that never notices."""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from pvmexec import checkpoint as dumpmod
from pvmexec import janitor
from pvmexec.errors import TargetGone

from conftest import Running, compile_victim

VICTIMS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "victims")


@pytest.fixture(scope="module")
def writer_exe(cc, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("writer") / "writer")
    subprocess.run([cc, "-O1", "-pthread", "-o", out, os.path.join(VICTIMS, "writer.c")], check=True,
                   timeout=120)
    return out


@pytest.fixture
def writer(writer_exe, tmp_path):
    backing = tmp_path / "backing"
    backing.write_bytes(bytes(range(256)) * 128)                  # 8 pages for a private file mapping
    procs = []

    def start(seconds):
        p = subprocess.Popen([writer_exe, str(seconds), str(backing)], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                             text=True)
        procs.append(p)
        assert p.stdout.readline() == "ready\n"
        return p
    yield start
    for p in procs:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def _looks(pid):
    """What the target must have again after the dump: descriptors, threads, no uffd write protection."""
    fds = sorted((fd, os.readlink("/proc/%d/fd/%s" % (pid, fd))) for fd in os.listdir("/proc/%d/fd" % pid))
    threads = len(os.listdir("/proc/%d/task" % pid))
    with open("/proc/%d/smaps" % pid) as f:
        uffd_wp = sum(1 for line in f if line.startswith("VmFlags") and " uw" in line)
    with open("/proc/%d/maps" % pid) as f:
        ours = sum(1 for line in f if "pvmexec" in line)
    return fds, threads, uffd_wp, ours


@pytest.mark.parametrize("transfer", ["vmsplice", "readv"])
def test_image_equals_the_frozen_memory_and_the_target_never_notices(writer, tmp_path, transfer):
    p = writer(300)                                     # until we close its stdin
    before = _looks(p.pid)
    with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
        if "[never]" not in f.read():                    # its heap asks for huge pages: check it got them
            with open("/proc/%d/smaps_rollup" % p.pid) as f:
                assert any(l.startswith("AnonHugePages:") and int(l.split()[1]) > 0 for l in f)
    seen = []

    def frozen(pid):
        seen.append(dumpmod.verify(str(tmp_path / "img"), pid, frozen=True))
    rounds = []
    m = dumpmod.dump(p.pid, str(tmp_path / "img"), pre_dumps=3, on_frozen=frozen, transfer=transfer,
                     progress=lambda r, pages, written: rounds.append(pages))
    assert (m["bytes_spliced"] > 0) == (transfer == "vmsplice")
    assert seen == [[]], "the image differs from the frozen process's memory: %s" % seen[0][:5]
    assert len(rounds) == 4 and m["rounds"][-1]["final"]
    assert len(m["threads"]) == 2 and all(t["regs"] and t.get("xstate") for t in m["threads"])
    for t in m["threads"]:                              # asked of each thread itself
        assert t["sigaltstack"]["flags"] == 2 and t["robust_list"]["len"] == 24   # SS_DISABLE; glibc's list
        assert t["clear_child_tid"] != 0                 # glibc sets it for every thread
    assert {mp["path"] for mp in m["mappings"]} >= {"/dev/zero (deleted)", str(tmp_path / "backing")}
    shared = [mp for mp in m["mappings"] if mp["path"] == "/dev/zero (deleted)"]
    assert " sh" in " " + shared[0]["vm_flags"] and any(" hg" in " " + mp["vm_flags"] for mp in m["mappings"])
    assert _looks(p.pid) == before                     # no extra thread, mapping, fd or write protection
    out, _ = p.communicate(timeout=60)                  # closes its stdin: it stops and checks itself
    assert p.returncode == 0 and out.startswith("ok "), out          # its own check of all its pages
    dumpmod.Image(str(tmp_path / "img")).check()
    # every field the image holds is in the published field list, every required one is there
    fields = dumpmod.MANIFEST_FIELDS
    assert set(m) <= set(fields), set(m) - set(fields)
    assert {n for n, (_w, required, _m) in fields.items() if required} <= set(m)


def test_until_converged_then_kill(writer, tmp_path):
    p = writer(300)
    janitor.start()                                     # its pipe is this process's for good
    ours = sorted(os.listdir("/proc/self/fd"))
    m = dumpmod.dump(p.pid, str(tmp_path / "img"), until_converged=True, leave_running=False)
    assert p.wait(10) == -signal.SIGKILL
    now = sorted(os.listdir("/proc/self/fd"))
    assert now == ours, [os.readlink("/proc/self/fd/" + f) for f in now if f not in ours]   # nothing of it kept open
    assert 2 <= len(m["rounds"]) <= 17
    img = dumpmod.Image(str(tmp_path / "img"))
    img.check()
    assert "complete" in img.summary()


def test_bad_input(writer, tmp_path):
    with pytest.raises(TargetGone):
        dumpmod.dump(999999999, str(tmp_path / "none"))
    assert not (tmp_path / "none").exists()             # failed before anything was written: no directory
    (tmp_path / "empty").mkdir()
    with pytest.raises(TargetGone):
        dumpmod.dump(999999999, str(tmp_path / "empty"))
    assert os.listdir(tmp_path / "empty") == []          # the user's (empty) directory stays, empty
    full = tmp_path / "full"
    full.mkdir()
    (full / "x").write_text("x")
    p = writer(300)
    before = _looks(p.pid)
    with pytest.raises(FileExistsError):
        dumpmod.dump(p.pid, str(full))
    assert _looks(p.pid) == before


DISK_FULL = """
import os, resource, signal, sys
from pvmexec import dump
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
resource.setrlimit(resource.RLIMIT_FSIZE, (8 << 20, 8 << 20))
try:
    dump.dump(int(sys.argv[1]), sys.argv[2], pre_dumps=1)
except OSError as e:
    print("failed:", e)
"""


def test_a_full_disk_leaves_an_incomplete_image_and_the_target_as_it_was(writer, tmp_path):
    p = writer(300)
    before = _looks(p.pid)
    got = subprocess.run([sys.executable, "-c", DISK_FULL, str(p.pid), str(tmp_path / "img")], capture_output=True,
                         text=True, timeout=120)
    assert "failed:" in got.stdout and "File too large" in got.stdout, got
    with open(tmp_path / "img" / "manifest.json") as f:
        manifest = json.load(f)
    assert manifest["complete"] is False and "File too large" in manifest["error"]
    with pytest.raises(dumpmod.DumpError, match="incomplete"):
        dumpmod.Image(str(tmp_path / "img")).check()
    time.sleep(0.2)
    assert _looks(p.pid) == before and p.poll() is None


def test_cli_dump_show_and_verify(spawn, tmp_path):
    # Idle, so its memory does not change afterwards: not even the rseq area the kernel rewrites
    # when the thread moves between CPUs (glibc registers none with this tunable).
    v = spawn("sleep", env=dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0"))
    img = str(tmp_path / "img")
    got = subprocess.run([sys.executable, "-m", "pvmexec", "dump", str(v.pid), img, "--pre-dumps", "1"],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "dumped process %d" % v.pid in got.stdout, got
    show = subprocess.run([sys.executable, "-m", "pvmexec", "image", "show", img], capture_output=True, text=True,
                          timeout=60)
    assert "complete" in show.stdout and "round 2 (frozen)" in show.stdout
    check = subprocess.run([sys.executable, "-m", "pvmexec", "image", "verify", img, str(v.pid)],
                           capture_output=True, text=True, timeout=60)
    assert check.returncode == 0 and "matches process %d" % v.pid in check.stdout, check
    assert v.state() in "SR"                            # still running, not left stopped
    shown = json.loads(subprocess.run([sys.executable, "-m", "pvmexec", "image", "show", "--json", img],
                                      capture_output=True, text=True, timeout=60, check=True).stdout)
    regs = shown["threads"][0]["regs"]                  # by name, as crit show decodes them
    assert shown["pid"] == v.pid and int(regs["rip"], 16) and int(regs["rsp"], 16) and "orig_rax" in regs
    img2 = str(tmp_path / "img2")
    got = subprocess.run([sys.executable, "-m", "pvmexec", "dump", "--verify", str(v.pid), img2],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "differs" not in got.stderr and "dumped process" in got.stdout, got


@pytest.mark.skipif(os.geteuid() != 0, reason="drops a capability of root's: needs root")
def test_a_root_dump_without_cap_sys_resource_of_another_users_process(tmp_path):
    """Its resource limits are asked of the process itself: prlimit of another user's process from
    outside needs CAP_SYS_RESOURCE, even as root (containers often drop it)."""
    target = subprocess.Popen(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", "sleep", "60"])
    try:
        time.sleep(0.2)
        got = subprocess.run(["setpriv", "--bounding-set=-sys_resource", "--inh-caps=-sys_resource",
                              sys.executable, "-m", "pvmexec", "dump", str(target.pid), str(tmp_path / "img")],
                             capture_output=True, text=True, timeout=60)
        assert got.returncode == 0 and "Traceback" not in got.stderr, got.stderr
        with open(tmp_path / "img" / "manifest.json") as f:
            m = json.load(f)
        with open("/proc/%d/limits" % target.pid) as f:
            files = next(line for line in f if line.startswith("Max open files")).split()
        assert m["complete"] and m["rlimits"]["RLIMIT_NOFILE"] == [int(files[3]), int(files[4])]
        assert m["creds"]["uid"] == [65534] * 4
    finally:
        target.kill()
        target.wait()


def test_dumps_of_a_churning_target_never_fail(cc, tmp_path):
    """A mapping that changes between reading the maps and the scan is left to the next round, never a
    failure (it was PAGEMAP_SCAN: Operation not permitted, in a few % of dumps)."""
    with Running(compile_victim(cc, tmp_path, "churner")) as target:
        for i in range(40):
            img = str(tmp_path / ("img%d" % i))
            diffs = []
            m = dumpmod.dump(target.pid, img, pre_dumps=3,
                             on_frozen=lambda pid: diffs.extend(dumpmod.verify(img, pid, frozen=True)))
            dumpmod.Image(img).check()
            assert len(m["rounds"]) == 4 and diffs == [], diffs[:5]      # and the image is exact
        status, last = target.finish()
        assert status == 0 and last.startswith("ok ")


def _rss(pid):
    with open("/proc/%d/status" % pid) as f:
        fields = dict(line.split(":", 1) for line in f)
    return {k: int(fields[k].split()[0]) for k in ("RssAnon", "RssFile", "RssShmem")}


def test_a_dump_reads_no_page_the_target_never_used(cc, tmp_path):
    """Memory never touched stays untouched: no page is read into existence (the target's memory use
    stays as it was) and the image holds only what the process holds; it still equals the memory."""
    exe = compile_victim(cc, tmp_path, "idle_memory")
    data = tmp_path / "data"
    with open(data, "wb") as f:
        f.truncate(16 << 20)
    p = subprocess.Popen([exe, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert p.stdout.readline() == "ready\n"
        before = _rss(p.pid)
        seen = []
        m = dumpmod.dump(p.pid, str(tmp_path / "img"), pre_dumps=2,
                         on_frozen=lambda pid: seen.append(dumpmod.verify(str(tmp_path / "img"), pid, frozen=True)))
        after = _rss(p.pid)
        assert seen == [[]]
        assert after["RssAnon"] - before["RssAnon"] < 1024 and after["RssFile"] - before["RssFile"] < 1024
        # Shared memory's holes are found through /proc/PID/map_files, which needs CAP_SYS_ADMIN; without
        # it all of it is read (README, Live checkpoint).
        if os.geteuid() == 0:
            assert after["RssShmem"] - before["RssShmem"] < 1024
            assert m["bytes_written"] < 16 << 20, m["bytes_written"]
        by_path = {mp["path"]: mp for mp in m["mappings"]}
        assert by_path[str(data)]["source"] == "file" and by_path["/dev/zero (deleted)"]["source"] == "memory"
        out, _ = p.communicate(timeout=30)
        assert out == "written 0\n" and p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def test_a_stopped_process_is_dumped_and_stays_stopped(cc, tmp_path):
    """As gcore and CRIU take one: a process stopped by job control is dumped in one frozen round
    (it does not run), the image equals its memory, and it is still stopped afterwards; SIGCONT
    continues it as if nothing happened."""
    exe = compile_victim(cc, tmp_path, "restorable")
    data = tmp_path / "data.txt"
    data.write_bytes(b"abcdefghijkl")
    p = subprocess.Popen([exe, str(data)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    try:
        assert p.stdout.readline().startswith(b"ready")
        os.kill(p.pid, signal.SIGSTOP)
        deadline = time.monotonic() + 10
        while _state(p.pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.01)
        seen = []
        m = dumpmod.dump(p.pid, str(tmp_path / "img"), pre_dumps=2,
                         on_frozen=lambda pid: seen.append(dumpmod.verify(str(tmp_path / "img"), pid, frozen=True)))
        assert m["stopped"] is True and len(m["rounds"]) == 1 and seen == [[]]
        assert len(m["threads"]) == 4 and all(t.get("clear_child_tid") for t in m["threads"])
        time.sleep(0.2)
        assert _state(p.pid) == "T"                                 # still stopped
        with open("/proc/%d/status" % p.pid) as f:
            assert "TracerPid:\t0\n" in f.read()
        os.kill(p.pid, signal.SIGCONT)
        out, _ = p.communicate(b"go\n", timeout=30)
        assert b"got go pid same workers ok" in out and p.returncode == 0
    finally:
        if p.poll() is None:
            p.kill()
        p.wait(10)


def _state(pid):
    with open("/proc/%d/stat" % pid) as f:
        return f.read().rsplit(")", 1)[1].split()[0]


def test_a_mapping_merged_with_one_of_ours_keeps_the_targets_part(spawn):
    """The kernel merges an anonymous mapping of ours (the agent's scratch) with the target's next to
    it: the dump leaves out only our range, never the target's pages around it."""
    from pvmexec.checkpoint.tracking import read_maps
    v = spawn("sleep")
    maps = read_maps(v.pid)
    m = next(x for x in maps if x.path == "[stack]")
    if m.end - m.start < 3 * 4096:
        pytest.fail("the victim's stack is too small for this test: %#x-%#x" % (m.start, m.end))
    ours = (m.start + 4096, m.start + 2 * 4096)
    parts = [(x.start, x.end) for x in read_maps(v.pid, skip=[ours]) if x.path == "[stack]"]
    assert parts == [(m.start, ours[0]), (ours[1], m.end)]
    assert [(x.start, x.end) for x in read_maps(v.pid, skip=[(m.start, m.end)]) if x.path == "[stack]"] == []


def test_verify_of_a_manifest_declaring_terabytes_ends(spawn, tmp_path):
    """A hostile manifest may declare a mapping of 64 TiB: verify looks only at the pages the image has
    or the process holds, so it ends (and says what differs) instead of walking every declared page."""
    v = spawn("sleep", env=dict(os.environ, GLIBC_TUNABLES="glibc.pthread.rseq=0"))
    img = str(tmp_path / "img")
    dumpmod.dump(v.pid, img, pre_dumps=0)
    path = os.path.join(img, "manifest.json")
    with open(path) as f:
        m = json.load(f)
    m["mappings"].append(dict(start=1 << 40, end=(1 << 40) + (64 << 40), perms="rw-s", offset=0, path="",
                              vm_flags="rd wr sh", source="memory"))
    with open(path, "w") as f:
        json.dump(m, f)
    got = subprocess.run([sys.executable, "-m", "pvmexec", "image", "verify", img, str(v.pid)],
                         capture_output=True, text=True, timeout=120)
    assert got.returncode == 0 and "matches process %d" % v.pid in got.stdout, got
