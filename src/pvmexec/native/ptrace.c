/* ptrace and waitid: registers, regsets, signal masks and siginfo, stepping and restoring a thread, rseq, seccomp filters, syscall info. */
#include "core.h"
#include <cpuid.h>

struct peeksiginfo_args_ {
    uint64_t off;
    uint32_t flags;
    int32_t nr;
};

int
xptrace(long req, pid_t tid, void *addr, void *data)
{
    errno = 0;
    return (int)ptrace(req, tid, addr, data);
}

uint64_t
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
int
wait_event(pid_t tid, int reap, int interruptible, double timeout, int *code, int *status)
{
    siginfo_t si;
    struct timespec start, now;
    long pause_ns = 20000;
    if (timeout >= 0)
        clock_gettime(CLOCK_MONOTONIC, &start);
    for (;;) {
        memset(&si, 0, sizeof si);
        int r;
        Py_BEGIN_ALLOW_THREADS
        r = waitid(P_PID, tid, &si, WEXITED | WSTOPPED | __WALL | WNOWAIT | (timeout >= 0 ? WNOHANG : 0));
        Py_END_ALLOW_THREADS
        if (r < 0) {
            if (errno == EINTR && !interruptible)
                continue;
            return -1;
        }
        if (timeout >= 0 && si.si_pid == 0) {
            /* waitid has no timeout: poll, backing off to 1 ms (only the rare cancel path waits so) */
            clock_gettime(CLOCK_MONOTONIC, &now);
            if ((now.tv_sec - start.tv_sec) + (now.tv_nsec - start.tv_nsec) / 1e9 >= timeout)
                return 1;
            struct timespec ts = {0, pause_ns};
            Py_BEGIN_ALLOW_THREADS
            nanosleep(&ts, NULL);
            Py_END_ALLOW_THREADS
            if (pause_ns < 1000000)
                pause_ns *= 2;
            continue;
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

/* wait(tid, reap, interruptible, timeout=-1): (code, status) of the next event, or None after timeout s. */
PyObject *
py_wait(PyObject *self, PyObject *args)
{
    int tid, reap, interruptible;
    double timeout = -1;
    if (!PyArg_ParseTuple(args, "ipp|d", &tid, &reap, &interruptible, &timeout))
        return NULL;
    int code, status;
    for (;;) {
        int r = wait_event(tid, reap, interruptible, timeout, &code, &status);
        if (r == 0)
            return Py_BuildValue("(ii)", code, status);
        if (r > 0)
            Py_RETURN_NONE;
        if (errno != EINTR)
            return raise_call("waitid", tid);
        if (PyErr_CheckSignals() < 0)
            return NULL;
    }
}

PyObject *
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

PyObject *
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

PyObject *
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

PyObject *
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

int
setregset(int tid, unsigned long nt, void *data, size_t len)
{
    struct iovec iov = {data, len};
    return xptrace(PTRACE_SETREGSET, tid, (void *)nt, &iov);
}

PyObject *
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

PyObject *
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

PyObject *
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

PyObject *
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

PyObject *
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
PyObject *
py_step(PyObject *self, PyObject *args)
{
    int tid, sig, reap;
    long request;
    Py_buffer buf, state;
    PyObject *mask_obj = Py_None;
    if (!PyArg_ParseTuple(args, "iw*lipw*|O", &tid, &buf, &request, &sig, &reap, &state, &mask_obj))
        return NULL;
    PyObject *res = NULL;
    int code, status;
    if (buf.len != sizeof(struct user_regs_struct)) {
        PyErr_SetString(PyExc_ValueError, "register block must be sizeof(struct user_regs_struct)");
        goto out;
    }
    if (state.len < 1) {
        PyErr_SetString(PyExc_ValueError, "running flag buffer must hold a byte");
        goto out;
    }
    if (xptrace(PTRACE_SETREGS, tid, NULL, buf.buf) < 0) {
        raise_call("ptrace(PTRACE_SETREGS)", tid);
        goto out;
    }
    /* The operation's mask after its registers: a thread left with the one keeps the other. */
    if (mask_obj != Py_None) {
        uint64_t m = PyLong_AsUnsignedLongLong(mask_obj);
        if (PyErr_Occurred())
            goto out;
        if (xptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof m, &m) < 0) {
            raise_call("ptrace(PTRACE_SETSIGMASK)", tid);
            goto out;
        }
    }
    if (xptrace(request, tid, NULL, (void *)(long)sig) < 0) {
        raise_call("ptrace(resume)", tid);
        goto out;
    }
    /* Whether the thread runs, for a Python exception raised before or after this returns. */
    ((char *)state.buf)[0] = 1;
    for (;;) {
        if (wait_event(tid, reap, 1, -1, &code, &status) == 0)
            break;
        if (errno != EINTR) {
            raise_call("waitid", tid);
            goto out;
        }
        if (PyErr_CheckSignals() < 0)
            goto out;   /* the thread is still running: Python interrupts it and cleans up */
    }
    ((char *)state.buf)[0] = 0;
    if (code == CLD_TRAPPED && xptrace(PTRACE_GETREGS, tid, NULL, buf.buf) < 0) {
        raise_call("ptrace(PTRACE_GETREGS)", tid);
        goto out;
    }
    res = Py_BuildValue("(ii)", code, status);
out:
    PyBuffer_Release(&buf);
    PyBuffer_Release(&state);
    return res;
}

/*
 * Put a borrowed thread back exactly as found and let it go, in one call so
 * that no Python signal handler can run half-way through.
 */
PyObject *
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
    /* Registers last: if we die half-way, a thread still at our trampoline restores itself whole. */
    if (xptrace(PTRACE_SETSIGMASK, tid, (void *)sizeof m, &m) < 0) {
        raise_call("ptrace(PTRACE_SETSIGMASK)", tid);
        goto out;
    }
    if (xs.len && setregset(tid, NT_X86_XSTATE, xs.buf, (size_t)xs.len) < 0) {
        raise_call("ptrace(PTRACE_SETREGSET, NT_X86_XSTATE)", tid);
        goto out;
    }
    if (xptrace(PTRACE_SETREGS, tid, NULL, regs.buf) < 0) {
        raise_call("ptrace(PTRACE_SETREGS)", tid);
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

/* PTRACE_GET_RSEQ_CONFIGURATION: (rseq area address, size, signature), or None if not supported. */
PyObject *
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
    if (ptrace(PTRACE_GET_RSEQ_CONFIGURATION, tid, (void *)sizeof cfg, &cfg) < 0) {
        if (errno == EIO || errno == EINVAL)
            Py_RETURN_NONE;
        return raise_call("ptrace(PTRACE_GET_RSEQ_CONFIGURATION)", tid);
    }
    return Py_BuildValue("(KII)", (unsigned long long)cfg.ptr, cfg.size, cfg.sig);
}

/* PTRACE_SECCOMP_GET_FILTER: the index-th filter of a stopped thread, as raw sock_filter bytes. */
PyObject *
py_seccomp_filter(PyObject *self, PyObject *args)
{
    int tid;
    unsigned long index;
    if (!PyArg_ParseTuple(args, "ik", &tid, &index))
        return NULL;
    long n = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void *)index, NULL);
    if (n < 0)
        return raise_call("ptrace(PTRACE_SECCOMP_GET_FILTER)", tid);
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (!out)
        return NULL;
    long m = ptrace(PTRACE_SECCOMP_GET_FILTER, tid, (void *)index, PyBytes_AS_STRING(out));
    if (m != n) {
        Py_DECREF(out);
        if (m >= 0)
            errno = EAGAIN;
        return raise_call("ptrace(PTRACE_SECCOMP_GET_FILTER)", tid);
    }
    return out;
}

/* PTRACE_GET_SYSCALL_INFO at a syscall-entry stop: (op, arch, ip, sp, nr). */
PyObject *
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
    if (ptrace(PTRACE_GET_SYSCALL_INFO, tid, (void *)sizeof info, &info) < 0)
        return raise_call("ptrace(PTRACE_GET_SYSCALL_INFO)", tid);
    return Py_BuildValue("(iIKKK)", info.op, info.arch, (unsigned long long)info.ip,
                         (unsigned long long)info.sp, (unsigned long long)info.nr);
}

/* CPUID leaf 0xD: [(component, size, offset in the standard xsave format)] for components 2 and up. */
PyObject *
py_xsave_components(PyObject *self, PyObject *unused)
{
    PyObject *list = PyList_New(0);
    for (unsigned i = 2; list && i < 63; i++) {
        unsigned eax = 0, ebx = 0, ecx = 0, edx = 0;
        __cpuid_count(0xD, i, eax, ebx, ecx, edx);
        if (!eax)
            continue;
        PyObject *t = Py_BuildValue("(III)", i, eax, ebx);
        if (!t || PyList_Append(list, t) < 0)
            Py_CLEAR(list);
        Py_XDECREF(t);
    }
    return list;
}
