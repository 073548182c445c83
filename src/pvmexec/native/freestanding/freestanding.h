/* Helpers shared by the freestanding agent and stub (no libc). */
#ifndef PVMEXEC_FREESTANDING_H
#define PVMEXEC_FREESTANDING_H
#include <stdint.h>
#include <asm/unistd.h>          /* __NR_*: the kernel's numbers, never typed by hand */

#define PVM_XSTR(x) #x
#define PVM_STR(x) PVM_XSTR(x)          /* a syscall number inside an asm string */

#define FUTEX_WAIT 0
#define FUTEX_WAKE 1
#define ETIMEDOUT 110

struct timespec_ {
    long tv_sec, tv_nsec;
};

/* The CPU we run on: Linux keeps it in TSC_AUX for rdtscp (no syscall, none needed). */
static inline uint32_t this_cpu(void)
{
    uint32_t lo, hi, aux;
    __asm__ volatile("rdtscp" : "=a"(lo), "=d"(hi), "=c"(aux));
    return aux & 0xfff;
}

static inline uint32_t ld(volatile uint32_t *p) { return __atomic_load_n(p, __ATOMIC_ACQUIRE); }
static inline void st(volatile uint32_t *p, uint32_t v) { __atomic_store_n(p, v, __ATOMIC_RELEASE); }

#endif
