#!/usr/bin/env python
"""Run the whole toy single-view-reconstruction pipeline and report its acceptance figures.

Stages (each a subprocess, timed with the wall clock):
  1. prepare_data.py --builtin toy_cars --count 48 --test-count 8 --image-size 64 ...
  2. train_deep_sdf.py -e experiments/toy_cars_deepsdf --no-reconstruct   (the decoder's init)
  3. train_svr.py -e experiments/toy_cars_svr
  4. reconstruct_svr.py -e experiments/toy_cars_svr
  5. metrics_svr.py -e experiments/toy_cars_svr
then prints the seconds per stage, mean raw / refined Chamfer (x1000) and normal
consistency (%) over the test views and the fraction of views whose Chamfer refinement
lowered (goal >= 80 %).  The load average is printed too: on a shared machine the stage
times scale with it.

Usage: python benchmarks/svr_toy_pipeline.py [--skip-prepare] [--skip-train] [--workers 2]
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
EXP = "experiments/toy_cars_svr"
PREPARE = ["prepare_data.py", "--builtin", "toy_cars", "--count", "48", "--test-count", "8", "--image-size", "64",
           "--views", "24", "--samples", "100000", "--resolution", "96"]


def run(args: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run([sys.executable] + args, cwd=REPO, check=True)
    return time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--skip-prepare", action="store_true", help="reuse data/toy_cars")
    ap.add_argument("--skip-train", action="store_true", help="reuse the trained networks")
    ap.add_argument("--workers", type=int, default=2, help="prepare_data.py --workers (default 2)")
    args = ap.parse_args()
    times = {}
    load0 = os.getloadavg()[0]
    if not args.skip_prepare:
        times["prepare"] = run(PREPARE + ["--workers", str(args.workers)])
    if not args.skip_train:
        times["train_deep_sdf"] = run(["train_deep_sdf.py", "-e", "experiments/toy_cars_deepsdf", "--no-reconstruct",
                                        "--overwrite"])  # a rerun moves the previous networks into Backups/
        times["train_svr"] = run(["train_svr.py", "-e", EXP, "--overwrite"])
    times["reconstruct"] = run(["reconstruct_svr.py", "-e", EXP])
    times["metrics"] = run(["metrics_svr.py", "-e", EXP])
    rows = list(csv.DictReader((REPO / EXP / "Results" / "svr_metrics.csv").open()))
    views, mean = rows[:-1], rows[-1]
    better = sum(float(r["chamfer_refined_x1000"]) < float(r["chamfer_raw_x1000"]) for r in views)
    print("\nstage seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in times.items())
          + f" (total {sum(times.values()):.0f} s; load average {load0:.1f} at start, {os.getloadavg()[0]:.1f} at end,"
          f" {os.cpu_count()} cores)")
    print(f"Chamfer x1000: raw {float(mean['chamfer_raw_x1000']):.3f} -> refined "
          f"{float(mean['chamfer_refined_x1000']):.3f}; normal consistency %: raw {float(mean['nc_raw_pct']):.2f} -> "
          f"refined {float(mean['nc_refined_pct']):.2f}")
    print(f"refinement lowered Chamfer in {better}/{len(views)} test views ({100 * better / len(views):.0f} %, goal >= 80 %)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
