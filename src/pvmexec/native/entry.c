/*
 * The hot entries from Python: Space.syscall through an agent (Channel) and Space.exec on a stub or helper
 * thread (Runner), one C call each with no Python frame between the caller and the channel (each frame
 * costs ~0.1 µs here). They decide nothing: anything out of the ordinary (a name for a number, string
 * arguments, a busy thread, a refused register state, a sigmask that is not a frozenset, a closed entry)
 * returns None and the Python path, which words every error, takes the call. A channel error goes to the
 * engine's `failed(exc)`, which returns the exception to raise, or None if nothing ran (the Python path
 * then takes the call).
 *
 * Register makes SigContext's registers attributes in C.
 *
 * The signal guard's operation counters (_sigguard) live here too: a fast call counts as an operation
 * without a Python call.
 */
#include "core.h"
#include <pthread.h>
#include <time.h>
#include <structmember.h>

/* Where the slots of context.SigContext and context.Stop live in their objects (entry_setup). */
static PyTypeObject *ctx_type, *stop_type;
static Py_ssize_t ctx_buf, ctx_fp, stop_ctx, stop_info, stop_fields, stop_reason;
static PyObject *reason_syscall, *reason_signal;

#define SLOT_AT(o, off) (*(PyObject **)((char *)(o) + (off)))
/* Where a SigContext holds a syscall's number, arguments and result (entry_setup, from pvmexec.arch). */
static Py_ssize_t sys_nr = -1, sys_args[6], sys_ret;

/* -- the signal guard's counters ------------------------------------------------------------------ */

static long guard_ops, guard_main_ops;
static unsigned long guard_main;
static PyObject *guard_deferred;           /* _sigguard's list of signals held off until no operation runs */
static PyObject *guard_due;                /* what acts on one (dies of it) */

static void
guard_enter(void)
{
    guard_ops++;
    if (PyThread_get_thread_ident() == guard_main)
        guard_main_ops++;
}

/* 0, or -1 with an exception set: the one set before (kept), or what acting on a held-off signal raised. */
static int
guard_exit(void)
{
    guard_ops--;
    if (PyThread_get_thread_ident() == guard_main)
        guard_main_ops--;
    if (guard_ops || !guard_deferred || !PyList_GET_SIZE(guard_deferred))
        return PyErr_Occurred() ? -1 : 0;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallNoArgs(guard_due);
    if (!r) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        return -1;
    }
    Py_DECREF(r);
    PyErr_Restore(type, value, tb);
    return type ? -1 : 0;
}

PyObject *
py_guard_setup(PyObject *self, PyObject *args)
{
    unsigned long main_ident;
    PyObject *deferred, *due;
    if (!PyArg_ParseTuple(args, "kO!O", &main_ident, &PyList_Type, &deferred, &due))
        return NULL;
    guard_main = main_ident;
    Py_XSETREF(guard_deferred, Py_NewRef(deferred));
    Py_XSETREF(guard_due, Py_NewRef(due));
    Py_RETURN_NONE;
}

PyObject *
py_guard_enter(PyObject *self, PyObject *unused)
{
    guard_enter();
    Py_RETURN_NONE;
}

PyObject *
py_guard_exit(PyObject *self, PyObject *unused)
{
    if (guard_exit() < 0)
        return NULL;
    Py_RETURN_NONE;
}

PyObject *
py_guard_counts(PyObject *self, PyObject *unused)
{
    return Py_BuildValue("(ll)", guard_ops, guard_main_ops);
}

/* The failed(exc) protocol (see the top): NULL with the exception to raise set, or Py_None (a new reference). */
static PyObject *
call_failed(PyObject *failed)
{
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb)
        PyException_SetTraceback(value, tb);
    Py_XDECREF(type);
    Py_XDECREF(tb);
    PyObject *r = PyObject_CallOneArg(failed, value);
    Py_DECREF(value);
    if (!r || r == Py_None)
        return r;
    if (PyExceptionInstance_Check(r))
        PyErr_SetObject((PyObject *)Py_TYPE(r), r);
    else
        PyErr_Format(PyExc_TypeError, "failed() returned %.100s, not an exception", Py_TYPE(r)->tp_name);
    Py_DECREF(r);
    return NULL;
}

/* An int that fits a 64-bit register, signed or unsigned (space._is_register_value): 1, or 0. */
static int
register_value(PyObject *o, uint64_t *out)
{
    if (!PyLong_CheckExact(o))
        return 0;
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(o, &overflow);
    if (!overflow) {
        *out = (uint64_t)v;
        return 1;
    }
    if (overflow < 0)
        return 0;
    unsigned long long u = PyLong_AsUnsignedLongLong(o);
    if (u == (unsigned long long)-1 && PyErr_Occurred()) {
        PyErr_Clear();
        return 0;
    }
    *out = u;
    return 1;
}

/* -- Channel: mode 2 through an agent's slot ----------------------------------------------------------- */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    struct pvm_slot *slot;
    uint32_t *counter;
    volatile uint32_t *alive;
    int pidfd, pid;
    long spin;
    long long check_at;                    /* CLOCK_MONOTONIC ns from which calls take the Python path */
    PyObject *failed;
    PyObject *keep;                        /* what owns the memory the addresses point into */
    PyThread_type_lock lock;               /* one request in the slot at a time */
    unsigned long owner;                   /* the thread holding it, 0 if none */
    int closed;
} Channel;

static int
channel_take(Channel *c)
{
    unsigned long me = PyThread_get_thread_ident();
    if (c->owner == me) {
        PyErr_SetString(PyExc_RuntimeError, "a call through this channel is already in flight on this thread "
                        "(a signal handler calling into the target it interrupted?)");
        return -1;
    }
    while (!PyThread_acquire_lock(c->lock, NOWAIT_LOCK)) {
        PyLockStatus st;
        Py_BEGIN_ALLOW_THREADS
        st = PyThread_acquire_lock_timed(c->lock, 50 * 1000, 0);
        Py_END_ALLOW_THREADS
        if (st == PY_LOCK_ACQUIRED)
            break;
        if (PyErr_CheckSignals() < 0)
            return -1;
    }
    c->owner = me;
    return 0;
}

static void
channel_give(Channel *c)
{
    c->owner = 0;
    PyThread_release_lock(c->lock);
}

/* One call (v: the number, then six arguments) in the slot: its raw result, None if busy, or NULL. */
static PyObject *
channel_call(Channel *c, const uint64_t *v)
{
    if (v[0] >= X32_SYSCALL_BIT)         /* (syscalls.number words it) */
        Py_RETURN_NONE;
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);          /* (vDSO) */
    if (now.tv_sec * 1000000000LL + now.tv_nsec >= c->check_at)
        Py_RETURN_NONE;                            /* due: the Python path re-checks the agent's seccomp state */
    if (c->owner == PyThread_get_thread_ident() || !PyThread_acquire_lock(c->lock, NOWAIT_LOCK))
        Py_RETURN_NONE;                            /* busy: the Python path waits its turn, or says why not */
    if (c->closed) {
        PyThread_release_lock(c->lock);
        Py_RETURN_NONE;
    }
    c->owner = PyThread_get_thread_ident();
    guard_enter();
    struct pvm_slot *slot = c->slot;
    slot->op = PVM_OP_CALLS;
    slot->count = 1;
    slot->calls[0].nr = (int64_t)v[0];
    memcpy(slot->calls[0].args, v + 1, 6 * sizeof v[0]);
    PyObject *res;
    int rc = channel_post_wait(slot, c->counter, c->alive, c->pidfd, c->spin, c->pid);
    if (rc < 0) {
        channel_error(rc, c->pidfd);
        res = call_failed(c->failed);
    } else
        res = PyLong_FromLongLong(__atomic_load_n(&slot->calls[0].ret, __ATOMIC_RELAXED));
    channel_give(c);
    if (guard_exit() < 0)
        Py_CLEAR(res);
    return res;
}

/* channel(nr, *args) */
static PyObject *
channel_vcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    Channel *c = (Channel *)self;
    Py_ssize_t n = PyVectorcall_NARGS(nargsf);
    uint64_t v[7] = {0, 0, 0, 0, 0, 0, 0};
    if (c->closed || kwnames || n < 1 || n > 7)
        Py_RETURN_NONE;
    for (Py_ssize_t i = 0; i < n; i++)
        if (!register_value(args[i], &v[i]))
            Py_RETURN_NONE;
    return channel_call(c, v);
}

/* The register block of a SigContext (exactly that type), or NULL. */
static uint64_t *
ctx_words(PyObject *ctx)
{
    if (!ctx_type || !Py_IS_TYPE(ctx, ctx_type))
        return NULL;
    PyObject *buf = SLOT_AT(ctx, ctx_buf);
    if (!buf || !PyByteArray_CheckExact(buf) || PyByteArray_GET_SIZE(buf) != PVM_X86_64_NREGS * 8)
        return NULL;
    return (uint64_t *)PyByteArray_AS_STRING(buf);
}

/* channel.ctx_call(ctx, skip): the syscall ctx holds, its result written to ctx; None (nothing run) for a
 * number in skip. process_vm_exec(PROCESS_VM_EXEC_SYSCALL)'s way. */
static PyObject *
channel_ctx_call(Channel *c, PyObject *const *args, Py_ssize_t n)
{
    uint64_t *r = n == 2 && !c->closed && sys_nr >= 0 && PyAnySet_Check(args[1]) ? ctx_words(args[0]) : NULL;
    if (!r)
        Py_RETURN_NONE;
    uint64_t v[7] = {r[sys_nr]};
    for (int i = 0; i < 6; i++)
        v[i + 1] = r[sys_args[i]];
    PyObject *nr = PyLong_FromUnsignedLongLong(v[0]);
    int skip = nr ? PySet_Contains(args[1], nr) : -1;
    Py_XDECREF(nr);
    if (skip < 0)
        return NULL;
    if (skip)
        Py_RETURN_NONE;
    PyObject *res = channel_call(c, v);
    if (res && res != Py_None && (r = ctx_words(args[0])))       /* (again: the GIL was let go meanwhile) */
        r[sys_ret] = (uint64_t)PyLong_AsLongLong(res);
    return res;
}

static int
channel_init(Channel *c, PyObject *args, PyObject *kw)
{
    static char *names[] = {"slot", "counter", "alive", "pidfd", "spin", "pid", "failed", "keep", NULL};
    unsigned long long slot, counter, alive;
    PyObject *failed, *keep;
    if (c->lock)
        return 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKKiliOO", names, &slot, &counter, &alive, &c->pidfd, &c->spin,
                                     &c->pid, &failed, &keep))
        return -1;
    c->lock = PyThread_allocate_lock();
    if (!c->lock) {
        PyErr_NoMemory();
        return -1;
    }
    c->slot = SLOT(slot);
    c->counter = COUNTER(counter);
    c->alive = ALIVE(alive);
    c->failed = Py_NewRef(failed);
    c->keep = Py_NewRef(keep);
    c->vectorcall = channel_vcall;
    return 0;
}

static void
channel_dealloc(Channel *c)
{
    PyObject_GC_UnTrack(c);
    Py_CLEAR(c->failed);
    Py_CLEAR(c->keep);
    if (c->lock)
        PyThread_free_lock(c->lock);
    Py_TYPE(c)->tp_free((PyObject *)c);
}

static int
channel_traverse(Channel *c, visitproc visit, void *arg)
{
    Py_VISIT(c->failed);
    Py_VISIT(c->keep);
    return 0;
}

static int
channel_clear(Channel *c)
{
    Py_CLEAR(c->failed);
    Py_CLEAR(c->keep);
    return 0;
}

static PyObject *
channel_acquire(Channel *c, PyObject *unused)
{
    if (channel_take(c) < 0)
        return NULL;
    Py_RETURN_NONE;
}

static PyObject *
channel_release(Channel *c, PyObject *unused)
{
    if (c->owner != PyThread_get_thread_ident()) {
        PyErr_SetString(PyExc_RuntimeError, "the channel is not held by this thread");
        return NULL;
    }
    channel_give(c);
    Py_RETURN_NONE;
}

static PyObject *
channel_close(Channel *c, PyObject *unused)
{
    c->closed = 1;
    Py_CLEAR(c->keep);                     /* the memory may go now: nothing here touches it any more */
    Py_RETURN_NONE;
}

static PyMethodDef channel_methods[] = {
    {"ctx_call", (PyCFunction)(void (*)(void))channel_ctx_call, METH_FASTCALL,
     "ctx_call(ctx, skip) -> raw result (also in ctx), or None: the syscall ctx holds, unless its number is in skip"},
    {"acquire", (PyCFunction)channel_acquire, METH_NOARGS,
     "acquire(): take the slot for one request (waits; interruptible; RuntimeError if this thread holds it)"},
    {"release", (PyCFunction)channel_release, METH_NOARGS, "release()"},
    {"close", (PyCFunction)channel_close, METH_NOARGS, "close(): every later call returns None"},
    {NULL, NULL, 0, NULL},
};

static PyMemberDef channel_members[] = {
    {"spin", T_LONG, offsetof(Channel, spin), 0, "spin budget before sleeping"},
    {"check_at", T_LONGLONG, offsetof(Channel, check_at), 0,
     "CLOCK_MONOTONIC ns from which calls return None (the Python path checks what it must first)"},
    {"closed", T_INT, offsetof(Channel, closed), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject ChannelType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pvmexec._core.Channel",
    .tp_doc = "Channel(slot, counter, alive, pidfd, spin, pid, failed, keep): an agent's slot. "
              "channel(nr, *args) -> raw result, or None (take the Python path)",
    .tp_basicsize = sizeof(Channel),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)channel_init,
    .tp_dealloc = (destructor)channel_dealloc,
    .tp_traverse = (traverseproc)channel_traverse,
    .tp_clear = (inquiry)channel_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Channel, vectorcall),
    .tp_methods = channel_methods,
    .tp_members = channel_members,
};

/* -- Runner: mode 1 on a stub thread (a stub space's, or the agent's helper's) ------------------------- */


static void
slot_set(PyObject *o, Py_ssize_t off, PyObject *v)         /* steals v */
{
    Py_XSETREF(SLOT_AT(o, off), v);
}

static int
slot_offset(PyTypeObject *t, const char *name, Py_ssize_t *off)
{
    PyObject *d = PyDict_GetItemString(t->tp_dict, name);     /* borrowed */
    if (!d || !Py_IS_TYPE(d, &PyMemberDescr_Type) ||
        ((PyMemberDescrObject *)d)->d_member->type != T_OBJECT_EX) {
        PyErr_Format(PyExc_TypeError, "%s has no __slots__ entry %s", t->tp_name, name);
        return -1;
    }
    *off = ((PyMemberDescrObject *)d)->d_member->offset;
    return 0;
}

PyObject *
py_entry_setup(PyObject *self, PyObject *args)
{
    PyTypeObject *ct, *st;
    PyObject *sys, *sig;
    Py_ssize_t nr, a[6], ret;
    if (!PyArg_ParseTuple(args, "O!O!OOn(nnnnnn)n", &PyType_Type, &ct, &PyType_Type, &st, &sys, &sig, &nr, &a[0],
                          &a[1], &a[2], &a[3], &a[4], &a[5], &ret))
        return NULL;
    for (int i = 0; i < 6; i++)
        if (a[i] < 0 || a[i] >= PVM_X86_64_NREGS)
            nr = -1;
    if (nr < 0 || nr >= PVM_X86_64_NREGS || ret < 0 || ret >= PVM_X86_64_NREGS) {
        PyErr_SetString(PyExc_ValueError, "entry_setup: no such register index");
        return NULL;
    }
    if (slot_offset(ct, "_buf", &ctx_buf) < 0 || slot_offset(ct, "fpstate", &ctx_fp) < 0 || slot_offset(st, "ctx", &stop_ctx) < 0 ||
        slot_offset(st, "_info", &stop_info) < 0 || slot_offset(st, "_fields", &stop_fields) < 0 ||
        slot_offset(st, "reason", &stop_reason) < 0)
        return NULL;
    Py_XSETREF(ctx_type, (PyTypeObject *)Py_NewRef(ct));
    Py_XSETREF(stop_type, (PyTypeObject *)Py_NewRef(st));
    Py_XSETREF(reason_syscall, Py_NewRef(sys));
    Py_XSETREF(reason_signal, Py_NewRef(sig));
    sys_nr = nr;
    memcpy(sys_args, a, sizeof sys_args);
    sys_ret = ret;
    Py_RETURN_NONE;
}

/* -- Register: one register of a SigContext, as an attribute (a property in C: a third of its cost) ----- */

typedef struct {
    PyObject_HEAD
    Py_ssize_t index;
} Register;

static uint64_t *
register_word(Register *d, PyObject *obj)
{
    if (!ctx_type || !PyObject_TypeCheck(obj, ctx_type)) {
        PyErr_Format(PyExc_TypeError, "a register of a SigContext, not of %.100s", Py_TYPE(obj)->tp_name);
        return NULL;
    }
    PyObject *buf = SLOT_AT(obj, ctx_buf);
    if (!buf || !PyByteArray_CheckExact(buf) || PyByteArray_GET_SIZE(buf) != PVM_X86_64_NREGS * 8) {
        PyErr_SetString(PyExc_ValueError, "SigContext without its register block");
        return NULL;
    }
    return (uint64_t *)PyByteArray_AS_STRING(buf) + d->index;
}

static PyObject *
register_get(Register *d, PyObject *obj, PyObject *type)
{
    if (!obj)
        return Py_NewRef(d);
    uint64_t *w = register_word(d, obj);
    return w ? PyLong_FromUnsignedLongLong(*w) : NULL;
}

static int
register_set(Register *d, PyObject *obj, PyObject *value)
{
    if (!value) {
        PyErr_SetString(PyExc_AttributeError, "a register cannot be deleted");
        return -1;
    }
    if (!PyLong_Check(value)) {
        PyErr_Format(PyExc_TypeError, "a register holds an int, not %.100s", Py_TYPE(value)->tp_name);
        return -1;
    }
    uint64_t *w = register_word(d, obj);
    if (!w)
        return -1;
    unsigned long long v = PyLong_AsUnsignedLongLongMask(value);       /* value & (2**64 - 1) */
    if (v == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    *w = v;
    return 0;
}

static int
register_init(Register *d, PyObject *args, PyObject *kw)
{
    if (!PyArg_ParseTuple(args, "n", &d->index))
        return -1;
    if (d->index < 0 || d->index >= PVM_X86_64_NREGS) {
        PyErr_SetString(PyExc_ValueError, "no such register index");
        return -1;
    }
    return 0;
}

static PyTypeObject RegisterType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pvmexec._core.Register",
    .tp_doc = "Register(index): the register at index of a SigContext's block, as an attribute",
    .tp_basicsize = sizeof(Register),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)register_init,
    .tp_descr_get = (descrgetfunc)register_get,
    .tp_descr_set = (descrsetfunc)register_set,
};

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    uint64_t block;
    uint32_t *counter;
    int pidfd;
    long spin;
    PyObject *acquire, *release;           /* the guest thread's lock (threading.Lock), shared with Python */
    PyObject *sites;                       /* the engine's sites seen (one dict, kept in place) -> index or None */
    PyObject *patch;                       /* patch(address, nr) for a site not seen yet, or None */
    PyObject *failed;
    PyObject *keep;
    int closed;
} Runner;

/* A new Stop for the fields stub_run returned (a reference to them is taken). */
static PyObject *
make_stop(PyObject *fields, PyObject *reason)
{
    PyObject *regs = PyTuple_GET_ITEM(fields, 7), *fp = PyTuple_GET_ITEM(fields, 8);
    PyObject *ctx = ctx_type->tp_alloc(ctx_type, 0);
    PyObject *stop = ctx ? stop_type->tp_alloc(stop_type, 0) : NULL;
    if (!stop) {
        Py_XDECREF(ctx);
        return NULL;
    }
    slot_set(ctx, ctx_buf, Py_NewRef(regs));
    slot_set(ctx, ctx_fp, Py_NewRef(fp));
    slot_set(stop, stop_ctx, ctx);
    slot_set(stop, stop_info, Py_NewRef(Py_None));
    slot_set(stop, stop_fields, Py_NewRef(fields));
    slot_set(stop, stop_reason, Py_NewRef(reason));
    return stop;
}

/*
 * One run of ctx (see the top): the stop's fields tuple (stub_run's), Py_None for the Python path, or NULL.
 * After it, patching a new syscall site and delivering a signal outside mask are done as Python's path does.
 */
static PyObject *
runner_run(Runner *r, PyObject *ctx, PyObject *mask)
{
    if (r->closed || !ctx_type || !Py_IS_TYPE(ctx, ctx_type) || !PyFrozenSet_CheckExact(mask))
        Py_RETURN_NONE;
    PyObject *buf = SLOT_AT(ctx, ctx_buf), *fp = SLOT_AT(ctx, ctx_fp);
    if (!buf || !PyByteArray_CheckExact(buf) || PyByteArray_GET_SIZE(buf) != PVM_X86_64_NREGS * 8 || !fp ||
        (fp != Py_None && (!PyBytes_CheckExact(fp) || PyBytes_GET_SIZE(fp) < 512 ||
                           PyBytes_GET_SIZE(fp) > PVM_STUB_FP_MAX)))
        Py_RETURN_NONE;
    PyObject *no = Py_False;
    PyObject *got = PyObject_Vectorcall(r->acquire, &no, 1, NULL);
    if (!got)
        return NULL;
    Py_DECREF(got);
    if (got != Py_True)
        Py_RETURN_NONE;                    /* busy, or being patched: the Python path waits or says why */
    struct stub_run a = {r->block, r->counter, NULL, r->pidfd, 0, r->spin,
                         (const uint64_t *)PyByteArray_AS_STRING(buf),
                         fp == Py_None ? NULL : PyBytes_AS_STRING(fp), fp == Py_None ? 0 : PyBytes_GET_SIZE(fp),
                         fp != Py_None, NULL, 0, 0};
    PyObject *fields = stub_run(&a);
    if (!fields)
        fields = call_failed(r->failed);   /* (under the thread's lock, as the Python path) */
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);       /* (the failure's, kept across the release) */
    PyObject *rel = PyObject_CallNoArgs(r->release);
    if (!rel) {
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        Py_XDECREF(fields);
        return NULL;
    }
    Py_DECREF(rel);
    PyErr_Restore(type, value, tb);
    if (!fields || fields == Py_None)
        return fields;                     /* an error; or refused registers, or nothing ran: Python's path */
    PyObject *signo_o = PyTuple_GET_ITEM(fields, 0);
    int signo = (int)PyLong_AsLong(signo_o);
    if (signo == SIGSYS && PyLong_AsLong(PyTuple_GET_ITEM(fields, 1)) == 1) {      /* SYS_SECCOMP */
        if (r->patch == Py_None)
            return fields;
        const uint64_t *regs = (const uint64_t *)PyByteArray_AS_STRING(PyTuple_GET_ITEM(fields, 7));
        PyObject *rip = PyLong_FromUnsignedLongLong(regs[16]);
        int seen = rip ? PyDict_Contains(r->sites, rip) : -1;
        PyObject *done = NULL;
        if (seen == 0)
            done = PyObject_CallFunctionObjArgs(r->patch, rip, PyTuple_GET_ITEM(fields, 4), NULL);
        Py_XDECREF(rip);
        if (seen < 0 || (seen == 0 && !done)) {
            Py_DECREF(fields);
            return NULL;
        }
        Py_XDECREF(done);
        return fields;
    }
    int masked = PySet_Contains(mask, signo_o);
    if (masked < 0) {
        Py_DECREF(fields);
        return NULL;
    }
    if (!masked) {
        /* Delivered to the calling thread, as the proposal says (signal.pthread_kill's way) */
        int err = pthread_kill(pthread_self(), signo);
        if (err) {
            errno = err;
            Py_DECREF(fields);
            return raise_host("pthread_kill");
        }
        if (PyErr_CheckSignals() < 0) {
            Py_DECREF(fields);
            return NULL;
        }
    }
    return fields;
}

/* runner(ctx, sigmask) -> a new Stop, or None */
static PyObject *
runner_vcall(PyObject *self, PyObject *const *args, size_t nargsf, PyObject *kwnames)
{
    if (kwnames || PyVectorcall_NARGS(nargsf) != 2)
        Py_RETURN_NONE;
    PyObject *fields = runner_run((Runner *)self, args[0], args[1]);
    if (!fields || fields == Py_None)
        return fields;
    int signo = (int)PyLong_AsLong(PyTuple_GET_ITEM(fields, 0));
    int syscall_stop = signo == SIGSYS && PyLong_AsLong(PyTuple_GET_ITEM(fields, 1)) == 1;
    PyObject *stop = make_stop(fields, syscall_stop ? reason_syscall : reason_signal);
    Py_DECREF(fields);
    return stop;
}

/*
 * runner.into(ctx, sigmask) -> the stop's fields, or None: the proposal's way, ctx itself updated (its
 * registers, and its fpstate if it has one), no Stop made.
 */
static PyObject *
runner_into(Runner *r, PyObject *const *args, Py_ssize_t n)
{
    if (n != 2)
        Py_RETURN_NONE;
    PyObject *ctx = args[0];
    int want_fp = Py_IS_TYPE(ctx, ctx_type) && SLOT_AT(ctx, ctx_fp) && SLOT_AT(ctx, ctx_fp) != Py_None;
    PyObject *fields = runner_run(r, ctx, args[1]);
    if (!fields || fields == Py_None)
        return fields;
    PyObject *buf = SLOT_AT(ctx, ctx_buf);          /* (again: another thread may have changed ctx meanwhile) */
    if (buf && PyByteArray_CheckExact(buf) && PyByteArray_GET_SIZE(buf) == PVM_X86_64_NREGS * 8)
        memcpy(PyByteArray_AS_STRING(buf), PyByteArray_AS_STRING(PyTuple_GET_ITEM(fields, 7)), PVM_X86_64_NREGS * 8);
    if (want_fp)
        slot_set(ctx, ctx_fp, Py_NewRef(PyTuple_GET_ITEM(fields, 8)));
    return fields;
}

static int
runner_init(Runner *r, PyObject *args, PyObject *kw)
{
    static char *names[] = {"block", "counter", "pidfd", "spin", "lock", "sites", "failed", "keep", NULL};
    unsigned long long block, counter;
    PyObject *lock, *sites, *failed, *keep;
    if (r->acquire)
        return 0;
    if (!PyArg_ParseTupleAndKeywords(args, kw, "KKilOO!OO", names, &block, &counter, &r->pidfd, &r->spin, &lock,
                                     &PyDict_Type, &sites, &failed, &keep))
        return -1;
    r->acquire = PyObject_GetAttrString(lock, "acquire");
    r->release = r->acquire ? PyObject_GetAttrString(lock, "release") : NULL;
    if (!r->release)
        return -1;
    r->block = block;
    r->counter = COUNTER(counter);
    r->sites = Py_NewRef(sites);
    r->patch = Py_NewRef(Py_None);
    r->failed = Py_NewRef(failed);
    r->keep = Py_NewRef(keep);
    r->vectorcall = runner_vcall;
    return 0;
}

static int
runner_traverse(Runner *r, visitproc visit, void *arg)
{
    Py_VISIT(r->acquire);
    Py_VISIT(r->release);
    Py_VISIT(r->sites);
    Py_VISIT(r->patch);
    Py_VISIT(r->failed);
    Py_VISIT(r->keep);
    return 0;
}

static int
runner_clear(Runner *r)
{
    Py_CLEAR(r->acquire);
    Py_CLEAR(r->release);
    Py_CLEAR(r->sites);
    Py_CLEAR(r->patch);
    Py_CLEAR(r->failed);
    Py_CLEAR(r->keep);
    r->closed = 1;
    return 0;
}

static void
runner_dealloc(Runner *r)
{
    PyObject_GC_UnTrack(r);
    runner_clear(r);
    Py_TYPE(r)->tp_free((PyObject *)r);
}

static PyObject *
runner_close(Runner *r, PyObject *unused)
{
    r->closed = 1;
    Py_CLEAR(r->keep);                     /* (as Channel.close) */
    Py_RETURN_NONE;
}

static PyMethodDef runner_methods[] = {
    {"into", (PyCFunction)(void (*)(void))runner_into, METH_FASTCALL,
     "into(ctx, sigmask) -> the stop's fields, or None: ctx updated in place (process_vm_exec's way)"},
    {"close", (PyCFunction)runner_close, METH_NOARGS, "close(): every later call returns None"},
    {NULL, NULL, 0, NULL},
};

static int
runner_set_patch(Runner *r, PyObject *v, void *closure)
{
    if (!v || (v != Py_None && !PyCallable_Check(v))) {
        PyErr_SetString(PyExc_TypeError, "patch must be callable or None");
        return -1;
    }
    Py_XSETREF(r->patch, Py_NewRef(v));
    return 0;
}

static PyObject *runner_get_patch(Runner *r, void *closure) { return Py_NewRef(r->patch ? r->patch : Py_None); }

static PyGetSetDef runner_getset[] = {
    {"patch", (getter)runner_get_patch, (setter)runner_set_patch, "patch(address, nr) for a new site, or None",
     NULL},
    {NULL, NULL, NULL, NULL, NULL},
};

static PyMemberDef runner_members[] = {
    {"closed", T_INT, offsetof(Runner, closed), READONLY, NULL},
    {NULL, 0, 0, 0, NULL},
};

static PyTypeObject RunnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "pvmexec._core.Runner",
    .tp_doc = "Runner(block, counter, pidfd, spin, lock, sites, failed, keep): a stub thread. "
              "runner(ctx, sigmask) -> Stop, or None (take the Python path)",
    .tp_basicsize = sizeof(Runner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)runner_init,
    .tp_dealloc = (destructor)runner_dealloc,
    .tp_traverse = (traverseproc)runner_traverse,
    .tp_clear = (inquiry)runner_clear,
    .tp_call = PyVectorcall_Call,
    .tp_vectorcall_offset = offsetof(Runner, vectorcall),
    .tp_methods = runner_methods,
    .tp_members = runner_members,
    .tp_getset = runner_getset,
};

int
entry_add_types(PyObject *m)
{
    if (PyType_Ready(&ChannelType) < 0 || PyType_Ready(&RunnerType) < 0 || PyType_Ready(&RegisterType) < 0)
        return -1;
    if (PyModule_AddObjectRef(m, "Channel", (PyObject *)&ChannelType) < 0 ||
        PyModule_AddObjectRef(m, "Register", (PyObject *)&RegisterType) < 0 ||
        PyModule_AddObjectRef(m, "Runner", (PyObject *)&RunnerType) < 0)
        return -1;
    return 0;
}
