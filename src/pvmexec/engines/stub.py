"""Stub spaces: a fresh address space of our own (a stub process) for guest code.

The caller creates the shared region, starts the stub (a static program built
at install time, run from a memfd) and drives it through the region: mode 2
for the few memory-management syscalls the stub may make, mode 1 to run guest
code, whose syscalls the stub's seccomp filter traps and whose faults its
signal handler catches. The region is guest-writable: everything read back is
validated, and a stub that misbehaves is killed, not trusted.
"""
import ctypes
import errno
import mmap
import os
import signal
import select
import socket
import struct
import subprocess
import threading
import time
import warnings

from .. import _core
from . import BaseEngine
from .channel import wait_word
from ..arch import current as _current_arch
from ..context import SigContext, Stop, StopReason
from ..errors import EngineError, RemoteSyscallError, TargetGone
from ..proc import host_tid
from ..abi import CLONE_NEWPID, CLONE_NEWUSER, MAP_FIXED, MREMAP_FIXED
from ..syscalls import name_of, number

arch = _current_arch()
_RIP = arch.REG_INDEX[arch.PC]
_RIP_WORD = struct.Struct("<Q")

L = _core.LAYOUT
_stub_run = _core.stub_run
_stub_run_fast = _core.stub_run_fast
_new = object.__new__
FP_MAX = L["STUB_FP_MAX"]
SIGSYS, SYS_SECCOMP = signal.SIGSYS, 1


class _Thread:
    """One stub thread: its block in the region and our own request counter for it."""

    __slots__ = ("index", "block", "seq", "counter", "lock", "tid", "run")

    def __init__(self, index, base, tid=0):
        self.index = index
        self.tid = tid
        self.block = base + L["STUB_BLOCK_OFF"] + index * L["STUB_BLOCK_SIZE"]
        self.seq = ctypes.c_uint32(0)
        self.counter = ctypes.addressof(self.seq)
        self.lock = threading.Lock()
        self.run = None                  # its C entry for Space.exec (a _core.Runner)


# Spin budget (pause iterations: tens of µs) of both sides before sleeping on a futex: far above a
# round trip, yet a side waiting on a long guest run or a slow handler soon leaves the CPU to them
# (on 2 vCPUs, 2000 rather than 20000 made pvmexec run's fork+exec+wait loop a third faster).
SPIN = 2000


class StubEngine(BaseEngine):
    """A stub process of ours whose address space hosts guest code (Space.create()): mode 1 through its
    seccomp trap and signal handlers, mode 2 limited to its own memory, over the channel."""

    name = "stub"
    exec_in_own_process = True

    def __init__(self, spin=None, patch=True, fixed_layout=False):
        self._init_state(spin)
        fd = os.memfd_create("pvmexec-stub-region", os.MFD_CLOEXEC)
        exe = os.memfd_create("pvmexec-stub", 0)
        self._lend, stub_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        try:
            os.ftruncate(fd, L["STUB_REGION_SIZE"])
            self._init_region(mmap.mmap(fd, L["STUB_REGION_SIZE"], mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE))
            os.write(exe, _core.STUB_ELF)
            # Without patching, no window: the range stays free for a program that loads there (node).
            self.proc = start_stub(exe, [str(fd), str(stub_end.fileno())] + ([] if patch else ["nowindow"]),
                                   (fd, stub_end.fileno()), fixed_layout, self._map)
            self.pid = self.proc.pid
            self.isolated = self.proc.isolated
            # The caller's tgkill as the stub's handler sees it: from outside its pid namespace, pid 0.
            self.preempt_pid = 0 if self.isolated else os.getpid()
            self.pidfd = os.pidfd_open(self.pid)
            self._wait_ready()
            self.new_thread()
        except BaseException:
            self.close()
            raise
        finally:
            os.close(fd)
            os.close(exe)
            stub_end.close()
        self._read_start_state()
        self.patching = self._start_patching() if patch else "off (patch_syscalls=False)"

    def _init_state(self, spin):
        self.proc = None
        self._map = None
        self._keep = None
        self.pidfd = -1
        self._mem = -1
        self._sites = {}                # syscall sites seen (address after the syscall) -> patch index or None
        self.fast_exec = None           # Space.exec's C entry: guest thread 0's Runner
        self._npatched = 0
        self._patch_lock = threading.Lock()
        self._patch_busy = False        # _patch holds every guest thread's lock for a moment
        self.service = None             # block 0: mode 2 and starting threads; never runs guest code
        self.threads = []               # guest threads: blocks 1, 2, ...
        self.spin = spin if spin is not None else (SPIN if os.cpu_count() > 1 else 0)

    def _init_region(self, region):
        """The region (an mmap, the stub's part at its start) ready for the stub's start."""
        self._map = region
        self._keep = ctypes.c_char.from_buffer(self._map)
        self._base = ctypes.addressof(self._keep)
        struct.pack_into("<I", self._map, L["stub_header.magic"], L["STUB_MAGIC"])
        struct.pack_into("<I", self._map, L["stub_header.state"], 0)
        for i in range(L["STUB_MAX_THREADS"]):
            slot = L["STUB_BLOCK_OFF"] + i * L["STUB_BLOCK_SIZE"]
            struct.pack_into("<I", self._map, slot + L["slot.spin"], self.spin)
            struct.pack_into("<I", self._map, slot + L["slot.agent_cpu"], 0xFFFFFFFF)   # not known yet
        self.service = _Thread(0, self._base)

    def _read_start_state(self):
        self.gadget = struct.unpack_from("<Q", self._map, L["stub_header.gadget"])[0]
        # The first trap's FPU state (the stub never touched the FPU): the clean state for this CPU.
        stop_off = L["STUB_BLOCK_OFF"] + L["STUB_STOP_OFF"]
        fp_size = struct.unpack_from("<I", self._map, stop_off + L["stop.fp_size"])[0]
        fp_off = L["STUB_BLOCK_OFF"] + L["STUB_FP_OFF"]
        self._init_fp = bytes(self._map[fp_off:fp_off + fp_size]) if 512 <= fp_size <= L["STUB_FP_MAX"] else None

    def _start_patching(self):
        """'on', or why not: the stub maps the window only if it can, the code is rewritten through /proc/PID/mem."""
        if struct.unpack_from("<Q", self._map, L["stub_header.window"])[0] != L["STUB_WINDOW_ADDR"]:
            return "off (the stub could not map its window at %#x or save the FPU state itself)" % L["STUB_WINDOW_ADDR"]
        try:
            self._mem = os.open("/proc/%d/mem" % self.pid, os.O_RDWR | os.O_CLOEXEC)
        except OSError as e:
            return "off (cannot write the stub's memory: %s)" % e.strerror
        for t in self.threads:
            t.run.patch = self._patch
        return "on"

    def _wait_ready(self):
        if not wait_word(self._map, self._base, 4, L["STUB_READY"], 10, lambda: self.proc.poll() is not None):
            rc = self.proc.poll()
            if rc is not None:
                raise EngineError("the stub exited during start-up (status %d)" % rc)
            raise EngineError("the stub did not start")

    # -- mode 2: only what the stub may do ------------------------------------------------

    @property
    def block(self):
        return self.threads[0].block

    @property
    def counter(self):
        return self.threads[0].counter

    def new_thread(self):
        """Start another stub thread for another guest thread; returns its guest thread number."""
        index = len(self.threads)
        block = index + 1
        if block >= L["STUB_MAX_THREADS"]:
            raise EngineError("a stub space has at most %d guest threads" % (L["STUB_MAX_THREADS"] - 1))

        def spawn(slot, counter, alive, pidfd, spin, pid):
            off = slot - self._base
            struct.pack_into("<q6Q", self._map, off + L["slot.calls"], 0, block, 0, 0, 0, 0, 0)
            struct.pack_into("<I", self._map, off + L["slot.op"], L["OP_SPAWN"])
            _core.agent_call(slot, counter, alive, pidfd, spin, pid)
            return struct.unpack_from("<q", self._map, off + L["slot.calls"] + L["call.ret"])[0]

        tid = self._call(spawn, thread=None)
        if tid <= 0:
            raise EngineError("the stub could not start thread %d: %s" % (index, os.strerror(-tid) if tid else "?"))
        if self.isolated:                    # the stub names it in its own pid namespace; tgkill needs ours
            tid = host_tid(self.pid, tid)
            if tid is None:
                raise EngineError("stub thread %d is not in process %d" % (index, self.pid))
        t = _Thread(block, self._base, tid)
        ready = t.block + L["STUB_STOP_OFF"] + L["stop.ready"] - self._base
        if not wait_word(self._map, self._base, ready, 1, 5, lambda: self.proc.poll() is not None):
            raise EngineError("stub thread %d did not start" % index)
        t.run = _core.Runner(t.block, t.counter, self.pidfd, self.spin, t.lock, self._sites, self._run_failed,
                             self._keep)
        if self._mem >= 0:
            t.run.patch = self._patch
        self.threads.append(t)
        if index == 0:
            self.fast_exec = t.run
        return index

    def syscall(self, nr, args):
        if nr not in STUB_ALLOWED:
            raise RemoteSyscallError(1, "%s (a stub space allows only %s)" % (
                name_of(nr), ", ".join(name_of(n) for n in sorted(STUB_ALLOWED))), args)
        self._spare_window(nr, args)
        return self._call(_core.agent_syscall, nr, *args, thread=None)

    def map_file(self, host_fd, addr, length, prot, flags, offset):
        """mmap(2) in the stub of the caller's descriptor host_fd (a file mapping the guest asked for): the
        descriptor goes over the stub's lending socket, is mapped and closed at once. Returns mmap's raw result."""
        return self.map_files([(host_fd, addr, length, prot, flags, offset)])[0]

    def map_files(self, maps, then=()):
        """map_file for each (host_fd, addr, length, prot, flags, offset), in one batch: each descriptor is
        lent once, however many of the mappings use it (a fork maps a library's segments), all of them in
        one message; the calls then (syscalls()'s (nr, args)) and the descriptors' closes go in the same
        batch (a stub that sleeps meanwhile costs a wake-up per request). Raw results of maps and then."""
        for _fd, addr, length, prot, flags, offset in maps:
            self._spare_window(_NR_MMAP, (addr, length, prot, flags, 0, offset))
        then = list(then)
        self._check_batch(then)
        lent = list(dict.fromkeys(m[0] for m in maps))
        with self.service.lock:
            remote = {}
            try:
                for i in range(0, len(lent), _FDS_PER_MESSAGE):
                    some = lent[i:i + _FDS_PER_MESSAGE]
                    remote.update(zip(some, self._receive_fds(some)))
                calls = [(_NR_MMAP, (addr, length, prot, flags, remote[fd], offset))
                         for fd, addr, length, prot, flags, offset in maps] + then
                closes = [(_NR_CLOSE, (fd, 0, 0, 0, 0, 0)) for fd in remote.values()]
                remote = {}                 # closed by the batch, whatever the calls before return
                return self._raw_batch(calls + closes)[:len(calls)]
            finally:
                if remote:
                    self._raw_batch([(_NR_CLOSE, (fd, 0, 0, 0, 0, 0)) for fd in remote.values()])

    @property
    def mem_fd(self):
        """The stub's /proc/PID/mem open for writing (writes there ignore page protections), or -1."""
        return self._mem

    def _receive_fds(self, host_fds):
        """host_fds sent over the lending socket in one message and received by the stub: their numbers
        there, in order (the service lock held)."""
        n = len(host_fds)
        scratch = L["STUB_LEND_SCRATCH"]
        remote = struct.unpack_from("<Q", self._map, L["stub_header.region_base"])[0] + scratch
        control = 16 + 4 * n
        space = (control + 7) & ~7
        # msghdr {name 0, iov -> 1 byte, 1 iov, control -> its space}; the byte and the cmsg follow it.
        struct.pack_into("<QI4xQQQQi4xQQ", self._map, scratch, 0, 0, remote + 56, 1, remote + 80, space, 0,
                         remote + 72, 1)
        self._map[scratch + 72:scratch + 80 + space] = bytes(8 + space)
        socket.send_fds(self._lend, [b"\0"], host_fds)
        got = self._raw(_NR_RECVMSG, (L["STUB_LEND_FD"], remote, 0x40000000, 0, 0, 0))   # MSG_CMSG_CLOEXEC
        length_, level, kind = struct.unpack_from("<Qii", self._map, scratch + 80)
        fds = list(struct.unpack_from("<%di" % n, self._map, scratch + 96))
        # The guest can write this page: what it says is checked before use.
        if got != 1 or (length_, level, kind) != (control, socket.SOL_SOCKET, socket.SCM_RIGHTS) or \
                not all(0 <= fd < 1024 and fd != L["STUB_LEND_FD"] for fd in fds) or len(set(fds)) != n:
            raise EngineError("the stub did not receive the descriptors to map (%d)" % got)
        return fds

    def _spare_window(self, nr, args):
        if struct.unpack_from("<Q", self._map, L["stub_header.window"])[0]:
            _spare_window(nr, args)

    def _raw(self, nr, args):
        """One mode-2 call on the service channel, whose lock the caller holds."""
        return self._service(_core.agent_syscall, nr, *args)

    def _raw_batch(self, calls):
        """A batch of mode-2 calls on the service channel (any length), whose lock the caller holds."""
        return self._service(_core.agent_batch, calls)

    def _service(self, fn, *args):
        try:
            return fn(self.service.block, self.service.counter, 0, self.pidfd, self.spin, 0, *args)
        except BaseException as e:
            raise self._failed(e) from None

    def syscalls(self, calls):
        self._check_batch(calls)
        return self._call(_core.agent_batch, calls, thread=None)

    def _check_batch(self, calls):
        for nr, args in calls:
            if nr not in STUB_ALLOWED:
                raise RemoteSyscallError(1, "%s (not allowed in a stub space)" % name_of(nr), args)
            self._spare_window(nr, args)

    def _take(self, thread):
        """Lock a channel: the service thread's (thread=None, waiting its turn) or a guest thread's."""
        if thread is None:
            self.service.lock.acquire()
            return self.service
        if not 0 <= thread < len(self.threads):
            raise ValueError("no guest thread %d in this space (it has %d)" % (thread, len(self.threads)))
        t = self.threads[thread]
        if not t.lock.acquire(blocking=False):
            raise RuntimeError("guest thread %d is already running for another caller thread" % thread)
        return t

    def _call(self, fn, *args, thread=0):
        """Post on a channel (see _take) and wait."""
        t = self._take(thread)
        try:
            return fn(t.block, t.counter, 0, self.pidfd, self.spin, 0, *args)
        except BaseException as e:
            raise self._failed(e) from None
        finally:
            t.lock.release()

    def _run_failed(self, e):
        """A Runner's failed(): the exception to raise (None: nothing ran, take the Python path)."""
        return self._failed(e)

    def _failed(self, e):
        """The exception to raise for a failed post/wait: the stub's death named, an interrupted
        request (or running guest) ends the space, which cannot be trusted after it."""
        if isinstance(e, OSError) and e.errno == errno.ESRCH:
            return TargetGone(self.pid, "the stub space's process %d died" % self.pid)
        if not isinstance(e, (OSError, TypeError, ValueError)):
            self.kill()
        return e

    # -- mode 1 ------------------------------------------------------------------------------

    def exec(self, ctx, sigmask, thread=0, fast=None):
        # The hot path of an application kernel: kept flat on purpose (each Python call costs here).
        if not 0 <= thread < len(self.threads):
            raise ValueError("no guest thread %d in this space (it has %d)" % (thread, len(self.threads)))
        t = self.threads[thread]
        fp = ctx.fpstate
        if fp is not None and not 512 <= len(fp) <= FP_MAX:
            raise ValueError("fpstate must be 512..%d bytes" % FP_MAX)
        lock = t.lock
        if not lock.acquire(False) and not (self._patch_busy and lock.acquire(timeout=5)):
            raise RuntimeError("guest thread %d is already running for another caller thread" % thread)
        try:
            if fast is None:
                got = _stub_run(t.block, t.counter, 0, self.pidfd, self.spin, 0, ctx._buf, fp or b"", fp is not None)
            else:
                got = _stub_run_fast(t.block, t.counter, 0, self.pidfd, self.spin, 0, ctx._buf, fp or b"",
                                     fp is not None, fast[0], fast[1], fast[2], self.pid, t.tid, fast[3])
        except BaseException as e:
            raise self._failed(e) from None
        finally:
            lock.release()
        if got is None:                    # refused in C before anything ran: say why
            arch.validate(ctx._words())
            raise EngineError("register state refused")
        regs = got[7]
        out = _new(SigContext)
        out._buf, out.fpstate = regs, got[8]
        stop = _new(Stop)
        stop.ctx, stop._info, stop._fields = out, None, got
        signo = got[0]
        if signo == SIGSYS and got[1] == SYS_SECCOMP:
            stop.reason = StopReason.SYSCALL
            if self._mem >= 0:
                rip = _RIP_WORD.unpack_from(regs, _RIP * 8)[0]
                if rip not in self._sites:
                    self._patch(rip, got[4])
            return stop, 0
        stop.reason = StopReason.SIGNAL
        return stop, (0 if signo in sigmask else signo)

    def _patch(self, ret, nr):
        """Rewrite the site whose syscall just trapped (it ends at `ret`) if it is `mov $nr, %eax; syscall`.

        Only while no other guest thread of the space runs: none can be
        executing the bytes as they change. The last two bytes stay 0f 05.
        Each site is looked at once; code written over a patched site later
        simply traps again (slower, still right).
        """
        if not self._patch_lock.acquire(False):
            return                                  # another caller thread is patching
        held = []
        self._patch_busy = True
        try:
            for t in self.threads:
                if not t.lock.acquire(False):
                    return                          # a guest thread runs: try again at a later stop
                held.append(t)
            self._patch_locked(ret, nr)
        finally:
            for t in held:
                t.lock.release()
            self._patch_busy = False
            self._patch_lock.release()

    def _patch_locked(self, ret, nr):
        self._sites[ret] = None
        if self._npatched >= L["STUB_PATCH_MAX"]:
            return
        try:
            before = os.pread(self._mem, arch.PATCH_SITE_LEN, ret - arch.PATCH_SITE_LEN)
        except OSError:
            return
        if not arch.patchable_site(before, nr):
            return
        index = self._npatched
        site = L["STUB_WINDOW_OFF"] + L["STUB_SITES_OFF"] + index * L["patch_site.size"]
        struct.pack_into("<Qq", self._map, site, ret, nr)
        slot = L["STUB_WINDOW_ADDR"] + L["STUB_SLOTS_OFF"] + 8 * index
        try:
            code, back = arch.jump_through(slot)
            os.pwrite(self._mem, code, ret - back)
        except OSError:
            return
        self._npatched += 1
        self._sites[ret] = index

    @property
    def patched_sites(self):
        return self._npatched

    def copy_patches_from(self, src):
        """Give this space src's patch table (its copied code jumps through the same slots): for fork."""
        if src.patching != "on" or self.patching != "on":
            return
        off = L["STUB_WINDOW_OFF"] + L["STUB_SITES_OFF"]
        size = L["STUB_PATCH_MAX"] * L["patch_site.size"]
        self._map[off:off + size] = src._map[off:off + size]
        self._sites.clear()             # (in place: the Runners hold this dict)
        self._sites.update(src._sites)
        self._npatched = src._npatched

    def forget_patches(self):
        """The code that was patched is gone (execve emptied the space): its sites start anew."""
        off = L["STUB_WINDOW_OFF"] + L["STUB_SITES_OFF"]
        self._map[off:off + L["STUB_PATCH_MAX"] * L["patch_site.size"]] = bytes(L["STUB_PATCH_MAX"] * L["patch_site.size"])
        self._sites.clear()
        self._npatched = 0

    def initial_fpstate(self):
        if self._init_fp is None:
            raise EngineError("the stub reported no FPU state at start-up")
        return self._init_fp

    def kill(self):
        self._close_runners()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)

    def _close_runners(self):
        """Space.exec takes the Python path from now on (which knows what a killed space is)."""
        self.fast_exec = None
        for t in self.threads:
            if t.run is not None:
                t.run.close()

    def close(self):
        self.kill()
        if getattr(self, "_lend", None) is not None:
            self._lend.close()
            self._lend = None
        if self._mem >= 0:
            os.close(self._mem)
            self._mem = -1
        if self.pidfd >= 0:
            os.close(self.pidfd)
            self.pidfd = -1
        self._keep = None
        if self._map is not None:
            self._map.close()
            self._map = None


def plain_process(fixed_layout=False):
    """A process of ours with nothing in it but the stub program, sleeping: for the ptrace engine to
    run guest code in (the kernel's comparison engine). Returns a StubProcess; it dies with its caller."""
    exe = os.memfd_create("pvmexec-stub", 0)
    try:
        os.write(exe, _core.STUB_ELF)
        proc = start_stub(exe, ["plain"], (), fixed_layout)
    finally:
        os.close(exe)
    try:
        _wait_until_paused(proc)
    except BaseException:
        proc.kill()
        proc.wait(10)
        raise
    return proc


def _wait_until_paused(proc, timeout=10):
    """Until the plain stub sleeps in pause(): before, it may still be closing every descriptor, and
    one lent to it meanwhile would go too (mmap of a lent file then failed with EBADF)."""
    deadline = time.monotonic() + timeout
    pause = 0.0001
    while True:
        try:
            with open("/proc/%d/syscall" % proc.pid, "rb") as f:
                if f.read().split(b" ", 1)[0] == b"%d" % _NR_PAUSE:
                    return
        except OSError:
            pass
        if proc.poll() is not None:
            raise EngineError("the plain stub exited during start-up (status %d)" % proc.returncode)
        if time.monotonic() > deadline:
            raise EngineError("the plain stub did not start")
        time.sleep(pause)
        pause = min(pause * 2, 0.01)


class StubProcess:
    """A stub process we started (our child), with Popen's pid, poll(), wait() and kill(): subprocess
    cannot put a child in new namespaces. isolated: in pid and user namespaces of its own."""

    def __init__(self, pid, isolated):
        self.pid, self.isolated, self.returncode = pid, isolated, None
        self._lock = threading.Lock()

    def poll(self):
        if self.returncode is None:
            with self._lock:
                if self.returncode is None:
                    try:
                        pid, status = os.waitpid(self.pid, os.WNOHANG)
                    except ChildProcessError:           # reaped elsewhere: gone all the same
                        self.returncode = -signal.SIGKILL
                    else:
                        if pid:
                            self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def wait(self, timeout=None):
        """Its exit status, once it ends: its pidfd says when (a pause between polls cost a stub's
        every exec and exit a millisecond or two)."""
        deadline = None if timeout is None else time.monotonic() + timeout
        if self.poll() is not None:
            return self.returncode
        try:
            pidfd = os.pidfd_open(self.pid)
        except OSError:                                 # gone meanwhile, or no pidfds: poll below
            pidfd = -1
        try:
            pause = 0.0005
            while self.poll() is None:
                left = None if deadline is None else deadline - time.monotonic()
                if left is not None and left <= 0:
                    raise subprocess.TimeoutExpired("pvmexec-stub", timeout)
                if pidfd >= 0:
                    select.select([pidfd], [], [], left)
                else:
                    time.sleep(pause if left is None else min(pause, left))
                    pause = min(pause * 2, 0.05)
        finally:
            if pidfd >= 0:
                os.close(pidfd)
        return self.returncode

    def kill(self):
        if self.poll() is None:
            try:
                os.kill(self.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


_namespaces_refused = None      # why the kernel will not give stubs namespaces of their own, once it said so


def start_stub(exe, args, keep, fixed_layout, region=None):
    """Start the stub program (memfd exe) with args, keeping the descriptors keep, in a user and a pid
    namespace of its own where the kernel allows: whatever a guest makes the stub's own syscall
    instruction do (getpid, gettid, a PI futex naming a tid), it sees only the stub's namespace, never
    a host pid. region: the stub's header, told the pid its parent has there (0 across namespaces)."""
    global _namespaces_refused
    argv = [b"pvmexec-stub"] + [a.encode() for a in args]
    if _namespaces_refused is None:
        if region is not None:
            struct.pack_into("<i", region, L["stub_header.caller_pid"], 0)
        try:
            return StubProcess(_core.spawn_stub(exe, argv, keep, CLONE_NEWUSER | CLONE_NEWPID, fixed_layout), True)
        except OSError as e:
            if e.errno not in (errno.EPERM, errno.EACCES, errno.EINVAL, errno.ENOSPC, errno.EUSERS):
                raise
            reason = "the kernel refused a user and pid namespace for the stub (%s)" % e.strerror
            if e.errno not in (errno.ENOSPC, errno.EUSERS):      # a limit reached may pass; a refusal stays
                _namespaces_refused = reason
            warnings.warn("pvmexec: %s: a guest can learn host pids" % reason, RuntimeWarning, stacklevel=3)
    if region is not None:
        struct.pack_into("<i", region, L["stub_header.caller_pid"], os.getpid())
    return StubProcess(_core.spawn_stub(exe, argv, keep, 0, fixed_layout), False)


STUB_ALLOWED = frozenset(_core.STUB_ALLOWED)
WINDOW = (L["STUB_WINDOW_ADDR"], L["STUB_WINDOW_ADDR"] + L["STUB_WINDOW_SIZE"])   # the patching window
_MAP_FIXED, _MREMAP_FIXED = MAP_FIXED, MREMAP_FIXED
_NR_MMAP, _NR_MPROTECT, _NR_MUNMAP, _NR_MREMAP = (number(n) for n in ("mmap", "mprotect", "munmap", "mremap"))
_NR_RECVMSG, _NR_CLOSE, _NR_PAUSE = number("recvmsg"), number("close"), number("pause")
_FDS_PER_MESSAGE = 64           # descriptors lent in one message (its control data fits the lending scratch)


def _spare_window(nr, args):
    """Refuse mode 2 memory calls that would replace, move or unmap the patching window."""
    a = list(args) + [0] * (6 - len(args))
    if nr == _NR_MMAP and a[3] & _MAP_FIXED:
        ranges = [(a[0], a[1])]
    elif nr in (_NR_MPROTECT, _NR_MUNMAP):
        ranges = [(a[0], a[1])]
    elif nr == _NR_MREMAP:                  # the old range, and the new one if fixed
        ranges = [(a[0], a[1])] + ([(a[4], a[2])] if a[3] & _MREMAP_FIXED else [])
    else:
        return
    for start, length in ranges:
        if isinstance(start, int) and isinstance(length, int) and start < WINDOW[1] and start + length > WINDOW[0]:
            raise RemoteSyscallError(errno.EBUSY, "%s (the range meets the stub's patching window %#x-%#x)" % (
                name_of(nr), *WINDOW), args)
# A byte before `mov $nr, %eax` that could be its prefix (REX, operand/address size, segment, lock/rep):
# then it is another instruction, or may be; such sites stay unpatched.
