#!/usr/bin/env python
"""Time the spot -> bob demo per extraction mode, and the whole default demo.

On experiments/bob_and_spot (shipped checkpoint), at the demo's settings (N = 64, 512 x 512,
lr 5e-2, MSE silhouette loss, paper gradient):

  1. dense, sparse (the default) and fast optimisers run the same --iterations steps from
     spot, interleaved step by step (so load from other processes hits all three alike).
     Per mode: median seconds per iteration (wall and process CPU), SDF evaluations per
     iteration, speed-up over dense (targets: sparse >= 4x, fast >= 8x), and the final
     silhouette IoU with bob's and the final genus (bob: 1).
  2. the whole default command ``demo_optimizer.py -e experiments/bob_and_spot`` (100
     iterations, movie, plots) timed end to end (target: under 2 minutes on 2 cores).

Usage: python benchmarks/demo.py [--iterations 100] [--threads T] [--skip-full] [--device cpu]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import demo_optimizer  # noqa: E402
from lib import checkpoint, runtime  # noqa: E402
from lib.camera import look_at  # noqa: E402
from lib.errors import cli_main  # noqa: E402
from lib.meshsdf import mesh_from_sdf  # noqa: E402
from lib.metrics import silhouette_iou  # noqa: E402
from lib.optimize import LatentOptimizer, SilhouetteLoss, SurfaceLostError, demo_sigma  # noqa: E402
from lib.render import silhouette  # noqa: E402
from lib.specs import REPO_ROOT, load_specs  # noqa: E402

MODES = ("dense", "sparse", "fast")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-e", "--experiment", default=str(REPO_ROOT / "experiments" / "bob_and_spot"))
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--resolution", type=int, default=64)
    ap.add_argument("--image-size", type=int, default=512)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--skip-full", action="store_true", help="skip part 2 (the whole default demo)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = runtime.choose_device(args.device)
    exp = Path(args.experiment)
    specs = load_specs(exp)
    decoder = checkpoint.load_decoder(exp, specs, device=device)
    codes = checkpoint.load_latent_codes(exp, device=device)
    camera = look_at(demo_optimizer.AZIMUTH, demo_optimizer.ELEVATION, demo_optimizer.DISTANCE,
                     image_size=args.image_size, device=device)
    with torch.no_grad():
        bob = mesh_from_sdf(decoder, codes[0], args.resolution, "dense")
        target = silhouette(bob.verts, bob.faces, camera, sigma=demo_sigma(args.image_size))
    print(f"checkpoint epoch {decoder.checkpoint_epoch}; device {device}, {torch.get_num_threads()} threads; "
          f"N = {args.resolution}, {args.image_size}^2, {args.iterations} iterations")

    print(f"\n1. per iteration, modes interleaved step by step")
    opts = {m: LatentOptimizer(decoder, codes[1], SilhouetteLoss(camera, target), lr=5e-2,
                               resolution=args.resolution, mode=m) for m in MODES}
    wall = {m: [] for m in MODES}
    cpu = {m: [] for m in MODES}
    evals = {m: [] for m in MODES}
    stopped = {m: "" for m in MODES}
    for _ in range(args.iterations):
        for m in MODES:
            if stopped[m]:
                continue
            c0, w0 = time.process_time(), time.perf_counter()
            try:
                it = opts[m].step()
            except SurfaceLostError as err:
                stopped[m] = str(err)
                continue
            wall[m].append(time.perf_counter() - w0)
            cpu[m].append(time.process_time() - c0)
            evals[m].append(it.state.evaluations)
    print(f"{'mode':>7} {'s/it wall':>10} {'s/it cpu':>9} {'x dense wall':>13} {'x dense cpu':>12} "
          f"{'evals/it':>9} {'final IoU':>10} {'genus':>6}")
    ref_w, ref_c = statistics.median(wall["dense"]), statistics.median(cpu["dense"])
    for m in MODES:
        if stopped[m] and not wall[m]:
            print(f"{m:>7}: stopped at once: {stopped[m]}")
            continue
        mw, mc = statistics.median(wall[m]), statistics.median(cpu[m])
        try:
            final = opts[m].evaluate()
            iou, g = silhouette_iou(final.image, target), final.genus
        except SurfaceLostError:
            iou, g = float("nan"), "-"
        print(f"{m:>7} {mw:>10.3f} {mc:>9.3f} {ref_w / mw:>12.1f}x {ref_c / mc:>11.1f}x "
              f"{statistics.median(evals[m]):>9.0f} {iou:>10.3f} {g!s:>6}" + (f"  stopped: {stopped[m]}" if stopped[m] else ""))
    print("  targets: sparse >= 4x, fast >= 8x faster than dense; bob's genus is 1")

    if not args.skip_full:
        print("\n2. whole default demo: demo_optimizer.py -e", exp)
        with tempfile.TemporaryDirectory() as tmp:
            c0, w0 = time.process_time(), time.perf_counter()
            demo_optimizer.main(["-e", str(exp), "--out", tmp] + (["--device", args.device] if args.device else []))
            w, c = time.perf_counter() - w0, time.process_time() - c0
        print(f"  {w:.1f} s wall ({c:.1f} s process CPU) for 100 iterations + outputs; target < 120 s")
    return 0


if __name__ == "__main__":
    cli_main(main)
