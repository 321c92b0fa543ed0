#!/usr/bin/env python
"""Extraction against its peers on the bob_and_spot network, ratios measured in one run.

Uses experiments/bob_and_spot (specs.json NetworkSpecs) with its trained checkpoint when
present; otherwise the same network with random weights added, scaled by 0.01, to a torus
SDF (every evaluation costs a full network pass).  The machine may be shared: every figure
is the best of ``--repeat`` runs and every ratio compares figures of this run.  Prints:

  1. meshing the network: ours (sparse, cold) vs the peer workflow (dense grid of the network
     + PyMCubes) and vs our own dense mode, same mesh check; at N above ``--peer-full-max``
     the peer's dense grid is timed on N/8 of its x-planes and scaled by 8 (marked ~), its
     cost being linear in the points (the PyMCubes part is then timed on the analytic grid).
     ``bound``: the ratio if our extraction cost nothing but the evaluations marching cubes
     needs (the distinct corners of the sign-changing cells) at the peer's own cost per point,
     i.e. peer time / (peer grid time x needed / N^3): no exact method can beat it;
  2. marching cubes alone on the same grid: torch vs scikit-image vs PyMCubes (the analytic
     scene: a torus, a ball through it and a small ball; and the network's grid where part 1
     computed it);
  3. memory and time at each N of ``--memory`` in a fresh process: wall and CPU seconds,
     peak resident memory (ru_maxrss) and that of the process before the extraction, the
     block pool of values at its largest;
  4. per-iteration cost along a latent path (spot towards bob in 1 % steps, as in an
     optimisation): dense, fast, sparse cold (``warm=False``) and sparse warm (the state
     passed back), sparse == dense at every step (bitwise, or same faces and vertices within
     rounding: the network's GEMMs round differently for different batch sizes);
  5. forward and backward time of the MeshSDF layer (lib.layer.mesh_from_sdf).

Peers found are listed first; missing ones are skipped (pip install -r benchmarks/requirements.txt).
The network is called in batches of ``CHUNK`` points everywhere, ours and the peer's alike.

Usage: python benchmarks/extraction.py [-e experiments/bob_and_spot] [--resolutions 128 256 512]
       [--memory 256 512 1024 2048] [--repeat 2]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import experiment, runtime  # noqa: E402
from lib.errors import cli_main  # noqa: E402
from lib.isosurface import dense_grid, extract, marching_cubes, same_mesh, tables  # noqa: E402
from lib.layer import mesh_from_sdf  # noqa: E402
from lib.models.decoder import decoder_from_specs  # noqa: E402
from lib.models.decoder import sdf as decoder_sdf  # noqa: E402
from lib.experiment.specs import REPO_ROOT, load_specs  # noqa: E402

# points per network call, for ours and the peer: 2^14 x 128 floats stays under glibc's 32 MB
# mmap threshold (measured: 2^16-point calls spent half their time in page faults)
CHUNK = 2 ** 14


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
        dec = experiment.load_decoder(exp, specs, device=device)
        codes = experiment.load_latent_codes(exp, device=device)
        return dec.eval(), codes, f"trained checkpoint (epoch {dec.checkpoint_epoch}) of {exp}"
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


def scene_grid(n: int) -> torch.Tensor:
    """The analytic scene on the N^3 grid, (N, N, N) float32."""
    def f(p):
        q = torch.stack((p[:, :2].norm(dim=1) - 0.5, p[:, 2]), 1)
        out = torch.minimum(q.norm(dim=1) - 0.15, (p - torch.tensor([0.0, 0.0, 0.35])).norm(dim=1) - 0.25)
        return torch.minimum(out, (p - torch.tensor([-0.6, 0.6, -0.5])).norm(dim=1) - 0.1)
    return dense_grid(f, n)


def peers() -> dict:
    found = {}
    if importlib.util.find_spec("mcubes"):
        import mcubes
        found["PyMCubes"] = lambda vol: mcubes.marching_cubes(vol, 0.0)
    if importlib.util.find_spec("skimage"):
        from skimage import measure
        found["scikit-image"] = lambda vol: measure.marching_cubes(vol, 0.0)
    return found


def child(args) -> int:
    """Part 3 in a fresh process: one sparse extraction at N, printed as one JSON line."""
    import resource
    torch.set_num_threads(args.threads)
    dec, codes, _ = load(Path(args.experiment), torch.device("cpu"), args.fallback)
    for p in dec.parameters():
        p.requires_grad_(False)
    z = (codes[1] if codes.shape[0] > 1 else codes[0]).reshape(1, -1)
    field = lambda p: dec(torch.cat((z.expand(p.shape[0], -1), p), 1)).reshape(-1)  # noqa: E731
    extract(field, 32, "sparse")  # one-off set-up (tables, allocator) outside the measure
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    t, c = time.perf_counter(), time.process_time()
    _, f, st = extract(field, args.child, "sparse", chunk=CHUNK)
    print(json.dumps(dict(n=args.child, wall=time.perf_counter() - t, cpu=time.process_time() - c,
                          peak_mb=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, before_mb=before / 1024,
                          pool_mb=st.peak_points * 4 / 2 ** 20, evaluations=st.evaluations, faces=int(f.shape[0]))))
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("-e", "--experiment", default=str(REPO_ROOT / "experiments" / "bob_and_spot"))
    ap.add_argument("--resolutions", type=int, nargs="+", default=[128, 256, 512])
    ap.add_argument("--memory", type=int, nargs="*", default=[256, 512, 1024, 2048], help="part 3 resolutions")
    ap.add_argument("--peer-full-max", type=int, default=256,
                    help="largest N whose peer dense grid is evaluated whole (above: N/8 of it, scaled)")
    ap.add_argument("--repeat", type=int, default=2, help="best of this many runs per figure")
    ap.add_argument("--path-resolution", type=int, default=64, help="resolution of parts 4 and 5 (demo: 64)")
    ap.add_argument("--iterations", type=int, default=8, help="latent steps in part 4")
    ap.add_argument("--skip", type=int, nargs="*", default=[], help="parts to skip (1-5)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    ap.add_argument("--fallback", action="store_true",
                    help="use the torus + untrained network even if a checkpoint exists")
    ap.add_argument("--child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    torch.set_num_threads(args.threads)
    device = runtime.choose_device(args.device)
    dec, codes, what = load(Path(args.experiment), device, args.fallback)
    for p in dec.parameters():
        p.requires_grad_(False)
    found = peers()
    marching_cubes(scene_grid(8))  # builds the case tables once, outside every measure
    print(f"decoder: {what}; device {device}, {torch.get_num_threads()} threads; "
          f"peers found: {', '.join(found) or 'none'} (pip install -r benchmarks/requirements.txt)")
    spot = codes[1] if codes.shape[0] > 1 else codes[0]
    bob = codes[0]
    fn = lambda z: (lambda p: decoder_sdf(dec, z, p, CHUNK))  # noqa: E731
    r = args.repeat
    net_grids = {}

    if 1 not in args.skip:
        print("\n1. meshing the network (code 1): ours = sparse, cold; peer = dense grid + PyMCubes; "
              "~ = peer grid timed on N/8 of it and scaled")
        print(f"{'N':>5} {'ours s':>8} {'faces':>8} {'evals':>9} {'needed':>9} {'our dense s':>11} {'peer grid s':>11} "
              f"{'peer MC s':>9} {'peer s':>8} {'vs peer':>8} {'bound':>7} {'vs dense':>8} {'same mesh':>9}")
        for n in args.resolutions:
            t_ours, (v, f, st) = timed(lambda: extract(fn(spot), n, "sparse", device=device, chunk=CHUNK), r)
            corners = (st.cells.unsqueeze(1) + tables(st.cells.device)["corner"]).reshape(-1, 3)
            needed = torch.unique((corners[:, 0] * n + corners[:, 1]) * n + corners[:, 2]).numel()
            del corners
            full = n <= args.peer_full_max
            same = "-"
            if full:
                t_grid, grid = timed(lambda: dense_grid(fn(spot), n, device=device), 1)
                net_grids[n] = grid.cpu()
                t_dense = t_grid + timed(lambda: marching_cubes(grid), r)[0]
                vd, fd = marching_cubes(grid)
                same = str(same_mesh(v, f, vd, fd)[0])
            else:
                k = max(1, n // 8)
                ax = torch.linspace(-1.0, 1.0, n, device=device)

                def slab():
                    for i in range(0, k, 8):
                        decoder_sdf(dec, spot, torch.cartesian_prod(ax[i:min(i + 8, k)], ax, ax), CHUNK)
                t_grid = timed(slab, 1)[0] * n / k
                t_dense = float("nan")
            vol = (net_grids[n] if full else scene_grid(n)).numpy()
            t_mc = timed(lambda: found["PyMCubes"](vol), r)[0] if "PyMCubes" in found else float("nan")
            peer = t_grid + t_mc
            bound = peer / (t_grid * needed / n ** 3)
            print(f"{n:>5} {t_ours:>8.2f} {f.shape[0]:>8} {st.evaluations:>9} {needed:>9} {t_dense:>11.2f} "
                  f"{('' if full else '~') + f'{t_grid:.1f}':>11} {t_mc:>9.2f} {peer:>8.1f} {peer / t_ours:>7.0f}x "
                  f"{bound:>6.0f}x {t_dense / t_ours:>7.1f}x {same:>9}")
            del st

    if 2 not in args.skip:
        print("\n2. marching cubes alone on the same grid (ratios: peer time / torch time; > 1 = torch faster)")
        print(f"{'grid':>12} {'N':>5} {'torch s':>8} " + " ".join(f"{k + ' s':>14} {'ratio':>6}" for k in found))
        for n in args.resolutions:
            for name, grid in (("scene", scene_grid(n)), ("network", net_grids.get(n))):
                if grid is None:
                    continue
                vol = grid.numpy()
                t_torch = timed(lambda: marching_cubes(grid), r + 1)[0]
                cols = []
                for k, mc in found.items():
                    t = timed(lambda: mc(vol), r + 1)[0]
                    cols.append(f"{t:>14.3f} {t / t_torch:>5.2f}x")
                print(f"{name:>12} {n:>5} {t_torch:>8.3f} " + " ".join(cols))

    if 3 not in args.skip and args.memory:
        print("\n3. sparse extraction in a fresh process: time, peak resident memory (RSS)")
        print(f"{'N':>5} {'wall s':>8} {'cpu s':>8} {'peak MB':>8} {'before MB':>9} {'pool MB':>8} {'evaluations':>12} "
              f"{'faces':>9}")
        for n in args.memory:
            cmd = [sys.executable, __file__, "-e", args.experiment, "--child", str(n), "--threads", str(args.threads)]
            out = subprocess.run(cmd + (["--fallback"] if args.fallback else []), capture_output=True, text=True)
            if out.returncode:
                print(f"{n:>5} failed: {out.stderr.strip().splitlines()[-1] if out.stderr.strip() else out.returncode}")
                continue
            d = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{n:>5} {d['wall']:>8.1f} {d['cpu']:>8.1f} {d['peak_mb']:>8.0f} {d['before_mb']:>9.0f} "
                  f"{d['pool_mb']:>8.0f} {d['evaluations']:>12} {d['faces']:>9}")

    n, k = args.path_resolution, args.iterations
    if 4 not in args.skip:
        print(f"\n4. per iteration along a latent path, N = {n}: {k} steps of 1% of |bob - spot| from spot")
        path = [spot + (bob - spot) * 0.01 * i for i in range(k + 1)]
        modes = {"dense": ("dense", {}), "fast": ("fast", {}), "sparse cold": ("sparse", {"warm": False}),
                 "sparse warm": ("sparse", {})}
        states = dict.fromkeys(modes)
        totals = dict.fromkeys(modes, 0.0)
        evals = dict.fromkeys(modes, 0)
        missed, equal, same_faces, worst = 0, 0, 0, 0.0
        for i, z in enumerate(path):
            res = {}
            for name, (mode, kw) in modes.items():
                t, (v, f, st) = timed(lambda: extract(fn(z), n, mode, state=states[name], device=device, **kw))
                states[name] = st
                res[name] = (v, f)
                if i:  # the first call of fast (and warm sparse) is a cold one
                    totals[name] += t
                    evals[name] += st.evaluations
            if i:
                missed += states["fast"].missed_vertices
                vd, fd = res["dense"]
                sparse = ("sparse cold", "sparse warm")
                equal += all(torch.equal(res[m][0], vd) and torch.equal(res[m][1], fd) for m in sparse)
                same = all(torch.equal(res[m][1], fd) and res[m][0].shape == vd.shape for m in sparse)
                same_faces += same
                if same:
                    worst = max([worst] + [(res[m][0] - vd).abs().max().item() for m in sparse])
        for name in modes:
            print(f"  {name:>11}: {totals[name] / k:7.3f} s/iteration, {evals[name] // k:>8} evaluations/iteration, "
                  f"{totals['dense'] / totals[name]:5.1f}x vs dense")
        print(f"  fast: {missed} lost-surface vertices over the path; both sparse modes bitwise equal to dense in "
              f"{equal}/{k} iterations, the same faces in {same_faces}/{k}, vertices at most {worst:.1e} apart (a "
              "network's value at a point can differ by rounding with the batch it is evaluated in)")

    if 5 not in args.skip:
        print(f"\n5. MeshSDF layer, N = {n}, loss = sum of squared vertex coordinates")
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
