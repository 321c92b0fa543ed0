"""reconstruct_svr.py under torchrun: the test split shared among 2 gloo processes, each instance
done once, folders as one process writes them, a killed rank's instance done by the rerun."""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from lib.io import read_mesh
from lib.training import distributed

from tests.test_distributed import one_thread

REPO = Path(__file__).resolve().parents[1]
TEST_NAMES = ["car_002", "car_003", "car_004", "car_005"]

# reconstruct_svr.main with two probes: each finished folder is appended to <record>/rank<R>.txt,
# and the process writing the folder of instance <kill> dies (SIGKILL) half-way through it
WRAPPER = """
import os, signal, sys
sys.path.insert(0, {repo!r})
import lib.svr.reconstruct as R
import reconstruct_svr
record, kill = sys.argv[1], sys.argv[2]
real_save, real_ply = R.save_instance, R.write_ply
def save_instance(folder, *a, **k):
    real_save(folder, *a, **k)
    with open(os.path.join(record, "rank%s.txt" % os.environ["RANK"]), "a") as f:
        f.write(folder.name + "\\n")
def write_ply(path, *a, **k):
    real_ply(path, *a, **k)
    if path.parent.name == "." + kill + ".partial":
        os.kill(os.getpid(), signal.SIGKILL)
R.save_instance, R.write_ply = save_instance, write_ply
sys.exit(reconstruct_svr.main(sys.argv[3:]))
"""


def toy_cars_experiment(tmp_path: Path) -> Path:
    """prepare_data.py's toy_cars (6 instances: 1 train, 1 validation, 4 test; 2 views of 32 px) and a
    tiny SVR network trained on it (enough for the test instances' codes to have a surface at N = 20)."""
    import prepare_data
    import train_svr

    data, ds = tmp_path / "data", "toy_cars"
    assert prepare_data.main(["--builtin", ds, "--count", "6", "--views", "2", "--image-size", "32", "--samples",
                              "3000", "--resolution", "40", "--test-count", "4", "--val-count", "1", "--workers", "1",
                              "--out", str(data)]) == 0
    exp = tmp_path / "exp"
    exp.mkdir()
    specs = json.loads((REPO / "experiments" / f"{ds}_svr" / "specs.json").read_text())
    specs.update({"DataSource": str(data), "TrainSplit": str(data / ds / "split_train.json"),
                  "TestSplit": str(data / ds / "split_test.json"), "ValidationSplit": str(data / ds / "split_val.json"),
                  "ImageSize": None, "NumberOfViews": 2, "NumEpochs": 60, "SnapshotFrequency": 1000, "LogFrequency": 5,
                  "SamplesPerScene": 512, "ScenesPerBatch": 1, "CodeLength": 4, "EncoderWidths": [4, 8, 8, 8],
                  "LearningRateSchedule": [{"Type": "Constant", "Value": 0.01}], "ClampingDistance": 1.0,
                  "DecoderInit": None, "ReconstructionResolution": 20, "RefinementIterations": 3,
                  "ChamferSamples": 300})
    specs["NetworkSpecs"]["dims"] = [32, 32, 32, 32]
    (exp / "specs.json").write_text(json.dumps(specs))
    with one_thread():
        assert train_svr.main(["-e", str(exp), "--device", "cpu"]) == 0
    return exp


def assert_same_folders(a: Path, b: Path) -> None:
    """Instance folders of ``b`` hold what those of ``a`` hold: logs within rounding, meshes equal,
    pictures byte for byte, meta.json equal but for the wall time."""
    assert sorted(p.name for p in b.iterdir()) == sorted(p.name for p in a.iterdir())
    for folder in a.iterdir():
        other = b / folder.name
        names = sorted(p.name for p in folder.iterdir())
        assert sorted(p.name for p in other.iterdir()) == names
        for name in names:
            x, y = folder / name, other / name
            if name.endswith(".npy"):
                np.testing.assert_allclose(np.load(y), np.load(x), rtol=1e-6, atol=1e-9, err_msg=str(y))
            elif name.endswith(".ply"):
                for u, v in zip(read_mesh(x), read_mesh(y)):
                    np.testing.assert_allclose(v, u, rtol=0, atol=1e-6, err_msg=str(y))
            elif name == "meta.json":
                mx, my = json.loads(x.read_text()), json.loads(y.read_text())
                mx.pop("seconds"), my.pop("seconds")
                assert my == mx
            else:
                assert y.read_bytes() == x.read_bytes(), y


def torchrun(nproc: int, script: Path, *args, quiet: bool = True) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=nproc script args`` (1 thread per process)."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MESHSDF_QUIET="1" if quiet else "0")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           "--monitor_interval=0.1", str(script), *map(str, args)]
    return subprocess.run(cmd, check=False, capture_output=True, text=True, env=env, cwd=REPO, timeout=300)


def records(folder: Path) -> dict:
    """rank -> the instance folders that rank finished (the wrapper's record files)."""
    return {int(p.stem[4:]): p.read_text().split() for p in folder.glob("rank*.txt")}


def test_shared_counter_counts_in_a_single_process():
    counter = distributed.SharedCounter("jobs")
    assert [counter.take() for _ in range(3)] == [0, 1, 2]
    assert distributed.sum_over_ranks(7) == 7


@pytest.mark.slow
def test_two_processes_share_the_split_and_a_killed_rank_is_finished_by_the_rerun(tmp_path):
    import reconstruct_svr

    exp = toy_cars_experiment(tmp_path)
    one = tmp_path / "one"
    with one_thread():   # as the torchrun workers (OMP_NUM_THREADS=1): same sums, same rounding
        assert reconstruct_svr.main(["-e", str(exp), "--device", "cpu", "--out", str(one)]) == 0
    assert sorted(p.name for p in one.iterdir()) == TEST_NAMES
    assert all(np.isfinite(np.load(one / n / "log_chd.npy")).all() for n in TEST_NAMES)  # real surfaces
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))

    # clean run: exit 0, each instance by exactly one rank, both ranks busy, folders as one process's
    rec = tmp_path / "clean"
    rec.mkdir()
    r = torchrun(2, wrapper, rec, "none", "-e", exp, "--device", "cpu")
    assert r.returncode == 0, r.stderr[-3000:]
    done = records(rec)
    assert sorted(done[0] + done[1]) == TEST_NAMES and done[0] and done[1]
    root = exp / "Reconstructions" / "latest"
    assert_same_folders(one, root)

    # killed rank: the process writing car_004 dies half-way; the same command then finishes the rest
    out = tmp_path / "two"
    first, second = tmp_path / "first", tmp_path / "second"
    first.mkdir(), second.mkdir()
    r = torchrun(2, wrapper, first, "car_004", "-e", exp, "--device", "cpu", "--out", out)
    assert r.returncode != 0
    before = [n for names in records(first).values() for n in names]
    assert "car_004" not in before and len(before) == len(set(before))
    assert not (out / "car_004").exists()
    r = torchrun(2, wrapper, second, "none", "-e", exp, "--device", "cpu", "--out", out, quiet=False)
    assert r.returncode == 0, r.stderr[-3000:]
    after = [n for names in records(second).values() for n in names]
    assert sorted(before + after) == TEST_NAMES          # every instance once over the two runs
    assert "car_004" in after
    assert_same_folders(one, out)                        # the half-written folder was replaced, not kept
    # one line from rank 0 at the end: how many and where
    assert r.stderr.splitlines()[-1] == f"wrote {len(after)} reconstructions to {out} (2 processes (gloo))", r.stderr
