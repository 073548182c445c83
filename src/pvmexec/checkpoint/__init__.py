"""Live checkpoint and restore: pvmexec.checkpoint.dump() writes an image, Image reads it, restore()
brings the process back.

dump.py drives the rounds, tracking.py finds written pages, transfer.py moves
them, state.py records everything else, image.py is the format, verifier.py compares an image with a process, restorer.py restores natively,
sandboxed.py into the sandbox.
"""
from .dump import CONVERGED_BYTES, dump
from .image import FROM_FILE, IMAGE_VERSION, MANIFEST_FIELDS, ZERO, DumpError, Image, ImageWriter
from .restorer import Restored, RestoreError, restore
from .sandboxed import restore_in_sandbox
from .tracking import Mapping, read_maps
from .verifier import verify


__all__ = ["dump", "verify", "Image", "ImageWriter", "DumpError", "IMAGE_VERSION", "MANIFEST_FIELDS", "ZERO", "FROM_FILE",
           "CONVERGED_BYTES", "Mapping", "read_maps", "restore", "Restored", "RestoreError",
           "restore_in_sandbox"]
