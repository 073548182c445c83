/* A guest that looks for host pids through the stub: its syscall instruction, its region, a PI futex. */
#define _GNU_SOURCE
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
static unsigned long gadget;
static long raw(long nr, long a, long b, long c) {
    register long rdi __asm__("rdi") = a;
    register long rsi __asm__("rsi") = b;
    register long rdx __asm__("rdx") = c;
    long r = nr;
    __asm__ volatile("call *%4" : "+a"(r), "+D"(rdi), "+S"(rsi), "+d"(rdx) : "r"(gadget) : "rcx", "r8", "r9", "r10", "r11", "memory");
    return r;
}
int main(int argc, char **argv) {
    gadget = strtoul(argv[1], 0, 0);
    unsigned long region = strtoul(argv[2], 0, 0);
    long host_pid = strtol(argv[3], 0, 0);
    printf("getpid %ld\n", raw(39, 0, 0, 0));
    printf("gettid %ld\n", raw(186, 0, 0, 0));
    printf("getppid %ld\n", raw(110, 0, 0, 0));
    printf("header %d %u\n", *(int32_t *)(region + 8), *(uint32_t *)(region + 12));
    static uint32_t word;
    word = (uint32_t)host_pid;                  /* FUTEX_TRYLOCK_PI: ESRCH unless that tid exists for us */
    printf("pi-host %ld\n", raw(202, (long)&word, 8, 0));
    word = 1;
    printf("pi-one %ld\n", raw(202, (long)&word, 8, 0));
    return 0;
}
