"""The application kernel behind `pvmexec run`: Sandbox, its Policy, and the guest's Process."""
from .errors import Errno, Exited
from .files import Policy
from .sandbox import Sandbox
from .task import Process


__all__ = ["Sandbox", "Policy", "Process", "Errno", "Exited"]
