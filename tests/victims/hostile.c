#define _GNU_SOURCE
#include <stdio.h>
#include <unistd.h>
#include <errno.h>
#include <fcntl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
static void show(const char *what, long r) { printf("%s %ld %d\n", what, r, r < 0 ? errno : 0); }
int main(void) {
    show("write-bad-buffer", syscall(SYS_write, 1, (void *)16, 100));
    show("open-null", syscall(SYS_openat, AT_FDCWD, (void *)0, 0));
    show("open-kernel-address", syscall(SYS_openat, AT_FDCWD, (void *)0xffffffff81000000UL, 0));
    show("read-huge", syscall(SYS_read, 0, (void *)0x1000, 1UL << 62));
    show("map-over-window", (long)mmap((void *)0x050f0000, 4096, 3, MAP_PRIVATE | MAP_ANONYMOUS | MAP_FIXED, -1, 0));
    show("unmap-window", syscall(SYS_munmap, 0x050f0000, 0x10000));
    show("bad-fd", syscall(SYS_close, 12345));
    show("dup2-negative", syscall(SYS_dup2, 1, -5));
    show("sigaction-kill", syscall(SYS_rt_sigaction, 9, (void *)16, 0, 8));
    char path[8192];
    for (int i = 0; i < 8191; i++) path[i] = 'a';
    path[8191] = 0;
    show("long-path", syscall(SYS_openat, AT_FDCWD, path, 0));
    show("socket-huge-protocol", syscall(SYS_socket, 1, 1, 0xdeadbeefcafeL));
    int sv[2];
    show("socketpair-bad-protocol", syscall(SYS_socketpair, 1, 1, 7, sv));
    puts("still running");
    return 0;
}
