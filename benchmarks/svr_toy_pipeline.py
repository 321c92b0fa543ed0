#!/usr/bin/env python
"""Run a whole toy single-view-reconstruction pipeline (cars or chairs) and report its acceptance figures.

Stages (each a subprocess, timed with the wall clock), for --family F in cars, chairs:
  1. prepare_data.py --builtin toy_F --count 56 --val-count 8 --test-count 8 --image-size 64 ...
  2. train_deep_sdf.py -e experiments/toy_F_deepsdf --no-reconstruct   (the decoder's init)
  3. train_svr.py -e experiments/toy_F_svr
  4. reconstruct_svr.py -e experiments/toy_F_svr        (the original's protocol, the specs' settings)
  5. metrics_svr.py -e experiments/toy_F_svr
then prints the seconds per stage, the seven lines of metrics_svr.py, and the fraction of test
instances whose Chamfer refinement lowered (goal >= 80 %).  The load average is printed too:
on a shared machine the stage times scale with it.

``--validate LR [LR ...]`` instead reconstructs the ValidationSplit with each refinement
learning rate (and ``--sigmas``), into Reconstructions/validation_lr<LR>_s<SIGMA>/, and prints
their figures: the way the toy specs' RefinementLearningRate / SilhouetteSigma were chosen,
without looking at the test views.

Usage: python benchmarks/svr_toy_pipeline.py --family cars|chairs [--skip-prepare] [--skip-train]
       python benchmarks/svr_toy_pipeline.py --family chairs --validate 5e-4 2e-3 5e-3
"""
from __future__ import annotations

import argparse
import csv
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def prepare_command(family: str) -> list[str]:
    return ["prepare_data.py", "--builtin", f"toy_{family}", "--count", "56", "--val-count", "8", "--test-count", "8",
            "--image-size", "64", "--views", "24", "--samples", "100000", "--resolution", "96"]


def run(args: list[str], capture: bool = False) -> tuple[float, str]:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable] + args, cwd=REPO, check=True, text=True,
                       stdout=subprocess.PIPE if capture else None)
    return time.perf_counter() - t0, p.stdout or ""


def figures(root: Path) -> tuple[str, int, int]:
    """(the seven lines, instances improved, instances) of a metrics_svr.py output folder."""
    text = (root / "svr_metrics.txt").read_text().splitlines()
    rows = list(csv.DictReader((root / "svr_metrics.csv").open()))[:-1]
    better = sum(float(r["chamfer_refined_x1000"]) < float(r["chamfer_raw_x1000"]) for r in rows)
    return "\n".join(text[:7]), better, len(rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=("cars", "chairs"), default="cars", help="toy family (default cars)")
    ap.add_argument("--skip-prepare", action="store_true", help="reuse data/toy_<family>")
    ap.add_argument("--skip-train", action="store_true", help="reuse the trained networks")
    ap.add_argument("--workers", type=int, default=2, help="prepare_data.py --workers (default 2)")
    ap.add_argument("--validate", nargs="+", type=float, default=None, metavar="LR",
                    help="reconstruct the validation split with these refinement learning rates instead")
    ap.add_argument("--sigmas", nargs="+", type=float, default=None, metavar="SIGMA",
                    help="with --validate: these SilhouetteSigma values too (default: the specs')")
    args = ap.parse_args()
    exp = f"experiments/toy_{args.family}_svr"
    load0 = os.getloadavg()[0]
    if args.validate:
        for sigma in args.sigmas or [None]:
            for lr in args.validate:
                name = f"validation_lr{lr:g}" + ("" if sigma is None else f"_s{sigma:g}")
                out = REPO / exp / "Reconstructions" / name
                extra = [] if sigma is None else ["--sigma", str(sigma)]
                seconds, _ = run(["reconstruct_svr.py", "-e", exp, "--split", "validation", "--lr", str(lr),
                                  "--out", str(out)] + extra)
                run(["metrics_svr.py", "-e", exp, "--out", str(out)], capture=True)
                six, better, n = figures(out)
                print(f"\n== validation, lr {lr:g}, sigma {'specs' if sigma is None else f'{sigma:g}'} "
                      f"({seconds:.0f} s): Chamfer lowered for {better}/{n}\n{six}")
        return 0
    times = {}
    if not args.skip_prepare:
        times["prepare"] = run(prepare_command(args.family) + ["--workers", str(args.workers)])[0]
    if not args.skip_train:
        times["train_deep_sdf"] = run(["train_deep_sdf.py", "-e", f"experiments/toy_{args.family}_deepsdf",
                                       "--no-reconstruct", "--overwrite"])[0]  # a rerun moves the old one to Backups/
        times["train_svr"] = run(["train_svr.py", "-e", exp, "--overwrite"])[0]
    times["reconstruct"] = run(["reconstruct_svr.py", "-e", exp])[0]
    times["metrics"], table = run(["metrics_svr.py", "-e", exp], capture=True)
    six, better, n = figures(REPO / exp / "Reconstructions" / "latest")
    print(table)
    print("stage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f" (total {sum(times.values()):.0f} s; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end,"
          f" {os.cpu_count()} cores)")
    print(f"refinement lowered Chamfer for {better}/{n} test instances ({100 * better / n:.0f} %, goal >= 80 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
