"""`pvmexec bench [engines|sandbox|dump|restore]`: measurements anyone can reproduce on their machine.

engines.py: both process_vm_exec modes on every engine, beside the proposal's
figures; sandbox.py: `pvmexec run` against native runs, the ptrace engine and
strace; dump.py: live checkpoint against stop-the-world; restore.py: migration downtime. Each starts its own
targets and states their CPU placement. The C programs they run are in programs/.
"""


def main(args):
    """Run the benchmark args.what names (engines by default) with the CLI's options."""
    what = getattr(args, "what", None) or "engines"
    if what == "sandbox":
        from . import sandbox as bench
    elif what == "dump":
        from . import dump as bench
    elif what == "restore":
        from . import restore as bench
    else:
        from . import engines as bench
    return bench.main(args)
