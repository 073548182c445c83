/* A target that never stops changing its address space: two threads map, write, protect, advise and
 * unmap memory without pause, and short-lived threads come and go. Prints "ready <pid>"; on EOF of stdin,
 * "ok <rounds>" and exits 0. */
#define _GNU_SOURCE
#include <pthread.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static volatile int stop;
static volatile long rounds;

static void *nothing(void *arg) { return arg; }

static void *churn(void *arg)
{
    long k = (long)arg;
    while (!stop) {
        size_t n = (size_t)(1 + (rounds + k) % 64) * 4096;
        char *p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
        if (p == MAP_FAILED)
            continue;
        memset(p, (int)k, n);
        mprotect(p, n / 2, PROT_READ);
        madvise(p + n / 2, n / 2, MADV_DONTNEED);
        munmap(p, n);
        if (rounds % 16 == 0) {
            pthread_t t;
            if (pthread_create(&t, NULL, nothing, NULL) == 0)
                pthread_join(t, NULL);
        }
        rounds++;
    }
    return NULL;
}

int main(void)
{
    pthread_t a, b;
    pthread_create(&a, NULL, churn, (void *)1L);
    pthread_create(&b, NULL, churn, (void *)2L);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    stop = 1;
    pthread_join(a, NULL);
    pthread_join(b, NULL);
    printf("ok %ld\n", rounds);
    return 0;
}
