"""Restore into the sandbox: a process dumped running natively goes on under pvmexec's application
kernel (kernel/sandbox.py), in a stub space, with its pid and tids (the kernel's guest ids), its
memory at its recorded addresses, registers, FPU state, signal state, timers and limits, and its
descriptors held by the kernel: from its next instruction on, every call it makes is the kernel's,
under the sandbox's policy and tracing.

The image is checked as for a native restore (restorer._Plan), and then against the sandbox: every
file it maps or holds open must be reachable through the policy as the very file of the dump, its
mappings must miss the stub's own, and what the sandbox does not provide (seccomp filters, other
ids than ours, a root other than /, descriptors of kinds it does not hold) is refused before
anything runs. A call the dump interrupted starts again from its own arguments, as the native
restore restarts it.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import errno
import fcntl
import os
import resource
import signal
import socket
import stat
import struct
import time

from .. import _core
from ..abi import (MAP_ANONYMOUS, MAP_FIXED_NOREPLACE, MAP_PRIVATE, MAP_SHARED, O_LARGEFILE, PAGE, PROT_WRITE,
                   page_up)
from ..arch import current as current_arch
from ..context import SigContext
from ..engines.stub import WINDOW as STUB_WINDOW
from ..errors import PvmexecError
from ..proc import mappings
from ..syscalls import number
from .image import ZERO, DumpError, Image
from ..vdso import SPECIAL as _SPECIAL
from ..vdso import move_specials
from .restorer import _MADVICE, _OPEN_MASK, MAP_GROWSDOWN, RestoreError, _Checksums, _Plan, plan_pages

if TYPE_CHECKING:
    from ..kernel.sandbox import Sandbox

ARCH = current_arch()
_R = ARCH.REG_INDEX
_NR_RESTART_SYSCALL = number("restart_syscall")
_F_SETPIPE_SZ = 1031
_TFD_IOC_SET_TICKS = 0x40085400
_ITIMERS = {"real": 0, "virtual": 1, "prof": 2}
_HOW = {"special": 0, "shared-file": 0, "anon": 1, "shared-anon": 1, "file": 2}   # pages written: none, all, copies


def restore_in_sandbox(directory: str, sandbox: Sandbox | None = None, stdio: tuple[int, int, int] = (0, 1, 2),
                       on_stopped: Callable[[], None] | None = None) -> int:
    """Go on with the process dumped in directory under sandbox's kernel (a new Sandbox() if None);
    returns its wait status once it ends, as Sandbox.run() does. stdio: our descriptors its terminal
    or stdio descriptors 0-2 are attached to. A process dumped stopped (job control) is stopped
    again, and on_stopped() is called once it is made: a SIGCONT through sandbox.host_signal()
    continues it. Raises RestoreError (nothing left running) when it cannot be restored there."""
    if sandbox is None:
        from ..kernel.sandbox import Sandbox
        sandbox = Sandbox()
        try:
            return restore_in_sandbox(directory, sandbox, stdio, on_stopped)
        finally:
            sandbox.policy.close()              # (ours: its root descriptor goes)
    try:
        img = Image(directory)
        if not img.manifest.get("complete"):
            img.check()
    except DumpError as e:
        raise RestoreError(e.errno, str(e)) from None
    checked = _Checksums(img)
    try:
        plan = _Plan(img, stdio, pid_ns=True)          # (its pids are the kernel's: never in use here)
        _check_for_sandbox(plan, sandbox)
    except RestoreError:
        checked.verdict()
        raise
    box = sandbox
    p = box._first_process(plan.m["pid"])
    with box._cond:
        box._next_pid = max([box._next_pid] + [t["tid"] + 1 for t in plan.threads])

    def build():
        from ..kernel.errors import Errno
        try:
            _Builder(box, p, plan).build()
            checked.verdict()               # nothing of a damaged image runs
        except (OSError, PvmexecError, Errno) as e:
            if isinstance(e, RestoreError):
                raise
            why = e.strerror if isinstance(e, OSError) and e.strerror else \
                os.strerror(e.errno) if isinstance(e, Errno) else str(e)
            raise RestoreError(getattr(e, "errno", None) or errno.EIO, "restoring into the sandbox: %s" % why) from None
        for t in p.threads.values():
            if t is not p:
                box._start_thread(t)
        if plan.m["stopped"] and on_stopped is not None:
            on_stopped()
    return box._run_first(p, build)


def _check_for_sandbox(plan, box):
    m = plan.m
    c = m["creds"]
    ours = [os.getuid(), os.geteuid(), os.getgid(), os.getegid()]
    theirs = [c["uid"][0], c["uid"][1], c["gid"][0], c["gid"][1]]
    if theirs != ours:
        raise RestoreError(errno.EPERM, "the process ran with uid/euid/gid/egid %s; in the sandbox it would run "
                           "with ours (%s), which it would notice" % ("/".join(map(str, theirs)),
                                                                      "/".join(map(str, ours))))
    if c["seccomp"] or any(t.get("seccomp", {}).get("mode") for t in m["threads"]):
        raise RestoreError(errno.EOPNOTSUPP, "the process runs under seccomp: its filters are not provided in "
                           "the sandbox (restore it natively)")
    if m["root"] != "/":
        raise RestoreError(errno.EOPNOTSUPP, "the process's root is %s (chroot): not provided in the sandbox" % m["root"])
    for name in ("cwd", "exe"):
        if box.policy.guest_path(m[name]) is None:
            raise RestoreError(errno.EACCES, "the process's %s %s is outside the sandbox's root" % (name, m[name]))


def _resumable(regs):
    """Its registers as it goes on in the sandbox: a call the dump interrupted is made again (the
    instruction before rip, its own arguments), as the kernel's restart does; restart_syscall, whose
    state is not in the image, ends as a signal ends it."""
    vals = list(struct.unpack("<%dQ" % len(ARCH.REG_NAMES), regs))
    rax, nr = vals[_R[ARCH.SYSCALL_RET]], vals[_R[ARCH.SYSCALL_ORIG_NR]]
    if nr < 1 << 63 and (1 << 64) - rax in ARCH.RESTART_CODES:
        if nr == _NR_RESTART_SYSCALL:
            vals[_R[ARCH.SYSCALL_RET]] = (1 << 64) - errno.EINTR
        else:
            vals[_R[ARCH.PC]] -= ARCH.SYSCALL_INSN_LEN
            vals[_R[ARCH.SYSCALL_RET]] = nr
    vals[_R[ARCH.SYSCALL_ORIG_NR]] = (1 << 64) - 1
    return struct.pack("<%dQ" % len(vals), *vals)


class _Builder:
    def __init__(self, box, p, plan):
        self.box, self.p, self.plan, self.m = box, p, plan, plan.m

    def build(self):
        from ..kernel.task import Thread
        box, p, m = self.box, self.p, self.m
        patch = not any(mp["start"] < STUB_WINDOW[1] and mp["end"] > STUB_WINDOW[0] for mp in self.plan.mappings)
        p.space = space = box._new_space(patch, ahead=False)
        p.patch_window = patch
        stub = [(lo, hi, name) for lo, hi, _perms, name in mappings(space.pid)]
        for mp in self.plan.mappings:
            if mp["kind"] == "special":
                continue
            for lo, hi, name in stub:
                if mp["start"] < hi and mp["end"] > lo and name not in _SPECIAL:
                    raise RestoreError(errno.ENOMEM, "mapping %#x-%#x (%s) lies where the sandbox's stub has its own "
                                       "(%#x-%#x): this process cannot go on in the sandbox" % (
                                           mp["start"], mp["end"], mp["path"] or "anonymous", lo, hi))
        specials = move_specials(lambda name, *a: self._call(name, *a), {n: (lo, hi) for lo, hi, n in stub
                                                                            if n in _SPECIAL},
                                 self.plan.mappings, [(lo, hi) for lo, hi, _n in stub])
        # The stub's own, and the vDSO at its new place: the guest may not touch them.
        p.protected = tuple([(lo, hi) for lo, hi, n in stub if n not in _SPECIAL] + list(specials.values()))
        p.specials = specials
        for mp in self.plan.mappings:
            self._map(mp)
        self._fill()
        calls = [("mprotect", (mp["start"], mp["end"] - mp["start"], mp["prot"])) for mp in self.plan.mappings
                 if mp["kind"] in ("anon", "shared-anon", "file") and not mp["prot"] & PROT_WRITE]
        for i in range(0, len(calls), 64):
            for (name, args), ret in zip(calls[i:i + 64], space.syscalls(calls[i:i + 64])):
                if ret:
                    raise RestoreError(-ret, "mprotect of %#x in the stub space: %s" % (args[0], os.strerror(-ret)))
        self._process_state()
        self._descriptors()
        threads = self.plan.threads
        p.ctx = self._context(threads[0])
        self._thread_state(p, threads[0])
        for t in threads[1:]:
            index = space.new_thread()
            th = Thread(p, t["tid"], index)
            th.ctx = self._context(t)
            self._thread_state(th, t)
            with p.thread_lock:
                p.threads[t["tid"]] = th
            with box._cond:
                box._procs_by_tid[t["tid"]] = th
        self._timers()
        for hexinfo in m["shared_pending"]:
            self._pend(p, hexinfo)
        if p.signalfds:
            box._signalfd_ready(p)              # readable if what it reads is pending
        if m["stopped"]:
            box._queue(p, signal.SIGSTOP, struct.pack("<iii", signal.SIGSTOP, 0, 0x80).ljust(128, b"\0"), False)

    def _call(self, name, *args):
        ret = self.p.space.syscall_raw(name, *args)
        if -4096 < ret < 0:
            raise RestoreError(-ret, "%s in the stub space: %s" % (name, os.strerror(-ret)))
        return ret

    # ---- memory

    def _guest(self, host, what):
        guest = self.box.policy.guest_path(host)
        if guest is None:
            raise RestoreError(errno.EACCES, "%s: %s is outside the sandbox's root" % (what, host))
        return guest

    def _open(self, host, flags, what, want=None):
        """A host descriptor of the kernel's for host path, reached through the policy; want: the
        (st_dev, st_ino) it must be."""
        from ..kernel.errors import Errno
        guest = self._guest(host, what)
        try:
            fd = self.box.policy.open(guest, flags, 0)
        except Errno as e:
            raise RestoreError(e.errno, "%s: the sandbox's policy gives no %s of %s (%s)" % (
                what, "writing" if flags & os.O_ACCMODE else "reading", guest, os.strerror(e.errno))) from None
        st = os.fstat(fd)
        if want is not None and (st.st_dev, st.st_ino) != want:
            os.close(fd)
            raise RestoreError(errno.ESTALE, "%s: %s in the sandbox is another file than at the dump" % (what, guest))
        return fd, guest, st

    def _map(self, mp):
        from ..kernel.syscalls.mm import _map_shared_memory, keep_mapped, map_file
        p, kind, start, length = self.p, mp["kind"], mp["start"], mp["end"] - mp["start"]
        if kind == "special":
            return
        what = "mapping %#x-%#x (%s)" % (mp["start"], mp["end"], mp["path"] or "anonymous")
        if kind == "anon":
            flags = MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE | (MAP_GROWSDOWN if "gd" in mp["flags"] else 0)
            if self._call("mmap", start, length, mp["prot"] | PROT_WRITE, flags, -1, 0) != start:
                raise RestoreError(errno.ENOMEM, "%s: not mapped at its address" % what)
        elif kind == "shared-anon":
            _map_shared_memory(p, start, length, mp["prot"] | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS | MAP_FIXED_NOREPLACE)
        else:
            shared = kind == "shared-file"
            want = (mp["file"]["dev"], mp["file"]["ino"])
            fd, guest, st = self._open(mp["path"], os.O_RDWR if shared and mp["prot"] & PROT_WRITE else os.O_RDONLY,
                                       what, want)
            try:
                map_file(p, fd, start, length, mp["prot"] if shared else mp["prot"] | PROT_WRITE,
                         (MAP_SHARED if shared else MAP_PRIVATE) | MAP_FIXED_NOREPLACE, mp["offset"])
                p.file_maps.append((start, mp["end"], guest, mp["offset"], st.st_dev, st.st_ino, shared))
                keep_mapped(p, fd, st)
            finally:
                os.close(fd)
        for flag, advice in _MADVICE.items():
            if flag in mp["flags"]:
                p.space.syscall_raw("madvise", start, length, advice)

    def _fill(self):
        """The image's pages written into the stub space (every mapping is writable until now)."""
        now, _later = plan_pages(self.plan, _HOW)
        space, limit = self.p.space, 4096
        with open(os.path.join(self.plan.img.dir, "pages.img"), "rb") as f:
            for addr, off, n in struct.iter_unpack("<QQQ", now):
                for k in range(0, n, limit):
                    count = min(limit, n - k) * PAGE
                    data = bytes(count) if off == ZERO else os.pread(f.fileno(), count, off + k * PAGE)
                    if len(data) != count:
                        raise RestoreError(errno.EIO, "pages.img is short at offset %d" % (off + k * PAGE))
                    space.write(addr + k * PAGE, data)

    # ---- the process

    def _process_state(self):
        p, m = self.p, self.m
        mm = m["mm"]
        p.brk_start, p.brk_cur = mm.get("start_brk", 0), mm.get("brk", 0)
        p.brk_mapped = page_up(p.brk_cur)
        p.exe = self._guest(m["exe"], "the program")
        p.comm = m["comm"].encode("utf-8", "surrogateescape")[:15]
        p.umask = m.get("umask", p.umask)
        p.arg_area = (mm.get("arg_start", 0), mm.get("arg_end", 0), mm.get("env_end", 0))
        p.cwd = self.box._guest_dir(p, self._guest(m["cwd"], "the working directory"))
        p.sigactions = {int(sig): (a["handler"], a["flags"], a["restorer"], a["mask"])
                        for sig, a in m["sigactions"].items()}
        for name, (soft, hard) in m["rlimits"].items():
            which = getattr(resource, name, None)
            if which is not None and which < 16:
                p.rlimits[which] = (soft & (2 ** 64 - 1), hard & (2 ** 64 - 1))
        if resource.RLIMIT_NOFILE in p.rlimits:
            p.fds.limit = min(p.rlimits[resource.RLIMIT_NOFILE][0], 1 << 20)

    def _context(self, t):
        fp = None
        if t.get("xstate"):
            fp = ARCH.sigframe_xstate(bytes.fromhex(t["xstate"]), _core.xsave_components())
        ctx = SigContext._from_regs(bytearray(_resumable(bytes.fromhex(t["regs"]))), fp)
        try:
            ARCH.validate(ctx._words())
        except PvmexecError as e:
            raise RestoreError(errno.EINVAL, "thread %d's registers: %s" % (t["tid"], e)) from None
        return ctx

    def _thread_state(self, q, t):
        q.sigmask = t["sigmask"] & ~((1 << (signal.SIGKILL - 1)) | (1 << (signal.SIGSTOP - 1)))
        alt = t.get("sigaltstack")
        if alt:
            q.altstack = (alt["sp"], alt["flags"] & ~1, alt["size"])
        q.clear_child_tid = t.get("clear_child_tid", 0)
        rl = t.get("robust_list")
        if rl:
            q.robust_list = (rl["head"], rl["len"])
        for hexinfo in t["pending"]:
            self._pend(q, hexinfo)

    def _pend(self, q, hexinfo):
        info = bytes.fromhex(hexinfo)[:128].ljust(128, b"\0")
        signo = struct.unpack_from("<i", info)[0]
        if 0 < signo < 65:
            q.pending.setdefault(signo, info)
            q.fast_flag[0] = 1

    def _timers(self):
        p, box = self.p, self.box
        now = time.monotonic_ns()
        for name, which in _ITIMERS.items():
            v = self.m["itimers"].get(name)
            if v and any(v):
                interval, value = v[0] * 10 ** 9 + v[1] * 1000, v[2] * 10 ** 9 + v[3] * 1000
                box._itimer(p, which).arm(now + (value or interval), interval)
        from ..kernel.syscalls.timer import _CLOCKS
        for t in self.m["posix_timers"]:
            if t["clockid"] not in _CLOCKS:
                raise RestoreError(errno.EOPNOTSUPP, "POSIX timer %d: clock %d is not provided in the sandbox" % (
                    t["id"], t["clockid"]))
            timer = box.add_posix_timer(p, t["id"], t["clockid"], t["sigval"], t["signo"], t["notify"], t["tid"])
            interval = t["interval"][0] * 10 ** 9 + t["interval"][1]
            value = t["value"][0] * 10 ** 9 + t["value"][1] or interval
            if value:
                timer.arm(time.clock_gettime_ns(timer.clock) + value, interval)

    # ---- descriptors

    def _descriptors(self):
        made = {}                               # a pipe end or socket the image holds -> its OpenFile
        try:
            self._install_all(made)
        except BaseException:
            for of in made.values():
                if not of.refs:
                    of.release()                # made but not yet installed (installed ones go with p)
            raise

    def _install_all(self, made):
        from ..kernel.files import OpenFile
        box, p = self.box, self.p
        # Epolls last: the descriptors they watch are there by then.
        for f in sorted(self.plan.fds, key=lambda f: (f["how"] == "epoll", f["fd"])):
            fd, how, flags = f["fd"], f["how"], f["flags"]
            what = "fd %d (%s)" % (fd, f["path"])
            if how == "stdio":
                host = os.dup(f["source"])
                of = OpenFile(host, box._inherited_name(host, fd), flags & (os.O_ACCMODE | os.O_APPEND))
            elif how == "open":
                of = self._reopen(f, what)
            elif how == "pipe":
                of = self._pipe_end(f, made)
            elif how == "socketpair":
                of = self._pair_end(f, made)
            elif how == "epoll":
                of = self._epoll(f)
            else:
                of = self._anon(f, what)
            try:
                p.fds.install(of, cloexec=flags & os.O_CLOEXEC, at=fd)
            except BaseException:
                if not of.refs and not any(of is m for m in made.values()):
                    of.release()                # (made ones: _descriptors; installed ones go with p)
                raise

    def _anon(self, f, what):
        """An eventfd, timerfd or signalfd, as the kernel's handlers make them (host eventfds and timerfds;
        a signalfd is the kernel's own, over the guest's pending signals)."""
        from ..kernel.files import OpenFile
        from ..kernel.syscalls import hostfd
        from ..kernel.syscalls.signal import _SIGNALFD
        a, kind, nonblock = f["anon"], f["path"], f["flags"] & os.O_NONBLOCK
        if kind == "anon_inode:[eventfd]":
            host = os.eventfd(0, os.O_CLOEXEC | nonblock | (os.EFD_SEMAPHORE if a["semaphore"] else 0))
            if a["count"]:
                os.eventfd_write(host, a["count"])
            return OpenFile(host, kind, os.O_RDWR)
        if kind == "anon_inode:[signalfd]":
            of = OpenFile(os.eventfd(0, os.O_CLOEXEC | os.O_NONBLOCK), _SIGNALFD, os.O_RDONLY | nonblock)
            of.signalfd = a["sigmask"]
            self.p.signalfds.add(of)
            return of
        if a["clockid"] not in (0, 1, 7):
            raise RestoreError(errno.EOPNOTSUPP, "%s: a timerfd on clock %d is not provided in the sandbox" % (
                what, a["clockid"]))
        host = hostfd.timerfd_create(a["clockid"], os.O_CLOEXEC | nonblock)
        of = OpenFile(host, kind, os.O_RDWR)
        value, interval = a["value"], a["interval"]
        if not any(value) and any(interval) and a["ticks"]:
            value = interval                    # expired, re-armed only when read: next in an interval
        hostfd.timerfd_settime(host, 0, struct.pack("<4q", *interval, *value))
        if a["ticks"]:
            try:
                fcntl.ioctl(host, _TFD_IOC_SET_TICKS, struct.pack("<Q", a["ticks"]))
            except OSError:
                of.release()
                raise RestoreError(errno.EOPNOTSUPP, "%s: its %d expirations not yet read cannot be set again "
                                   "(TFD_IOC_SET_TICKS)" % (what, a["ticks"])) from None
        return of

    def _epoll(self, f):
        """An epoll watching the image's descriptors (now the kernel's host ones) with their events and data."""
        from ..kernel.syscalls.poll import _Epoll
        e = _Epoll(f["flags"] & os.O_CLOEXEC)
        try:
            for t in f["anon"]["targets"]:
                host = self.p.fds.get(t["fd"]).host_fd
                e.epoll.register(host, t["events"])
                e.data[host] = t["data"]
        except BaseException:
            e.release()
            raise
        return e

    def _reopen(self, f, what):
        from ..kernel.errors import Errno
        flags = f["flags"] & _OPEN_MASK & ~(os.O_CLOEXEC | O_LARGEFILE)
        guest = self._guest(f["path"], what)
        try:
            of = self.box.open_file(self.p, guest, flags, 0)
        except Errno as e:
            raise RestoreError(e.errno, "%s: the sandbox's policy gives no %s of it (%s)" % (
                what, "writing" if flags & os.O_ACCMODE else "reading", os.strerror(e.errno))) from None
        st = os.fstat(of.host_fd)
        if f.get("ino") is not None and (st.st_dev, st.st_ino) != (f.get("dev"), f["ino"]) and \
                not stat.S_ISCHR(st.st_mode):
            of.release()
            raise RestoreError(errno.ESTALE, "%s: in the sandbox it is another file than at the dump" % what)
        if of.is_dir():
            if f["pos"]:
                of.release()
                raise RestoreError(errno.EOPNOTSUPP, "%s: a directory read part-way: not provided in the sandbox" % what)
        elif f["pos"] and of.regular:
            os.lseek(of.host_fd, f["pos"], os.SEEK_SET)
        return of

    def _pipe_end(self, f, made):
        from ..kernel.files import OpenFile
        mode = f["flags"] & os.O_ACCMODE
        key = (f["path"], mode)
        if key not in made:
            r, w = os.pipe2(os.O_CLOEXEC)
            want = self.m["pipes"].get(f["path"][6:-1], {})
            try:
                if want.get("size"):
                    fcntl.fcntl(w, _F_SETPIPE_SZ, want["size"])
                data = bytes.fromhex(want.get("data", ""))
                if data and os.write(w, data) != len(data):
                    raise RestoreError(errno.EIO, "%s: its data did not go back in" % f["path"])
            except BaseException:
                os.close(r)
                os.close(w)
                raise
            name = "pipe:[%d]" % os.fstat(r).st_ino
            made[(f["path"], os.O_RDONLY)] = OpenFile(r, name, os.O_RDONLY)
            made[(f["path"], os.O_WRONLY)] = OpenFile(w, name, os.O_WRONLY)
        of = made[key]
        os.set_blocking(of.host_fd, not f["flags"] & os.O_NONBLOCK)
        return of

    def _pair_end(self, f, made):
        from ..kernel.syscalls.net import _PAIR_END
        ino = f["path"][8:-1]
        if ino not in made:
            sock = self.m["sockets"][ino]
            a, b = socket.socketpair(socket.AF_UNIX, sock["type"])
            for s, peer in ((a, sock["peer"]), (b, ino)):
                s.setblocking(True)
                data = bytes.fromhex(self.m["sockets"][peer]["data"])   # what waited in the peer came from me
                if data and s.send(data) != len(data):
                    raise RestoreError(errno.EIO, "socket:[%s]: what waited in it did not go back in" % peer)
            made[ino] = self.box.socket_file(self.p, a.detach(), socket.AF_UNIX, sock["type"], 0, _PAIR_END)
            made[sock["peer"]] = self.box.socket_file(self.p, b.detach(), socket.AF_UNIX, sock["type"], 0, _PAIR_END)
        of = made[ino]
        os.set_blocking(of.host_fd, not f["flags"] & os.O_NONBLOCK)
        return of


