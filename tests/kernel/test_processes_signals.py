"""Guest processes and signals: fork, wait, exit statuses, handlers, signals from outside."""
import errno
import json
import os
import signal
import struct
import subprocess
import sys
import textwrap
import time
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


def test_a_child_killed_while_it_forks_or_execs_dies_of_that_signal():
    # kill right after fork reaches the child in fork's or execve's handler, where the stub it ran on
    # goes: it must die of SIGTERM (143), never SIGKILL, SIGSEGV or an internal error.
    script = 'for i in $(seq 40); do /bin/sleep 5 & v=$!; kill $v; wait $v; echo -n "$? "; done'
    for shell in ("/bin/bash", "/bin/dash"):
        got = sandboxed([shell, "-c", script], "-q")
        assert got.returncode == 0 and got.stdout.split() == [b"143"] * 40, (shell, got.stdout)
        assert b"internal error" not in got.stderr and b"Killed" not in got.stderr, got.stderr


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


TIMERS = r"""
#define _GNU_SOURCE
#include <signal.h>
#include <stdio.h>
#include <string.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>
static volatile int alarms, ticks, posix_hits, value_seen;
static void on_alarm(int s) { alarms++; }
static void on_tick(int s) { ticks++; }
static void on_posix(int s, siginfo_t *si, void *u) { posix_hits++; value_seen = si->si_value.sival_int; }
int main(void) {
    char stack[65536];
    stack_t ss = {.ss_sp = stack, .ss_size = sizeof stack};
    sigaltstack(&ss, NULL);
    struct sigaction a = {.sa_handler = on_alarm, .sa_flags = SA_ONSTACK};
    sigaction(SIGALRM, &a, NULL);
    alarm(1);
    printf("left %u\n", alarm(1));               /* the first alarm's seconds, rounded up */
    pause();                                      /* never restarted: EINTR after the handler */
    printf("alarm %d\n", alarms);
    struct sigaction t = {.sa_handler = on_tick};
    sigaction(SIGVTALRM, &t, NULL);
    struct itimerval iv = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_VIRTUAL, &iv, NULL);
    while (ticks < 3)
        ;
    memset(&iv, 0, sizeof iv);
    setitimer(ITIMER_VIRTUAL, &iv, NULL);
    printf("ticks %d\n", ticks >= 3);
    struct sigaction p = {.sa_sigaction = on_posix, .sa_flags = SA_SIGINFO};
    sigaction(SIGRTMIN, &p, NULL);
    struct sigevent ev = {.sigev_notify = SIGEV_SIGNAL, .sigev_signo = SIGRTMIN, .sigev_value.sival_int = 42};
    timer_t id;
    if (timer_create(CLOCK_MONOTONIC, &ev, &id)) return 2;
    struct itimerspec its = {{0, 0}, {0, 50000000}};
    timer_settime(id, 0, &its, NULL);
    struct timespec req = {2, 0}, rem = {0, 0};
    int r = nanosleep(&req, &rem);                 /* cut short by the timer's signal */
    printf("posix %d value %d nanosleep %d rem %d\n", posix_hits, value_seen, r, rem.tv_sec >= 1);
    timer_delete(id);
    return 0;
}
"""


def test_alarm_interval_and_posix_timers(cc, tmp_path):
    prog = build(cc, tmp_path, TIMERS, "-static")
    want, got = native([prog]), sandboxed([prog], "-q")
    assert got.returncode == want.returncode == 0, got.stderr
    assert got.stdout == want.stdout == b"left 1\nalarm 1\nticks 1\nposix 1 value 42 nanosleep -1 rem 1\n"


def test_timeout_of_coreutils_ends_its_command(tmp_path):
    import time
    t0 = time.monotonic()
    got = sandboxed(["timeout", "1", "sleep", "10"])
    assert got.returncode == 124 and time.monotonic() - t0 < 8           # it hung before: no alarm() timers


def test_a_daemon_outlives_the_parent_that_forked_it(tmp_path):
    """`(cmd &)`: the background process's parent exits at once; the process goes on (its stub used to
    die with the guest thread that forked it)."""
    script = "mkfifo ff; (echo through-fifo > ff &); cat ff; ( (sleep 0.3; echo late > f) & ); sleep 1; cat f"
    for where in ("native", "boxed"):
        work = tmp_path / where
        work.mkdir()
        run = native(["bash", "-c", script], cwd=work) if where == "native" else \
            sandboxed(["bash", "-c", script], "-q", "--writable", str(work), cwd=work)
        assert (run.returncode, run.stdout) == (0, b"through-fifo\nlate\n"), run.stderr


def test_stop_continue_and_wait_for_them(tmp_path):
    """SIGSTOP/SIGTSTP stop a process, SIGCONT resumes it, and the parent hears of both through wait."""
    # The child gets a process group of its own (both sides set it, as shells do): in an orphaned group
    # (a test run whose parent has gone) the kernel would discard SIGTSTP.
    code = textwrap.dedent("""
        import os, signal, time
        pid = os.fork()
        if pid == 0:
            os.setpgid(0, 0)
            while True:
                time.sleep(0.01)
        os.setpgid(pid, pid)
        os.kill(pid, signal.SIGSTOP)
        _, st = os.waitpid(pid, os.WUNTRACED)
        print("stopped", os.WIFSTOPPED(st), os.WSTOPSIG(st), open("/proc/%d/stat" % pid).read().split()[2])
        os.kill(pid, signal.SIGCONT)
        _, st = os.waitpid(pid, os.WCONTINUED)
        print("continued", os.WIFCONTINUED(st))
        os.kill(pid, signal.SIGTSTP)
        info = os.waitid(os.P_PID, pid, os.WSTOPPED)
        print("waitid", info.si_code == os.CLD_STOPPED, info.si_status)
        os.kill(pid, signal.SIGKILL)
        _, st = os.waitpid(pid, 0)
        print("killed", os.WTERMSIG(st))
    """)
    same_as_native([PYTHON3, "-c", code], cwd=tmp_path)


def test_the_runs_own_dev_shm_goes_even_when_pvmexec_is_killed(tmp_path):
    """/dev/shm is the run's own directory: removed at the end, and by the janitor after a SIGKILL."""
    def ours():
        return {n for n in os.listdir("/dev/shm") if n.startswith("pvmexec-private-")} if os.path.isdir("/dev/shm") \
            else set()
    before = ours()
    got = sandboxed(["bash", "-c", "echo x > /dev/shm/f && cat /dev/shm/f && ls /dev/shm"], "-q")
    assert got.stdout == b"x\nf\n" and ours() == before
    proc = subprocess.Popen([PY, "-m", "pvmexec", "run", "-q", "--", "bash", "-c",
                             "echo x > /dev/shm/f; echo made; sleep 60"], stdout=subprocess.PIPE)
    try:
        assert proc.stdout.readline() == b"made\n"
        assert len(ours() - before) == 1
        proc.kill()
        proc.wait(10)
        deadline = time.monotonic() + 10
        while ours() != before and time.monotonic() < deadline:
            time.sleep(0.05)
        assert ours() == before
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stdout.close()
