/*
 * Guest code run inside a target's address space by Space.exec (mode 1):
 * the loops of the process_vm_exec selftests, used by the tests and by
 * `pvmexec bench`. Freestanding and position-independent; the build rejects
 * any relocation that is not PC-relative.
 *
 * Every syscall made here traps to the caller (nothing runs in the kernel),
 * so failure is reported with ud2 (SIGILL), never by a syscall.
 */
#include "layout.h"

#define STR_(x) #x
#define STR(x) STR_(x)

/*
 * syscall_loop(marker): forever syscall(PVM_TEST_SYSCALL, marker); every call
 * must return PVM_TEST_SYSCALL_RET (set by the caller in rax).
 */
__asm__(
    ".pushsection .text.pvm_entry,\"ax\",@progbits\n"
    ".globl pvm_guest_syscall_loop\n"
    ".type pvm_guest_syscall_loop,@function\n"
    "pvm_guest_syscall_loop:\n"
    "  mov %rdi, %rbx\n"
    "1:\n"
    "  mov %rbx, %rdi\n"
    "  mov $" STR(PVM_TEST_SYSCALL) ", %eax\n"    /* the shape of libc's wrappers (patchable) */
    "  syscall\n"
    "  cmp $" STR(PVM_TEST_SYSCALL_RET) ", %rax\n"
    "  jne 2f\n"
    "  jmp 1b\n"
    "2:\n"
    "  ud2\n"
    ".size pvm_guest_syscall_loop, .-pvm_guest_syscall_loop\n"
    ".popsection\n");

/*
 * fault_loop(slot, expected): stores rcx to the addresses 1..7 in turn, which
 * fault. The caller points rax at `slot` and sets rcx to `expected`; the store
 * re-executes and must have landed in slot, which this code checks and clears.
 */
__asm__(
    ".pushsection .text\n"
    ".globl pvm_guest_fault_loop\n"
    ".type pvm_guest_fault_loop,@function\n"
    "pvm_guest_fault_loop:\n"
    "0:\n"
    "  mov $1, %r8\n"
    "1:\n"
    "  mov %r8, %rax\n"
    "  mov %r8, %rcx\n"
    ".globl pvm_guest_fault_store\n"
    "pvm_guest_fault_store:\n"
    "  mov %rcx, (%rax)\n"
    "  cmp (%rdi), %rsi\n"
    "  jne 2f\n"
    "  movq $0, (%rdi)\n"
    "  inc %r8\n"
    "  cmp $8, %r8\n"
    "  jb 1b\n"
    "  jmp 0b\n"
    "2:\n"
    "  ud2\n"
    ".size pvm_guest_fault_loop, .-pvm_guest_fault_loop\n"
    ".popsection\n");

/*
 * fpu_probe(): loads xmm0 with the 16 bytes at rdi, then traps with
 * syscall(PVM_TEST_SYSCALL); afterwards stores xmm0 back to rdi and traps
 * again. Lets tests see that guest FPU state is carried across exec calls.
 */
__asm__(
    ".pushsection .text\n"
    ".globl pvm_guest_fpu_probe\n"
    ".type pvm_guest_fpu_probe,@function\n"
    "pvm_guest_fpu_probe:\n"
    "  movdqu (%rdi), %xmm0\n"
    "  mov %rdi, %rbx\n"
    "  mov $" STR(PVM_TEST_SYSCALL) ", %eax\n"
    "  syscall\n"
    "  movdqu %xmm0, (%rbx)\n"
    "  mov $" STR(PVM_TEST_SYSCALL) ", %eax\n"
    "  syscall\n"
    "  ud2\n"
    ".size pvm_guest_fpu_probe, .-pvm_guest_fpu_probe\n"
    ".popsection\n");

/* int3_then_syscall(): a breakpoint trap, then a trapped syscall. */
__asm__(
    ".pushsection .text\n"
    ".globl pvm_guest_int3\n"
    ".type pvm_guest_int3,@function\n"
    "pvm_guest_int3:\n"
    "  int3\n"
    "  mov $" STR(PVM_TEST_SYSCALL) ", %eax\n"
    "  syscall\n"
    "  ud2\n"
    ".size pvm_guest_int3, .-pvm_guest_int3\n"
    ".popsection\n");

/* spin(): loops forever without a syscall or fault (for cancelling a running guest). */
__asm__(
    ".pushsection .text\n"
    ".globl pvm_guest_spin\n"
    ".type pvm_guest_spin,@function\n"
    "pvm_guest_spin:\n"
    "  jmp pvm_guest_spin\n"
    ".size pvm_guest_spin, .-pvm_guest_spin\n"
    ".popsection\n");
