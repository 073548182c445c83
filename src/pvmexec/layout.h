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
