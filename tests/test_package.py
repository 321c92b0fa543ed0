"""The installable package: `pip install` a copy of the project, then `import meshsdf` from elsewhere."""
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def readme_example() -> str:
    """The README's layer example (the code block after its marker)."""
    text = (REPO / "README.md").read_text()
    block = text.split("<!-- readme-example: mesh_from_field -->", 1)[1]
    return block.split("```python\n", 1)[1].split("```", 1)[0]


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """A virtual environment (torch, numpy, pip and setuptools from this Python) with the project
    pip-installed, not editable."""
    tmp = tmp_path_factory.mktemp("pkg")
    src = tmp / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(REPO / name, src / name)
    shutil.copytree(REPO / "lib", src / "lib", ignore=shutil.ignore_patterns("__pycache__"))
    venv = tmp / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", str(venv)], check=True)
    py = venv / "bin" / "python"
    r = subprocess.run([str(py), "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation",
                        "--disable-pip-version-check", str(src)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr[-2000:]
    work = tmp / "elsewhere"
    work.mkdir()
    return py, work


def _run(py: Path, work: Path, code: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([str(py), "-c", code], cwd=work, env=env, capture_output=True, text=True, timeout=300)


def test_readme_example_runs_on_the_installed_package(installed):
    py, work = installed
    code = ("import meshsdf, sys\nassert '/venv/' in meshsdf.__file__, meshsdf.__file__\n" + readme_example()
            + "\nassert mesh.faces.shape[0] > 0 and not mesh.verts.requires_grad\n")
    assert "import meshsdf" in readme_example() or "from meshsdf" in readme_example()
    r = _run(py, work, code)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "d(mean radius)/d(radius) = 1.0" in r.stdout


def test_import_has_no_side_effects_and_lists_the_api(installed):
    py, work = installed
    code = textwrap.dedent("""
        import os, threading
        before, threads = dict(os.environ), threading.active_count()
        import meshsdf
        assert dict(os.environ) == before, set(os.environ.items()) ^ set(before.items())
        assert threading.active_count() == threads
        missing = [n for n in meshsdf.__all__ if not hasattr(meshsdf, n)]
        assert not missing, missing
        assert sorted(meshsdf._API) == sorted(meshsdf.__all__)
        for name in ("mesh_from_field", "mesh_from_sdf", "SurfaceMesh", "check_gradients", "extract",
                     "ExtractionState", "marching_cubes", "Camera", "silhouette", "rasterize", "MeshSDFError"):
            assert name in meshsdf.__all__, name
        print("ok")
    """)
    r = _run(py, work, code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_the_installed_package_holds_every_module_of_lib(installed):
    """pyproject.toml's package list misses no subpackage: the installed tree has every lib/ module."""
    py, work = installed
    r = _run(py, work, "import meshsdf, pathlib; root = pathlib.Path(meshsdf.__file__).parent; "
                       "print('\\n'.join(sorted(str(p.relative_to(root)) for p in root.rglob('*.py'))))")
    assert r.returncode == 0, r.stderr[-2000:]
    ours = sorted(str(p.relative_to(REPO / "lib")) for p in (REPO / "lib").rglob("*.py"))
    assert r.stdout.split() == ours


def test_every_module_imports_as_meshsdf(installed):
    """Relative imports throughout: each module of the installed package imports without ``lib``."""
    py, work = installed
    code = textwrap.dedent("""
        import importlib, pathlib, sys, warnings
        import meshsdf
        root = pathlib.Path(meshsdf.__file__).parent
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", DeprecationWarning)  # the shims of moved modules
            for p in sorted(root.rglob("*.py")):
                parts = p.relative_to(root).with_suffix("").parts
                name = ".".join(("meshsdf",) + (parts[:-1] if parts[-1] == "__init__" else parts))
                importlib.import_module(name)
        assert not [m for m in sys.modules if m == "lib" or m.startswith("lib.")]
        print("ok")
    """)
    r = _run(py, work, code)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]
