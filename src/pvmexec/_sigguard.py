"""Keep the target whole when the caller is told to terminate.

SIGINT already becomes KeyboardInterrupt, which the engine handles by putting
the target back first. SIGTERM and SIGHUP would kill the caller outright, so
while a Space is attached (and only if they were at their default action) they
raise Terminated in the main thread the same way: the operation in flight is
cancelled and the target restored, with blocks and finally clauses unwind (a
dump takes its write protection back), and when Terminated reaches the top the
caller detaches what is still attached and dies of the same signal as before.
While another thread is in an operation, that waits for the operation's end.
"""
import _thread
import functools
import os
import signal
import sys
import threading
import time

from . import _core

_SIGNALS = (signal.SIGTERM, signal.SIGHUP)
_lock = threading.Lock()
_installed = {}
_users = 0
_deferred = []          # signals held off until no operation runs (the operation counters are _core's)


class Terminated(BaseException):
    """Raised in the main thread by SIGTERM/SIGHUP during an operation: unwinds it, then we die of signum."""

    def __init__(self, signum):
        super().__init__(signum)
        self.signum = signum


_cleanup = None      # set by space.py: detach every open Space


def set_cleanup(fn):
    global _cleanup
    _cleanup = fn


def _die(signum):
    """Detach what is still attached (no operation is in flight now), then die of signum."""
    if _cleanup is not None:
        try:
            _cleanup()
        except Exception:
            pass
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _handler(signum, frame):
    if _in_hook(frame):                 # raised here, the hook would drop it: send it again after
        _send_again(functools.partial(os.kill, os.getpid(), signum))
        return
    ops, main_ops = _core.guard_counts()
    if ops > main_ops:                  # another thread is mid-operation: after it
        _deferred.append(signum)
        return
    raise Terminated(signum)


def _excepthook(typ, value, tb):
    if issubclass(typ, Terminated):
        _die(value.signum)
    _previous_hook(typ, value, tb)


def _in_hook(frame):
    while frame is not None:
        if frame.f_code is _unraisable.__code__:
            return True
        frame = frame.f_back
    return False


def _send_again(again):
    """Send a signal again from another thread once the main thread is out of _unraisable. No
    threading.Thread: its start() waits for the thread, and a signal sent meanwhile landed in
    the hook and was lost (the caller then ran on after SIGTERM)."""
    def later():
        main = threading.main_thread().ident
        while True:
            time.sleep(0.001)
            if not _in_hook(sys._current_frames().get(main)):
                break
        again()
    _thread.start_new_thread(later, ())


def _unraisable(u):
    """Python drops what a __del__ (run by the collector at any allocation) raises: a Ctrl-C or a
    SIGTERM that lands there is sent again, else the caller would never see it and go on."""
    if isinstance(u.exc_value, KeyboardInterrupt):
        _send_again(_thread.interrupt_main)
    elif isinstance(u.exc_value, Terminated):
        _send_again(functools.partial(os.kill, os.getpid(), u.exc_value.signum))
    else:
        _previous_unraisable(u)


_previous_hook = None
_previous_unraisable = None


def install():
    global _users, _previous_unraisable
    with _lock:
        if _previous_unraisable is None:
            _previous_unraisable = sys.unraisablehook
            sys.unraisablehook = _unraisable
        _users += 1
        if _users > 1 or threading.current_thread() is not threading.main_thread():
            return
        for s in _SIGNALS:
            if signal.getsignal(s) == signal.SIG_DFL:
                _installed[s] = signal.signal(s, _handler)
        if _installed and _previous_hook is None:
            _set_hook()


def uninstall():
    global _users
    with _lock:
        _users -= 1
        if _users or threading.current_thread() is not threading.main_thread():
            return
        for s, old in list(_installed.items()):
            if signal.getsignal(s) is _handler:
                signal.signal(s, old)
            del _installed[s]


def _set_hook():
    global _previous_hook
    _previous_hook = sys.excepthook
    sys.excepthook = _excepthook


class _Operation:
    """Context manager around one engine operation (one shared instance: the counters are _core's, where
    the C entries of the hot paths count their operations too)."""

    __slots__ = ()

    def __enter__(self):
        _core.guard_enter()

    def __exit__(self, typ, exc, tb):
        _core.guard_exit()          # (the last one out acts on a held-off signal: _due)
        return False


def _due():
    _die(_deferred.pop())


_core.guard_setup(threading.main_thread().ident, _deferred, _due)
_OPERATION = _Operation()


def operation():
    return _OPERATION


_DEFER = {signal.SIGINT, signal.SIGTERM, signal.SIGHUP}


class _Deferred:
    """Hold SIGINT/SIGTERM/SIGHUP off for a step that must not be cut in two (make a thing in the target
    and record it; remove it and unrecord it; detach): they take effect at the block's end."""

    __slots__ = ("old",)

    def __enter__(self):
        self.old = signal.pthread_sigmask(signal.SIG_BLOCK, _DEFER)

    def __exit__(self, typ, exc, tb):
        signal.pthread_sigmask(signal.SIG_SETMASK, self.old)
        return False


def deferred():
    return _Deferred()
