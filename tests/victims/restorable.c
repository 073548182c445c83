/* A process to dump and restore that checks itself: worker threads keep computing (each sleeps
 * in nanosleep between steps and checks its own tid and an FPU value kept in a register), the main
 * thread has a handler, an interval timer, a blocked pending signal, a file read half-way and heap
 * memory; it blocks reading stdin. On "go" it checks everything it can see and prints a summary
 * that must equal an undisturbed run's. Usage: restorable FILE */
#define _GNU_SOURCE
#include <fcntl.h>
#include <pthread.h>
#include <signal.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

#define WORKERS 3
static pid_t tids[WORKERS];
static atomic_long steps[WORKERS];
static atomic_int stop, bad_tid, bad_fpu;
static volatile sig_atomic_t ticks, usr1;

static void on_alarm(int s) { (void)s; ticks++; }
static void on_usr1(int s) { (void)s; usr1++; }

static void *worker(void *arg)
{
    long i = (long)arg;
    tids[i] = (pid_t)syscall(SYS_gettid);
    register double acc = 1.0 + i;
    while (!atomic_load(&stop)) {
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);
        acc = acc * 1.0000001;
        if ((pid_t)syscall(SYS_gettid) != tids[i])
            atomic_store(&bad_tid, 1);
        if (acc < 1.0 + i)
            atomic_store(&bad_fpu, 1);
        atomic_fetch_add(&steps[i], 1);
    }
    return (void *)(long)(acc > 0 ? 7 : 0);
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    umask(027);
    signal(SIGALRM, on_alarm);
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sa.sa_flags = SA_RESTART;
    sigaction(SIGUSR1, &sa, NULL);
    struct itimerval it = {{0, 20000}, {0, 20000}};
    setitimer(ITIMER_REAL, &it, NULL);
    sigset_t usr2;
    sigemptyset(&usr2);
    sigaddset(&usr2, SIGUSR2);
    sigprocmask(SIG_BLOCK, &usr2, NULL);
    raise(SIGUSR2);
    int fd = open(argv[1], O_RDONLY);
    char head[5] = {0}, next[5] = {0};
    if (fd < 0 || read(fd, head, 4) != 4)
        return 3;
    size_t n = 8 << 20;
    unsigned char *heap = malloc(n);
    for (size_t k = 0; k < n; k++)
        heap[k] = (unsigned char)(k * 7);
    /* A private mapping of the file with one page changed (the rest is the file's), and shared
     * memory with data in part of it (the rest never touched). */
    char *filemap = mmap(NULL, 4096, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    char *shm = mmap(NULL, 64 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    if (filemap == MAP_FAILED || shm == MAP_FAILED)
        return 6;
    filemap[1] = 'B';
    strcpy(shm + (1 << 20), "shared");
    pthread_t th[WORKERS];
    for (long i = 0; i < WORKERS; i++)
        pthread_create(&th[i], NULL, worker, (void *)i);
    while (!tids[WORKERS - 1] || !steps[WORKERS - 1])
        usleep(1000);
    pid_t pid = getpid();
    printf("ready %d\n", pid);
    char line[32];
    if (!fgets(line, sizeof line, stdin))           /* blocked here while dumped and restored */
        return 4;
    long before[WORKERS];
    for (int i = 0; i < WORKERS; i++)
        before[i] = atomic_load(&steps[i]);
    int t0 = ticks, moving = 0;
    for (int wait = 0; wait < 2000 && !moving; wait++) {   /* each worker goes on, within 2 s */
        struct timespec ts = {0, 1000000};
        nanosleep(&ts, NULL);                               /* SIGALRM may end it early: counted anyway */
        moving = ticks > t0;
        for (int i = 0; i < WORKERS; i++)
            moving &= atomic_load(&steps[i]) > before[i];
    }
    kill(pid, SIGUSR1);
    sigset_t pending;
    sigpending(&pending);
    unsigned long sum = 0;
    for (size_t k = 0; k < n; k++)
        sum += heap[k] ^ (unsigned char)(k * 7);
    if (read(fd, next, 4) != 4)
        return 5;
    atomic_store(&stop, 1);
    int joined = 0;
    for (int i = 0; i < WORKERS; i++) {
        void *r;
        joined += pthread_join(th[i], &r) == 0 && r == (void *)7;
    }
    printf("mapped %.4s %s %d\n", filemap, shm + (1 << 20), shm[0] + shm[(64 << 20) - 1]);
    printf("got %s pid %s workers %s timer %s usr1 %d usr2-pending %d file %s|%s heap %s joined %d umask %03o\n",
           strtok(line, "\n"), getpid() == pid && syscall(SYS_gettid) == pid ? "same" : "CHANGED",
           !moving ? "STALLED" : atomic_load(&bad_tid) ? "TID-CHANGED" : atomic_load(&bad_fpu) ? "FPU-LOST" : "ok", ticks > t0 ? "ticking" : "STOPPED", (int)usr1,
           sigismember(&pending, SIGUSR2), head, next, sum ? "CHANGED" : "same", joined, (unsigned)umask(0));
    return 0;
}
