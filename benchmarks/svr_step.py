#!/usr/bin/env python
"""One SVR refinement step at the original's defaults, this tree against a baseline commit, side by side.

The instance: the bob_and_spot network (experiments/bob_and_spot, its trained checkpoint),
refining spot's code towards bob's hard silhouette at 224 px (the demo camera), bob's dense
mesh at N = 256 as the ground truth; reconstruct_svr.py's refinement as it runs by default
(lib.svr.reconstruct_view: N = 256, the fast heuristic, the soft silhouette with 25 faces per
pixel, Adam lr 5e-5, Chamfer on 10,000 samples and image normal consistency every step).

Each baseline commit is checked out into a temporary git worktree (removed afterwards); all
trees run the same child script (with this tree's checkpoint, so the instance is the same) in
turn, in fresh processes, ``--rounds`` times alternately (so a busy machine slows both alike).
Each child sets its process up as that tree's reconstruct_svr.py does before torch loads (idle
OpenMP threads sleeping: ``lib.cli.setup_process``, or ``import lib`` in trees before the
package), so every tree runs as its script runs (the JSON records each tree's OpenMP wait
policy).  A step's time is the wall time between two successive log entries (the first entry,
whose extraction is the dense one, is left out); the figure of a tree is the median step of its best
round; an instance at the defaults is estimated as its first step (the raw mesh's dense
extraction) plus 100 such steps.  The logged curves (silhouette loss, Chamfer,
normal consistency, mean z^2, IoU) of each baseline and this tree are compared entry by entry
(a baseline from before SPEC §11.4's normal-consistency protocol differs there by design;
compare with the branch point for "same results").

Writes benchmarks/results/svr_step.json: per tree the seconds per step and per instance,
the speed-up (baseline / this tree), the largest relative difference of each curve, the
machine and the thread count.  ``--profile`` instead prints a torch.profiler table of ``--iterations``
steps of this tree; ``--stages`` its wall and process CPU time (all threads) per step inside each
profiler label opened on the main thread (nested labels count in their parents too; work a label
hands to other threads shows in its CPU column), so that a stage leaving a core idle shows as
CPU below twice its wall on 2 cores.

Usage: python benchmarks/svr_step.py [--baseline ad80820 [COMMIT ...]] [--iterations 20] [--rounds 2]
       python benchmarks/svr_step.py --profile [--iterations 10]
       python benchmarks/svr_step.py --stages [--iterations 10]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
CURVES = ("silhouette_loss", "chamfer", "normal_consistency", "latent", "iou")
# this tree's network for every tree: the same instance whatever checkpoint a baseline shipped
EXPERIMENT = REPO / "experiments" / "bob_and_spot"

# the child: run in a tree's root (its lib/ first on sys.path), prints one JSON line
CHILD = r'''
import json, os, statistics, sys, time
sys.path.insert(0, ".")
# the process set-up of the tree's scripts, before torch loads (OpenMP reads its wait policy once):
# lib.cli.setup_process where the package has it (importing lib has no side effects there),
# else importing lib, which set the policy in older trees
try:
    from lib.cli import setup_process
except ImportError:
    import lib  # noqa: F401
else:
    setup_process()
import torch
try:
    from lib.experiment import load_decoder_and_codes
    from lib.experiment.specs import load_specs
except ImportError:           # trees before the experiment package
    from lib.checkpoint import load_decoder_and_codes
    from lib.specs import load_specs
from lib import runtime
try:
    from lib.render import demo_camera
except ImportError:           # trees before lib.render held the camera
    from lib.camera import demo_camera
from lib.isosurface import extract_dense
from lib.render import silhouette
from lib.svr import reconstruct_view, RefineSettings
from lib.svr.evaluate import GroundTruth
from lib.models.decoder import sdf as decoder_sdf

iterations, resolution, mode, exp = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
stages, timing = {}, [False]
if mode == "stages":
    # each profiler label entered on the main thread: its wall time and the process's CPU time
    # (all threads) while it is open, summed over the timed steps
    import contextlib, importlib, threading
    main_thread = threading.get_ident()
    @contextlib.contextmanager
    def labelled(name, *args, **kwargs):
        if not timing[0] or threading.get_ident() != main_thread:
            yield
            return
        w, c = time.perf_counter(), time.process_time()
        try:
            yield
        finally:
            e = stages.setdefault(name, [0.0, 0.0, 0])
            e[0] += time.perf_counter() - w
            e[1] += time.process_time() - c
            e[2] += 1
    torch.profiler.record_function = labelled
    for name in ("lib.isosurface.dense", "lib.layer.field"):   # modules holding the name itself
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        if hasattr(module, "record_function"):
            module.record_function = labelled
threads = runtime.apply_thread_policy()
decoder, codes = load_decoder_and_codes(exp, load_specs(exp), "latest")
bob, spot = codes[0], codes[1]
camera = demo_camera(image_size=224)
with torch.no_grad():
    gv, gf = extract_dense(lambda p: decoder_sdf(decoder, bob, p), resolution)
alpha = silhouette(gv, gf, camera, sigma=0)
gt = GroundTruth(gv, gf, camera, 10000)
settings = RefineSettings(resolution=resolution, iterations=iterations)
stamps, cpu = [], []
def tick(i, entry):
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    timing[0] = 1 <= i < iterations          # the steps timed below: from entry 1 to entry T
def run():
    stamps.append(time.perf_counter())
    cpu.append(time.process_time())
    return reconstruct_view(decoder, spot.clone(), alpha, camera, gt, settings, on_iteration=tick)
if mode == "profile":
    from torch.profiler import profile as prof, ProfilerActivity
    with prof(activities=[ProfilerActivity.CPU]) as p:
        result = run()
    print(p.key_averages().table(sort_by="cpu_time_total", row_limit=45), file=sys.stderr)
else:
    result = run()
steps = [b - a for a, b in zip(stamps[2:], stamps[3:])]
cpu_steps = [b - a for a, b in zip(cpu[2:], cpu[3:])]
print(json.dumps({"step_seconds": statistics.median(steps), "steps": steps, "seconds": result.seconds,
                  "step_cpu_seconds": statistics.median(cpu_steps),
                  "first_step_seconds": stamps[1] - stamps[0],
                  "threads": threads, "faces": int(result.raw[1].shape[0]),
                  "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY", "default"),
                  "stages": {k: [w / len(steps), c / len(steps), n / len(steps)] for k, (w, c, n) in stages.items()},
                  "log": {k: [float(x) for x in result.log[k]] for k in result.log}}))
'''


def run_child(root: Path, iterations: int, resolution: int, mode: str = "time") -> dict:
    """Run CHILD in the tree ``root``; mode "time", "profile" (prints a table, returns {}) or "stages"."""
    profile = mode == "profile"
    env = dict(os.environ, MESHSDF_QUIET="1")
    p = subprocess.run([sys.executable, "-c", CHILD, str(iterations), str(resolution), mode,
                        str(EXPERIMENT)],
                       cwd=root, env=env, capture_output=not profile, text=True, check=False)
    if p.returncode != 0:
        raise SystemExit(f"benchmark child failed in {root}:\n{(p.stderr or '')[-3000:]}")
    return json.loads(p.stdout.strip().splitlines()[-1]) if p.stdout else {}


def largest_difference(a: list, b: list) -> float:
    """max |a - b| / max(|a|, 1e-12) over the entries (NaN where both are NaN counts as equal)."""
    worst = 0.0
    for x, y in zip(a, b):
        if math.isnan(x) and math.isnan(y):
            continue
        worst = max(worst, abs(x - y) / max(abs(x), 1e-12))
    return worst if len(a) == len(b) else float("inf")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", nargs="+", default=["ad80820"],
                    help="commits to compare with (default ad80820, #28's main)")
    ap.add_argument("--iterations", type=int, default=20, help="refinement iterations T (T + 1 steps; default 20)")
    ap.add_argument("--resolution", type=int, default=256, help="marching-cubes resolution (default 256)")
    ap.add_argument("--rounds", type=int, default=2, help="alternate runs per tree (default 2)")
    ap.add_argument("--profile", action="store_true", help="print a torch.profiler table of this tree instead")
    ap.add_argument("--stages", action="store_true",
                    help="print this tree's wall and process CPU time per step in each profiler label instead")
    args = ap.parse_args()
    if args.profile:
        run_child(REPO, args.iterations, args.resolution, mode="profile")
        return 0
    if args.stages:
        r = run_child(REPO, args.iterations, args.resolution, mode="stages")
        print(f"per step ({len(r['steps'])} steps, {r['threads']} threads, OpenMP wait {r['omp_wait_policy']}, "
              f"load {os.getloadavg()[0]:.2f}): wall {1e3 * r['step_seconds']:.0f} ms, "
              f"process CPU {1e3 * r['step_cpu_seconds']:.0f} ms (medians)")
        for k, (w, c, n) in sorted(r["stages"].items(), key=lambda kv: -kv[1][0]):
            print(f"  {k:28s} wall {1e3 * w:7.1f} ms  CPU {1e3 * c:7.1f} ms  ({n:.1f} per step)")
        return 0

    def head(root):
        return subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=True).stdout.strip()

    trees, made = {}, []
    try:
        for commit in args.baseline:
            base = Path(tempfile.mkdtemp(prefix="svr_step_base_"))
            subprocess.run(["git", "worktree", "add", "--detach", str(base), commit], cwd=REPO, check=True,
                           capture_output=True)
            made.append(base)
            trees[commit] = base
        trees["this"] = REPO
        runs: dict = {name: [] for name in trees}
        for r in range(args.rounds):
            for name, root in trees.items():
                t0 = time.perf_counter()
                runs[name].append(run_child(root, args.iterations, args.resolution))
                runs[name][-1]["commit"] = head(root)
                print(f"round {r + 1} {name}: {runs[name][-1]['step_seconds']:.3f} s per step, "
                      f"{runs[name][-1]['step_cpu_seconds']:.3f} CPU s "
                      f"({time.perf_counter() - t0:.0f} s in all)", flush=True)
    finally:
        for base in made:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    best = {k: min(v, key=lambda x: x["step_seconds"]) for k, v in runs.items()}
    result = {
        "what": "one SVR refinement step (reconstruct_view), bob_and_spot network, spot -> bob at 224 px",
        "resolution": args.resolution, "iterations": args.iterations, "mode": "fast", "rounds": args.rounds,
        "commits": {k: v["commit"] for k, v in best.items()},
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average": os.getloadavg()[0], "threads": best["this"]["threads"],
        "omp_wait_policy": {k: v.get("omp_wait_policy") for k, v in best.items()},
        "step_seconds": {k: v["step_seconds"] for k, v in best.items()},
        "speedup": {k: best[k]["step_seconds"] / best["this"]["step_seconds"] for k in args.baseline},
        # CPU seconds of the process per step (all its threads): less sensitive to other processes
        "step_cpu_seconds": {k: min(r["step_cpu_seconds"] for r in v) for k, v in runs.items()},
        # an instance at the defaults: the first step (dense extraction) and 100 more
        "instance_seconds_estimate": {k: v["first_step_seconds"] + 100 * v["step_seconds"] for k, v in best.items()},
        "largest_relative_difference": {b: {c: largest_difference(best[b]["log"][c], best["this"]["log"][c])
                                            for c in CURVES} for b in args.baseline},
        "logs": {k: v["log"] for k, v in best.items()},
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "svr_step.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for b in args.baseline:
        diff = result["largest_relative_difference"][b]
        cpu = result["step_cpu_seconds"]
        print(f"step: {b} {result['step_seconds'][b]:.3f} s, this tree {result['step_seconds']['this']:.3f} s: "
              f"{result['speedup'][b]:.2f}x (CPU s {cpu[b]:.3f} vs {cpu['this']:.3f}: {cpu[b] / cpu['this']:.2f}x); "
              "largest relative curve difference "
              + ", ".join(f"{k} {v:.1e}" for k, v in diff.items()))
    print(f"written to {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
