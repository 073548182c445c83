/*
 * Victim for pvmexec's tests: it checks its own state, so the tests observe
 * harm instead of trusting the engine. Modes (argv[1]):
 *   regs      spin with known values in every general register, xmm0-15, MXCSR
 *             and the x87 control word; on SIGUSR1 report "regs ok" or what changed
 *   read      block in read(0); print "read N <data>" for what arrives
 *   sleep MS  clock_nanosleep MS ms; print "slept <elapsed ms> rc=<ret>"
 *   nanosleep MS  the same with nanosleep() (restart through restart_syscall)
 *   ppoll     ppoll(0) with SIGUSR2 unblocked temporarily while SIGUSR2 is blocked;
 *             on input print the signal mask afterwards
 *   pending   block SIGUSR1, wait on stdin; then unblock and print handler counts and si_pid
 *   sigpipe   block SIGPIPE (counted by a handler), wait on stdin; then unblock, print "sigpipe N"
 *   threads   a worker thread counts in `counter`; print its address; main waits on stdin
 *   seccomp   install a filter (getppid: kill, getuid: EPERM, getgid: trap), then as wait
 *   tsync     on a line of input, install that filter on every thread (SECCOMP_FILTER_FLAG_TSYNC);
 *             print "filtered <result>"; then as wait
 *   strict    enter seccomp strict mode, read stdin, write "strict ok", exit
 *   fork      on a line of input, fork a child that sleeps 10 s; print "child <pid>"; then as wait
 *   children  count SIGCHLDs; on each line of input print what waitpid(-1, WNOHANG) and
 *             waitpid(-1, WNOHANG | __WALL) return ("children wait R/ERRNO wall R/ERRNO chld N");
 *             exit 0 on "q" or end of input
 *   exec      on a line of input, execv itself as "children"
 *   wait      wait on stdin, then exit 0 (a quiet target)
 *   nommap-MODE  refuse every mmap (a filter: EPERM), then as MODE: a target where no trampoline can be made
 * Every mode first prints "ready <pid>" and flushes.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <poll.h>
#include <pthread.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>
#include <unistd.h>
#include <sys/syscall.h>
#include <sys/prctl.h>
#include <sys/wait.h>
#include <stddef.h>
#include <linux/audit.h>
#include <linux/filter.h>
#include <linux/seccomp.h>

static volatile sig_atomic_t usr1_count, usr2_count, bus_count, report_now;
static volatile int usr1_pid, usr1_code;
volatile uint64_t counter;

static void on_usr1(int sig, siginfo_t *si, void *uc)
{
    (void)sig; (void)uc;
    usr1_count++;
    usr1_pid = si->si_pid;
    usr1_code = si->si_code;
    report_now = 1;
}

static void on_usr2(int sig) { (void)sig; usr2_count++; }
static volatile sig_atomic_t chld_count;
static void on_chld(int sig) { (void)sig; chld_count++; }
static void on_bus(int sig) { (void)sig; bus_count++; }
static volatile sig_atomic_t pipe_count;
static void on_pipe(int sig) { (void)sig; pipe_count++; }

static double now_ms(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static void install(void)
{
    struct sigaction sa;
    memset(&sa, 0, sizeof sa);
    sa.sa_sigaction = on_usr1;
    sa.sa_flags = SA_SIGINFO;
    sigaction(SIGUSR1, &sa, NULL);
    signal(SIGUSR2, on_usr2);
    signal(SIGBUS, on_bus);
}

/* Spin with known register values until report_now; returns a bit set of registers that changed. */
static uint64_t spin_regs(void)
{
    uint64_t bad = 0;
    static const uint64_t xmm_pattern[2] = {0x0123456789abcdefULL, 0xfedcba9876543210ULL};
    uint32_t mxcsr = 0x7f80 | 0x6000;      /* round toward zero, all masked */
    uint16_t fcw = 0x0f7f;                 /* extended precision, round toward zero */
    __asm__ volatile(
        "ldmxcsr %[mx]\n"
        "fldcw %[cw]\n"
        "movdqu %[xp], %%xmm0\n"
        "movdqa %%xmm0, %%xmm1\n movdqa %%xmm0, %%xmm2\n movdqa %%xmm0, %%xmm3\n"
        "movdqa %%xmm0, %%xmm4\n movdqa %%xmm0, %%xmm5\n movdqa %%xmm0, %%xmm6\n"
        "movdqa %%xmm0, %%xmm7\n movdqa %%xmm0, %%xmm8\n movdqa %%xmm0, %%xmm9\n"
        "movdqa %%xmm0, %%xmm10\n movdqa %%xmm0, %%xmm11\n movdqa %%xmm0, %%xmm12\n"
        "movdqa %%xmm0, %%xmm13\n movdqa %%xmm0, %%xmm14\n movdqa %%xmm0, %%xmm15\n"
        "push %%rbx\n push %%rbp\n push %%r12\n push %%r13\n push %%r14\n push %%r15\n"
        "mov $0x1111111111111111, %%rbx\n mov $0x2222222222222222, %%rbp\n"
        "mov $0x3333333333333333, %%r12\n mov $0x4444444444444444, %%r13\n"
        "mov $0x5555555555555555, %%r14\n mov $0x6666666666666666, %%r15\n"
        "mov $0x7777777777777777, %%r8\n mov $0x8888888888888888, %%r9\n"
        "mov $0x9999999999999999, %%r10\n mov $0xaaaaaaaaaaaaaaaa, %%r11\n"
        "mov $0xbbbbbbbbbbbbbbbb, %%rsi\n mov $0xcccccccccccccccc, %%rdi\n"
        "mov $0xdddddddddddddddd, %%rdx\n mov $0xeeeeeeeeeeeeeeee, %%rcx\n"
        "1:\n"
        "mov $0x1111111111111111, %%rax\n cmp %%rax, %%rbx\n jne 2f\n"
        "mov $0x2222222222222222, %%rax\n cmp %%rax, %%rbp\n jne 2f\n"
        "mov $0x3333333333333333, %%rax\n cmp %%rax, %%r12\n jne 2f\n"
        "mov $0x4444444444444444, %%rax\n cmp %%rax, %%r13\n jne 2f\n"
        "mov $0x5555555555555555, %%rax\n cmp %%rax, %%r14\n jne 2f\n"
        "mov $0x6666666666666666, %%rax\n cmp %%rax, %%r15\n jne 2f\n"
        "mov $0x7777777777777777, %%rax\n cmp %%rax, %%r8\n jne 2f\n"
        "mov $0x8888888888888888, %%rax\n cmp %%rax, %%r9\n jne 2f\n"
        "mov $0x9999999999999999, %%rax\n cmp %%rax, %%r10\n jne 2f\n"
        "mov $0xaaaaaaaaaaaaaaaa, %%rax\n cmp %%rax, %%r11\n jne 2f\n"
        "mov $0xbbbbbbbbbbbbbbbb, %%rax\n cmp %%rax, %%rsi\n jne 2f\n"
        "mov $0xcccccccccccccccc, %%rax\n cmp %%rax, %%rdi\n jne 2f\n"
        "mov $0xdddddddddddddddd, %%rax\n cmp %%rax, %%rdx\n jne 2f\n"
        "mov $0xeeeeeeeeeeeeeeee, %%rax\n cmp %%rax, %%rcx\n jne 2f\n"
        "movdqu %[xp], %%xmm15\n"
        "pcmpeqb %%xmm0, %%xmm15\n pmovmskb %%xmm15, %%eax\n cmp $0xffff, %%eax\n jne 3f\n"
        "movdqu %[xp], %%xmm15\n"
        "pcmpeqb %%xmm7, %%xmm15\n pmovmskb %%xmm15, %%eax\n cmp $0xffff, %%eax\n jne 3f\n"
        "movdqu %[xp], %%xmm15\n"
        "pcmpeqb %%xmm14, %%xmm15\n pmovmskb %%xmm15, %%eax\n cmp $0xffff, %%eax\n jne 3f\n"
        "movdqu %[xp], %%xmm15\n"
        "cmpl $0, %[flag]\n je 1b\n"
        "xor %%eax, %%eax\n jmp 4f\n"
        "2: mov $1, %%eax\n jmp 4f\n"
        "3: mov $2, %%eax\n"
        "4:\n"
        "pop %%r15\n pop %%r14\n pop %%r13\n pop %%r12\n pop %%rbp\n pop %%rbx\n"
        : "=a"(bad)
        : [mx] "m"(mxcsr), [cw] "m"(fcw), [xp] "m"(xmm_pattern), [flag] "m"(report_now)
        : "rcx", "rdx", "rsi", "rdi", "r8", "r9", "r10", "r11", "memory", "cc",
          "xmm0", "xmm1", "xmm2", "xmm3", "xmm4", "xmm5", "xmm6", "xmm7", "xmm8", "xmm9",
          "xmm10", "xmm11", "xmm12", "xmm13", "xmm14", "xmm15");
    uint32_t mx_now;
    uint16_t cw_now;
    __asm__ volatile("stmxcsr %0\n fnstcw %1" : "=m"(mx_now), "=m"(cw_now));
    if ((mx_now & 0xffc0) != (mxcsr & 0xffc0))
        bad |= 4;
    if (cw_now != fcw)
        bad |= 8;
    return bad;
}

static void *worker(void *arg)
{
    (void)arg;
    for (;;)
        counter++;
    return NULL;
}

static void print_mask(const char *what)
{
    sigset_t cur;
    sigprocmask(SIG_BLOCK, NULL, &cur);
    printf("%s usr1=%d usr2=%d\n", what, sigismember(&cur, SIGUSR1), sigismember(&cur, SIGUSR2));
}

/* The filters' first statements: other architectures die, then the syscall number is loaded. */
#define FILTER_PROLOGUE                                                             \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, arch)),        \
    BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, AUDIT_ARCH_X86_64, 1, 0),                   \
    BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),                            \
    BPF_STMT(BPF_LD | BPF_W | BPF_ABS, offsetof(struct seccomp_data, nr))

/* all_threads: every thread (TSYNC, the result printed), else this one. */
static void apply_filter(struct sock_filter *f, unsigned short n, int all_threads)
{
    struct sock_fprog prog = {n, f};
    if (prctl(PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0)) {
        perror("no_new_privs");
        exit(1);
    }
    if (all_threads > 0) {
        printf("filtered %ld\n", syscall(SYS_seccomp, SECCOMP_SET_MODE_FILTER, SECCOMP_FILTER_FLAG_TSYNC, &prog));
        fflush(stdout);
    } else if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, &prog)) {
        perror("seccomp");
        exit(1);
    }
}

static void install_filter(int all_threads)
{
    struct sock_filter f[] = {
        FILTER_PROLOGUE,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getppid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_KILL_PROCESS),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getuid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_getgid, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_TRAP),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    apply_filter(f, sizeof f / sizeof f[0], all_threads);
}

static void refuse_mmap(void)
{
    struct sock_filter f[] = {
        FILTER_PROLOGUE,
        BPF_JUMP(BPF_JMP | BPF_JEQ | BPF_K, __NR_mmap, 0, 1),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ERRNO | EPERM),
        BPF_STMT(BPF_RET | BPF_K, SECCOMP_RET_ALLOW),
    };
    apply_filter(f, sizeof f / sizeof f[0], 0);
}

int main(int argc, char **argv)
{
    const char *mode = argc > 1 ? argv[1] : "wait";
    char buf[256];
    prctl(PR_SET_PDEATHSIG, SIGKILL);      /* never outlive the test run */
    install();
    setvbuf(stdout, NULL, _IOLBF, 0);
    if (!strncmp(mode, "nommap-", 7)) {
        refuse_mmap();
        mode += 7;
    }
    if (!strcmp(mode, "threads")) {
        pthread_t t;
        pthread_create(&t, NULL, worker, NULL);
        printf("counter %p\n", (void *)&counter);
    }
    if (!strcmp(mode, "pending") || !strcmp(mode, "ppoll") || !strcmp(mode, "sigpipe")) {
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, !strcmp(mode, "pending") ? SIGUSR1 : !strcmp(mode, "ppoll") ? SIGUSR2 : SIGPIPE);
        if (!strcmp(mode, "sigpipe"))
            signal(SIGPIPE, on_pipe);
        sigprocmask(SIG_BLOCK, &s, NULL);
    }
    if (!strcmp(mode, "seccomp"))
        install_filter(0);
    if (!strcmp(mode, "children"))
        signal(SIGCHLD, on_chld);
    printf("ready %d\n", getpid());
    if (!strcmp(mode, "strict")) {
        if (prctl(PR_SET_SECCOMP, SECCOMP_MODE_STRICT))
            return 1;
        ssize_t n = read(0, buf, sizeof buf);
        (void)n;
        static const char ok[] = "strict ok\n";
        n = write(1, ok, sizeof ok - 1);
        syscall(SYS_exit, 0);
    }

    if (!strcmp(mode, "children")) {
        for (;;) {
            ssize_t got;
            do
                got = read(0, buf, sizeof buf);
            while (got < 0 && errno == EINTR);
            if (got <= 0 || buf[0] == 'q')
                return 0;
            int st;
            int w = waitpid(-1, &st, WNOHANG), we = w < 0 ? errno : 0;
            int a = waitpid(-1, &st, WNOHANG | __WALL), ae = a < 0 ? errno : 0;
            printf("children wait %d/%d wall %d/%d chld %d\n", w, we, a, ae, (int)chld_count);
        }
    }
    if (!strcmp(mode, "exec")) {
        ssize_t got;
        do
            got = read(0, buf, sizeof buf);
        while (got < 0 && errno == EINTR);
        char *args[] = {argv[0], "children", NULL};
        execv("/proc/self/exe", args);
        return 1;
    }
    if (!strcmp(mode, "regs")) {
        uint64_t bad = spin_regs();
        printf(bad ? "regs changed %lu\n" : "regs ok\n", (unsigned long)bad);
        return bad ? 1 : 0;
    }
    if (!strcmp(mode, "read")) {
        ssize_t n = read(0, buf, sizeof buf - 1);
        if (n < 0) {
            printf("read error %s\n", strerror(errno));
            return 1;
        }
        buf[n] = 0;
        printf("read %zd %s\n", n, buf);
        return 0;
    }
    if (!strcmp(mode, "sleep") || !strcmp(mode, "nanosleep")) {
        long ms = argc > 2 ? atol(argv[2]) : 1000;
        struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
        double t0 = now_ms();
        int rc = !strcmp(mode, "sleep") ? clock_nanosleep(CLOCK_MONOTONIC, 0, &ts, NULL)
                                        : nanosleep(&ts, NULL);
        printf("slept %.1f rc=%d\n", now_ms() - t0, rc);
        return 0;
    }
    if (!strcmp(mode, "ppoll")) {
        sigset_t temp;
        sigemptyset(&temp);
        struct pollfd p = {0, POLLIN, 0};
        int rc = ppoll(&p, 1, NULL, &temp);
        print_mask(rc == 1 ? "ppoll in" : "ppoll fail");
        return 0;
    }
    if (!strcmp(mode, "pending") || !strcmp(mode, "sigpipe")) {
        /* on input, unblock the signal held pending; its handler runs before the report */
        ssize_t n = read(0, buf, sizeof buf);
        (void)n;
        int pipe = !strcmp(mode, "sigpipe");
        sigset_t s;
        sigemptyset(&s);
        sigaddset(&s, pipe ? SIGPIPE : SIGUSR1);
        sigprocmask(SIG_UNBLOCK, &s, NULL);
        if (pipe)
            printf("sigpipe %d\n", (int)pipe_count);
        else
            printf("usr1 %d pid %d code %d usr2 %d\n", (int)usr1_count, usr1_pid, usr1_code, (int)usr2_count);
        return 0;
    }
    if (!strcmp(mode, "tsync")) {
        ssize_t got;
        do
            got = read(0, buf, sizeof buf);
        while (got < 0 && errno == EINTR);
        install_filter(1);
    }
    if (!strcmp(mode, "fork")) {
        ssize_t got;
        do
            got = read(0, buf, sizeof buf);
        while (got < 0 && errno == EINTR);
        pid_t child = fork();
        if (child == 0) {
            sleep(10);
            _exit(0);
        }
        printf("child %d\n", (int)child);
    }
    /* wait, threads, fork: a signal handler may interrupt the read; keep waiting */
    ssize_t n;
    do
        n = read(0, buf, sizeof buf);
    while (n < 0 && errno == EINTR);
    printf("done %zd usr1 %d pid %d code %d usr2 %d bus %d\n", n, (int)usr1_count, usr1_pid, usr1_code,
           (int)usr2_count, (int)bus_count);
    return 0;
}
