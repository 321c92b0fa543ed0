#!/usr/bin/env python
"""Training steps per second with 1 and 2 processes (torchrun + DDP), same global batch.

Builds a temporary experiment (spheres of several radii, a DeepSDF decoder of --dims),
then runs ``train_deep_sdf.py`` in rounds, interleaved so that other load on the machine
affects all configurations alike:

  * plain:     python train_deep_sdf.py              (1 process, no torchrun, all cores)
  * plain_1t:  the same with 1 thread                  (no intra-op threading)
  * torchrun1: torchrun --nproc_per_node=1 ...        (launcher overhead only)
  * torchrun2: torchrun --nproc_per_node=2 ...        (DDP, gloo on CPU / nccl on CUDA)

Processes get cores / nproc threads each (plain_1t: 1), so the runs use the same CPU.
On a busy machine intra-op threads wait for each other (a core taken by another job stalls
the whole GEMM), so compare torchrun2 with plain_1t as well as with plain.  Steps/s come from
rank 0's per-epoch times in Logs.pth (epoch 1, the warm-up, excluded); the wall time with
start-up is shown too.  Prints the best of --rounds per configuration and the ratios to
``plain``.  Usage: python benchmarks/scaling.py [--rounds 2] [--epochs 6] [--device cpu]

``--trainer svr`` runs ``train_svr.py`` instead: the same spheres with --views RGBA renders
of --image-size px each and an encoder of --encoder widths (instance norm, depth 8: one block per
stage), decoder lr = encoder lr.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib import experiment  # noqa: E402
from lib.datasets.sampling import split_by_sign, write_sdf_samples  # noqa: E402


def make_experiment(root: Path, scenes: int, batch: int, samples: int, dims: list[int], epochs: int) -> Path:
    rng = np.random.default_rng(0)
    names = []
    for k in range(scenes):
        p = rng.uniform(-1, 1, (50_000, 3)).astype(np.float32)
        sdf = np.linalg.norm(p, axis=1) - (0.2 + 0.6 * k / max(1, scenes - 1))
        write_sdf_samples(root / "data" / "bench" / "s" / f"ball{k}.npz", *split_by_sign(np.column_stack([p, sdf])))
        names.append(f"ball{k}")
    (root / "split.json").write_text(json.dumps({"bench": {"s": names}}))
    exp = root / "exp"
    exp.mkdir(parents=True, exist_ok=True)
    specs = {
        "DataSource": str(root / "data"), "TrainSplit": str(root / "split.json"), "NetworkArch": "deep_sdf_decoder",
        "NetworkSpecs": {"dims": dims, "dropout": list(range(len(dims))), "dropout_prob": 0.2,
                         "norm_layers": list(range(len(dims))), "latent_in": [len(dims) // 2], "weight_norm": True},
        "CodeLength": 64, "NumEpochs": epochs, "SnapshotFrequency": 10_000, "LogFrequency": 10_000,
        "LearningRateSchedule": [{"Type": "Constant", "Value": 5e-4}, {"Type": "Constant", "Value": 1e-3}],
        "SamplesPerScene": samples, "ScenesPerBatch": batch, "ClampingDistance": 0.1,
    }
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


def make_svr_experiment(root: Path, exp: Path, scenes: int, views: int, size: int, widths: list[int]) -> Path:
    """Turn ``make_experiment``'s folder into an SVR one: random-disk RGBA renders + DISN metadata."""
    from lib.render import DisnView, format_disn_line
    from lib.io import save_png

    rng = np.random.default_rng(1)
    yy, xx = np.mgrid[:size, :size] + 0.5
    for k in range(scenes):
        d = root / "data" / "bench" / "renders" / f"ball{k}"
        for v in range(views):
            img = np.zeros((size, size, 4), np.float32)
            cx, cy, r = rng.uniform(0.3, 0.7) * size, rng.uniform(0.3, 0.7) * size, rng.uniform(0.15, 0.3) * size
            img[np.hypot(xx - cx, yy - cy) < r] = [*rng.uniform(0, 1, 3), 1.0]
            save_png(d / f"{v:02d}.png", img)
        (d / "rendering_metadata.txt").write_text(
            "".join(format_disn_line(DisnView(360.0 * v / views, 25.0, 0.0, 0.7, 25.0)) + "\n" for v in range(views)))
    specs = json.loads((exp / "specs.json").read_text())
    specs.update(ImageSize=size, NumberOfViews=views, DecoderLearningRateFactor=1.0,
                 NormType="in", Depth=8, EncoderWidths=widths,
                 LearningRateSchedule=[{"Type": "Constant", "Value": 5e-4}])
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


CONFIGS = {"plain": (None, None), "plain_1t": (None, 1), "torchrun1": (1, None), "torchrun2": (2, None)}


def run(config: str, exp: Path, device: str, cores: int, trainer: str = "deep_sdf") -> tuple[float, float, int]:
    """One training run from scratch; returns (steady steps/s, wall seconds, steps)."""
    for sub in ("ModelParameters", "OptimizerParameters", "LatentCodes"):
        for p in (exp / sub).glob("*.pth"):
            p.unlink()
    (exp / "Logs.pth").unlink(missing_ok=True)
    nproc, threads = CONFIGS[config]
    threads = threads or max(1, cores // (nproc or 1))
    env = dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS=str(threads))
    script = [str(REPO / f"train_{trainer}.py"), "-e", str(exp), "--device", device]
    if trainer == "deep_sdf":
        script.append("--no-reconstruct")
    if nproc is None:
        cmd = [sys.executable, *script]
    else:
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *script]
    t0 = time.perf_counter()
    r = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if r.returncode != 0:
        raise SystemExit(f"{config} failed:\n{r.stderr[-2000:]}")
    logs = experiment.load_logs(exp)
    steps_per_epoch = len(logs["loss"]) // len(logs["log_epochs"])
    steady = logs["timing"][1:] or logs["timing"]
    return steps_per_epoch * len(steady) / sum(steady), wall, len(logs["loss"])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--epochs", type=int, default=6)
    ap.add_argument("--scenes", type=int, default=8)
    ap.add_argument("--batch", type=int, default=8, help="ScenesPerBatch (global)")
    ap.add_argument("--samples", type=int, default=4096, help="SamplesPerScene")
    ap.add_argument("--dims", default="128x4", help="hidden widths x layers (bob_and_spot: 128x8)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--cores", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--trainer", choices=("deep_sdf", "svr"), default="deep_sdf",
                    help="train_deep_sdf.py or train_svr.py (adds renders and an encoder)")
    ap.add_argument("--views", type=int, default=4, help="svr: renders per instance")
    ap.add_argument("--image-size", type=int, default=32, help="svr: ImageSize")
    ap.add_argument("--encoder", default="8,16,32,64", help="svr: the 4 encoder stage widths")
    args = ap.parse_args()
    width, depth = (int(v) for v in args.dims.split("x"))
    configs = tuple(CONFIGS)
    best = {c: (0.0, float("inf"), 0) for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        exp = make_experiment(Path(tmp), args.scenes, args.batch, args.samples, [width] * depth, args.epochs)
        if args.trainer == "svr":
            make_svr_experiment(Path(tmp), exp, args.scenes, args.views, args.image_size,
                                [int(w) for w in args.encoder.split(",")])
        for r in range(args.rounds):
            for c in configs:
                sps, wall, steps = run(c, exp, args.device, args.cores, args.trainer)
                print(f"round {r + 1} {c:10s} {sps:7.2f} steps/s  {wall:6.1f} s wall ({steps} steps)", flush=True)
                best[c] = (max(best[c][0], sps), min(best[c][1], wall), steps)
    svr = (f", encoder {args.encoder} on {args.image_size} px ({args.views} views)" if args.trainer == "svr" else "")
    print(f"\ntrain_{args.trainer}: {args.scenes} scenes, global batch {args.batch} x {args.samples} samples, "
          f"decoder {args.dims}{svr}, {args.device}, {args.cores} cores, load {os.getloadavg()[0]:.1f}")
    print(f"{'config':10s} {'steps/s':>8s} {'vs plain':>9s} {'wall s':>7s}")
    for c in configs:
        print(f"{c:10s} {best[c][0]:8.2f} {best[c][0] / best['plain'][0]:8.2f}x {best[c][1]:7.1f}")


if __name__ == "__main__":
    main()
