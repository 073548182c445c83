/* Host file calls for the sandbox kernel (kernel/files.Policy): raw kernel structures, OSError(errno, call). */
#include "core.h"

struct pvm_open_how {
    uint64_t flags, mode, resolve;
};

PyObject *
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
    fd = syscall(__NR_openat2, dirfd, path, &how, sizeof how);
    Py_END_ALLOW_THREADS
    if (fd < 0)
        return raise_host("openat2");
    return PyLong_FromLong(fd);
}

PyObject *
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

PyObject *
py_statx_raw(PyObject *self, PyObject *args)
{
    int dirfd, flags;
    unsigned int mask;
    const char *path;
    if (!PyArg_ParseTuple(args, "iyiI", &dirfd, &path, &flags, &mask))
        return NULL;
    unsigned char buf[256] = {0};
    if (syscall(__NR_statx, dirfd, path, flags, mask, buf) < 0)
        return raise_host("statx");
    return PyBytes_FromStringAndSize((const char *)buf, sizeof buf);
}

PyObject *
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

/* Whether a FIFO's read end (opened O_NONBLOCK) has a writer. tee() of an empty pipe answers 0 when
 * it has none and EAGAIN when it has one; with data in it, it copies without consuming. */
PyObject *
py_fifo_has_writer(PyObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    int scratch[2];
    if (pipe2(scratch, O_CLOEXEC | O_NONBLOCK) < 0)
        return raise_host("pipe2");
    ssize_t n = tee(fd, scratch[1], 1, SPLICE_F_NONBLOCK);
    int err = errno;
    close(scratch[0]);
    close(scratch[1]);
    if (n < 0 && err != EAGAIN) {
        errno = err;
        return raise_host("tee");
    }
    return PyBool_FromLong(n != 0);
}

/* pipe_peek(fd) -> bytes: what waits in the pipe whose read end is fd, copied (tee) and left there. */
PyObject *
py_pipe_peek(PyObject *self, PyObject *args)
{
    int fd;
    if (!PyArg_ParseTuple(args, "i", &fd))
        return NULL;
    int size = fcntl(fd, F_GETPIPE_SZ);
    if (size < 0)
        return raise_host("fcntl(F_GETPIPE_SZ)");
    int scratch[2];
    if (pipe2(scratch, O_CLOEXEC | O_NONBLOCK) < 0)
        return raise_host("pipe2");
    PyObject *out = NULL;
    if (fcntl(scratch[1], F_SETPIPE_SZ, size) < size) {     /* room for all of it */
        raise_host("fcntl(F_SETPIPE_SZ)");
        goto done;
    }
    ssize_t n = tee(fd, scratch[1], (size_t)size, SPLICE_F_NONBLOCK);
    if (n < 0 && errno != EAGAIN) {                         /* EAGAIN: empty */
        raise_host("tee");
        goto done;
    }
    if (n < 0)
        n = 0;
    out = PyBytes_FromStringAndSize(NULL, n);
    if (out == NULL)
        goto done;
    for (ssize_t got = 0; got < n;) {
        ssize_t r = read(scratch[0], PyBytes_AS_STRING(out) + got, (size_t)(n - got));
        if (r <= 0) {
            Py_CLEAR(out);
            if (r == 0)
                errno = EIO;
            raise_host("read");
            goto done;
        }
        got += r;
    }
done:
    close(scratch[0]);
    close(scratch[1]);
    return out;
}
