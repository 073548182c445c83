#!/usr/bin/env python3
"""Write docs/syscalls.md, the sandbox's support table, from the handlers (after `pip install .`)."""
import os

from pvmexec.kernel.syscalls import support_markdown     # the installed package (it needs its C extension)

with open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "docs", "syscalls.md"), "w") as f:
    f.write(support_markdown())
