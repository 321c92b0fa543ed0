"""The package's import graph: lib/ops/ depends on nothing above it, and no module-level cycles."""
import ast
import sys
from pathlib import Path

LIB = Path(__file__).resolve().parents[1] / "lib"


def _module(path: Path) -> str:
    parts = list(path.relative_to(LIB.parent).with_suffix("").parts)
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(path: Path) -> set[str]:
    """Absolute names a module imports at module level (relative imports resolved)."""
    name = _module(path)
    package = name if path.name == "__init__.py" else name.rsplit(".", 1)[0]
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(base + ([node.module] if node.module else []))
            else:
                base = node.module
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def _graph() -> dict[str, set[str]]:
    files = {_module(p): p for p in LIB.rglob("*.py")}
    return {m: {d for d in _imports(p) if d in files and d != m} for m, p in files.items()}


def test_ops_imports_only_torch_numpy_the_standard_library_and_itself():
    for path in (LIB / "ops").glob("*.py"):
        for name in _imports(path):
            top = name.split(".")[0]
            assert (top in ("torch", "numpy") or top in sys.stdlib_module_names
                    or name.startswith("lib.ops")), f"{path.name} imports {name}"


def test_no_import_cycles_at_module_level():
    graph = _graph()
    # a package importing its own submodules is not a cycle: drop parent -> child edges
    graph = {m: {d for d in deps if not d.startswith(m + ".")} for m, deps in graph.items()}
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


def test_the_layer_never_imports_the_deepsdf_decoder_and_cpus_no_torch():
    """lib/layer/ reaches a decoder's fast path through the decoder (``field_kernel``), never
    through an import of lib.models; lib/runtime/cpus.py must run before torch loads."""
    graph = _graph()
    seen, stack = set(), [m for m in graph if m == "lib.layer" or m.startswith("lib.layer.")]
    while stack:
        m = stack.pop()
        if m not in seen:
            seen.add(m)
            stack.extend(graph[m])
    assert "lib.layer.sdf" in seen and "lib.runtime.threads" in seen   # the walk follows the layer's imports
    assert not [m for m in seen if m.startswith("lib.models")]
    for name in _imports(LIB / "runtime" / "cpus.py"):
        assert name.split(".")[0] in sys.stdlib_module_names, name
