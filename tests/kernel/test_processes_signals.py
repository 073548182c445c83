"""Guest processes and signals: fork, wait, exit statuses, handlers, signals from outside."""
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import pytest
from pvmexec.kernel import Errno, Sandbox

from helpers import *  # noqa: F401,F403
from helpers import _children


def test_termination_by_signal_is_the_programs(cc, tmp_path):
    prog = build(cc, tmp_path, r"""
        #include <stdlib.h>
        #include <stdio.h>
        #include <string.h>
        #include <signal.h>
        int main(int argc, char **argv) {
            if (!strcmp(argv[1], "abort")) abort();
            if (!strcmp(argv[1], "segv")) *(volatile int *)8 = 1;
            if (!strcmp(argv[1], "kill")) { signal(SIGTERM, SIG_IGN); raise(SIGTERM); puts("ignored"); raise(SIGKILL); }
            return 0;
        }
    """)
    for how, sig in (("abort", signal.SIGABRT), ("segv", signal.SIGSEGV), ("kill", signal.SIGKILL)):
        got = same_as_native([prog, how])
        assert got.returncode == -sig, how


SHELL_SCRIPT = r"""
set -e
echo start
ls . | sort -r | head -n 2
cat a.txt | sort | tr a-z A-Z > /dev/null
x=$(echo captured); echo "$x"
(exit 5) || echo "subshell $?"
sleep 0.1 & echo "background $(test -n "$!" && echo started)"; wait; echo "waited $?"
trap 'echo caught USR1' USR1; kill -USR1 $$; echo after-trap
sleep 5 & victim=$!; kill $victim; wait $victim || echo "killed $?"
yes | head -n 3
find . -name '*.txt' | sort | xargs cat | wc -l
sh -c 'exit 7' || echo "child shell $?"
exec echo exec-ed
"""


def test_busybox_sh_with_processes_pipes_and_signals(busybox, tree):
    env = dict(os.environ, PATH=os.path.dirname(busybox) + ":/usr/bin:/bin")
    links = tree.parent / "bin"
    links.mkdir()
    for applet in ("sh", "ls", "sort", "head", "cat", "tr", "sleep", "yes", "find", "xargs", "wc", "echo", "test"):
        os.symlink(busybox, links / applet)
    env["PATH"] = "%s:/usr/bin:/bin" % links
    argv = [str(links / "sh"), "-c", SHELL_SCRIPT]
    want, got = native(argv, cwd=str(tree), env=env), sandboxed(argv, "-q", cwd=str(tree), env=env)
    # Whether ash reports the killed job ("Terminated") depends on when it reaps it, natively too.
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout)
    assert got.stderr.replace(b"Terminated\n", b"") == want.stderr.replace(b"Terminated\n", b"") == b""
    assert got.stdout.endswith(b"exec-ed\n") and b"caught USR1\nafter-trap\n" in got.stdout
    assert b"killed 143" in got.stdout and b"child shell 7" in got.stdout


def test_fork_wait_and_signal_handlers_in_c(cc, tmp_path):
    prog = build(cc, tmp_path, r"""
        #define _GNU_SOURCE
        #include <signal.h>
        #include <stdio.h>
        #include <stdlib.h>
        #include <string.h>
        #include <unistd.h>
        #include <sys/wait.h>
        static volatile sig_atomic_t got, seen_code;
        static char altstack[65536];
        static void on_usr1(int sig, siginfo_t *si, void *uc) { got = sig; seen_code = si->si_code; }
        static void on_segv(int sig, siginfo_t *si, void *uc) {
            char *sp = (char *)&sig;
            printf("segv at %p on altstack %d\n", si->si_addr, sp >= altstack && sp < altstack + sizeof altstack);
            fflush(stdout);
            _exit(11);
        }
        int main(void) {
            int heap_value = 1;
            pid_t c = fork();
            if (c == 0) { heap_value = 2; printf("child sees %d\n", heap_value); fflush(stdout); _exit(3); }
            int st;
            waitpid(c, &st, 0);
            printf("parent sees %d, child exited %d\n", heap_value, WEXITSTATUS(st));
            struct sigaction sa = {0};
            sa.sa_sigaction = on_usr1;
            sa.sa_flags = SA_SIGINFO;
            sigaction(SIGUSR1, &sa, 0);
            sigset_t block, old;
            sigemptyset(&block); sigaddset(&block, SIGUSR1);
            sigprocmask(SIG_BLOCK, &block, &old);
            kill(getpid(), SIGUSR1);
            printf("blocked: got %d\n", got);
            sigprocmask(SIG_SETMASK, &old, 0);
            printf("unblocked: got %d code %d\n", got, seen_code);
            c = fork();
            if (c == 0) { pause(); _exit(0); }
            kill(c, SIGTERM);
            waitpid(c, &st, 0);
            printf("child killed by %d\n", WTERMSIG(st));
            stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack};
            sigaltstack(&ss, 0);
            sa.sa_sigaction = on_segv;
            sa.sa_flags = SA_SIGINFO | SA_ONSTACK;
            sigaction(SIGSEGV, &sa, 0);
            *(volatile int *)64 = 1;
            return 0;
        }
    """)
    got = same_as_native([prog])
    assert got.returncode == 11
    assert got.stdout.decode().splitlines() == [
        "child sees 2", "parent sees 1, child exited 3", "blocked: got 0", "unblocked: got 10 code 0",
        "child killed by 15", "segv at 0x40 on altstack 1"]


def test_guest_processes_left_running_are_ended_with_the_run(busybox, tmp_path):
    box = Sandbox()
    status, out = run_captured(box, [busybox, "sh", "-c", "sleep 30 & echo started"], tmp_path)
    assert (status, out) == (0, b"started\n")
    assert box._procs == {} and _children() == set()


def _run_then_signal(argv, sig):
    proc = subprocess.Popen([PY, "-m", "pvmexec", "run", "--"] + argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"ready\n"
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=30)
        return proc.returncode, out, err
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


def test_signals_sent_to_pvmexec_run_reach_the_program(busybox):
    # A handler in a guest that makes no system calls at all: the guest is interrupted to run it.
    rc, out, _ = _run_then_signal([busybox, "sh", "-c", 'trap "echo got INT; exit 3" INT; echo ready; '
                                   'while :; do :; done'], signal.SIGINT)
    assert (rc, out) == (3, b"got INT\n")
    rc, out, _ = _run_then_signal([busybox, "sh", "-c", "echo ready; while :; do :; done"], signal.SIGINT)
    assert rc == -signal.SIGINT                                   # died of it, as the program would
    rc, out, _ = _run_then_signal([busybox, "sh", "-c", "echo ready; exec sleep 30"], signal.SIGTERM)
    assert rc == -signal.SIGTERM
    assert _children() == set()
