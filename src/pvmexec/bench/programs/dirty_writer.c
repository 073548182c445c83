/* bench dump's target: a working set of argv[1] MiB, 1% of it dirtied every 100 ms while it counts its work. */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
static volatile uint64_t work;
int main(int argc, char **argv) {
    size_t size = (size_t)atol(argv[1]) << 20, pages = size / 4096;
    char *mem = mmap(0, size, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    memset(mem, 1, size);
    printf("%p\n", (void *)&work);
    fflush(stdout);
    uint64_t seed = 1;
    struct timespec last, now;
    clock_gettime(CLOCK_MONOTONIC, &last);
    for (;;) {
        for (int i = 0; i < 1000; i++)
            seed = seed * 6364136223846793005ULL + 1442695040888963407ULL;
        work++;
        clock_gettime(CLOCK_MONOTONIC, &now);
        if ((now.tv_sec - last.tv_sec) * 1000000000L + now.tv_nsec - last.tv_nsec >= 100000000L) {
            for (size_t i = 0; i < pages / 100; i++)            /* 1% of the pages, every 100 ms */
                mem[((seed >> 11) + i * 2654435761ULL) % pages * 4096] = (char)i;
            last = now;
        }
    }
}
