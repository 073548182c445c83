"""Calls every-day programs make (links, FIFOs, ownership, locks, priorities, resource usage, memfds,
credentials), each compared with what Linux answers natively."""
import os
import subprocess
import textwrap

import pytest

from helpers import *  # noqa: F401,F403


def _script(tmp_path, body):
    work = tmp_path / "w"
    work.mkdir(exist_ok=True)
    os.chmod(work, 0o777)
    path = tmp_path / "s.py"
    path.write_text(textwrap.dedent(body))
    return work, [PYTHON3, str(path)]


def _same(tmp_path, body):
    """The script's output natively and sandboxed (writable: its own directory), each in a fresh directory."""
    results = []
    for boxed in (False, True):
        work, argv = _script(tmp_path, body)
        got = sandboxed(argv, "-q", "--writable", str(work), cwd=work) if boxed else native(argv, cwd=work)
        results.append((got.returncode, got.stdout.decode(), got.stderr.decode()[-2000:]))
        subprocess.run(["rm", "-rf", str(work)], check=True)
    assert results[1] == results[0]
    assert results[0][0] == 0
    return results[0][1]


def test_links_fifos_and_nodes(tmp_path):
    out = _same(tmp_path, """
        import errno, os, stat
        open("a", "w").write("x")
        os.link("a", "b")
        print(os.stat("a").st_nlink, open("b").read())
        os.symlink("a", "s")
        os.link("s", "hs", follow_symlinks=False)
        print(os.path.islink("hs"), os.readlink("hs"))
        os.mkfifo("f")
        print(stat.S_ISFIFO(os.stat("f").st_mode))
        os.mknod("n", stat.S_IFREG | 0o600)
        print(stat.S_ISREG(os.stat("n").st_mode))
        for make in (lambda: os.link("a", "b"), lambda: os.link(".", "d")):
            try:
                make()
            except OSError as e:
                print(errno.errorcode[e.errno])
        if os.fork() == 0:
            with open("f", "w") as w:
                w.write("through the fifo")
            os._exit(0)
        print(open("f").read())
        os.wait()
    """)
    assert "2 x" in out and "through the fifo" in out


def test_a_fifo_open_waits_for_its_other_end_and_a_signal_or_kill_ends_the_wait(tmp_path):
    """open(2) of a FIFO blocks until the other end opens (either end first, and the crossing protocol
    that needs a waiting reader to count as one); a signal ends the wait (EINTR) and SIGKILL ends the
    process: the host's blocking open could be ended by neither (the fuzzer hung on it)."""
    out = _same(tmp_path, """
        import errno, os, signal, time
        os.mkfifo("a"); os.mkfifo("b")
        for first in ("reader", "writer"):
            pid = os.fork()
            if pid == 0:
                if first == "writer":
                    time.sleep(0.2)
                print(first, open("a").read(), flush=True)
                os._exit(0)
            if first == "reader":
                time.sleep(0.2)
            with open("a", "w") as w:
                w.write("met")
            os.waitpid(pid, 0)
        pid = os.fork()
        if pid == 0:                                    # the other side of: a for reading, then b for writing
            w = os.open("a", os.O_WRONLY); r = os.open("b", os.O_RDONLY)
            os.write(w, b"ping"); print("child got", os.read(r, 10).decode(), flush=True)
            os._exit(0)
        r = os.open("a", os.O_RDONLY); w = os.open("b", os.O_WRONLY)
        print("parent got", os.read(r, 10).decode(), flush=True); os.write(w, b"pong")
        os.waitpid(pid, 0); os.close(r); os.close(w)
        def interrupt(*_):
            raise InterruptedError
        signal.signal(signal.SIGALRM, interrupt)
        for how in (os.O_WRONLY, os.O_RDONLY):
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            try:
                os.open("b", how)
            except InterruptedError:
                print("interrupted")
        try:
            os.open("b", os.O_WRONLY | os.O_NONBLOCK)
        except OSError as e:
            print(errno.errorcode[e.errno])
        fd = os.open("b", os.O_RDONLY | os.O_NONBLOCK)
        print(os.get_blocking(fd)); os.close(fd)
        for call in (lambda: os.truncate("b", 0), lambda: os.execv("./b", ["b"])):
            try:
                call()
            except OSError as e:
                print(errno.errorcode[e.errno])
        pid = os.fork()
        if pid == 0:
            os.open("b", os.O_WRONLY)
            os._exit(1)
        time.sleep(0.2)
        os.kill(pid, signal.SIGKILL)
        print(os.waitpid(pid, 0)[1] == signal.SIGKILL)
    """)
    assert out.split("\n") == ["reader met", "writer met", "parent got ping", "child got pong", "interrupted",
                               "interrupted", "ENXIO", "False", "EINVAL", "EACCES", "True", ""], out


def test_fork_gives_the_child_the_parents_memory_as_it_is(tmp_path):
    """A file's private mapping (pages written and pages not), anonymous memory touched here and there
    and never touched, and memory made read-only: the child sees each as the parent left it, and what
    either writes afterwards is its own; the file never changes."""
    out = _same(tmp_path, """
        import mmap, os, hashlib
        data = bytes(range(256)) * 256                   # 64 KiB
        open("f", "wb").write(data)
        fd = os.open("f", os.O_RDONLY)
        m = mmap.mmap(fd, len(data), mmap.MAP_PRIVATE, mmap.PROT_READ | mmap.PROT_WRITE)
        m[4096:4100] = b"pare"
        m[40000:40004] = b"ntal"
        a = mmap.mmap(-1, 64 << 20, mmap.MAP_PRIVATE)    # anonymous, mostly never touched
        for off in range(0, 64 << 20, 5 << 20):
            a[off:off + 5] = b"%05d" % (off >> 20)
        ro = mmap.mmap(-1, 8192, mmap.MAP_PRIVATE)
        ro[100:103] = b"ro!"
        import ctypes
        libc = ctypes.CDLL(None)
        addr = ctypes.addressof(ctypes.c_char.from_buffer(ro))
        libc.mprotect(ctypes.c_void_p(addr), 8192, 1)
        def view():
            return (bytes(m[4096:4100]), bytes(m[40000:40004]), hashlib.sha1(m[:]).hexdigest()[:12],
                    [bytes(a[off:off + 5]) for off in range(0, 64 << 20, 5 << 20)][:3],
                    hashlib.sha1(a[:]).hexdigest()[:12], ctypes.string_at(addr + 100, 3))
        print("before", view(), flush=True)
        pid = os.fork()
        if pid == 0:
            print("child ", view(), flush=True)
            m[0:4] = b"kid!"; a[1:3] = b"zz"
            print("child wrote", bytes(m[0:4]), bytes(a[0:5]), flush=True)
            os._exit(0)
        os.waitpid(pid, 0)
        print("after ", view())
        print(open("f", "rb").read() == data)
    """)
    lines = out.splitlines()
    assert lines[0][len("before"):] == lines[1][len("child "):] == lines[3][len("after "):], lines
    assert "b'pare'" in lines[0] and "b'ro!'" in lines[0] and lines[2] == "child wrote b'kid!' b'0zz00'"
    assert lines[4] == "True"


def test_execve_leaves_nothing_of_the_old_image(tmp_path):
    """The old program's mappings (anonymous, of a file, shared) are gone after execve, in a space the
    kernel may now reuse: the new program can map exactly where they were, and its maps list none."""
    out = _same(tmp_path, """
        import ctypes, mmap, os, sys
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        AT = (0x200000000, 0x210000000, 0x220000000)
        if len(sys.argv) == 1:
            open("f", "wb").write(b"x" * 8192)
            fd = os.open("f", os.O_RDONLY)
            for addr, flags, fd_ in ((AT[0], 0x22, -1), (AT[1], 0x02, fd), (AT[2], 0x21, -1)):
                got = libc.mmap(addr, 8192, 3, flags | 0x100000, fd_, 0)
                assert got == addr, (hex(addr), got)
                ctypes.memset(addr, 0x41, 16) if flags != 0x02 else None
            os.execv(sys.executable, [sys.executable, sys.argv[0], "again"])
        print([l for l in open("/proc/self/maps") if l.startswith(("200000000", "210000000", "220000000"))])
        print([libc.mmap(addr, 8192, 3, 0x22 | 0x100000, -1, 0) == addr for addr in AT])
    """)
    assert out == "[]\n[True, True, True]\n", out


def test_a_hard_link_never_makes_a_read_only_file_writable(tmp_path):
    """A second name below a writable path would let the guest write through it: refused."""
    ro = tmp_path / "ro"
    ro.mkdir()
    (ro / "keep").write_text("host data")
    rw = tmp_path / "rw"
    rw.mkdir()
    code = "import os\ntry:\n    os.link(%r, %r)\nexcept OSError as e:\n    print(e.errno)\n" % (
        str(ro / "keep"), str(rw / "l"))
    got = sandboxed([PYTHON3, "-c", code], "-q", "--writable", str(rw))
    assert got.stdout == b"13\n" and not (rw / "l").exists()
    assert (ro / "keep").read_text() == "host data"


def test_ownership_changes_an_unprivileged_caller_may_make(tmp_path):
    _same(tmp_path, """
        import os
        open("f", "w").close()
        os.chown("f", os.getuid(), os.getgid())
        os.chown("f", -1, -1)
        os.lchown("f", -1, os.getgid())
        fd = os.open("f", os.O_RDONLY)
        os.fchown(fd, -1, os.getgid())
        print(os.stat("f").st_uid == os.getuid())
    """)
    work, argv = _script(tmp_path, """
        import os
        open("f", "w").close()
        try:
            os.chown("f", 4242, -1)
        except OSError as e:
            print("refused", e.errno)
    """)
    got = sandboxed(argv, "-q", "--writable", str(work), cwd=work)
    assert got.stdout == b"refused 1\n" and os.stat(work / "f").st_uid == os.getuid()


def test_flock_and_record_locks_exclude_other_processes(tmp_path):
    _same(tmp_path, """
        import fcntl, os, time
        fd = os.open("lock", os.O_RDWR | os.O_CREAT)
        fcntl.flock(fd, fcntl.LOCK_EX)
        fcntl.lockf(fd, fcntl.LOCK_EX, 10, 0)
        r, w = os.pipe()
        if os.fork() == 0:
            mine = os.open("lock", os.O_RDWR)
            for attempt in (lambda: fcntl.flock(mine, fcntl.LOCK_EX | fcntl.LOCK_NB),
                            lambda: fcntl.lockf(mine, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)):
                try:
                    attempt()
                    print("child got a held lock")
                except OSError as e:
                    print("child refused", e.errno in (11, 13))
            os.write(w, b"x")
            fcntl.flock(mine, fcntl.LOCK_EX)         # waits for the parent to let go
            print("child locked after the parent")
            os._exit(0)
        os.read(r, 1)
        time.sleep(0.2)
        print("parent unlocks")
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.wait()
    """)


def test_record_locks_are_the_processs_as_posix_says(tmp_path):
    """POSIX record locks belong to the process: two opens of a file in one process share them (a second
    lock through the other descriptor is granted, not refused by the first), any close of the file by the
    process drops them (a child then gets the lock), a forked child holds none of its parent's; OFD locks
    stay per open file."""
    _same(tmp_path, """
        import fcntl, os, struct
        a = os.open("lock", os.O_RDWR | os.O_CREAT)
        b = os.open("lock", os.O_RDWR)
        fcntl.lockf(a, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        fcntl.lockf(b, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 5)
        print("one process, two opens: both granted")
        def child_tries():
            pid = os.fork()
            if pid == 0:
                c = os.open("lock", os.O_RDWR)
                try:
                    fcntl.lockf(c, fcntl.LOCK_EX | fcntl.LOCK_NB, 1, 0)
                    os._exit(0)
                except OSError:
                    os._exit(1)
            return os.waitpid(pid, 0)[1] >> 8
        print("a child while both are held:", child_tries())
        got = fcntl.fcntl(a, fcntl.F_GETLK, struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0))
        print("F_GETLK of its own lock:", struct.unpack("hhqqi4x", got)[0] == fcntl.F_UNLCK)
        os.close(b)
        print("after closing the other open:", child_tries())
        fcntl.lockf(a, fcntl.LOCK_EX | fcntl.LOCK_NB, 10, 0)
        held = struct.pack("hhqqi4x", fcntl.F_WRLCK, 0, 0, 10, 0)
        if os.fork() == 0:
            try:
                fcntl.fcntl(a, fcntl.F_SETLK, held)      # the inherited descriptor: the child's own locks
                print("a forked child holds none of its parent's: refused")
            except OSError as e:
                print("a forked child holds none of its parent's:", e.errno in (11, 13))
            os._exit(0)
        os.wait()
        fcntl.lockf(a, fcntl.LOCK_UN, 10, 0)            # (a process's POSIX locks exclude its OFD locks)
        d = os.open("lock", os.O_RDWR)
        e = os.open("lock", os.O_RDWR)
        fcntl.fcntl(d, 37, held)                         # F_OFD_SETLK: per open file
        try:
            fcntl.fcntl(e, 37, held)
            print("OFD locks of two opens: both")
        except OSError as err:
            print("OFD locks of two opens: the second refused", err.errno)
    """)


def test_priorities_affinity_credentials_and_memory_locks(tmp_path):
    _same(tmp_path, """
        import errno, os, resource
        before = os.getpriority(os.PRIO_PROCESS, 0)
        os.setpriority(os.PRIO_PROCESS, 0, before + 3)
        print(os.getpriority(os.PRIO_PROCESS, 0) - before)
        print(os.nice(1) - before)
        cpus = os.sched_getaffinity(0)
        os.sched_setaffinity(0, {min(cpus)})
        print(os.sched_getaffinity(0) == {min(cpus)})
        try:
            os.sched_setaffinity(0, {4000})
        except OSError as e:
            print(errno.errorcode[e.errno])
        os.setresuid(-1, os.geteuid(), -1)
        os.setuid(os.getuid())
        os.setgid(os.getgid())
        try:
            os.setgroups(os.getgroups())                 # CAP_SETGID only, even to keep them
            print("groups kept")
        except OSError as e:
            print(errno.errorcode[e.errno])
        import mmap
        m = mmap.mmap(-1, 4096)
        import ctypes
        libc = ctypes.CDLL(None, use_errno=True)
        print(libc.mlockall(1), libc.munlockall())
    """)


def test_resource_usage_is_the_processes_own(tmp_path):
    out = _same(tmp_path, """
        import os, resource, time
        t = time.process_time()
        while time.process_time() - t < 0.3:
            pass
        me = resource.getrusage(resource.RUSAGE_SELF)
        print(me.ru_utime + me.ru_stime >= 0.2, me.ru_maxrss > 1000, me.ru_minflt > 0)
        pid = os.fork()
        if pid == 0:
            t = time.process_time()
            while time.process_time() - t < 0.3:
                pass
            b = bytearray(50 << 20)
            os._exit(0)
        _, status, usage = os.wait4(pid, 0)
        print(usage.ru_utime + usage.ru_stime >= 0.2, usage.ru_maxrss > 50000)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        print(kids.ru_utime + kids.ru_stime >= 0.2, kids.ru_maxrss > 50000)
    """)
    assert out == "True True True\nTrue True\nTrue True\n"


def test_memfd_copy_file_range_and_fallocate(tmp_path):
    out = _same(tmp_path, """
        import fcntl, os
        fd = os.memfd_create("buf", os.MFD_ALLOW_SEALING)
        os.write(fd, b"memory file")
        print(os.pread(fd, 6, 0), os.fstat(fd).st_size)
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_GROW)
        try:
            os.write(fd, b"more")
        except OSError as e:
            print("sealed", e.errno)
        src = os.open("src", os.O_RDWR | os.O_CREAT)
        os.write(src, b"0123456789" * 1000)
        dst = os.open("dst", os.O_RDWR | os.O_CREAT)
        print(os.copy_file_range(src, dst, 5000, 10, 0), os.pread(dst, 5, 0))
        os.posix_fallocate(dst, 0, 1 << 20)
        print(os.fstat(dst).st_size)
    """)
    assert "b'memory' 11" in out and "5000 b'01234'" in out


def test_timerfd_inotify_and_pending_signals(tmp_path):
    _same(tmp_path, """
        import ctypes, os, select, signal, struct, time
        libc = ctypes.CDLL(None, use_errno=True)
        fd = libc.timerfd_create(1, 0)
        libc.timerfd_settime(fd, 0, struct.pack("<qqqq", 0, 0, 0, 50_000_000), None)
        start = time.monotonic()
        print("expired", struct.unpack("<Q", os.read(fd, 8))[0], time.monotonic() - start > 0.04)
        print(libc.timerfd_settime(os.open(".", os.O_RDONLY), 0, bytes(32), None), ctypes.get_errno())
        ino = libc.inotify_init1(os.O_NONBLOCK)
        libc.inotify_add_watch(ino, b".", 0x100 | 0x200)          # IN_CREATE | IN_DELETE
        open("new", "w").close()
        os.unlink("new")
        select.select([ino], [], [], 5)
        data, events = os.read(ino, 4096), []
        while data:
            _wd, mask, _cookie, n = struct.unpack_from("<iIII", data)
            events.append((hex(mask), data[16:16 + n].rstrip(b"\\0")))
            data = data[16 + n:]
        print(events)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGTERM])
        os.kill(os.getpid(), signal.SIGTERM)                      # blocked: pending, not fatal yet
        os.kill(os.getpid(), signal.SIGUSR1)
        print(sorted(signal.sigpending()))
        signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])
    """.replace("signal.pthread_sigmask(signal.SIG_UNBLOCK, [signal.SIGUSR1])", "os._exit(0)"))


def test_signalfd_reads_blocked_signals_and_polls_readable(tmp_path):
    out = _same(tmp_path, """
        import ctypes, os, select, signal, struct
        libc = ctypes.CDLL(None, use_errno=True)
        signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGCHLD])
        fd = libc.signalfd(-1, struct.pack("<Q", (1 << (signal.SIGUSR1 - 1)) | (1 << (signal.SIGCHLD - 1))), 0)
        print(select.select([fd], [], [], 0)[0] == [])
        os.kill(os.getpid(), signal.SIGUSR1)
        print(select.select([fd], [], [], 1)[0] == [fd])
        info = os.read(fd, 128)
        print(struct.unpack_from("<I", info)[0] == signal.SIGUSR1, struct.unpack_from("<I", info, 12)[0] == os.getpid())
        print(select.select([fd], [], [], 0)[0] == [])
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        signo, _e, _code, sender = struct.unpack_from("<IiiI", os.read(fd, 128))
        print(signo == signal.SIGCHLD, sender == pid)
        os.waitpid(pid, 0)
    """)
    assert out == "True\nTrue\nTrue True\nTrue\nTrue True\n"


def test_pidfds_and_splice(tmp_path):
    out = _same(tmp_path, """
        import os, select, signal, time
        pid = os.fork()
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        fd = os.pidfd_open(pid)
        print(select.select([fd], [], [], 0)[0] == [])
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        print(select.select([fd], [], [], 10)[0] == [fd])
        info = os.waitid(os.P_PIDFD, fd, os.WEXITED)
        print(info.si_pid == pid, info.si_code == os.CLD_KILLED, info.si_status)
        try:
            os.read(fd, 8)
        except OSError as e:
            print("read", e.errno)
        with open("src", "wb") as f:
            f.write(b"spliced " * 10000)
        src = os.open("src", os.O_RDONLY)
        r, w = os.pipe()
        print(os.splice(src, w, 80, offset_src=8), os.read(r, 80)[:16])
        os.write(w, b"from the pipe")
        dst = os.open("dst", os.O_WRONLY | os.O_CREAT)
        print(os.splice(r, dst, 13), open("dst").read())
    """)
    assert "True True 15" in out and "from the pipe" in out


def test_tee_and_vmsplice_between_pipes(tmp_path):
    _same(tmp_path, """
        import ctypes, os
        libc = ctypes.CDLL(None, use_errno=True)
        r1, w1 = os.pipe()
        r2, w2 = os.pipe()
        os.write(w1, b"duplicated")
        print(libc.tee(r1, w2, 100, 0), os.read(r2, 100), os.read(r1, 100))
        buf = ctypes.create_string_buffer(b"from memory")
        iov = (ctypes.c_void_p * 2)(ctypes.addressof(buf), 11)
        print(libc.vmsplice(w1, iov, 1, 0), os.read(r1, 100))
    """)
