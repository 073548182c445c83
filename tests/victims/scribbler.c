/* A hostile target: a thread that finds pvmexec's agent region in its own maps and, without pause,
 * claims every request posted in the shared slot (slot.taken = slot.req_seq), so that the agent skips
 * them. The main thread waits on stdin, then prints "alive". Prints "ready <pid>". */
#define _GNU_SOURCE
#include <pthread.h>
#include <setjmp.h>
#include <signal.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <unistd.h>

#define SLOT_IN_DATA 4096           /* the read-write part starts at the header; the slot follows it */
#define TAKEN 76                    /* offsetof(struct pvm_slot, taken) */

static __thread sigjmp_buf gone;

static void unmapped(int sig)
{
    siglongjmp(gone, 1);                /* the region went away under us (the agent left): look again */
}

static void *scribble(void *arg)
{
    volatile uint32_t *volatile slot = NULL;
    signal(SIGSEGV, unmapped);
    signal(SIGBUS, unmapped);
    if (sigsetjmp(gone, 1))
        slot = NULL;
    for (;;) {
        if (!slot) {
            FILE *f = fopen("/proc/self/maps", "r");
            char line[512];
            unsigned long lo;
            while (f && fgets(line, sizeof line, f))
                if (strstr(line, "pvmexec-agent") && strstr(line, " rw-s ") && sscanf(line, "%lx-", &lo) == 1)
                    slot = (volatile uint32_t *)(lo + SLOT_IN_DATA);
            if (f)
                fclose(f);
            usleep(1000);
            continue;
        }
        slot[TAKEN / 4] = slot[0];
    }
    return arg;
}

int main(void)
{
    pthread_t t;
    pthread_create(&t, NULL, scribble, NULL);
    printf("ready %d\n", getpid());
    fflush(stdout);
    char c;
    while (read(0, &c, 1) > 0)
        ;
    printf("alive\n");
    return 0;
}
