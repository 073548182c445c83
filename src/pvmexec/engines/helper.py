"""Mode 1 at stub speed inside a live target: the agent's helper process.

The agent thread cannot run guest code by itself: it shares the target's
signal handlers, so the seccomp trap and fault handling of a stub space are
not its to install, and if the caller died with the agent thread traced, the
guest code would run on in the target. The helper is a process the agent
starts with clone(CLONE_VM), exit signal 0: it shares the target's memory and
nothing else (its own handlers, filter, thread group, an empty descriptor
table, its own process group). It runs the stub's own code (built as a blob
at install time) on a stub region mapped in the target, and this engine
drives it exactly as StubEngine drives a stub space.

What the target can see: one more child process, visible only to a wait with
__WCLONE or __WALL (never to wait(-1), never a SIGCHLD), and its memory in the
maps. The agent thread, its parent, reaps it (at detach, at the caller's
death, and when it left unused for a second); PR_SET_PDEATHSIG ends it with
the agent thread. If the target runs execve meanwhile, the agent dies with
the old program and the helper is reaped through ptrace instead (the kernel
then makes its exit signal SIGCHLD: the one trace the target may see).
"""
import errno
import mmap
import os
import signal
import struct
import time
import warnings

from .. import _core, _sigguard, janitor, proc
from ..abi import (F_ADD_SEALS, F_SEAL_GROW, F_SEAL_SEAL, F_SEAL_SHRINK, MADV_DONTFORK, MAP_FIXED_NOREPLACE,
                   MAP_SHARED, MFD_ALLOW_SEALING, MFD_CLOEXEC, P_PID, PROT_EXEC, PROT_READ, PROT_WRITE, WCLONE,
                   WEXITED)
from ..arch import current as _current_arch
from ..errors import EngineError, PvmexecError, TargetGone
from ..syscalls import number
from .channel import region_tampered
from .stub import WINDOW, StubEngine

PATCH_SITE_LEN = _current_arch().PATCH_SITE_LEN
L = _core.LAYOUT
SYMS = _core.HELPER_SYMBOLS
PAGE = 4096
REGION = L["STUB_REGION_SIZE"]                              # the stub's region first, then the helper's code
SIZE = REGION + (len(_core.HELPER_BLOB) + PAGE - 1) // PAGE * PAGE
NR = {n: number(n) for n in ("memfd_create", "ftruncate", "fcntl", "mmap", "mprotect", "madvise", "munmap", "close",
                              "waitid")}
IDLE = L["HELPER_IDLE"]
NAME = b"pvmexec-helper\0"


class HelperFailed(EngineError):
    """The helper could not be started in the target (the reason says why): mode 1 stays on ptrace."""

    def __init__(self, reason):
        super().__init__(reason)
        self.reason = reason


class HelperGone(EngineError):
    """The helper ended under a request (killed, or it left unused as the request came)."""


class _Process:
    """The helper as StubEngine sees its stub process: poll() and kill(). It is the agent's child, not ours."""

    def __init__(self, engine):
        self._engine = engine
        self.returncode = None

    def poll(self):
        fd = self._engine.pidfd
        if self.returncode is None and fd >= 0 and proc.ended(fd):
            self.returncode = -signal.SIGKILL
        return self.returncode

    def kill(self):
        self._engine.kill()


class HelperEngine(StubEngine):
    """Mode 1 in a live target through the agent's helper process (see the module's text)."""

    name = "helper"

    def __init__(self, agent):
        self._init_state(agent.spin)
        self.agent = agent
        self.target = agent.pid
        self.isolated = False
        self.patching = "off"
        self.window = 0                  # the patching window's address in the target, if mapped
        self._patched = {}               # site (its return address) -> (bytes before, bytes we wrote)
        self._window_key = None
        self._records = janitor.Records(agent.pid)
        self._map_key = None
        self._ino = 0                    # our memfd's inode: what its mappings in the target show
        self.base = None                 # the region's address in the target
        self.helper_pid = 0              # its pid in the target's pid namespace
        self._started = None             # its start time (with its pid, it names it for good)
        self._helper_key = None
        self.proc = _Process(self)
        try:
            self._make_region()
            self._start()
            self._wait_ready()
            self.new_thread()
        except BaseException as e:
            self.close()
            if isinstance(e, OSError) and not isinstance(e, (PvmexecError, InterruptedError)):
                raise HelperFailed("%s" % e) from None      # refused by the kernel: mode 1 stays on ptrace
            raise
        self._read_start_state()
        if self.window:
            self.patching = self._start_patching()

    def _patch_locked(self, ret, nr):
        """Only code the caller mapped through its Space (Guest, track_mapping) is rewritten: the target's
        own code must never jump into our window (its threads would run our trampolines)."""
        size = PATCH_SITE_LEN
        if not any(lo <= ret - size and ret <= lo + length for lo, (length, _key) in
                   list(self.agent.caller_mappings.items())):
            self._sites[ret] = None
            return
        try:
            before = os.pread(self._mem, size, ret - size)
        except OSError:
            return
        super()._patch_locked(ret, nr)
        if self._sites.get(ret) is not None:
            self._patched[ret] = (before, os.pread(self._mem, size, ret - size))

    def _unpatch(self):
        """Put back the bytes of every site we rewrote (still as we left them): the patch table they jump
        through goes with this helper."""
        if not self._patched:
            return
        try:
            mem = os.open("/proc/%d/mem" % self.target, os.O_RDWR | os.O_CLOEXEC)
        except OSError:
            return
        try:
            for ret, (before, after) in self._patched.items():
                try:
                    if os.pread(mem, len(after), ret - len(after)) == after:
                        os.pwrite(mem, before, ret - len(before))
                except OSError:
                    pass
        finally:
            os.close(mem)
        self._patched = {}

    def _ok(self, ret, what):
        if ret < 0:
            raise HelperFailed("%s in the target failed: %s" % (what, os.strerror(-ret)))
        return ret

    def _make_region(self):
        """A sealed memfd made in the target (as the agent's own region), mapped there and here."""
        a = self.agent
        name_off = L["SLOT_OFF"] + L["slot.calls"] + 8 * 64        # a call entry the one-call posts leave alone
        a._map[name_off:name_off + len(NAME)] = NAME
        # Recorded from before it exists (by number and name), by its inode once made; no Ctrl-C between.
        with _sigguard.deferred():
            before = self._records.expect_new_fds(1, janitor.HELPER_MEMFD)
            try:
                fd_t = self._ok(a.syscall(NR["memfd_create"], (a.code_base + name_off,
                                                               MFD_CLOEXEC | MFD_ALLOW_SEALING)), "memfd_create")
                fd_key = self._records.add_fd(fd_t)
            finally:
                for key in before:
                    janitor.unrecord(key)
        fd_c = -1
        try:
            fd_c = _core.pidfd_getfd(a.pidfd, fd_t)
            self._ino = os.fstat(fd_c).st_ino
            self._ok(a.syscall(NR["ftruncate"], (fd_t, SIZE)), "ftruncate")
            self._ok(a.syscall(NR["fcntl"], (fd_t, F_ADD_SEALS, F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_SEAL)),
                     "fcntl(F_ADD_SEALS)")
            base = self._ok(a.syscall(NR["mmap"], (0, SIZE, PROT_READ | PROT_WRITE, MAP_SHARED, fd_t, 0)), "mmap")
            self._map_key = self._records.add("helpermap", self._ino, base, SIZE)
            self.base = base
            self._ok(a.syscall(NR["mprotect"], (base + REGION, SYMS["rw"], PROT_READ | PROT_EXEC)), "mprotect")
            self._ok(a.syscall(NR["madvise"], (base, SIZE, MADV_DONTFORK)), "madvise")
            self._map_window(fd_t)
            why = region_tampered(fd_c, SIZE)
            if why:
                raise HelperFailed("the helper: " + why)
            region = mmap.mmap(fd_c, SIZE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            if fd_c >= 0:
                os.close(fd_c)
            a.syscall(NR["close"], (fd_t,))
            janitor.unrecord(fd_key)
        region[REGION:REGION + len(_core.HELPER_BLOB)] = _core.HELPER_BLOB
        self._init_region(region)
        if self.window:                             # "mapped for you": the helper fills in the trampolines
            struct.pack_into("<Q", region, L["stub_header.window"], self.window)

    def _map_window(self, fd_t):
        """The stub's patching window at its fixed address in the target, if that range is free there."""
        a = self.agent
        at = a.syscall(NR["mmap"], (WINDOW[0], WINDOW[1] - WINDOW[0], PROT_READ | PROT_EXEC,
                                    MAP_SHARED | MAP_FIXED_NOREPLACE, fd_t, L["STUB_WINDOW_OFF"]))
        if at == WINDOW[0]:
            self.window = at
            self._window_key = self._records.add("helpermap", self._ino, at, WINDOW[1] - WINDOW[0])
            self._ok(a.syscall(NR["madvise"], (at, WINDOW[1] - WINDOW[0], MADV_DONTFORK)), "madvise")
            return
        if at >= 0:                                 # a kernel that took the address as a hint
            a.syscall(NR["munmap"], (at, WINDOW[1] - WINDOW[0]))
        self.patching = "off (the range of the patching window, %#x-%#x, is taken in process %d)" % (
            WINDOW[0], WINDOW[1], self.target)

    def _start(self):
        """The agent clones the helper; from then on the agent owns its end (and unmaps the region)."""
        a = self.agent
        stack = self.base + L["STUB_BLOCK_OFF"] + L["STUB_ALTSTACK_OFF"] + L["STUB_ALTSTACK_SIZE"] - 64
        pid = a.helper_op(stack, self.base + REGION + SYMS["main"], self.base, SIZE, self.window)
        if pid <= 0:
            raise HelperFailed("clone in the target failed: %s" % os.strerror(-pid))
        self.helper_pid = pid
        same_ns = _same_pid_ns(self.target)
        self.pid = pid if same_ns else _host_pid(self.target, a.agent_tid)
        try:
            self.pidfd = os.pidfd_open(self.pid)
            self._started = janitor.start_time(self.pid)
        except OSError as e:
            raise HelperFailed("the helper %d is gone at once (%s)" % (pid, e.strerror)) from None
        # Should the agent die before it reaps it (the target's execve kills it), the zombie is reaped by
        # ptrace: by us (kill()), or by the janitor after our SIGKILL.
        self._helper_key = self._records.add("helper", self.pid, pid, self._started)
        # The caller's tgkill as the helper's handler sees it: our pid in the target's namespace, or 0.
        self.preempt_pid = os.getpid() if same_ns else 0

    def left_idle(self):
        """Whether the helper left by itself, unused for a while (it took no request as it left)."""
        return self._map is not None and struct.unpack_from("<I", self._map, L["stub_header.state"])[0] == IDLE

    def _run_failed(self, e):
        """Space.exec's C entry failed: as AgentEngine.exec's own run would fail (None: it left unused,
        nothing ran, the Python path starts another helper)."""
        err = self._failed(e)
        if isinstance(err, HelperGone) and self.agent.helper_gone(self):
            return None
        return err

    def _failed(self, e):
        if isinstance(e, OSError) and e.errno == errno.ESRCH:
            if self.left_idle():
                return HelperGone("the helper process %d of process %d left unused" % (self.pid, self.target))
            if self.agent.gone(0.2):           # (the helper dies of the target's death a moment before it)
                return TargetGone(self.target)
            return HelperGone("the helper process %d of process %d ended" % (self.pid, self.target))
        return super()._failed(e)

    def kill(self):
        """End the helper: the agent kills and reaps it and unmaps the region (or, the agent gone, we
        reap it through the ptrace engine); then the sites it patched are put back."""
        self._close_runners()
        if self.helper_pid:
            try:
                self.agent.helper_op(0, 0, 0, 0, 0)
            except (OSError, EngineError):
                if self.pidfd >= 0:
                    try:
                        signal.pidfd_send_signal(self.pidfd, signal.SIGKILL)
                    except OSError:
                        pass
                try:
                    reap(self._in_target, self.target, self.pid, self.helper_pid, self._started)
                except (OSError, EngineError):
                    pass
            if not zombie(self.target, self.pid, self._started):
                janitor.unrecord(self._helper_key)
            self._helper_key = None
            self.helper_pid = 0
            if self.proc.returncode is None:
                self.proc.returncode = -signal.SIGKILL
        self._unpatch()

    def _in_target(self, nr, args):
        """One call in the target: through the agent, or by ptrace where the agent cannot (the target is
        stopped, or the agent died with the program the target replaced)."""
        try:
            return self.agent.syscall(nr, args)
        except (OSError, EngineError):
            if self.agent.gone():
                raise
            return self.agent._main.syscall(nr, args)

    def close(self):
        base = self.base
        self.kill()
        # What the agent did not unmap: a region made but never handed to it, the window of a helper
        # that left unused (after kill() put the patched sites back).
        for key, at, size in ((self._map_key, base, SIZE), (self._window_key, self.window, WINDOW[1] - WINDOW[0])):
            if key is None:
                continue
            try:
                if at:
                    for lo, hi in ours_within(self.target, at, size, self._ino):
                        self._in_target(NR["munmap"], (lo, hi - lo))
                janitor.unrecord(key)
            except (OSError, EngineError) as e:          # (the janitor's record stays)
                warnings.warn("pvmexec: %d bytes of the agent's helper at %#x stay in process %d (%s)"
                              % (size, at, self.target, e), RuntimeWarning)
        self._map_key = self._window_key = None
        self.base = None
        super().close()


def ours_within(pid, addr, size, ino):
    """(start, end) of each mapping of our memfd (inode ino) within [addr, addr + size) in process pid: the
    range may hold other memory by now (the target's own, another helper's)."""
    out = []
    try:
        with open("/proc/%d/maps" % pid) as f:
            for line in f:
                fields = line.split(None, 5)
                lo, hi = (int(x, 16) for x in fields[0].split("-"))
                if addr <= lo and hi <= addr + size and int(fields[4]) == ino and \
                        fields[5].startswith("/memfd:pvmexec-helper"):
                    out.append((lo, hi))
    except (OSError, IndexError, ValueError):
        pass
    return out


def zombie(target, pid, started, wait=0.0):
    """Whether process pid (started at `started`) is still our helper, a child of target, and has exited
    unreaped (waiting up to `wait` seconds for it to end)."""
    deadline = time.monotonic() + wait
    while True:
        try:
            with open("/proc/%d/stat" % pid, "rb") as f:
                fields = f.read().rsplit(b")", 1)[1].split()
        except OSError:
            return False
        if int(fields[1]) != target or int(fields[19]) != started:
            return False                    # reaped, and the pid given to another process
        if fields[0] in (b"Z", b"X"):
            return True
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)


def reap(syscall, target, pid, ns_pid, started):
    """Reap the helper through syscall(nr, args) run in the target, if it is our exited helper: its agent
    (its parent) died before it did (the target ran execve)."""
    if zombie(target, pid, started, wait=1.0):
        syscall(NR["waitid"], (P_PID, ns_pid, 0, WEXITED | WCLONE, 0))


def _same_pid_ns(pid):
    try:
        return os.stat("/proc/self/ns/pid").st_ino == os.stat("/proc/%d/ns/pid" % pid).st_ino
    except OSError:
        return True


def _host_pid(target, agent_tid):
    """Our pid for the helper, from outside the target's pid namespace (its parent's task lists its
    children by our names)."""
    try:
        with open("/proc/%d/task/%d/children" % (target, agent_tid)) as f:
            kids = [int(x) for x in f.read().split()]
    except (OSError, ValueError):
        kids = []
    if len(kids) != 1:
        raise HelperFailed("cannot name the helper from outside the target's pid namespace")
    return kids[0]

