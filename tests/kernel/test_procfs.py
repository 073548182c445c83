"""The guest's /proc: what ps, bash's process substitution, readlink -f, df and mount read, made from
guest state and compared with a native run where the answer does not depend on the host."""
import os
import re

import pytest

from helpers import *  # noqa: F401,F403


def test_process_substitution_and_dev_fd(tmp_path):
    for script in ("paste <(seq 3) <(seq 4 6)", "diff <(echo a) <(echo b); echo $?",
                   "cat <(echo via /dev/fd) /dev/stdin <<< stdin", "echo to-stderr > /dev/stderr",
                   "echo out > /dev/stdout; echo err 1>&2 2>/dev/fd/1",
                   "exec 5<<< five; cat /dev/fd/5 /proc/self/fd/5",
                   "readlink -f /proc/self/exe; readlink /proc/self/cwd; cd /proc/self && pwd -P | grep -c proc"):
        same_as_native(["bash", "-c", script], cwd=tmp_path)


def test_ps_top_pgrep_see_the_guests_processes(tmp_path):
    script = "sleep 5 & sleep 5 & ps -o pid=,ppid=,stat=,comm=; pgrep -c sleep; top -bn1 | grep -c ' sleep$'; kill %1 %2"
    got = sandboxed(["bash", "-c", script], cwd=tmp_path)
    assert got.returncode == 0, got.stderr
    lines = got.stdout.decode().splitlines()
    rows = [l.split() for l in lines[:-2]]
    pids = {int(r[0]) for r in rows}
    assert [r[3] for r in rows] == ["bash", "sleep", "sleep", "ps"], lines
    assert all(pid < 100 for pid in pids), rows                   # guest pids, none of the host's
    assert rows[1][1] == rows[2][1] == rows[0][0] and rows[3][2].startswith("R")
    assert lines[-2:] == ["2", "2"]


def test_system_files_name_no_host_pid(tmp_path):
    """/proc/loadavg's last pid, /proc/stat's process counts, ns_last_pid and a tpgid are the guest's."""
    script = ("cat /proc/loadavg; grep -E '^(processes|procs_running) ' /proc/stat; "
              "cat /proc/sys/kernel/ns_last_pid 2>/dev/null || echo hidden; cut -d' ' -f8 /proc/self/stat; "
              "grep -c '^cpu' /proc/stat")
    got = sandboxed(["sh", "-c", script], cwd=tmp_path, input=b"")
    assert got.returncode == 0, got.stderr
    lines = got.stdout.decode().splitlines()
    load = lines[0].split()
    assert len(load) == 5 and load[3].startswith("1/") and 1 < int(load[4]) < 10, lines
    assert lines[1] == "processes %d" % int(load[4]) and lines[2] == "procs_running 1"   # grep is the next pid
    assert lines[3] == "hidden" and lines[4] == "-1"                # no terminal: no foreground group
    assert int(lines[5]) == os.cpu_count() + 1                      # the host's CPU lines stay


def test_status_stat_cmdline_environ_fd_and_maps_describe_the_guest(tmp_path):
    code = r"""
import os, sys
me = os.getpid()
status = dict(l.split(":\t", 1) for l in open("/proc/self/status").read().splitlines())
print(status["Pid"] == str(me), status["PPid"] == str(os.getppid()), status["Name"])
stat = open("/proc/%d/stat" % me).read()
print(stat.startswith("%d (python3) R %d " % (me, os.getppid())))
print(open("/proc/self/cmdline", "rb").read().split(b"\0")[-2:])
print(b"MARK=here" in open("/proc/self/environ", "rb").read().split(b"\0"))
fd = os.open("/etc/hostname", os.O_RDONLY)
print(os.readlink("/proc/self/fd/%d" % fd), sorted(os.listdir("/proc/self/fd"))[:3])
print(open("/proc/self/fdinfo/%d" % fd).read().splitlines()[0])
maps = open("/proc/self/maps").read()
print("libc.so" in maps or "libpython" in maps, "/usr/bin" in maps or "python" in maps)
print(os.listdir("/proc/self/task") == [str(me)], open("/proc/thread-self/comm").read().strip())
print(open("/proc/self/limits").read().splitlines()[0].split()[:3])
"""
    env = dict(os.environ, MARK="here")
    got = sandboxed([PYTHON3, "-c", code, "arg1"], "-q", cwd=tmp_path, env=env)
    assert got.returncode == 0, got.stderr
    assert got.stdout.decode().splitlines() == [
        "True True python3", "True", "[b'arg1', b'']", "True", "/etc/hostname ['0', '1', '2']", "pos:\t0",
        "True True", "True python3", "['Limit', 'Soft', 'Limit']"]


def test_mounts_and_df_show_the_guests_tree(tmp_path):
    got = sandboxed(["bash", "-c", "df -P / | tail -1 | cut -d' ' -f1; mount | grep -c ' on /proc type proc';"
                     "cat /etc/mtab | grep -c -E 'sysfs|cgroup|devpts'; findmnt -n -o TARGET / "], cwd=tmp_path)
    native_root = native(["bash", "-c", "df -P / | tail -1 | cut -d' ' -f1"]).stdout
    assert got.stdout.decode().splitlines()[:3] == [native_root.decode().strip(), "1", "0"], got.stderr
    assert got.stdout.decode().splitlines()[3:] == ["/"]


def test_proc_writes_and_other_files_are_refused(tmp_path):
    code = ("import errno, os\n"
            "for path, flags in (('/proc/self/status', os.O_WRONLY), ('/proc/self/fd', os.O_WRONLY),"
            " ('/proc/self/mem', os.O_RDONLY), ('/proc/kcore', os.O_RDONLY), ('/proc/self/nope', os.O_RDONLY)):\n"
            "    try:\n        os.open(path, flags)\n        print('opened', path)\n"
            "    except OSError as e:\n        print(errno.errorcode[e.errno])\n")
    got = sandboxed([PYTHON3, "-c", code], "-q", cwd=tmp_path)
    assert got.stdout.decode().split() == ["EACCES", "EISDIR", "ENOENT", "ENOENT", "ENOENT"], got.stderr


def test_reopening_a_descriptor_through_proc_never_writes_a_read_only_file(tmp_path):
    """/proc/self/fd/N is the guest's own file, with no more rights than its descriptor had."""
    keep = tmp_path / "keep"
    keep.write_text("host data")
    code = ("import os\nfd = os.open(%r, os.O_RDONLY)\n"
            "for flags in (os.O_WRONLY, os.O_RDWR, os.O_WRONLY | os.O_TRUNC):\n"
            "    try:\n        os.open('/proc/self/fd/%%d' %% fd, flags)\n        print('opened')\n"
            "    except OSError as e:\n        print(e.errno)\n"
            "print(open('/dev/fd/%%d' %% fd).read())\n" % str(keep))
    got = sandboxed([PYTHON3, "-c", code], "-q")
    assert got.stdout == b"13\n13\n13\nhost data\n", got.stderr
    assert keep.read_text() == "host data"
