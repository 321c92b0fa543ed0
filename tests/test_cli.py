"""lib.cli: the scripts' exit path, in one process and as a torchrun worker."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]

SCRIPT = """
import sys
from lib import cli
from lib.errors import MeshSDFError

def main():
    print("work done")
    if sys.argv[1] == "mistake":
        raise MeshSDFError("bad value\\n  of --x; pass another")
    return int(sys.argv[1])

cli.cli_main(main, prog="tool.py")
"""


@pytest.mark.parametrize("world_size", ["1", "2"])
@pytest.mark.parametrize("arg,status", [("0", 0), ("3", 3), ("mistake", 2)])
def test_cli_main_exits_with_the_status_and_flushes_its_output(world_size, arg, status):
    """A torchrun worker (WORLD_SIZE > 1) leaves through os._exit, skipping interpreter shutdown (where
    a collective backend's thread can abort the rank): same status, the output still all there."""
    env = dict(os.environ, WORLD_SIZE=world_size)
    r = subprocess.run([sys.executable, "-c", SCRIPT, arg], cwd=REPO, env=env, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == status and r.stdout == "work done\n", (r.returncode, r.stdout, r.stderr)
    if arg == "mistake":
        assert r.stderr == "tool.py: error: bad value of --x; pass another\n"
    else:
        assert r.stderr == ""


def test_parse_epoch_names_its_flag():
    from lib.cli import epoch_type
    from lib.errors import MeshSDFError

    assert epoch_type("--checkpoint")("7") == 7
    with pytest.raises(MeshSDFError, match="--checkpoint epoch must be >= 1, got 0"):
        epoch_type("--checkpoint")("0")


SCRIPTS = sorted(p.relative_to(REPO).as_posix() for p in [*REPO.glob("*.py"), *(REPO / "benchmarks").glob("*.py")])


@pytest.mark.parametrize("script", SCRIPTS)
def test_every_script_and_benchmark_shows_its_help(script):
    """Every command a user runs imports and parses: a moved or renamed library name breaks it here first."""
    r = subprocess.run([sys.executable, script, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "usage:" in r.stdout, r.stderr[-2000:]


def test_svr_step_benchmark_child_sleeps_openmp_threads_as_the_scripts():
    """benchmarks/svr_step.py's child sets its process up as reconstruct_svr.py does: idle OpenMP
    threads sleep (OMP_WAIT_POLICY=PASSIVE set before torch loads), or the tree would be timed in
    another thread mode than its script runs (importing lib has no side effects)."""
    sys.path.insert(0, str(REPO / "benchmarks"))
    try:
        import svr_step
    finally:
        sys.path.remove(str(REPO / "benchmarks"))
    head = svr_step.CHILD.split("\nimport torch\n")[0]
    probe = head + "\nimport os\nprint(os.environ.get('OMP_WAIT_POLICY'), 'torch' in sys.modules)\n"
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")}
    r = subprocess.run([sys.executable, "-c", probe], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.split() == ["PASSIVE", "False"]


@pytest.mark.slow
def test_svr_step_benchmark_stages_table():
    """benchmarks/svr_step.py --stages times the refinement's stages: one line per profiler label,
    the extraction, the rendering and the backward pass among them, each once per step."""
    cmd = [sys.executable, "benchmarks/svr_step.py", "--stages", "--iterations", "3", "--resolution", "32"]
    r = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = {line.split()[0]: line.split() for line in r.stdout.splitlines()[1:]}
    for label in ("optimize.extraction", "render.silhouette.forward", "optimize.backward", "svr.metrics"):
        wall, cpu = float(rows[label][2]), float(rows[label][5])
        assert wall > 0 and cpu > 0 and rows[label][7] == "(1.0", rows[label]
