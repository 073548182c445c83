/*
 * Layouts and constants shared by the C extension, the guest blob and Python.
 * Python reads the same facts from _core.LAYOUT; tests/test_layout.py checks
 * them against pvmexec.arch. Change one side and the test fails.
 */
#ifndef PVMEXEC_LAYOUT_H
#define PVMEXEC_LAYOUT_H

/* The proposal's interface. */
#define PVM_PROCESS_VM_EXEC_SYSCALL 0x1UL

/* The proposal's selftest constants (guest code and tests agree on them). */
#define PVM_TEST_SYSCALL 123
#define PVM_TEST_SYSCALL_RET 456
#define PVM_TEST_MARKER 789

/* x86-64 struct user_regs_struct: 27 unsigned longs in this order. */
#define PVM_X86_64_NREGS 27
#define PVM_X86_64_REG_NAMES \
  "r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", \
  "rax", "rcx", "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "eflags", \
  "rsp", "ss", "fs_base", "gs_base", "ds", "es", "fs", "gs"

/* siginfo_t is 128 bytes; the fields we decode, by offset. */
#define PVM_SIGINFO_SIZE 128
#define PVM_SI_SIGNO 0
#define PVM_SI_ERRNO 4
#define PVM_SI_CODE 8
#define PVM_SI_PID 16          /* kill / rt_sigqueueinfo */
#define PVM_SI_UID 20
#define PVM_SI_ADDR 16         /* SIGSEGV, SIGBUS, SIGILL, SIGFPE, SIGTRAP */
#define PVM_SI_CALL_ADDR 16    /* SIGSYS */
#define PVM_SI_SYSCALL 24
#define PVM_SI_ARCH 28

#define PVM_AUDIT_ARCH_X86_64 0xC000003EU
#define PVM_AUDIT_ARCH_I386 0x40000003U
#define PVM_SYS_SECCOMP 1

/*
 * The agent region: one memfd mapped by the caller (all read-write) and by the
 * target (code read+exec, the rest read-write). Offsets are from its start.
 * The caller validates everything it reads back: the target can write it all.
 */
#define PVM_PAGE 4096
#define PVM_AGENT_MAGIC 0x61766d70U          /* "pmva" */
#define PVM_AGENT_VERSION 1U
#define PVM_MAX_BATCH 64
#define PVM_AGENT_CODE_MAX (4 * PVM_PAGE)    /* code pages; the last one holds pvm_agent_final */
#define PVM_HEADER_OFF PVM_AGENT_CODE_MAX
#define PVM_SLOT_OFF (PVM_HEADER_OFF + PVM_PAGE)
#define PVM_SLOT_SIZE (2 * PVM_PAGE)
#define PVM_DATA_OFF (PVM_SLOT_OFF + PVM_SLOT_SIZE)
#define PVM_DATA_SIZE (64 * 1024)
#define PVM_STACK_OFF (PVM_DATA_OFF + PVM_DATA_SIZE)
#define PVM_STACK_SIZE (64 * 1024)
#define PVM_REGION_SIZE (PVM_STACK_OFF + PVM_STACK_SIZE)

#define PVM_OP_CALLS 1U
#define PVM_OP_EXIT 2U

#define PVM_STATE_STARTING 0U
#define PVM_STATE_SERVING 1U
#define PVM_STATE_CALLER_GONE 2U

#ifndef __ASSEMBLER__
#include <stdint.h>
#include <asm/unistd.h>

struct pvm_call {
    int64_t nr;
    uint64_t args[6];
    int64_t ret;
};

struct pvm_header {
    uint32_t magic;
    uint32_t version;
    uint32_t agent_tid;        /* set by clone, cleared by the kernel when the agent exits */
    uint32_t state;
    int32_t caller_pidfd;      /* the agent's pidfd for the caller, -1 if none */
    uint32_t idle_ms;          /* futex sleep before checking whether the caller is alive */
    uint64_t code_base;        /* target addresses of the two mappings */
    uint64_t data_base;
    uint64_t code_keep;        /* bytes of code before the final page */
};

/*
 * One request/response slot; the two sequence words live on separate cache
 * lines. Each side records the CPU it last ran on: spinning only pays when the
 * other side runs on another CPU, so on the same CPU both go straight to the
 * futex (a spinner would hold the CPU the other one needs).
 */
struct pvm_slot {
    uint32_t req_seq;          /* caller: bumps to post */
    uint32_t agent_sleeping;   /* agent: 1 while in futex wait on req_seq */
    uint32_t spin;             /* caller: agent spin budget (iterations) */
    uint32_t caller_cpu;       /* caller: the CPU it posted from */
    uint32_t pad0[12];
    uint32_t resp_seq;         /* agent: = req_seq when done */
    uint32_t caller_sleeping;  /* caller: 1 while in futex wait on resp_seq */
    uint32_t agent_cpu;        /* agent: the CPU it answered from */
    uint32_t taken;            /* the last request claimed: the agent claims n by CAS n-1 -> n
                                  before running it; the caller withdraws n (agent stopped) by
                                  claiming it itself, so the agent skips it */
    uint32_t pad1[12];
    uint32_t op;
    uint32_t count;
    uint32_t pad2[14];
    struct pvm_call calls[PVM_MAX_BATCH];
};

/*
 * Stub spaces: a region created by the caller, mapped by the stub process.
 * Page 0 is the header; then one block per stub thread: its channel slot, the
 * state of its last stop, the guest FPU area and the signal stack on which the
 * stub's handler runs. The guest can write all of it.
 */
#define PVM_STUB_MAGIC 0x62757473U          /* "stub" */
#define PVM_STUB_BLOCK_OFF PVM_PAGE
#define PVM_STUB_STOP_OFF PVM_SLOT_SIZE                  /* in a block */
#define PVM_STUB_FP_OFF (PVM_STUB_STOP_OFF + PVM_PAGE)
#define PVM_STUB_FP_MAX (16 * 1024)
#define PVM_STUB_ALTSTACK_OFF (PVM_STUB_FP_OFF + PVM_STUB_FP_MAX)
#define PVM_STUB_ALTSTACK_SIZE (64 * 1024)
#define PVM_STUB_BLOCK_SIZE (PVM_STUB_ALTSTACK_OFF + PVM_STUB_ALTSTACK_SIZE)
#define PVM_STUB_MAX_THREADS 16
#define PVM_STUB_WINDOW_OFF (PVM_STUB_BLOCK_OFF + PVM_STUB_MAX_THREADS * PVM_STUB_BLOCK_SIZE)
#define PVM_STUB_REGION_SIZE (PVM_STUB_WINDOW_OFF + PVM_STUB_WINDOW_SIZE)

/*
 * Syscall patching (stub spaces). A guest syscall site `mov $nr, %eax;
 * syscall` (b8 imm32 0f 05) that trapped once is rewritten to `jmp *slot`
 * (ff 24 25 + the slot's 32-bit address). Slots live in a window mapped at a
 * fixed low address whose upper two bytes are 0f 05, so the last two bytes of
 * the patched site still read `syscall`: code that jumps straight to the
 * syscall instruction (or a caller restarting it at rip - 2) still traps. A
 * slot points at its trampoline, which asks for the thread's id (the filter
 * allows gettid from exactly that instruction) and enters the stub without
 * a signal. The window is the last part of the region: the stub maps it
 * read+exec at PVM_STUB_WINDOW_ADDR; stub and caller write it via the region.
 */
#define PVM_STUB_WINDOW_ADDR 0x050f0000UL
#define PVM_STUB_WINDOW_ADDR_HEX 0x050f0000     /* the same, for assembler strings */
#define PVM_STUB_WINDOW_SIZE 0x10000
#define PVM_STUB_PATCH_MAX 1024
#define PVM_STUB_SLOTS_OFF 0x0                  /* in the window: u64 trampoline address per site */
#define PVM_STUB_TRAMP_OFF 0x2000               /* trampolines, PVM_STUB_TRAMP_SIZE bytes each */
#define PVM_STUB_TRAMP_SIZE 32
#define PVM_STUB_TRAMP_SYSCALL_END 7            /* ip after the trampoline's gettid syscall */
/* A trampoline's second half: the site's own syscall, made for real, for a thread that is none of this
 * stub's (another helper's, or the target's own, running patched code); then back to the site. */
#define PVM_STUB_TRAMP_FALLBACK 18
#define PVM_STUB_TRAMP_FALLBACK_END 26          /* ip after its syscall */
#define PVM_STUB_SITES_OFF 0xA000               /* struct pvm_patch_site per site */
#define PVM_STUB_ENTRY_OFF 0xE000               /* u64: the stub's entry for trampolines */

/*
 * The caller's "stop now" for a guest that runs without syscalls: sent with
 * tgkill to a stub thread. In guest code it is a stop like any signal; in
 * the stub's own code it is ignored (a stop is under way, or the guest is
 * stopped), and the caller sends it again until it gets one.
 */
#define PVM_STUB_PREEMPT_SIG 23             /* SIGURG */

#define PVM_OP_RUN 3U                       /* stub: resume the guest with stop.regs / fp */
#define PVM_OP_SPAWN 4U                     /* stub: start the thread of block calls[0].args[0];
                                               agent: start the helper (calls[0].args: stack, entry,
                                               region, its size, window or 0), or end it (stack 0) */

/*
 * The agent's helper for mode 1 on a live target: a process sharing the
 * target's memory (CLONE_VM) but not its signal handlers, thread group or
 * descriptors; exit signal 0, so that no wait() of the target without __WCLONE
 * or __WALL sees it and no SIGCHLD is sent. The agent thread is its parent:
 * it reaps it before it leaves, and PR_SET_PDEATHSIG ends it with the agent.
 */
#define PVM_HELPER_CLONE_FLAGS 0x100        /* CLONE_VM, exit signal 0 */
/* A helper whose guest thread waited this many idle periods for a request leaves (state HELPER_IDLE):
 * a target that runs execve while a helper exists gets a SIGCHLD from its end (the kernel's rule for a
 * child whose parent ran execve), so it exists only while mode 1 is in use. */
#define PVM_STUB_IDLE_MS 500
#define PVM_HELPER_IDLE_ROUNDS 2
#define PVM_HELPER_IDLE 2U

/* The only clone the stub's filter allows: a thread in the same space. */
#define PVM_STUB_CLONE_FLAGS 0x50f00UL      /* VM FS FILES SIGHAND THREAD SYSVSEM */

#define PVM_STUB_STARTING 0U
#define PVM_STUB_READY 1U

struct pvm_stub_header {
    uint32_t magic;
    uint32_t state;
    int32_t caller_pid;         /* the stub's getppid() while its caller lives: 0 from its own pid namespace */
    uint32_t stub_pid;          /* its getpid(): 1 in its own pid namespace */
    uint64_t region_base;       /* where the stub mapped the region */
    uint64_t gadget;            /* the stub's one syscall instruction */
    uint64_t window;            /* PVM_STUB_WINDOW_ADDR if mapped (patching possible), else 0 */
};

/* A patched site: where the guest continues (after its syscall) and the syscall number. */
struct pvm_patch_site {
    uint64_t ret;
    int64_t nr;
};

/*
 * The only syscalls the stub's filter lets through, and only from its gadget:
 * mmap mprotect munmap rt_sigprocmask rt_sigreturn mremap madvise mincore getpid
 * exit getppid sigaltstack gettid futex exit_group, and clone with exactly
 * PVM_STUB_CLONE_FLAGS (a thread in the same space). None reaches outside the
 * stub's own address space. The stub's one descriptor is PVM_STUB_LEND_FD, a
 * socket the caller sends it files to map on: recvmsg only on it, close only
 * of what it received (PVM_STUB_LENDING, for mode 2 only); mmap maps nothing
 * else.
 */
#define PVM_STUB_LEND_FD 3
#define PVM_STUB_LENDING __NR_recvmsg, __NR_close
#define PVM_STUB_LEND_SCRATCH 2048          /* in the region's first page: the lending msghdr and cmsg */
#define PVM_STUB_ALLOWED __NR_mmap, __NR_mprotect, __NR_munmap, __NR_rt_sigprocmask, __NR_rt_sigreturn, \
    __NR_mremap, __NR_madvise, __NR_mincore, __NR_getpid, __NR_exit, __NR_getppid, __NR_sigaltstack, __NR_gettid, \
    __NR_futex, __NR_exit_group

/* The state of a stopped guest thread (written by the stub, read by the caller; and back for RUN). */
struct pvm_stop {
    uint32_t signo;             /* 0 before the first run */
    uint32_t fp_valid;          /* RUN: 1 = load fp from the block's FP area, 0 = clean FPU */
    uint32_t fp_size;           /* stop: bytes of xstate saved in the FP area */
    uint32_t ready;             /* 1 once the thread of this block waits for requests */
    uint8_t siginfo[128];
    uint64_t regs[27];          /* struct user_regs_struct order */
};

_Static_assert(sizeof(struct pvm_stub_header) <= PVM_STUB_LEND_SCRATCH, "stub header fits before the lending scratch");
_Static_assert(sizeof(struct pvm_stop) <= PVM_PAGE, "stop fits");
_Static_assert(__builtin_offsetof(struct pvm_stop, siginfo) == 16, "stop.siginfo");
_Static_assert(__builtin_offsetof(struct pvm_stop, regs) == 144, "stop.regs");
_Static_assert(__builtin_offsetof(struct pvm_stub_header, gadget) == 24, "stub header gadget");
_Static_assert(__builtin_offsetof(struct pvm_stub_header, window) == 32, "stub header window");
_Static_assert(((PVM_STUB_WINDOW_ADDR >> 16) & 0xffff) == 0x050f && PVM_STUB_WINDOW_ADDR + PVM_STUB_WINDOW_SIZE < 0x80000000UL,
               "slot addresses end in the bytes of `syscall` and fit a sign-extended disp32");
_Static_assert(PVM_STUB_WINDOW_ADDR_HEX == PVM_STUB_WINDOW_ADDR, "window address spelled twice");
_Static_assert(PVM_STUB_SLOTS_OFF + 8 * PVM_STUB_PATCH_MAX <= PVM_STUB_TRAMP_OFF, "slots fit");
_Static_assert(PVM_STUB_TRAMP_OFF + PVM_STUB_TRAMP_SIZE * PVM_STUB_PATCH_MAX <= PVM_STUB_SITES_OFF, "trampolines fit");
_Static_assert(PVM_STUB_SITES_OFF + sizeof(struct pvm_patch_site) * PVM_STUB_PATCH_MAX <= PVM_STUB_ENTRY_OFF, "sites fit");
_Static_assert(PVM_STUB_ENTRY_OFF + 8 <= PVM_STUB_WINDOW_SIZE, "entry fits");
_Static_assert(PVM_STUB_WINDOW_OFF % PVM_PAGE == 0, "window is page-aligned in the region");

_Static_assert(sizeof(struct pvm_call) == 64, "pvm_call size");
_Static_assert(sizeof(struct pvm_header) <= PVM_PAGE, "header fits its page");
_Static_assert(sizeof(struct pvm_slot) <= PVM_SLOT_SIZE, "slot fits");
_Static_assert(__builtin_offsetof(struct pvm_slot, resp_seq) == 64, "resp_seq on its own line");
_Static_assert(__builtin_offsetof(struct pvm_slot, op) == 128, "op offset");
_Static_assert(__builtin_offsetof(struct pvm_slot, calls) == 192, "calls offset");
#endif

#ifndef __ASSEMBLER__
/*
 * Everything Python reads from this header, exported as pvmexec._core.LAYOUT
 * (module.c expands the list): VAL(name, value), OFF(name, type, field)
 * gives offsetof, SIZE(name, type) gives sizeof. Python uses only these
 * names, never a number of its own (tests/unit/test_layout.py checks).
 */
#define PVM_LAYOUT_EXPORTS(VAL, OFF, SIZE) \
    VAL("PROCESS_VM_EXEC_SYSCALL", PVM_PROCESS_VM_EXEC_SYSCALL) \
    VAL("TEST_SYSCALL", PVM_TEST_SYSCALL) \
    VAL("TEST_SYSCALL_RET", PVM_TEST_SYSCALL_RET) \
    VAL("TEST_MARKER", PVM_TEST_MARKER) \
    VAL("AUDIT_ARCH_X86_64", PVM_AUDIT_ARCH_X86_64) \
    VAL("AUDIT_ARCH_I386", PVM_AUDIT_ARCH_I386) \
    VAL("SYS_SECCOMP", PVM_SYS_SECCOMP) \
    VAL("AGENT_MAGIC", PVM_AGENT_MAGIC) \
    VAL("MAX_BATCH", PVM_MAX_BATCH) \
    VAL("AGENT_CODE_MAX", PVM_AGENT_CODE_MAX) \
    VAL("HEADER_OFF", PVM_HEADER_OFF) \
    VAL("SLOT_OFF", PVM_SLOT_OFF) \
    VAL("DATA_OFF", PVM_DATA_OFF) \
    VAL("DATA_SIZE", PVM_DATA_SIZE) \
    VAL("STACK_OFF", PVM_STACK_OFF) \
    VAL("STACK_SIZE", PVM_STACK_SIZE) \
    VAL("REGION_SIZE", PVM_REGION_SIZE) \
    VAL("OP_CALLS", PVM_OP_CALLS) \
    VAL("OP_EXIT", PVM_OP_EXIT) \
    VAL("OP_RUN", PVM_OP_RUN) \
    VAL("OP_SPAWN", PVM_OP_SPAWN) \
    OFF("header.magic", struct pvm_header, magic) \
    OFF("header.version", struct pvm_header, version) \
    OFF("header.agent_tid", struct pvm_header, agent_tid) \
    OFF("header.state", struct pvm_header, state) \
    OFF("header.caller_pidfd", struct pvm_header, caller_pidfd) \
    OFF("header.idle_ms", struct pvm_header, idle_ms) \
    OFF("header.code_base", struct pvm_header, code_base) \
    OFF("header.data_base", struct pvm_header, data_base) \
    OFF("header.code_keep", struct pvm_header, code_keep) \
    VAL("HELPER_CLONE_FLAGS", PVM_HELPER_CLONE_FLAGS) \
    VAL("HELPER_IDLE", PVM_HELPER_IDLE) \
    OFF("slot.req_seq", struct pvm_slot, req_seq) \
    OFF("slot.spin", struct pvm_slot, spin) \
    OFF("slot.resp_seq", struct pvm_slot, resp_seq) \
    OFF("slot.agent_cpu", struct pvm_slot, agent_cpu) \
    OFF("slot.taken", struct pvm_slot, taken) \
    OFF("slot.op", struct pvm_slot, op) \
    OFF("slot.count", struct pvm_slot, count) \
    OFF("slot.calls", struct pvm_slot, calls) \
    SIZE("call.size", struct pvm_call) \
    OFF("call.ret", struct pvm_call, ret) \
    VAL("STUB_MAGIC", PVM_STUB_MAGIC) \
    VAL("STUB_READY", PVM_STUB_READY) \
    VAL("STUB_REGION_SIZE", PVM_STUB_REGION_SIZE) \
    VAL("STUB_BLOCK_OFF", PVM_STUB_BLOCK_OFF) \
    VAL("STUB_STOP_OFF", PVM_STUB_STOP_OFF) \
    VAL("STUB_FP_OFF", PVM_STUB_FP_OFF) \
    VAL("STUB_FP_MAX", PVM_STUB_FP_MAX) \
    VAL("STUB_ALTSTACK_OFF", PVM_STUB_ALTSTACK_OFF) \
    VAL("STUB_ALTSTACK_SIZE", PVM_STUB_ALTSTACK_SIZE) \
    VAL("STUB_MAX_THREADS", PVM_STUB_MAX_THREADS) \
    VAL("STUB_LEND_FD", PVM_STUB_LEND_FD) \
    VAL("STUB_LEND_SCRATCH", PVM_STUB_LEND_SCRATCH) \
    OFF("stub_header.region_base", struct pvm_stub_header, region_base) \
    VAL("STUB_BLOCK_SIZE", PVM_STUB_BLOCK_SIZE) \
    OFF("stop.fp_size", struct pvm_stop, fp_size) \
    OFF("stop.ready", struct pvm_stop, ready) \
    OFF("stop.siginfo", struct pvm_stop, siginfo) \
    OFF("stop.regs", struct pvm_stop, regs) \
    OFF("stub_header.magic", struct pvm_stub_header, magic) \
    OFF("stub_header.state", struct pvm_stub_header, state) \
    OFF("stub_header.caller_pid", struct pvm_stub_header, caller_pid) \
    OFF("stub_header.gadget", struct pvm_stub_header, gadget) \
    OFF("stub_header.window", struct pvm_stub_header, window) \
    VAL("STUB_WINDOW_OFF", PVM_STUB_WINDOW_OFF) \
    VAL("STUB_WINDOW_ADDR", PVM_STUB_WINDOW_ADDR) \
    VAL("STUB_WINDOW_SIZE", PVM_STUB_WINDOW_SIZE) \
    VAL("STUB_PATCH_MAX", PVM_STUB_PATCH_MAX) \
    VAL("STUB_SLOTS_OFF", PVM_STUB_SLOTS_OFF) \
    VAL("STUB_TRAMP_OFF", PVM_STUB_TRAMP_OFF) \
    VAL("STUB_TRAMP_SIZE", PVM_STUB_TRAMP_SIZE) \
    VAL("STUB_SITES_OFF", PVM_STUB_SITES_OFF) \
    VAL("STUB_ENTRY_OFF", PVM_STUB_ENTRY_OFF) \
    VAL("STUB_PREEMPT_SIG", PVM_STUB_PREEMPT_SIG) \
    SIZE("patch_site.size", struct pvm_patch_site)
#endif

#ifndef __ASSEMBLER__
#if defined(PVM_CHECK_LAYOUT)
#include <stddef.h>
#include <signal.h>
#include <sys/user.h>
_Static_assert(sizeof(struct user_regs_struct) == PVM_X86_64_NREGS * 8, "user_regs_struct size");
_Static_assert(offsetof(struct user_regs_struct, rax) == 10 * 8, "rax offset");
_Static_assert(offsetof(struct user_regs_struct, orig_rax) == 15 * 8, "orig_rax offset");
_Static_assert(offsetof(struct user_regs_struct, rip) == 16 * 8, "rip offset");
_Static_assert(offsetof(struct user_regs_struct, fs_base) == 21 * 8, "fs_base offset");
_Static_assert(offsetof(struct user_regs_struct, gs) == 26 * 8, "gs offset");
_Static_assert(sizeof(siginfo_t) == PVM_SIGINFO_SIZE, "siginfo size");
_Static_assert(offsetof(siginfo_t, si_signo) == PVM_SI_SIGNO, "si_signo");
_Static_assert(offsetof(siginfo_t, si_code) == PVM_SI_CODE, "si_code");
_Static_assert(offsetof(siginfo_t, si_pid) == PVM_SI_PID, "si_pid");
_Static_assert(offsetof(siginfo_t, si_uid) == PVM_SI_UID, "si_uid");
_Static_assert(offsetof(siginfo_t, si_addr) == PVM_SI_ADDR, "si_addr");
_Static_assert(offsetof(siginfo_t, si_call_addr) == PVM_SI_CALL_ADDR, "si_call_addr");
_Static_assert(offsetof(siginfo_t, si_syscall) == PVM_SI_SYSCALL, "si_syscall");
_Static_assert(offsetof(siginfo_t, si_arch) == PVM_SI_ARCH, "si_arch");
#endif
#endif

#endif
