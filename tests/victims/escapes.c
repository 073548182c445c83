#define _GNU_SOURCE
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
static unsigned long gadget, region;
static const char *dir;
static void attempt(const char *name, int which) {
    fflush(stdout);
    pid_t c = fork();
    if (c == 0) {
        long r = -1;
        if (which == 0) {                         /* i386 getpid through int $0x80 */
            r = 20;
            __asm__ volatile("int $0x80" : "+a"(r) : : "memory");
        } else if (which == 1) {                  /* sysenter */
            __asm__ volatile("sysenter" : : : "memory");
        } else if (which == 2) {                  /* the vsyscall page's gettimeofday */
            long (*vgtod)(void *, void *) = (void *)0xffffffffff600000UL;
            char tv[16];
            r = vgtod(tv, 0);
        } else if (which == 3) {                  /* mkdir through the stub's own syscall instruction */
            register long rdi __asm__("rdi") = (long)dir;
            register long rsi __asm__("rsi") = 0755;
            __asm__ volatile("mov $83, %%eax; call *%2" : "+D"(rdi), "+S"(rsi) : "r"(gadget) : "rax", "rcx", "r11", "memory");
            r = 0;
        } else if (which == 4) {                  /* junk over this thread's channel slot, then a syscall */
            memset((void *)(region + 4096 + 94208), 0xff, 256);
            r = syscall(SYS_getppid);
        }
        printf("%s returned %ld\n", name, r);
        fflush(stdout);
        _exit(0);
    }
    int st;
    waitpid(c, &st, 0);
    printf("%s: %s %d\n", name, WIFEXITED(st) ? "exit" : "signal", WIFEXITED(st) ? WEXITSTATUS(st) : WTERMSIG(st));
}
int main(int argc, char **argv) {
    gadget = strtoul(argv[1], 0, 0);
    region = strtoul(argv[2], 0, 0);
    dir = argv[3];
    attempt("int80", 0);
    attempt("sysenter", 1);
    attempt("vsyscall", 2);
    attempt("gadget", 3);
    attempt("channel", 4);
    struct stat st;
    printf("dir created: %d\n", stat(dir, &st) == 0);
    return 0;
}
