"""Benchmark: SDF sample generation for one bob-sized mesh (about 10.7k faces).

    python benchmarks/prepare_data.py [--samples 500000] [--mesh FILE]

Uses ../shared/meshes/bob.obj when present, else the built-in bob stand-in meshed at a
resolution giving a similar face count.  Prints the time of each stage, seconds per 100k
samples and the end-to-end time of ``prepare_mesh`` (files included), and compares the
closest-point query with trimesh's (rtree) on a subset, measured in the same run.
Target (issue 4): 500k samples of a bob-sized mesh in under 30 s on 2 cores.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib.datasets.sampling import normalization, prepare_mesh, sample_points, signed_distance  # noqa: E402


def load_mesh(path: str | None):
    from lib.io import read_mesh

    default = Path(__file__).resolve().parents[2] / "shared" / "meshes" / "bob.obj"
    if path or default.is_file():
        p = Path(path or default)
        return str(p), *read_mesh(p)
    from lib.datasets.shapes import bob, mesh_shape

    v, f = mesh_shape(bob(), 52)
    return "built-in bob @52", v.numpy(), f.numpy()


def timed(fn, *a):
    t = time.perf_counter()
    out = fn(*a)
    return out, time.perf_counter() - t


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--samples", type=int, default=500_000)
    ap.add_argument("--mesh", default=None)
    ap.add_argument("--baseline-points", type=int, default=5000, help="points for the trimesh comparison")
    args = ap.parse_args()
    import igl
    import torch

    name, v, f = load_mesh(args.mesh)
    v = normalization(v, f).apply(v)
    n = args.samples
    print(f"mesh {name}: {len(f)} faces; {n} samples; torch threads {torch.get_num_threads()}")

    rng = np.random.default_rng(0)
    pts, t_pts = timed(sample_points, v, f, n, rng)
    (sq, _, _), t_dist = timed(igl.point_mesh_squared_distance, pts, v, f.astype(np.int64))
    _, t_fwn = timed(igl.fast_winding_number, v, f.astype(np.int64), pts)
    _, t_sdf = timed(signed_distance, v, f, pts)
    with tempfile.TemporaryDirectory() as d:
        _, t_all = timed(prepare_mesh, v, f, d, "bench", "m", n)
    per100k = t_all / n * 1e5
    print(f"  point generation          {t_pts:7.2f} s")
    print(f"  closest point (libigl)    {t_dist:7.2f} s")
    print(f"  fast winding number       {t_fwn:7.2f} s")
    print(f"  signed_distance (both)    {t_sdf:7.2f} s")
    print(f"  prepare_mesh end to end   {t_all:7.2f} s   = {per100k:.2f} s per 100k samples"
          f"   (target 30 s for 500k: {'met' if t_all * 5e5 / n < 30 else 'NOT met'})")

    import trimesh

    m = trimesh.Trimesh(v, f, process=False)
    k = min(args.baseline_points, n)
    sub = np.ascontiguousarray(pts[rng.choice(n, k, replace=False)])  # same mix as the samples
    _, t_tm = timed(trimesh.proximity.closest_point, m, sub)
    _, t_ig = timed(igl.point_mesh_squared_distance, sub, v, f.astype(np.int64))
    print(f"  baseline trimesh.proximity.closest_point on {k} points: {t_tm:.2f} s vs libigl {t_ig:.3f} s"
          f" -> libigl {t_tm / max(t_ig, 1e-9):.0f}x faster")


if __name__ == "__main__":
    main()
