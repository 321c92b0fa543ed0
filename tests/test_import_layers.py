"""The library's import graph: kernels depend on nothing above them, no cycles, relative imports only.

Every import in a file counts, those inside functions too: an import hidden in a function is
still a dependency.
"""
import ast
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"


def _module(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


FILES = {_module(p): p for p in sorted(LIB.rglob("*.py"))}


def _imports(path: Path) -> set[str]:
    """Absolute names a file imports anywhere (relative imports resolved; ``from . import x``
    gives the submodule when x is one)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - node.level + 1] + ([node.module] if node.module else []))
            else:
                base = node.module
            subs = {f"{base}.{a.name}" for a in node.names} & set(FILES)
            out |= subs or {base}
    return out


def _ancestors(name: str) -> list[str]:
    parts = name.split(".")
    return [".".join(parts[:i]) for i in range(1, len(parts))]


def _graph() -> dict[str, set[str]]:
    """Module -> the lib modules importing it runs.  Importing ``a.b.c`` first runs the package
    ``a.b``'s ``__init__``, so that package counts too, except where it is the importer's own
    ancestor (already being imported)."""
    graph = {}
    for m, p in FILES.items():
        deps = {d for d in _imports(p) if d in FILES}
        deps |= {a for d in deps for a in _ancestors(d) if a in FILES and a not in _ancestors(m)}
        graph[m] = deps - {m}
    return graph


def test_lib_imports_itself_relatively():
    """Relative imports only, so the same files import as ``lib`` (the scripts) and ``meshsdf`` (installed)."""
    for mod, path in FILES.items():
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import) else
                     [node.module or ""] if isinstance(node, ast.ImportFrom) and not node.level else [])
            bad = [n for n in names if n == "lib" or n.startswith("lib.")]
            assert not bad, f"{path}:{node.lineno} imports {bad[0]} absolutely; use a relative import"


def test_ops_imports_only_torch_numpy_the_standard_library_and_itself():
    for mod, path in FILES.items():
        if mod.startswith("lib.ops"):
            for name in _imports(path):
                top = name.split(".")[0]
                assert (top in ("torch", "numpy") or top in sys.stdlib_module_names
                        or name.startswith("lib.ops")), f"{path.name} imports {name}"


def test_no_import_cycles():
    graph = _graph()
    done, path = set(), []

    def visit(m):
        if m in path:
            raise AssertionError("import cycle: " + " -> ".join(path[path.index(m):] + [m]))
        if m in done:
            return
        path.append(m)
        for d in sorted(graph[m]):
            visit(d)
        path.pop()
        done.add(m)

    for m in sorted(graph):
        visit(m)


def test_the_layer_never_imports_the_deepsdf_decoder():
    """lib/layer/ reaches a decoder's fast path through the decoder (``field_kernel``), never
    through an import of lib.models."""
    graph = _graph()
    seen, stack = set(), [m for m in graph if m == "lib.layer" or m.startswith("lib.layer.")]
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(graph[m])
    assert "lib.layer.sdf" in seen and "lib.runtime.threads" in seen   # the walk follows the layer's imports
    assert not [m for m in seen if m.startswith("lib.models")]


def test_the_process_set_up_loads_no_torch():
    """``lib.cli.setup_process`` must run before torch loads (OpenMP reads its wait policy once), so
    importing lib.cli, and lib itself, loads no torch; it sets the policy only when called."""
    import os
    import subprocess

    code = ("import os, sys; import lib, lib.cli; assert 'torch' not in sys.modules, 'torch loaded'; "
            "assert 'OMP_WAIT_POLICY' not in os.environ; lib.cli.setup_process(); print(os.environ['OMP_WAIT_POLICY'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME",
                                                             "MESHSDF_THREADS")}
    r = subprocess.run([sys.executable, "-c", code], cwd=LIB.parent, env=env, capture_output=True, text=True)
    assert r.returncode == 0 and r.stdout.strip() == "PASSIVE", r.stderr[-2000:]
