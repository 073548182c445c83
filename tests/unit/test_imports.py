"""The package's import graph has no cycles, and every module imports on its own in a fresh interpreter."""
import ast
import os
import subprocess
import sys

import pvmexec

PKG = os.path.dirname(pvmexec.__file__)


def _modules():
    out = {}
    for d, _dirs, files in os.walk(PKG):
        for f in files:
            if f.endswith(".py"):
                path = os.path.join(d, f)
                name = "pvmexec." + os.path.relpath(path, PKG)[:-3].replace(os.sep, ".")
                out[name[:-len(".__init__")] if name.endswith(".__init__") else name] = path
    return out


def _edges(mods):
    """module -> modules it imports from pvmexec (relative imports; `from . import x` means x itself)."""
    edges = {}
    for name, path in mods.items():
        package = name if path.endswith("__init__.py") else name.rsplit(".", 1)[0]
        out = set()
        for node in ast.walk(ast.parse(open(path).read())):
            if isinstance(node, ast.ImportFrom) and node.level:
                base = package.split(".")[:len(package.split(".")) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
                subs = [target + "." + a.name for a in node.names]
                known = [s for s in subs if s in mods or s == "pvmexec._core"]
                out.update(s for s in known if s in mods)
                if target in mods and len(known) < len(subs):
                    out.add(target)
            elif isinstance(node, ast.Import):
                out.update(a.name for a in node.names if a.name in mods)
        edges[name] = out
    return edges


def test_no_import_cycles():
    mods = _modules()
    edges = _edges(mods)
    assert "pvmexec.kernel.sandbox" in edges and "pvmexec.engines.ptrace" in edges
    state, cycles = {}, []

    def visit(m, stack):
        state[m] = "open"
        stack.append(m)
        for n in sorted(edges[m]):
            if state.get(n) == "open":
                cycles.append(" -> ".join(stack[stack.index(n):] + [n]))
            elif n not in state:
                visit(n, stack)
        stack.pop()
        state[m] = "done"
    for m in sorted(mods):
        if m not in state:
            visit(m, [])
    assert cycles == []


def test_every_module_imports_alone():
    names = sorted(m for m in _modules() if not m.endswith("__main__"))
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\n"
    for name in names:          # one fresh interpreter each: no module may rely on another being loaded first
        got = subprocess.run([sys.executable, "-c", code, name], capture_output=True, text=True, timeout=60)
        assert got.returncode == 0, "%s: %s" % (name, got.stderr[-800:])
