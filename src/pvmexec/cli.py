"""Command line: pvmexec syscall | bench."""
import argparse
import sys

from . import __version__
from .errors import PvmexecError, RemoteSyscallError
from .syscalls import errno_name, name_of, number


def parse_arg(text):
    """An integer (decimal, 0x hex, 0o octal, negative) or else a string placed in the target.

    Prefix with s: to force a string ("s:123"), with i: to force an integer.
    """
    if text.startswith("s:"):
        return text[2:]
    if text.startswith("i:"):
        return int(text[2:], 0)
    try:
        return int(text, 0)
    except ValueError:
        return text


def cmd_syscall(args):
    from .space import attach
    try:
        nr = number(args.name)
    except ValueError as e:
        print("pvmexec: %s" % e, file=sys.stderr)
        return 2
    values = [parse_arg(a) for a in args.args]
    if len(values) > 6:
        print("pvmexec: a system call takes at most 6 arguments", file=sys.stderr)
        return 2
    try:
        with attach(args.pid, freeze=args.freeze, engine=args.engine) as space:
            ret = space.syscall_raw(nr, *values)
    except (PvmexecError, OSError) as e:
        print("pvmexec: %s" % e, file=sys.stderr)
        return 1
    call = "%s(%s)" % (name_of(nr), ", ".join(
        repr(v) if isinstance(v, str) else str(v) for v in values))
    if -4096 < ret < 0:
        err = RemoteSyscallError(-ret, name_of(nr), values)
        print("%s = -1 %s (%s)" % (call, errno_name(-ret), err.strerror.rsplit("(", 1)[-1].rstrip(")")))
        return 1
    shown = hex(ret) if args.hex or name_of(nr) in ("mmap", "brk", "mremap") else str(ret)
    print("%s = %s" % (call, shown))
    return 0


def build_parser():
    p = argparse.ArgumentParser(
        prog="pvmexec",
        description="Execute system calls and code inside another process's address space "
                    "(user-space process_vm_exec).")
    p.add_argument("--version", action="version", version="pvmexec " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("syscall", help="run one system call inside a process",
                       description="Run one system call inside process PID, with its descriptors and "
                                   "memory, and print the result or the error by name. Arguments are "
                                   "integers (42, 0x2a, -1) or strings, which are placed in the "
                                   "target's memory for the call (force with s:TEXT or i:NUMBER).")
    s.add_argument("pid", type=int, metavar="PID")
    s.add_argument("name", metavar="NAME", help="system call name (openat) or number (257)")
    s.add_argument("args", nargs="*", metavar="ARG")
    s.add_argument("--freeze", action="store_true", help="stop all threads of the target meanwhile")
    s.add_argument("--hex", action="store_true", help="print the result in hex")
    s.add_argument("--engine", choices=("ptrace", "agent", "auto"), default="ptrace",
                   help="ptrace (default: nothing added to the target for one call) or agent")
    s.set_defaults(func=cmd_syscall)

    b = sub.add_parser("bench", help="measure both process_vm_exec modes (self-contained)",
                       description="Reproduce the proposal's measurements: mode 1 syscall and fault "
                                   "loops, mode 2 latency, single and batched; true µs per round trip "
                                   "beside the published figures. Starts its own target processes.")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--iterations", type=int, default=20000, help="round trips per C-level loop")
    b.add_argument("--quick", action="store_true", help="a few hundred round trips (smoke test)")
    b.set_defaults(func=lambda a: __import__("pvmexec.bench", fromlist=["main"]).main(a))
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
