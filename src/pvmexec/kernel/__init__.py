"""An application kernel: run unmodified Linux programs in a stub space, every syscall handled in Python."""
from .files import Errno, Policy
from .sandbox import Exited, Process, Sandbox

__all__ = ["Sandbox", "Policy", "Process", "Errno", "Exited"]
