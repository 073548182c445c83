/* Dump target whose memory is mostly never touched: 128 MiB of shared memory with one page
 * written, 64 MiB of private memory never touched, a 16 MiB file mapped and never read.
 * Usage: idle_memory FILE. Prints "ready", waits for stdin to close, prints what it wrote. */
#include <fcntl.h>
#include <stdio.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

int main(int argc, char **argv)
{
    if (argc < 2)
        return 2;
    char *shared = mmap(NULL, 128 << 20, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
    char *private = mmap(NULL, 64 << 20, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    int fd = open(argv[1], O_RDONLY);
    char *file = fd < 0 ? MAP_FAILED : mmap(NULL, 16 << 20, PROT_READ, MAP_PRIVATE, fd, 0);
    if (shared == MAP_FAILED || private == MAP_FAILED || file == MAP_FAILED)
        return 3;
    strcpy(shared + (64 << 20), "written");
    printf("ready\n");
    fflush(stdout);
    char buf[16];
    while (read(0, buf, sizeof buf) > 0)
        ;
    printf("%s %d\n", shared + (64 << 20), private[0]);
    return 0;
}
