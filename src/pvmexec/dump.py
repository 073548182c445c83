"""Compatibility name: the checkpoint tool lives in pvmexec.checkpoint."""
from .checkpoint import *  # noqa: F401,F403
from .checkpoint import __all__  # noqa: F401
