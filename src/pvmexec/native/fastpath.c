/* The application kernel's answers in C: trivial syscalls served without returning to Python. */
#include "core.h"


#define MAX_RW_COUNT 0x7ffff000L          /* what Linux moves in one read or write at most */

/*
 * read/write of a regular file, all of count (as Linux does), in 64 KiB steps
 * through tmp: a file that ends or a disk that fills stops it short, and so
 * does guest memory that ends (then the file offset moves only by what the
 * guest really got or gave). Any error before the first byte goes to Python.
 */
static int
regular_io(struct fast_path *fp, int host, int writing, uint64_t buf, uint64_t count, uint64_t *r)
{
    static char tmp[65536];
    off_t start = writing ? 0 : lseek(host, 0, SEEK_CUR);
    if (start < 0)
        return 0;
    uint64_t want = count < (uint64_t)MAX_RW_COUNT ? count : (uint64_t)MAX_RW_COUNT, done = 0;
    while (done < want) {
        size_t n = want - done < sizeof tmp ? (size_t)(want - done) : sizeof tmp;
        struct iovec local = {tmp, n}, remote = {(void *)(uintptr_t)(buf + done), n};
        ssize_t got;
        if (writing) {
            if (process_vm_readv(fp->stub_pid, &local, 1, &remote, 1, 0) != (ssize_t)n)
                break;
            got = write(host, tmp, n);
        } else {
            got = pread(host, tmp, n, start + (off_t)done);
            if (got > 0) {
                local.iov_len = remote.iov_len = (size_t)got;
                if (process_vm_writev(fp->stub_pid, &local, 1, &remote, 1, 0) != got)
                    break;
            }
        }
        if (got <= 0)
            break;
        done += (uint64_t)got;
        if ((size_t)got < n)
            break;
    }
    if (!writing && done && lseek(host, start + (off_t)done, SEEK_SET) < 0)
        return 0;
    if (!done && want)
        return 0;                          /* nothing moved: Python finds the errno (or EOF) */
    r[R_RAX] = done;
    return 1;
}

int
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
    case __NR_getpid: r[R_RAX] = ids[0]; return 1;
    case __NR_getppid: r[R_RAX] = ids[1]; return 1;
    case __NR_gettid: r[R_RAX] = ids[2]; return 1;
    case __NR_getuid: r[R_RAX] = ids[3]; return 1;
    case __NR_geteuid: r[R_RAX] = ids[4]; return 1;
    case __NR_getgid: r[R_RAX] = ids[5]; return 1;
    case __NR_getegid: r[R_RAX] = ids[6]; return 1;
    case __NR_read:
    case __NR_write: {
        uint64_t gfd = r[14], buf = r[13], count = r[12];          /* rdi, rsi, rdx */
        Py_ssize_t nfds = fp->fds.len / 4;
        if (gfd >= (uint64_t)nfds || count == 0)
            return 0;
        int32_t entry = ((const int32_t *)fp->fds.buf)[gfd];     /* host fd << 1 | regular file */
        if (entry < 0)
            return 0;
        int host = entry >> 1, may_block = !(entry & 1);
        size_t n = count < 65536 ? count : 65536;
        if (may_block && nr == __NR_write && n > 4096)
            return 0;                      /* only what fits the one free pipe slot POLLOUT promises */
        if (may_block) {
            struct pollfd p = {host, nr == __NR_read ? POLLIN : POLLOUT, 0};
            if (poll(&p, 1, 0) != 1 || !(p.revents & p.events))
                return 0;                  /* it would wait (or hit EOF/an error): Python decides */
        }
        static char tmp[65536];
        if (!may_block)
            return regular_io(fp, host, nr == __NR_write, buf, count, r);
        struct iovec local = {tmp, n}, remote = {(void *)(uintptr_t)buf, n};
        if (nr == __NR_write) {
            if (process_vm_readv(fp->stub_pid, &local, 1, &remote, 1, 0) != (ssize_t)n)
                return 0;
            ssize_t w = write(host, tmp, n);
            if (w < 0)
                return 0;                  /* EPIPE (SIGPIPE), EAGAIN...: nothing was written */
            r[R_RAX] = (uint64_t)w;
            return 1;
        }
        /* A device or pipe that keeps data ready (/dev/zero, a full pipe) fills all of count, as
         * Linux does: dd counts blocks, and a short one would be lost data. */
        uint64_t want = count < (uint64_t)MAX_RW_COUNT ? count : (uint64_t)MAX_RW_COUNT, done = 0;
        for (;;) {
            n = want - done < sizeof tmp ? (size_t)(want - done) : sizeof tmp;
            ssize_t got = read(host, tmp, n);
            if (got < 0) {
                if (!done)
                    return 0;
                break;
            }
            local.iov_base = tmp;
            local.iov_len = remote.iov_len = (size_t)got;
            remote.iov_base = (void *)(uintptr_t)(buf + done);
            if (got && process_vm_writev(fp->stub_pid, &local, 1, &remote, 1, 0) != got) {
                if (!done) {
                    r[R_RAX] = (uint64_t)-EFAULT;
                    return 1;
                }
                break;
            }
            done += (uint64_t)got;
            if ((size_t)got < n || done == want)
                break;
            struct pollfd more = {host, POLLIN, 0};
            if (poll(&more, 1, 0) != 1 || !(more.revents & POLLIN))
                break;
        }
        r[R_RAX] = done;
        return 1;
    }
    }
    return 0;
}
