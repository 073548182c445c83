/*
 * The stub: a tiny static program whose address space hosts a guest (the
 * proposal's "stub process", as in gVisor and User-mode Linux). After setup,
 * the stub thread lives in its signal handler: a seccomp filter turns every
 * guest syscall into SIGSYS, faults arrive as signals too, and the handler
 * reports the guest's state to the caller through the shared region, waits,
 * and resumes the guest by returning into an edited signal frame.
 *
 * Security boundary: the filter. Everything else here, code included, is
 * writable by the guest; the filter lets through only a few syscalls that act
 * on the stub's own address space, and only from one instruction.
 */
#include "layout.h"
#include "freestanding/freestanding.h"

/* Nothing is exported: every address is taken PC-relative, so the program needs no relocation. */
#pragma GCC visibility push(hidden)


#define PR_SET_PDEATHSIG 1
#define PR_SET_NAME 15
#define PR_SET_NO_NEW_PRIVS 38
#define SECCOMP_SET_MODE_FILTER 1
#define SA_SIGINFO 4
#define SA_ONSTACK 0x08000000
#define SA_RESTORER 0x04000000
#define SA_NODEFER 0x40000000
#define EPERM 1
#define SIGTRAP 5
#define SIGSYS 31
#define MAP_SHARED 1
#define MAP_FIXED_NOREPLACE 0x100000

struct kernel_sigaction {
    void *handler;
    unsigned long flags;
    void *restorer;
    uint64_t mask;
};

struct sigcontext64 {
    uint64_t r8, r9, r10, r11, r12, r13, r14, r15, rdi, rsi, rbp, rbx, rdx, rax, rcx, rsp, rip, eflags;
    uint16_t cs, gs, fs, ss;
    uint64_t err, trapno, oldmask, cr2, fpstate, reserved[8];
};

struct ucontext64 {
    uint64_t flags, link;
    uint64_t ss_sp, ss_flags_pad, ss_size;
    struct sigcontext64 mc;
    uint64_t sigmask;
};

struct sock_filter_ {
    uint16_t code;
    uint8_t jt, jf;
    uint32_t k;
};


/* The stub's one syscall instruction; the filter admits syscalls only from here. */
__asm__(
    ".pushsection .text\n"
    ".globl pvm_stub_gadget\n"
    ".type pvm_stub_gadget,@function\n"
    "pvm_stub_gadget:\n"
    "  syscall\n"
    "  ret\n"
    ".size pvm_stub_gadget, .-pvm_stub_gadget\n"
    ".globl pvm_stub_restorer\n"
    ".type pvm_stub_restorer,@function\n"
    "pvm_stub_restorer:\n"
    "  mov $" PVM_STR(__NR_rt_sigreturn) ", %eax\n"
    "  jmp pvm_stub_gadget\n"
    ".size pvm_stub_restorer, .-pvm_stub_restorer\n"
    ".globl pvm_stub_spawn\n"
    ".type pvm_stub_spawn,@function\n"
    "pvm_stub_spawn:\n"                 /* (flags, stack, index): clone through the gadget */
    "  mov %rdx, %r12\n"
    "  xor %edx, %edx\n"
    "  xor %r10d, %r10d\n"
    "  xor %r8d, %r8d\n"
    "  mov $" PVM_STR(__NR_clone) ", %eax\n"
    "  call pvm_stub_gadget\n"          /* the child's gadget `ret` pops pvm_stub_thread_entry */
    "  ret\n"
    ".size pvm_stub_spawn, .-pvm_stub_spawn\n"
    ".globl pvm_stub_thread_entry\n"
    ".type pvm_stub_thread_entry,@function\n"
    "pvm_stub_thread_entry:\n"
    "  mov %r12, %rdi\n"
    "  and $-16, %rsp\n"
    "  call pvm_stub_thread_main\n"
    "  ud2\n"
    ".size pvm_stub_thread_entry, .-pvm_stub_thread_entry\n"
    ".globl _start\n"
    ".type _start,@function\n"
    "_start:\n"
    "  mov %rsp, %rdi\n"
    "  and $-16, %rsp\n"
    "  call pvm_stub_main\n"
    "  ud2\n"
    ".size _start, .-_start\n"
    ".popsection\n");

/*
 * Entry from a patched syscall site's trampoline: eax = our tid (gettid),
 * ecx = site index, r11 = the guest's rflags (saved by that syscall); every
 * other register is the guest's, and nothing was written to its stack. Find
 * this thread's block by tid, switch to its signal stack (free while the
 * guest runs), save registers and xstate, and let C report the stop and wait.
 * C returns the frame to resume from: xstate image, registers, iret frame.
 */
#define FAST_BLOCKS "1,2,3,4,5,6,7,8,9,10,11,12,13,14,15"
__asm__(
    ".pushsection .text\n"
    ".globl pvm_stub_fast_entry\n"
    ".type pvm_stub_fast_entry,@function\n"
    "pvm_stub_fast_entry:\n"
    ".irp k," FAST_BLOCKS "\n"
    "  cmp pvm_fast_tid+4*\\k(%rip), %eax\n"
    "  je .Lfast_\\k\n"
    ".endr\n"
    /* None of our guest threads (another helper's, or the target's own, running patched code): the
       site's syscall for real, from its trampoline's second half (ecx = site index). */
    "  and $" PVM_STR(PVM_STUB_PATCH_MAX) "-1, %ecx\n"
    "  shl $5, %ecx\n"
    "  add $" PVM_STR(PVM_STUB_WINDOW_ADDR_HEX) "+" PVM_STR(PVM_STUB_TRAMP_OFF) "+" PVM_STR(PVM_STUB_TRAMP_FALLBACK)
    ", %rcx\n"
    "  jmp *%rcx\n"
    ".irp k," FAST_BLOCKS "\n"
    ".Lfast_\\k:\n"
    "  mov %rsp, %rax\n"
    "  mov pvm_fast_stack+8*\\k(%rip), %rsp\n"
    "  push $\\k\n"
    "  jmp .Lfast_common\n"
    ".endr\n"
    ".Lfast_common:\n"
    "  push %rax\n"
    "  push %r11\n"
    "  push %rcx\n"
    "  push %rdi\n push %rsi\n push %rdx\n push %r8\n push %r9\n push %r10\n"
    "  push %rbx\n push %rbp\n push %r12\n push %r13\n push %r14\n push %r15\n"
    "  push $2\n"
    "  popfq\n"                          /* DF, AC, TF clear for our C code */
    "  mov 15*8(%rsp), %rcx\n"
    "  lea pvm_fast_fp(%rip), %rdx\n"
    "  mov (%rdx,%rcx,8), %rcx\n"
    "  mov pvm_fast_xmask(%rip), %eax\n"
    "  mov pvm_fast_xmask+4(%rip), %edx\n"
    "  xsave64 (%rcx)\n"
    "  mov %rsp, %rdi\n"
    "  call pvm_stub_fast\n"
    "  mov %rax, %rsp\n"
    ".Lresume:\n"
    "  pop %rcx\n"
    "  mov pvm_fast_xmask(%rip), %eax\n"
    "  mov pvm_fast_xmask+4(%rip), %edx\n"
    "  xrstor64 (%rcx)\n"
    "  pop %r15\n pop %r14\n pop %r13\n pop %r12\n pop %rbp\n pop %rbx\n pop %r11\n pop %r10\n"
    "  pop %r9\n pop %r8\n pop %rax\n pop %rcx\n pop %rdx\n pop %rsi\n pop %rdi\n"
    "  iretq\n"
    ".size pvm_stub_fast_entry, .-pvm_stub_fast_entry\n"
    ".globl pvm_stub_resume\n"
    ".type pvm_stub_resume,@function\n"
    "pvm_stub_resume:\n"                /* (struct fast_out *): the same exit, from the signal handler */
    "  mov %rdi, %rsp\n"
    "  jmp .Lresume\n"
    ".size pvm_stub_resume, .-pvm_stub_resume\n"
    ".popsection\n");
void pvm_stub_fast_entry(void);
struct fast_out;
__attribute__((noreturn)) void pvm_stub_resume(struct fast_out *out);

/* What .Lfast_common pushed (lowest address first) and what it pops to resume. */
struct fast_in {
    uint64_t r15, r14, r13, r12, rbp, rbx, r10, r9, r8, rdx, rsi, rdi, site, rflags, rsp, block;
};
struct fast_out {
    uint64_t fp, r15, r14, r13, r12, rbp, rbx, r11, r10, r9, r8, rax, rcx, rdx, rsi, rdi;
    uint64_t rip, cs, rflags, rsp, ss;
};
#define FAST_OUT_SPACE 256              /* reserved at the top of each signal stack */
_Static_assert(sizeof(struct fast_out) <= FAST_OUT_SPACE, "fast_out fits");

/* Per block, read by the entry code: its guest thread's tid, stack top, xstate area. */
uint32_t pvm_fast_tid[PVM_STUB_MAX_THREADS];
uint64_t pvm_fast_stack[PVM_STUB_MAX_THREADS];
uint64_t pvm_fast_fp[PVM_STUB_MAX_THREADS];

void pvm_stub_gadget(void);
void pvm_stub_restorer(void);

static inline long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("call pvm_stub_gadget"
                     : "=a"(ret), "+D"(a), "+S"(b), "+d"(c), "+r"(r10), "+r"(r8), "+r"(r9)
                     : "a"(n)
                     : "rcx", "r11", "memory");
    return ret;
}

#include "freestanding/channel.h"

/* A syscall from outside the gadget: trapped by our own filter. Used once to enter the handler. */
static inline void trap_into_handler(void)
{
    long n = -1;
    __asm__ volatile("syscall" : "+a"(n) : : "rcx", "r11", "memory");
}

static char *region;
static struct pvm_stub_header *header;
static uint32_t served[PVM_STUB_MAX_THREADS];       /* last request taken, per thread */
static uint32_t run_pending[PVM_STUB_MAX_THREADS];  /* a RUN is in flight: the next stop answers it */
static uint32_t init_fp_size;
static uint8_t init_fp[PVM_STUB_FP_MAX] __attribute__((aligned(64)));
static uint64_t xcr0;                /* user xstate features; 0: no XSAVE, no patching */
/* The features the kernel puts in our signal frames (AMX tile data stays out without permission). */
uint64_t pvm_fast_xmask = ~0ULL;
static uint32_t xsave_size;          /* what XSAVE writes for them, once patching is on */
static uint32_t xsave_size_for(uint64_t mask);
static uint32_t comp_off[64], comp_size[64];    /* standard-format XSAVE components, from CPUID */

/*
 * Bytes XSAVE leaves alone (gaps between components, components in their init
 * state) hold whatever was there before: zero them, so that a stop shows the
 * same FPU image whichever path (kernel frame or our XSAVE) took it.
 */
static void canon_xstate(uint8_t *fp, uint32_t size)
{
    if (size <= 576)
        return;
    uint64_t bv = *(uint64_t *)(fp + 512);
    uint32_t at = 576;
    for (uint32_t i = 2; i < 64 && at < size; i++) {
        if (!comp_size[i] || comp_off[i] < at)
            continue;
        for (; at < comp_off[i] && at < size; at++)
            fp[at] = 0;
        uint32_t end = comp_off[i] + comp_size[i];
        if (!(bv & (1ULL << i)))
            for (; at < end && at < size; at++)
                fp[at] = 0;
        at = end;
    }
    for (; at < size; at++)
        fp[at] = 0;
}
static uint32_t mxcsr_mask;
static char *window;                 /* the patching window, through the region (writable) */
static const uint32_t allowed[] = {PVM_STUB_ALLOWED, PVM_STUB_LENDING};


static void copy(void *d, const void *s, uint64_t n)
{
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
}

static int is_allowed(uint64_t nr)
{
    for (unsigned i = 0; i < sizeof allowed / sizeof allowed[0]; i++)
        if (nr == allowed[i])
            return 1;
    return 0;
}

/* The next request is exactly served + 1: anything else in req_seq is junk (the guest can write it). */
static uint32_t wait_request(uint64_t self, struct pvm_slot *slot, uint32_t last)
{
    const struct timespec_ idle = {0, PVM_STUB_IDLE_MS * 1000 * 1000};
    int timed_out;
#ifdef PVM_HELPER
    uint32_t rounds = 0;
#endif
    (void)self;
    while (chan_wait(slot, last + 1, &idle, &timed_out) != last + 1) {
        if (!timed_out)
            continue;
        if (sys6(__NR_getppid, 0, 0, 0, 0, 0, 0) != header->caller_pid)
            sys6(__NR_exit_group, 0, 0, 0, 0, 0, 0);
#ifdef PVM_HELPER
        /* A guest thread nobody ran for a while: leave (the agent reaps us; the caller starts another). */
        if (self && ++rounds >= PVM_HELPER_IDLE_ROUNDS) {
            st(&header->state, PVM_HELPER_IDLE);
            sys6(__NR_exit_group, 0, 0, 0, 0, 0, 0);
        }
#endif
    }
    return last + 1;
}

static inline uint64_t rdfsbase(void) { uint64_t v; __asm__ volatile("rdfsbase %0" : "=r"(v)); return v; }
static inline uint64_t rdgsbase(void) { uint64_t v; __asm__ volatile("rdgsbase %0" : "=r"(v)); return v; }
static inline void wrfsbase(uint64_t v) { __asm__ volatile("wrfsbase %0" : : "r"(v)); }
static inline void wrgsbase(uint64_t v) { __asm__ volatile("wrgsbase %0" : : "r"(v)); }

/* xsave bytes in a signal frame: the size the kernel recorded in the software-reserved area. */
static uint32_t frame_fp_size(uint8_t *fp)
{
    uint32_t magic1 = *(uint32_t *)(fp + 464), xstate_size = *(uint32_t *)(fp + 464 + 16);
    if (magic1 == 0x46505853U && xstate_size >= 512 && xstate_size <= PVM_STUB_FP_MAX)
        return xstate_size;
    return 512;
}

void pvm_stub_spawn(uint64_t flags, uint64_t stack, uint64_t index);

/* Start the stub thread of block `index` (its signal stack doubles as its first stack). */
static long spawn(uint64_t index)
{
    if (index == 0 || index >= PVM_STUB_MAX_THREADS)
        return -22;
    char *b = region + PVM_STUB_BLOCK_OFF + index * PVM_STUB_BLOCK_SIZE;
    uint64_t *top = (uint64_t *)(b + PVM_STUB_ALTSTACK_OFF + PVM_STUB_ALTSTACK_SIZE - 64);
    extern char pvm_stub_thread_entry[];
    top[0] = (uint64_t)(uintptr_t)pvm_stub_thread_entry;     /* where the child's `ret` goes */
    long rax;
    uint64_t flags = PVM_STUB_CLONE_FLAGS, stack = (uint64_t)(uintptr_t)top;
    __asm__ volatile("call pvm_stub_spawn"
                     : "=a"(rax), "+D"(flags), "+S"(stack), "+d"(index)
                     :
                     : "rcx", "r8", "r10", "r11", "r12", "memory");
    return rax;
}

/* Record a stop, storing only what changed: lines the caller has read stay shared between the CPUs. */
static void store_stop(struct pvm_stop *stop, uint32_t sig, const uint64_t *si, const uint64_t *now)
{
    stop->signo = sig;
    uint64_t *so = (uint64_t *)stop->siginfo, *r = stop->regs;
    for (int i = 0; i < 16; i++)
        if (so[i] != si[i])
            so[i] = si[i];
    for (int i = 0; i < PVM_X86_64_NREGS; i++)
        if (r[i] != now[i])
            r[i] = now[i];
}

/* Report the stop just stored (it answers a RUN in flight), then serve requests until the next RUN. */
static void serve(uint64_t self, struct pvm_slot *slot, struct pvm_stop *stop)
{
    if (run_pending[self]) {
        run_pending[self] = 0;
        chan_respond(slot, served[self]);
    } else {
        st(&stop->ready, 1);
        sys6(__NR_futex, (long)&stop->ready, FUTEX_WAKE, 1, 0, 0, 0);
        if (self == 0 && ld(&header->state) != PVM_STUB_READY) {
            st(&header->state, PVM_STUB_READY);
            sys6(__NR_futex, (long)&header->state, FUTEX_WAKE, 1, 0, 0, 0);
        }
    }
    for (;;) {
        uint32_t seq = wait_request(self, slot, served[self]);
        served[self] = seq;
        uint32_t op = slot->op;
        if (op == PVM_OP_CALLS) {
            uint32_t count = slot->count <= PVM_MAX_BATCH ? slot->count : 0;
            for (uint32_t i = 0; i < count; i++) {
                struct pvm_call *c = &slot->calls[i];
                c->ret = is_allowed((uint64_t)c->nr)
                    ? sys6(c->nr, c->args[0], c->args[1], c->args[2], c->args[3], c->args[4], c->args[5])
                    : -EPERM;
            }
            chan_respond(slot, seq);
            continue;
        }
        if (op == PVM_OP_SPAWN) {
            slot->calls[0].ret = spawn(slot->calls[0].args[0]);
            chan_respond(slot, seq);
            continue;
        }
        if (op == PVM_OP_RUN)
            break;
        chan_respond(slot, seq);     /* not a request we know (the guest may scribble here): ignore it */
    }
    run_pending[self] = 1;
}

/* A patched site's syscall, as the trap would have shown it: siginfo of a seccomp SIGSYS. */
static void syscall_siginfo(uint64_t *si, uint64_t ret, int64_t nr)
{
    for (int i = 0; i < 16; i++)
        si[i] = 0;
    si[0] = SIGSYS;                                     /* si_signo; si_errno 0 (SECCOMP_RET_DATA) */
    si[1] = PVM_SYS_SECCOMP;                            /* si_code */
    si[2] = ret;                                        /* si_call_addr */
    si[3] = (uint32_t)nr | ((uint64_t)PVM_AUDIT_ARCH_X86_64 << 32);
}

static const struct pvm_patch_site *patch_site(uint64_t index)
{
    return (const struct pvm_patch_site *)(window + PVM_STUB_SITES_OFF) + index % PVM_STUB_PATCH_MAX;
}

/* An xstate image XRSTOR accepts (it faults otherwise): the caller's, or else a clean one. */
static int xstate_ok(const uint8_t *fp)
{
    uint64_t bv = *(const uint64_t *)(fp + 512), comp = *(const uint64_t *)(fp + 520);
    uint64_t rsv = *(const uint64_t *)(fp + 528);
    uint32_t mxcsr = *(const uint32_t *)(fp + 24);
    return !(bv & ~(xcr0 & pvm_fast_xmask)) && !comp && !rsv && !(mxcsr & ~mxcsr_mask);
}

/* The frame pvm_stub_resume loads: the guest as the caller left it in stop->regs and the FP area. */
static struct fast_out *resume_frame(uint64_t self, struct pvm_stop *stop, uint8_t *fp_area)
{
    struct fast_out *out = (struct fast_out *)(uintptr_t)pvm_fast_stack[self];
    const uint64_t *r = stop->regs;
    out->fp = (uint64_t)(uintptr_t)(stop->fp_valid && xstate_ok(fp_area) ? fp_area : init_fp);
    out->r15 = r[0]; out->r14 = r[1]; out->r13 = r[2]; out->r12 = r[3]; out->rbp = r[4]; out->rbx = r[5];
    out->r11 = r[6]; out->r10 = r[7]; out->r9 = r[8]; out->r8 = r[9]; out->rax = r[10]; out->rcx = r[11];
    out->rdx = r[12]; out->rsi = r[13]; out->rdi = r[14]; out->rip = r[16]; out->cs = 0x33;
    out->rflags = (r[18] & 0x50dd5) | 0x202;           /* what sigreturn would take: arithmetic, DF, TF, AC, RF */
    out->rsp = r[19];
    out->ss = 0x2b;
    wrfsbase(r[21]);
    wrgsbase(r[22]);
    return out;
}

__attribute__((used)) struct fast_out *pvm_stub_fast(struct fast_in *in)
{
    uint64_t self = in->block;
    char *block = region + PVM_STUB_BLOCK_OFF + self * PVM_STUB_BLOCK_SIZE;
    struct pvm_slot *slot = (struct pvm_slot *)block;
    struct pvm_stop *stop = (struct pvm_stop *)(block + PVM_STUB_STOP_OFF);
    uint8_t *fp_area = (uint8_t *)block + PVM_STUB_FP_OFF;
    const struct pvm_patch_site *site = patch_site(in->site);
    uint64_t ret = site->ret;
    int64_t nr = site->nr;
    uint64_t si[16];

    copy(fp_area + 464, init_fp + 464, 48);            /* the kernel's software-reserved bytes */
    *(uint64_t *)(fp_area + 512) |= 3;                  /* as in a signal frame: x87 and SSE always present */
    syscall_siginfo(si, ret, nr);
    /* What the SIGSYS frame shows: the syscall ran (rcx = return address, r11 = rflags), rax = nr. */
    const uint64_t now[PVM_X86_64_NREGS] = {
        in->r15, in->r14, in->r13, in->r12, in->rbp, in->rbx, in->rflags, in->r10, in->r9, in->r8,
        (uint64_t)nr, ret, in->rdx, in->rsi, in->rdi, ~0ULL, ret, 0x33, in->rflags, in->rsp, 0x2b,
        rdfsbase(), rdgsbase(), 0, 0, 0, 0};
    store_stop(stop, SIGSYS, si, now);
    /* No canon_xstate here: XSAVE writes every component of the mask, and it costs ~1 µs per stop. */
    stop->fp_size = xsave_size;
    serve(self, slot, stop);
    return resume_frame(self, stop, fp_area);
}

__attribute__((used)) void pvm_stub_handler(int sig, void *info, struct ucontext64 *uc)
{
    /* Which thread am I: the block whose signal stack this frame is on. */
    uint64_t at = (uint64_t)(uintptr_t)__builtin_frame_address(0) - (uint64_t)(uintptr_t)(region + PVM_STUB_BLOCK_OFF);
    uint64_t self = at / PVM_STUB_BLOCK_SIZE;
    if (self >= PVM_STUB_MAX_THREADS)
        sys6(__NR_exit_group, 9, 0, 0, 0, 0, 0);
    char *block = region + PVM_STUB_BLOCK_OFF + self * PVM_STUB_BLOCK_SIZE;
    struct pvm_slot *slot = (struct pvm_slot *)block;
    struct pvm_stop *stop = (struct pvm_stop *)(block + PVM_STUB_STOP_OFF);
    uint8_t *fp_area = (uint8_t *)block + PVM_STUB_FP_OFF;
    uint8_t *frame_fp = (uint8_t *)uc->mc.fpstate;
    uint32_t fp_size = frame_fp ? frame_fp_size(frame_fp) : 0;
    struct sigcontext64 *m = &uc->mc;
    const uint64_t *si = info;
    uint64_t tramp_si[16];

    /*
     * Single-stepping (TF) into a patched site stops at the start of its
     * trampoline, which has changed nothing the caller can see yet but rax,
     * rcx and r11: report it as the syscall stop it stands for.
     */
    uint64_t tramp = PVM_STUB_WINDOW_ADDR + PVM_STUB_TRAMP_OFF;
    if (sig == PVM_STUB_PREEMPT_SIG) {
        /* Our own code (or a trampoline) was running: a stop is under way or the guest is stopped. */
        extern char __executable_start[], etext[];
        uint64_t ip = m->rip;
        if ((ip >= (uint64_t)(uintptr_t)__executable_start && ip < (uint64_t)(uintptr_t)etext) ||
            ip - PVM_STUB_WINDOW_ADDR < PVM_STUB_WINDOW_SIZE)
            return;                         /* rt_sigreturn puts it back exactly */
    }
    /*
     * The syscall of a trampoline's second half: another stub's patched site that one of our threads ran
     * (two helpers in one target). Report it as that site's own syscall, from the window's site table.
     * A stub space's guest finds only our own window there (or nothing mapped: then no table to read).
     */
#ifdef PVM_HELPER
    const int foreign_sites = 1;
#else
    const int foreign_sites = window != 0;
#endif
    if (foreign_sites && sig == SIGSYS && m->rip - tramp < PVM_STUB_PATCH_MAX * PVM_STUB_TRAMP_SIZE &&
        (m->rip - tramp) % PVM_STUB_TRAMP_SIZE == PVM_STUB_TRAMP_FALLBACK_END) {
        const struct pvm_patch_site *site = (const struct pvm_patch_site *)(PVM_STUB_WINDOW_ADDR + PVM_STUB_SITES_OFF) +
                                            (m->rip - tramp) / PVM_STUB_TRAMP_SIZE;
        syscall_siginfo(tramp_si, site->ret, (int64_t)(int32_t)m->rax);
        si = tramp_si;
        m->rip = m->rcx = site->ret;
    }
    if (window && sig == SIGTRAP && m->rip - tramp < PVM_STUB_PATCH_MAX * PVM_STUB_TRAMP_SIZE) {
        const struct pvm_patch_site *site = patch_site((m->rip - tramp) / PVM_STUB_TRAMP_SIZE);
        sig = SIGSYS;
        syscall_siginfo(tramp_si, site->ret, site->nr);
        si = tramp_si;
        m->rax = (uint64_t)site->nr;
        m->rip = m->rcx = site->ret;
        m->r11 = m->eflags;
    }
    const uint64_t now[PVM_X86_64_NREGS] = {
        m->r15, m->r14, m->r13, m->r12, m->rbp, m->rbx, m->r11, m->r10, m->r9, m->r8, m->rax, m->rcx,
        m->rdx, m->rsi, m->rdi, ~0ULL, m->rip, m->cs, m->eflags, m->rsp, m->ss, rdfsbase(), rdgsbase(),
        0, 0, 0, 0};
    store_stop(stop, (uint32_t)sig, si, now);
    if (frame_fp) {
        copy(fp_area, frame_fp, fp_size);
        canon_xstate(fp_area, fp_size);
        stop->fp_size = fp_size;
    }
    if (!init_fp_size && frame_fp) {            /* the first trap: keep a clean FPU image */
        copy(init_fp, fp_area, fp_size);
        init_fp_size = fp_size;
        mxcsr_mask = *(uint32_t *)(init_fp + 28) ? *(uint32_t *)(init_fp + 28) : 0xffbf;
        /* The fast path saves exactly what a frame holds: the frame's features, in its size. */
        uint64_t frame_mask = *(uint64_t *)(frame_fp + 464 + 8) & xcr0;
        if (window && fp_size > 512 && fp_size == xsave_size_for(frame_mask)) {
            pvm_fast_xmask = frame_mask;
            xsave_size = fp_size;
            header->window = PVM_STUB_WINDOW_ADDR;
        }
    }
    serve(self, slot, stop);

    /*
     * Resume the guest from stop->regs. With XSAVE (always, on x86-64 Linux
     * today) without rt_sigreturn: the handler runs with no signal blocked
     * (SA_NODEFER, empty mask) and the alternate stack is left by rsp alone,
     * so the kernel has nothing to undo; this saves a syscall per stop.
     */
    if (xcr0)
        pvm_stub_resume(resume_frame(self, stop, fp_area));
    const uint64_t *r = stop->regs;
    m->r15 = r[0]; m->r14 = r[1]; m->r13 = r[2]; m->r12 = r[3]; m->rbp = r[4]; m->rbx = r[5];
    m->r11 = r[6]; m->r10 = r[7]; m->r9 = r[8]; m->r8 = r[9]; m->rax = r[10]; m->rcx = r[11];
    m->rdx = r[12]; m->rsi = r[13]; m->rdi = r[14]; m->rip = r[16]; m->eflags = r[18]; m->rsp = r[19];
    m->cs = 0x33;
    m->ss = 0x2b;
    if (frame_fp) {
        if (stop->fp_valid && fp_size)
            copy(frame_fp, fp_area, fp_size);
        else if (init_fp_size == fp_size)
            copy(frame_fp, init_fp, fp_size);
    }
    wrfsbase(r[21]);
    wrgsbase(r[22]);
}

static void use_signal_stack(uint64_t index)
{
    struct {
        uint64_t sp;
        int flags, pad;
        uint64_t size;
    } ss = {(uint64_t)(uintptr_t)(region + PVM_STUB_BLOCK_OFF + index * PVM_STUB_BLOCK_SIZE + PVM_STUB_ALTSTACK_OFF),
            0, 0, PVM_STUB_ALTSTACK_SIZE};
    sys6(__NR_sigaltstack, (long)&ss, 0, 0, 0, 0, 0);
}

/* A new stub thread: its own signal stack, then into the handler like the first one. */
__attribute__((used, noreturn)) void pvm_stub_thread_main(uint64_t index)
{
    uint64_t none = 0;          /* born inside a handler with every signal blocked: unblock them */
    sys6(__NR_rt_sigprocmask, 2 /* SIG_SETMASK */, (long)&none, 0, 8, 0, 0);
    use_signal_stack(index);
    pvm_fast_tid[index] = (uint32_t)sys6(__NR_gettid, 0, 0, 0, 0, 0, 0);
    trap_into_handler();
    sys6(__NR_exit_group, 10, 0, 0, 0, 0, 0);
    __builtin_unreachable();
}

static long parse_int(const char *s)
{
    long v = 0;
    while (*s >= '0' && *s <= '9')
        v = v * 10 + (*s++ - '0');
    return v;
}

static void install_filter(uint64_t ip)
{
    /* seccomp_data: nr @0, arch @4, instruction_pointer @8 (lo) / @12 (hi). */
    enum { LD = 0x20, JEQ = 0x15, JGE = 0x35, AND = 0x54, RET = 0x06 };
    enum { ALLOW = 0x7fff0000U, TRAP = 0x00030000U, KILL = 0x80000000U };
    static const uint32_t set[] = {PVM_STUB_ALLOWED};
    enum { N = sizeof set / sizeof set[0] };
    const uint32_t tramp = (uint32_t)(PVM_STUB_WINDOW_ADDR + PVM_STUB_TRAMP_OFF);
    struct sock_filter_ f[48 + N];
    int i = 0;
    f[i++] = (struct sock_filter_){LD, 0, 0, 4};
    f[i++] = (struct sock_filter_){JEQ, 1, 0, 0xC000003EU};
    f[i++] = (struct sock_filter_){RET, 0, 0, TRAP};                 /* i386 (int $0x80): trap */
    /* gettid from a trampoline's own syscall instruction (ip 7 bytes into one): allow. */
    f[i++] = (struct sock_filter_){LD, 0, 0, 12};
    f[i++] = (struct sock_filter_){JEQ, 0, 8, 0};                    /* -> gadget checks */
    f[i++] = (struct sock_filter_){LD, 0, 0, 8};
    f[i++] = (struct sock_filter_){JGE, 0, 6, tramp};
    f[i++] = (struct sock_filter_){JGE, 5, 0, tramp + PVM_STUB_PATCH_MAX * PVM_STUB_TRAMP_SIZE};
    f[i++] = (struct sock_filter_){AND, 0, 0, PVM_STUB_TRAMP_SIZE - 1};
    f[i++] = (struct sock_filter_){JEQ, 0, 3, PVM_STUB_TRAMP_SYSCALL_END};
    f[i++] = (struct sock_filter_){LD, 0, 0, 0};
    f[i++] = (struct sock_filter_){JEQ, 0, 1, __NR_gettid};
    f[i++] = (struct sock_filter_){RET, 0, 0, ALLOW};
    /* Anything else: only from the gadget. */
    f[i++] = (struct sock_filter_){LD, 0, 0, 8};
    f[i++] = (struct sock_filter_){JEQ, 1, 0, (uint32_t)ip};
    f[i++] = (struct sock_filter_){RET, 0, 0, TRAP};                 /* not from the gadget: trap */
    f[i++] = (struct sock_filter_){LD, 0, 0, 12};
    f[i++] = (struct sock_filter_){JEQ, 1, 0, (uint32_t)(ip >> 32)};
    f[i++] = (struct sock_filter_){RET, 0, 0, TRAP};
    f[i++] = (struct sock_filter_){LD, 0, 0, 0};
    /* recvmsg: only on the lending socket. */
    f[i++] = (struct sock_filter_){JEQ, 0, 6, __NR_recvmsg};
    f[i++] = (struct sock_filter_){LD, 0, 0, 20};
    f[i++] = (struct sock_filter_){JEQ, 0, 2, 0};
    f[i++] = (struct sock_filter_){LD, 0, 0, 16};
    f[i++] = (struct sock_filter_){JEQ, 1, 0, PVM_STUB_LEND_FD};
    f[i++] = (struct sock_filter_){RET, 0, 0, KILL};
    f[i++] = (struct sock_filter_){RET, 0, 0, ALLOW};
    /* close: what it received (not the lending socket). */
    f[i++] = (struct sock_filter_){JEQ, 0, 7, __NR_close};
    f[i++] = (struct sock_filter_){LD, 0, 0, 20};
    f[i++] = (struct sock_filter_){JEQ, 0, 4, 0};
    f[i++] = (struct sock_filter_){LD, 0, 0, 16};
    f[i++] = (struct sock_filter_){JEQ, 2, 0, PVM_STUB_LEND_FD};
    f[i++] = (struct sock_filter_){JGE, 1, 0, 1024};
    f[i++] = (struct sock_filter_){RET, 0, 0, ALLOW};
    f[i++] = (struct sock_filter_){RET, 0, 0, KILL};
    f[i++] = (struct sock_filter_){LD, 0, 0, 0};
    f[i++] = (struct sock_filter_){JEQ, 0, 4, 56};                   /* clone: only a thread of this space */
    f[i++] = (struct sock_filter_){LD, 0, 0, 16};
    f[i++] = (struct sock_filter_){JEQ, 0, 2 + N + 1, (uint32_t)PVM_STUB_CLONE_FLAGS};
    f[i++] = (struct sock_filter_){LD, 0, 0, 20};
    f[i++] = (struct sock_filter_){JEQ, 1 + N + 1, N + 1, 0};        /* -> ALLOW / -> KILL */
    f[i++] = (struct sock_filter_){LD, 0, 0, 0};
    for (int j = 0; j < N; j++)
        f[i++] = (struct sock_filter_){JEQ, (uint8_t)(N - j), 0, set[j]};
    f[i++] = (struct sock_filter_){RET, 0, 0, KILL};                 /* from the gadget, not allowed: kill */
    f[i++] = (struct sock_filter_){RET, 0, 0, ALLOW};
    struct {
        uint16_t len;
        uint16_t pad[3];
        struct sock_filter_ *filter;
    } prog = {(uint16_t)i, {0, 0, 0}, f};
    if (sys6(__NR_prctl, PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0, 0) || sys6(__NR_seccomp, SECCOMP_SET_MODE_FILTER, 0, (long)&prog, 0, 0, 0))
        sys6(__NR_exit_group, 3, 0, 0, 0, 0, 0);
}

static inline void cpuid(uint32_t leaf, uint32_t sub, uint32_t *a, uint32_t *b, uint32_t *c, uint32_t *d)
{
    __asm__ volatile("cpuid" : "=a"(*a), "=b"(*b), "=c"(*c), "=d"(*d) : "a"(leaf), "c"(sub));
}

/* The standard-format XSAVE size for a feature mask: the end of its highest component. */
static uint32_t xsave_size_for(uint64_t mask)
{
    uint32_t size = 576;
    for (uint32_t i = 2; i < 64; i++)
        if ((mask & (1ULL << i)) && comp_off[i] + comp_size[i] > size)
            size = comp_off[i] + comp_size[i];
    return size;
}

/*
 * The patching window: map it at its fixed address (never over anything) and
 * fill in every trampoline. Patching stays off (header->window 0) unless
 * this works and XSAVE saves what a signal frame holds (checked at the first trap).
 */
enum { NO_WINDOW, MAP_WINDOW, WINDOW_MAPPED };     /* WINDOW_MAPPED: the helper's caller mapped it for us */

static void setup_window(long fd, int how)
{
    uint32_t a, b, c, d;
    cpuid(1, 0, &a, &b, &c, &d);
    if (!(c & (1U << 27)))                              /* OSXSAVE */
        return;
    uint32_t lo, hi;
    __asm__ volatile("xgetbv" : "=a"(lo), "=d"(hi) : "c"(0));
    cpuid(0xd, 0, &a, &b, &c, &d);
    xcr0 = ((uint64_t)hi << 32) | lo;
    for (uint32_t i = 2; i < 64; i++)
        if (xcr0 & (1ULL << i)) {
            cpuid(0xd, i, &a, &b, &c, &d);
            comp_size[i] = a;
            comp_off[i] = b;
        }
    for (int k = 0; k < PVM_STUB_MAX_THREADS; k++) {
        char *block = region + PVM_STUB_BLOCK_OFF + k * PVM_STUB_BLOCK_SIZE;
        pvm_fast_stack[k] = (uint64_t)(uintptr_t)(block + PVM_STUB_ALTSTACK_OFF + PVM_STUB_ALTSTACK_SIZE - FAST_OUT_SPACE);
        pvm_fast_fp[k] = (uint64_t)(uintptr_t)(block + PVM_STUB_FP_OFF);
        pvm_fast_tid[k] = ~0U;
    }
    if (how == NO_WINDOW)
        return;
    if (how == MAP_WINDOW) {
        long at = sys6(__NR_mmap, PVM_STUB_WINDOW_ADDR, PVM_STUB_WINDOW_SIZE, 5 /* R|X */,
                       MAP_SHARED | MAP_FIXED_NOREPLACE, fd, PVM_STUB_WINDOW_OFF);
        if (at != (long)PVM_STUB_WINDOW_ADDR) {
            if (at > 0)
                sys6(__NR_munmap, at, PVM_STUB_WINDOW_SIZE, 0, 0, 0, 0);
            return;
        }
    }
    window = region + PVM_STUB_WINDOW_OFF;
    uint64_t entry = PVM_STUB_WINDOW_ADDR + PVM_STUB_ENTRY_OFF;
    *(uint64_t *)(window + PVM_STUB_ENTRY_OFF) = (uint64_t)(uintptr_t)pvm_stub_fast_entry;
    for (uint32_t i = 0; i < PVM_STUB_PATCH_MAX; i++) {
        uint64_t t = PVM_STUB_WINDOW_ADDR + PVM_STUB_TRAMP_OFF + (uint64_t)i * PVM_STUB_TRAMP_SIZE;
        uint8_t *p = (uint8_t *)window + PVM_STUB_TRAMP_OFF + i * PVM_STUB_TRAMP_SIZE;
        int32_t rel = (int32_t)(entry - (t + 18));
        uint64_t site = PVM_STUB_WINDOW_ADDR + PVM_STUB_SITES_OFF + (uint64_t)i * sizeof(struct pvm_patch_site);
        int32_t nr_rel = (int32_t)(site + 8 - (t + 24)), ret_rel = (int32_t)(site - (t + 32));
        const uint8_t code[32] = {
            0xb8, __NR_gettid, 0, 0, 0,                  /* mov $__NR_gettid, %eax */
            0x0f, 0x05,                                 /* syscall: eax = tid, r11 = rflags */
            0xb9, (uint8_t)i, (uint8_t)(i >> 8), 0, 0,  /* mov $i, %ecx */
            0xff, 0x25, (uint8_t)rel, (uint8_t)(rel >> 8), (uint8_t)(rel >> 16), (uint8_t)(rel >> 24),
            /* PVM_STUB_TRAMP_FALLBACK: mov site.nr(%rip), %eax; syscall; jmp *site.ret(%rip) */
            0x8b, 0x05, (uint8_t)nr_rel, (uint8_t)(nr_rel >> 8), (uint8_t)(nr_rel >> 16), (uint8_t)(nr_rel >> 24),
            0x0f, 0x05,
            0xff, 0x25, (uint8_t)ret_rel, (uint8_t)(ret_rel >> 8), (uint8_t)(ret_rel >> 16), (uint8_t)(ret_rel >> 24)};
        _Static_assert(PVM_STUB_TRAMP_SIZE == 32 && PVM_STUB_TRAMP_FALLBACK == 18 && PVM_STUB_TRAMP_FALLBACK_END == 26,
                       "trampoline layout");
        for (int j = 0; j < PVM_STUB_TRAMP_SIZE; j++)
            p[j] = code[j];
        *(uint64_t *)(window + PVM_STUB_SLOTS_OFF + 8 * i) = t;
    }
}

static int handled(int sig)
{
    return sig == 31 /* SIGSYS */ || sig == 11 || sig == 7 || sig == 8 || sig == 4 || sig == 5 || sig == PVM_STUB_PREEMPT_SIG;
}

/* Handlers for guest faults, traps and our preemption (every other signal ignored if ignore_others); then the
 * filter, and into the handler. */
__attribute__((noreturn)) static void serve_from_handler(int ignore_others)
{
    header->stub_pid = (uint32_t)sys6(__NR_getpid, 0, 0, 0, 0, 0, 0);
    header->region_base = (uint64_t)(uintptr_t)region;
    header->gadget = (uint64_t)(uintptr_t)pvm_stub_gadget;
    use_signal_stack(0);
    for (int sig = 1; sig <= 64; sig++) {
        if (!handled(sig) && (!ignore_others || sig == 9 || sig == 19))
            continue;
        struct kernel_sigaction sa;
        sa.handler = handled(sig) ? (void *)pvm_stub_handler : (void *)1 /* SIG_IGN */;   /* field by field: an
                                                                  initializer may become a relocated template */
        sa.flags = SA_SIGINFO | SA_ONSTACK | SA_RESTORER | SA_NODEFER;
        sa.restorer = (void *)pvm_stub_restorer;
        sa.mask = 0;                /* the handler may leave without rt_sigreturn: nothing to unblock */
        if (sys6(__NR_rt_sigaction, sig, (long)&sa, 0, 8, 0, 0) && handled(sig))
            sys6(__NR_exit_group, 7, 0, 0, 0, 0, 0);
    }
    uint64_t none = 0;
    sys6(__NR_rt_sigprocmask, 2 /* SIG_SETMASK */, (long)&none, 0, 8, 0, 0);
    install_filter((uint64_t)(uintptr_t)pvm_stub_gadget + 2);
    trap_into_handler();
    sys6(__NR_exit_group, 8, 0, 0, 0, 0, 0);
    __builtin_unreachable();
}

__attribute__((used, noreturn)) void pvm_stub_main(uint64_t *sp)
{
    long argc = (long)sp[0];
    char **argv = (char **)(sp + 1);
    if (argc < 2)
        sys6(__NR_exit_group, 2, 0, 0, 0, 0, 0);
    if (argv[1][0] == 'p') {                /* "plain": an empty process for the ptrace engine to borrow */
        sys6(__NR_close_range, 0, ~0U, 0, 0, 0, 0);
        sys6(__NR_prctl, PR_SET_PDEATHSIG, 9, 0, 0, 0, 0);
        for (;;)
            sys6(__NR_pause, 0, 0, 0, 0, 0, 0);
    }
    long fd = parse_int(argv[1]);
    long base = sys6(__NR_mmap, 0, PVM_STUB_REGION_SIZE, 3 /* RW */, 1 /* SHARED */, fd, 0);
    if (base < 0)
        sys6(__NR_exit_group, 4, 0, 0, 0, 0, 0);
    region = (char *)base;
    header = (struct pvm_stub_header *)region;
    if (header->magic != PVM_STUB_MAGIC)
        sys6(__NR_exit_group, 5, 0, 0, 0, 0, 0);
    setup_window(fd, argc > 3 && argv[3][0] == 'n' ? NO_WINDOW : MAP_WINDOW);   /* "nowindow": the range stays free */
    if (argc > 2) {                         /* the lending socket, at its fixed number */
        long lend = parse_int(argv[2]);
        if (lend != PVM_STUB_LEND_FD && sys6(__NR_dup3, lend, PVM_STUB_LEND_FD, 0, 0, 0, 0) != PVM_STUB_LEND_FD)
            sys6(__NR_exit_group, 11, 0, 0, 0, 0, 0);
        sys6(__NR_close_range, 0, PVM_STUB_LEND_FD - 1, 0, 0, 0, 0);
        sys6(__NR_close_range, PVM_STUB_LEND_FD + 1, ~0U, 0, 0, 0, 0);
    } else {
        sys6(__NR_close_range, 0, ~0U, 0, 0, 0, 0);         /* no descriptors at all from here on */
    }
    sys6(__NR_prctl, PR_SET_PDEATHSIG, 9, 0, 0, 0, 0);
    static const char comm[16] = "pvmexec-stub";
    sys6(__NR_prctl, PR_SET_NAME, (long)comm, 0, 0, 0, 0);
    if (sys6(__NR_getppid, 0, 0, 0, 0, 0, 0) != header->caller_pid)
        sys6(__NR_exit_group, 6, 0, 0, 0, 0, 0);
    serve_from_handler(0);
}

#ifdef PVM_HELPER
/*
 * The helper (see layout.h), started by the agent inside a live target with
 * the region already mapped at base: the same service as the stub, in the
 * target's address space. parent: the agent's tgid, our getppid() while it lives.
 */
__attribute__((used, noreturn)) void pvm_helper_main(char *base, long parent)
{
    sys6(__NR_close_range, 0, ~0U, 0, 0, 0, 0);         /* a copy of the target's table: none of it is ours */
    sys6(__NR_prctl, PR_SET_PDEATHSIG, 9, 0, 0, 0, 0);
    if (sys6(__NR_getppid, 0, 0, 0, 0, 0, 0) != parent)
        sys6(__NR_exit_group, 6, 0, 0, 0, 0, 0);        /* the agent left before the line above */
    region = base;
    header = (struct pvm_stub_header *)region;
    if (header->magic != PVM_STUB_MAGIC)
        sys6(__NR_exit_group, 5, 0, 0, 0, 0, 0);
    header->caller_pid = (int32_t)parent;
    sys6(__NR_setpgid, 0, 0, 0, 0, 0, 0);              /* signals to the target's process group are not ours */
    int mapped = header->window == PVM_STUB_WINDOW_ADDR;
    header->window = 0;                                 /* until the first trap shows patching can work */
    setup_window(-1, mapped ? WINDOW_MAPPED : NO_WINDOW);
    static const char comm[16] = "pvmexec-helper";
    sys6(__NR_prctl, PR_SET_NAME, (long)comm, 0, 0, 0, 0);
    serve_from_handler(1);      /* the target's handlers, copied into us, are not ours to run */
}
#endif
