"""Benchmark: the demo's rendering per iteration, before vs after the fast paths, in one run.

    python benchmarks/render.py [-e experiments/bob_and_spot] [--repeats 15] [--threads 2]
                                [--device cpu]

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
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

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


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-e", "--experiment", default="experiments/bob_and_spot")
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--threads", type=int, default=None,
                    help="intra-op threads (default: the project's thread policy, as the demo)")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    else:
        runtime.apply_thread_policy()
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
