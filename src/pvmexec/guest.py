"""The bundled guest code (guest/guest.c), mapped into a target for tests and the benchmark."""
from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:
    from .space import Space
from . import _core
from .arch import current as _current_arch
from .context import SigContext
from .errors import TargetGone
from .syscalls import number

SYMBOLS = dict(_core.GUEST_SYMBOLS)
_ARCH = _current_arch()
PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
PAGE = 4096


class Guest:
    """Guest code (read+exec) and a stack and data area (read+write) in the target.

    Unmapped by close() or at the end of a with block, so the target keeps no mapping.
    """

    def __init__(self, space: Space, stack_size: int = 65536, data_size: int = PAGE) -> None:
        self.space = space
        blob = _core.GUEST_BLOB
        self.code_size = (len(blob) + PAGE - 1) & ~(PAGE - 1)
        self.rw_size = stack_size + data_size
        self.code = self.rw = None
        with space.borrowed():
            self.code = space.map_anonymous(self.code_size)
            try:
                space.write(self.code, blob)
                space.syscall("mprotect", self.code, self.code_size, PROT_READ | PROT_EXEC)
                self.rw = space.map_anonymous(self.rw_size)
            except BaseException:
                self.close()
                raise
        self.data = self.rw                       # data area at the bottom, stack grows down above it
        self.stack_top = self.rw + self.rw_size - 64

    def address(self, symbol: str) -> int:
        return self.code + SYMBOLS[symbol]

    def context(self, symbol: str, **regs: int) -> SigContext:
        """A fresh SigContext entering `symbol` on the guest stack."""
        regs.setdefault(_ARCH.PC, self.address(symbol))
        regs.setdefault(_ARCH.SP, self.stack_top)
        return SigContext(**regs)

    def close(self) -> None:
        calls = []
        for addr, size in ((self.code, self.code_size), (self.rw, self.rw_size)):
            if addr is not None:
                calls.append((number("munmap"), (addr, size)))
                self.space.untrack_mapping(addr)
        self.code = self.rw = None
        if calls and not self.space.detached:
            try:
                self.space.syscalls(calls)
            except TargetGone:
                pass                    # gone with its process: nothing left to unmap

    def __enter__(self) -> Guest:
        return self

    def __exit__(self, *exc: object) -> Literal[False]:
        self.close()
        return False
