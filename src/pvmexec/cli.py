"""Command line: pvmexec syscall | run | dump | image | bench."""
import argparse
import json
import re
import signal
import sys

from . import __version__
from .errors import PvmexecError
from .syscalls import name_of, number


def describe(e):
    """An error as one line for a person: the message without Python's "[Errno N]" prefix."""
    return re.sub(r"^\[Errno \d+\] ", "", str(e))


def parse_arg(text):
    """An integer (decimal, 0x hex, 0o octal, negative) or else a string placed in the target.

    Prefix with s: to force a string ("s:123"), with i: to force an integer.
    """
    if text.startswith("s:"):
        return text[2:]
    if text.startswith("i:"):
        try:
            return int(text[2:], 0)
        except ValueError:
            raise ValueError("argument %r: i: needs an integer (decimal, 0x hex, 0o octal)" % text) from None
    try:
        return int(text, 0)
    except ValueError:
        return text


def cmd_syscall(args):
    from .space import attach
    try:
        nr = number(args.name)
        values = [parse_arg(a) for a in args.args]
    except ValueError as e:
        print("pvmexec syscall: %s" % describe(e), file=sys.stderr)
        return 2
    if len(values) > 6:
        print("pvmexec: a system call takes at most 6 arguments", file=sys.stderr)
        return 2
    try:
        with attach(args.pid, freeze=args.freeze, engine=args.engine) as space:
            ret = space.syscall_raw(nr, *values)
    except (PvmexecError, OSError) as e:
        print("pvmexec: %s" % describe(e), file=sys.stderr)
        return 1
    except (ValueError, TypeError, OverflowError) as e:          # a pid or argument that cannot be
        print("pvmexec: %s" % describe(e), file=sys.stderr)
        return 2
    from .kernel.trace import format_call
    from .syscalls import TABLE
    line = format_call(name_of(nr), TABLE.get(nr, ("", ()))[1], values, ret)
    if args.hex and not -4096 < ret < 0:
        line = line.rsplit(" = ", 1)[0] + " = %#x" % ret
    print(line)
    return 1 if -4096 < ret < 0 else 0


def open_output(path):
    """Open a file the user named as output, as strace -o does: a new or regular file (truncated), or
    a terminal, pipe or character device such as /dev/stderr (appended to). Never an executable, a
    directory or a block device: `--trace -o /bin/echo` must not destroy /bin/echo. The checks are on
    the file opened, before anything is truncated, so a symlink or a rename cannot dodge them."""
    import errno
    import os
    import stat
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_CLOEXEC | os.O_NOCTTY, 0o644)
    try:
        st = os.fstat(fd)
        if stat.S_ISREG(st.st_mode):
            if st.st_mode & 0o111:
                raise OSError(errno.EPERM, "an executable file; refusing to overwrite it with a trace")
            os.ftruncate(fd, 0)
        elif not (stat.S_ISCHR(st.st_mode) or stat.S_ISFIFO(st.st_mode) or stat.S_ISSOCK(st.st_mode)):
            raise OSError(errno.EINVAL, "not a regular file, terminal or pipe")
        return os.fdopen(fd, "w")
    except BaseException:
        os.close(fd)
        raise


def _sandbox(args, command):
    """(Sandbox, Policy) from the run options, or an exit status (125) after saying what was wrong."""
    import json
    from .kernel import Policy, Sandbox
    try:
        if args.policy:
            with open(args.policy) as f:
                spec = json.load(f)
            if not isinstance(spec, dict):
                raise ValueError("the policy file must hold a JSON object")
        else:
            spec = {}
        if args.root:
            spec["root"] = args.root
        if args.writable:
            spec["writable"] = list(spec.get("writable", ())) + args.writable
        if args.network:
            spec["network"] = True
        policy = Policy.from_dict(spec)
    except (OSError, ValueError) as e:
        print("pvmexec %s: policy: %s" % (command, describe(e)), file=sys.stderr)
        return 125
    trace = None
    # As with strace, any tracing option traces.
    if args.trace or args.output or args.expr or args.summary or args.paths or args.strsize != 32:
        from .kernel.trace import Tracer, trace_set
        try:
            calls = None
            for expr in args.expr:
                if not expr.startswith("trace="):
                    raise ValueError("-e %s: only trace=SET is understood" % expr)
                calls = trace_set(expr) if calls is None else calls | trace_set(expr)
        except ValueError as e:
            policy.close()
            print("pvmexec %s: %s" % (command, describe(e)), file=sys.stderr)
            return 125
        try:
            out = open_output(args.output) if args.output else sys.stderr
        except OSError as e:
            policy.close()
            print("pvmexec %s: -o %s: %s" % (command, args.output, e.strerror), file=sys.stderr)
            return 125
        trace = Tracer(out, calls=calls, summary=args.summary, strsize=args.strsize, show_paths=args.paths)
    return Sandbox(policy=policy, trace=trace, vdso=not args.no_vdso), policy


def _in_sandbox(box, policy, run):
    """run() with the terminal's signals (Ctrl-C, Ctrl-\\, a hang-up, a kill of this process) passed to
    the guest; afterwards the calls it made that the sandbox does not provide are named, once."""
    forwarded = (signal.SIGINT, signal.SIGQUIT, signal.SIGTERM, signal.SIGHUP, signal.SIGTSTP, signal.SIGCONT,
                 signal.SIGWINCH)
    box.stop_with_first = sys.stdin.isatty()   # Ctrl-Z that stops the program stops pvmexec for the shell
    previous = {sig: signal.signal(sig, lambda sig, frame: box.host_signal(sig)) for sig in forwarded}
    try:
        status = run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        policy.close()                     # its private directories (/dev/shm) go
    if box.unsupported:                    # once per run, as gVisor logs them: the calls that got ENOSYS
        import logging
        from .syscalls import name_of as _name
        logging.getLogger("pvmexec").warning("calls the sandbox does not provide got ENOSYS: %s" % ", ".join(
            sorted(_name(nr) for nr in box.unsupported)))
    return _exit_as(status)


def cmd_run(args):
    import errno
    import os
    from .kernel import Errno
    if args.program[:1] == ["--"]:
        args.program = args.program[1:]
    if not args.program:
        print("pvmexec run: no program given (pvmexec run [OPTIONS] -- PROGRAM [ARGS...])", file=sys.stderr)
        return 125
    made = _sandbox(args, "run")
    if isinstance(made, int):
        return made
    box, policy = made
    try:
        return _in_sandbox(box, policy, lambda: box.run(args.program))
    except FileNotFoundError as e:
        print("pvmexec run: %s" % e.strerror, file=sys.stderr)
        return 127
    except Errno as e:                     # the program cannot be executed (env's and docker's 126, 127)
        print("pvmexec run: %s: %s" % (args.program[0], os.strerror(e.errno)), file=sys.stderr)
        return 127 if e.errno == errno.ENOENT else 126
    except PvmexecError as e:
        print("pvmexec run: %s" % describe(e), file=sys.stderr)
        return 126
    except OSError as e:
        print("pvmexec run: %s: %s" % (args.program[0], e.strerror), file=sys.stderr)
        return 126


def _exit_as(status):
    """Our exit status for a child's wait status: its exit code, or death by its signal."""
    import os
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        sys.stdout.flush()
        sys.stderr.flush()
        # Die of the same signal, as the program would have (without a core dump of our own).
        try:
            import resource
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
            if sig not in (signal.SIGKILL, signal.SIGSTOP):
                signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, [sig])
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        return 128 + sig
    return os.WEXITSTATUS(status)


def cmd_restore(args):
    """The restored process runs as our child; we wait for it and end as it ends (unless --detach)."""
    from .checkpoint import restore
    if args.sandbox:
        return _restore_in_sandbox(args)
    given = _sandbox_options(args)
    if given:
        print("pvmexec restore: %s is an option of --sandbox" % given[0], file=sys.stderr)
        return 2
    if args.pid_ns and args.detach:
        print("pvmexec restore: --pid-ns cannot --detach: the namespace's first process is this command's, "
              "and the namespace ends with it", file=sys.stderr)
        return 2
    try:
        restored = restore(args.dir, pid_ns=args.pid_ns, lazy=args.lazy)
    except (PvmexecError, OSError) as e:
        print("pvmexec restore: %s" % describe(e), file=sys.stderr)
        return 1
    if args.detach:
        print("restored process %d (%d threads%s)" % (restored.pid, len(restored.threads),
                                                      ", stopped as it was dumped" if restored.stopped else ""))
        return 0
    if restored.stopped:
        print("pvmexec restore: process %d is stopped, as it was dumped; kill -CONT %d continues it" % (
            restored.pid, restored.pid), file=sys.stderr)
    # Terminal signals reach it directly (it is in our process group); a kill of this command
    # (timeout, a supervisor) is passed on, as a shell's exec would have it reach the program.
    import os
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP):
        signal.signal(sig, signal.SIG_IGN)
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGUSR1, signal.SIGUSR2):
        signal.signal(sig, lambda s, _f: os.kill(restored.pid, s))
    return _exit_as(restored.wait())            # retried after each handler (PEP 475)


def cmd_dump(args):
    import os
    import time
    from . import checkpoint as dumpmod
    tty = sys.stderr.isatty()

    def progress(rnd, pages, written):
        # The next round copies about what this one found written: the freeze if it is the last.
        line = "round %d: %d pages %s, %.1f MiB written, a freeze now would copy ~%.1f MiB" % (
            rnd, pages, "copied" if rnd == 1 else "dirtied", written / 2 ** 20, pages * 4096 / 2 ** 20)
        print(("\r" + line + "   ") if tty else line, end="" if tty else "\n", file=sys.stderr, flush=True)
    started = time.monotonic()

    def copying(rnd, done, expected, written):
        # Within a round, on a terminal only: pages copied of those expected, the rate, the time left.
        seconds = max(time.monotonic() - started, 1e-6)
        rate = written / seconds
        left = (expected - done) * 4096 / rate if rate else 0
        print("\rround %d: %d/%d pages (%d%%), %.0f MiB/s, about %.0f s left   " % (
            rnd, done, expected, 100 * done // max(expected, 1), rate / 2 ** 20, left),
            end="", file=sys.stderr, flush=True)
    diffs = []

    def verify(pid):
        diffs.extend(dumpmod.verify(args.dir, pid, frozen=True))
    try:
        m = dumpmod.dump(args.pid, args.dir, pre_dumps=args.pre_dumps, until_converged=args.until_converged,
                         leave_running=not args.kill, progress=progress, transfer=args.transfer,
                         copying=copying if tty else None, on_frozen=verify if args.verify else None)
    except (PvmexecError, OSError) as e:
        print(("\n" if tty else "") + "pvmexec dump: %s" % describe(e), file=sys.stderr)
        return 1
    if tty:
        print(file=sys.stderr)
    if diffs:
        for addr, what in diffs[:20]:
            print("%#x: %s" % (addr, what), file=sys.stderr)
        print("pvmexec dump: the image differs from the frozen process in %d pages" % len(diffs), file=sys.stderr)
        return 1
    print("dumped process %d to %s: %d rounds, %.1f MiB written, frozen %.1f ms, %.2f s in all; %s" % (
        args.pid, os.path.abspath(args.dir), len(m["rounds"]), m["bytes_written"] / 2 ** 20,
        m["freeze_seconds"] * 1e3, m["total_seconds"], "killed" if args.kill else "left running"))
    return 0


def cmd_image(args):
    """show: 0, or 2 for an image that cannot be read; verify: 0 same, 1 differ, 2 trouble (as cmp)."""
    from . import checkpoint as dumpmod
    try:
        if args.action == "show":
            img = dumpmod.Image(args.dir)
            print(json.dumps(img.readable(), indent=2) if args.json else img.summary())
            return 0
        diffs = dumpmod.verify(args.dir, args.pid)
    except (PvmexecError, OSError) as e:
        print("pvmexec image: %s" % describe(e), file=sys.stderr)
        return 2
    for addr, what in diffs[:20]:
        print("%#x: %s" % (addr, what))
    print("%s: %s" % (args.dir, "matches process %d" % args.pid if not diffs else "%d pages differ" % len(diffs)))
    return 0 if not diffs else 1


def cmd_bench(args):
    from . import bench
    return bench.main(args)


def cmd_image_or_usage(args):
    if args.action == "verify" and not args.pid:
        print("pvmexec image verify: give the PID to compare with", file=sys.stderr)
        return 2
    return cmd_image(args)


def _whole_number(text, least):
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError("%r is not a whole number" % text) from None
    if value < least:
        raise argparse.ArgumentTypeError("%s must be above 0" % text if least else "%s must not be negative" % text)
    return value


def positive_int(text):
    """An argparse type: a whole number above 0 (a pid, a count of iterations)."""
    return _whole_number(text, 1)


def counting_int(text):
    """An argparse type: a whole number of 0 or more."""
    return _whole_number(text, 0)


def _usage_status(parser, status):
    """Make a (sub)command's usage errors exit with status instead of argparse's 2."""
    def error(message):
        parser.print_usage(sys.stderr)
        parser.exit(status, "%s: error: %s\n" % (parser.prog, message))
    parser.error = error


def _sandbox_options(args):
    """The run options given (those that mean something only with --sandbox)."""
    given = [("--trace", args.trace), ("-o", args.output), ("-e", args.expr), ("-c", args.summary),
             ("-y", args.paths), ("-s", args.strsize != 32), ("--policy", args.policy), ("--root", args.root),
             ("--writable", args.writable), ("--network", args.network), ("--no-vdso", args.no_vdso)]
    return [name for name, value in given if value]


def _restore_in_sandbox(args):
    from .checkpoint import restore_in_sandbox
    for flag, name in ((args.detach, "--detach"), (args.pid_ns, "--pid-ns"), (args.lazy, "--lazy")):
        if flag:
            print("pvmexec restore: --sandbox cannot %s: the process runs in this command's kernel, its pids are "
                  "the kernel's, and its memory is written before it goes on" % name, file=sys.stderr)
            return 2
    made = _sandbox(args, "restore")
    if isinstance(made, int):
        return made
    box, policy = made

    def run():
        import os
        return restore_in_sandbox(args.dir, box, on_stopped=lambda: print(
            "pvmexec restore: the process is stopped, as it was dumped; kill -CONT %d continues it" % os.getpid(),
            file=sys.stderr))
    try:
        return _in_sandbox(box, policy, run)
    except (PvmexecError, OSError) as e:
        print("pvmexec restore: %s" % describe(e), file=sys.stderr)
        return 1


def _run_options(parser):
    """The sandbox's options, for run and restore --sandbox."""
    parser.add_argument("--trace", action="store_true",
                        help="print one strace-like line per syscall (to stderr, or to the file of -o)")
    parser.add_argument("-o", "--output", metavar="FILE",
                        help="write the trace to FILE (a new file, or an existing file that is not executable)")
    parser.add_argument("-e", dest="expr", action="append", default=[], metavar="trace=SET",
                        help="trace only SET: names and classes, comma-separated (trace=openat,%%process; "
                             "classes %%file %%process %%network %%signal %%memory %%desc; !SET for all but SET)")
    parser.add_argument("-c", dest="summary", action="store_true",
                        help="count time, calls and errors per syscall and print a summary at exit, instead of lines")
    parser.add_argument("-s", dest="strsize", type=positive_int, default=32, metavar="N",
                        help="show at most N bytes of buffers and strings (default 32)")
    parser.add_argument("-y", dest="paths", action="store_true", help="print paths beside descriptors")
    parser.add_argument("--policy", metavar="FILE",
                        help='JSON: {"root": DIR, "writable": [PATH, ...], "network": false}')
    parser.add_argument("--root", metavar="DIR", help="host directory the program sees as / (default /)")
    parser.add_argument("--writable", action="append", metavar="PATH", default=[],
                        help="a guest path below which the program may write (repeatable)")
    parser.add_argument("--network", action="store_true", help="allow sockets (denied by default)")
    parser.add_argument("--no-vdso", action="store_true",
                        help="hide the vDSO, so that time calls reach the kernel")


def build_parser():
    common = argparse.ArgumentParser(add_help=False)
    # SUPPRESS: given before or after the command, a subcommand's default must not undo it
    common.add_argument("-q", "--quiet", action="store_true", default=argparse.SUPPRESS,
                        help="print errors only (no warnings)")
    common.add_argument("-v", "--verbose", action="count", default=argparse.SUPPRESS,
                        help="say what pvmexec does (-vv: and in detail)")
    p = argparse.ArgumentParser(parents=[common],
        prog="pvmexec",
        description="Execute system calls and code inside another process's address space "
                    "(user-space process_vm_exec).")
    p.add_argument("--version", action="version", version="pvmexec " + __version__)
    sub = p.add_subparsers(dest="command", metavar="COMMAND")

    s = sub.add_parser("syscall", parents=[common], help="run one system call inside a process",
                       description="Run one system call inside process PID, with its descriptors and "
                                   "memory, and print the result or the error by name. Arguments are "
                                   "integers (42, 0x2a, -1) or strings, which are placed in the "
                                   "target's memory for the call (force with s:TEXT or i:NUMBER).")
    s.add_argument("pid", type=positive_int, metavar="PID")
    s.add_argument("name", metavar="NAME", help="system call name (openat) or number (257)")
    s.add_argument("args", nargs="*", metavar="ARG")
    s.add_argument("--freeze", action="store_true", help="stop all threads of the target meanwhile")
    s.add_argument("--hex", action="store_true", help="print the result in hex")
    s.add_argument("--engine", choices=("ptrace", "agent", "auto"), default="ptrace",
                   help="ptrace (default: nothing added to the target for one call) or agent")
    s.set_defaults(func=cmd_syscall)

    r = sub.add_parser("run", parents=[common], help="run a program in the sandbox (every syscall handled by pvmexec's kernel)",
                       description="Run PROGRAM in a stub address space of its own; each of its system "
                                   "calls is carried out by pvmexec's application kernel (Python), which "
                                   "reaches host files only through the policy: everything under ROOT "
                                   "read-only, and writable paths below it. stdin, stdout, stderr and the "
                                   "exit status are the program's.")
    _run_options(r)
    r.add_argument("program", nargs=argparse.REMAINDER, metavar="PROGRAM [ARGS...]")
    r.set_defaults(func=cmd_run)
    _usage_status(r, 125)                  # pvmexec's own failure, as env, timeout and docker run say it

    d = sub.add_parser("dump", parents=[common], help="checkpoint a running process: pre-dumps while it runs, then a short freeze",
                       description="Dump process PID into DIR (new or empty): rounds that copy the pages "
                                   "written since the last one while it runs (userfaultfd write-protect and "
                                   "PAGEMAP_SCAN), then a final round with every thread frozen, and its "
                                   "threads' and process's state. Progress on a terminal.")
    d.add_argument("pid", type=positive_int, metavar="PID")
    d.add_argument("dir", metavar="DIR")
    how = d.add_mutually_exclusive_group()
    how.add_argument("--pre-dumps", type=counting_int, default=2, metavar="N", help="rounds while running (default 2)")
    how.add_argument("--until-converged", action="store_true",
                     help="pre-dump until a round copies at most 8 MiB or stops shrinking")
    d.add_argument("--transfer", choices=("readv", "vmsplice"), default="readv",
                   help="how pre-dump pages reach the image: process_vm_readv by us (default; the target keeps "
                        "its CPU) or vmsplice by the agent (faster, but the work runs in the target)")
    end = d.add_mutually_exclusive_group()
    end.add_argument("--leave-running", action="store_true", help="let it go on afterwards (the default)")
    end.add_argument("--kill", action="store_true", help="kill it once dumped")
    d.add_argument("--verify", action="store_true",
                   help="compare the image with the process while it is still frozen (status 1 if they differ)")
    d.set_defaults(func=cmd_dump)

    rs = sub.add_parser("restore", parents=[common], help="bring a dumped process back to life from its image",
                        description="Restore the process dumped in DIR, with its pid and thread ids (they must be "
                                    "free: dump with --kill, or end the original), memory, registers, signal "
                                    "handlers, masks and pending signals, timers, limits, working directory and "
                                    "descriptors (files reopened at their offsets; terminals and stdio pipes "
                                    "attached to this command's). Waits for it and exits as it does. With "
                                    "--sandbox it goes on inside pvmexec run's kernel instead.")
    rs.add_argument("dir", metavar="DIR")
    rs.add_argument("--detach", "-d", action="store_true", help="return once it runs instead of waiting for it")
    rs.add_argument("--lazy", action="store_true",
                    help="let it run before its memory is read: each page is filled from the image when first "
                         "touched, the rest in the background (userfaultfd; root)")
    rs.add_argument("--pid-ns", action="store_true",
                    help="in a new pid namespace, where its pid and thread ids are free whatever runs here (root)")
    rs.add_argument("--sandbox", action="store_true",
                    help="go on inside the sandbox, under pvmexec run's kernel, its policy and tracing (the run "
                         "options below): its pid and thread ids are the kernel's, its descriptors held by it")
    _run_options(rs.add_argument_group("with --sandbox, as for pvmexec run"))
    rs.set_defaults(func=cmd_restore)

    im = sub.add_parser("image", parents=[common], help="show an image, or verify it against a process",
                        description="show DIR: a readable summary. verify DIR PID: compare the image's memory "
                                    "with process PID's, page by page (the process is frozen meanwhile).")
    im.add_argument("action", choices=("show", "verify"))
    im.add_argument("dir", metavar="DIR")
    im.add_argument("pid", type=int, nargs="?", metavar="PID")
    im.add_argument("--json", action="store_true", help="show: the manifest as JSON, registers by name")
    im.set_defaults(func=cmd_image_or_usage)

    b = sub.add_parser("bench", parents=[common], help="measure both process_vm_exec modes (self-contained)",
                       description="Reproduce the proposal's measurements: mode 1 syscall and fault "
                                   "loops, mode 2 latency, single and batched; true µs per round trip "
                                   "beside the published figures. Starts its own target processes.")
    b.add_argument("--json", action="store_true", help="print one JSON object")
    b.add_argument("--iterations", type=positive_int, default=20000, help="round trips per C-level loop")
    b.add_argument("--quick", action="store_true", help="a few hundred round trips (smoke test)")
    b.add_argument("what", nargs="?", choices=("engines", "sandbox", "dump", "restore"), default="engines",
                   help="engines (default): both modes, every engine; sandbox: pvmexec run against native "
                        "runs, the ptrace engine and strace; dump: live checkpoint against stop-the-world; "
                        "restore: migration downtime, dump + restore, with and without pre-dumps (root)")
    b.set_defaults(func=cmd_bench)
    c = sub.add_parser("completion", parents=[common], help="print a shell completion script",
                       description="Print the completion script for SHELL (generated from this parser by "
                                   "shtab); e.g. pvmexec completion bash > /etc/bash_completion.d/pvmexec")
    c.add_argument("shell", choices=("bash", "zsh", "tcsh"), metavar="SHELL", help="bash, zsh or tcsh")
    c.set_defaults(func=cmd_completion)
    m = sub.add_parser("man", parents=[common], help="print the manual page (roff, generated from this parser)",
                       description="Print pvmexec(1) in roff; e.g. pvmexec man | man -l -")
    m.set_defaults(func=cmd_man)
    return p


def cmd_completion(args):
    import shtab
    print(shtab.complete(build_parser(), shell=args.shell))
    return 0


def cmd_man(args):
    from argparse_manpage.manpage import Manpage
    parser = build_parser()
    page = Manpage(parser, _data={"project_name": "pvmexec", "version": __version__,
                                  "description": "execute system calls and code inside another process's "
                                                 "address space", "url": "", "authors": []})
    print(str(page))
    return 0


def _setup_logging(args):
    """-q: errors only; default: warnings; -v: what pvmexec does; -vv: in detail. The library logs to the
    "pvmexec" logger and warns with warnings.warn; both print here as `pvmexec: warning: ...`."""
    import logging
    import warnings
    quiet, verbose = getattr(args, "quiet", False), getattr(args, "verbose", 0)
    level = logging.ERROR if quiet else (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbose, 2)]
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LowerLevelFormatter("pvmexec: %(levelname)s: %(message)s"))
    log = logging.getLogger("pvmexec")
    log.handlers[:] = [handler]
    log.setLevel(level)
    log.propagate = False

    def show(message, category, filename, lineno, file=None, line=None):
        log.warning(str(message).removeprefix("pvmexec: "))
    warnings.showwarning = show
    if quiet:
        warnings.simplefilter("ignore")


class _LowerLevelFormatter(__import__("logging").Formatter):
    def format(self, record):
        record.levelname = record.levelname.lower()
        return super().format(record)


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    _setup_logging(args)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:                # `pvmexec bench | head`: the reader left, as for any filter
        import os
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 128 + 13


if __name__ == "__main__":
    sys.exit(main())
