/*
 * pvmexec._core: the module (method table and initialisation). The calls live
 * in the other files of this folder, one concern each (see core.h).
 */
#include "core.h"

struct pvm_symbol {
    const char *name;
    unsigned long offset;
};
#include "guest_blob.h"
#include "agent_blob.h"
#include "helper_blob.h"
#include "stub_elf.h"

static PyMethodDef methods[] = {
    {"ptrace", py_ptrace, METH_VARARGS, "ptrace(request, tid, addr=0, data=0, name='ptrace')"},
    {"wait", py_wait, METH_VARARGS, "wait(tid, reap, interruptible, timeout=-1) -> (si_code, si_status) or None"},
    {"getregs", py_getregs, METH_VARARGS, "getregs(tid) -> bytes"},
    {"setregs", py_setregs, METH_VARARGS, "setregs(tid, regs)"},
    {"getregset", py_getregset, METH_VARARGS, "getregset(tid, note_type) -> bytes"},
    {"setregset", py_setregset, METH_VARARGS, "setregset(tid, note_type, data)"},
    {"getsigmask", py_getsigmask, METH_VARARGS, "getsigmask(tid) -> int"},
    {"setsigmask", py_setsigmask, METH_VARARGS, "setsigmask(tid, mask)"},
    {"getsiginfo", py_getsiginfo, METH_VARARGS, "getsiginfo(tid) -> bytes"},
    {"peeksiginfo", py_peeksiginfo, METH_VARARGS, "peeksiginfo(tid, shared, nr) -> [bytes]"},
    {"step", py_step, METH_VARARGS, "step(tid, regs: bytearray, request, sig, reap, running: bytearray, mask=None) -> (si_code, si_status)"},
    {"restore", py_restore, METH_VARARGS, "restore(tid, regs, xstate, sigmask, request, sig)"},
    {"loop", py_loop, METH_VARARGS, "loop(tid, kind, regs, n, a0, a1, reap) -> (done, ns, code, status)"},
    {"rseq_config", py_rseq_config, METH_VARARGS, "rseq_config(tid) -> (addr, size, sig) | None"},
    {"xsave_components", py_xsave_components, METH_NOARGS, "xsave_components() -> [(component, size, offset)] (CPUID 0xD)"},
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
    {"fifo_has_writer", py_fifo_has_writer, METH_VARARGS, "fifo_has_writer(fd) -> bool: a FIFO read end (O_NONBLOCK) has a writer"},
    {"pipe_peek", py_pipe_peek, METH_VARARGS, "pipe_peek(fd) -> bytes: what waits in a pipe (read end fd), left in it"},
    {"fstatat_raw", py_fstatat_raw, METH_VARARGS, "fstatat_raw(dirfd, path, flags) -> struct stat bytes"},
    {"statx_raw", py_statx_raw, METH_VARARGS, "statx_raw(dirfd, path, flags, mask) -> struct statx bytes"},
    {"fstatfs_raw", py_fstatfs_raw, METH_VARARGS, "fstatfs_raw(fd) -> struct statfs bytes"},
    {"fault_floor", py_fault_floor, METH_VARARGS, "fault_floor(n) -> ns for n in-process faults caught and returned from"},
    {"syscall_info", py_syscall_info, METH_VARARGS, "syscall_info(tid) -> (op, arch, ip, sp, nr)"},
    {"vm_read", py_vm_read, METH_VARARGS, "vm_read(pid, addr, n) -> bytes"},
    {"vm_copy_ranges", py_vm_copy_ranges, METH_VARARGS, "vm_copy_ranges(src, dst, (start, len) u64 pairs[, dst_mem_fd]) -> ranges copied whole"},
    {"vm_read_ranges", py_vm_read_ranges, METH_VARARGS, "vm_read_ranges(pid, (start, len) u64 pairs) -> bytes of the whole ranges read"},
    {"vm_write", py_vm_write, METH_VARARGS, "vm_write(pid, addr, data)"},
    {"spawn_stub", py_spawn_stub, METH_VARARGS, "spawn_stub(exe_fd, argv: [bytes], keep: (fd, ...), clone_flags, no_randomize) -> pid"},
    {"index_runs", py_index_runs, METH_VARARGS, "index_runs(pages.idx bytes) -> u64 (address, offset, pages) runs, the last pair winning"},
    {"index_plan", py_index_plan, METH_VARARGS, "index_plan(pages.idx bytes, maps (start, end, how), cut pages) -> (now, later) runs"},
    {"pidfd_getfd", py_pidfd_getfd, METH_VARARGS, "pidfd_getfd(pidfd, fd) -> fd"},
    {"guard_setup", py_guard_setup, METH_VARARGS, "guard_setup(main_ident, deferred: list, due): the signal guard's state"},
    {"guard_enter", py_guard_enter, METH_NOARGS, "guard_enter(): an operation starts"},
    {"guard_exit", py_guard_exit, METH_NOARGS, "guard_exit(): it ends (due() runs if it was the last and a signal waits)"},
    {"guard_counts", py_guard_counts, METH_NOARGS, "guard_counts() -> (operations, of them the main thread's)"},
    {"entry_setup", py_entry_setup, METH_VARARGS, "entry_setup(SigContext, Stop, reason_syscall, reason_signal, nr_index, arg_indices, result_index)"},
    {NULL, NULL, 0, NULL},
};

struct export {
    const char *name;
    long long value;
};

#define PVM_EXPORT_VAL(name, value) {name, (long long)(value)},
#define PVM_EXPORT_OFF(name, type, field) {name, (long long)offsetof(type, field)},
#define PVM_EXPORT_SIZE(name, type) {name, (long long)sizeof(type)},

static const struct export layout_exports[] = {
    PVM_LAYOUT_EXPORTS(PVM_EXPORT_VAL, PVM_EXPORT_OFF, PVM_EXPORT_SIZE)
    /* libc's layouts, checked against ours by layout.h's static asserts */
    {"user_regs_struct", sizeof(struct user_regs_struct)},
    {"siginfo", sizeof(siginfo_t)},
    {"si_signo", offsetof(siginfo_t, si_signo)},
    {"si_errno", offsetof(siginfo_t, si_errno)},
    {"si_code", offsetof(siginfo_t, si_code)},
    {"si_pid", offsetof(siginfo_t, si_pid)},
    {"si_uid", offsetof(siginfo_t, si_uid)},
    {"si_addr", offsetof(siginfo_t, si_addr)},
    {"si_call_addr", offsetof(siginfo_t, si_call_addr)},
    {"si_syscall", offsetof(siginfo_t, si_syscall)},
    {"si_arch", offsetof(siginfo_t, si_arch)},
    {"PTRACE_SYSEMU", PTRACE_SYSEMU},
    {"PTRACE_GETSIGMASK", PTRACE_GETSIGMASK},
    {NULL, 0},
};

static int
set_int(PyObject *d, const char *name, long long value)
{
    PyObject *v = PyLong_FromLongLong(value);
    int r = v ? PyDict_SetItemString(d, name, v) : -1;
    Py_XDECREF(v);
    return r;
}

/* LAYOUT: name -> value for each export; a new reference or NULL. */
static PyObject *
layout_dict(void)
{
    PyObject *d = PyDict_New();
    for (const struct export *e = layout_exports; d && e->name; e++)
        if (set_int(d, e->name, e->value) < 0)
            Py_CLEAR(d);
    return d;
}

/* A blob's exported symbols: name -> offset. */
static PyObject *
symbol_dict(const struct pvm_symbol *s)
{
    PyObject *d = PyDict_New();
    for (; d && s->name; s++)
        if (set_int(d, s->name, (long long)s->offset) < 0)
            Py_CLEAR(d);
    return d;
}

static const char *const reg_names[] = {PVM_X86_64_REG_NAMES};
static const long stub_allowed[] = {PVM_STUB_ALLOWED};

static PyObject *reg_name(Py_ssize_t i) { return PyUnicode_FromString(reg_names[i]); }
static PyObject *allowed_nr(Py_ssize_t i) { return PyLong_FromLong(stub_allowed[i]); }

/* A tuple of n items made by item(i); a new reference or NULL. */
static PyObject *
tuple_of(Py_ssize_t n, PyObject *(*item)(Py_ssize_t))
{
    PyObject *t = PyTuple_New(n);
    for (Py_ssize_t i = 0; t && i < n; i++) {
        PyObject *o = item(i);
        if (!o)
            Py_CLEAR(t);
        else
            PyTuple_SET_ITEM(t, i, o);
    }
    return t;
}

/* Add v to m and drop our reference, even on failure (PyModule_Add of 3.13, on older Pythons too). */
static int
add_steal(PyObject *m, const char *name, PyObject *v)
{
    if (!v)
        return -1;
    int r = PyModule_AddObjectRef(m, name, v);
    Py_DECREF(v);
    return r;
}

static int
core_exec(PyObject *m)
{
    PyObject *layout = layout_dict();
    if (!layout)
        return -1;
    PyObject *names = tuple_of(PVM_X86_64_NREGS, reg_name);
    int bad = !names || PyDict_SetItemString(layout, "reg_names", names) < 0;
    Py_XDECREF(names);
    if (bad || add_steal(m, "LAYOUT", layout) < 0
        || entry_add_types(m) < 0
        || add_steal(m, "GUEST_SYMBOLS", symbol_dict(pvm_guest_symbols)) < 0
        || add_steal(m, "AGENT_SYMBOLS", symbol_dict(pvm_agent_symbols)) < 0
        || add_steal(m, "HELPER_SYMBOLS", symbol_dict(pvm_helper_symbols)) < 0
        || add_steal(m, "HELPER_BLOB",
                        PyBytes_FromStringAndSize((const char *)pvm_helper_blob, PVM_HELPER_BLOB_SIZE)) < 0
        || add_steal(m, "STUB_ALLOWED", tuple_of(sizeof stub_allowed / sizeof stub_allowed[0], allowed_nr)) < 0
        || add_steal(m, "STUB_ELF", PyBytes_FromStringAndSize((const char *)pvm_stub_elf, PVM_STUB_ELF_SIZE)) < 0
        || add_steal(m, "AGENT_BLOB",
                        PyBytes_FromStringAndSize((const char *)pvm_agent_blob, PVM_AGENT_BLOB_SIZE)) < 0
        || add_steal(m, "GUEST_BLOB",
                        PyBytes_FromStringAndSize((const char *)pvm_guest_blob, PVM_GUEST_BLOB_SIZE)) < 0) {
        if (bad)
            Py_DECREF(layout);
        return -1;
    }
    return 0;
}

static PyModuleDef_Slot core_slots[] = {
    {Py_mod_exec, core_exec},
#ifdef Py_mod_multiple_interpreters
    {Py_mod_multiple_interpreters, Py_MOD_MULTIPLE_INTERPRETERS_NOT_SUPPORTED},
#endif
#ifdef Py_mod_gil
    {Py_mod_gil, Py_MOD_GIL_USED},     /* fast_answer's scratch buffer relies on the GIL */
#endif
    {0, NULL},
};

static struct PyModuleDef moddef = {
    PyModuleDef_HEAD_INIT,
    .m_name = "pvmexec._core",
    .m_doc = "pvmexec's C core (private)",
    .m_size = 0,
    .m_methods = methods,
    .m_slots = core_slots,
};

PyMODINIT_FUNC
PyInit__core(void)
{
    return PyModuleDef_Init(&moddef);
}
