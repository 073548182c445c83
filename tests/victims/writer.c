/*
 * Dump target: keeps writing while it is dumped, then checks its own memory.
 * Memory: a 64 MiB heap (transparent huge pages) written page by page in a known pattern, a region
 * mapped and unmapped over and over, a range dropped with MADV_DONTNEED,
 * shared anonymous memory, a private file mapping with copied pages, a
 * second thread writing too. Prints "ready", then after `seconds` of work (or
 * once stdin closes) verifies every page it owns and prints "ok <checksum>"
 * (or "BAD ...").
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define HEAP (64UL << 20)
#define PAGE 4096UL
static uint64_t *heap, *shared, *filemap;
static volatile uint64_t generation[HEAP / PAGE];
static volatile int stop;

static void fill(uint64_t *page, uint64_t idx, uint64_t gen)
{
    for (int i = 0; i < 512; i += 64)
        page[i] = idx * 1000003 + gen;
}

static void *second(void *arg)
{
    uint64_t n = 0;
    while (!stop) {
        uint64_t idx = HEAP / PAGE / 2 + (n * 7919) % (HEAP / PAGE / 2);
        generation[idx]++;
        fill(heap + idx * 512, idx, generation[idx]);
        n++;
    }
    return 0;
}

int main(int argc, char **argv)
{
    double seconds = argc > 1 ? atof(argv[1]) : 2;
    heap = mmap(0, HEAP + (2UL << 20), PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    heap = (uint64_t *)(((uintptr_t)heap + (2UL << 20) - 1) & ~((2UL << 20) - 1));   /* huge-page aligned */
    madvise(heap, HEAP, MADV_HUGEPAGE);             /* transparent huge pages, then holes punched in them */
    shared = mmap(0, 16 * PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    int fd = open(argv[2], O_RDONLY);
    filemap = mmap(0, 8 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0);
    for (uint64_t i = 0; i < HEAP / PAGE / 2; i++)
        fill(heap + i * 512, i, 0);
    filemap[0] = 0xfeedface;                      /* a copied page of a file mapping */
    madvise((char *)heap + HEAP / 4, 64 * PAGE, MADV_DONTNEED);
    for (uint64_t i = HEAP / PAGE / 4; i < HEAP / PAGE / 4 + 64; i++)
        generation[i] = (uint64_t)-1;               /* dropped: must read as zeros */
    pthread_t t;
    pthread_create(&t, 0, second, 0);
    printf("ready\n");
    fflush(stdout);
    struct timespec t0, now;
    clock_gettime(CLOCK_MONOTONIC, &t0);
    uint64_t n = 0;
    for (;;) {
        uint64_t idx = (n * 104729) % (HEAP / PAGE / 4);
        generation[idx]++;
        fill(heap + idx * 512, idx, generation[idx]);
        shared[(n % 16) * 512] = n;
        if (n % 4096 == 0) {                        /* map and unmap */
            char *tmp = mmap(0, 32 * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            memset(tmp, 1, 32 * PAGE);
            munmap(tmp, 32 * PAGE);
        }
        n++;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - t0.tv_sec) + (now.tv_nsec - t0.tv_nsec) / 1e9 > seconds)
            break;
        if (n % 65536 == 0) {                       /* stdin closed: the test is done with us */
            struct pollfd in = {0, POLLIN, 0};
            if (poll(&in, 1, 0) == 1)
                break;
        }
    }
    stop = 1;
    pthread_join(t, 0);
    uint64_t sum = 0;
    for (uint64_t i = 0; i < HEAP / PAGE; i++) {
        uint64_t *page = heap + i * 512;
        uint64_t g = generation[i];
        int zero = g == (uint64_t)-1 || (i >= HEAP / PAGE / 2 && g == 0);
        for (int j = 0; j < 512; j += 64) {
            uint64_t want = zero ? 0 : i * 1000003 + g;
            if (page[j] != want) {
                printf("BAD page %lu word %d: %lx != %lx\n", (unsigned long)i, j, (unsigned long)page[j],
                       (unsigned long)want);
                return 1;
            }
            sum += page[j];
        }
    }
    printf("ok %lx %lu\n", (unsigned long)sum, (unsigned long)n);
    return 0;
}
