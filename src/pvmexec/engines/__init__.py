"""The engines behind a Space, and the interface Space (and the tools on top) rely on.

Three engines implement it: ptrace (borrow a target thread), agent (a thread
of ours injected into the target, driven through shared memory) and stub (a
fresh address space of ours, for guest code). A Space holds exactly one;
`Space.backend` gives it to tools that need engine-specific calls.
"""
from typing import Iterable, Protocol, Sequence


class Engine(Protocol):
    """What every engine provides. Results are raw: -errno stays a number."""

    name: str            # "ptrace", "agent" or "stub"
    pid: int             # the target's (or the stub's) process id
    patching: str        # "on", or "off (why)": syscall-site patching (stub spaces only)

    @property
    def tid(self) -> int:
        """The thread that runs mode 2 calls."""

    def syscall(self, nr: int, args: Sequence[int]) -> int:
        """Mode 2: one call in the target, its raw result."""

    def syscalls(self, calls: Iterable[tuple[int, Sequence[int]]]) -> list[int]:
        """Mode 2: several calls in one round trip."""

    def exec(self, ctx, sigmask: frozenset, thread: int = 0):
        """Mode 1: run ctx to its first syscall or signal; returns (Stop, signal to deliver to the caller or 0)."""

    def acquire(self):
        """Hold the target ready across several operations (ptrace: keep the thread borrowed)."""

    def release(self) -> None:
        """End what acquire() began."""

    def initial_fpstate(self) -> bytes:
        """A clean xstate image for this CPU."""

    def reaps(self, tid: int) -> bool:
        """Whether an exit of tid is ours to collect."""

    def close(self) -> None:
        """Let the target go, exactly as found. Idempotent."""

    def own_mappings(self) -> list[tuple[int, int]]:
        """(start, end) of the engine's own mappings in the target now: not the target's memory."""


class BaseEngine:
    """Defaults shared by the engines that hold nothing between operations."""

    name = "?"
    patching = "off (not a stub space)"
    # Whether mode 1 runs in a process of ours (a stub, the agent's helper): nothing of the target's to put
    # back if the caller is interrupted, so Space.exec needs no signal guard.
    exec_in_own_process = False
    # The C entries of Space.syscall and Space.exec (a _core.Channel, a _core.Runner), where the engine
    # has them: each returns None for anything it does not do, and Space's Python path takes the call.
    fast_syscall = None
    fast_exec = None

    def acquire(self):
        return None

    def release(self):
        pass

    def reaps(self, tid):
        return False

    def own_mappings(self):
        return []

    def borrowed_scratch(self, size):
        """Target memory of the engine's own for the borrow held now, or None (then a mapping is made)."""
        return None

    def release_scratch(self, addr, size):
        """borrowed_scratch's memory at addr is free again."""

    def check_thread(self, thread):
        if thread:
            raise ValueError("thread= selects a stub thread; this space's engine is %s" % self.name)
