"""Benchmark: soft silhouette forward + backward of a bob-sized mesh at 512 x 512 on the CPU.

    python benchmarks/render.py [--mesh FILE] [--size 512] [--repeats 5] [--threads 1 2]

Uses ../shared/meshes/bob.obj (10.7k faces) when present, else the built-in bob stand-in.
Demo camera (az 45, el 30, d 2.5, 35/32 mm), SVR softness (sigma 1e-5, eps 1e-4).  Prints
the face-pixel pair counts, then per thread count the median of ``--repeats`` runs of
forward, forward + backward (wall and process CPU time) and the hard z-buffer, next to a
reference workload measured in the same run (100 float32 multiplies of 2^18 elements) so
that numbers from a loaded machine can be compared.  Target (issue 6): forward + backward
<= 0.15 s on 2 cores.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from lib.camera import look_at  # noqa: E402
from lib.render import SVR_EPS, SVR_SIGMA, rasterize, silhouette, silhouette_pairs  # noqa: E402


def load_mesh(path: str | None):
    from lib.io import read_mesh

    default = Path(__file__).resolve().parents[2] / "shared" / "meshes" / "bob.obj"
    if path or default.is_file():
        p = Path(path or default)
        v, f = read_mesh(p)
        return str(p), torch.from_numpy(v), torch.from_numpy(f)
    from lib.shapes import bob, mesh_shape

    v, f = mesh_shape(bob(), 52)
    return "built-in bob @52", torch.as_tensor(v), torch.as_tensor(f)


def measure(fn, repeats: int):
    """Median wall and CPU seconds of fn() over repeats (after one warm-up call)."""
    fn()
    wall, cpu = [], []
    for _ in range(repeats):
        w, c = time.perf_counter(), time.process_time()
        fn()
        wall.append(time.perf_counter() - w)
        cpu.append(time.process_time() - c)
    return statistics.median(wall), statistics.median(cpu)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mesh", default=None, help="mesh file (default ../shared/meshes/bob.obj)")
    ap.add_argument("--size", type=int, default=512, help="image size in pixels")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()

    name, v, f = load_mesh(args.mesh)
    v, f = v.to(args.device), f.to(args.device)
    cam = look_at(45, 30, 2.5, image_size=args.size)
    pairs = silhouette_pairs(v, f, cam, sigma=SVR_SIGMA, eps=SVR_EPS)
    print(f"mesh {name}: {len(f)} faces, image {args.size}^2, sigma {SVR_SIGMA:g}, eps {SVR_EPS:g}")
    print(f"face-pixel pairs: {pairs['evaluated']:,} evaluated, {pairs['within_radius']:,} within the "
          f"blur radius, {pairs['deep']:,} deep inside")
    a, b = torch.rand(1 << 18), torch.rand(1 << 18)

    def reference():
        for _ in range(100):
            a * b

    sync = torch.cuda.synchronize if args.device.startswith("cuda") else (lambda: None)

    def forward():
        with torch.no_grad():
            silhouette(v, f, cam)
        sync()

    def forward_backward():
        vv = v.clone().requires_grad_(True)
        silhouette(vv, f, cam).sum().backward()
        sync()

    def hard():
        with torch.no_grad():
            rasterize(v, f, cam)
        sync()

    for nt in args.threads:
        torch.set_num_threads(nt)
        ref = measure(reference, args.repeats)
        fw = measure(forward, args.repeats)
        fb = measure(forward_backward, args.repeats)
        hz = measure(hard, args.repeats)
        print(f"threads {nt}: reference {ref[0] * 1e3:.1f} ms wall ({ref[1] * 1e3:.1f} cpu) | "
              f"forward {fw[0] * 1e3:.1f} ms ({fw[1] * 1e3:.1f}) | "
              f"forward+backward {fb[0] * 1e3:.1f} ms ({fb[1] * 1e3:.1f}) = {fb[0] / ref[0]:.1f} x reference | "
              f"z-buffer {hz[0] * 1e3:.1f} ms ({hz[1] * 1e3:.1f})")
    import resource
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak resident memory of this process: {peak:.0f} MB")
    print("target: forward+backward <= 150 ms on 2 cores (median wall time)")


if __name__ == "__main__":
    from lib.errors import cli_main

    cli_main(main)
