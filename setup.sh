#!/usr/bin/env bash
# Install MeshSDF's dependencies into the current Python from package registries only.
# Idempotent: run it again at any time.  Uses $PYTHON if set, else python3 (or python).
set -euo pipefail
cd "$(dirname "$0")"

PY="${PYTHON:-$(command -v python3 || command -v python || true)}"
if [ -z "$PY" ]; then
    echo "setup.sh: error: no python3 found; install Python 3.10+ first" >&2
    exit 1
fi
"$PY" - <<'PYCHECK' || { echo "setup.sh: error: MeshSDF needs Python >= 3.10 (found $("$PY" --version 2>&1))" >&2; exit 1; }
import sys
sys.exit(0 if sys.version_info >= (3, 10) else 1)
PYCHECK

echo "setup.sh: installing torch==2.13.0 (the CPU build where one is offered)"
"$PY" -m pip install --disable-pip-version-check -q "torch==2.13.0"
echo "setup.sh: installing requirements.txt"
"$PY" -m pip install --disable-pip-version-check -q -r requirements.txt
echo "setup.sh: installing this project as the package meshsdf (editable: lib/ is its source)"
"$PY" -m pip install --disable-pip-version-check -q --no-deps -e .

"$PY" - <<'PYCHECK'
import importlib, sys
mods = ["torch", "numpy", "scipy", "skimage", "trimesh", "igl", "plyfile", "imageio", "PIL", "matplotlib", "tqdm", "pytest", "meshsdf"]
bad = []
for m in mods:
    try:
        importlib.import_module(m)
    except Exception as err:  # report every broken package, not just the first
        bad.append(f"{m} ({type(err).__name__}: {err})")
if bad:
    print("setup.sh: error: these packages do not import: " + "; ".join(bad), file=sys.stderr)
    sys.exit(1)
import torch
dev = "cuda" if torch.cuda.is_available() else "cpu"
print(f"setup.sh: ok: torch {torch.__version__}, default device {dev}")
PYCHECK
