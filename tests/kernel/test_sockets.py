"""Sockets: unix sockets between guest processes (paths, abstract names, descriptors passed), the host's
own sockets out of reach, inet sockets only with --network (servers and clients inside, a server outside)."""
import os
import socket
import subprocess
import textwrap
import threading

from helpers import *  # noqa: F401,F403

UNIX = r"""
import array, os, socket
s = socket.socket(socket.AF_UNIX); s.bind("sk"); s.listen()
c = socket.socket(socket.AF_UNIX); c.connect("sk")
a, addr = s.accept()
print(s.getsockname(), c.getpeername(), a.getsockname(), repr(addr))
c.send(b"u"); print(a.recv(1))
r, w = os.pipe()
socket.send_fds(c, [b"fd"], [w])
msg, fds, flags, _ = socket.recv_fds(a, 10, 2)
os.write(fds[0], b"through a passed descriptor"); print(msg, os.read(r, 100))
for kind in (socket.SOCK_DGRAM, socket.SOCK_SEQPACKET):
    x, y = socket.socketpair(socket.AF_UNIX, kind)
    x.send(b"one"); x.send(b"two"); print(y.recv(10), y.recv(10))
d1 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); d1.bind("\0pvmexec-test-name")
d2 = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM); d2.sendto(b"dgram", "\0pvmexec-test-name")
print(d1.recvfrom(10), d1.getsockname())
pid = os.fork()
if pid == 0:
    k = socket.socket(socket.AF_UNIX); k.connect("sk"); k.sendall(b"from the child" * 5000); os._exit(0)
b, _ = s.accept()
data = b""
while True:
    chunk = b.recv(65536)
    if not chunk:
        break
    data += chunk
print(len(data)); os.waitpid(pid, 0)
m, n = socket.socketpair()
m.sendmsg([b"a", b"b"], [], 0); print(n.recvmsg(10)[0])
for bad in (lambda: socket.socket(socket.AF_UNIX).connect("nowhere"),
            lambda: socket.socket(socket.AF_UNIX).bind("sk")):
    try:
        bad()
    except OSError as e:
        print(e.errno)
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
print(s.getsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR), s.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE))
"""


def _work(tmp_path, name):
    d = tmp_path / name
    d.mkdir()
    return d


def test_unix_sockets_between_guest_processes_match_native(tmp_path):
    script = tmp_path / "unix.py"
    script.write_text(UNIX)
    want = native([PYTHON3, str(script)], cwd=_work(tmp_path, "n"))
    work = _work(tmp_path, "b")
    got = sandboxed([PYTHON3, str(script)], "-q", "--writable", str(work), cwd=work)
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr[-2000:]
    assert want.returncode == 0 and b"through a passed descriptor" in got.stdout


def test_the_hosts_unix_sockets_and_abstract_names_are_out_of_reach(tmp_path):
    host = socket.socket(socket.AF_UNIX)
    host.bind(str(tmp_path / "host.sock"))
    host.listen()
    abstract = socket.socket(socket.AF_UNIX)
    abstract.bind("\0pvmexec-host-abstract")
    abstract.listen()
    code = textwrap.dedent("""
        import socket
        for where in (%r, "\\0pvmexec-host-abstract"):
            try:
                socket.socket(socket.AF_UNIX).connect(where)
                print("reached")
            except OSError as e:
                print(e.errno)
        try:
            socket.socket(socket.AF_UNIX).bind(%r)
        except OSError as e:
            print(e.errno)
        try:
            socket.socket(socket.AF_INET)
        except OSError as e:
            print(e.errno)
    """ % (str(tmp_path / "host.sock"), str(tmp_path / "not-writable.sock")))
    try:
        got = sandboxed([PYTHON3, "-c", code], "-q")
        host.setblocking(False)
        abstract.setblocking(False)
        for s in (host, abstract):
            try:
                s.accept()
                raise AssertionError("the guest reached a host socket")
            except BlockingIOError:
                pass
    finally:
        host.close()
        abstract.close()
    assert got.stdout.split() == [b"111", b"111", b"13", b"13"], got.stderr
    assert not (tmp_path / "not-writable.sock").exists()


def test_network_servers_and_clients_inside_and_a_server_outside(tmp_path):
    outside = socket.socket()
    outside.bind(("127.0.0.1", 0))
    outside.listen()
    port = outside.getsockname()[1]

    def answer():
        conn, _ = outside.accept()
        conn.sendall(b"hello from outside\n")
        conn.close()
    t = threading.Thread(target=answer, daemon=True)
    t.start()
    script = textwrap.dedent("""
        python3 -m http.server 0 --bind 127.0.0.1 > log 2>&1 &
        for i in $(seq 100); do grep -q Serving log 2>/dev/null && break; sleep 0.1; done
        port=$(sed -n 's/.*port \\([0-9]*\\).*/\\1/p' log | head -1)
        curl -s http://127.0.0.1:$port/ | grep -c '<html'
        python3 -c 'import socket; u=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); u.bind(("::1",0)); v=socket.socket(socket.AF_INET6, socket.SOCK_DGRAM); v.sendto(b"udp", u.getsockname()); print(u.recvfrom(10)[0])'
        python3 -c 'import socket; print(socket.create_connection(("127.0.0.1", %d)).makefile().readline().strip())'
        kill %%1
    """ % port)
    work = _work(tmp_path, "w")
    try:
        got = sandboxed(["bash", "-c", script], "-q", "--network", "--writable", str(work), cwd=work)
    finally:
        t.join(10)
        outside.close()
    assert got.stdout.decode().splitlines() == ["1", "b'udp'", "hello from outside"], got.stderr[-2000:]


WAITS = r"""
import os, signal, socket, time
class Alarm(Exception):
    pass
def alarm(*_):
    raise Alarm()
signal.signal(signal.SIGALRM, alarm)
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind("s")
srv.listen(0)
queued = []
while True:                                   # fill the backlog
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.setblocking(False)
    try:
        c.connect("s")
    except BlockingIOError:
        break
    queued.append(c)
c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
signal.setitimer(signal.ITIMER_REAL, 0.2)
try:
    c.connect("s")                            # waits for room: the alarm ends it
    print("connected")
except Alarm:
    print("connect ended by a signal")
while queued:                                 # empty the backlog again
    srv.accept()[0].close()
    queued.pop().close()
kids = []
for _ in range(2):                            # preforking: two processes accept on one socket
    pid = os.fork()
    if pid == 0:
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        conn, _ = srv.accept()
        conn.sendall(b"served")
        os._exit(0)
    kids.append(pid)
time.sleep(0.2)
x = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
x.connect("s")
print(x.recv(16).decode())
time.sleep(0.2)
for pid in kids:                              # the one still in accept must die of SIGTERM
    os.kill(pid, signal.SIGTERM)
print(sorted(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in kids))
"""


def test_waits_in_connect_and_accept_end_with_a_signal(tmp_path):
    """A connect to a full backlog and an accept that another process won are ended by signals, as
    Linux's: neither waits in the host where a signal cannot reach it."""
    script = tmp_path / "waits.py"
    script.write_text(WAITS)
    want = native([PYTHON3, str(script)], cwd=_work(tmp_path, "n"))
    work = _work(tmp_path, "b")
    got = sandboxed([PYTHON3, str(script)], "-q", "--writable", str(work), cwd=work)
    assert want.stdout == b"connect ended by a signal\nserved\n[-15, 0]\n", want
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr[-2000:]


CREDS = r"""
import os, socket, struct, sys
path = "srv"
srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
srv.bind(path)
srv.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)     # before anything is sent: accepted ones inherit it
srv.listen()
me = os.getpid()
pid = os.fork()
if pid == 0:
    c = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    c.connect(path)
    peer = struct.unpack("3i", c.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0]
    c.sendmsg([b"hi"])
    c.send(("the client's SO_PEERCRED is the listener: %s\n" % (peer == me)).encode())
    c.recv(1)
    os._exit(0)
conn, _ = srv.accept()
peer = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))
print("the server's SO_PEERCRED is the client:", peer == (pid, os.getuid(), os.getgid()))
msg, anc, _, _ = conn.recvmsg(2, socket.CMSG_SPACE(12))
got = [struct.unpack("3i", data[:12]) for level, kind, data in anc if kind == socket.SCM_CREDENTIALS]
print("SCM_CREDENTIALS name the sender:", got == [(pid, os.getuid(), os.getgid())])
print(conn.recv(100).decode().strip())
conn.send(b"x")
os.waitpid(pid, 0)
a, b = socket.socketpair()
print("a pair's peer is its maker:", struct.unpack("3i", a.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[0] == me)
b.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
for how in ("send", "write"):                   # sendto without an address, and write(2): whoever sent it
    pid = os.fork()
    if pid == 0:
        a.send(b"c") if how == "send" else os.write(a.fileno(), b"c")
        os._exit(0)
    os.waitpid(pid, 0)
    msg, anc, _, _ = b.recvmsg(1, socket.CMSG_SPACE(12))
    print("SCM_CREDENTIALS name a child that used %s:" % how, struct.unpack("3i", anc[0][2][:12])[0] == pid)
"""


def test_peer_credentials_name_guest_processes(tmp_path):
    """SO_PEERCRED and SCM_CREDENTIALS give the peer's guest pid (who connected, who listened, who
    sent), never the host's and never the caller's own."""
    script = tmp_path / "creds.py"
    script.write_text(CREDS)
    want = native([PYTHON3, str(script)], cwd=_work(tmp_path, "n"))
    work = _work(tmp_path, "b")
    got = sandboxed([PYTHON3, str(script)], "-q", "--writable", str(work), cwd=work)
    assert want.stdout.count(b"True") == 6 and b"False" not in want.stdout, want
    assert (got.returncode, got.stdout) == (want.returncode, want.stdout), got.stderr[-2000:]
