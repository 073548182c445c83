/* Another process's memory (process_vm_readv/writev), its descriptors (pidfd_getfd), and futex waits on shared words. */
#include "core.h"

/*
 * Many ranges of another process's memory in one process_vm_readv per 1024:
 * vm_read_ranges(pid, ranges: array of u64 (start, length) pairs) -> bytes.
 * Stops at the first range that cannot be read whole (the result is then
 * shorter: the caller sees how far it got).
 */
/* How many of the iovecs, from the first, lie whole within the first `got` bytes. */
static int
whole_iovecs(const struct iovec *v, int k, ssize_t got)
{
    ssize_t whole = 0;
    int j = 0;
    while (j < k && whole + (ssize_t)v[j].iov_len <= got)
        whole += (ssize_t)v[j++].iov_len;
    return j;
}

#define COPY_BUFFER (4 << 20)

/*
 * vm_copy_ranges(src_pid, dst_pid, ranges: u64 (start, length) pairs[, dst_mem_fd]) -> how many ranges, from
 * the first, were copied whole from src to the same addresses in dst: one process_vm_readv and one
 * process_vm_writev per 4 MiB (a fork's pages, without a Python call per range); with dst_mem_fd (dst's
 * /proc/PID/mem) a pwrite per range instead, which writes whatever the pages' protection. The caller copies
 * the rest its own way (a range it stopped at may be unreadable here, or larger than the buffer).
 */
PyObject *
py_vm_copy_ranges(PyObject *self, PyObject *args)
{
    int src, dst, mem_fd = -1;
    Py_buffer ranges;
    if (!PyArg_ParseTuple(args, "iiy*|i", &src, &dst, &ranges, &mem_fd))
        return NULL;
    const uint64_t *r = ranges.buf;
    Py_ssize_t n = ranges.len / 16, i = 0;
    char *buf = malloc(COPY_BUFFER);
    if (!buf) {
        PyBuffer_Release(&ranges);
        return PyErr_NoMemory();
    }
    struct iovec remote[1024];
    Py_BEGIN_ALLOW_THREADS
    while (i < n) {
        int k = 0;
        size_t want = 0;
        for (; k < 1024 && i + k < n && want + r[2 * (i + k) + 1] <= COPY_BUFFER; k++) {
            remote[k].iov_base = (void *)(uintptr_t)r[2 * (i + k)];
            remote[k].iov_len = (size_t)r[2 * (i + k) + 1];
            want += remote[k].iov_len;
        }
        if (!k)
            break;
        struct iovec local = {buf, want};
        ssize_t got = process_vm_readv(src, &local, 1, remote, (unsigned long)k, 0);
        if (got < 0 && errno == EINTR)
            continue;
        int j = got > 0 ? whole_iovecs(remote, k, got) : 0;
        if (!j)
            break;
        local.iov_len = 0;
        for (int m = 0; m < j; m++)
            local.iov_len += remote[m].iov_len;
        int jj = 0;
        if (mem_fd >= 0) {
            char *from = buf;
            for (; jj < j; jj++) {
                size_t left = remote[jj].iov_len;
                off_t at = (off_t)(uintptr_t)remote[jj].iov_base;
                while (left) {
                    ssize_t w = pwrite(mem_fd, from, left, at);
                    if (w < 0 && errno == EINTR)
                        continue;
                    if (w <= 0)
                        break;
                    from += w;
                    at += w;
                    left -= (size_t)w;
                }
                if (left)
                    break;
            }
        } else {
            ssize_t put;
            do
                put = process_vm_writev(dst, &local, 1, remote, (unsigned long)j, 0);
            while (put < 0 && errno == EINTR);
            jj = put > 0 ? whole_iovecs(remote, j, put) : 0;
        }
        i += jj;
        if (jj < k)
            break;
    }
    Py_END_ALLOW_THREADS
    free(buf);
    PyBuffer_Release(&ranges);
    return PyLong_FromSsize_t(i);
}

PyObject *
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
        int j = whole_iovecs(remote, k, got);
        for (int m = 0; m < j; m++)
            done += (Py_ssize_t)remote[m].iov_len;
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

PyObject *
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
 * Move n bytes between our p and the target's addr, all of them or -1 with
 * errno (EFAULT for a move that stops short). The GIL is released: p is ours.
 */
static int
vm_move(int pid, char *p, Py_ssize_t n, unsigned long long addr, int write)
{
    Py_ssize_t done = 0;
    ssize_t r = 0;
    Py_BEGIN_ALLOW_THREADS
    while (done < n) {
        struct iovec local = {p + done, (size_t)(n - done)};
        struct iovec remote = {(void *)(uintptr_t)(addr + (unsigned long long)done), (size_t)(n - done)};
        r = write ? process_vm_writev(pid, &local, 1, &remote, 1, 0) : process_vm_readv(pid, &local, 1, &remote, 1, 0);
        if (r < 0 && errno == EINTR)
            continue;
        if (r <= 0) {
            if (r == 0)
                errno = EFAULT;
            break;
        }
        done += r;
    }
    Py_END_ALLOW_THREADS
    return done == n ? 0 : -1;
}

PyObject *
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
    if (vm_move(pid, PyBytes_AS_STRING(out), n, addr, 0) < 0) {
        Py_DECREF(out);
        return raise_call("process_vm_readv", pid);
    }
    return out;
}

PyObject *
py_vm_write(PyObject *self, PyObject *args)
{
    int pid;
    unsigned long long addr;
    Py_buffer buf;
    if (!PyArg_ParseTuple(args, "iKy*", &pid, &addr, &buf))
        return NULL;
    int r = vm_move(pid, (char *)buf.buf, buf.len, addr, 1);
    PyBuffer_Release(&buf);
    if (r < 0)
        return raise_call("process_vm_writev", pid);
    Py_RETURN_NONE;
}

PyObject *
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
