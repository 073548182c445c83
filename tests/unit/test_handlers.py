"""The sandbox's handler registry: every handler is reachable, named after a real call, and the
support table agrees with the handlers (as gVisor's linux64_test.go checks its table)."""
import inspect

from pvmexec.kernel import Sandbox
from pvmexec.kernel.syscalls import CALLS, SUPPORT
from pvmexec.syscalls import TABLE

NAMES = {name for name, _kinds in TABLE.values()}


def _handlers(cls):
    return {n for n in dir(cls) if n.startswith("sys_") and callable(getattr(cls, n))}


def test_every_handler_names_a_syscall():
    assert sorted(h for h in _handlers(Sandbox) if h[4:] not in NAMES) == []


def test_every_handler_is_registered_by_number():
    box = Sandbox()
    try:
        registered = {nr for nr in box._handlers}
        for h in _handlers(Sandbox):
            nrs = [nr for nr, (name, _k) in TABLE.items() if name == h[4:]]
            assert nrs and all(nr in registered for nr in nrs), h
    finally:
        box.policy.close()


def test_handlers_live_in_exactly_one_topic():
    seen = {}
    for cls in CALLS:
        for h in _handlers(cls):
            if h in cls.__dict__:
                assert h not in seen, "%s is in %s and %s" % (h, seen[h].__name__, cls.__name__)
                seen[h] = cls
    assert set(seen) == _handlers(Sandbox)


def test_support_table_names_handled_calls_with_a_level():
    handled = {h[4:] for h in _handlers(Sandbox)}
    for name, note in SUPPORT.items():
        assert name in NAMES, name
        assert name in handled, "%s has a SUPPORT entry but no handler" % name
        assert note.split(":", 1)[0] in ("partial", "refused") and len(note.split(":", 1)[1].strip()) > 5, name


def test_handlers_take_the_process_and_the_tables_arguments():
    for h in _handlers(Sandbox):
        params = list(inspect.signature(getattr(Sandbox, h)).parameters)
        kinds = next(k for name, k in TABLE.values() if name == h[4:]) or ()
        assert params[:2] == ["self", "p"], h
        assert len(params) - 2 == len(kinds), "%s takes %d arguments, the table says %d" % (h, len(params) - 2,
                                                                                              len(kinds))


def test_a_subclass_handler_is_registered_without_any_other_step():
    class WithGetpriority(Sandbox):
        def sys_getpriority(self, p, which, who):
            return 20
    box = WithGetpriority()
    try:
        nr = next(nr for nr, (name, _k) in TABLE.items() if name == "getpriority")
        assert box._handlers[nr][0].__func__ is WithGetpriority.sys_getpriority
    finally:
        box.policy.close()


def test_the_support_table_in_the_docs_is_the_handlers():
    """docs/syscalls.md is generated (tools/gen_support_table.py): it must say what the code does."""
    import os
    from pvmexec.kernel.syscalls import support_markdown, support_table
    path = os.path.join(os.path.dirname(__file__), "..", "..", "docs", "syscalls.md")
    with open(path) as f:
        assert f.read() == support_markdown(), "run tools/gen_support_table.py"
    levels = {name: level for _nr, name, level, _note in support_table()}
    assert levels["read"] == "supported" and levels["mount"] == "not provided" and levels["fcntl"] == "partial"
