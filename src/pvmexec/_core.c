/*
 * pvmexec._core: thin wrappers over ptrace, waitid, process_vm_readv/writev
 * and pidfd calls. Every failure raises OSError naming the failing call;
 * policy and error mapping live in Python. The benchmark's C-level loops are
 * here too, so that they measure the kernel round trip and not the
 * interpreter.
 */
#define PY_SSIZE_T_CLEAN
#define _GNU_SOURCE
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
struct pvm_symbol {
    const char *name;
    unsigned long offset;
};
#include "guest_blob.h"
#include "agent_blob.h"
#include "stub_elf.h"

#ifndef __x86_64__
#error "pvmexec's C core supports x86-64 only for now"
#endif

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
#ifndef __NR_pidfd_getfd
#define __NR_pidfd_getfd 438
#endif

/* Big enough for any xsave area this decade (AVX-512 + AMX is ~11 KiB). */
#define XSTATE_MAX 65536

struct peeksiginfo_args_ {
    uint64_t off;
    uint32_t flags;
    int32_t nr;
};

static PyObject *
raise_call(const char *call, long tid)
{
    int e = errno;
    char buf[96];
    snprintf(buf, sizeof buf, "%s(%ld)", call, tid);
    PyObject *args = Py_BuildValue("(iss)", e, strerror(e), buf);
    if (args) {
        PyErr_SetObject(PyExc_OSError, args);
        Py_DECREF(args);
    }
    return NULL;
}

static int
xptrace(long req, pid_t tid, void *addr, void *data)
{
    errno = 0;
    return (int)ptrace(req, tid, addr, data);
}

static uint64_t
now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/*
 * Wait for the next event of one traced thread. Stops are consumed. An exit is
 * consumed only when reap is true: when the caller is also the target's parent
 * the exit status belongs to the caller's own wait(), not to us.
 * Returns 0 and fills code/status, or -1 with errno set. EINTR is returned
 * to the caller only when interruptible.
 */
static int
wait_event(pid_t tid, int reap, int interruptible, int *code, int *status)
{
    siginfo_t si;
    for (;;) {
        memset(&si, 0, sizeof si);
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = waitid(P_PID, tid, &si, WEXITED | WSTOPPED | __WALL | WNOWAIT);
        Py_END_ALLOW_THREADS
        if (r < 0) {
            if (errno == EINTR && !interruptible)
                continue;
            return -1;
        }
        break;
    }
    *code = si.si_code;
    *status = si.si_status;
    if (si.si_code == CLD_TRAPPED || si.si_code == CLD_STOPPED || reap) {
        int opts = __WALL | WNOHANG | (si.si_code == CLD_TRAPPED || si.si_code == CLD_STOPPED ? WSTOPPED : WEXITED);
        siginfo_t si2;
        memset(&si2, 0, sizeof si2);
        while (waitid(P_PID, tid, &si2, opts) < 0) {
            if (errno != EINTR)
                return -1;
        }
    }
    return 0;
}

static PyObject *
py_wait(PyObject *self, PyObject *args)
{
    int tid, reap, interruptible;
    if (!PyArg_ParseTuple(args, "ipp", &tid, &reap, &interruptible))
        return NULL;
    int code, status;
    for (;;) {
        if (wait_event(tid, reap, interruptible, &code, &status) == 0)
            return Py_BuildValue("(ii)", code, status);
        if (errno != EINTR)
            return raise_call("waitid", tid);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

static PyObject *
py_ptrace(PyObject *self, PyObject *args)
{
    long req;
    int tid;
    unsigned long addr = 0, data = 0;
    const char *name = "ptrace";
    if (!PyArg_ParseTuple(args, "li|kks", &req, &tid, &addr, &data, &name))
        return NULL;
    if (xptrace(req, tid, (void *)addr, (void *)data) < 0 && errno)
        return raise_call(name, tid);
    Py_RETURN_NONE;
}

static PyObject *
py_getregs(PyObject *self, PyObject *args)
{
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid))
        return NULL;
    struct user_regs_struct regs;
    if (xptrace(PTRACE_GETREGS, tid, NULL, &regs) < 0)
        return raise_call("ptrace(PTRACE_GETREGS)", tid);
    return PyBytes_FromStringAndSize((const char *)&regs, sizeof regs);
}

static PyObject *
py_setregs(PyObject *self, PyObject *args)
{
    int tid;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iy*", &tid, &buf))
        return NULL;
    if (buf.len != sizeof(struct user_regs_struct)) {
        PyBuffer_Release(&buf);
        PyErr_SetString(PyExc_ValueError, "register block must be sizeof(struct user_regs_struct)");
        return NULL;
    }
    int r = xptrace(PTRACE_SETREGS, tid, NULL, buf.buf);
    PyBuffer_Release(&buf);
    if (r < 0)
        return raise_call("ptrace(PTRACE_SETREGS)", tid);
    Py_RETURN_NONE;
}

static PyObject *
py_getregset(PyObject *self, PyObject *args)
{
    int tid;
    unsigned long nt;
    if (!PyArg_ParseTuple(args, "ik", &tid, &nt))
        return NULL;
    void *mem = PyMem_Malloc(XSTATE_MAX);
    if (!mem)
        return PyErr_NoMemory();
    struct iovec iov = {mem, XSTATE_MAX};
    if (xptrace(PTRACE_GETREGSET, tid, (void *)nt, &iov) < 0) {
        PyMem_Free(mem);
        return raise_call("ptrace(PTRACE_GETREGSET)", tid);
    }
    PyObject *res = PyBytes_FromStringAndSize(mem, (Py_ssize_t)iov.iov_len);
    PyMem_Free(mem);
    return res;
}

static int
setregset(int tid, unsigned long nt, void *data, size_t len)
{
    struct iovec iov = {data, len};
    return xptrace(PTRACE_SETREGSET, tid, (void *)nt, &iov);
}

static PyObject *
py_setregset(PyObject *self, PyObject *args)
{
    int tid;
    unsigned long nt;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iky*", &tid, &nt, &buf))
        return NULL;
    int r = setregset(tid, nt, buf.buf, (size_t)buf.len);
    PyBuffer_Release(&buf);
    if (r < 0)
        return raise_call("ptrace(PTRACE_SETREGSET)", tid);
    Py_RETURN_NONE;
}

static PyObject *
py_getsigmask(PyObject *self, PyObject *args)
{
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid))
        return NULL;
    uint64_t mask = 0;
    if (xptrace(PTRACE_GETSIGMASK, tid, (void *)sizeof mask, &mask) < 0)
        return raise_call("ptrace(PTRACE_GETSIGMASK)", tid);
    return PyLong_FromUnsignedLongLong(mask);
}

static PyObject *
py_setsigmask(PyObject *self, PyObject *args)
{
    int tid;
    unsigned long long mask;
    if (!PyArg_ParseTuple(args, "iK", &tid, &mask))
        return NULL;
    uint64_t m = mask;
    if (xptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof m, &m) < 0)
        return raise_call("ptrace(PTRACE_SETSIGMASK)", tid);
    Py_RETURN_NONE;
}

static PyObject *
py_getsiginfo(PyObject *self, PyObject *args)
{
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid))
        return NULL;
    siginfo_t si;
    memset(&si, 0, sizeof si);
    if (xptrace(PTRACE_GETSIGINFO, tid, NULL, &si) < 0)
        return raise_call("ptrace(PTRACE_GETSIGINFO)", tid);
    return PyBytes_FromStringAndSize((const char *)&si, sizeof si);
}

static PyObject *
py_peeksiginfo(PyObject *self, PyObject *args)
{
    int tid, shared, nr;
    if (!PyArg_ParseTuple(args, "ipi", &tid, &shared, &nr))
        return NULL;
    if (nr <= 0 || nr > 1024) {
        PyErr_SetString(PyExc_ValueError, "nr must be 1..1024");
        return NULL;
    }
    siginfo_t *si = PyMem_Calloc((size_t)nr, sizeof *si);
    if (!si)
        return PyErr_NoMemory();
    struct peeksiginfo_args_ a = {0, shared ? PTRACE_PEEKSIGINFO_SHARED : 0, nr};
    long n = ptrace(PTRACE_PEEKSIGINFO, tid, &a, si);
    if (n < 0) {
        PyMem_Free(si);
        return raise_call("ptrace(PTRACE_PEEKSIGINFO)", tid);
    }
    PyObject *list = PyList_New(0);
    for (long i = 0; list && i < n; i++) {
        PyObject *b = PyBytes_FromStringAndSize((const char *)&si[i], sizeof *si);
        if (!b || PyList_Append(list, b) < 0) {
            Py_XDECREF(b);
            Py_CLEAR(list);
            break;
        }
        Py_DECREF(b);
    }
    PyMem_Free(si);
    return list;
}

/*
 * One round trip of a borrowed thread: load regs, resume with `request`
 * (SYSEMU, SINGLESTEP, ...), wait for the next stop and read regs back into
 * the same buffer. Returns (code, status) of the event.
 */
static PyObject *
py_step(PyObject *self, PyObject *args)
{
    int tid, sig, reap;
    long request;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iw*lip", &tid, &buf, &request, &sig, &reap))
        return NULL;
    PyObject *res = NULL;
    int code, status;
    if (buf.len != sizeof(struct user_regs_struct)) {
        PyErr_SetString(PyExc_ValueError, "register block must be sizeof(struct user_regs_struct)");
        goto out;
    }
    if (xptrace(PTRACE_SETREGS, tid, NULL, buf.buf) < 0) {
        raise_call("ptrace(PTRACE_SETREGS)", tid);
        goto out;
    }
    if (xptrace(request, tid, NULL, (void *)(long)sig) < 0) {
        raise_call("ptrace(resume)", tid);
        goto out;
    }
    for (;;) {
        if (wait_event(tid, reap, 1, &code, &status) == 0)
            break;
        if (errno != EINTR) {
            raise_call("waitid", tid);
            goto out;
        }
        if (PyErr_CheckSignals() < 0)
            goto out;   /* the thread is still running: Python interrupts it and cleans up */
    }
    if (code == CLD_TRAPPED && xptrace(PTRACE_GETREGS, tid, NULL, buf.buf) < 0) {
        raise_call("ptrace(PTRACE_GETREGS)", tid);
        goto out;
    }
    res = Py_BuildValue("(ii)", code, status);
out:
    PyBuffer_Release(&buf);
    return res;
}

/*
 * Put a borrowed thread back exactly as found and let it go, in one call so
 * that no Python signal handler can run half-way through.
 */
static PyObject *
py_restore(PyObject *self, PyObject *args)
{
    int tid, sig;
    unsigned long long mask;
    long request;
    Py_buffer regs, xs;
    if (!PyArg_ParseTuple(args, "iy*y*Kli", &tid, &regs, &xs, &mask, &request, &sig))
        return NULL;
    PyObject *res = NULL;
    uint64_t m = mask;
    if (xptrace(PTRACE_SETREGS, tid, NULL, regs.buf) < 0) {
        raise_call("ptrace(PTRACE_SETREGS)", tid);
        goto out;
    }
    if (xs.len && setregset(tid, NT_X86_XSTATE, xs.buf, (size_t)xs.len) < 0) {
        raise_call("ptrace(PTRACE_SETREGSET, NT_X86_XSTATE)", tid);
        goto out;
    }
    if (xptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof m, &m) < 0) {
        raise_call("ptrace(PTRACE_SETSIGMASK)", tid);
        goto out;
    }
    if (request >= 0 && xptrace(request, tid, NULL, (void *)(long)sig) < 0) {
        raise_call(request == PTRACE_DETACH ? "ptrace(PTRACE_DETACH)" : "ptrace(resume)", tid);
        goto out;
    }
    res = Py_None;
    Py_INCREF(res);
out:
    PyBuffer_Release(&regs);
    PyBuffer_Release(&xs);
    return res;
}

#define REG(r, i) (((unsigned long long *)(r))[i])
enum { R_RAX = 10, R_RCX = 11, R_ORIG_RAX = 15 };

/*
 * C-level loops for the benchmark, the same round trips as the proposal's
 * selftests: mode 1 with a trapped syscall answered by the caller, mode 1
 * with a fault fixed by the caller, and a remote syscall. Each returns
 * (iterations done, elapsed ns, last code, last status); a stop of another
 * kind ends the loop early and is reported to Python.
 */
static PyObject *
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
        while (wait_event(tid, reap, 0, &code, &status) < 0) {
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

/* PTRACE_GET_RSEQ_CONFIGURATION: (rseq area address, size, signature), or None if not supported. */
static PyObject *
py_rseq_config(PyObject *self, PyObject *args)
{
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid))
        return NULL;
    struct {
        uint64_t ptr;
        uint32_t size, sig, flags, pad;
    } cfg;
    memset(&cfg, 0, sizeof cfg);
    if (ptrace(0x420f, tid, (void *)sizeof cfg, &cfg) < 0) {
        if (errno == EIO || errno == EINVAL)
            Py_RETURN_NONE;
        return raise_call("ptrace(PTRACE_GET_RSEQ_CONFIGURATION)", tid);
    }
    return Py_BuildValue("(KII)", (unsigned long long)cfg.ptr, cfg.size, cfg.sig);
}

/* PTRACE_SECCOMP_GET_FILTER: the index-th filter of a stopped thread, as raw sock_filter bytes. */
static PyObject *
py_seccomp_filter(PyObject *self, PyObject *args)
{
    int tid;
    unsigned long index;
    if (!PyArg_ParseTuple(args, "ik", &tid, &index))
        return NULL;
    long n = ptrace(0x420c, tid, (void *)index, NULL);
    if (n < 0)
        return raise_call("ptrace(PTRACE_SECCOMP_GET_FILTER)", tid);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (!out)
        return NULL;
    long m = ptrace(0x420c, tid, (void *)index, PyBytes_AS_STRING(out));
    if (m != n) {
        Py_DECREF(out);
        if (m >= 0)
            errno = EAGAIN;
        return raise_call("ptrace(PTRACE_SECCOMP_GET_FILTER)", tid);
    }
    return out;
}

/* PTRACE_GET_SYSCALL_INFO at a syscall-entry stop: (op, arch, ip, sp, nr). */
static PyObject *
py_syscall_info(PyObject *self, PyObject *args)
{
    int tid;
    if (!PyArg_ParseTuple(args, "i", &tid))
        return NULL;
    struct {
        uint8_t op, pad[3];
        uint32_t arch;
        uint64_t ip, sp;
        uint64_t nr, args[6];
    } info;
    memset(&info, 0, sizeof info);
    if (ptrace(0x420e /* PTRACE_GET_SYSCALL_INFO */, tid, (void *)sizeof info, &info) < 0)
        return raise_call("ptrace(PTRACE_GET_SYSCALL_INFO)", tid);
    return Py_BuildValue("(iIKKK)", info.op, info.arch, (unsigned long long)info.ip,
                         (unsigned long long)info.sp, (unsigned long long)info.nr);
}

/*
 * The caller's side of the agent channel. The slot is in memory the target can
 * write, so only the sequence word is read back here, compared for equality.
 */
static long
futex_op(volatile uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

/*
 * Post the request in the slot and wait for its answer. The sequence number
 * comes from the caller's own counter, never from the shared slot, which the
 * other side (or a guest) can scribble on.
 */
/* Is thread tid of process pid stopped (job control or ptrace)? Read only after a stall. */
static int
thread_stopped(int pid, uint32_t tid)
{
    char path[64], buf[512];
    snprintf(path, sizeof path, "/proc/%d/task/%u/stat", pid, tid);
    FILE *f = fopen(path, "r");
    if (!f)
        return 0;
    size_t n = fread(buf, 1, sizeof buf - 1, f);
    fclose(f);
    buf[n] = 0;
    char *p = strrchr(buf, ')');
    return p && (p[2] == 'T' || p[2] == 't');
}

/* A stub thread to interrupt (PVM_STUB_PREEMPT_SIG) while *flag is set, for stub_run_fast. */
struct preempt {
    volatile int32_t *flag;
    int pid, tid;
};

static int channel_post_wait_preempt(struct pvm_slot *slot, uint32_t *counter, volatile uint32_t *alive, int pidfd,
                                     long spin, int pid, const struct preempt *pre);

static int
channel_post_wait(struct pvm_slot *slot, uint32_t *counter, volatile uint32_t *alive, int pidfd, long spin,
                  int pid)
{
    return channel_post_wait_preempt(slot, counter, alive, pidfd, spin, pid, NULL);
}

static int
channel_post_wait_preempt(struct pvm_slot *slot, uint32_t *counter, volatile uint32_t *alive, int pidfd, long spin,
                          int pid, const struct preempt *pre)
{
    uint32_t seq = ++*counter;
    int cpu = sched_getcpu();
    __atomic_store_n(&slot->caller_cpu, (uint32_t)cpu, __ATOMIC_RELAXED);
    __atomic_store_n(&slot->req_seq, seq, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (__atomic_load_n(&slot->agent_sleeping, __ATOMIC_ACQUIRE))
        futex_op(&slot->req_seq, FUTEX_WAKE, 1, NULL);
    if (__atomic_load_n(&slot->agent_cpu, __ATOMIC_RELAXED) == (uint32_t)cpu)
        spin = 0;                          /* the other side needs this CPU: do not hold it */
    if (spin > 0) {
        int done = 0;
        Py_BEGIN_ALLOW_THREADS             /* other caller threads (other guest threads) go on meanwhile */
        for (long i = 0; i < spin; i++) {
            if (__atomic_load_n(&slot->resp_seq, __ATOMIC_ACQUIRE) == seq) {
                done = 1;
                break;
            }
            __builtin_ia32_pause();
        }
        Py_END_ALLOW_THREADS
        if (done)
            return 0;
    }
    __atomic_store_n(&slot->caller_sleeping, 1, __ATOMIC_RELEASE);
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    int rc = 0;
    for (;;) {
        uint32_t cur = __atomic_load_n(&slot->resp_seq, __ATOMIC_ACQUIRE);
        if (cur == seq)
            break;
        if (pre && *pre->flag)             /* a signal is due: stop the guest, again each tick until it does */
            syscall(SYS_tgkill, pre->pid, pre->tid, PVM_STUB_PREEMPT_SIG);
        struct timespec ts = {0, 50 * 1000 * 1000};
        long r;
        Py_BEGIN_ALLOW_THREADS
        r = futex_op(&slot->resp_seq, FUTEX_WAIT, cur, &ts);
        Py_END_ALLOW_THREADS
        /* Python-level signal handlers run here (a signal may have come while we spun, without EINTR). */
        if (r < 0 && (errno == EINTR || errno == ETIMEDOUT) && PyErr_CheckSignals() < 0) {
            rc = -2;                       /* the request is still in flight */
            break;
        }
        if (r < 0 && errno == ETIMEDOUT) {
            struct pollfd p = {pidfd, POLLIN, 0};
            if (poll(&p, 1, 0) == 1) {
                errno = ESRCH;
                rc = -1;
                break;
            }
            if (alive && __atomic_load_n(alive, __ATOMIC_ACQUIRE) == 0) {
                errno = ECHILD;
                rc = -1;
                break;
            }
            /*
             * The agent is a thread of the target: a job-control stop stops it too.
             * If it stopped before taking our request, withdraw the request (it
             * will never run) and say so, instead of waiting for a SIGCONT.
             */
            uint32_t expected = seq - 1;
            if (alive && pid > 0 && __atomic_load_n(&slot->taken, __ATOMIC_ACQUIRE) == expected &&
                thread_stopped(pid, __atomic_load_n(alive, __ATOMIC_ACQUIRE)) &&
                __atomic_compare_exchange_n(&slot->taken, &expected, seq, 0, __ATOMIC_ACQ_REL,
                                            __ATOMIC_ACQUIRE)) {
                errno = EAGAIN;
                rc = -1;
                break;
            }
        }
    }
    __atomic_store_n(&slot->caller_sleeping, 0, __ATOMIC_RELEASE);
    return rc;
}

#define SLOT(a) ((struct pvm_slot *)(uintptr_t)(a))
#define COUNTER(a) ((uint32_t *)(uintptr_t)(a))
#define ALIVE(a) ((volatile uint32_t *)(uintptr_t)(a))

static PyObject *
channel_error(int rc, int pidfd)
{
    if (rc == -2)
        return NULL;
    return raise_call("agent channel", pidfd);
}

static PyObject *
py_agent_call(PyObject *self, PyObject *args)
{
    unsigned long long slot, counter, alive;
    int pidfd, pid;
    long spin;
    if (!PyArg_ParseTuple(args, "KKKili", &slot, &counter, &alive, &pidfd, &spin, &pid))
        return NULL;
    int rc = channel_post_wait(SLOT(slot), COUNTER(counter), ALIVE(alive), pidfd, spin, pid);
    if (rc < 0)
        return channel_error(rc, pidfd);
    Py_RETURN_NONE;
}

/* One syscall through the agent: fill the slot, post, wait, return the raw result. */
static PyObject *
py_agent_syscall(PyObject *self, PyObject *args)
{
    unsigned long long slot_a, counter, alive, nr, a[6] = {0, 0, 0, 0, 0, 0};
    int pidfd, pid;
    long spin;
    if (!PyArg_ParseTuple(args, "KKKiliK|KKKKKK", &slot_a, &counter, &alive, &pidfd, &spin, &pid, &nr, &a[0],
                          &a[1], &a[2], &a[3], &a[4], &a[5]))
        return NULL;
    struct pvm_slot *slot = SLOT(slot_a);
    slot->op = PVM_OP_CALLS;
    slot->count = 1;
    slot->calls[0].nr = (int64_t)nr;
    memcpy(slot->calls[0].args, a, sizeof a);
    int rc = channel_post_wait(slot, COUNTER(counter), ALIVE(alive), pidfd, spin, pid);
    if (rc < 0)
        return channel_error(rc, pidfd);
    return PyLong_FromLongLong(__atomic_load_n(&slot->calls[0].ret, __ATOMIC_RELAXED));
}

/* A batch through the agent: calls is a sequence of (nr, (args...)); returns the raw results. */
static PyObject *
py_agent_batch(PyObject *self, PyObject *args)
{
    unsigned long long slot_a, counter, alive;
    int pidfd, pid;
    long spin;
    PyObject *calls;
    if (!PyArg_ParseTuple(args, "KKKiliO", &slot_a, &counter, &alive, &pidfd, &spin, &pid, &calls))
        return NULL;
    PyObject *seq = PySequence_Fast(calls, "calls must be a sequence");
    if (!seq)
        return NULL;
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    PyObject *out = PyList_New(n);
    struct pvm_slot *slot = SLOT(slot_a);
    for (Py_ssize_t done = 0; out && done < n;) {
        Py_ssize_t chunk = n - done < PVM_MAX_BATCH ? n - done : PVM_MAX_BATCH;
        for (Py_ssize_t i = 0; i < chunk; i++) {
            PyObject *item = PySequence_Fast_GET_ITEM(seq, done + i);
            unsigned long long nr, a[6] = {0, 0, 0, 0, 0, 0};
            PyObject *cargs;
            if (!PyArg_ParseTuple(item, "KO", &nr, &cargs) ||
                !PyArg_ParseTuple(cargs, "|KKKKKK", &a[0], &a[1], &a[2], &a[3], &a[4], &a[5]))
                goto fail;
            slot->calls[i].nr = (int64_t)nr;
            memcpy(slot->calls[i].args, a, sizeof a);
        }
        slot->op = PVM_OP_CALLS;
        slot->count = (uint32_t)chunk;
        int rc = channel_post_wait(slot, COUNTER(counter), ALIVE(alive), pidfd, spin, pid);
        if (rc < 0) {
            channel_error(rc, pidfd);
            goto fail;
        }
        for (Py_ssize_t i = 0; i < chunk; i++) {
            PyObject *r = PyLong_FromLongLong(__atomic_load_n(&slot->calls[i].ret, __ATOMIC_RELAXED));
            if (!r)
                goto fail;
            PyList_SET_ITEM(out, done + i, r);
        }
        done += chunk;
    }
    Py_DECREF(seq);
    return out;
fail:
    Py_DECREF(seq);
    Py_XDECREF(out);
    return NULL;
}

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

enum { NR_READ = 0, NR_WRITE = 1, NR_GETPID = 39, NR_GETUID = 102, NR_GETGID = 104, NR_GETEUID = 107,
       NR_GETEGID = 108, NR_GETPPID = 110, NR_GETTID = 186 };

static int
fast_answer(struct fast_path *fp, struct pvm_stop *stop)
{
    int32_t code, nr;
    uint32_t arch;
    memcpy(&code, stop->siginfo + PVM_SI_CODE, 4);
    memcpy(&nr, stop->siginfo + PVM_SI_SYSCALL, 4);
    memcpy(&arch, stop->siginfo + PVM_SI_ARCH, 4);
    if (stop->signo != SIGSYS || code != PVM_SYS_SECCOMP || arch != PVM_AUDIT_ARCH_X86_64)
        return 0;
    const int64_t *ids = fp->ids.buf;
    uint64_t *r = stop->regs;
    switch (nr) {
    case NR_GETPID: r[R_RAX] = ids[0]; return 1;
    case NR_GETPPID: r[R_RAX] = ids[1]; return 1;
    case NR_GETTID: r[R_RAX] = ids[2]; return 1;
    case NR_GETUID: r[R_RAX] = ids[3]; return 1;
    case NR_GETEUID: r[R_RAX] = ids[4]; return 1;
    case NR_GETGID: r[R_RAX] = ids[5]; return 1;
    case NR_GETEGID: r[R_RAX] = ids[6]; return 1;
    case NR_READ:
    case NR_WRITE: {
        uint64_t gfd = r[14], buf = r[13], count = r[12];          /* rdi, rsi, rdx */
        Py_ssize_t nfds = fp->fds.len / 4;
        if (gfd >= (uint64_t)nfds || count == 0)
            return 0;
        int32_t entry = ((const int32_t *)fp->fds.buf)[gfd];     /* host fd << 1 | regular file */
        if (entry < 0)
            return 0;
        int host = entry >> 1, may_block = !(entry & 1);
        size_t n = count < 65536 ? count : 65536;
        if (may_block && nr == NR_WRITE && n > 4096)
            return 0;                      /* only what fits the one free pipe slot POLLOUT promises */
        if (may_block) {
            struct pollfd p = {host, nr == NR_READ ? POLLIN : POLLOUT, 0};
            if (poll(&p, 1, 0) != 1 || !(p.revents & p.events))
                return 0;                  /* it would wait (or hit EOF/an error): Python decides */
        }
        static char tmp[65536];
        struct iovec local = {tmp, n}, remote = {(void *)(uintptr_t)buf, n};
        if (nr == NR_WRITE) {
            if (process_vm_readv(fp->stub_pid, &local, 1, &remote, 1, 0) != (ssize_t)n)
                return 0;
            ssize_t w = write(host, tmp, n);
            if (w < 0)
                return 0;                  /* EPIPE (SIGPIPE), EAGAIN...: nothing was written */
            r[R_RAX] = (uint64_t)w;
            return 1;
        }
        ssize_t got = read(host, tmp, n);
        if (got < 0)
            return 0;
        local.iov_len = remote.iov_len = (size_t)got;
        if (got && process_vm_writev(fp->stub_pid, &local, 1, &remote, 1, 0) != got)
            r[R_RAX] = (uint64_t)-EFAULT;
        else
            r[R_RAX] = (uint64_t)got;
        return 1;
    }
    }
    return 0;
}

static PyObject *
stub_run_common(PyObject *args, int with_fast)
{
    unsigned long long block, counter, alive;
    int pidfd, pid, want_fp;
    long spin;
    Py_buffer regs, fp;
    struct fast_path fast = {{0}};
    int stub_tid = 0, answer = 0;
    if (with_fast) {
        if (!PyArg_ParseTuple(args, "KKKiliy*y*pw*w*w*iip", &block, &counter, &alive, &pidfd, &spin, &pid, &regs, &fp,
                              &want_fp, &fast.fds, &fast.ids, &fast.flag, &fast.stub_pid, &stub_tid, &answer))
            return NULL;
    } else if (!PyArg_ParseTuple(args, "KKKiliy*y*p", &block, &counter, &alive, &pidfd, &spin, &pid, &regs, &fp,
                                 &want_fp))
        return NULL;
    PyObject *res = NULL;
    struct pvm_slot *slot = SLOT(block);
    struct pvm_stop *stop = (struct pvm_stop *)(uintptr_t)(block + PVM_STUB_STOP_OFF);
    char *fp_area = (char *)(uintptr_t)(block + PVM_STUB_FP_OFF);
    if (regs.len != sizeof stop->regs || fp.len > PVM_STUB_FP_MAX ||
        (with_fast && (fast.ids.len < 7 * 8 || fast.flag.len < 4))) {
        PyErr_SetString(PyExc_ValueError, "bad register block, FPU state or fast-path table size");
        goto out;
    }
    {
        /* What a 64-bit user thread can hold; Python words the error (arch.validate). */
        const uint64_t *r = regs.buf, lim = (1ULL << 47) - 4096;
        if (r[17] != 0x33 || r[20] != 0x2b || r[16] > lim || r[21] > lim || r[22] > lim ||
            (r[23] && r[23] != 0x2b) || (r[24] && r[24] != 0x2b) || (r[25] && r[25] != 0x2b) ||
            (r[26] && r[26] != 0x2b)) {
            res = Py_None;
            Py_INCREF(res);
            goto out;
        }
    }
    {
        /* Write only the registers that changed: the lines the stub owns stay in its cache. */
        const uint64_t *src = regs.buf;
        for (int i = 0; i < PVM_X86_64_NREGS; i++)
            if (stop->regs[i] != src[i])
                stop->regs[i] = src[i];
    }
    if (fp.len)
        memcpy(fp_area, fp.buf, (size_t)fp.len);
    stop->fp_valid = fp.len ? 1 : 0;
    uint32_t signo, fp_size;
    struct preempt pre = {with_fast ? fast.flag.buf : NULL, fast.stub_pid, stub_tid};
    for (;;) {
        slot->op = PVM_OP_RUN;
        int rc = channel_post_wait_preempt(slot, COUNTER(counter), ALIVE(alive), pidfd, spin, pid,
                                           with_fast && stub_tid > 0 ? &pre : NULL);
        if (rc < 0) {
            channel_error(rc, pidfd);
            goto out;
        }
        signo = __atomic_load_n(&stop->signo, __ATOMIC_RELAXED);
        fp_size = __atomic_load_n(&stop->fp_size, __ATOMIC_RELAXED);
        if (signo < 1 || signo > 64 || (want_fp && (fp_size < 512 || fp_size > PVM_STUB_FP_MAX))) {
            errno = EPROTO;
            raise_call("stub stop data", pidfd);
            goto out;
        }
        if (!with_fast || !answer || *(volatile int32_t *)fast.flag.buf || !fast_answer(&fast, stop))
            break;
        stop->fp_valid = 1;                /* resume with the state this stop saved */
    }
    PyObject *fp_out = want_fp ? PyBytes_FromStringAndSize(fp_area, fp_size) : (Py_INCREF(Py_None), Py_None);
    /* (signo, si_code, si_errno, word at 16, si_syscall, si_arch, siginfo bytes, regs, fp); None: regs refused. */
    int32_t f_errno, f_code, f_syscall;
    uint32_t f_arch;
    uint64_t word;
    memcpy(&f_errno, stop->siginfo + PVM_SI_ERRNO, 4);
    memcpy(&f_code, stop->siginfo + PVM_SI_CODE, 4);
    memcpy(&word, stop->siginfo + PVM_SI_ADDR, 8);
    memcpy(&f_syscall, stop->siginfo + PVM_SI_SYSCALL, 4);
    memcpy(&f_arch, stop->siginfo + PVM_SI_ARCH, 4);
    res = Py_BuildValue("(IiiKiIy#NN)", signo, f_code, f_errno, (unsigned long long)word, f_syscall, f_arch,
                        (const char *)stop->siginfo, (Py_ssize_t)sizeof stop->siginfo,
                        PyByteArray_FromStringAndSize((const char *)stop->regs, sizeof stop->regs), fp_out);
out:
    PyBuffer_Release(&regs);
    PyBuffer_Release(&fp);
    if (with_fast) {
        PyBuffer_Release(&fast.fds);
        PyBuffer_Release(&fast.ids);
        PyBuffer_Release(&fast.flag);
    }
    return res;
}

/*
 * One mode 1 run in a stub space: load regs (and fp, or None for a clean FPU)
 * into the block, resume the guest, wait for its next stop. The block is
 * guest-writable: the signal number and FPU size are checked here.
 */
static PyObject *
py_stub_run(PyObject *self, PyObject *args)
{
    return stub_run_common(args, 0);
}

static PyObject *
py_stub_run_fast(PyObject *self, PyObject *args)
{
    return stub_run_common(args, 1);
}

/*
 * Mode 1 in a stub space, C-level loop for the benchmark: RUN the guest from
 * the block's stop registers; at each stop answer the trapped syscall a0 with
 * a1 (kind 0) or point rax at a0 and set rcx to a1 (kind 1, a fixed fault).
 * Returns (round trips, ns, last signo).
 */
static PyObject *
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

static PyObject *
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

static PyObject *
raise_host(const char *call)
{
    return PyErr_SetFromErrnoWithFilename(PyExc_OSError, call);
}

struct pvm_open_how {
    uint64_t flags, mode, resolve;
};

static PyObject *
py_openat2(PyObject *self, PyObject *args)
{
    int dirfd;
    const char *path;
    unsigned long long flags, mode, resolve;
    if (!PyArg_ParseTuple(args, "iyKKK", &dirfd, &path, &flags, &mode, &resolve))
        return NULL;
    struct pvm_open_how how = {flags, mode, resolve};
    long fd;
    Py_BEGIN_ALLOW_THREADS
    fd = syscall(437 /* openat2 */, dirfd, path, &how, sizeof how);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return raise_host("openat2");
    return PyLong_FromLong(fd);
}

static PyObject *
py_fstatat_raw(PyObject *self, PyObject *args)
{
    int dirfd, flags;
    const char *path;
    if (!PyArg_ParseTuple(args, "iyi", &dirfd, &path, &flags))
        return NULL;
    struct stat st;
    if (fstatat(dirfd, path, &st, flags) < 0)
        return raise_host("fstatat");
    return PyBytes_FromStringAndSize((const char *)&st, sizeof st);
}

static PyObject *
py_statx_raw(PyObject *self, PyObject *args)
{
    int dirfd, flags;
    unsigned int mask;
    const char *path;
    if (!PyArg_ParseTuple(args, "iyiI", &dirfd, &path, &flags, &mask))
        return NULL;
    unsigned char buf[256] = {0};
    if (syscall(332 /* statx */, dirfd, path, flags, mask, buf) < 0)
        return raise_host("statx");
    return PyBytes_FromStringAndSize((const char *)buf, sizeof buf);
}

static PyObject *
py_fstatfs_raw(PyObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    struct statfs sf;
    if (fstatfs(fd, &sf) < 0)
        return raise_host("fstatfs");
    return PyBytes_FromStringAndSize((const char *)&sf, sizeof sf);
}

/*
 * Many ranges of another process's memory in one process_vm_readv per 1024:
 * vm_read_ranges(pid, ranges: array of u64 (start, length) pairs) -> bytes.
 * Stops at the first range that cannot be read whole (the result is then
 * shorter: the caller sees how far it got).
 */
static PyObject *
py_vm_read_ranges(PyObject *self, PyObject *args)
{
    int pid;
    Py_buffer ranges;
    if (!PyArg_ParseTuple(args, "iy*", &pid, &ranges))
        return NULL;
    const uint64_t *r = ranges.buf;
    Py_ssize_t n = ranges.len / 16, total = 0;
    for (Py_ssize_t i = 0; i < n; i++)
        total += (Py_ssize_t)r[2 * i + 1];
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (!out) {
        PyBuffer_Release(&ranges);
        return NULL;
    }
    char *buf = PyBytes_AS_STRING(out);
    Py_ssize_t done = 0, i = 0;
    struct iovec remote[1024];
    Py_BEGIN_ALLOW_THREADS
    while (i < n) {
        int k = 0;
        Py_ssize_t want = 0;
        for (; k < 1024 && i + k < n; k++) {
            remote[k].iov_base = (void *)(uintptr_t)r[2 * (i + k)];
            remote[k].iov_len = (size_t)r[2 * (i + k) + 1];
            want += (Py_ssize_t)remote[k].iov_len;
        }
        struct iovec local = {buf + done, (size_t)want};
        ssize_t got = process_vm_readv(pid, &local, 1, remote, (unsigned long)k, 0);
        if (got < 0 && errno == EINTR)
            continue;
        if (got <= 0)
            break;
        /* Count only whole ranges: a partial one is read again, alone, by the caller. */
        Py_ssize_t whole = 0;
        int j = 0;
        while (j < k && whole + (Py_ssize_t)remote[j].iov_len <= got)
            whole += (Py_ssize_t)remote[j++].iov_len;
        done += whole;
        i += j;
        if (j < k)
            break;
    }
    Py_END_ALLOW_THREADS
    PyBuffer_Release(&ranges);
    if (done != total && _PyBytes_Resize(&out, done) < 0)
        return NULL;
    return out;
}

static PyObject *
py_futex_wait(PyObject *self, PyObject *args)
{
    unsigned long long addr;
    unsigned int val;
    long ms;
    if (!PyArg_ParseTuple(args, "KIl", &addr, &val, &ms))
        return NULL;
    struct timespec ts = {ms / 1000, (ms % 1000) * 1000000L};
    long r;
    Py_BEGIN_ALLOW_THREADS
    r = futex_op((volatile uint32_t *)(uintptr_t)addr, FUTEX_WAIT, val, &ts);
    Py_END_ALLOW_THREADS
    if (r < 0 && errno != EAGAIN && errno != ETIMEDOUT && errno != EINTR)
        return raise_call("futex(FUTEX_WAIT)", 0);
    Py_RETURN_NONE;
}

/*
 * C-level loop for the benchmark: n single getppid-style calls through the
 * agent. Returns elapsed ns.
 */
static PyObject *
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

static PyObject *
py_vm_read(PyObject *self, PyObject *args)
{
    int pid;
    unsigned long long addr;
    Py_ssize_t n;
    if (!PyArg_ParseTuple(args, "iKn", &pid, &addr, &n))
        return NULL;
    if (n < 0) {
        PyErr_SetString(PyExc_ValueError, "negative length");
        return NULL;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n);
    if (!out)
        return NULL;
    char *p = PyBytes_AS_STRING(out);
    Py_ssize_t done = 0;
    while (done < n) {
        struct iovec local = {p + done, (size_t)(n - done)};
        struct iovec remote = {(void *)(uintptr_t)(addr + (unsigned long long)done), (size_t)(n - done)};
        ssize_t r = process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EFAULT;
            Py_DECREF(out);
            return raise_call("process_vm_readv", pid);
        }
        done += r;
    }
    return out;
}

static PyObject *
py_vm_write(PyObject *self, PyObject *args)
{
    int pid;
    unsigned long long addr;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iKy*", &pid, &addr, &buf))
        return NULL;
    Py_ssize_t done = 0;
    while (done < buf.len) {
        struct iovec local = {(char *)buf.buf + done, (size_t)(buf.len - done)};
        struct iovec remote = {(void *)(uintptr_t)(addr + (unsigned long long)done), (size_t)(buf.len - done)};
        ssize_t r = process_vm_writev(pid, &local, 1, &remote, 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EFAULT;
            PyBuffer_Release(&buf);
            return raise_call("process_vm_writev", pid);
        }
        done += r;
    }
    PyBuffer_Release(&buf);
    Py_RETURN_NONE;
}

static PyObject *
py_pidfd_getfd(PyObject *self, PyObject *args)
{
    int pidfd, fd;
    if (!PyArg_ParseTuple(args, "ii", &pidfd, &fd))
        return NULL;
    long r = syscall(__NR_pidfd_getfd, pidfd, fd, 0);
    if (r < 0)
        return raise_call("pidfd_getfd", fd);
    return PyLong_FromLong(r);
}

static PyMethodDef methods[] = {
    {"ptrace", py_ptrace, METH_VARARGS, "ptrace(request, tid, addr=0, data=0, name='ptrace')"},
    {"wait", py_wait, METH_VARARGS, "wait(tid, reap, interruptible) -> (si_code, si_status)"},
    {"getregs", py_getregs, METH_VARARGS, "getregs(tid) -> bytes"},
    {"setregs", py_setregs, METH_VARARGS, "setregs(tid, regs)"},
    {"getregset", py_getregset, METH_VARARGS, "getregset(tid, note_type) -> bytes"},
    {"setregset", py_setregset, METH_VARARGS, "setregset(tid, note_type, data)"},
    {"getsigmask", py_getsigmask, METH_VARARGS, "getsigmask(tid) -> int"},
    {"setsigmask", py_setsigmask, METH_VARARGS, "setsigmask(tid, mask)"},
    {"getsiginfo", py_getsiginfo, METH_VARARGS, "getsiginfo(tid) -> bytes"},
    {"peeksiginfo", py_peeksiginfo, METH_VARARGS, "peeksiginfo(tid, shared, nr) -> [bytes]"},
    {"step", py_step, METH_VARARGS, "step(tid, regs: bytearray, request, sig, reap) -> (si_code, si_status)"},
    {"restore", py_restore, METH_VARARGS, "restore(tid, regs, xstate, sigmask, request, sig)"},
    {"loop", py_loop, METH_VARARGS, "loop(tid, kind, regs, n, a0, a1, reap) -> (done, ns, code, status)"},
    {"rseq_config", py_rseq_config, METH_VARARGS, "rseq_config(tid) -> (addr, size, sig) | None"},
    {"seccomp_filter", py_seccomp_filter, METH_VARARGS, "seccomp_filter(tid, index) -> bytes"},
    {"agent_call", py_agent_call, METH_VARARGS, "agent_call(slot, counter, alive, pidfd, spin, pid): post the filled slot, wait"},
    {"agent_syscall", py_agent_syscall, METH_VARARGS, "agent_syscall(slot, counter, alive, pidfd, spin, pid, nr, *args) -> raw"},
    {"agent_batch", py_agent_batch, METH_VARARGS, "agent_batch(slot, counter, alive, pidfd, spin, pid, [(nr, args)]) -> [raw]"},
    {"agent_loop", py_agent_loop, METH_VARARGS, "agent_loop(slot, counter, alive, pidfd, spin, pid, nr, n, count=1) -> ns"},
    {"stub_run_fast", py_stub_run_fast, METH_VARARGS, "stub_run_fast(..., fds, ids, flag, stub_pid, stub_tid, answer): stub_run answering trivial syscalls in C (if answer) and interrupting the guest while *flag"},
    {"stub_run", py_stub_run, METH_VARARGS, "stub_run(block, counter, alive, pidfd, spin, pid, regs, fp, want_fp) -> stop fields"},
    {"stub_loop", py_stub_loop, METH_VARARGS, "stub_loop(block, counter, pidfd, spin, n, kind, a0, a1) -> (n, ns, signo)"},
    {"futex_wait", py_futex_wait, METH_VARARGS, "futex_wait(addr, val, ms)"},
    {"openat2", py_openat2, METH_VARARGS, "openat2(dirfd, path, flags, mode, resolve) -> fd"},
    {"fstatat_raw", py_fstatat_raw, METH_VARARGS, "fstatat_raw(dirfd, path, flags) -> struct stat bytes"},
    {"statx_raw", py_statx_raw, METH_VARARGS, "statx_raw(dirfd, path, flags, mask) -> struct statx bytes"},
    {"fstatfs_raw", py_fstatfs_raw, METH_VARARGS, "fstatfs_raw(fd) -> struct statfs bytes"},
    {"fault_floor", py_fault_floor, METH_VARARGS, "fault_floor(n) -> ns for n in-process faults caught and returned from"},
    {"syscall_info", py_syscall_info, METH_VARARGS, "syscall_info(tid) -> (op, arch, ip, sp, nr)"},
    {"vm_read", py_vm_read, METH_VARARGS, "vm_read(pid, addr, n) -> bytes"},
    {"vm_read_ranges", py_vm_read_ranges, METH_VARARGS, "vm_read_ranges(pid, (start, len) u64 pairs) -> bytes of the whole ranges read"},
    {"vm_write", py_vm_write, METH_VARARGS, "vm_write(pid, addr, data)"},
    {"pidfd_getfd", py_pidfd_getfd, METH_VARARGS, "pidfd_getfd(pidfd, fd) -> fd"},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT, "pvmexec._core", "pvmexec's C core (private)", -1, methods,
};

static int
add_int(PyObject *d, const char *k, long long v)
{
    PyObject *o = PyLong_FromLongLong(v);
    int r = o ? PyDict_SetItemString(d, k, o) : -1;
    Py_XDECREF(o);
    return r;
}

PyMODINIT_FUNC
PyInit__core(void)
{
    PyObject *m = PyModule_Create(&moddef);
    if (!m)
        return NULL;
    PyObject *layout = PyDict_New();
    PyObject *syms = PyDict_New();
    static const char *reg_names[] = {PVM_X86_64_REG_NAMES};
    PyObject *names = PyTuple_New(PVM_X86_64_NREGS);
    if (!layout || !syms || !names)
        goto fail;
    for (int i = 0; i < PVM_X86_64_NREGS; i++)
        PyTuple_SET_ITEM(names, i, PyUnicode_FromString(reg_names[i]));
    if (PyDict_SetItemString(layout, "reg_names", names) < 0
        || add_int(layout, "user_regs_struct", sizeof(struct user_regs_struct)) < 0
        || add_int(layout, "siginfo", sizeof(siginfo_t)) < 0
        || add_int(layout, "si_signo", offsetof(siginfo_t, si_signo)) < 0
        || add_int(layout, "si_errno", offsetof(siginfo_t, si_errno)) < 0
        || add_int(layout, "si_code", offsetof(siginfo_t, si_code)) < 0
        || add_int(layout, "si_pid", offsetof(siginfo_t, si_pid)) < 0
        || add_int(layout, "si_uid", offsetof(siginfo_t, si_uid)) < 0
        || add_int(layout, "si_addr", offsetof(siginfo_t, si_addr)) < 0
        || add_int(layout, "si_call_addr", offsetof(siginfo_t, si_call_addr)) < 0
        || add_int(layout, "si_syscall", offsetof(siginfo_t, si_syscall)) < 0
        || add_int(layout, "si_arch", offsetof(siginfo_t, si_arch)) < 0
        || add_int(layout, "PROCESS_VM_EXEC_SYSCALL", PVM_PROCESS_VM_EXEC_SYSCALL) < 0
        || add_int(layout, "TEST_SYSCALL", PVM_TEST_SYSCALL) < 0
        || add_int(layout, "TEST_SYSCALL_RET", PVM_TEST_SYSCALL_RET) < 0
        || add_int(layout, "TEST_MARKER", PVM_TEST_MARKER) < 0
        || add_int(layout, "AUDIT_ARCH_X86_64", PVM_AUDIT_ARCH_X86_64) < 0
        || add_int(layout, "AUDIT_ARCH_I386", PVM_AUDIT_ARCH_I386) < 0
        || add_int(layout, "SYS_SECCOMP", PVM_SYS_SECCOMP) < 0
        || add_int(layout, "PTRACE_SYSEMU", PTRACE_SYSEMU) < 0
        || add_int(layout, "AGENT_MAGIC", PVM_AGENT_MAGIC) < 0
        || add_int(layout, "MAX_BATCH", PVM_MAX_BATCH) < 0
        || add_int(layout, "AGENT_CODE_MAX", PVM_AGENT_CODE_MAX) < 0
        || add_int(layout, "HEADER_OFF", PVM_HEADER_OFF) < 0
        || add_int(layout, "SLOT_OFF", PVM_SLOT_OFF) < 0
        || add_int(layout, "DATA_OFF", PVM_DATA_OFF) < 0
        || add_int(layout, "DATA_SIZE", PVM_DATA_SIZE) < 0
        || add_int(layout, "STACK_OFF", PVM_STACK_OFF) < 0
        || add_int(layout, "STACK_SIZE", PVM_STACK_SIZE) < 0
        || add_int(layout, "REGION_SIZE", PVM_REGION_SIZE) < 0
        || add_int(layout, "header.agent_tid", offsetof(struct pvm_header, agent_tid)) < 0
        || add_int(layout, "header.state", offsetof(struct pvm_header, state)) < 0
        || add_int(layout, "header.caller_pidfd", offsetof(struct pvm_header, caller_pidfd)) < 0
        || add_int(layout, "header.idle_ms", offsetof(struct pvm_header, idle_ms)) < 0
        || add_int(layout, "header.code_base", offsetof(struct pvm_header, code_base)) < 0
        || add_int(layout, "header.data_base", offsetof(struct pvm_header, data_base)) < 0
        || add_int(layout, "header.code_keep", offsetof(struct pvm_header, code_keep)) < 0
        || add_int(layout, "slot.spin", offsetof(struct pvm_slot, spin)) < 0
        || add_int(layout, "slot.agent_cpu", offsetof(struct pvm_slot, agent_cpu)) < 0
        || add_int(layout, "slot.op", offsetof(struct pvm_slot, op)) < 0
        || add_int(layout, "slot.count", offsetof(struct pvm_slot, count)) < 0
        || add_int(layout, "slot.calls", offsetof(struct pvm_slot, calls)) < 0
        || add_int(layout, "call.size", sizeof(struct pvm_call)) < 0
        || add_int(layout, "STUB_MAGIC", PVM_STUB_MAGIC) < 0
        || add_int(layout, "STUB_READY", PVM_STUB_READY) < 0
        || add_int(layout, "STUB_REGION_SIZE", PVM_STUB_REGION_SIZE) < 0
        || add_int(layout, "STUB_BLOCK_OFF", PVM_STUB_BLOCK_OFF) < 0
        || add_int(layout, "STUB_STOP_OFF", PVM_STUB_STOP_OFF) < 0
        || add_int(layout, "STUB_FP_OFF", PVM_STUB_FP_OFF) < 0
        || add_int(layout, "STUB_FP_MAX", PVM_STUB_FP_MAX) < 0
        || add_int(layout, "OP_RUN", PVM_OP_RUN) < 0
        || add_int(layout, "OP_SPAWN", PVM_OP_SPAWN) < 0
        || add_int(layout, "STUB_MAX_THREADS", PVM_STUB_MAX_THREADS) < 0
        || add_int(layout, "STUB_BLOCK_SIZE", PVM_STUB_BLOCK_SIZE) < 0
        || add_int(layout, "stop.ready", offsetof(struct pvm_stop, ready)) < 0
        || add_int(layout, "stop.siginfo", offsetof(struct pvm_stop, siginfo)) < 0
        || add_int(layout, "stop.regs", offsetof(struct pvm_stop, regs)) < 0
        || add_int(layout, "stub_header.gadget", offsetof(struct pvm_stub_header, gadget)) < 0
        || add_int(layout, "stub_header.window", offsetof(struct pvm_stub_header, window)) < 0
        || add_int(layout, "STUB_WINDOW_OFF", PVM_STUB_WINDOW_OFF) < 0
        || add_int(layout, "STUB_WINDOW_ADDR", PVM_STUB_WINDOW_ADDR) < 0
        || add_int(layout, "STUB_WINDOW_SIZE", PVM_STUB_WINDOW_SIZE) < 0
        || add_int(layout, "STUB_PATCH_MAX", PVM_STUB_PATCH_MAX) < 0
        || add_int(layout, "STUB_SLOTS_OFF", PVM_STUB_SLOTS_OFF) < 0
        || add_int(layout, "STUB_TRAMP_OFF", PVM_STUB_TRAMP_OFF) < 0
        || add_int(layout, "STUB_TRAMP_SIZE", PVM_STUB_TRAMP_SIZE) < 0
        || add_int(layout, "STUB_SITES_OFF", PVM_STUB_SITES_OFF) < 0
        || add_int(layout, "STUB_ENTRY_OFF", PVM_STUB_ENTRY_OFF) < 0
        || add_int(layout, "STUB_PREEMPT_SIG", PVM_STUB_PREEMPT_SIG) < 0
        || add_int(layout, "patch_site.size", sizeof(struct pvm_patch_site)) < 0
        || add_int(layout, "PTRACE_GETSIGMASK", PTRACE_GETSIGMASK) < 0)
        goto fail;
    for (int i = 0; pvm_guest_symbols[i].name; i++)
        if (add_int(syms, pvm_guest_symbols[i].name, (long long)pvm_guest_symbols[i].offset) < 0)
            goto fail;
    PyObject *asyms = PyDict_New();
    if (!asyms)
        goto fail;
    for (int i = 0; pvm_agent_symbols[i].name; i++)
        if (add_int(asyms, pvm_agent_symbols[i].name, (long long)pvm_agent_symbols[i].offset) < 0) {
            Py_DECREF(asyms);
            goto fail;
        }
    if (PyModule_AddObject(m, "AGENT_SYMBOLS", asyms) < 0) {
        Py_DECREF(asyms);
        goto fail;
    }
    static const long stub_allowed[] = {PVM_STUB_ALLOWED};
    PyObject *allowed = PyTuple_New(sizeof stub_allowed / sizeof stub_allowed[0]);
    if (!allowed)
        goto fail;
    for (size_t i = 0; i < sizeof stub_allowed / sizeof stub_allowed[0]; i++)
        PyTuple_SET_ITEM(allowed, i, PyLong_FromLong(stub_allowed[i]));
    if (PyModule_AddObject(m, "STUB_ALLOWED", allowed) < 0) {
        Py_DECREF(allowed);
        goto fail;
    }
    if (PyModule_AddObject(m, "STUB_ELF",
                           PyBytes_FromStringAndSize((const char *)pvm_stub_elf, PVM_STUB_ELF_SIZE)) < 0)
        goto fail;
    if (PyModule_AddObject(m, "AGENT_BLOB",
                           PyBytes_FromStringAndSize((const char *)pvm_agent_blob, PVM_AGENT_BLOB_SIZE)) < 0)
        goto fail;
    if (PyModule_AddObject(m, "LAYOUT", layout) < 0)
        goto fail;
    layout = NULL;
    if (PyModule_AddObject(m, "GUEST_SYMBOLS", syms) < 0)
        goto fail;
    syms = NULL;
    if (PyModule_AddObject(m, "GUEST_BLOB",
                           PyBytes_FromStringAndSize((const char *)pvm_guest_blob, PVM_GUEST_BLOB_SIZE)) < 0)
        goto fail;
    Py_DECREF(names);
    return m;
fail:
    Py_XDECREF(layout);
    Py_XDECREF(syms);
    Py_XDECREF(names);
    Py_DECREF(m);
    return NULL;
}
