"""The guest's /proc, served from guest state as gVisor's procfs is, and the walk that finds it.

The host's /proc describes the host: the guest never reaches it (files.Policy refuses every
host pseudo-filesystem), except the general files in files.PROC_VISIBLE. What a guest path
names below /proc (its own processes, their descriptors, maps, status...) is made here, as a
stand-in host object the handlers treat like any other: an empty directory for a directory (its
entries are the guest's), a sealed memfd holding the file's text, a symlink with the link's
target. Stand-ins are unlinked as soon as they are opened: nothing stays on the host's disk.

Paths reach /proc by their spelling (/proc/self/status) or through symlinks (/dev/fd ->
/proc/self/fd, /etc/mtab -> ../proc/self/mounts): walk() follows a path's symlinks component by
component inside the policy's root, as the host would, and hands what is below /proc to Proc.
"""
from __future__ import annotations

import errno
import fcntl
import os
import posixpath
import resource
import stat
import tempfile

from .errors import Errno, host_call
from .files import MAX_LINKS, PROC_VISIBLE, PSEUDO_FS_NAMES, OpenFile, ThroughPseudoFs, open_reached, proc_visible
from .task import leader_of

_PID_ENTRIES = ("cgroup", "cmdline", "comm", "cwd", "environ", "exe", "fd", "fdinfo", "limits", "maps",
                "mountinfo", "mounts", "oom_score_adj", "root", "smaps", "stat", "statm", "status", "task")
_DIRS = ("fd", "fdinfo", "task")
_LINKS = ("cwd", "exe", "root")
_GENERAL = tuple(v[len("/proc/"):] for v in PROC_VISIBLE)
_SYSTEM = ("loadavg", "stat")                   # the host's, with the guest's processes in place of the host's
_LIMITS = (("Max cpu time", "seconds"), ("Max file size", "bytes"), ("Max data size", "bytes"),
           ("Max stack size", "bytes"), ("Max core file size", "bytes"), ("Max resident set", "bytes"),
           ("Max processes", "processes"), ("Max open files", "files"), ("Max locked memory", "bytes"),
           ("Max address space", "bytes"), ("Max file locks", "locks"), ("Max pending signals", "signals"),
           ("Max msgqueue size", "bytes"), ("Max nice priority", ""), ("Max realtime priority", ""),
           ("Max realtime timeout", "us"))              # in RLIMIT_* order, 0 to 15


def under_proc(guest):
    """Whether the guest path is the guest's /proc (not one of the host's general files shown as they are)."""
    if guest != "/proc" and not guest.startswith("/proc/"):
        return False
    return not proc_visible(guest)


class Dir:
    path = "/proc"

    def __init__(self, entries):
        self.entries = entries                  # (name, d_type)


class File:
    def __init__(self, text):
        self.data = text.encode("utf-8", "surrogateescape") if isinstance(text, str) else text


class Link:
    def __init__(self, target):
        self.target = target


class FdLink:
    """/proc/PID/fd/N: following it reaches the guest's own open file, not a path."""

    def __init__(self, f):
        self.f = f


def _scratch(make):
    """make(dir) in a fresh private directory; everything made there is removed before returning
    (what make opened stays open)."""
    d = tempfile.mkdtemp(prefix="pvmexec-proc-")
    try:
        return make(d)
    finally:
        for name in os.listdir(d):
            path = os.path.join(d, name)
            os.rmdir(path) if os.path.isdir(path) and not os.path.islink(path) else os.unlink(path)
        os.rmdir(d)


def _made_dir(d):
    os.mkdir(d + "/d", 0o555)
    return os.open(d + "/d", os.O_PATH | os.O_CLOEXEC)


def _made_link(target):
    def make(d):
        os.symlink(target, d + "/l")
        return os.open(d + "/l", os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC)
    return make


def stand_in(node):
    """A host descriptor standing for a node: fstat, readlink and reopening it answer as the node."""
    if isinstance(node, Dir):
        return _scratch(_made_dir)
    if isinstance(node, Link):
        return _scratch(_made_link(node.target))
    fd = os.memfd_create("proc", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        if node.data:
            os.write(fd, node.data)
        os.fchmod(fd, 0o444)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW |
                    fcntl.F_SEAL_WRITE)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _read_host(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return ""


class Proc:
    """The guest's /proc for one kernel (its processes are the kernel's)."""

    def __init__(self, kernel):
        self.kernel = kernel

    # -- lookup --------------------------------------------------------------------------------

    def lookup(self, p, rel):
        """The node for a path below /proc ('' is /proc itself), without following the last symlink;
        ('path', guest_path, rest) when a link in the middle leads out of /proc."""
        parts = [c for c in rel.split("/") if c and c != "."]
        node = self._root(p)
        where = []
        links = 0
        while parts:
            name = parts.pop(0)
            if name == "..":
                where = where[:-1]
                node = self._at(p, where)
                continue
            if not isinstance(node, Dir):
                raise Errno(errno.ENOTDIR)
            if name not in {n for n, _ in node.entries}:
                raise Errno(errno.ENOENT)
            child = self._at(p, where + [name])
            if parts and isinstance(child, (Link, FdLink)):
                links += 1
                if links > MAX_LINKS:
                    raise Errno(errno.ELOOP)
                if isinstance(child, FdLink):
                    raise Errno(errno.ENOTDIR if not child.f.is_dir() else errno.ENOENT)
                if child.target.startswith("/"):
                    if not under_proc(child.target):
                        return ("path", child.target, "/".join(parts))
                    where, node = [], self._root(p)
                    parts = [c for c in child.target[len("/proc"):].split("/") if c] + parts
                    continue
                parts = [c for c in child.target.split("/") if c] + parts
                node = self._at(p, where)
                continue
            where.append(name)
            node = child
        node.path = "/proc" + "".join("/" + w for w in where)
        return node

    def _root(self, p):
        entries = [(".", 4), ("..", 4), ("self", 10), ("thread-self", 10), ("mounts", 10)]
        entries += [(g.split("/")[0], 4 if g == "sys" else 8) for g in _GENERAL + _SYSTEM]
        entries += [(str(pid), 4) for pid in sorted(self._pids())]
        return Dir(entries)

    def _pids(self):
        with self.kernel._cond:
            return [pid for pid, q in self.kernel._procs.items() if not getattr(q, "is_thread", False)]

    def _process(self, pid_text, tid=False):
        if not pid_text.isdigit() or pid_text != str(int(pid_text)):
            raise Errno(errno.ENOENT)
        with self.kernel._cond:
            q = self.kernel._procs.get(int(pid_text))
            if q is None and tid:
                q = self.kernel._procs_by_tid.get(int(pid_text))
        if q is None:
            raise Errno(errno.ENOENT)
        return q

    def _at(self, p, where):
        if not where:
            return self._root(p)
        head = where[0]
        if head == "self":
            return Link(str(leader_of(p).pid)) if len(where) == 1 else self._at(p, [str(leader_of(p).pid)] + where[1:])
        if head == "thread-self":
            target = "%d/task/%d" % (leader_of(p).pid, p.tid)
            return Link(target) if len(where) == 1 else self._at(p, target.split("/") + where[1:])
        if head == "mounts" and len(where) == 1:
            return Link("self/mounts")
        if head in _SYSTEM and len(where) == 1:
            return File(getattr(self, "_system_" + head)())
        if head in {g.split("/")[0] for g in _GENERAL}:
            raise Errno(errno.ENOENT)           # the host's own, opened by the policy (never walked here)
        q = self._process(head)
        return self._in_process(p, q, q, where[1:])

    def _in_process(self, p, q, thread, rest):
        if not rest:
            return Dir([(".", 4), ("..", 4)] + [(n, 4 if n in _DIRS else 10 if n in _LINKS else 8)
                                                for n in _PID_ENTRIES])
        name, rest = rest[0], rest[1:]
        if name not in _PID_ENTRIES:
            raise Errno(errno.ENOENT)
        if name == "task":
            if not rest:
                return Dir([(".", 4), ("..", 4)] + [(str(t), 4) for t in sorted(q.threads)])
            t = q.threads.get(int(rest[0])) if rest[0].isdigit() else None
            if t is None:
                raise Errno(errno.ENOENT)
            return self._in_process(p, q, t, rest[1:])
        if name in ("fd", "fdinfo"):
            fds = dict(q.fds.fds)
            if not rest:
                return Dir([(".", 4), ("..", 4)] + [(str(n), 10 if name == "fd" else 8) for n in sorted(fds)])
            if len(rest) > 1:
                raise Errno(errno.ENOTDIR)
            n = int(rest[0]) if rest[0].isdigit() else -1
            if n not in fds:
                raise Errno(errno.ENOENT)
            f = fds[n][0]
            return FdLink(f) if name == "fd" else File(self._fdinfo(f, fds[n][1]))
        if rest:
            raise Errno(errno.ENOTDIR)
        if name == "cwd":
            return Link(q.cwd)
        if name == "root":
            return Link("/")
        if name == "exe":
            if q.exe is None:
                raise Errno(errno.ENOENT)
            return Link(q.exe)
        return File(getattr(self, "_" + name)(p, q, thread))

    # -- system files ----------------------------------------------------------------------------

    def _guest_tasks(self):
        with self.kernel._cond:
            procs = [q for q in self.kernel._procs.values() if not getattr(q, "is_thread", False)]
            return sum(len(q.threads) or 1 for q in procs), self.kernel._next_pid - 1

    def _system_loadavg(self):
        """The host's load, the guest's tasks: running/total and the last pid given out."""
        tasks, last = self._guest_tasks()
        loads = " ".join(_read_host("/proc/loadavg").split()[:3]) or "0.00 0.00 0.00"
        return "%s 1/%d %d\n" % (loads, tasks, last)

    def _system_stat(self):
        """The host's CPU and interrupt figures; processes, procs_running and procs_blocked the guest's."""
        tasks, last = self._guest_tasks()
        own = {"processes": last - 1, "procs_running": 1, "procs_blocked": 0}
        lines = []
        for line in _read_host("/proc/stat").splitlines():
            key = line.split(" ", 1)[0]
            lines.append("%s %d" % (key, own[key]) if key in own else line)
        return "\n".join(lines) + "\n"

    # -- files ---------------------------------------------------------------------------------

    @staticmethod
    def _host(q, name):
        return _read_host("/proc/%d/%s" % (q.space.pid, name)) if q.space is not None else ""

    def _cmdline(self, p, q, t):
        return self._args(q, 0)

    def _environ(self, p, q, t):
        return self._args(q, 1)

    @staticmethod
    def _args(q, which):
        """argv or envp as the program's memory holds them now (a program that rewrites its argv shows it)."""
        area = getattr(q, "arg_area", None)
        if not area or q.space is None:
            return b""
        lo, hi = (area[0], area[1]) if which == 0 else (area[1], area[2])
        try:
            return q.read(lo, hi - lo)
        except Errno:
            return b""

    def _comm(self, p, q, t):
        return q.comm.decode("utf-8", "replace") + "\n"

    @staticmethod
    def _state(p, q):
        if q.status is not None:
            return "Z", "zombie"
        if leader_of(q).stopped:
            return "T", "stopped"
        return ("R", "running") if leader_of(q) is leader_of(p) else ("S", "sleeping")

    def _stat(self, p, q, t):
        host = self._host(q, "stat")
        fields = host.rsplit(")", 1)[1].split() if ")" in host else ["S"] + ["0"] * 49
        fields[0] = self._state(p, q)[0]
        fields[1:5] = [str(q.ppid), str(q.pgid), str(q.sid), fields[4]]
        tty = int(fields[4]) if fields[4].isdigit() else 0      # tpgid: the guest's, never the host's group
        fields[5] = str(self.kernel.tty_pgrp.get(tty, q.pgid)) if tty else "-1"
        fields[16] = str(q.nice)
        fields[17] = str(len(q.threads))
        return "%d (%s) %s\n" % (t.tid, q.comm.decode("utf-8", "replace"), " ".join(fields))

    def _statm(self, p, q, t):
        return self._host(q, "statm") or "0 0 0 0 0 0 0\n"

    def _status(self, p, q, t):
        host = dict(line.split(":", 1) for line in self._host(q, "status").splitlines() if ":" in line)
        state = self._state(p, q)
        r, e, s = os.getresuid()
        rg, eg, sg = os.getresgid()
        ignored = caught = 0
        for sig, (handler, _flags, _restorer, _mask) in q.sigactions.items():
            if handler == 1:
                ignored |= 1 << (sig - 1)
            elif handler != 0:
                caught |= 1 << (sig - 1)
        pending = sum(1 << (sig - 1) for sig in t.pending)
        lines = ["Name:\t%s" % q.comm.decode("utf-8", "replace"), "Umask:\t%04o" % q.umask,
                 "State:\t%s (%s)" % state, "Tgid:\t%d" % q.pid, "Ngid:\t0", "Pid:\t%d" % t.tid,
                 "PPid:\t%d" % q.ppid, "TracerPid:\t0", "Uid:\t%d\t%d\t%d\t%d" % (r, e, s, e),
                 "Gid:\t%d\t%d\t%d\t%d" % (rg, eg, sg, eg), "FDSize:\t%d" % max(64, q.fds.limit),
                 "Groups:\t%s " % " ".join(map(str, os.getgroups()))]
        for key in ("VmPeak", "VmSize", "VmLck", "VmPin", "VmHWM", "VmRSS", "RssAnon", "RssFile", "RssShmem",
                    "VmData", "VmStk", "VmExe", "VmLib", "VmPTE", "VmSwap"):
            if key in host:
                lines.append("%s:%s" % (key, host[key]))
        lines += ["Threads:\t%d" % len(q.threads), "SigQ:\t0/%d" % resource.getrlimit(11)[0],
                  "SigPnd:\t%016x" % pending, "ShdPnd:\t%016x" % 0, "SigBlk:\t%016x" % t.sigmask,
                  "SigIgn:\t%016x" % ignored, "SigCgt:\t%016x" % caught]
        # The capabilities a native run would have (ours): the stub, in a user namespace of its own, has none.
        ours = dict(line.split(":", 1) for line in _read_host("/proc/self/status").splitlines() if line.startswith("Cap"))
        for key in ("CapInh", "CapPrm", "CapEff", "CapBnd", "CapAmb", "NoNewPrivs", "Cpus_allowed",
                    "Cpus_allowed_list", "Mems_allowed", "Mems_allowed_list", "voluntary_ctxt_switches",
                    "nonvoluntary_ctxt_switches"):
            if key in ours or key in host:
                lines.append("%s:%s" % (key, ours.get(key, host.get(key))))
        return "\n".join(lines) + "\n"

    def _limits(self, p, q, t):
        out = ["%-25s %-20s %-20s %-10s" % ("Limit", "Soft Limit", "Hard Limit", "Units")]
        for res, (title, unit) in enumerate(_LIMITS):
            soft, hard = q.rlimits.get(res) or resource.getrlimit(res)
            show = ["unlimited" if v in (resource.RLIM_INFINITY, 2 ** 64 - 1) else str(v) for v in (soft, hard)]
            out.append("%-25s %-20s %-20s %-10s" % (title, show[0], show[1], unit))
        return "\n".join(out) + "\n"

    def _fdinfo(self, f, cloexec):
        try:
            pos = os.lseek(f.host_fd, 0, os.SEEK_CUR)
        except OSError:
            pos = 0
        try:
            ino = os.fstat(f.host_fd).st_ino
        except OSError:
            ino = 0
        return "pos:\t%d\nflags:\t0%o\nmnt_id:\t0\nino:\t%d\n" % (pos, f.flags | (0o2000000 if cloexec else 0), ino)

    def _maps(self, p, q, t):
        """The process's mappings without the stub's own; file mappings (private copies here) named by the
        file they came from."""
        out = []
        for line in self._host(q, "maps").splitlines():
            fields = line.split(None, 5)
            lo, hi = (int(x, 16) for x in fields[0].split("-"))
            name = fields[5] if len(fields) > 5 else ""
            if name not in ("[vdso]", "[vvar]", "[vvar_vclock]", "[vsyscall]") and (
                    any(lo < e and hi > s for s, e in q.protected) or lo >= 1 << 47):
                continue
            offset, dev, ino = fields[2], fields[3], fields[4]
            for start, end, path, off, st_dev, st_ino, _shared in q.file_maps:
                if start <= lo and hi <= end:
                    offset = "%08x" % (off + lo - start)
                    dev = "%02x:%02x" % (os.major(st_dev), os.minor(st_dev))
                    ino, name = str(st_ino), path
                    break
            else:
                if q.brk_start <= lo and hi <= q.brk_mapped:
                    name = "[heap]"
                elif name.startswith("/"):
                    name = self.kernel.policy.guest_path(name) or ""
            out.append("%s %s %s %s %-9s %s" % (fields[0], fields[1], offset, dev, ino, name))
        return "".join(line.rstrip() + "\n" for line in out)

    def _smaps(self, p, q, t):
        out = []
        for line in self._maps(p, q, t).splitlines():
            lo, hi = (int(x, 16) for x in line.split()[0].split("-"))
            out.append(line + "\nSize:%16d kB\nKernelPageSize:%6d kB\nMMUPageSize:%9d kB\n" % (
                (hi - lo) >> 10, 4, 4))
        return "".join(s + "\n" if not s.endswith("\n") else s for s in out)

    def _mount_rows(self):
        """The host's mounts below the root, by their guest names, without host pseudo-filesystems; and /proc."""
        rows = []
        try:
            with open("/proc/self/mountinfo") as f:
                lines = f.read().splitlines()
        except OSError:
            lines = []
        hidden = ["/proc"]                      # below a host pseudo-filesystem, nothing is the guest's
        for line in lines:
            pre, _, post = line.partition(" - ")
            pf, qf = pre.split(), post.split()
            if len(pf) < 6 or len(qf) < 3:
                continue
            where = self.kernel.policy.guest_path(pf[4].replace("\\040", " "))
            if qf[0] in PSEUDO_FS_NAMES and where is not None:
                hidden.append(where)
            if where is None or qf[0] in PSEUDO_FS_NAMES or any(
                    where == h or where.startswith(h.rstrip("/") + "/") for h in hidden):
                continue
            rows.append((pf[0], pf[1], pf[2], pf[3], where, pf[5], qf[0], qf[1], qf[2]))
        rows.append(("4242", rows[0][0] if rows else "1", "0:4242", "/", "/proc", "rw,nosuid,nodev,noexec,relatime",
                     "proc", "proc", "rw"))
        return rows

    def _mountinfo(self, p, q, t):
        return "".join("%s %s %s %s %s %s - %s %s %s\n" % (r[0], r[1], r[2], r[3], r[4].replace(" ", "\\040"), r[5],
                                                        r[6], r[7], r[8]) for r in self._mount_rows())

    def _mounts(self, p, q, t):
        return "".join("%s %s %s %s 0 0\n" % (r[7], r[4].replace(" ", "\\040"), r[6], r[8])
                       for r in self._mount_rows())

    def _oom_score_adj(self, p, q, t):
        return "0\n"

    def _cgroup(self, p, q, t):
        return "0::/\n"


def walk(kernel, p, guest, follow):
    """Where a guest path leads when its symlinks are followed one by one inside the root: ('proc', rel,
    follow) for the guest's /proc, ('path', canonical guest path) for the host's tree, ('empty', path) for
    the root of a host pseudo-filesystem (/sys, /dev/pts: an empty directory to the guest)."""
    def stop(here, parts, fd, st):
        if under_proc(here) or here == "/proc":
            return ("proc", "/".join([here[len("/proc"):].lstrip("/")] + parts).strip("/"), follow)
        if kernel.policy.on_pseudo_fs(fd):
            if here == "/dev/pts" and len(parts) == 1 and kernel._guest_pty(here + "/" + parts[0]) is not None:
                return ("path", here + "/" + parts[0])          # a pty a guest made
            if not parts and stat.S_ISDIR(st.st_mode):
                return ("empty", here)          # /sys, /dev/pts...: there, but nothing of the host's inside
            raise Errno(errno.ENOENT)             # nothing of the host's pseudo-filesystems, not even its links
        return None
    follow = follow or guest.endswith("/")
    return kernel.policy.resolve(guest, follow, stop)


def reopen_path(fd, flags, wait):
    return open_reached("/proc/self/fd/%d" % fd, (flags & ~(os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW)) | os.O_CLOEXEC,
                        0, wait)


def reopen(kernel, f, flags, wait):
    """open(2) through /proc/PID/fd/N: a new open of the guest's own file (a pipe's other reader, a file
    anew), never more than that descriptor could do to a file outside the writable paths."""
    writing = flags & 3 != os.O_RDONLY or flags & os.O_TRUNC
    if writing and f.regular and not kernel.policy._may_write(kernel.policy._host_path(f.host_fd)):
        if flags & os.O_TRUNC or f.flags & 3 == os.O_RDONLY or flags & 3 == os.O_RDWR and f.flags & 3 != os.O_RDWR:
            raise Errno(errno.EACCES)
    return reopen_path(f.host_fd, flags, wait)


class GuestPaths:
    """Mixed into Sandbox: path lookups that may end in the guest's /proc (self.proc) rather than the host's tree."""

    def _proc_node(self, p, guest, follow):
        """The /proc node a guest path names (following a last symlink if asked), or ('path', guest path)
        when it leads back into the host's tree; None when it never entered /proc."""
        if under_proc(guest):
            rel = guest[len("/proc"):]
        else:
            where = walk(self, p, guest, follow)
            if where[0] == "path" and self._guest_pty(where[1]) is None:
                # Followed to a path of the host's tree without symlinks: that one (a link in a private
                # directory), unless it is the very path that failed.
                return None if where[1] == posixpath.normpath(guest) else where
            if where[0] == "empty":
                return _empty_dir(where[1], self.ptys if where[1] == "/dev/pts" else ())
            if where[0] == "path":
                return where
            rel, follow = where[1], where[2]
        for _ in range(MAX_LINKS):
            node = self.proc.lookup(p, rel)
            if isinstance(node, tuple):
                target = posixpath.join(node[1], node[2]) if node[2] else node[1]
            elif follow and isinstance(node, Link):
                target = posixpath.normpath(posixpath.join(posixpath.dirname(node.path), node.target))
            else:
                return node
            if not under_proc(target):
                where = walk(self, p, target, follow)
                if where[0] == "path":
                    return where
                if where[0] == "empty":
                    return _empty_dir(where[1])
                target = "/proc/" + where[1]
            rel = target[len("/proc"):]
        raise Errno(errno.ELOOP)

    def _lookup(self, p, guest, follow, call):
        """call(guest path) on the host's tree, or the /proc node the path names instead (a pty a guest
        made, on the host's devpts, comes back as an O_PATH descriptor of it)."""
        if self._guest_pty(guest) is not None:
            return _pty_path_fd(self._guest_pty(guest))
        if not under_proc(guest):
            try:
                return call(guest)
            except ThroughPseudoFs:
                node = self._proc_node(p, guest, follow)
                if node is None:
                    raise
        else:
            node = self._proc_node(p, guest, follow)
        if isinstance(node, tuple):
            if self._guest_pty(node[1]) is not None:
                return _pty_path_fd(self._guest_pty(node[1]))
            return call(node[1])
        return node

    def _guest_path_fd(self, p, guest, follow=True, directory=False):
        """An O_PATH-like host descriptor for a guest path (the caller closes it)."""
        node = self._lookup(p, guest, follow, lambda g: self.policy.path_fd(g, follow=follow, directory=directory))
        if isinstance(node, int):
            return node
        if directory and not isinstance(node, Dir) and not (isinstance(node, FdLink) and node.f.is_dir()):
            raise Errno(errno.ENOTDIR)
        if isinstance(node, FdLink):
            return os.dup(node.f.host_fd) if follow else stand_in(Link(node.f.path))
        return stand_in(node)

    def _guest_readlink(self, p, guest):
        """The target of the symlink a guest path names; /proc's own links answer without a stand-in."""
        node = self._lookup(p, guest, False, lambda g: self.policy.path_fd(g, follow=False))
        if isinstance(node, Link):
            return node.target
        if isinstance(node, FdLink):
            return node.f.path
        if not isinstance(node, int):
            raise Errno(errno.EINVAL)                   # a /proc file or directory: no symlink
        try:
            if not stat.S_ISLNK(os.fstat(node).st_mode):
                raise Errno(errno.EINVAL)               # as Linux says of a file that is no symlink
            return host_call(os.readlink, "", dir_fd=node)
        finally:
            os.close(node)

    def _open_guest(self, p, guest, flags, mode):
        """The OpenFile open(2) of a guest path makes (the policy checked on the host's tree)."""
        follow = not flags & os.O_NOFOLLOW

        def wait(pause):
            self._sleep(p, pause)
        node = self._lookup(p, guest, follow, lambda g: (self.policy.open(g, flags, mode, wait), g))
        if isinstance(node, int):                       # a guest's pty, reached by another name
            try:
                return OpenFile(reopen_path(node, flags | os.O_NOCTTY, wait), os.readlink("/proc/self/fd/%d" % node), flags)
            finally:
                os.close(node)
        if isinstance(node, tuple):
            return OpenFile(node[0], node[1].rstrip("/") or "/", flags)
        if isinstance(node, FdLink):
            return OpenFile(reopen(self, node.f, flags, wait), node.f.path, flags)
        if flags & os.O_PATH:
            return OpenFile(stand_in(node), node.path, flags)
        if isinstance(node, Link):
            raise Errno(errno.ELOOP)                        # O_NOFOLLOW on a link
        if flags & os.O_CREAT and flags & os.O_EXCL:
            raise Errno(errno.EEXIST)
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & os.O_TRUNC:
            raise Errno(errno.EISDIR if isinstance(node, Dir) else errno.EACCES)
        if flags & os.O_DIRECTORY and not isinstance(node, Dir):
            raise Errno(errno.ENOTDIR)
        where = stand_in(node)
        try:
            host = os.open("/proc/self/fd/%d" % where, os.O_RDONLY | os.O_CLOEXEC |
                           (os.O_DIRECTORY if isinstance(node, Dir) else 0))
        finally:
            os.close(where)
        f = OpenFile(host, node.path, flags)
        if isinstance(node, Dir):
            path = node.path

            def entries():                              # as of the read: ls lists its own descriptor
                again = self.proc.lookup(p, path[len("/proc"):]) if under_proc(path) or path == "/proc" else node
                return [(name, _inode(path, name), dtype) for name, dtype in getattr(again, "entries", ())]
            f.list_dir = entries
        return f

    def _guest_dir(self, p, guest):
        """chdir's target: the canonical guest path of a directory."""
        node = self._lookup(p, guest, True, lambda g: self.policy.path_fd(g, directory=True))
        if isinstance(node, int):
            try:
                return self._guest_path_of(node)
            finally:
                os.close(node)
        if isinstance(node, FdLink) and node.f.is_dir():
            return node.f.path
        if not isinstance(node, Dir):
            raise Errno(errno.ENOTDIR)
        return node.path



def _pty_path_fd(n):
    try:
        return os.open("/dev/pts/%d" % n, os.O_PATH | os.O_CLOEXEC)
    except OSError as e:
        raise Errno(e.errno or errno.ENOENT) from None


def _empty_dir(path, ptys=()):
    node = Dir([(".", 4), ("..", 4)] + [(str(n), 2) for n in sorted(ptys)])
    node.path = path
    return node


def _inode(path, name):
    """A stable inode number for a /proc entry (Linux's are made up too)."""
    import zlib
    return zlib.crc32(("%s/%s" % (path, name)).encode("utf-8", "surrogateescape")) | 1 << 32
