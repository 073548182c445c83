"""Restore: a dumped process brought back to life natively, with its pid and tids, memory, threads,
signal state, timers, limits and descriptors.

How: an empty process of ours (the plain stub, made with the recorded pid through clone3's set_tid)
is driven by ptrace. Each call it makes is one `syscall` instruction single-stepped at a helper page
placed where the image has nothing. The stub's own mappings go, the vDSO moves to its recorded
place, the image's mappings and pages come in, then the process-wide state, then one thread per
recorded tid (clone3 from the leader), each with its per-thread state. Last, the leader unmaps the
helper page from a syscall instruction of the restored code, and every thread is let go from a
signal-delivery stop with its recorded registers, FPU state and mask: the kernel's own signal
path then restarts an interrupted call (or runs a pending handler) exactly as it would have in the
original process, so the running code never sees it moved. Everything that can be refused (files
gone or changed, descriptors of kinds not restorable, pids in use, another kernel's vDSO) is
checked before the process is made; a failure later kills the half-made process (and so does
our own death: PTRACE_O_EXITKILL).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import resource
import signal
import socket
import stat
import struct
import threading
from dataclasses import dataclass, field
from typing import Any

from .. import _core, proc
from ..abi import (CLONE_FILES, CLONE_FS, CLONE_SIGHAND, CLONE_SYSVSEM, CLONE_THREAD, CLONE_VM, MAP_ANONYMOUS,
                   MAP_FIXED, MAP_PRIVATE, MAP_SHARED, PAGE, PROT_EXEC, PROT_READ, PROT_WRITE, PTRACE_DETACH,
                   PTRACE_EVENT_STOP, PTRACE_INTERRUPT, PTRACE_SEIZE, PTRACE_SINGLESTEP)
from ..arch import current as current_arch
from ..errors import PvmexecError
from ..proc import mappings, maps_prot
from ..syscalls import name_of, number
from ..vdso import SPECIAL as _SPECIAL
from ..vdso import free_range, move_specials
from . import lazy
from .image import FROM_FILE, ZERO, DumpError, Image
from .state import status_caps

ARCH = current_arch()
_R = ARCH.REG_INDEX

PTRACE_O_TRACECLONE, PTRACE_O_EXITKILL = 0x8, 0x100000
PTRACE_EVENT_CLONE = 3
CLD_TRAPPED, CLD_EXITED, CLD_KILLED, CLD_DUMPED = 4, 1, 2, 3
MAP_GROWSDOWN = 0x100
PR_SET_PDEATHSIG, PR_SET_DUMPABLE, PR_SET_NAME, PR_SET_MM, PR_SET_MM_MAP = 1, 4, 15, 35, 14
AT_FDCWD = -100
_MADVICE = {"hg": 14, "nh": 15, "dd": 16, "dc": 10, "wf": 18}   # VmFlags -> the madvise that sets it
_F_DUPFD_CLOEXEC, _F_SETFL, _F_SETPIPE_SZ = 1030, 4, 1031
_DEVICES = ("/dev/null", "/dev/zero", "/dev/full", "/dev/random", "/dev/urandom")
_PR_CAPBSET_DROP, _PR_SET_KEEPCAPS, _PR_SET_SECUREBITS, _PR_SET_NO_NEW_PRIVS, _PR_CAP_AMBIENT = 24, 8, 28, 38, 47
_PR_CAP_AMBIENT_RAISE = 2
_PR_TIMER_CREATE_RESTORE_IDS = 77
_SECBIT_KEEP_CAPS, _SECBIT_KEEP_CAPS_LOCKED = 1 << 4, 1 << 5
_CAP_VERSION_3 = 0x20080522
_ANON_KINDS = ("anon_inode:[eventfd]", "anon_inode:[timerfd]", "anon_inode:[signalfd]", "anon_inode:[eventpoll]")
_EFD_SEMAPHORE, _EPOLL_CTL_ADD, _TFD_IOC_SET_TICKS = 1, 1, 0x40085400
_OPEN_MASK = ~(os.O_CREAT | os.O_EXCL | os.O_TRUNC | os.O_NOCTTY)
HELPER_PAGES = 8                                             # one of code, the rest data for the calls


class RestoreError(PvmexecError):
    """The image cannot be restored here; the message says what and why (nothing was left running)."""


@dataclass
class Restored:
    """A restored process (our child unless detached): pid, and wait() for its wait status. stopped:
    it was dumped stopped (job control) and is stopped again: SIGCONT continues it."""
    pid: int
    threads: list[int] = field(default_factory=list)
    stopped: bool = False
    init: Any = None                # with pid_ns: the namespace's first process (ours), ended with it
    server: int | None = None       # with lazy: the page server (ours), which exits once all is in

    def wait(self) -> int:
        status = os.waitpid(self.pid, 0)[1]
        if self.server is not None:         # it ends when the process does, if not before
            os.waitpid(self.server, 0)
            self.server = None
        if self.init is not None:           # the namespace goes with the process it was made for
            self.init.kill()
            self.init.wait(10)
            self.init = None
        return status


def restore(directory: str, stdio: tuple[int, int, int] = (0, 1, 2), pid_ns: bool = False,
            lazy: bool = False) -> Restored:
    """Restore the process whose image is in directory; it runs once this returns.

    stdio: the descriptors of this process that the restored one's terminal or pipe descriptors
    0-2 are attached to. pid_ns: in a new pid namespace, where its pid and tids are free whatever
    runs here (Restored.pid is then our name for it; wait() for it ends the namespace). lazy: it
    runs before its anonymous memory is in; a page server of ours (Restored.server) fills each
    page on first touch and the rest in the background, every page checked against the image's
    chunk digests before the process sees it (checkpoint/lazy.py). Raises RestoreError (nothing
    left running) when it cannot.
    """
    try:
        img = Image(directory)
        if not img.manifest.get("complete"):
            img.check()                         # says why it is incomplete
    except DumpError as e:
        raise RestoreError(e.errno, str(e)) from None
    # The checksums are summed while the process is built (hashing runs without the GIL); it is
    # let go only if they match, and killed if not: nothing of a damaged image ever runs.
    checked = _Checksums(img, lazy)
    try:
        plan = _Plan(img, stdio, pid_ns)
        return _Restorer(plan, checked, pid_ns, lazy).run()
    except RestoreError:
        checked.verdict()                       # a damaged image is what to say first
        raise


class _Checksums(threading.Thread):
    """The whole image checked; lazily, only pages.idx and the chunk digests (each chunk is checked
    when a page of it is first used)."""

    def __init__(self, img, lazy=False):
        super().__init__(name="pvmexec-restore-checksums", daemon=True)
        self.img, self.lazy, self.error, self.chunks = img, lazy, None, None
        self.start()

    def run(self):
        try:
            if self.lazy:
                self.chunks = self.img.chunk_sums()
            else:
                self.img.check()
        except (DumpError, OSError) as e:
            self.error = e

    def verdict(self):
        self.join()
        if self.error is not None:
            raise RestoreError(self.error.errno or errno.EIO, str(self.error))


# -- what is restored, checked before anything is made ------------------------------------------

def _is_int(v, lo=0, hi=1 << 64):
    return isinstance(v, int) and not isinstance(v, bool) and lo <= v < hi


def _is_hex(v):
    try:
        bytes.fromhex(v)
        return True
    except (TypeError, ValueError):
        return False


def _check_fields(m):
    """Every field a restore reads, of its type: a hostile or damaged manifest is refused by name."""
    def need(ok, what):
        if not ok:
            raise RestoreError(errno.EINVAL, "the image's %s is malformed" % what)
    for i, t in enumerate(m["threads"]):
        need(isinstance(t, dict) and _is_int(t.get("tid"), 1, 1 << 22) and _is_hex(t.get("regs")) and
             _is_int(t.get("sigmask")) and isinstance(t.get("pending"), list) and
             all(_is_hex(x) and len(x) >= 8 for x in t["pending"]) and (t.get("xstate") is None or _is_hex(t["xstate"])),
             "thread %d" % i)
        for key, fields in (("rseq", ("addr", "size", "signature")), ("robust_list", ("head", "len")),
                            ("sigaltstack", ("sp", "flags", "size"))):
            need(key not in t or isinstance(t[key], dict) and all(_is_int(t[key].get(k), -(1 << 31)) for k in fields),
                 "thread %d's %s" % (i, key))
        need(_is_int(t.get("clear_child_tid", 0)), "thread %d's clear_child_tid" % i)
    need(all(_is_hex(x) and len(x) >= 8 for x in m["shared_pending"]) if isinstance(m["shared_pending"], list)
         else False, "shared_pending")
    for i, f in enumerate(m["fds"]):
        need(isinstance(f, dict) and _is_int(f.get("fd"), 0, 1 << 20) and isinstance(f.get("path"), str) and
             _is_int(f.get("pos"), 0, 1 << 63) and _is_int(f.get("flags"), 0, 1 << 32), "descriptor %d" % i)
    for i, v in enumerate(m["vdso"]):
        need(isinstance(v, dict) and _is_int(v.get("start")) and _is_int(v.get("end")) and
             v.get("path") in _SPECIAL, "vdso entry %d" % i)
    need(isinstance(m["mm"], dict) and all(_is_int(v) for v in m["mm"].values()), "mm")
    need(_is_hex(m["auxv"]) and len(m["auxv"]) <= 2 * 1024, "auxv")
    need(_is_int(m["personality"], 0, 1 << 32), "personality")
    need(_is_int(m.get("umask", 0), 0, 0o1000), "umask")
    need(isinstance(m.get("stopped"), bool), "stopped")
    need(isinstance(m.get("posix_timers"), list) and len(m["posix_timers"]) <= 1 << 16 and all(
        isinstance(t, dict) and _is_int(t.get("id"), 0, 1 << 31) and _is_int(t.get("clockid"), 0, 64) and
        _is_int(t.get("signo"), 0, 65) and _is_int(t.get("sigval")) and _is_int(t.get("notify"), 0, 8) and
        _is_int(t.get("tid"), 0, 1 << 22) and all(isinstance(t.get(k), list) and len(t[k]) == 2 and
                                                all(_is_int(x, 0, 1 << 63) for x in t[k]) for k in ("interval", "value"))
        for t in m["posix_timers"]), "posix_timers")
    need(isinstance(m.get("pipes"), dict) and all(
        isinstance(v, dict) and _is_int(v.get("size"), 0, 1 << 31) and _is_hex(v.get("data")) and
        len(v["data"]) <= 2 * v["size"] for v in m["pipes"].values()), "pipes")
    need(isinstance(m.get("sockets"), dict) and all(
        isinstance(v, dict) and _is_int(v.get("family"), 0, 1 << 16) and (v["family"] != socket.AF_UNIX or (
            _is_int(v.get("type"), 0, 16) and isinstance(v.get("name"), str) and _is_hex(v.get("data")) and
            _is_int(v.get("queued"), 0, 1 << 32) and isinstance(v.get("fds_in_flight"), bool) and
            (v.get("peer") is None or isinstance(v["peer"], str)))) for v in m["sockets"].values()), "sockets")
    c = m.get("creds")
    need(isinstance(c, dict) and all(isinstance(c.get(k), list) and len(c[k]) == 4 and
                                     all(_is_int(x, 0, 1 << 32) for x in c[k]) for k in ("uid", "gid")) and
         isinstance(c.get("groups"), list) and len(c["groups"]) <= 65536 and
         all(_is_int(x, 0, 1 << 32) for x in c["groups"]) and _is_int(c.get("dumpable"), 0, 3) and
         isinstance(c.get("caps"), dict) and set(c["caps"]) == {"inh", "prm", "eff", "bnd", "amb"} and
         all(_is_int(v) for v in c["caps"].values()) and _is_int(c.get("no_new_privs"), 0, 2) and
         _is_int(c.get("seccomp"), 0, 3) and _is_int(c.get("securebits"), 0, 1 << 32), "creds")
    need(all(isinstance(m[k], str) for k in ("cwd", "root", "exe", "comm")), "cwd, root, exe or comm")
    need(all(str(k).isdigit() and 0 < int(k) < 65 and isinstance(a, dict) and
             all(_is_int(a.get(n)) for n in ("handler", "flags", "restorer", "mask"))
             for k, a in m["sigactions"].items()), "sigactions")
    need(isinstance(m["itimers"], dict) and all(isinstance(v, list) and len(v) == 4 and all(_is_int(x, 0, 1 << 62)
                                                                                           for x in v)
                                                for v in m["itimers"].values()), "itimers")
    need(isinstance(m["rlimits"], dict) and all(isinstance(v, list) and len(v) == 2 and
                                                all(_is_int(x, -1, 1 << 64) for x in v)
                                                for v in m["rlimits"].values()), "rlimits")
    for i, mp in enumerate(m["mappings"]):
        need(isinstance(mp.get("vm_flags", ""), str) and len(mp["perms"]) == 4 and
             _is_int(mp["offset"], 0, 1 << 63) and mp["start"] % PAGE == 0 and mp["end"] % PAGE == 0 and
             mp.get("source") in ("memory", "file", "shared-file") and
             (mp["source"] == "memory" or isinstance(mp.get("file"), dict) and
              all(_is_int(mp["file"].get(k)) for k in ("ino", "dev", "size", "mtime_ns"))), "mapping %d" % i)


class _Plan:
    def __init__(self, img, stdio, pid_ns=False):
        m = img.manifest
        _check_fields(m)
        self.our_caps = status_caps(proc.status(os.getpid()))    # (the restored process starts with them)
        self._check_privileges(m["creds"], self.our_caps)
        self._check_seccomp(m)
        self.img, self.m, self.stdio = img, m, stdio
        self.threads = sorted(m["threads"], key=lambda t: t["tid"] != m["pid"])     # the leader first
        if not self.threads or self.threads[0]["tid"] != m["pid"]:
            raise RestoreError(errno.EINVAL, "the image has no thread for its leader (pid %d)" % m["pid"])
        for t in self.threads:
            if len(bytes.fromhex(t["regs"])) != ARCH.REGS_SIZE:
                raise RestoreError(errno.EINVAL, "thread %d's registers are not %s's" % (t["tid"], ARCH.TITLE))
        self.idx = img.raw_index()
        self.mappings = [self._mapping(mp) for mp in m["mappings"]]
        self._check_vdso()
        ends = {}                               # pipe inode -> the access modes of its ends in the image
        for f in m["fds"]:
            if f["path"].startswith("pipe:["):
                ends.setdefault(f["path"], set()).add(f["flags"] & os.O_ACCMODE)
        self.whole_pipes = {p for p, modes in ends.items() if os.O_RDONLY in modes and os.O_WRONLY in modes}
        held = {f["path"][8:-1] for f in m["fds"] if f["path"].startswith("socket:[")}
        self.pairs = {ino for ino in held if m["sockets"].get(ino, {}).get("peer") in held}
        self.fds = [self._fd(f) for f in m["fds"]]
        for name in ("cwd", "root"):
            if not os.path.isdir(m[name]):
                raise RestoreError(errno.ENOENT, "the process's %s %s is not a directory here" % (name, m[name]))
        if not os.path.exists(m["exe"]):
            raise RestoreError(errno.ENOENT, "the program %s is gone" % m["exe"])
        for t in () if pid_ns else self.threads:
            if os.path.exists("/proc/%d" % t["tid"]):
                raise RestoreError(errno.EEXIST, "pid %d is in use (the dumped process still runs? dump it with "
                                   "--kill, or end it, before restoring)" % t["tid"])

    @staticmethod
    def _mapping(mp):
        """How to make mapping mp again: anonymous (the image holds all it held), or the file mapped
        (the image holds the pages the process changed), which must be the very file of the dump."""
        path, perms, flags, how = mp["path"], mp["perms"], mp.get("vm_flags", "").split(), mp["source"]
        where = "mapping %#x-%#x (%s)" % (mp["start"], mp["end"], path or "anonymous")
        if how == "memory":
            kind = "shared-anon" if perms[3] == "s" else "anon"
        else:
            kind = how
            want = mp["file"]
            try:
                st = os.stat(path)
            except OSError as e:
                raise RestoreError(e.errno, "%s: %s" % (where, e.strerror)) from None
            if (st.st_ino, st.st_dev) != (want["ino"], want["dev"]):
                raise RestoreError(errno.ESTALE, "%s: %s is another file than at the dump" % (where, path))
            if (st.st_size, st.st_mtime_ns) != (want["size"], want["mtime_ns"]):
                raise RestoreError(errno.ESTALE, "%s: %s changed since the dump" % (where, path))
        return dict(mp, kind=kind, prot=maps_prot(perms), flags=flags)

    def _check_vdso(self):
        """The image's vDSO must be this kernel's: its code is not in the image, only its place."""
        ours = _own_specials()
        for mp in self.m["vdso"]:
            name = mp["path"]
            if name not in ours or ours[name][1] - ours[name][0] != mp["end"] - mp["start"]:
                raise RestoreError(errno.EINVAL, "the image's %s differs from this kernel's (dumped under "
                                   "another kernel?)" % name)
            if name == "[vdso]":
                lo, hi = ours[name]
                if hashlib.sha256(_core.vm_read(os.getpid(), lo, hi - lo)).hexdigest() != mp.get("sha256"):
                    raise RestoreError(errno.EINVAL, "the image's vDSO is not this kernel's (dumped under "
                                       "another kernel?)")
        self.mappings += [dict(mp, kind="special", perms="", offset=0, prot=0, flags=[]) for mp in self.m["vdso"]]

    def _fd(self, f):
        fd, path, mode = f["fd"], f["path"], f.get("mode", 0)
        what = "fd %d (%s)" % (fd, path)
        if path.startswith("/dev/pts/") or path.startswith("/dev/tty") or path == "/dev/console":
            return dict(f, how="stdio", source=self._stdio_for(fd, what, tty=True))
        if path in self.whole_pipes:            # both ends are the process's: made again, with its data
            if f["flags"] & os.O_ACCMODE == os.O_RDWR:
                raise RestoreError(errno.EOPNOTSUPP, "%s: a pipe opened for reading and writing" % what)
            return dict(f, how="pipe")
        if path in _ANON_KINDS and isinstance(f.get("anon"), dict):
            return self._anon(f, what)
        if path.startswith("socket:[") and path[8:-1] in self.pairs:
            return self._pair_end(f, what, self.m["sockets"][path[8:-1]])
        if (path.startswith("pipe:") or path.startswith("socket:")) and fd <= 2:
            return dict(f, how="stdio", source=self._stdio_for(fd, what, tty=False))
        if path.startswith("socket:["):
            sock = self.m["sockets"].get(path[8:-1])
            raise RestoreError(errno.EOPNOTSUPP, "%s: %s cannot be restored" % (what, (
                "a socket the image does not describe" if sock is None else
                "a socket of address family %s" % sock["family"] if sock["family"] != socket.AF_UNIX else
                "a Unix socket whose peer is not the process's" if sock.get("peer") else
                "a Unix socket without a peer (listening, bound or not connected)")))
        if not path.startswith("/"):
            raise RestoreError(errno.EOPNOTSUPP, "%s: descriptors of this kind cannot be restored" % what)
        try:
            st = os.stat(path)
        except OSError as e:
            raise RestoreError(e.errno, "%s: %s" % (what, e.strerror)) from None
        if stat.S_ISCHR(mode) and path in _DEVICES and st.st_rdev == f.get("rdev", st.st_rdev):
            return dict(f, how="open")
        if stat.S_ISREG(mode) or stat.S_ISDIR(mode):
            if (st.st_dev, st.st_ino) != (f.get("dev"), f.get("ino")):
                raise RestoreError(errno.ESTALE, "%s is another file than at the dump" % what)
            # Appending, or reading a file that grew, goes on as it would have; writing at an offset
            # into a file that changed, or reading past its end, would not.
            writes = f["flags"] & os.O_ACCMODE != os.O_RDONLY and not f["flags"] & os.O_APPEND
            if stat.S_ISREG(mode) and (st.st_size < f["pos"] or writes and st.st_size != f.get("size")):
                raise RestoreError(errno.ESTALE, "%s changed size since the dump (%s -> %d bytes)" % (
                    what, f.get("size"), st.st_size))
            return dict(f, how="open")
        raise RestoreError(errno.EOPNOTSUPP, "%s: descriptors of this kind cannot be restored" % what)

    @staticmethod
    def _check_seccomp(m):
        """A thread under seccomp must come back under the same filters, never without them: refused
        when they could not be read at the dump, in strict mode (nothing of ours could run after it),
        or passing calls to a supervisor (whose listener is not the process's)."""
        from ..engines.target_filters import RET_ACTION_FULL, RET_USER_NOTIF
        if m["creds"]["seccomp"] and any("seccomp" not in t for t in m["threads"]):
            raise RestoreError(errno.EINVAL, "the process ran under seccomp, and the image lacks its filters")
        for t in m["threads"]:
            sc = t.get("seccomp", {"mode": 0})
            what = "thread %d runs under seccomp" % t["tid"]
            if not (isinstance(sc, dict) and sc.get("mode") in (0, 1, 2)):
                raise RestoreError(errno.EINVAL, "thread %d: the image's seccomp record is malformed" % t["tid"])
            if sc["mode"] == 1:
                raise RestoreError(errno.EOPNOTSUPP, "%s in strict mode: not provided" % what)
            if sc["mode"] == 2:
                filters = sc.get("filters")
                if filters is None:
                    raise RestoreError(errno.EOPNOTSUPP, "%s: its filters could not be read at the dump (reading them "
                                       "needs CAP_SYS_ADMIN), and it must not run without them" % what)
                if not (isinstance(filters, list) and filters and all(
                        _is_hex(f) and 0 < len(f) <= 2 * 8 * 3000 and len(f) % 16 == 0 for f in filters)):
                    raise RestoreError(errno.EINVAL, "thread %d: the image's seccomp filters are malformed" % t["tid"])
                for f in filters:
                    raw = bytes.fromhex(f)
                    if any(code & 0x07 == 0x06 and k & RET_ACTION_FULL == RET_USER_NOTIF
                           for code, _jt, _jf, k in struct.iter_unpack("<HBBI", raw)):
                        raise RestoreError(errno.EOPNOTSUPP, "%s with a filter that passes calls to a supervisor "
                                           "(user notification): not provided" % what)

    @staticmethod
    def _check_privileges(c, ours):
        """Never more than it had, never more than we have: a process with capabilities this restorer
        lacks is refused."""
        more = (c["caps"]["bnd"] & ~ours["bnd"]) | ((c["caps"]["prm"] | c["caps"]["amb"]) & ~ours["prm"])
        if more:
            raise RestoreError(errno.EPERM, "the process has capabilities this restore has not (%#x)" % more)

    def _anon(self, f, what):
        """An eventfd, timerfd, signalfd or epoll descriptor, made again from what fdinfo told the dump. An
        epoll's watched descriptors must be the image's same files (by inode); an epoll in an epoll is refused."""
        a, kind = f["anon"], f["path"]
        ok = {"anon_inode:[eventfd]": lambda: _is_int(a.get("count")) and isinstance(a.get("semaphore"), bool),
              "anon_inode:[timerfd]": lambda: _is_int(a.get("clockid"), 0, 16) and _is_int(a.get("ticks")) and all(
                  isinstance(a.get(k), list) and len(a[k]) == 2 and all(_is_int(x, 0, 1 << 63) for x in a[k])
                  for k in ("value", "interval")),
              "anon_inode:[signalfd]": lambda: _is_int(a.get("sigmask")),
              "anon_inode:[eventpoll]": lambda: isinstance(a.get("targets"), list) and all(
                  isinstance(t, dict) and _is_int(t.get("fd"), 0, 1 << 20) and _is_int(t.get("events"), 0, 1 << 32)
                  and _is_int(t.get("data")) and _is_int(t.get("ino")) for t in a["targets"])}[kind]
        if not ok():
            raise RestoreError(errno.EINVAL, "%s: the image's record of it is malformed" % what)
        if kind == "anon_inode:[eventpoll]":
            by_fd = {g["fd"]: g for g in self.m["fds"]}
            for t in a["targets"]:
                watched = by_fd.get(t["fd"])
                if watched is None or watched.get("ino") != t["ino"]:
                    raise RestoreError(errno.EOPNOTSUPP, "%s watches fd %d, which is no longer the file it "
                                       "watched (closed or replaced)" % (what, t["fd"]))
                if watched["path"] == kind:
                    raise RestoreError(errno.EOPNOTSUPP, "%s watches another epoll (fd %d): not provided" % (
                        what, t["fd"]))
        return dict(f, how="epoll" if kind == "anon_inode:[eventpoll]" else "anon")

    @staticmethod
    def _pair_end(f, what, sock):
        if sock["type"] not in (socket.SOCK_STREAM, socket.SOCK_DGRAM, socket.SOCK_SEQPACKET) or sock["name"]:
            raise RestoreError(errno.EOPNOTSUPP, "%s: a Unix socket pair of type %d named %r cannot be restored" % (
                what, sock["type"], sock["name"]))
        if sock["fds_in_flight"]:
            raise RestoreError(errno.EOPNOTSUPP, "%s: a Unix socket with descriptors in flight cannot be "
                               "restored" % what)
        if sock["queued"] and sock["type"] != socket.SOCK_STREAM:
            raise RestoreError(errno.EOPNOTSUPP, "%s: a Unix datagram socket with messages waiting (%d bytes) "
                               "cannot be restored" % (what, sock["queued"]))
        return dict(f, how="socketpair")

    def _stdio_for(self, fd, what, tty):
        """Our descriptor a restored terminal or stdio descriptor is attached to."""
        if fd <= 2 and (not tty or os.isatty(self.stdio[fd])):
            return self.stdio[fd]
        for ours in self.stdio:
            if tty and os.isatty(ours):
                return ours
        if fd <= 2:
            return self.stdio[fd]
        raise RestoreError(errno.ENOTTY, "%s: a terminal, and this restore has none to attach it to" % what)


def plan_pages(plan, how, cut=()):
    """_core.index_plan for the plan's mappings: (runs written now, runs left for later) of the image's
    pages; how: a mapping's kind -> 0 none, 1 its memory, 2 its file's copies, 3 lazily; cut: pages
    always written now."""
    maps = sorted((mp["start"], mp["end"], how.get(mp["kind"], 1)) for mp in plan.mappings)
    try:
        return _core.index_plan(plan.idx, struct.pack("<%dQ" % (3 * len(maps)), *sum(maps, ())),
                                struct.pack("<%dQ" % len(cut), *cut))
    except ValueError as e:
        raise RestoreError(errno.EINVAL, "the image's page index is malformed, or holds a page outside every "
                           "mapping, at %#x" % int(str(e))) from None


def _own_specials():
    return {path: (lo, hi) for lo, hi, path in _maps(os.getpid()) if path in _SPECIAL}


# -- the restore itself ------------------------------------------------------------------------

class _Restorer:
    def __init__(self, plan, checked, pid_ns=False, lazy=False):
        self.p, self.m, self.checked = plan, plan.m, checked
        self.lazy, self.uffd, self.server, self.insn = lazy, None, None, None
        self.ns_pid = self.m["pid"]             # its own name for itself (and the image's tids)
        self.pid = None                         # ours, once made (another in a new pid namespace)
        self.pid_ns, self.init = pid_ns, None
        self.host = {}                          # its tid -> ours
        self.seized = []
        self.helper = 0
        self.mem = None

    def run(self):
        try:
            self._spawn()
            self._build()
            self.checked.verdict()
            tids = self._release()
        except BaseException:
            self._kill()
            raise
        return Restored(self.pid, tids, self.m["stopped"], self.init, self.server)

    # ---- the empty process

    def _spawn(self):
        from ..engines.stub import StubProcess, _wait_until_paused
        exe = os.memfd_create("pvmexec-restore", 0)
        ns = -1
        try:
            os.write(exe, _core.STUB_ELF)
            if self.pid_ns:
                self.init = self._namespace(exe)
                ns = os.open("/proc/%d/ns/pid" % self.init.pid, os.O_RDONLY | os.O_CLOEXEC)
            try:
                pid = _core.spawn_stub(exe, [b"pvmexec-restore", b"plain"], (), 0, False, self.ns_pid, ns)
            except OSError as e:
                if e.errno == errno.EPERM:
                    raise RestoreError(e.errno, "choosing the process's own pid (%d) needs CAP_CHECKPOINT_RESTORE "
                                       "or root" % self.ns_pid) from None
                if e.errno == errno.EEXIST:
                    raise RestoreError(e.errno, "pid %d is in use" % self.ns_pid) from None
                raise RestoreError(e.errno, "clone3 with pid %d: %s" % (self.ns_pid, e.strerror)) from None
        except BaseException:
            self._end_init()
            raise
        finally:
            os.close(exe)
            if ns >= 0:
                os.close(ns)
        self.pid = pid
        self.host[self.ns_pid] = pid
        _wait_until_paused(StubProcess(pid, False))
        _core.ptrace(PTRACE_SEIZE, pid, 0, PTRACE_O_TRACECLONE | PTRACE_O_EXITKILL, "ptrace(PTRACE_SEIZE)")
        self.seized.append(pid)
        _core.ptrace(PTRACE_INTERRUPT, pid, 0, 0, "ptrace(PTRACE_INTERRUPT)")
        self._wait_stop(pid)
        self.start_regs = _core.getregs(pid)
        self.mem = os.open("/proc/%d/mem" % pid, os.O_RDWR | os.O_CLOEXEC)

    def _namespace(self, exe):
        """A new pid namespace: its first process, pid 1 there, is a plain stub of ours (it dies with
        this thread; the restored process's pid is free there, whatever runs here)."""
        from ..abi import CLONE_NEWPID
        from ..engines.stub import StubProcess, _wait_until_paused
        try:
            init = StubProcess(_core.spawn_stub(exe, [b"pvmexec-init", b"plain"], (), CLONE_NEWPID, False), True)
        except OSError as e:
            raise RestoreError(e.errno, "a new pid namespace (clone with CLONE_NEWPID): %s%s" % (
                e.strerror, "; it needs root" if e.errno == errno.EPERM else "")) from None
        try:
            _wait_until_paused(init)
        except BaseException:
            init.kill()
            init.wait(10)
            raise
        return init

    def _end_init(self):
        if self.init is not None:
            self.init.kill()
            self.init.wait(10)
            self.init = None

    def _wait_stop(self, tid):
        got = _core.wait(tid, False, False, 10.0)
        if got is None:
            raise RestoreError(errno.ETIMEDOUT, "thread %d did not stop" % tid)
        code, status = got
        if code != CLD_TRAPPED:
            raise RestoreError(errno.ESRCH, "the restored process ended during the restore (%d/%d)" % (code, status))
        return status

    def _kill(self):
        if self.pid is None:                    # never made (or not ours to kill)
            self._end_init()
            return
        try:
            os.kill(self.pid, signal.SIGKILL)
        except OSError:
            pass
        if self.mem is not None:
            os.close(self.mem)
            self.mem = None
        if self.uffd is not None:
            os.close(self.uffd)
            self.uffd = None
        for tid in self.seized[1:]:             # traced threads' deaths are ours to take, before the leader's
            try:
                _core.wait(tid, True, False)
            except OSError:
                pass
        for pid in (self.pid, self.server):
            try:
                if pid is not None:
                    os.waitpid(pid, 0)          # the server ends with the process it serves
            except ChildProcessError:
                pass
        self._end_init()

    # ---- one syscall in a stopped thread, single-stepped at a syscall instruction

    def call(self, tid, at, name, *args):
        regs = bytearray(_core.getregs(tid))
        vals = list(struct.unpack("<%dQ" % len(ARCH.REG_NAMES), regs))
        vals[_R[ARCH.PC]], vals[_R[ARCH.SYSCALL_NR]], vals[_R[ARCH.SYSCALL_ORIG_NR]] = at, number(name), (1 << 64) - 1
        for reg, a in zip(ARCH.SYSCALL_ARGS, args):
            vals[_R[reg]] = a & 0xFFFFFFFFFFFFFFFF
        _core.setregs(tid, struct.pack("<%dQ" % len(vals), *vals))
        _core.ptrace(PTRACE_SINGLESTEP, tid, 0, 0, "ptrace(PTRACE_SINGLESTEP)")
        while True:
            status = self._wait_stop(tid)
            if status & 0xFF == signal.SIGTRAP and status >> 8 == 0:
                break
            if status >> 8 in (PTRACE_EVENT_CLONE, PTRACE_EVENT_STOP):    # a thread made; a stray stop
                _core.ptrace(PTRACE_SINGLESTEP, tid, 0, 0, "ptrace(PTRACE_SINGLESTEP)")
                continue
            raise RestoreError(errno.EFAULT, "%s in thread %d stopped with signal %d" % (name, tid, status & 0xFF))
        ret = struct.unpack_from("<Q", _core.getregs(tid), 8 * _R[ARCH.SYSCALL_RET])[0]
        return ret - (1 << 64) if ret >= 1 << 63 else ret

    def must(self, tid, at, name, *args):
        ret = self.call(tid, at, name, *args)
        if -4096 < ret < 0:
            raise RestoreError(-ret, "%s in the restored process: %s" % (name, os.strerror(-ret)))
        return ret

    def at_helper(self, name, *args, tid=None):
        return self.must(self.pid if tid is None else tid, self.helper, name, *args)

    def put(self, data, offset=0):
        """Data for a call, in the helper's data pages: returns its address."""
        addr = self.helper + PAGE + offset
        if offset + len(data) > (HELPER_PAGES - 1) * PAGE:
            raise RestoreError(errno.E2BIG, "a call's data does not fit the helper pages")
        os.pwrite(self.mem, data, addr)
        return addr

    def put_str(self, s, offset=0):
        return self.put(os.fsencode(s) + b"\0", offset)

    # ---- memory

    def _build(self):
        pid = self.pid
        _core.setsigmask(pid, _ALL_BUT_KILL_STOP)
        stub_maps = _maps(pid)
        self.helper = _free_range(HELPER_PAGES * PAGE, [(m["start"], m["end"]) for m in self.p.mappings] +
                                  [(lo, hi) for lo, hi, _n in stub_maps])
        start_insn = struct.unpack_from("<Q", self.start_regs, 8 * _R[ARCH.PC])[0] - ARCH.SYSCALL_INSN_LEN
        self.must(pid, start_insn, "mmap", self.helper, HELPER_PAGES * PAGE, PROT_READ | PROT_WRITE,
                  MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0)
        os.pwrite(self.mem, ARCH.SYSCALL_INSN, self.helper)
        self.must(pid, start_insn, "mprotect", self.helper, PAGE, PROT_READ | PROT_EXEC)
        for lo, hi, name in stub_maps:
            if name not in _SPECIAL and name != "[vsyscall]":
                self.at_helper("munmap", lo, hi - lo)
        self._move_specials()
        for mp in self.p.mappings:
            self._map(mp)
        if self.lazy:
            self.checked.verdict()              # the chunk digests (and pages.idx) before any page
        self._plan_pages()
        self._fill()
        for mp in self.p.mappings:
            if mp["kind"] in ("anon", "shared-anon") and not mp["prot"] & PROT_WRITE:
                self.at_helper("mprotect", mp["start"], mp["end"] - mp["start"], mp["prot"])
        self._process_state()
        self._descriptors()
        if self.lazy:
            self._userfaultfd()
        self._threads()
        from ..engines.ptrace import find_syscall_insn
        self.insn = find_syscall_insn(self.pid)     # (read before any page waits for the server)
        if self.lazy:
            try:
                lazy.prepare(self.uffd, self.lazy_ranges)
            except OSError as e:
                raise RestoreError(e.errno or errno.EIO, "lazy restore: registering the process's memory "
                                   "with its userfaultfd: %s" % (e.strerror or e)) from None

    def _move_specials(self):
        ours = {name: (lo, hi) for lo, hi, name in _maps(self.pid) if name in _SPECIAL}
        move_specials(self.at_helper, ours, self.p.mappings, [(self.helper, self.helper + HELPER_PAGES * PAGE)])

    def _map(self, mp):
        kind, start, length = mp["kind"], mp["start"], mp["end"] - mp["start"]
        if kind == "special":
            return
        if kind in ("anon", "shared-anon"):
            flags = (MAP_SHARED if kind == "shared-anon" else MAP_PRIVATE) | MAP_ANONYMOUS | MAP_FIXED
            if "gd" in mp["flags"]:
                flags |= MAP_GROWSDOWN
            self.at_helper("mmap", start, length, mp["prot"] | PROT_WRITE, flags, -1, 0)
        else:
            shared = kind == "shared-file"
            mode = os.O_RDWR if shared and mp["prot"] & PROT_WRITE else os.O_RDONLY
            fd = self.at_helper("openat", AT_FDCWD, self.put_str(mp["path"]), mode | os.O_CLOEXEC, 0)
            try:
                self.at_helper("mmap", start, length, mp["prot"], (MAP_SHARED if shared else MAP_PRIVATE) | MAP_FIXED,
                               fd, mp["offset"])
            finally:
                self.at_helper("close", fd)
        for flag, advice in _MADVICE.items():
            if flag in mp["flags"]:
                self.call(self.pid, self.helper, "madvise", start, length, advice)

    def _plan_pages(self):
        """Which of the image's pages are written now (eager), and which the page server fills (lazy:
        those of private anonymous mappings, but for each thread's rseq area, which the kernel writes
        while the process is made). A shared file mapping's pages are the file's own: never written."""
        how = {"special": 0, "shared-file": 0, "anon": 3 if self.lazy else 1, "shared-anon": 1, "file": 2}
        rseq = sorted({a for t in self.p.threads if t.get("rseq")
                       for a in range(t["rseq"]["addr"] & ~(PAGE - 1), t["rseq"]["addr"] + t["rseq"]["size"], PAGE)})
        now, later = plan_pages(self.p, how, rseq)
        self.eager = list(struct.iter_unpack("<QQQ", now))
        self.lazy_runs = later
        self.lazy_ranges = sorted((mp["start"], mp["end"]) for mp in self.p.mappings if mp["kind"] == "anon")

    def _userfaultfd(self):
        """The process's userfaultfd, made in it (it belongs to the mm that makes it, while the process
        still has our credentials), taken into ours and closed there: never among its descriptors."""
        ret = self.call(self.pid, self.helper, "userfaultfd", os.O_CLOEXEC | os.O_NONBLOCK)
        if -4096 < ret < 0:
            raise RestoreError(-ret, "lazy restore: userfaultfd in the restored process: %s%s" % (
                os.strerror(-ret), " (serving the kernel's own faults needs CAP_SYS_PTRACE or "
                "vm.unprivileged_userfaultfd=1)" if -ret == errno.EPERM else ""))
        pidfd = os.pidfd_open(self.pid)
        try:
            self.uffd = _core.pidfd_getfd(pidfd, ret)
        finally:
            os.close(pidfd)
            self.at_helper("close", ret)

    def _fill(self):
        """The pages written now, through /proc/PID/mem (it writes read-only private pages as a debugger
        does): each stretch of memory in one write of up to 16 MiB, whatever rounds its pages are from."""
        limit = 4096
        pieces = [(addr + k * PAGE, off if off == ZERO else off + k * PAGE, min(limit, n - k))
                  for addr, off, n in self.eager for k in range(0, n, limit)]
        with open(os.path.join(self.p.img.dir, "pages.img"), "rb") as f:
            i = 0
            while i < len(pieces):
                at, total, j = pieces[i][0], 0, i
                while j < len(pieces) and j - i < 1024 and pieces[j][0] == at + total * PAGE and \
                        total + pieces[j][2] <= limit:                  # (IOV_MAX buffers at most)
                    total += pieces[j][2]
                    j += 1
                done = os.pwritev(self.mem, [self._pages(f.fileno(), off, n) for _a, off, n in pieces[i:j]], at)
                if done != total * PAGE:
                    raise RestoreError(errno.EIO, "writing %#x: %d of %d bytes" % (at, done, total * PAGE))
                i = j

    def _pages(self, fd, off, n):
        try:
            data = bytes(n * PAGE) if off == ZERO else self.checked.chunks.read(fd, off, n * PAGE) if self.lazy else \
                os.pread(fd, n * PAGE, off)
        except DumpError as e:
            raise RestoreError(e.errno, str(e)) from None
        if len(data) != n * PAGE:
            raise RestoreError(errno.EIO, "pages.img is short at offset %d" % off)
        return data

    # ---- the process

    def _process_state(self):
        m, h = self.m, self.at_helper
        mm = m["mm"]
        auxv = bytes.fromhex(m["auxv"])
        exe = h("openat", AT_FDCWD, self.put_str(m["exe"]), os.O_RDONLY | os.O_CLOEXEC, 0)
        fields = [mm.get(n, 0) for n in ("start_code", "end_code", "start_data", "end_data", "start_brk", "brk",
                                         "start_stack", "arg_start", "arg_end", "env_start", "env_end")]
        auxv_addr = self.put(auxv, 1024)
        mm_map = struct.pack("<11QQII", *fields, auxv_addr, len(auxv), exe)
        try:
            h("prctl", PR_SET_MM, PR_SET_MM_MAP, self.put(mm_map), len(mm_map), 0)
        finally:
            h("close", exe)
        h("personality", m["personality"])
        if "umask" in m:
            h("umask", m["umask"])
        for sig, a in m["sigactions"].items():
            act = struct.pack("<QQQQ", a["handler"], a["flags"], a["restorer"], a["mask"])
            h("rt_sigaction", int(sig), self.put(act), 0, 8)
        for name, (soft, hard) in m["rlimits"].items():
            which = getattr(resource, name, None)
            if which is not None:
                try:
                    resource.prlimit(self.pid, which, (soft, hard))
                except (PermissionError, ValueError) as e:
                    raise RestoreError(errno.EPERM, "restoring %s %s: %s" % (name, (soft, hard), e)) from None
        h("chdir", self.put_str(m["cwd"]))
        if m["root"] != "/":
            h("chroot", self.put_str(m["root"]))
        h("prctl", PR_SET_PDEATHSIG, 0, 0, 0, 0)
        h("prctl", PR_SET_NAME, self.put_str(m["comm"][:15]), 0, 0, 0)
        if not self.pid_ns:                     # our group has no name in another namespace
            h("setpgid", 0, os.getpgrp())

    def _descriptors(self):
        h = self.at_helper
        for f in self.p.fds:
            if f["how"] in ("pipe", "socketpair", "anon", "epoll"):
                continue                        # after the others: their numbers are then all taken
            fd, flags = f["fd"], f["flags"] & _OPEN_MASK
            got = self._ours(f["source"]) if f["how"] == "stdio" else \
                h("openat", AT_FDCWD, self.put_str(f["path"]), flags, 0)
            if got != fd:
                h("dup3", got, fd, flags & os.O_CLOEXEC)
                h("close", got)
            elif f["how"] == "stdio":           # pidfd_getfd's is close-on-exec
                h("fcntl", fd, fcntl.F_SETFD, fcntl.FD_CLOEXEC if flags & os.O_CLOEXEC else 0)
            if f["how"] == "open" and f["pos"]:
                h("lseek", fd, f["pos"], os.SEEK_SET)
        self._pipes()
        self._socketpairs()
        for how in ("anon", "epoll"):           # epolls last: what they watch is there
            for f in self.p.fds:
                if f["how"] == how:
                    self._make_anon(f)

    def _ours(self, ours):
        """Our descriptor ours, in the process: the same open file (pidfd_getfd in it; a file our
        stdout is redirected to keeps one offset, as a shell's children share it). In a new pid
        namespace, where we have no pid to name, it is opened again through /proc at our offset and
        with our flags."""
        h = self.at_helper
        if not self.pid_ns:
            pidfd = self.call(self.pid, self.helper, "pidfd_open", os.getpid(), 0)
            if pidfd >= 0:
                try:
                    got = self.call(self.pid, self.helper, "pidfd_getfd", pidfd, ours, 0)
                finally:
                    h("close", pidfd)
                if got >= 0:
                    return got
        got = h("openat", AT_FDCWD, self.put_str("/proc/%d/fd/%d" % (os.getpid(), ours)),
                fcntl.fcntl(ours, fcntl.F_GETFL) & _OPEN_MASK | os.O_CLOEXEC, 0)
        try:
            at = os.lseek(ours, 0, os.SEEK_CUR)
        except OSError:
            return got                          # a pipe or a terminal: no offset
        h("lseek", got, at, os.SEEK_SET)
        return got

    def _make_anon(self, f):
        h, a, fd = self.at_helper, f["anon"], f["fd"]
        cloexec, nonblock = f["flags"] & os.O_CLOEXEC, f["flags"] & os.O_NONBLOCK
        kind = f["path"]
        if kind == "anon_inode:[eventfd]":
            got = h("eventfd2", 0, cloexec | nonblock | (_EFD_SEMAPHORE if a["semaphore"] else 0))
            if a["count"]:
                h("write", got, self.put(struct.pack("<Q", a["count"])), 8)
        elif kind == "anon_inode:[signalfd]":
            got = h("signalfd4", -1, self.put(struct.pack("<Q", a["sigmask"])), 8, cloexec | nonblock)
        elif kind == "anon_inode:[timerfd]":
            got = h("timerfd_create", a["clockid"], cloexec | nonblock)
            value, interval = a["value"], a["interval"]
            if not any(value) and any(interval) and a["ticks"]:
                value = interval                # expired, re-armed only when read: next in an interval
            h("timerfd_settime", got, 0, self.put(struct.pack("<4q", *interval, *value)), 0)
            if a["ticks"] and self.call(self.pid, self.helper, "ioctl", got, _TFD_IOC_SET_TICKS,
                                        self.put(struct.pack("<Q", a["ticks"]))) < 0:
                raise RestoreError(errno.EOPNOTSUPP, "fd %d (timerfd): its %d expirations not yet read cannot be "
                                   "set again (TFD_IOC_SET_TICKS)" % (fd, a["ticks"]))
        else:
            got = h("epoll_create1", cloexec)
            for t in a["targets"]:
                h("epoll_ctl", got, _EPOLL_CTL_ADD, t["fd"], self.put(struct.pack("<IQ", t["events"], t["data"])))
        if got != fd:
            h("dup3", got, fd, cloexec)
            h("close", got)

    def _socketpairs(self):
        """Each socket pair whose ends are both in the image: made (socketpair in the process), what
        waited in each end sent again from the other."""
        ends = [f for f in self.p.fds if f["how"] == "socketpair"]
        made = {}
        for ino in sorted({f["path"][8:-1] for f in ends}, key=int):
            if ino in made:
                continue
            sock = self.m["sockets"][ino]
            peer = sock["peer"]
            made[ino], made[peer] = self._pair_above("socketpair", socket.AF_UNIX, sock["type"] | socket.SOCK_CLOEXEC, 0)
            for waits_in, sender in ((ino, made[peer]), (peer, made[ino])):
                self._send_in(sender, bytes.fromhex(self.m["sockets"][waits_in]["data"]), "socket:[%s]" % waits_in)
        self._dup_onto([(made[f["path"][8:-1]], f, os.O_NONBLOCK) for f in ends], made.values())

    def _pipes(self):
        """Each pipe whose ends are all in the image: made, given its size and the data that waited in it."""
        pipes = [f for f in self.p.fds if f["how"] == "pipe"]
        made = {}
        for path in sorted({f["path"] for f in pipes}):
            made[path] = ends = self._pair_above("pipe2", os.O_CLOEXEC)
            want = self.m["pipes"].get(path[6:-1], {})
            if want.get("size"):
                self.at_helper("fcntl", ends[1], _F_SETPIPE_SZ, want["size"])
            self._send_in(ends[1], bytes.fromhex(want.get("data", "")), path)
        self._dup_onto([(made[f["path"]][0 if f["flags"] & os.O_ACCMODE == os.O_RDONLY else 1], f,
                         os.O_NONBLOCK | os.O_DIRECT) for f in pipes], [fd for ends in made.values() for fd in ends])

    def _pair_above(self, name, *args):
        """A pipe2 or socketpair made in the process (the pair's address is the call's last argument
        but the flags), both ends moved above every recorded descriptor number (so that none of them
        lands on one to be restored)."""
        base = max([f["fd"] for f in self.p.fds] + [2]) + 1
        h = self.at_helper
        if name == "pipe2":
            h(name, self.helper + PAGE, *args)
        else:
            h(name, *args, self.helper + PAGE)
        pair = struct.unpack("<ii", os.pread(self.mem, 8, self.helper + PAGE))
        moved = [h("fcntl", fd, _F_DUPFD_CLOEXEC, base) for fd in pair]
        for fd in pair:
            h("close", fd)
        return moved

    def _send_in(self, fd, data, what):
        """data written into the pipe or socket end fd (what names it)."""
        sock = what.startswith("socket")
        for at in range(0, len(data), 16384):
            chunk = data[at:at + 16384]
            addr = self.put(chunk)
            got = self.at_helper("sendto", fd, addr, len(chunk), socket.MSG_DONTWAIT, 0, 0) if sock else \
                self.at_helper("write", fd, addr, len(chunk))
            if got != len(chunk):
                raise RestoreError(errno.EIO, "%s: what waited in it did not go back in" % what)

    def _dup_onto(self, placed, made):
        """Each (end, recorded fd, status flags it keeps) duplicated onto its recorded number with its
        flags; then the ends made go."""
        h = self.at_helper
        for end, f, keep in placed:
            h("dup3", end, f["fd"], f["flags"] & os.O_CLOEXEC)
            h("fcntl", f["fd"], _F_SETFL, f["flags"] & keep)
        for fd in set(made):
            h("close", fd)

    # ---- threads

    def _threads(self):
        flags = CLONE_VM | CLONE_FS | CLONE_FILES | CLONE_SIGHAND | CLONE_THREAD | CLONE_SYSVSEM
        self.tids = [self.pid]
        for t in self.p.threads[1:]:
            want = t["tid"]
            tids = self.put(struct.pack("<i", want), 512)
            args = struct.pack("<10Q", flags, 0, 0, 0, 0, 0, 0, 0, tids, 1)
            got = self.call(self.pid, self.helper, "clone3", self.put(args), len(args))
            if got != want:
                raise RestoreError(-got if got < 0 else errno.EINVAL, "thread %d: clone3 gave %s" % (
                    want, os.strerror(-got) if got < 0 else got))
            tid = proc.host_tid(self.pid, want) if self.pid_ns else want
            if tid is None:
                raise RestoreError(errno.ESRCH, "thread %d is not to be found" % want)
            self.host[want] = tid
            self.seized.append(tid)
            self._wait_stop(tid)
            _core.setsigmask(tid, _ALL_BUT_KILL_STOP)
            self.tids.append(tid)
        for t in self.p.threads:
            self._thread_state(t)
        self._posix_timers()                    # (a timer may signal one of the threads)
        for t in self.p.threads:                # last: with them goes the right to do the rest
            self._credentials(self.host[t["tid"]])
        self.at_helper("prctl", PR_SET_DUMPABLE, self.m["creds"]["dumpable"], 0, 0, 0)
        for sig_info in self.m["shared_pending"]:
            info = bytes.fromhex(sig_info)
            self.at_helper("rt_sigqueueinfo", self.ns_pid, struct.unpack_from("<i", info)[0], self.put(info))
        for which, name in ((0, "real"), (1, "virtual"), (2, "prof")):
            value = self.m["itimers"].get(name)
            if value and any(value):
                if not any(value[2:]):          # expired, its signal pending: the kernel re-arms it when
                    value = value[:2] * 2       # that is delivered, and so does this, an interval on
                self.at_helper("setitimer", which, self.put(struct.pack("<4q", *value)), 0)

    def _seccomp_filters(self):
        """Each thread's seccomp filters, installed in it oldest first, the very last thing before it
        is let go (they apply to our calls too). Each call that is still to come — every install after
        the first, and the one call each thread makes from its own code on its way out — is checked
        first against the filters it will meet (target_filters' BPF interpreter): a filter that would
        refuse one is refused before anything is installed."""
        from ..engines import target_filters as tf
        nr_seccomp, nr_munmap, nr_getpid = number("seccomp"), number("munmap"), number("getpid")
        plans = []
        for t in self.p.threads:
            filters = [bytes.fromhex(f) for f in t["seccomp"].get("filters") or ()][::-1]    # oldest first
            if not filters:
                continue
            tid = self.host[t["tid"]]
            progs = [[struct.unpack_from("<HBBI", f, i) for i in range(0, len(f), 8)] for f in filters]
            last = (nr_munmap, (self.helper, HELPER_PAGES * PAGE)) if tid == self.pid else (nr_getpid, ())
            calls = [(progs[:k], nr_seccomp, self.helper, (1, 0, self.helper + PAGE)) for k in range(1, len(progs))]
            calls.append((progs, last[0], self.insn, last[1]))
            for active, nr, at, args in calls:
                ret = tf.verdict(active, nr, ARCH.AUDIT_ARCH, at + ARCH.SYSCALL_INSN_LEN, args)
                if ret & tf.RET_ACTION_FULL not in (tf.RET_ALLOW, tf.RET_LOG):
                    raise RestoreError(errno.EOPNOTSUPP, "thread %d's seccomp filters would %s the restorer's %s: "
                                       "it cannot be let go under them" % (t["tid"], tf.describe(ret), name_of(nr)))
            plans.append((tid, filters))
        for tid, filters in plans:
            for f in filters:
                fprog = self.put(struct.pack("<HxxxxxxQ", len(f) // 8, self.helper + PAGE + 64))
                self.put(f, 64)
                self.at_helper("seccomp", 1, 0, fprog, tid=tid)       # SECCOMP_SET_MODE_FILTER

    def _posix_timers(self):
        """Each POSIX timer made again with its own id (PR_TIMER_CREATE_RESTORE_IDS: timer_create takes the
        id it is given), its clock and notification, armed with its interval and remaining time."""
        timers = sorted(self.m["posix_timers"], key=lambda t: t["id"])
        if not timers:
            return
        h = self.at_helper
        by_id = self.call(self.pid, self.helper, "prctl", _PR_TIMER_CREATE_RESTORE_IDS, 1, 0, 0, 0) == 0
        if not by_id and [t["id"] for t in timers] != list(range(len(timers))):
            raise RestoreError(errno.EOPNOTSUPP, "POSIX timers %s: this kernel cannot make a timer with a chosen id "
                               "(PR_TIMER_CREATE_RESTORE_IDS, Linux 6.17)" % [t["id"] for t in timers])
        for t in timers:
            sigev = struct.pack("<QiiI", t["sigval"], t["signo"], t["notify"], t["tid"]).ljust(64, b"\0")
            at = self.put(sigev)
            idp = self.put(struct.pack("<i", t["id"]), 128)
            h("timer_create", t["clockid"], at, idp)
            got = struct.unpack("<i", os.pread(self.mem, 4, idp))[0]
            if got != t["id"]:
                raise RestoreError(errno.EINVAL, "POSIX timer %d came back as %d" % (t["id"], got))
            value, interval = t["value"], t["interval"]
            if any(value) or any(interval):
                if not any(value):
                    value = interval            # expired with its signal pending: next in an interval
                h("timer_settime", t["id"], 0, self.put(struct.pack("<4q", *interval, *value), 256), 0)
        if by_id:
            h("prctl", _PR_TIMER_CREATE_RESTORE_IDS, 0, 0, 0, 0)

    def _credentials(self, tid):
        """The thread's ids and capabilities as recorded (each thread has its own: the kernel changes
        only the caller's). While it still has ours: the bounding set cut down, the secure bits, and
        capabilities kept across the change of ids; then its own sets, ambient ones, no_new_privs."""
        c, caps = self.m["creds"], self.m["creds"]["caps"]
        h = lambda name, *a: self.at_helper(name, *a, tid=tid)    # noqa: E731
        ours = self.p.our_caps                          # the restored process's now
        last = max(ours["bnd"].bit_length(), caps["amb"].bit_length())
        for cap in range(last):
            if ours["bnd"] >> cap & 1 and not caps["bnd"] >> cap & 1:
                h("prctl", _PR_CAPBSET_DROP, cap, 0, 0, 0)
        bits = c["securebits"]
        locked = bits & _SECBIT_KEEP_CAPS_LOCKED
        keep = any(c["uid"][:3]) and caps["prm"] and not locked and not bits & _SECBIT_KEEP_CAPS
        if bits or keep:                        # (keep: its capabilities outlive leaving uid 0)
            h("prctl", _PR_SET_SECUREBITS, bits | (_SECBIT_KEEP_CAPS if keep else 0), 0, 0, 0)
        groups = c["groups"]
        h("setgroups", len(groups), self.put(struct.pack("<%dI" % len(groups), *groups), 2048) if groups else 0)
        h("setresgid", *c["gid"][:3])
        h("setresuid", *c["uid"][:3])
        self.call(tid, self.helper, "setfsgid", c["gid"][3])  # answers the old id, never an error
        self.call(tid, self.helper, "setfsuid", c["uid"][3])
        sets = [caps[k] >> shift & 0xFFFFFFFF for shift in (0, 32) for k in ("eff", "prm", "inh")]
        h("capset", self.put(struct.pack("<Ii", _CAP_VERSION_3, 0), 3072), self.put(struct.pack("<6I", *sets), 3088))
        for cap in range(last):
            if caps["amb"] >> cap & 1:
                h("prctl", _PR_CAP_AMBIENT, _PR_CAP_AMBIENT_RAISE, cap, 0, 0)
        if keep:
            h("prctl", _PR_SET_KEEPCAPS, 0, 0, 0, 0)
        if c["no_new_privs"]:
            h("prctl", _PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)

    def _thread_state(self, t):
        tid = self.host[t["tid"]]
        h = lambda name, *a: self.at_helper(name, *a, tid=tid)    # noqa: E731
        rl = t.get("robust_list")
        if rl and rl["head"]:
            h("set_robust_list", rl["head"], rl["len"])
        h("set_tid_address", t.get("clear_child_tid", 0))
        alt = t.get("sigaltstack")
        if alt and not alt["flags"] & 2:                            # SS_DISABLE
            h("sigaltstack", self.put(struct.pack("<Qi4xQ", alt["sp"], alt["flags"] & ~1, alt["size"])), 0)
        rseq = t.get("rseq")
        if rseq:
            h("rseq", rseq["addr"], rseq["size"], 0, rseq["signature"])
        for hexinfo in t["pending"]:
            info = bytes.fromhex(hexinfo)
            h("rt_tgsigqueueinfo", self.ns_pid, t["tid"], struct.unpack_from("<i", info)[0], self.put(info))

    # ---- letting go

    def _release(self):
        """Unmap the helper from the restored code's own syscall instruction, then let each thread go
        from the signal-delivery stop that single-step leaves it in, with its recorded state."""
        insn = self.insn
        self._seccomp_filters()
        for tid in self.tids[1:] + self.tids[:1]:
            if tid == self.pid:
                self.must(tid, insn, "munmap", self.helper, HELPER_PAGES * PAGE)
            else:
                self.must(tid, insn, "getpid")
        os.close(self.mem)
        self.mem = None
        by_tid = {self.host[t["tid"]]: t for t in self.p.threads}
        if self.m["stopped"]:
            os.kill(self.pid, signal.SIGSTOP)   # pending before it is let go: it stops as it was dumped
        if self.lazy:                           # the server takes the only descriptor of the userfaultfd
            self.server = lazy.start(self.uffd, os.path.join(self.p.img.dir, "pages.img"), self.checked.chunks,
                                     self.lazy_runs, self.pid)
            os.close(self.uffd)
            self.uffd = None
        for tid in self.tids[1:] + self.tids[:1]:
            t = by_tid[tid]
            regs = _resumable(bytes.fromhex(t["regs"]))
            xstate = bytes.fromhex(t["xstate"]) if t.get("xstate") else b""
            _core.restore(tid, regs, xstate, t["sigmask"], PTRACE_DETACH, 0)
        return list(self.tids)


_NR_RESTART_SYSCALL = number("restart_syscall")
_ALL_BUT_KILL_STOP = ((1 << 64) - 1) & ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1)))


def _resumable(regs):
    """Registers to let a thread go with from a signal stop. A call the dump interrupted restarts as
    the kernel restarts it; one whose restart needs the kernel's saved state (nanosleep's remaining
    time: -ERESTART_RESTARTBLOCK) restarts from its own arguments, which that state is not in the image."""
    vals = list(struct.unpack("<%dQ" % len(ARCH.REG_NAMES), regs))
    rax, nr = vals[_R[ARCH.SYSCALL_RET]], vals[_R[ARCH.SYSCALL_ORIG_NR]]
    if nr == _NR_RESTART_SYSCALL and (1 << 64) - rax in ARCH.RESTART_CODES:
        # Restarting restart_syscall would run this thread's restart function, which is not the
        # original's (the call and its arguments are gone): the call ends as a signal ends it.
        vals[_R[ARCH.SYSCALL_RET]], vals[_R[ARCH.SYSCALL_ORIG_NR]] = (1 << 64) - errno.EINTR, (1 << 64) - 1
    elif nr < 1 << 63 and rax == (1 << 64) - ARCH.ERESTART_RESTARTBLOCK:
        vals[_R[ARCH.SYSCALL_RET]] = (1 << 64) - ARCH.ERESTARTNOINTR
    return struct.pack("<%dQ" % len(vals), *vals)


def _maps(pid):
    return [(lo, hi, path) for lo, hi, _perms, path in mappings(pid)]


def _free_range(size, busy):
    """A page-aligned range of size bytes meeting none of busy."""
    addr = free_range(size, busy)
    if addr is None:
        raise RestoreError(errno.ENOMEM, "no room for the restorer's helper pages")
    return addr
