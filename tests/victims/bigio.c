/* bigio FILE N: one write(2) of N bytes to FILE, one read(2) of N bytes back, one write(2) of them to
 * stdout, each checked for its full count; then the same with writev/readv in 3 parts and pwrite/pread.
 * Prints "ok N" on stderr, or what came up short. */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/uio.h>
#include <unistd.h>

static int fail(const char *what, long got, long want)
{
    fprintf(stderr, "%s: %ld of %ld\n", what, got, want);
    return 1;
}

int main(int argc, char **argv)
{
    long n = atol(argv[2]);
    char *a = malloc(n + 1), *b = malloc(n + 1);
    for (long i = 0; i < n; i++)
        a[i] = (char)(i * 7 + i / 4096);
    int fd = open(argv[1], O_RDWR | O_CREAT | O_TRUNC, 0644);
    if (fd < 0)
        return fail("open", -1, 0);
    long w = write(fd, a, n);
    if (w != n)
        return fail("write", w, n);
    if (lseek(fd, 0, SEEK_SET) != 0)
        return fail("lseek", -1, 0);
    long r = read(fd, b, n);
    if (r != n || memcmp(a, b, n))
        return fail("read", r, n);
    if (lseek(fd, 0, SEEK_CUR) != n)
        return fail("offset after read", lseek(fd, 0, SEEK_CUR), n);
    long o = write(1, b, n);
    if (o != n)
        return fail("write to stdout", o, n);
    long third = n / 3;
    struct iovec v[3] = {{a, third}, {a + third, third}, {a + 2 * third, n - 2 * third}};
    if (pwrite(fd, "x", 0, 0) != 0)
        return fail("empty pwrite", -1, 0);
    if (lseek(fd, 0, SEEK_SET) != 0 || (w = writev(fd, v, 3)) != n)
        return fail("writev", w, n);
    memset(b, 0, n);
    struct iovec u[3] = {{b, third}, {b + third, third}, {b + 2 * third, n - 2 * third}};
    if (lseek(fd, 0, SEEK_SET) != 0 || (r = readv(fd, u, 3)) != n || memcmp(a, b, n))
        return fail("readv", r, n);
    if ((w = pwrite(fd, a, n, 1)) != n)
        return fail("pwrite", w, n);
    if ((r = pread(fd, b, n, 1)) != n || memcmp(a, b, n))
        return fail("pread", r, n);
    if ((r = read(fd, b, n)) != (n ? 1 : 0))          /* the offset is where readv left it: one byte left */
        return fail("read at the end", r, n ? 1 : 0);
    fprintf(stderr, "ok %ld\n", n);
    return 0;
}
