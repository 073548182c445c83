/* A guest fuzzer: random syscall numbers with random arguments, in batches, each batch in a child of
 * its own (a call that wrecks the child's memory or signals ends that batch only). Calls that end, replace
 * or make processes, send signals or unmap memory are left out: they test nothing of the kernel's argument
 * handling. A batch that blocks is killed after a second (counted as hung).
 * usage: fuzz SEED CALLS BATCH; prints "batches N crashed M hung H calls C" (C: calls made) */
#define _GNU_SOURCE
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <unistd.h>

static const int skip[] = {
    SYS_exit, SYS_exit_group, SYS_execve, SYS_execveat, SYS_fork, SYS_vfork, SYS_clone, SYS_clone3,
    SYS_kill, SYS_tkill, SYS_tgkill, SYS_rt_sigqueueinfo, SYS_rt_tgsigqueueinfo, SYS_pidfd_send_signal,
    SYS_rt_sigreturn, SYS_munmap, SYS_mmap, SYS_mremap, SYS_mprotect, SYS_brk, SYS_madvise, SYS_arch_prctl,
    SYS_set_tid_address, SYS_rt_sigaction, SYS_sigaltstack, SYS_alarm, SYS_setitimer, SYS_timer_create,
    SYS_timer_settime, SYS_prctl, SYS_seccomp, SYS_shmdt, SYS_shmat, SYS_process_vm_writev, SYS_ptrace,
    SYS_rseq, SYS_set_robust_list, SYS_pkey_mprotect, SYS_remap_file_pages, SYS_io_uring_setup,
    SYS_pause, SYS_rt_sigsuspend, SYS_nanosleep, SYS_clock_nanosleep, SYS_futex, SYS_select, SYS_pselect6,
    SYS_poll, SYS_ppoll, SYS_epoll_wait, SYS_epoll_pwait, SYS_rt_sigtimedwait,     /* they wait by design */
};

static uint64_t state;
static long done;
static uint64_t rnd(void)
{
    state ^= state << 13;
    state ^= state >> 7;
    state ^= state << 17;
    return state;
}

static char scratch[8192];
static const char *paths[] = {"f", "d/", "/", "/etc/passwd", "/proc/self/status", "/dev/null", "..", "",
                              "/proc/self/fd/0", "/tmp", "x/../y", "/sys/kernel"};

static uint64_t arg(void)
{
    switch (rnd() % 8) {
    case 0: return rnd() % 8;
    case 1: return (uint64_t)-1;
    case 2: return rnd();
    case 3: return (uint64_t)(uintptr_t)(scratch + rnd() % 4096);
    case 4: return (uint64_t)(uintptr_t)paths[rnd() % (sizeof paths / sizeof paths[0])];
    case 5: return 1ULL << (rnd() % 64);
    case 6: return (uint64_t)-100;          /* AT_FDCWD */
    default: return rnd() % 4096;
    }
}

static int skipped(long nr)
{
    for (unsigned i = 0; i < sizeof skip / sizeof skip[0]; i++)
        if (skip[i] == nr)
            return 1;
    return 0;
}

int main(int argc, char **argv)
{
    if (argc < 4)
        return 2;
    state = strtoull(argv[1], 0, 0) | 1;
    long calls = atol(argv[2]), batch = atol(argv[3]), batches = 0, crashed = 0, hung = 0;
    while (done < calls) {
        uint64_t seed = rnd();
        int progress[2];
        if (pipe(progress) || dup2(progress[1], 999) != 999)
            return 4;
        close(progress[1]);
        pid_t pid = fork();
        if (pid == 0) {
            state = seed | 1;
            close(0);
            close(1);
            close(2);
            close(progress[0]);
            static const int quiet[] = {SIGPIPE, SIGXFSZ, SIGTTOU, SIGTTIN, SIGTSTP, SIGHUP, SIGXCPU, SIGURG};
            for (unsigned j = 0; j < sizeof quiet / sizeof quiet[0]; j++)
                signal(quiet[j], SIG_IGN);
            for (long i = 0; i < batch; i++) {
                long nr;
                do
                    nr = (long)(rnd() % 471);
                while (skipped(nr));
                for (unsigned j = 0; j < sizeof scratch; j += 8)
                    *(uint64_t *)(scratch + j) = rnd() % 3 ? rnd() : 0;
                scratch[sizeof scratch - 1] = 0;
                syscall(nr, arg(), arg(), arg(), arg(), arg(), arg());
                if (write(999, "", 1) != 1)        /* one byte per call made: the parent counts them */
                    _exit(5);
            }
            _exit(0);
        }
        int status = 0, waited = 0;
        if (pid < 0)
            return 3;
        while (waitpid(pid, &status, WNOHANG) == 0) {
            if (++waited == 100) {
                kill(pid, SIGKILL);
                hung++;
            }
            usleep(10000);
        }
        if (!WIFEXITED(status) || WEXITSTATUS(status))
            crashed++;
        close(999);
        char buf[4096];
        ssize_t got;
        while ((got = read(progress[0], buf, sizeof buf)) > 0)
            done += got;
        close(progress[0]);
        batches++;
    }
    printf("batches %ld crashed %ld hung %ld calls %ld\n", batches, crashed, hung, done);
    return 0;
}
