/*
 * Starting stub processes: a vfork-like clone, optionally into new user and
 * pid namespaces (so that nothing a guest does in the stub names a host pid),
 * then execveat of the stub program, waited for (a close-on-exec pipe says
 * it happened, or why not). Between clone and exec the child runs only
 * async-signal-safe calls: this process has other threads.
 */
#include "core.h"
#include <pthread.h>
#include <sys/mman.h>
#include <sys/personality.h>
#include <sys/prctl.h>

#ifndef PIDFD_THREAD
#define PIDFD_THREAD O_EXCL
#endif
#ifndef __NR_pidfd_open
#define __NR_pidfd_open 434
#endif

#ifndef __NR_clone3
#define __NR_clone3 435
#endif

/* struct clone_args up to set_tid_size (CLONE_ARGS_SIZE_VER1): this machine's headers may predate it. */
struct spawn_clone_args {
    uint64_t flags, pidfd, child_tid, parent_tid, exit_signal, stack, stack_size, tls, set_tid, set_tid_size;
};

#define SPAWN_MAX_ARGS 8
#define SPAWN_MAX_KEEP 8

static void __attribute__((noreturn))
fail(int report, int err)
{
    (void)!write(report, &err, sizeof err);
    _exit(127);
}

static void __attribute__((noreturn))
child(int exe, char **argv, const int *keep, int nkeep, int parent, int no_randomize, int report)
{
    sigset_t none;
    sigemptyset(&none);
    struct sigaction dfl;
    memset(&dfl, 0, sizeof dfl);
    dfl.sa_handler = SIG_DFL;
    for (int sig = 1; sig < NSIG; sig++)        /* nothing ignored or caught carries over, as subprocess does */
        if (sig != SIGKILL && sig != SIGSTOP)
            sigaction(sig, &dfl, NULL);
    sigprocmask(SIG_SETMASK, &none, NULL);
    /* Die with the thread that made us; had it died already, the death signal was never armed. */
    if (prctl(PR_SET_PDEATHSIG, SIGKILL, 0, 0, 0) < 0)
        fail(report, errno);
    struct pollfd gone = {parent, POLLIN, 0};
    if (poll(&gone, 1, 0) != 0)
        fail(report, ESRCH);
    close(parent);
    setpgid(0, 0);                              /* out of the terminal's foreground group */
    if (no_randomize)
        personality((unsigned long)personality(0xffffffff) | ADDR_NO_RANDOMIZE);
    for (int i = 0; i < nkeep; i++)
        if (fcntl(keep[i], F_SETFD, 0) < 0)
            fail(report, errno);
    char *envp[] = {NULL};
    syscall(__NR_execveat, exe, "", argv, envp, AT_EMPTY_PATH);
    fail(report, errno);
}

struct child_args {
    int exe;
    char **argv;
    const int *keep;
    int nkeep, parent, no_randomize, report;
};

static int
child_entry(void *arg)
{
    const struct child_args *a = arg;
    child(a->exe, a->argv, a->keep, a->nkeep, a->parent, a->no_randomize, a->report);
}

#define CHILD_STACK (64 * 1024)

/* spawn_stub(exe_fd, argv: [bytes], keep: (fd, ...), clone_flags, no_randomize, pid=0, pidns=-1) -> pid
 * pid > 0: the child gets that pid (clone3's set_tid: it must be free, and choosing needs
 * CAP_CHECKPOINT_RESTORE or CAP_SYS_ADMIN), as a restored process needs its own; in the pid
 * namespace pidns (an fd of /proc/PID/ns/pid) if given, which this thread enters for the clone
 * only. Returns the child's pid as we see it. */
PyObject *
py_spawn_stub(PyObject *self, PyObject *args)
{
    int exe, no_randomize, want_pid = 0, pidns = -1;
    PyObject *argv_obj, *keep_obj;
    unsigned long flags;
    if (!PyArg_ParseTuple(args, "iO!O!kp|ii", &exe, &PyList_Type, &argv_obj, &PyTuple_Type, &keep_obj, &flags,
                          &no_randomize, &want_pid, &pidns))
        return NULL;
    Py_ssize_t nargs = PyList_GET_SIZE(argv_obj), nkeep = PyTuple_GET_SIZE(keep_obj);
    if (nargs < 1 || nargs > SPAWN_MAX_ARGS || nkeep > SPAWN_MAX_KEEP) {
        PyErr_SetString(PyExc_ValueError, "spawn_stub: 1-8 arguments and at most 8 descriptors");
        return NULL;
    }
    if (flags & (CLONE_VM | CLONE_THREAD | CLONE_SIGHAND | CLONE_FILES | 0xff)) {
        PyErr_SetString(PyExc_ValueError, "spawn_stub: only namespace flags");
        return NULL;
    }
    char *argv[SPAWN_MAX_ARGS + 1];
    int keep[SPAWN_MAX_KEEP];
    for (Py_ssize_t i = 0; i < nargs; i++)
        if (!(argv[i] = PyBytes_AsString(PyList_GET_ITEM(argv_obj, i))))
            return NULL;
    argv[nargs] = NULL;
    for (Py_ssize_t i = 0; i < nkeep; i++) {
        keep[i] = (int)PyLong_AsLong(PyTuple_GET_ITEM(keep_obj, i));
        if (keep[i] == -1 && PyErr_Occurred())
            return NULL;
    }
    int parent = (int)syscall(__NR_pidfd_open, (pid_t)syscall(SYS_gettid), PIDFD_THREAD);
    if (parent < 0)
        return raise_host("pidfd_open");
    int report[2];                              /* close-on-exec: EOF once the exec has happened */
    if (pipe2(report, O_CLOEXEC) < 0) {
        close(parent);
        return raise_host("pipe2");
    }
    long pid;
    int own_ns = -1;
    if (pidns >= 0) {                           /* children of this thread go there, for this clone */
        own_ns = open("/proc/self/ns/pid", O_RDONLY | O_CLOEXEC);
        if (own_ns < 0 || setns(pidns, CLONE_NEWPID) < 0) {
            int saved_ns = errno;
            if (own_ns >= 0)
                close(own_ns);
            close(parent);
            close(report[0]);
            close(report[1]);
            errno = saved_ns;
            return raise_host(own_ns < 0 ? "open(/proc/self/ns/pid)" : "setns(CLONE_NEWPID)");
        }
    }
    if (want_pid > 0) {
        pid_t tids[1] = {want_pid};
        struct spawn_clone_args ca = {.flags = flags, .exit_signal = SIGCHLD, .set_tid = (uint64_t)(uintptr_t)tids,
                                      .set_tid_size = 1};
        pid = syscall(__NR_clone3, &ca, sizeof ca);
        if (pid == 0)
            child(exe, argv, keep, (int)nkeep, parent, no_randomize, report[1]);
    } else {
        /*
         * vfork-like (as posix_spawn): the child borrows our memory until its exec, so nothing of this
         * process is copied (a fork copied its page tables and write-protected every page it had, each
         * then faulted back by our threads) and we wait without the GIL. Every signal stays blocked
         * until the child has reset its handlers: none of ours may run on its stack.
         */
        struct child_args ca = {exe, argv, keep, (int)nkeep, parent, no_randomize, report[1]};
        void *stack = mmap(NULL, CHILD_STACK, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_STACK, -1, 0);
        if (stack == MAP_FAILED) {
            pid = -1;
        } else {
            sigset_t all, old;
            sigfillset(&all);
            pthread_sigmask(SIG_SETMASK, &all, &old);
            Py_BEGIN_ALLOW_THREADS
            pid = clone(child_entry, (char *)stack + CHILD_STACK, (int)flags | CLONE_VM | CLONE_VFORK | SIGCHLD, &ca);
            Py_END_ALLOW_THREADS
            int clone_errno = errno;
            pthread_sigmask(SIG_SETMASK, &old, NULL);
            munmap(stack, CHILD_STACK);
            errno = clone_errno;
        }
    }
    int saved = errno;
    if (own_ns >= 0) {                          /* back: our own active namespace may always be entered */
        (void)setns(own_ns, CLONE_NEWPID);
        close(own_ns);
    }
    close(parent);
    close(report[1]);
    if (pid < 0) {
        close(report[0]);
        errno = saved;
        return raise_host(want_pid > 0 ? "clone3" : "clone");
    }
    /* Only an exec'd stub is returned: before its exec the child is a copy of this process (its
     * maps, its memory), nothing to attach to or read. */
    int err = 0;
    ssize_t got;
    Py_BEGIN_ALLOW_THREADS
    do
        got = read(report[0], &err, sizeof err);
    while (got < 0 && errno == EINTR);
    Py_END_ALLOW_THREADS
    close(report[0]);
    if (got != 0) {
        int status;
        while (waitpid((pid_t)pid, &status, 0) < 0 && errno == EINTR)
            ;
        errno = got == (ssize_t)sizeof err ? err : EIO;
        return raise_host("execveat");
    }
    return PyLong_FromLong(pid);
}
