#!/usr/bin/env python
"""Time iso-surface extraction modes and the MeshSDF layer on the bob_and_spot network.

Uses experiments/bob_and_spot (specs.json NetworkSpecs, CodeLength 2) with its trained
checkpoint (ModelParameters/latest.pth + LatentCodes/latest.pth) when present; otherwise
the same network with random weights whose output is added, scaled by 0.01, to the SDF of a
torus, so that every evaluation costs a full network pass and the surface is sensible.
All ratios are measured in this run (the machine may be shared).  Prints:

  1. sparse vs dense at each resolution: time, SDF evaluations, ratio, identical-mesh check
     (bitwise equal arrays and :func:`lib.isosurface.same_mesh`), and the marching-cubes
     part alone: torch (sign-changing cells) vs scikit-image on the full grid;
  2. per-iteration time of dense / fast / sparse along a latent path (spot towards bob, in
     small steps, as in an optimisation), with fast's lost-surface report and sparse == dense;
  3. forward and backward time of the MeshSDF layer (lib.meshsdf.mesh_from_sdf).

Usage: python benchmarks/extraction.py [-e experiments/bob_and_spot] [--resolutions 64 128 256]
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import checkpoint, runtime  # noqa: E402
from lib.errors import cli_main  # noqa: E402
from lib.isosurface import (cell_corner_values, crossing_cells, extract, marching_cubes,  # noqa: E402
                            marching_cubes_cells, same_mesh)
from lib.meshsdf import mesh_from_sdf  # noqa: E402
from lib.models.decoder import decoder_from_specs  # noqa: E402
from lib.models.decoder import sdf as decoder_sdf  # noqa: E402
from lib.specs import REPO_ROOT, load_specs  # noqa: E402


class TorusPlusNet(torch.nn.Module):
    """Fallback decoder: torus SDF + 0.01 * (untrained bob_and_spot network); latent (L,)."""

    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, inp):
        x = inp[:, -3:]
        q = torch.stack((x[:, :2].norm(dim=1) - 0.45 - 0.05 * inp[:, 0], x[:, 2]), 1)
        return (q.norm(dim=1) - 0.2).unsqueeze(1) + 0.01 * self.net(inp)


def load(exp: Path, device, fallback: bool):
    specs = load_specs(exp)
    try:
        if fallback:
            raise FileNotFoundError("--fallback")
        dec = checkpoint.load_decoder(exp, specs, device=device)
        codes = checkpoint.load_latent_codes(exp, device=device)
        return dec, codes, f"trained checkpoint (epoch {dec.checkpoint_epoch}) of {exp}"
    except Exception as err:  # noqa: BLE001 - any missing/bad checkpoint: fall back
        torch.manual_seed(0)
        net = decoder_from_specs(specs).to(device).eval()
        codes = torch.tensor([[0.5, 0.0], [-0.5, 0.0]], device=device)
        return TorusPlusNet(net).eval(), codes, f"no usable checkpoint ({err}); torus + untrained network"


def timed(fn, repeat=1):
    best, out = float("inf"), None
    for _ in range(repeat):
        t = time.perf_counter()
        out = fn()
        best = min(best, time.perf_counter() - t)
    return best, out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-e", "--experiment", default=str(REPO_ROOT / "experiments" / "bob_and_spot"))
    ap.add_argument("--resolutions", type=int, nargs="+", default=[64, 128, 256])
    ap.add_argument("--path-resolution", type=int, default=64, help="resolution of parts 2 and 3 (demo: 64)")
    ap.add_argument("--iterations", type=int, default=8, help="latent steps in part 2")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (default 1: on a shared CPU, multi-threaded small ops wait for busy cores)")
    ap.add_argument("--fallback", action="store_true",
                    help="use the torus + untrained network even if a checkpoint exists")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = runtime.choose_device(args.device)
    dec, codes, what = load(Path(args.experiment), device, args.fallback)
    for p in dec.parameters():
        p.requires_grad_(False)
    print(f"decoder: {what}; device {device}, {torch.get_num_threads()} threads")
    spot = codes[1] if codes.shape[0] > 1 else codes[0]
    bob = codes[0]
    fn = lambda z: (lambda p: decoder_sdf(dec, z, p, 2 ** 16))  # noqa: E731

    print("\n1. sparse vs dense (shape: code 1); identical = lib.isosurface.same_mesh, * = not bitwise "
          "(decoder float rounding depends on the batch)")
    print(f"{'N':>5} {'dense s':>9} {'sparse s':>9} {'ratio':>7} {'dense evals':>12} {'sparse evals':>13} "
          f"{'evals ratio':>11} {'identical':>9} {'MC torch s':>10} {'MC skimage s':>12}")
    for n in args.resolutions:
        td, (vd, fd, sd) = timed(lambda: extract(fn(spot), n, "dense", device=device))
        ts, (vs, fs, ss) = timed(lambda: extract(fn(spot), n, "sparse", device=device))
        same, why = same_mesh(vd, fd, vs, fs)
        bitwise = torch.equal(vd, vs) and torch.equal(fd, fs)
        grid = sd.values.reshape(n, n, n)
        tmc, _ = timed(lambda: marching_cubes_cells(c := crossing_cells(grid), cell_corner_values(grid, c), n))
        tsk, _ = timed(lambda: marching_cubes(grid))
        print(f"{n:>5} {td:>9.2f} {ts:>9.2f} {td / ts:>6.1f}x {sd.evaluations:>12} {ss.evaluations:>13} "
              f"{sd.evaluations / ss.evaluations:>10.1f}x {str(same) + ('' if bitwise else '*'):>9} {tmc:>10.3f} "
              f"{tsk:>12.3f}" + ("" if same else f"  ({why})"))
        del sd, ss, grid

    n, k = args.path_resolution, args.iterations
    print(f"\n2. per iteration along a latent path, N = {n}: {k} steps of 1% of |bob - spot| from spot")
    path = [spot + (bob - spot) * 0.01 * i for i in range(k + 1)]
    states = {"dense": None, "fast": None, "sparse": None}
    totals = {m: 0.0 for m in states}
    evals = {m: 0 for m in states}
    missed, equal, bitwise = 0, 0, 0
    for i, z in enumerate(path):
        res = {}
        for mode in states:
            t, (v, f, st) = timed(lambda: extract(fn(z), n, mode, state=states[mode], device=device))
            states[mode] = st
            res[mode] = (v, f)
            if i:  # the first call of fast is a dense one
                totals[mode] += t
                evals[mode] += st.evaluations
        if i:
            missed += states["fast"].missed_vertices
            equal += same_mesh(*res["sparse"], *res["dense"])[0]
            bitwise += torch.equal(res["sparse"][0], res["dense"][0]) and torch.equal(res["sparse"][1], res["dense"][1])
    for mode in states:
        print(f"  {mode:>6}: {totals[mode] / k:7.3f} s/iteration, {evals[mode] // k:>8} evaluations/iteration, "
              f"{totals['dense'] / totals[mode]:5.1f}x vs dense")
    print(f"  fast: {missed} lost-surface vertices over the path; sparse identical to dense in {equal}/{k} "
          f"iterations ({bitwise} bitwise)")

    print(f"\n3. MeshSDF layer, N = {n}, loss = sum of squared vertex coordinates")
    warm = spot.clone().requires_grad_(True)  # first autograd call pays one-off set-up costs
    (mesh_from_sdf(dec, warm, n).verts ** 2).sum().backward()
    for mode in ("sparse", "dense"):
        for gradient in ("paper", "exact"):
            z = spot.clone().requires_grad_(True)
            tf, mesh = timed(lambda: mesh_from_sdf(dec, z, n, mode=mode, gradient=gradient))
            loss = (mesh.verts ** 2).sum()
            tb, _ = timed(lambda: loss.backward())
            print(f"  {mode:>6} {gradient:>5}: forward {tf:6.3f} s, backward {tb:6.3f} s "
                  f"({mesh.verts.shape[0]} vertices), |dL/dz| = {z.grad.norm():.4g}")
    return 0


if __name__ == "__main__":
    cli_main(main)
