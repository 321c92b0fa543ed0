"""Benchmark: the demo's rendering per iteration and the SVR refinement's soft silhouette, before vs after.

    python benchmarks/render.py [-e experiments/bob_and_spot] [--case demo|svr|all] [--repeats 15]
                                [--threads 2] [--device cpu] [--baseline 707b828] [--rounds 3]
                                [--mesh-cache PATH]

Demo setting: the experiment's decoder meshes code 1 (spot, the initialisation) and code 0
(bob, the target) at N = 64 (sparse extraction); demo camera (az 45, el 30, d 2.5), 512 x 512;
soft silhouette with sigma 1e-5, eps 1e-4, all faces within the blur radius, MSE against
bob's hard silhouette.  Timed per mesh, as medians of ``--repeats`` interleaved runs:

- silhouette forward (with the autograd graph) and backward, with tile culling and reused
  scratch buffers (after) and with every tile of the face boxes evaluated into fresh
  tensors (before: ``RenderSettings(cull_tiles=False, reuse_buffers=False)``); image and gradient are checked
  bitwise equal;
- the movie frame (dL/ds face colours, ``movie_frame``, ``to_uint8``): after = the
  one-pass face-index z-buffer on the faces' row spans; before = the two-pass z-buffer on
  4 x 4 tiles of the faces' boxes with barycentrics and depth (``rasterize`` with
  ``RenderSettings(packed_zbuffer=False, row_spans=False, raster_tile=4)``), the fragments handed to
  the same shading; frames are
  checked equal.

Ratios (before / after) are measured in the same run, so they survive a busy machine
better than the absolute times; the face-pixel pair counts explain the silhouette's cost.

SVR setting (``--case svr``): the soft silhouette of reconstruct_svr.py's refinement step at
the original's defaults (lib.svr.RefineSettings: sigma 1e-4, blur radius log(1/1e-4 - 1) x
1e-5, 25 faces per pixel) of spot's mesh at N = 256 (about 105k vertices, 211k faces; sparse
extraction, or ``--mesh-cache`` to reuse one), demo camera at 224 x 224, a fixed random
weight image as the loss.  This tree against ``--baseline`` (a commit checked out into a
temporary git worktree, removed afterwards): both run the same child script in fresh
processes, ``--rounds`` times alternately, each timing ``--repeats`` forward and backward
passes as the refinement runs them (idle OpenMP threads sleeping, inside
``elementwise_section``; wall and process CPU time, best of the repeats, best round).  The
images and vertex gradients of the two trees are compared bit for bit.  Writes
benchmarks/results/render_svr.json (times, ratios, equality, load average, threads, commits).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import cli  # noqa: E402

cli.setup_process()  # before torch loads, as the scripts: OpenMP reads its wait policy once

import torch  # noqa: E402

import lib.render as render  # noqa: E402
from lib import experiment, runtime  # noqa: E402
from lib.layer import mesh_from_sdf  # noqa: E402
from lib.render import RenderSettings, demo_camera, nr_shade  # noqa: E402
from lib.render.screen import TILE  # noqa: E402
from lib.experiment.specs import load_specs  # noqa: E402
from lib.visualize import dl_ds_face_colors, dl_ds_scale, movie_frame, target_outline, to_uint8  # noqa: E402


def demo_meshes(exp: Path, device: str):
    specs = load_specs(exp)
    dec, codes = experiment.load_decoder_and_codes(exp, specs, "latest", device=device)
    with torch.no_grad():
        bob = mesh_from_sdf(dec, codes[0], 64, "sparse")
        spot = mesh_from_sdf(dec, codes[1], 64, "sparse")
    return {"spot": (spot.verts, spot.faces), "bob": (bob.verts, bob.faces)}


REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"

# the SVR child: run in a tree's root (its lib/ first on sys.path); renders the mesh of argv[1]
# argv[2] times, saves image and gradient of the last to argv[3], prints one JSON line
SVR_CHILD = r'''
import json, sys, time
sys.path.insert(0, ".")
import torch
from lib.render import silhouette, SVR_EPS
try:
    from lib.render import demo_camera
except ImportError:
    from lib.camera import demo_camera
from lib.svr.reconstruct import RefineSettings
try:
    from lib.runtime import apply_thread_policy
    from lib.runtime.threads import elementwise_section
except ImportError:
    import contextlib
    apply_thread_policy, elementwise_section = (lambda: torch.get_num_threads()), contextlib.nullcontext
threads = apply_thread_policy()
mesh = torch.load(sys.argv[1])
v, f, w = mesh["verts"], mesh["faces"], mesh["weights"]
s = RefineSettings()
kw = dict(sigma=s.sigma, eps=SVR_EPS, faces_per_pixel=s.faces_per_pixel, radius=s.radius)
cam = demo_camera(image_size=224)
rec = []
with elementwise_section():
    for _ in range(int(sys.argv[2]) + 1):          # the first warms the buffers up
        vv = v.clone().requires_grad_(True)
        w0, c0 = time.perf_counter(), time.process_time()
        img = silhouette(vv, f, cam, **kw)
        w1, c1 = time.perf_counter(), time.process_time()
        (img * w).sum().backward()
        rec.append((w1 - w0, c1 - c0, time.perf_counter() - w1, time.process_time() - c1))
torch.save({"image": img.detach(), "grad": vv.grad}, sys.argv[3])
rec = rec[1:]
print(json.dumps({"threads": threads, **{k: min(r[i] for r in rec) for i, k in
                  enumerate(("forward_s", "forward_cpu_s", "backward_s", "backward_cpu_s"))}}))
'''


def svr_case(args) -> None:
    """This tree's SVR silhouette against ``args.baseline``'s, alternately, in fresh processes."""
    exp = Path(args.experiment)
    work = Path(tempfile.mkdtemp(prefix="render_svr_"))
    made = []
    try:
        mesh_file = work / "mesh.pt"
        if args.mesh_cache and Path(args.mesh_cache).is_file():
            mesh = torch.load(args.mesh_cache)
        else:
            specs = load_specs(exp)
            dec, codes = experiment.load_decoder_and_codes(exp, specs, "latest")
            with torch.no_grad():
                m = mesh_from_sdf(dec, codes[1], 256, "sparse")
            mesh = {"verts": m.verts.detach(), "faces": m.faces}
            if args.mesh_cache:
                torch.save(mesh, args.mesh_cache)
        mesh["weights"] = torch.rand(224, 224, generator=torch.Generator().manual_seed(0))
        torch.save(mesh, mesh_file)
        base = work / "baseline"
        subprocess.run(["git", "worktree", "add", "--detach", str(base), args.baseline], cwd=REPO, check=True,
                       capture_output=True)
        made.append(base)
        trees = {"baseline": base, "this": REPO}
        env = dict(os.environ, MESHSDF_QUIET="1")
        env.setdefault("OMP_WAIT_POLICY", "PASSIVE")          # as the scripts run (lib.cli.setup_process)
        runs = {k: [] for k in trees}
        print(f"SVR silhouette: spot N = 256, {len(mesh['faces']):,} faces, 224^2, K = 25; "
              f"{args.rounds} rounds x {args.repeats} passes, this tree vs {args.baseline}")
        for r in range(args.rounds):
            for name, root in trees.items():
                p = subprocess.run([sys.executable, "-c", SVR_CHILD, str(mesh_file), str(args.repeats),
                                    str(work / f"{name}.pt")], cwd=root, env=env, capture_output=True, text=True)
                if p.returncode != 0:
                    raise SystemExit(f"SVR child failed in {root}:\n{p.stderr[-3000:]}")
                runs[name].append(json.loads(p.stdout.strip().splitlines()[-1]))
                x = runs[name][-1]
                print(f"  round {r + 1} {name:8s}: forward {x['forward_s'] * 1e3:6.1f} ms "
                      f"(CPU {x['forward_cpu_s'] * 1e3:6.1f}), backward {x['backward_s'] * 1e3:5.1f} ms "
                      f"(CPU {x['backward_cpu_s'] * 1e3:5.1f})", flush=True)
        a, b = torch.load(work / "this.pt"), torch.load(work / "baseline.pt")
        same = {k: bool(torch.equal(a[k], b[k])) for k in ("image", "grad")}
        commit = {k: subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                                    check=True).stdout.strip() for k, root in trees.items()}
    finally:
        for base in made:
            subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    keys = ("forward_s", "forward_cpu_s", "backward_s", "backward_cpu_s")
    best = {k: {q: min(r[q] for r in v) for q in keys} for k, v in runs.items()}
    ratio = {q: best["baseline"][q] / best["this"][q] for q in keys}
    result = {
        "what": "soft silhouette of the SVR refinement step (sigma 1e-4, radius 1e-5 log(1e4 - 1), K = 25), "
                "spot at N = 256, 224 x 224, forward and backward",
        "faces": int(len(mesh["faces"])), "vertices": int(len(mesh["verts"])), "commits": commit,
        "rounds": args.rounds, "repeats": args.repeats, "threads": runs["this"][0]["threads"],
        "machine": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
        "load_average": list(os.getloadavg()), "seconds": best, "ratio_baseline_over_this": ratio,
        "bitwise_equal": same,
    }
    RESULTS.mkdir(parents=True, exist_ok=True)
    out = RESULTS / "render_svr.json"
    out.write_text(json.dumps(result, indent=1) + "\n")
    for q in keys:
        print(f"  {q:15s} baseline {best['baseline'][q] * 1e3:7.1f} ms   this {best['this'][q] * 1e3:7.1f} ms   "
              f"ratio {ratio[q]:4.2f}")
    print(f"  image bitwise equal: {same['image']}, gradient bitwise equal: {same['grad']}; "
          f"load average {os.getloadavg()[0]:.1f}; written to {out}")
    if not all(same.values()):
        raise SystemExit("the SVR silhouettes of the two trees differ")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-e", "--experiment", default="experiments/bob_and_spot")
    ap.add_argument("--case", choices=("demo", "svr", "all"), default="all",
                    help="the demo's rendering, the SVR refinement's silhouette, or both (default)")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: the project's thread policy, as the demo)")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--baseline", default="707b828",
                    help="SVR case: the commit to compare with (default 707b828, before the faster K-nearest path)")
    ap.add_argument("--rounds", type=int, default=3, help="SVR case: alternate runs per tree (default 3)")
    ap.add_argument("--mesh-cache", default=None,
                    help="SVR case: a .pt file holding spot's N = 256 mesh, written on first use")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        runtime.apply_thread_policy()
    if args.case in ("demo", "all"):
        demo_case(args)
    if args.case in ("svr", "all"):
        svr_case(args)


def demo_case(args) -> None:
    """The demo's silhouette and movie frame, before vs after, in this process."""
    dev = args.device
    sync = torch.cuda.synchronize if dev.startswith("cuda") else (lambda: None)
    meshes = demo_meshes(Path(args.experiment), dev)
    cam = demo_camera(image_size=512, device=dev)
    target = render.silhouette(*meshes["bob"], cam, sigma=0)
    edge = target_outline(target)
    print(f"device {dev}, {torch.get_num_threads()} threads, image 512^2, sigma {render.SVR_SIGMA:g}, "
          f"eps {render.SVR_EPS:g}, median of {args.repeats} interleaved runs")

    two_pass = RenderSettings(packed_zbuffer=False, row_spans=False, raster_tile=TILE)
    for name, (v, f) in meshes.items():
        pairs = render.silhouette_pairs(v, f, cam)
        print(f"\n{name}: {len(f)} faces; face-pixel slots {pairs['evaluated']:,} in the face boxes, "
              f"{pairs['kept']:,} after culling, {pairs['within_radius']:,} within the blur radius, "
              f"{pairs['deep']:,} deeper inside")
        fr = render.face_index(v, f, cam)
        img = render.silhouette(v, f, cam)
        print(f"  pixels covered {int((fr >= 0).sum()):,}; soft image exactly 1 at {int((img == 1).sum()):,} "
              f"(the only pixels whose pairs carry no gradient)")
        dl = torch.randn(len(v), generator=torch.Generator().manual_seed(0)).to(dev)
        scale = dl_ds_scale(dl, f)

        def sil(cull: bool):
            settings = RenderSettings(cull_tiles=cull, reuse_buffers=cull)
            vv = v.clone().requires_grad_(True)
            t0 = time.perf_counter()
            img = render.silhouette(vv, f, cam, settings=settings)
            loss = (img - target).square().mean()
            sync()
            t1 = time.perf_counter()
            loss.backward()
            sync()
            t2 = time.perf_counter()
            return t1 - t0, t2 - t1, img.detach(), vv.grad

        def frame(fast: bool):
            t0 = time.perf_counter()
            colors = dl_ds_face_colors(dl, f, scale)
            if fast:
                img = movie_frame(v, f, colors, cam, edge)
            else:
                fr = render.rasterize(v, f, cam, settings=two_pass)
                rgb = nr_shade(v, f, cam, face_colors=colors, face_idx=fr.face_idx)[..., :3]
                rgb = torch.where(edge[..., None], torch.ones(3, device=dev), rgb)
                img = to_uint8(rgb)
            sync()
            return time.perf_counter() - t0, img

        a, b = sil(True), sil(False)
        if not (torch.equal(a[2], b[2]) and torch.equal(a[3], b[3])):
            raise SystemExit("culled and unculled silhouettes differ")
        if not torch.equal(frame(True)[1], frame(False)[1]):
            raise SystemExit("the two z-buffers give different frames")
        rec = {k: [] for k in ("fw_after", "bw_after", "fw_before", "bw_before", "fr_after", "fr_before")}
        for _ in range(args.repeats):
            fw, bw, _, _ = sil(True)
            rec["fw_after"].append(fw)
            rec["bw_after"].append(bw)
            fw, bw, _, _ = sil(False)
            rec["fw_before"].append(fw)
            rec["bw_before"].append(bw)
            rec["fr_after"].append(frame(True)[0])
            rec["fr_before"].append(frame(False)[0])
        med = {k: statistics.median(x) * 1e3 for k, x in rec.items()}
        for what, key in (("silhouette forward", "fw"), ("silhouette backward", "bw"), ("movie frame", "fr")):
            before, after = med[f"{key}_before"], med[f"{key}_after"]
            print(f"  {what:20s} before {before:7.1f} ms   after {after:7.1f} ms   ratio {before / after:4.2f}")
        tot_b = med["fw_before"] + med["bw_before"] + med["fr_before"]
        tot_a = med["fw_after"] + med["bw_after"] + med["fr_after"]
        print(f"  {'all three':20s} before {tot_b:7.1f} ms   after {tot_a:7.1f} ms   ratio {tot_b / tot_a:4.2f}")
    print("\ndemo targets (issue 16, 2 quiet cores): silhouette forward + backward <= 40 ms, movie frame <= 25 ms")


if __name__ == "__main__":
    from lib.cli import cli_main

    cli_main(main)
