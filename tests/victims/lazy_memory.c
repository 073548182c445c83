/* A process for a lazy restore: MIB MiB of anonymous memory holding a pattern, a thread that reads
 * it. On "go" (read into a heap buffer: a kernel-mode fault) it changes its memory the ways the
 * page server must follow — madvise(DONTNEED) (must read as zeros after), mremap (the pattern at
 * the new place), munmap, a forked child that checks its own copy — then checks all the rest.
 * Usage: lazy_memory MIB; prints "ready PID", then one line of results. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/wait.h>
#include <unistd.h>

static size_t size;
static unsigned char *mem;
static volatile unsigned long reader_sum;

static unsigned char pattern(size_t k) { return (unsigned char)(k * 131 + (k >> 12)); }

static long bad_in(const unsigned char *p, size_t from, size_t to)
{
    long bad = 0;
    for (size_t k = from; k < to; k++)
        bad += p[k - from] != pattern(k);
    return bad;
}

static void *reader(void *arg)
{
    (void)arg;
    for (;;) {
        unsigned long s = 0;
        for (size_t k = 0; k < size / 2; k += 4096)
            s += mem[k];
        reader_sum = s;
        usleep(1000);
    }
    return NULL;
}

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    setvbuf(stdout, NULL, _IONBF, 0);
    size = (size_t)atol(argv[1]) << 20;
    mem = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (mem == MAP_FAILED)
        return 3;
    for (size_t k = 0; k < size; k++)
        mem[k] = pattern(k);
    pthread_t th;
    pthread_create(&th, NULL, reader, NULL);
    char *line = malloc(64 << 10);              /* fgets reads into it in the kernel */
    memset(line, 0, 64 << 10);
    printf("ready %d\n", getpid());
    if (!fgets(line + (60 << 10), 64, stdin))
        return 4;
    size_t q = size / 4;                        /* the last quarter: changed before the server gets there */
    size_t dropped = size - q, moved = size - q / 2, unmapped = size - q / 4;
    madvise(mem + dropped, q / 4, MADV_DONTNEED);
    unsigned char *to = mremap(mem + moved, q / 4, q / 4, MREMAP_MAYMOVE | MREMAP_FIXED,
                               mmap(NULL, q / 4, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0));
    munmap(mem + unmapped, q / 4);
    pid_t child = fork();
    if (child == 0)
        _exit(bad_in(mem, 0, dropped) ? 1 : 0);
    long zeros_bad = 0;
    for (size_t k = dropped; k < dropped + q / 4; k++)
        zeros_bad += mem[k] != 0;
    long moved_bad = to == MAP_FAILED ? -1 : bad_in(to, moved, moved + q / 4);
    long kept_bad = bad_in(mem, 0, dropped) + bad_in(mem + dropped + q / 4, dropped + q / 4, moved);
    int status = -1;
    waitpid(child, &status, 0);
    printf("got %s kept %ld dropped %ld moved %ld child %d reader %s\n", strtok(line + (60 << 10), "\n"), kept_bad,
           zeros_bad, moved_bad, status, reader_sum ? "ok" : "STOPPED");
    return 0;
}
