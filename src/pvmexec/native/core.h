/*
 * Declarations shared by the C files of pvmexec._core (one extension, split
 * by concern as psutil splits its own): ptrace.c, memory.c, channel.c,
 * fastpath.c, entry.c, hostfs.c, spawn.c, imageindex.c, bench.c, errors.c, and module.c with the method table.
 * Thin wrappers only: every failure raises OSError naming the failing call;
 * policy and error mapping live in Python.
 */
#ifndef PVMEXEC_CORE_H
#define PVMEXEC_CORE_H
#define PY_SSIZE_T_CLEAN
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include <Python.h>

#include <errno.h>
#include <signal.h>
#include <stdint.h>
#include <string.h>
#include <time.h>
#include <poll.h>
#include <sched.h>
#include <linux/futex.h>
#include <sys/ptrace.h>
#include <sys/syscall.h>
#include <sys/uio.h>
#include <sys/user.h>
#include <sys/wait.h>
#include <linux/elf.h>
#include <unistd.h>
#include <ucontext.h>
#include <fcntl.h>
#include <sys/stat.h>
#include <sys/vfs.h>

#define PVM_CHECK_LAYOUT
#include "layout.h"

#ifndef __x86_64__
#error "pvmexec's C core supports x86-64 only for now"
#endif

/* Requests and calls newer than some headers (KERNEL-FACTS.md): named here, never typed inline. */
#ifndef PTRACE_SYSEMU
#define PTRACE_SYSEMU 31
#endif
#ifndef PTRACE_GETSIGMASK
#define PTRACE_GETSIGMASK 0x420a
#define PTRACE_SETSIGMASK 0x420b
#endif
#ifndef PTRACE_PEEKSIGINFO
#define PTRACE_PEEKSIGINFO 0x4209
#endif
#ifndef PTRACE_PEEKSIGINFO_SHARED
#define PTRACE_PEEKSIGINFO_SHARED 1
#endif
#ifndef PTRACE_SECCOMP_GET_FILTER
#define PTRACE_SECCOMP_GET_FILTER 0x420c
#endif
#ifndef PTRACE_GET_SYSCALL_INFO
#define PTRACE_GET_SYSCALL_INFO 0x420e
#endif
#ifndef PTRACE_GET_RSEQ_CONFIGURATION
#define PTRACE_GET_RSEQ_CONFIGURATION 0x420f
#endif
#ifndef __NR_openat2
#define __NR_openat2 437
#endif
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif

/* Registers by index in struct user_regs_struct (layout.h checks the order). */
#define REG(r, i) (((unsigned long long *)(r))[i])
enum { R_RAX = 10, R_RCX = 11, R_ORIG_RAX = 15 };

/* Syscall numbers of the x32 ABI (arch.x86_64.X32_SYSCALL_BIT): never ours. */
#define X32_SYSCALL_BIT 0x40000000ULL

/* Big enough for any xsave area this decade (AVX-512 + AMX is ~11 KiB). */
#define XSTATE_MAX 65536

/* The channel bundle arrives from Python as integers: addresses of memory the Python side owns. */
#define SLOT(a) ((struct pvm_slot *)(uintptr_t)(a))
#define COUNTER(a) ((uint32_t *)(uintptr_t)(a))
#define ALIVE(a) ((volatile uint32_t *)(uintptr_t)(a))

/*
 * Channel results besides 0 (answered): -1 with errno ESRCH (target gone),
 * ECHILD (agent gone), EAGAIN (withdrawn: the target is stopped), EPROTO (a
 * stub stop we cannot use); PVM_CHAN_INTERRUPTED: a Python exception is set
 * (a signal) and the request may still be in flight.
 */
#define PVM_CHAN_INTERRUPTED (-2)

/* errors.c */
PyObject *raise_call(const char *call, long tid);
PyObject *raise_host(const char *call);

/* ptrace.c */
int xptrace(long req, pid_t tid, void *addr, void *data);
uint64_t now_ns(void);
int wait_event(pid_t tid, int reap, int interruptible, double timeout, int *code, int *status);
int setregset(int tid, unsigned long nt, void *data, size_t len);

/* channel.c */
struct preempt;
long futex_op(volatile uint32_t *addr, int op, uint32_t val, const struct timespec *ts);
int channel_post_wait(struct pvm_slot *slot, uint32_t *counter, volatile uint32_t *alive, int pidfd, long spin,
                      int pid);
int channel_post_wait_preempt(struct pvm_slot *slot, uint32_t *counter, volatile uint32_t *alive, int pidfd,
                              long spin, int pid, const struct preempt *pre);
PyObject *channel_error(int rc, int pidfd);
struct fast_path;
struct stub_run {                          /* one mode 1 run's arguments (channel.c's stub_run) */
    uint64_t block;
    uint32_t *counter;
    volatile uint32_t *alive;
    int pidfd, pid;
    long spin;
    const uint64_t *regs;                  /* PVM_X86_64_NREGS of them */
    const char *fp;
    Py_ssize_t fp_len;                     /* 0: a clean FPU state */
    int want_fp;
    const struct fast_path *fast;          /* NULL: every stop goes to Python */
    int stub_tid, answer;
};
PyObject *stub_run(const struct stub_run *a);

/* fastpath.c */
/*
 * The application kernel's fast path (pvmexec.kernel): syscalls it has
 * declared trivial are answered here, without returning to Python, and the
 * guest resumes at once. `ids` holds int64 answers for getpid, getppid,
 * gettid, getuid, geteuid, getgid, getegid; `fds` maps a guest descriptor
 * to a host descriptor whose read/write need nothing from the kernel
 * (int32 host fd << 1 | 1 if a regular file, -1 otherwise; for pipes and
 * terminals only what cannot block);
 * `flag` (int32) nonzero sends every stop to Python (a signal is due).
 * Anything else, any error, and anything that might block goes to Python.
 */
struct fast_path {
    Py_buffer fds, ids, flag;
    int stub_pid;
};
int fast_answer(struct fast_path *fp, struct pvm_stop *stop);

/* entry.c: the hot entries (Channel, Runner) and the signal guard's counters */
int entry_add_types(PyObject *m);
PyObject *py_guard_setup(PyObject *self, PyObject *args);
PyObject *py_guard_enter(PyObject *self, PyObject *unused);
PyObject *py_guard_exit(PyObject *self, PyObject *unused);
PyObject *py_guard_counts(PyObject *self, PyObject *unused);
PyObject *py_entry_setup(PyObject *self, PyObject *args);

/* The module's functions, one per method-table entry (module.c). */
PyObject *py_wait(PyObject *self, PyObject *args);
PyObject *py_ptrace(PyObject *self, PyObject *args);
PyObject *py_getregs(PyObject *self, PyObject *args);
PyObject *py_setregs(PyObject *self, PyObject *args);
PyObject *py_getregset(PyObject *self, PyObject *args);
PyObject *py_setregset(PyObject *self, PyObject *args);
PyObject *py_getsigmask(PyObject *self, PyObject *args);
PyObject *py_setsigmask(PyObject *self, PyObject *args);
PyObject *py_getsiginfo(PyObject *self, PyObject *args);
PyObject *py_peeksiginfo(PyObject *self, PyObject *args);
PyObject *py_step(PyObject *self, PyObject *args);
PyObject *py_restore(PyObject *self, PyObject *args);
PyObject *py_rseq_config(PyObject *self, PyObject *args);
PyObject *py_xsave_components(PyObject *self, PyObject *unused);
PyObject *py_seccomp_filter(PyObject *self, PyObject *args);
PyObject *py_syscall_info(PyObject *self, PyObject *args);
PyObject *py_loop(PyObject *self, PyObject *args);
PyObject *py_stub_loop(PyObject *self, PyObject *args);
PyObject *py_fault_floor(PyObject *self, PyObject *args);
PyObject *py_agent_loop(PyObject *self, PyObject *args);
PyObject *py_agent_call(PyObject *self, PyObject *args);
PyObject *py_agent_syscall(PyObject *self, PyObject *args);
PyObject *py_agent_batch(PyObject *self, PyObject *args);
PyObject *py_stub_run(PyObject *self, PyObject *args);
PyObject *py_stub_run_fast(PyObject *self, PyObject *args);
PyObject *py_openat2(PyObject *self, PyObject *args);
PyObject *py_fifo_has_writer(PyObject *self, PyObject *args);
PyObject *py_pipe_peek(PyObject *self, PyObject *args);
PyObject *py_fstatat_raw(PyObject *self, PyObject *args);
PyObject *py_statx_raw(PyObject *self, PyObject *args);
PyObject *py_fstatfs_raw(PyObject *self, PyObject *args);
PyObject *py_vm_read_ranges(PyObject *self, PyObject *args);
PyObject *py_vm_copy_ranges(PyObject *self, PyObject *args);
PyObject *py_futex_wait(PyObject *self, PyObject *args);
PyObject *py_vm_read(PyObject *self, PyObject *args);
PyObject *py_vm_write(PyObject *self, PyObject *args);
PyObject *py_pidfd_getfd(PyObject *self, PyObject *args);
PyObject *py_spawn_stub(PyObject *self, PyObject *args);
PyObject *py_index_runs(PyObject *self, PyObject *args);
PyObject *py_index_plan(PyObject *self, PyObject *args);

#endif
