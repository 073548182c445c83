"""A user's script, type-checked with `mypy --strict` by the tests: the public API is typed."""
import subprocess
import sys
import tempfile

import pvmexec
from pvmexec.checkpoint import Image, dump
from pvmexec.guest import Guest
from pvmexec.kernel import Policy, Sandbox


def pid_of_a_child() -> subprocess.Popen[bytes]:
    return subprocess.Popen([sys.executable, "-c", "import sys; sys.stdin.read()"], stdin=subprocess.PIPE)


def remote_getpid(pid: int) -> int:
    with pvmexec.attach(pid, engine="ptrace") as space:
        ret: int = space.syscall("getpid")
        raw: int = space.syscall_raw(39)
        data: bytes = space.read(0x400000, 0) if ret == raw else b""
        return ret + len(data)


def guest_code() -> int:
    space = pvmexec.Space.create()
    try:
        with Guest(space) as g:
            ctx: pvmexec.SigContext = g.context("syscall_loop", rdi=789)
            stop: pvmexec.Stop = space.exec(ctx)
            if stop.reason == pvmexec.StopReason.SYSCALL and stop.syscall is not None:
                info: pvmexec.SigInfo = stop.siginfo
                return info.si_syscall
            return -1
    finally:
        space.detach()


def checkpoint(pid: int) -> int:
    with tempfile.TemporaryDirectory() as d:
        manifest = dump(pid, d + "/img", pre_dumps=1)
        image = Image(d + "/img")
        image.check()
        return len(manifest["threads"]) + len(image.page_index())


def sandboxed_true() -> int:
    box = Sandbox(policy=Policy(root="/", writable=["/tmp"]))
    status: int = box.run(["/bin/true"])
    return status


if __name__ == "__main__":
    child = pid_of_a_child()
    try:
        print(remote_getpid(child.pid), guest_code(), checkpoint(child.pid), sandboxed_true())
    finally:
        child.kill()
        child.wait()


class RootLooking(Sandbox):
    """The README's override API, type-checked: a handler of our own."""

    def sys_getuid(self, p: object) -> int:
        return 0
