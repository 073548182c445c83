/*
 * The agent: a thread started inside the target's thread group that runs
 * system calls posted by the caller through the shared region. Freestanding,
 * position-independent; it never installs signal handlers (it shares the
 * target's), never touches %fs (it has the borrowed thread's TLS), and blocks
 * every signal.
 */
#include "layout.h"
#include "freestanding/freestanding.h"

#define POLLIN 1

static inline long sys6(long n, long a, long b, long c, long d, long e, long f)
{
    register long r10 __asm__("r10") = d;
    register long r8 __asm__("r8") = e;
    register long r9 __asm__("r9") = f;
    long ret;
    __asm__ volatile("syscall"
                     : "=a"(ret)
                     : "a"(n), "D"(a), "S"(b), "d"(c), "r"(r10), "r"(r8), "r"(r9)
                     : "rcx", "r11", "memory");
    return ret;
}

#include "freestanding/channel.h"

struct pollfd_ {
    int fd;
    short events, revents;
};


static int caller_gone(struct pvm_header *h)
{
    if (h->caller_pidfd < 0)
        return 0;
    struct pollfd_ p = {h->caller_pidfd, POLLIN, 0};
    return sys6(__NR_poll, (long)&p, 1, 0, 0, 0, 0) == 1 && (p.revents & POLLIN);
}

/* The helper process (child: calls entry(arg, our tgid) on stack); returns its pid or -errno. */
long pvm_agent_spawn(uint64_t stack, uint64_t entry, uint64_t arg);

struct helper {
    long pid;                   /* our child, until reaped */
    uint64_t map, size;         /* its region in the target */
    uint64_t window;            /* its patching window there, or 0 */
};

#define P_PID 1
#define WNOHANG 1
#define WEXITED 4
#define WNOWAIT 0x01000000
#define WCLONE 0x80000000U

/* Whether the helper is still our child, and if so whether it has ended (WNOWAIT: it stays unreaped). */
static int helper_state(struct helper *hp, int *ended)
{
    uint32_t si[32] = {0};
    long r = sys6(__NR_waitid, P_PID, hp->pid, (long)si, WEXITED | WNOHANG | WNOWAIT | WCLONE, 0, 0);
    *ended = r == 0 && si[4] == (uint32_t)hp->pid;          /* si_pid */
    return r == 0;
}

/* The helper ended, reaped (nothing stays for the target's wait(__WALL) to see) and its region unmapped. */
static void end_helper(struct helper *hp, int only_if_ended)
{
    int ended;
    if (hp->pid <= 0)
        return;
    if (helper_state(hp, &ended)) {         /* else the target's own wait(__WALL) took it: its pid is not ours */
        if (only_if_ended && !ended)
            return;
        if (!ended)
            sys6(__NR_kill, hp->pid, 9, 0, 0, 0, 0);
        sys6(__NR_waitid, P_PID, hp->pid, 0, WEXITED | WCLONE, 0, 0);
    }
    sys6(__NR_munmap, (long)hp->map, (long)hp->size, 0, 0, 0, 0);
    /* Patched code may still jump to the window until the caller puts the sites back: one that left
     * unused leaves its window to the caller. */
    if (hp->window && !only_if_ended)
        sys6(__NR_munmap, (long)hp->window, PVM_STUB_WINDOW_SIZE, 0, 0, 0, 0);
    hp->pid = 0;
}

/* Unmaps [rest, rest + rest_size) then [code_base, code_base + code_keep), then exits. */
void pvm_agent_final(uint64_t rest, uint64_t rest_size, uint64_t code_base, uint64_t code_keep);

__attribute__((noreturn, used)) void pvm_agent_main(struct pvm_header *h)
{
    uint64_t all = ~0ULL;
    sys6(__NR_rt_sigprocmask, 2 /* SIG_SETMASK */, (long)&all, 0, 8, 0, 0);
    struct pvm_slot *slot = (struct pvm_slot *)((char *)h + (PVM_SLOT_OFF - PVM_HEADER_OFF));
    uint32_t last = 0;          /* the caller counts from 0 too */
    int asked = 0;              /* leaving on the caller's request, not at its death */
    struct helper helper = {0, 0, 0, 0};
    st(&h->state, PVM_STATE_SERVING);
    sys6(__NR_futex, (long)&h->state, FUTEX_WAKE, 1, 0, 0, 0);
    for (;;) {
        /* Only last + 1 is a request; other values are junk the target may have written. */
        uint32_t claimed = ld(&slot->taken);
        if ((int32_t)(claimed - last) > 0)
            last = claimed;         /* requests the caller withdrew while we were stopped */
        uint32_t want = last + 1;
        struct timespec_ ts = {h->idle_ms / 1000, (long)(h->idle_ms % 1000) * 1000000L};
        int timed_out;
        uint32_t seq = chan_wait(slot, want, &ts, &timed_out);
        if (seq != want) {
            if (timed_out && caller_gone(h))
                break;
            if (timed_out)
                end_helper(&helper, 1);     /* a helper that left when idle: reaped now */
            continue;
        }
        uint32_t expected = last;
        if (!__atomic_compare_exchange_n(&slot->taken, &expected, seq, 0, __ATOMIC_ACQ_REL, __ATOMIC_ACQUIRE)) {
            /* The caller claimed it (withdrawn while we were stopped): skip, unanswered. */
            if ((int32_t)(expected - last) > 0)
                last = expected;
            continue;
        }
        last = seq;
        uint32_t op = slot->op, count = slot->count;
        if (op == PVM_OP_CALLS) {
            if (count > PVM_MAX_BATCH)
                count = 0;
            for (uint32_t i = 0; i < count; i++) {
                struct pvm_call *c = &slot->calls[i];
                c->ret = sys6(c->nr, c->args[0], c->args[1], c->args[2], c->args[3], c->args[4], c->args[5]);
            }
        }
        if (op == PVM_OP_SPAWN) {
            struct pvm_call *c = &slot->calls[0];
            if (!c->args[0]) {              /* stack 0: end it */
                end_helper(&helper, 0);
                c->ret = 0;
            } else if (helper.pid) {
                c->ret = -17;               /* EEXIST: one helper at a time */
            } else {
                c->ret = pvm_agent_spawn(c->args[0], c->args[1], c->args[2]);
                if (c->ret > 0)
                    helper = (struct helper){c->ret, c->args[2], c->args[3], c->args[4]};
            }
        }
        if (op == PVM_OP_EXIT)
            end_helper(&helper, 0);
        chan_respond(slot, seq);
        if (op == PVM_OP_EXIT && count == 1) {
            asked = 1;              /* leave as at the caller's death: the caller unmaps the last page */
            break;
        }
        if (op == PVM_OP_EXIT) {
            if (h->caller_pidfd >= 0)
                sys6(__NR_close, h->caller_pidfd, 0, 0, 0, 0, 0);
            sys6(__NR_exit, 0, 0, 0, 0, 0, 0);   /* the caller unmaps the region */
        }
    }
    /* The caller died, or asked us to leave so: remove ourselves. The last code page cannot unmap
     * itself; the caller (or its janitor) unmaps it once we are gone. */
    if (!asked) {
        end_helper(&helper, 0);
        st(&h->state, PVM_STATE_CALLER_GONE);
    }
    if (h->caller_pidfd >= 0)
        sys6(__NR_close, h->caller_pidfd, 0, 0, 0, 0, 0);
    sys6(__NR_set_tid_address, 0, 0, 0, 0, 0, 0);    /* no clear-on-exit write into unmapped memory */
    pvm_agent_final(h->code_base + h->code_keep + PVM_PAGE, PVM_REGION_SIZE - h->code_keep - PVM_PAGE,
                    h->code_base, h->code_keep);
    __builtin_unreachable();
}

/*
 * bootstrap(header, stack_top, clone_flags, ctid), r13 = way back or 0: runs
 * on a borrowed target thread. The new thread enters pvm_agent_main on its own
 * stack; the borrowed thread jumps to the way back (the caller's trampoline,
 * which restores it: the caller stops it at clone's exit first) or, without
 * one, stops on int3 with the clone result in rax.
 */
__asm__(
    ".pushsection .text.pvm_entry,\"ax\",@progbits\n"
    ".globl pvm_agent_bootstrap\n"
    ".type pvm_agent_bootstrap,@function\n"
    "pvm_agent_bootstrap:\n"
    "  mov %rdi, %r12\n"
    "  mov %rdx, %rdi\n"          /* flags; rsi = child stack */
    "  xor %edx, %edx\n"          /* parent_tid */
    "  mov %rcx, %r10\n"          /* child_tid */
    "  xor %r8d, %r8d\n"          /* tls */
    "  mov $" PVM_STR(__NR_clone) ", %eax\n"
    "  syscall\n"
    "  test %rax, %rax\n"
    "  jz 1f\n"
    "  test %r13, %r13\n"
    "  jz 2f\n"
    "  jmp *%r13\n"
    "2:\n"
    "  int3\n"
    "  ud2\n"
    "1:\n"
    "  mov %r12, %rdi\n"
    "  and $-16, %rsp\n"
    "  call pvm_agent_main\n"
    "  ud2\n"
    ".size pvm_agent_bootstrap, .-pvm_agent_bootstrap\n"
    ".popsection\n");

__asm__(
    ".pushsection .text\n"
    ".globl pvm_agent_spawn\n"
    ".type pvm_agent_spawn,@function\n"
    "pvm_agent_spawn:\n"
    "  push %r12\n push %r13\n push %r14\n"
    "  mov %rsi, %r12\n"
    "  mov %rdx, %r13\n"
    "  mov $" PVM_STR(__NR_getpid) ", %eax\n"
    "  syscall\n"
    "  mov %rax, %r14\n"
    "  mov %rdi, %rsi\n"                 /* the child's stack */
    "  mov $" PVM_STR(PVM_HELPER_CLONE_FLAGS) ", %edi\n"
    "  xor %edx, %edx\n"
    "  xor %r10d, %r10d\n"
    "  xor %r8d, %r8d\n"
    "  mov $" PVM_STR(__NR_clone) ", %eax\n"
    "  syscall\n"
    "  test %rax, %rax\n"
    "  jz 1f\n"
    "  pop %r14\n pop %r13\n pop %r12\n"
    "  ret\n"
    "1:\n"
    "  mov %r13, %rdi\n"
    "  mov %r14, %rsi\n"
    "  and $-16, %rsp\n"
    "  call *%r12\n"
    "  ud2\n"
    ".size pvm_agent_spawn, .-pvm_agent_spawn\n"
    ".popsection\n");

/* Unmaps everything after this page, then the code before it, then exits; uses no memory. */
__asm__(
    ".pushsection .pvm_final,\"ax\",@progbits\n"
    ".balign 4096\n"
    ".globl pvm_agent_final\n"
    ".type pvm_agent_final,@function\n"
    "pvm_agent_final:\n"
    "  mov %rdx, %r12\n"
    "  mov %rcx, %r13\n"
    "  mov $" PVM_STR(__NR_munmap) ", %eax\n"   /* munmap(rest, rest_size): the stack is gone after this */
    "  syscall\n"
    "  mov %r12, %rdi\n"
    "  mov %r13, %rsi\n"
    "  test %rsi, %rsi\n"
    "  jz 1f\n"
    "  mov $" PVM_STR(__NR_munmap) ", %eax\n"   /* munmap(code_base, code_keep) */
    "  syscall\n"
    "1:\n"
    "  xor %edi, %edi\n"
    "  mov $" PVM_STR(__NR_exit) ", %eax\n"     /* exit (this thread only) */
    "  syscall\n"
    "  ud2\n"
    ".size pvm_agent_final, .-pvm_agent_final\n"
    ".popsection\n");
