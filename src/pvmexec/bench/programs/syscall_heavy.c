/* Syscall-heavy: N rounds of five identity calls and a 1-byte pipe write and read (7 syscalls each).
 * Prints the average id sum, getpid() and gettid(): the sandbox tests compare it between paths. */
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
#include <sys/syscall.h>

int main(int argc, char **argv)
{
    long n = argc > 1 ? atol(argv[1]) : 1000, ids = 0;
    int fds[2];
    char c = 'x';
    if (n <= 0 || pipe(fds))
        return 1;
    for (long i = 0; i < n; i++) {
        ids += syscall(SYS_getpid) + syscall(SYS_gettid) + getuid() + getgid() + getppid();
        if (write(fds[1], &c, 1) != 1 || read(fds[0], &c, 1) != 1)
            return 2;
    }
    printf("%ld %d %d\n", ids / n, getpid(), (int)syscall(SYS_gettid));
    return 0;
}
