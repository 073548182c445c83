/* C-level loops for `pvmexec bench` only (not used by the library): they measure the kernel round trip, not the interpreter. */
#include "core.h"



/*
 * C-level loops for the benchmark, the same round trips as the proposal's
 * selftests: mode 1 with a trapped syscall answered by the caller, mode 1
 * with a fault fixed by the caller, and a remote syscall. Each returns
 * (iterations done, elapsed ns, last code, last status); a stop of another
 * kind ends the loop early and is reported to Python.
 */
PyObject *
py_loop(PyObject *self, PyObject *args)
{
    int tid, kind, reap;
    long n;
    unsigned long long a0, a1;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iiw*lKKp", &tid, &kind, &buf, &n, &a0, &a1, &reap))
        return NULL;
    PyObject *res = NULL;
    struct user_regs_struct regs;
    siginfo_t si;
    int code = 0, status = 0;
    long i = 0;
    long req = kind == 2 ? PTRACE_SINGLESTEP : PTRACE_SYSEMU;
    int expect = kind == 0 ? (SIGTRAP | 0x80) : kind == 1 ? SIGSEGV : SIGTRAP;
    if (buf.len != sizeof regs || kind < 0 || kind > 2) {
        PyErr_SetString(PyExc_ValueError, "bad loop arguments");
        goto out;
    }
    memcpy(&regs, buf.buf, sizeof regs);
    struct user_regs_struct start = regs;
    uint64_t t0 = now_ns();
    for (i = 0; i < n; i++) {
        if (xptrace(PTRACE_SETREGS, tid, NULL, &regs) < 0) {
            raise_call("ptrace(PTRACE_SETREGS)", tid);
            goto out;
        }
        if (xptrace(req, tid, NULL, 0) < 0) {
            raise_call("ptrace(resume)", tid);
            goto out;
        }
        while (wait_event(tid, reap, 0, -1, &code, &status) < 0) {
            raise_call("waitid", tid);
            goto out;
        }
        if (code != CLD_TRAPPED || status != expect)
            break;
        if (xptrace(PTRACE_GETREGS, tid, NULL, &regs) < 0) {
            raise_call("ptrace(PTRACE_GETREGS)", tid);
            goto out;
        }
        if (kind == 0) {            /* exec-syscall: answer the trapped call */
            if (REG(&regs, R_ORIG_RAX) != a0)
                break;
            regs.rax = a1;
        } else if (kind == 1) {     /* exec-fault: read siginfo, fix the store */
            if (xptrace(PTRACE_GETSIGINFO, tid, NULL, &si) < 0) {
                raise_call("ptrace(PTRACE_GETSIGINFO)", tid);
                goto out;
            }
            regs.rax = a0;
            regs.rcx = a1;
        } else {                    /* syscall: run it again from the same state */
            regs = start;
        }
    }
    uint64_t t1 = now_ns();
    memcpy(buf.buf, &regs, sizeof regs);
    res = Py_BuildValue("(lKii)", i, (unsigned long long)(t1 - t0), code, status);
out:
    PyBuffer_Release(&buf);
    return res;
}

/*
 * Mode 1 in a stub space, C-level loop for the benchmark: RUN the guest from
 * the block's stop registers; at each stop answer the trapped syscall a0 with
 * a1 (kind 0) or point rax at a0 and set rcx to a1 (kind 1, a fixed fault).
 * Returns (round trips, ns, last signo).
 */
PyObject *
py_stub_loop(PyObject *self, PyObject *args)
{
    unsigned long long block, counter, a0, a1;
    int pidfd, kind;
    long spin, n;
    if (!PyArg_ParseTuple(args, "KKilliKK", &block, &counter, &pidfd, &spin, &n, &kind, &a0, &a1))
        return NULL;
    struct pvm_slot *slot = SLOT(block);
    struct pvm_stop *stop = (struct pvm_stop *)(uintptr_t)(block + PVM_STUB_STOP_OFF);
    long i;
    uint32_t signo = 0;
    uint64_t t0 = now_ns();
    for (i = 0; i < n; i++) {
        stop->fp_valid = 0;
        slot->op = PVM_OP_RUN;
        int rc = channel_post_wait(slot, COUNTER(counter), NULL, pidfd, spin, 0);
        if (rc < 0)
            return channel_error(rc, pidfd);
        signo = __atomic_load_n(&stop->signo, __ATOMIC_RELAXED);
        if (kind == 0) {
            int32_t nr;
            memcpy(&nr, stop->siginfo + PVM_SI_SYSCALL, 4);
            if (signo != SIGSYS || (uint64_t)nr != a0)
                break;
            stop->regs[R_RAX] = a1;
        } else {
            if (signo != SIGSEGV)
                break;
            stop->regs[R_RAX] = a0;
            stop->regs[R_RCX] = a1;
        }
    }
    return Py_BuildValue("(lKI)", i, (unsigned long long)(now_ns() - t0), signo);
}

/*
 * The benchmark's floor for mode 1 faults: in this process, n faulting stores
 * each caught by a signal handler that fixes the address and returns by
 * rt_sigreturn. No engine can report a fault to another process for less.
 * Returns elapsed ns.
 */
static volatile long floor_slot;

static void
floor_handler(int sig, siginfo_t *si, void *ucv)
{
    ((ucontext_t *)ucv)->uc_mcontext.gregs[REG_RAX] = (greg_t)(uintptr_t)&floor_slot;
}

PyObject *
py_fault_floor(PyObject *self, PyObject *args)
{
    long n;
    if (!PyArg_ParseTuple(args, "l", &n))
        return NULL;
    static char altstack[65536] __attribute__((aligned(16)));
    stack_t ss = {.ss_sp = altstack, .ss_size = sizeof altstack}, old_ss;
    struct sigaction sa = {.sa_sigaction = floor_handler, .sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER}, old_sa;
    sigemptyset(&sa.sa_mask);
    if (sigaltstack(&ss, &old_ss) < 0)
        return raise_call("sigaltstack", 0);
    if (sigaction(SIGSEGV, &sa, &old_sa) < 0) {
        sigaltstack(&old_ss, NULL);
        return raise_call("sigaction", 0);
    }
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        long p = 1;
        __asm__ volatile("movq $7, (%0)" : "+a"(p) : : "memory");
    }
    uint64_t ns = now_ns() - t0;
    sigaction(SIGSEGV, &old_sa, NULL);
    sigaltstack(&old_ss, NULL);
    return PyLong_FromUnsignedLongLong(ns);
}

/* -- host file calls for the sandbox kernel: raw kernel structures, OSError(errno, call) -- */

/*
 * C-level loop for the benchmark: n single getppid-style calls through the
 * agent. Returns elapsed ns.
 */
PyObject *
py_agent_loop(PyObject *self, PyObject *args)
{
    unsigned long long slot_a, counter, alive, nr;
    int pidfd, pid;
    long spin, n;
    int count = 1;
    if (!PyArg_ParseTuple(args, "KKKiliKl|i", &slot_a, &counter, &alive, &pidfd, &spin, &pid, &nr, &n, &count))
        return NULL;
    if (count < 1 || count > PVM_MAX_BATCH) {
        PyErr_SetString(PyExc_ValueError, "count must be 1..PVM_MAX_BATCH");
        return NULL;
    }
    struct pvm_slot *slot = SLOT(slot_a);
    uint64_t t0 = now_ns();
    for (long i = 0; i < n; i++) {
        slot->op = PVM_OP_CALLS;
        slot->count = (uint32_t)count;
        for (int j = 0; j < count; j++)
            slot->calls[j].nr = (int64_t)nr;
        int rc = channel_post_wait(slot, COUNTER(counter), ALIVE(alive), pidfd, spin, pid);
        if (rc < 0)
            return channel_error(rc, pidfd);
    }
    return PyLong_FromUnsignedLongLong(now_ns() - t0);
}
