"""Host calls Python's os module lacks (timerfds, inotify, renameat2, tee), each raising OSError as os does."""
import ctypes
import os

_libc = ctypes.CDLL(None, use_errno=True)


def _checked(ret):
    if ret < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return ret


def timerfd_create(clock, flags):
    return _checked(_libc.timerfd_create(ctypes.c_int(clock), ctypes.c_int(flags)))


def timerfd_settime(fd, flags, new):
    """new: struct itimerspec (32 bytes); returns the old one."""
    old = ctypes.create_string_buffer(32)
    _checked(_libc.timerfd_settime(ctypes.c_int(fd), ctypes.c_int(flags), ctypes.c_char_p(new), old))
    return old.raw


def timerfd_gettime(fd):
    cur = ctypes.create_string_buffer(32)
    _checked(_libc.timerfd_gettime(ctypes.c_int(fd), cur))
    return cur.raw


def inotify_init1(flags):
    return _checked(_libc.inotify_init1(ctypes.c_int(flags)))


def inotify_add_watch(fd, path, mask):
    return _checked(_libc.inotify_add_watch(ctypes.c_int(fd), path.encode(), ctypes.c_uint32(mask)))


def inotify_rm_watch(fd, wd):
    return _checked(_libc.inotify_rm_watch(ctypes.c_int(fd), ctypes.c_int(wd)))


def renameat2(olddir, old, newdir, new, flags):
    return _checked(_libc.renameat2(ctypes.c_int(olddir), old.encode("utf-8", "surrogateescape"), ctypes.c_int(newdir),
                                    new.encode("utf-8", "surrogateescape"), ctypes.c_uint(flags)))


def tee(fd_in, fd_out, length, flags):
    return _checked(_libc.tee(ctypes.c_int(fd_in), ctypes.c_int(fd_out), ctypes.c_size_t(length), ctypes.c_uint(flags)))
