/* Helpers shared by the freestanding agent and stub (no libc). */
#ifndef PVMEXEC_FREESTANDING_H
#define PVMEXEC_FREESTANDING_H
#include <stdint.h>

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
