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
     i.e. peer time / (peer grid time x needed / N^3): no exact method can beat it; ``ceiling``:
     vs peer / bound = (peer grid time x needed / N^3) / ours, the fraction of that ceiling
     reached (without PyMCubes too).  "ours" calls the same ``Decoder.forward`` as the peer;
     ``layer s`` / ``layer ceil`` time the product's own path for a DeepSDF decoder instead,
     ``mesh_from_sdf`` (sparse, cold), which evaluates through the decoder's inference kernel
     (:mod:`lib.models.kernels.inference`) at a lower cost per point than the peer's;
  2. marching cubes alone on the same grid: torch vs scikit-image vs PyMCubes (the analytic
     scene: a torus, a ball through it and a small ball; and the network's grid where part 1
     computed it);
  3. memory and time at each N of ``--memory`` in a fresh process: wall and CPU seconds,
     peak resident memory (VmHWM) and that of the process before the extraction, the
     block pool of values at its largest;
  4. per-iteration cost along a latent path (spot towards bob in 1 % steps, as in an
     optimisation): dense, fast (dense start), fast band (started from the band, ``freeze=``),
     sparse cold (``warm=False``) and sparse warm (the state passed back), each mode's first
     call apart; sparse == dense at every step (bitwise, or same faces and vertices within
     rounding: the network's GEMMs round differently for different batch sizes), fast band ==
     fast;
  5. forward and backward time of the MeshSDF layer (lib.layer.mesh_from_sdf).

With ``--peers warp`` it runs instead the sparse peer table: our sparse mode (cold) against
NVIDIA Warp's ``warp.geometry.sparse_marching_cubes`` on five field classes of rising cost
per point (analytic sphere, analytic torus, 32^3 trilinear grid + sphere, small MLP
3-64-64-1 + torus, the bob_and_spot network with bob's code), a fresh process per N (Warp
on the CPU, the same torch field called in batches of ``CHUNK`` by both): best time of
``--repeat`` (3), field evaluations, peak memory, Warp's Lipschitz bound (1 for the analytic
SDFs, else the largest |grad| at 2^15 random points; our cold start gets the same as its
``band``), and whether each mesh equals our dense mode's (skipped where that dense grid is
estimated over ``--dense-budget`` seconds).  Rows go to a JSON file under benchmarks/results/.

Peers found are listed first; missing ones are skipped (pip install -r benchmarks/requirements.txt).
The network is called in batches of ``CHUNK`` points everywhere, ours and the peer's alike.

Usage: python benchmarks/extraction.py [-e experiments/bob_and_spot] [--resolutions 128 256 512]
       [--memory 256 512 1024 2048] [--repeat 2]
       python benchmarks/extraction.py --peers warp [--resolutions 256 512] [--fields sphere torus grid mlp network]
       [--dense-budget 40] [--output FILE]
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import cli  # noqa: E402

cli.setup_process()  # before torch loads, as the scripts: OpenMP reads its wait policy once

import torch  # noqa: E402

from lib import experiment, runtime  # noqa: E402
from lib.cli import cli_main  # noqa: E402
from lib.errors import MeshSDFError  # noqa: E402
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

    def peak_kb() -> int:
        # this process's own high-water mark: ru_maxrss keeps the parent's from before the exec
        try:
            with open("/proc/self/status") as fh:
                return next(int(line.split()[1]) for line in fh if line.startswith("VmHWM:"))
        except (OSError, StopIteration):
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    before = peak_kb()
    t, c = time.perf_counter(), time.process_time()
    _, f, st = extract(field, args.child, "sparse", chunk=CHUNK)
    print(json.dumps(dict(n=args.child, wall=time.perf_counter() - t, cpu=time.process_time() - c,
                          peak_mb=peak_kb() / 1024, before_mb=before / 1024,
                          pool_mb=st.peak_points * 4 / 2 ** 20, evaluations=st.evaluations, faces=int(f.shape[0]))))
    return 0


# ---------------------------------------------------------------------------------------------
# --peers: the five field classes against a sparse peer (NVIDIA Warp's sparse marching cubes)
# ---------------------------------------------------------------------------------------------

FIELDS = ("sphere", "torus", "grid", "mlp", "network")
FIELD_TITLES = {"sphere": "analytic sphere", "torus": "analytic torus", "grid": "32^3 trilinear grid + sphere",
                "mlp": "small MLP 3-64-64-1 + torus", "network": "DeepSDF network (bob)"}


def _torus(p: torch.Tensor) -> torch.Tensor:
    q = torch.stack((p[:, :2].norm(dim=1) - 0.5, p[:, 2]), 1)
    return q.norm(dim=1) - 0.2


def make_field(name: str, experiment_dir: str):
    """The field ``name`` of :data:`FIELDS`: a callable points (P, 3) -> values (P,), made
    deterministically (seeded random weights) so that every process builds the same one."""
    gen = torch.Generator().manual_seed(0)
    if name == "sphere":
        return lambda p: p.norm(dim=1) - 0.6
    if name == "torus":
        return _torus
    if name == "grid":
        # a random perturbation: trilinear interpolation of a 32^3 lattice of values, small enough
        # (|grad| about 2) that no sub-voxel blob of opposite sign appears beside the surface
        lattice = (torch.rand(1, 1, 32, 32, 32, generator=gen) * 2 - 1) * 0.02

        def grid_field(p):
            # grid_sample's last coordinate is x (the lattice's last axis): order (z, y, x) -> ours (i, j, k)
            s = torch.nn.functional.grid_sample(lattice, p.flip(1).view(1, 1, 1, -1, 3), mode="bilinear",
                                                padding_mode="border", align_corners=True)
            return p.norm(dim=1) - 0.6 + s.reshape(-1)
        return grid_field
    if name == "mlp":
        # tanh keeps the perturbation centred and bounded (about 0.05) so the torus stays in the box
        mlp = torch.nn.Sequential(torch.nn.Linear(3, 64), torch.nn.Tanh(), torch.nn.Linear(64, 64),
                                  torch.nn.Tanh(), torch.nn.Linear(64, 1))
        with torch.no_grad():
            for prm in mlp.parameters():
                prm.copy_(torch.randn(prm.shape, generator=gen) / max(1, prm.shape[-1]) ** 0.5)
            mlp[4].weight.mul_(0.05)
            mlp[4].bias.zero_()
        mlp.requires_grad_(False)
        return lambda p: _torus(p) + mlp(p).reshape(-1)
    dec, codes, _ = load(Path(experiment_dir), torch.device("cpu"), False)
    dec.requires_grad_(False)
    return lambda p: decoder_sdf(dec, codes[0], p, CHUNK)


def lipschitz_estimate(fn, samples: int = 2 ** 15) -> float:
    """max(1, the largest |grad fn| at ``samples`` seeded random points of the box): the
    smallest Lipschitz bound that a sparse peer needing one can be given without guessing."""
    p = (torch.rand(samples, 3, generator=torch.Generator().manual_seed(1)) * 2 - 1).requires_grad_(True)
    with torch.enable_grad():
        g, = torch.autograd.grad(fn(p).sum(), p)
    return max(1.0, float(g.norm(dim=1).max()))


class PeakRSS:
    """Peak resident memory above the level at entry, sampled every millisecond by a thread
    (the field and both extractions release the GIL in their kernels): ``.mb`` after exit.
    Memory the process freed earlier and reuses is not counted: a lower bound."""

    def __enter__(self):
        import ctypes
        import threading
        try:  # hand freed heap pages back first, so that the level at entry is what is live
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        self._page = __import__("os").sysconf("SC_PAGE_SIZE")
        self._base = self._peak = self._rss()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _rss(self) -> int:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * self._page

    def _run(self):
        while not self._stop.wait(0.001):
            self._peak = max(self._peak, self._rss())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self._peak = max(self._peak, self._rss())
        self.mb = (self._peak - self._base) / 2 ** 20
        return False


def best_of(fn, repeat: int, budget: float):
    """Best time of up to ``repeat`` runs of fn, no new run once ``budget`` seconds are spent;
    the first run also measures peak memory.  Returns (best s, best process CPU s (all its
    threads: what a loaded machine's preemptions do not inflate), runs, peak MB, fn's result)."""
    best, best_cpu, runs, spent, out, mb = float("inf"), float("inf"), 0, 0.0, None, float("nan")
    while runs < repeat and (runs == 0 or spent < budget):
        t, c = time.perf_counter(), time.process_time()
        if runs == 0:
            with PeakRSS() as mem:
                out = fn()
            mb = mem.mb
        else:
            out = fn()
        dt = time.perf_counter() - t
        best, best_cpu, runs, spent = min(best, dt), min(best_cpu, time.process_time() - c), runs + 1, spent + dt
    return best, best_cpu, runs, mb, out


def warp_extract(wp, fn, n: int, lipschitz: float):
    """Warp's sparse marching cubes of fn on our N^3 grid over [-1, 1]^3, the torch field
    called in batches of ``CHUNK`` points as ours is.  Returns verts (V, 3), faces (F, 3)
    torch tensors and Warp's stats."""
    import warp.geometry

    def evaluate(points):
        pts = wp.to_torch(points)
        out = torch.cat([fn(pts[s : s + CHUNK]).reshape(-1) for s in range(0, pts.shape[0], CHUNK)])
        return wp.from_torch(out.float().contiguous())

    with torch.no_grad():
        v, idx, stats = warp.geometry.sparse_marching_cubes(evaluate, n, n, n, lower=(-1.0, -1.0, -1.0),
                                                           upper=(1.0, 1.0, 1.0), lipschitz_bound=lipschitz,
                                                           device="cpu", return_stats=True)
    return wp.to_torch(v).clone(), wp.to_torch(idx).reshape(-1, 3).long().clone(), stats


def peers_child(args) -> int:
    """One process per N: every field of ``--fields`` at N = ``--peers-child``, one JSON line each."""
    import warp as wp
    wp.config.quiet = True
    wp.init()
    torch.set_num_threads(args.threads)
    n = args.peers_child
    for name in args.fields:
        fn = make_field(name, args.experiment)
        lip = lipschitz_estimate(fn) * args.lipschitz_scale if name not in ("sphere", "torus") else 1.0
        with torch.no_grad():
            x = torch.rand(CHUNK, 3, generator=torch.Generator().manual_seed(2)) * 2 - 1
            fn(x)
            t = time.perf_counter()
            fn(x)
            per_point = (time.perf_counter() - t) / CHUNK
        extract(fn, 32, "sparse", chunk=CHUNK)  # one-off set-ups (tables, kernels) outside the measures
        warp_extract(wp, fn, 32, lip)
        row = dict(field=name, n=n, lipschitz=lip, us_per_point=per_point * 1e6)
        # both get the same knowledge of the field: our cold start's Lipschitz safety factor is
        # the bound Warp is given (never below our default)
        band = max(1.5, lip)
        t_ours, cpu_ours, runs, mb, (v, f, st) = best_of(lambda: extract(fn, n, "sparse", chunk=CHUNK, band=band),
                                                         args.repeat, args.budget)
        row.update(ours_s=t_ours, ours_cpu_s=cpu_ours, ours_band=band, ours_runs=runs, ours_mb=mb,
                   ours_evals=st.evaluations, faces=int(f.shape[0]), tracking=st.tracking)
        if args.compare_tracking and st.tracking == "blocks":  # the same extraction with the cell tracking
            from lib.isosurface import sparse as sparse_module
            saved, sparse_module.BLOCK_COST_RATIO = sparse_module.BLOCK_COST_RATIO, 0.0
            try:
                row["cells_s"] = best_of(lambda: extract(fn, n, "sparse", chunk=CHUNK, band=band), args.repeat,
                                         args.budget)[0]
            finally:
                sparse_module.BLOCK_COST_RATIO = saved
        del st
        t_w, cpu_w, runs, mb, (vw, fw, stats) = best_of(lambda: warp_extract(wp, fn, n, lip), args.repeat,
                                                        args.budget)
        row.update(warp_s=t_w, warp_cpu_s=cpu_w, warp_runs=runs, warp_mb=mb, warp_evals=int(stats["field_evaluations"]),
                   warp_faces=int(fw.shape[0]))
        estimate = per_point * n ** 3
        if estimate <= args.dense_budget:
            t = time.perf_counter()
            vd, fd, _ = extract(fn, n, "dense", chunk=CHUNK)
            row["dense_s"] = time.perf_counter() - t
            row["ours_equal"], row["ours_why"] = same_mesh(v, f, vd, fd)
            row["warp_equal"], row["warp_why"] = same_mesh(vw, fw, vd, fd, atol=1e-4, triangles=False)
            del vd, fd
        else:
            row["dense_skipped"] = f"dense grid estimated at {estimate:.0f} s > --dense-budget {args.dense_budget:g}"
        print(json.dumps(row), flush=True)
        del v, f, vw, fw
    return 0


def peers_table(args) -> int:
    """The peer table: a fresh process per N, ratios printed, every row written to a JSON file."""
    if args.peers != ["warp"]:
        raise MeshSDFError(f"--peers {' '.join(args.peers)}: the only sparse peer measured is 'warp'")
    if importlib.util.find_spec("warp") is None:
        raise MeshSDFError("--peers warp needs NVIDIA Warp: pip install -r benchmarks/requirements.txt")
    import platform
    import warp
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    print(f"ours (sparse, cold) vs Warp {warp.__version__} sparse_marching_cubes, CPU ({cpu}), {args.threads} "
          f"threads; one process per N, best of {args.repeat} (fewer past {args.budget:g} s), the field called in "
          f"batches of {CHUNK} points by both.  warp/ours > 1: ours faster.  equal: the mesh vs our dense mode "
          "(ours: same_mesh; Warp, whose case tables triangulate some cells differently: the same vertices and "
          "face count); cells/blocks: where ours tracked blocks, the time with the cell tracking instead / ours; "
          "cpu: the same ratio of process CPU seconds (all threads), steadier on a loaded machine")
    print(f"{'field':>30} {'N':>5} {'ours s':>7} {'warp s':>7} {'warp/ours':>9} {'ours evals':>10} {'warp evals':>10} "
          f"{'ours MB':>7} {'warp MB':>7} {'L':>5} {'ours=dense':>10} {'warp=dense':>10} {'tracking':>8} "
          f"{'cells/blocks':>12} {'cpu':>6}")
    rows = []
    for n in args.resolutions:
        cmd = [sys.executable, __file__, "-e", args.experiment, "--peers", "warp", "--peers-child", str(n),
               "--threads", str(args.threads), "--repeat", str(args.repeat), "--budget", str(args.budget),
               "--dense-budget", str(args.dense_budget), "--lipschitz-scale", str(args.lipschitz_scale),
               "--fields", *args.fields] + (["--compare-tracking"] if args.compare_tracking else [])
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for line in proc.stdout:
            if not line.startswith("{"):
                continue
            d = json.loads(line)
            rows.append(d)

            def eq(who):
                if "dense_skipped" in d:
                    return "skipped"
                return "yes" if d[f"{who}_equal"] else "NO"
            cells_vs_blocks = f"{d['cells_s'] / d['ours_s']:.2f}x" if "cells_s" in d else "-"
            print(f"{FIELD_TITLES[d['field']]:>30} {n:>5} {d['ours_s']:>7.3f} {d['warp_s']:>7.3f} "
                  f"{d['warp_s'] / d['ours_s']:>8.2f}x {d['ours_evals']:>10} {d['warp_evals']:>10} "
                  f"{d['ours_mb']:>7.0f} {d['warp_mb']:>7.0f} {d['lipschitz']:>5.2f} {eq('ours'):>10} {eq('warp'):>10} "
                  f"{d['tracking']:>8} {cells_vs_blocks:>12} {d['warp_cpu_s'] / d['ours_cpu_s']:>5.2f}x"
                  + (f"  (Warp: {d['warp_why']})" if d.get("warp_why") else "")
                  + (f"  (ours: {d['ours_why']})" if d.get("ours_why") else ""), flush=True)
        err = proc.stderr.read()
        if proc.wait():
            print(f"{n:>5} failed: {err.strip().splitlines()[-1] if err.strip() else proc.returncode}")
    skipped = sorted({d["field"] for d in rows if "dense_skipped" in d})
    if skipped:
        print(f"dense reference skipped for {', '.join(skipped)} (its N^3 grid is over --dense-budget "
              f"{args.dense_budget:g} s): raise it to check them")
    out = Path(args.output) if args.output else (Path(__file__).resolve().parent / "results" /
                                                 f"extraction_peers_{time.strftime('%Y%m%d_%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).resolve().parent).stdout.strip()
    except OSError:
        commit = ""
    meta = dict(commit=commit, cpu=cpu, machine=platform.machine(), threads=args.threads, torch=torch.__version__,
                warp=warp.__version__, repeat=args.repeat, budget_s=args.budget, chunk=CHUNK,
                date=time.strftime("%Y-%m-%d %H:%M:%S %Z"), load_average=list(__import__("os").getloadavg()),
                omp_wait_policy=__import__("os").environ.get("OMP_WAIT_POLICY", ""))
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
    tmp.replace(out)
    print(f"results: {out}")
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[1])
    ap.add_argument("-e", "--experiment", default=str(REPO_ROOT / "experiments" / "bob_and_spot"))
    ap.add_argument("--resolutions", type=int, nargs="+", default=None,
                    help="N of part 1 (default 128 256 512) or of --peers (default 256 512)")
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
    ap.add_argument("--peers", nargs="+", default=None, metavar="PEER",
                    help="instead of parts 1-5: the field classes against a sparse peer ('warp')")
    ap.add_argument("--fields", nargs="+", default=list(FIELDS), choices=FIELDS, help="--peers: fields to measure")
    ap.add_argument("--budget", type=float, default=15.0,
                    help="--peers: no new repeat of a measure once it has spent this many seconds (default 15)")
    ap.add_argument("--dense-budget", type=float, default=40.0,
                    help="--peers: check against our dense mode where its grid is estimated under this many s")
    ap.add_argument("--lipschitz-scale", type=float, default=1.0,
                    help="--peers: Warp's Lipschitz bound = this x the largest sampled |grad| (analytic SDFs: 1)")
    ap.add_argument("--compare-tracking", action="store_true",
                    help="--peers: where ours tracked blocks, time it with the cell tracking too (column cells/blocks)")
    ap.add_argument("--output", default=None, help="--peers: JSON result file (default benchmarks/results/...)")
    ap.add_argument("--peers-child", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        return child(args)
    if args.peers_child:
        return peers_child(args)
    if args.peers:
        args.resolutions = args.resolutions or [256, 512]
        args.repeat = 3 if "--repeat" not in sys.argv else args.repeat
        return peers_table(args)
    args.resolutions = args.resolutions or [128, 256, 512]
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
        print(f"{'N':>5} {'ours s':>8} {'faces':>8} {'evals':>9} {'needed':>9} {'our dense s':>11} "
              f"{'peer grid s':>11} {'peer MC s':>9} {'peer s':>8} {'vs peer':>8} {'bound':>7} {'ceiling':>7} "
              f"{'vs dense':>8} {'same mesh':>9} {'layer s':>8} {'layer ceil':>10} {'layer mesh':>10}")
        for n in args.resolutions:
            t_ours, (v, f, st) = timed(lambda: extract(fn(spot), n, "sparse", device=device, chunk=CHUNK), r)
            t_layer, layer = timed(lambda: mesh_from_sdf(dec, spot, n, mode="sparse", warm=False, chunk=CHUNK), r)
            layer_same = same_mesh(layer.verts.detach(), layer.faces, v, f)[0]
            del layer
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
                  f"{bound:>6.0f}x {t_grid * needed / n ** 3 / t_ours:>7.2f} {t_dense / t_ours:>7.1f}x {same:>9} "
                  f"{t_layer:>8.2f} {t_grid * needed / n ** 3 / t_layer:>10.2f} {str(layer_same):>10}")
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
        modes = {"dense": ("dense", {}), "fast": ("fast", {}), "fast band": ("fast", {"freeze": lambda: fn(path[0])}),
                 "sparse cold": ("sparse", {"warm": False}), "sparse warm": ("sparse", {})}
        states = dict.fromkeys(modes)
        totals = dict.fromkeys(modes, 0.0)
        first = dict.fromkeys(modes, 0.0)
        evals = dict.fromkeys(modes, 0)
        missed, equal, same_faces, worst, band_equal = 0, 0, 0, 0.0, 0
        for i, z in enumerate(path):
            res = {}
            for name, (mode, kw) in modes.items():
                t, (v, f, st) = timed(lambda: extract(fn(z), n, mode, state=states[name], device=device, **kw))
                states[name] = st
                res[name] = (v, f)
                if i:  # the first call of fast (and warm sparse) is a cold one
                    totals[name] += t
                    evals[name] += st.evaluations
                else:
                    first[name] = t
            if i:
                missed += states["fast"].missed_vertices
                vd, fd = res["dense"]
                sparse = ("sparse cold", "sparse warm")
                band_equal += torch.equal(res["fast band"][0], res["fast"][0]) and torch.equal(res["fast band"][1],
                                                                                                res["fast"][1])
                equal += all(torch.equal(res[m][0], vd) and torch.equal(res[m][1], fd) for m in sparse)
                same = all(torch.equal(res[m][1], fd) and res[m][0].shape == vd.shape for m in sparse)
                same_faces += same
                if same:
                    worst = max([worst] + [(res[m][0] - vd).abs().max().item() for m in sparse])
        for name in modes:
            print(f"  {name:>11}: {totals[name] / k:7.3f} s/iteration, {evals[name] // k:>8} evaluations/iteration, "
                  f"{totals['dense'] / totals[name]:5.1f}x vs dense; first call {first[name]:7.3f} s")
        print(f"  fast: {missed} lost-surface vertices over the path; both sparse modes bitwise equal to dense in "
              f"{equal}/{k} iterations, the same faces in {same_faces}/{k}, vertices at most {worst:.1e} apart (a "
              "network's value at a point can differ by rounding with the batch it is evaluated in); fast started "
              f"from the band (freeze=) bitwise equal to fast started dense in {band_equal}/{k} iterations")

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
