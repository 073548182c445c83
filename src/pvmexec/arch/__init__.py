"""The architecture interface: one module per architecture, the same names in each."""
import platform

from ..errors import UnsupportedTarget

_MACHINES = {"x86_64": "x86_64", "amd64": "x86_64"}


def current():
    """The arch module for this machine, or UnsupportedTarget naming the machine."""
    name = _MACHINES.get(platform.machine())
    if name == "x86_64":
        from . import x86_64
        return x86_64
    raise UnsupportedTarget(0, "architecture %s is not supported yet (x86-64 only; aarch64 is planned)"
                            % platform.machine())
