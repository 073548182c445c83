"""What the image records besides memory, collected while the target is frozen: one collector per
field group (mappings' flags, each thread, the process). The fields are listed in image.py."""
import errno
import fcntl
import hashlib
import os
import resource
import signal
import socket
import struct

from .. import _core
from ..abi import PR_GET_TID_ADDRESS
from ..arch import current as current_arch
from ..proc import mappings, status
from ..syscalls import number


def vm_flags(pid):
    """start -> the kernel's VmFlags for each mapping (rd wr ex sh gd dd hg ...), from smaps."""
    out, start = {}, None
    with open("/proc/%d/smaps" % pid) as f:
        for line in f:
            if line[0] in "0123456789abcdef" and "-" in line.split(" ", 1)[0]:
                start = int(line.split("-", 1)[0], 16)
            elif line.startswith("VmFlags:") and start is not None:
                out[start] = line.split(":", 1)[1].strip()
    return out


def parent_of(pid):
    try:
        with open("/proc/%d/stat" % pid) as f:
            return int(f.read().rsplit(")", 1)[1].split()[1])
    except (OSError, ValueError):
        return 0


def thread_only(space, engine, tid):
    """What only the thread itself can tell (its alternate signal stack, its clear_child_tid), asked by
    running the call in it (ptrace, it is frozen anyway), and its robust list (asked by the agent)."""
    out = {}
    with space.scratch(64) as mem:
        if engine.syscall_in(tid, number("sigaltstack"), (0, mem)) == 0:
            sp, flags, size = struct.unpack("<Qi4xQ", space.read(mem, 24))
            out["sigaltstack"] = dict(sp=sp, flags=flags, size=size)
        if engine.syscall_in(tid, number("prctl"), (PR_GET_TID_ADDRESS, mem + 32, 0, 0, 0)) == 0:
            out["clear_child_tid"] = struct.unpack("<Q", space.read(mem + 32, 8))[0]
        if space.syscall_raw("get_robust_list", tid, mem + 40, mem + 48) == 0:
            head, length = struct.unpack("<QQ", space.read(mem + 40, 16))
            out["robust_list"] = dict(head=head, len=length)
    return out


def thread_state(tid, asked):
    """One frozen thread: registers, FPU, mask, pending signals, rseq, and what thread_only() asked."""
    t = dict(tid=tid, regs=_core.getregs(tid).hex(), sigmask=_core.getsigmask(tid))
    try:
        t["xstate"] = _core.getregset(tid, current_arch().NT_XSTATE).hex()
    except OSError:
        pass                            # optional: no xstate regset on this CPU
    t["pending"] = [s.hex() for s in _core.peeksiginfo(tid, False, 64)]
    rseq = _core.rseq_config(tid)
    if rseq:
        t["rseq"] = dict(zip(("addr", "size", "signature"), rseq))
    t["seccomp"] = seccomp(tid)
    t.update(asked)
    return t


def seccomp(tid):
    """The thread's seccomp mode, and in filter mode its filters (raw BPF, hex; the most recent first,
    as PTRACE_SECCOMP_GET_FILTER numbers them), or None where they cannot be read (CAP_SYS_ADMIN)."""
    from ..engines.target_filters import thread_mode
    mode, _count = thread_mode(tid, tid)
    out = dict(mode=mode)
    if mode == 2:
        filters = []
        for index in range(4096):
            try:
                filters.append(_core.seccomp_filter(tid, index).hex())
            except OSError as e:
                if e.errno != errno.ENOENT:
                    filters = None
                break
        out["filters"] = filters
    return out


_MM_FIELDS = ("start_code", "end_code", "start_stack", "start_data", "end_data", "start_brk", "arg_start",
              "arg_end", "env_start", "env_end")
_MM_INDEX = (23, 24, 25, 42, 43, 44, 45, 46, 47, 48)  # in /proc/PID/stat after the command: field number - 3


def memory_layout(pid, space):
    """auxv, the mm fields (brk as the process itself answers brk(0): stat does not show it), the
    personality, the program (/proc/PID/exe), its name (comm) and its umask."""
    with open("/proc/%d/auxv" % pid, "rb") as f:
        auxv = f.read().hex()
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    mm = {n: int(fields[i]) for n, i in zip(_MM_FIELDS, _MM_INDEX) if i < len(fields)}
    mm["brk"] = space.syscall_raw("brk", 0)
    with open("/proc/%d/personality" % pid) as f:
        personality = int(f.read(), 16)
    with open("/proc/%d/comm" % pid, "rb") as f:
        comm = f.read().rstrip(b"\n").decode("utf-8", "surrogateescape")
    umask = status(pid).get("Umask", "").strip()
    return dict(auxv=auxv, mm=mm, personality=personality, exe=os.readlink("/proc/%d/exe" % pid), comm=comm,
                vdso=vdso_mappings(pid), **({"umask": int(umask, 8)} if umask else {}))


def vdso_mappings(pid):
    """The kernel's own mappings (vDSO and its data pages): where they are, and a hash of the vDSO's
    code, by which a restore knows whether this kernel's is the same."""
    out = []
    for lo, hi, _perms, path in mappings(pid):
        if path in ("[vdso]", "[vvar]", "[vvar_vclock]"):
            entry = dict(start=lo, end=hi, path=path)
            if path == "[vdso]":
                entry["sha256"] = hashlib.sha256(_core.vm_read(pid, lo, hi - lo)).hexdigest()
            out.append(entry)
    return out


def files(pid, our_fds):
    """cwd, root, rlimits and every descriptor but the dump's own."""
    fds = []
    for fd in sorted(int(x) for x in os.listdir("/proc/%d/fd" % pid)):
        if fd in our_fds:                                        # the dump's own, gone when it ends
            continue
        try:
            target = os.readlink("/proc/%d/fd/%d" % (pid, fd))
            with open("/proc/%d/fdinfo/%d" % (pid, fd)) as f:
                text = f.read()
        except OSError:
            continue
        info = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        entry = dict(fd=fd, path=target, pos=int(info.get("pos", "0")), flags=int(info.get("flags", "0"), 8))
        if target.startswith("anon_inode:"):
            kind = anon_inode(target, info, text)
            if kind is not None:
                entry["anon"] = kind
        try:
            st = os.stat("/proc/%d/fd/%d" % (pid, fd))
            entry.update(mode=st.st_mode, dev=st.st_dev, ino=st.st_ino, size=st.st_size, rdev=st.st_rdev)
        except OSError:
            pass
        fds.append(entry)
    return dict(cwd=os.readlink("/proc/%d/cwd" % pid), root=os.readlink("/proc/%d/root" % pid), fds=fds)


def anon_inode(target, info, text):
    """What /proc/PID/fdinfo tells of an eventfd, timerfd, signalfd or epoll descriptor: enough to make
    it again (None for other kinds)."""
    if target == "anon_inode:[eventfd]":
        return dict(count=int(info["eventfd-count"]), semaphore=info.get("eventfd-semaphore", "0").strip() == "1")
    if target == "anon_inode:[timerfd]":
        def pair(v):
            sec, nsec = v.strip().strip("()").split(",")
            return [int(sec), int(nsec)]
        return dict(clockid=int(info["clockid"]), ticks=int(info["ticks"]), value=pair(info["it_value"]),
                    interval=pair(info["it_interval"]))
    if target == "anon_inode:[signalfd]":
        return dict(sigmask=int(info["sigmask"], 16))
    if target == "anon_inode:[eventpoll]":
        targets = []
        for line in text.splitlines():
            if line.startswith("tfd:"):
                words = line.replace(":", " ").split()
                got = dict(zip(words[0::2], words[1::2]))
                targets.append(dict(fd=int(got["tfd"]), events=int(got["events"], 16), data=int(got["data"], 16),
                                    ino=int(got["ino"], 16)))
        return dict(targets=targets)
    return None


def posix_timers(pid, space):
    """Each POSIX timer (timer_create): its id, clock, how it notifies (/proc/PID/timers) and its
    interval and remaining time (timer_gettime, asked of the process: only it can)."""
    out, timer = [], None
    try:
        with open("/proc/%d/timers" % pid) as f:
            lines = f.read().splitlines()
    except OSError:
        return out
    for line in lines:
        key, _, value = line.partition(":")
        value = value.strip()
        if key == "ID":
            timer = dict(id=int(value))
            out.append(timer)
        elif key == "signal" and timer is not None:
            signo, _, sigval = value.partition("/")
            timer.update(signo=int(signo), sigval=int(sigval, 16))
        elif key == "notify" and timer is not None:
            how, _, who = value.partition("/")
            kind, _, tid = who.partition(".")
            timer.update(notify={"signal": 0, "none": 1, "thread": 2}.get(how, 0) | (4 if kind == "tid" else 0),
                         tid=int(tid or 0))
        elif key == "ClockID" and timer is not None:
            timer["clockid"] = int(value)
    with space.scratch(32) as mem:
        for t in out:
            if space.syscall_raw("timer_gettime", t["id"], mem) == 0:
                interval_s, interval_ns, value_s, value_ns = struct.unpack("<qqqq", space.read(mem, 32))
                t.update(interval=[interval_s, interval_ns], value=[value_s, value_ns])
            else:
                t.update(interval=[0, 0], value=[0, 0])
    return out


def rlimits(space):
    """RLIMIT_* name -> [soft, hard] (-1: unlimited), asked of the process itself: prlimit(2) of another
    user's process from outside needs CAP_SYS_RESOURCE, even as root."""
    out = {}
    with space.scratch(16) as mem:
        for name in sorted(n for n in dir(resource) if n.startswith("RLIMIT_")):
            if space.syscall_raw("prlimit64", 0, getattr(resource, name), 0, mem) == 0:
                out[name] = [-1 if v == (1 << 64) - 1 else v for v in struct.unpack("<QQ", space.read(mem, 16))]
    return out


def signals_and_timers(space):
    """Signal handlers and interval timers: only the process itself can tell (asked through the agent)."""
    sigactions, itimers = {}, {}
    with space.scratch(64) as mem:
        for sig in range(1, 65):
            if sig in (signal.SIGKILL, signal.SIGSTOP):
                continue
            if space.syscall_raw("rt_sigaction", sig, 0, mem, 8) == 0:
                handler, flags, restorer, mask = struct.unpack("<QQQQ", space.read(mem, 32))
                if handler or flags or mask:
                    sigactions[sig] = dict(handler=handler, flags=flags, restorer=restorer, mask=mask)
        for which, name in ((0, "real"), (1, "virtual"), (2, "prof")):
            if space.syscall_raw("getitimer", which, mem) == 0:
                itimers[name] = list(struct.unpack("<qqqq", space.read(mem, 32)))
    return dict(sigactions=sigactions, itimers=itimers)


_F_GETPIPE_SZ = 1032


def pipes(space, fds):
    """ino -> size and contents (hex) of each pipe a read end of which is among fds, copied out of it
    (tee through a duplicate of that end: pidfd_getfd) and left there."""
    out = {}
    for f in fds:
        if not f["path"].startswith("pipe:[") or f["flags"] & os.O_ACCMODE == os.O_WRONLY:
            continue
        ino = f["path"][6:-1]
        if ino in out:
            continue
        ours = _core.pidfd_getfd(space.pidfd, f["fd"])
        try:
            out[ino] = dict(size=fcntl.fcntl(ours, _F_GETPIPE_SZ), data=_core.pipe_peek(ours).hex())
        finally:
            os.close(ours)
    return out


def sockets(space, fds):
    """ino -> what a restore needs of each socket among fds: family; for a Unix socket also type, name,
    peer (its inode, as sock_diag tells), and what waits to be read in it — a stream's bytes (hex),
    peeked through a duplicate (pidfd_getfd) and left there; how many bytes of messages wait in a
    datagram or seqpacket one; whether descriptors are in flight."""
    out = {}
    for f in fds:
        if not f["path"].startswith("socket:[") or f["path"][8:-1] in out:
            continue
        ino = f["path"][8:-1]
        ours = _core.pidfd_getfd(space.pidfd, f["fd"])
        s = socket.socket(fileno=ours)
        try:
            if s.family != socket.AF_UNIX:
                out[ino] = dict(family=int(s.family))
                continue
            name = s.getsockname()
            peer, queued = _unix_diag(int(ino))
            info = dict(family=int(s.family), type=int(s.type), name=name if isinstance(name, str) else name.hex(),
                        peer=peer, queued=queued, data="", fds_in_flight=False)
            if queued and s.type == socket.SOCK_STREAM:
                data, anc, _flags, _addr = s.recvmsg(queued, socket.CMSG_SPACE(253 * 4),
                                                     socket.MSG_PEEK | socket.MSG_DONTWAIT)
                for level, kind, payload in anc:
                    if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                        info["fds_in_flight"] = True
                        for fd in struct.unpack("<%di" % (len(payload) // 4), payload[:len(payload) // 4 * 4]):
                            os.close(fd)        # the peek gave us copies of them
                info["data"] = data.hex()
            out[ino] = info
        finally:
            s.detach()
            os.close(ours)
    return out


def _unix_diag(ino):
    """(peer inode or None, bytes waiting to be read) of Unix socket ino: one NETLINK_SOCK_DIAG request."""
    udiag_show = 0x4 | 0x10                     # UDIAG_SHOW_PEER | UDIAG_SHOW_RQLEN
    req = struct.pack("<BBHIIIII", socket.AF_UNIX, 0, 0, 0xFFFFFFFF, ino, udiag_show, 0xFFFFFFFF, 0xFFFFFFFF)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC, 4) as nl:    # NETLINK_SOCK_DIAG
        nl.sendto(struct.pack("<IHHII", 16 + len(req), 20, 1, 1, 0) + req, (0, 0))   # SOCK_DIAG_BY_FAMILY, NLM_F_REQUEST
        raw = nl.recv(8192)
    length, kind = struct.unpack_from("<IH", raw)
    if kind != 20 or length < 32:               # NLMSG_ERROR: not found (gone meanwhile)
        return None, 0
    peer, queued, at = None, 0, 32
    while at + 4 <= length:
        alen, atype = struct.unpack_from("<HH", raw, at)
        if alen < 4:
            break
        if atype == 2:                          # UNIX_DIAG_PEER
            peer = struct.unpack_from("<I", raw, at + 4)[0] or None
        elif atype == 4:                        # UNIX_DIAG_RQLEN: rqueue, wqueue
            queued = struct.unpack_from("<I", raw, at + 4)[0]
        at += (alen + 3) & ~3
    return (str(peer) if peer else None), queued


def credentials(pid, space):
    """Real, effective, saved and filesystem uids and gids, supplementary groups (/proc/PID/status), and
    whether the process is dumpable (asked of it: a restore that changes its ids must set it back)."""
    fields = status(pid)
    return dict(uid=[int(x) for x in fields["Uid"].split()], gid=[int(x) for x in fields["Gid"].split()],
                groups=[int(x) for x in fields["Groups"].split()], dumpable=space.syscall_raw("prctl", 3, 0, 0, 0, 0),
                caps=status_caps(fields), no_new_privs=int(fields.get("NoNewPrivs", "0")),
                seccomp=int(fields.get("Seccomp", "0")),
                securebits=space.syscall_raw("prctl", 27, 0, 0, 0, 0))      # PR_GET_SECUREBITS


def status_caps(fields):
    """The capability sets of a /proc/PID/status: inheritable, permitted, effective, bounding, ambient."""
    return {k: int(fields.get("Cap" + n, "0").strip(), 16) for k, n in
            (("inh", "Inh"), ("prm", "Prm"), ("eff", "Eff"), ("bnd", "Bnd"), ("amb", "Amb"))}


def process_state(pid, space, engine, our_fds, asked):
    """Everything but memory, while frozen: per thread (asked: thread_only() per tid) and per process."""
    state = dict(threads=[thread_state(tid, asked.get(tid, {})) for tid in sorted(engine.frozen_tids())])
    state["shared_pending"] = [s.hex() for s in _core.peeksiginfo(pid, True, 64)]
    state.update(memory_layout(pid, space))
    state.update(files(pid, our_fds))
    state.update(signals_and_timers(space))
    state["posix_timers"] = posix_timers(pid, space)
    state["creds"] = credentials(pid, space)
    state["pipes"] = pipes(space, state["fds"])
    state["sockets"] = sockets(space, state["fds"])
    state["rlimits"] = rlimits(space)
    return state
