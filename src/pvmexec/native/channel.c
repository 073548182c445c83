/* The caller's side of the channel (docs/protocol.md): post a request in the slot, wait for its answer; agent calls and stub runs. */
#include "core.h"

long
futex_op(volatile uint32_t *addr, int op, uint32_t val, const struct timespec *ts)
{
    return syscall(SYS_futex, addr, op, val, ts, NULL, 0);
}

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

/*
 * Is the agent (thread tid of pid) idle, waiting for a request on req_seq at target address want_addr,
 * while ours is posted? Then it will never answer it: the target claimed or rewrote it. The kernel's
 * /proc/PID/task/TID/syscall tells what the thread really does, whatever the shared slot says.
 */
static int
agent_idle_on(int pid, uint32_t tid, uint64_t want_addr)
{
    char path[64], buf[256];
    snprintf(path, sizeof path, "/proc/%d/task/%u/syscall", pid, tid);
    int fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0)
        return 0;
    ssize_t n = read(fd, buf, sizeof buf - 1);
    close(fd);
    if (n <= 0)
        return 0;
    buf[n] = 0;
    unsigned long long nr, addr, op;
    return sscanf(buf, "%llu 0x%llx 0x%llx", &nr, &addr, &op) == 3 && nr == __NR_futex &&
           (op & 0x7f) == FUTEX_WAIT && addr == want_addr;
}

/* A stub thread to interrupt (PVM_STUB_PREEMPT_SIG) while *flag is set, for stub_run_fast. */
struct preempt {
    volatile int32_t *flag;
    int pid, tid;
};

/*
 * Post the request in the slot and wait for its answer. The sequence number
 * comes from the caller's own counter, never from the shared slot, which the
 * other side (or a guest) can scribble on; only the sequence word is read
 * back, compared for equality.
 */
int
channel_post_wait(struct pvm_slot *slot, uint32_t *counter, volatile uint32_t *alive, int pidfd, long spin,
                  int pid)
{
    return channel_post_wait_preempt(slot, counter, alive, pidfd, spin, pid, NULL);
}

int
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
    int rc = 0, idle_ticks = 0;
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
            rc = PVM_CHAN_INTERRUPTED;     /* the request is still in flight */
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
            /*
             * The agent keeps sleeping, waiting for a request, while ours is posted, and it is not
             * stopped: the target took it away (wrote the slot). Fail, rather than wait forever.
             */
            if (alive && pid > 0) {
                const struct pvm_header *h =
                    (const struct pvm_header *)((const char *)slot - (PVM_SLOT_OFF - PVM_HEADER_OFF));
                uint64_t req_addr = __atomic_load_n(&h->data_base, __ATOMIC_RELAXED) +
                                    (PVM_SLOT_OFF - PVM_HEADER_OFF) + offsetof(struct pvm_slot, req_seq);
                uint32_t tid = __atomic_load_n(alive, __ATOMIC_ACQUIRE);
                if (agent_idle_on(pid, tid, req_addr) && !thread_stopped(pid, tid) &&
                    __atomic_load_n(&slot->resp_seq, __ATOMIC_ACQUIRE) != seq) {
                    /* It re-reads the slot each time its idle sleep ends: give it two of those. */
                    uint32_t idle_ms = __atomic_load_n(&h->idle_ms, __ATOMIC_RELAXED);
                    if (++idle_ticks > 2 * (long)(idle_ms < 5000 ? idle_ms : 5000) / 50 + 2) {
                        errno = EPROTO;
                        rc = -1;
                        break;
                    }
                } else {
                    idle_ticks = 0;
                }
            }
        }
    }
    __atomic_store_n(&slot->caller_sleeping, 0, __ATOMIC_RELEASE);
    return rc;
}

PyObject *
channel_error(int rc, int pidfd)
{
    if (rc == PVM_CHAN_INTERRUPTED)
        return NULL;
    return raise_call("agent channel", pidfd);
}

PyObject *
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
PyObject *
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
PyObject *
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
 * One mode 1 run from parsed arguments: the stop's fields
 * (signo, si_code, si_errno, word at 16, si_syscall, si_arch, siginfo bytes, regs, fp), Py_None if the
 * register state is refused (Python words why), or NULL with an exception set.
 */
PyObject *
stub_run(const struct stub_run *a)
{
    struct pvm_slot *slot = SLOT(a->block);
    struct pvm_stop *stop = (struct pvm_stop *)(uintptr_t)(a->block + PVM_STUB_STOP_OFF);
    char *fp_area = (char *)(uintptr_t)(a->block + PVM_STUB_FP_OFF);
    const struct fast_path *fast = a->fast;
    if (a->fp_len > PVM_STUB_FP_MAX) {
        PyErr_SetString(PyExc_ValueError, "bad FPU state size");
        return NULL;
    }
    {
        /* What a 64-bit user thread can hold; Python words the error (arch.validate). */
        const uint64_t *r = a->regs, lim = (1ULL << 47) - 4096;
        if (r[17] != 0x33 || r[20] != 0x2b || r[16] > lim || r[21] > lim || r[22] > lim ||
            (r[23] && r[23] != 0x2b) || (r[24] && r[24] != 0x2b) || (r[25] && r[25] != 0x2b) ||
            (r[26] && r[26] != 0x2b))
            Py_RETURN_NONE;
    }
    /* Write only the registers that changed: the lines the stub owns stay in its cache. */
    for (int i = 0; i < PVM_X86_64_NREGS; i++)
        if (stop->regs[i] != a->regs[i])
            stop->regs[i] = a->regs[i];
    if (a->fp_len)
        memcpy(fp_area, a->fp, (size_t)a->fp_len);
    stop->fp_valid = a->fp_len ? 1 : 0;
    uint32_t signo, fp_size;
    struct preempt pre = {fast ? fast->flag.buf : NULL, fast ? fast->stub_pid : 0, a->stub_tid};
    for (;;) {
        slot->op = PVM_OP_RUN;
        int rc = channel_post_wait_preempt(slot, a->counter, a->alive, a->pidfd, a->spin, a->pid,
                                           fast && a->stub_tid > 0 ? &pre : NULL);
        if (rc < 0)
            return channel_error(rc, a->pidfd);
        signo = __atomic_load_n(&stop->signo, __ATOMIC_RELAXED);
        fp_size = __atomic_load_n(&stop->fp_size, __ATOMIC_RELAXED);
        if (signo < 1 || signo > 64 || (a->want_fp && (fp_size < 512 || fp_size > PVM_STUB_FP_MAX))) {
            errno = EPROTO;
            return raise_call("stub stop data", a->pidfd);
        }
        if (!fast || !a->answer || *(volatile int32_t *)fast->flag.buf || !fast_answer((struct fast_path *)fast, stop))
            break;
        stop->fp_valid = 1;                /* resume with the state this stop saved */
    }
    int32_t f_errno, f_code, f_syscall;
    uint32_t f_arch;
    uint64_t word;
    memcpy(&f_errno, stop->siginfo + PVM_SI_ERRNO, 4);
    memcpy(&f_code, stop->siginfo + PVM_SI_CODE, 4);
    memcpy(&word, stop->siginfo + PVM_SI_ADDR, 8);
    memcpy(&f_syscall, stop->siginfo + PVM_SI_SYSCALL, 4);
    memcpy(&f_arch, stop->siginfo + PVM_SI_ARCH, 4);
    /* (Built by hand: Py_BuildValue's format parsing is a tenth of a round trip here.) */
    PyObject *t = PyTuple_New(9);
    if (!t)
        return NULL;
    PyObject *items[9] = {
        PyLong_FromUnsignedLong(signo), PyLong_FromLong(f_code), PyLong_FromLong(f_errno),
        PyLong_FromUnsignedLongLong(word), PyLong_FromLong(f_syscall), PyLong_FromUnsignedLong(f_arch),
        PyBytes_FromStringAndSize((const char *)stop->siginfo, sizeof stop->siginfo),
        PyByteArray_FromStringAndSize((const char *)stop->regs, sizeof stop->regs),
        a->want_fp ? PyBytes_FromStringAndSize(fp_area, fp_size) : Py_NewRef(Py_None),
    };
    int bad = 0;
    for (int i = 0; i < 9; i++) {
        bad |= !items[i];
        PyTuple_SET_ITEM(t, i, items[i]);      /* (a NULL item is fine to dealloc) */
    }
    if (bad)
        Py_CLEAR(t);
    else
        PyObject_GC_UnTrack(t);                /* only atoms in it: the collector has nothing to find */
    return t;
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
    if (regs.len != PVM_X86_64_NREGS * 8 || (with_fast && (fast.ids.len < 7 * 8 || fast.flag.len < 4)))
        PyErr_SetString(PyExc_ValueError, "bad register block or fast-path table size");
    else {
        struct stub_run a = {block, COUNTER(counter), ALIVE(alive), pidfd, pid, spin, regs.buf, fp.buf, fp.len,
                             want_fp, with_fast ? &fast : NULL, stub_tid, answer};
        res = stub_run(&a);
    }
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
PyObject *
py_stub_run(PyObject *self, PyObject *args)
{
    return stub_run_common(args, 0);
}

PyObject *
py_stub_run_fast(PyObject *self, PyObject *args)
{
    return stub_run_common(args, 1);
}
