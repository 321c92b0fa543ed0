#!/usr/bin/env python
"""The GPU figures of every benchmark, in one table (exits with a message where CUDA is absent).

Each row is the headline workload of one benchmark script, run on ``--device`` (default
cuda:0) and timed with CUDA synchronisation (median of ``--repeats`` after one warm-up);
``--with-cpu`` adds the same workload on the CPU, measured in the same run, and the ratio.

  demo.py          s/iteration of the demo loop per extraction mode (bob_and_spot, N = 64, 512 px),
                   and the whole default demo command (100 iterations, all outputs)
  extraction.py    dense and sparse extraction of bob's code at N = 128 and 256;
                   MeshSDF layer forward + backward at N = 64
  render.py        soft silhouette forward, forward + backward, and the hard z-buffer of a
                   bob-sized mesh at 512 x 512 (demo camera)
  train_step.py    one bob_and_spot training step (2 x 32192 samples, fused loss) and the
                   same step through plain autograd
  scaling.py       one cars_svr training step (16 RGBA images of 224 px, 8192 samples each,
                   ResNet-20 + 512-wide decoder); 2-GPU DDP via ``scaling.py --device cuda``
                   (listed, run separately, when 2 GPUs exist)
  contention.py, prepare_data.py, svr_toy_pipeline.py, faults.py: CPU-side by design (threads
                   on a busy CPU, mesh sampling, the CPU toy pipeline, fault handling): no row

Usage: python benchmarks/gpu.py [--device cuda:0] [--repeats 5] [--with-cpu] [--skip-full]
(``--device cpu`` runs the same table on the CPU, which checks the script where no GPU is.)
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from lib import cli  # noqa: E402

cli.setup_process()  # before torch loads, as the scripts: OpenMP reads its wait policy once
import torch  # noqa: E402


def timed(fn, device: torch.device, repeats: int) -> float:
    """Median seconds of ``fn()`` over ``repeats`` runs after one warm-up, synchronising CUDA."""
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()
    sync()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - t0)
    return statistics.median(out)


def demo_rows(device, repeats):
    from lib import experiment
    from lib.layer import mesh_from_sdf
    from lib.optimize import LatentOptimizer, SilhouetteLoss
    from lib.render import demo_camera, silhouette
    from lib.experiment.specs import load_specs

    exp = REPO / "experiments" / "bob_and_spot"
    specs = load_specs(exp)
    dec = experiment.load_decoder(exp, specs, device=device)
    codes = experiment.load_latent_codes(exp, device=device)
    cam = demo_camera(image_size=512, device=device)
    with torch.no_grad():
        bob = mesh_from_sdf(dec, codes[0], 64, "dense")
        target = silhouette(bob.verts, bob.faces, cam, sigma=0)
    rows = []
    for mode in ("dense", "sparse", "fast"):
        opt = LatentOptimizer(dec, codes[1], SilhouetteLoss(cam, target, renderer="nr"), lr=5e-2, resolution=64,
                              mode=mode)
        rows.append(("demo.py", f"demo iteration, {mode}", timed(opt.step, device, max(repeats, 10)), "s/it"))
    return rows


def demo_full_row(device):
    import demo_optimizer

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        demo_optimizer.main(["-e", str(REPO / "experiments" / "bob_and_spot"), "--out", tmp,
                             "--device", str(device)])
        return [("demo.py", "whole default demo (100 it + outputs)", time.perf_counter() - t0, "s")]


def extraction_rows(device, repeats):
    from lib import experiment
    from lib.isosurface import extract
    from lib.layer import mesh_from_sdf
    from lib.models.decoder import sdf as decoder_sdf
    from lib.experiment.specs import load_specs

    exp = REPO / "experiments" / "bob_and_spot"
    dec = experiment.load_decoder(exp, load_specs(exp), device=device)
    z = experiment.load_latent_codes(exp, device=device)[0]
    rows = []
    with torch.no_grad():
        for n in (128, 256):
            for mode in ("dense", "sparse"):
                t = timed(lambda: extract(lambda p: decoder_sdf(dec, z, p), n, mode, device=device,
                                          chunk=2 ** 18), device, repeats)
                rows.append(("extraction.py", f"{mode} extraction N={n}", t, "s"))
    zz = z.clone().requires_grad_(True)

    def layer():
        mesh = mesh_from_sdf(dec, zz, 64, "sparse")
        mesh.verts.sum().backward()

    rows.append(("extraction.py", "MeshSDF layer fwd+bwd N=64", timed(layer, device, repeats), "s"))
    return rows


def render_rows(device, repeats):
    from render import load_mesh  # benchmarks/render.py's mesh: ../shared/meshes/bob.obj or the stand-in

    from lib.render import SVR_EPS, SVR_SIGMA, look_at, rasterize, silhouette

    _, v, f = load_mesh(None)
    v, f = v.float().to(device), f.long().to(device)
    cam = look_at(45.0, 30.0, 2.5, image_size=512, device=device)
    vg = v.clone().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            silhouette(v, f, cam, sigma=SVR_SIGMA, eps=SVR_EPS)

    def fwd_bwd():
        silhouette(vg, f, cam, sigma=SVR_SIGMA, eps=SVR_EPS).sum().backward()

    return [("render.py", f"soft silhouette fwd, {f.shape[0]} faces, 512^2", timed(fwd, device, repeats), "s"),
            ("render.py", "soft silhouette fwd+bwd", timed(fwd_bwd, device, repeats), "s"),
            ("render.py", "hard z-buffer", timed(lambda: rasterize(v, f, cam), device, repeats), "s")]


def train_step_rows(device, repeats):
    from train_step import naive_forward, write_synthetic_scenes

    from lib.datasets import SdfSamples
    from lib.experiment.specs import load_specs
    from lib.models.decoder import decoder_from_specs
    from lib.training import TrainSettings, auto_decoder_loss, clamped_l1, optimizer_step

    specs = load_specs(REPO / "experiments" / "bob_and_spot")
    settings = TrainSettings.from_specs(specs)
    s, b = settings.samples_per_scene, settings.scenes_per_batch
    with tempfile.TemporaryDirectory() as tmp:
        data = SdfSamples(tmp, write_synthetic_scenes(tmp, b))
    dec = decoder_from_specs(specs).to(device).train()
    codes = torch.nn.Embedding(b, specs["CodeLength"]).to(device)
    opt = torch.optim.Adam([{"params": dec.parameters(), "lr": 1e-5}, {"params": codes.parameters(), "lr": 1e-5}])
    gen = torch.Generator().manual_seed(0)
    scenes = torch.arange(b)

    def fused():
        xyz, sdf = data.sample(scenes, s, gen, device=device)
        loss, _, _ = auto_decoder_loss(dec, codes(scenes.to(device)), xyz, sdf, 1000, settings)
        optimizer_step(opt, loss, 1000)

    def plain():
        xyz, sdf = data.sample(scenes, s, gen, device=device)
        lat = codes(scenes.to(device)).repeat_interleave(s, dim=0)
        pred = naive_forward(dec, torch.cat((lat, xyz.reshape(-1, 3)), 1))
        loss = clamped_l1(pred, sdf, settings.clamp_distance)
        opt.zero_grad()
        loss.backward()
        opt.step()

    return [("train_step.py", f"bob_and_spot step ({b} x {s}), fused", timed(fused, device, repeats), "s"),
            ("train_step.py", "bob_and_spot step, plain autograd", timed(plain, device, repeats), "s")]


def svr_step_rows(device, repeats):
    from lib import svr
    from lib.experiment.specs import load_svr_specs
    from lib.training import TrainSettings

    specs = load_svr_specs(REPO / "experiments" / "cars_svr")
    settings = TrainSettings.from_specs(specs)
    b, n, size = settings.scenes_per_batch, settings.samples_per_scene, int(specs["ImageSize"])
    net = svr.network_from_specs(specs).to(device).train()
    opt = svr.make_optimizer(net, svr.svr_schedules(specs))
    g = torch.Generator().manual_seed(0)
    images = torch.rand(b, 4, size, size, generator=g).to(device)
    xyz = (torch.rand(b, n, 3, generator=g) * 2 - 1).to(device)
    sdf = (torch.rand(b, n, generator=g) * 0.2 - 0.1).to(device)

    def step():
        svr.train_step(net, opt, (images, xyz, sdf), 1000, settings)

    rows = [("scaling.py", f"cars_svr step ({b} x {size}^2 images, {n} samples)", timed(step, device, repeats), "s")]
    if device.type == "cuda" and torch.cuda.device_count() >= 2:
        rows.append(("scaling.py", "2-GPU DDP: python benchmarks/scaling.py --device cuda", float("nan"), "-"))
    return rows


SECTIONS = (demo_rows, extraction_rows, render_rows, train_step_rows, svr_step_rows)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cuda:0")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--with-cpu", action="store_true", help="the same workloads on the CPU, for ratios")
    ap.add_argument("--skip-full", action="store_true", help="skip the whole default demo command")
    args = ap.parse_args()
    from lib import runtime

    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("benchmarks/gpu.py: no CUDA device (torch.cuda.is_available() is False): nothing measured. "
              "Run it on a machine with an NVIDIA GPU and a CUDA build of torch.")
        return 0
    runtime.apply_thread_policy()
    dev = runtime.choose_device(args.device)  # --device cpu: the same table on the CPU (checks the script)
    if dev.type == "cuda":
        props = torch.cuda.get_device_properties(dev)
        print(f"{props.name}, {props.total_memory / 2 ** 30:.0f} GiB, torch {torch.__version__}, "
              f"CUDA {torch.version.cuda}; median of {args.repeats} after a warm-up")
    devices = [dev] + ([torch.device("cpu")] if args.with_cpu and dev.type != "cpu" else [])
    results = {}
    for d in devices:
        for section in SECTIONS:
            for bench, what, t, unit in section(d, args.repeats):
                results.setdefault((bench, what, unit), {})[d.type] = t
        if not args.skip_full:
            for bench, what, t, unit in demo_full_row(d):
                results.setdefault((bench, what, unit), {})[d.type] = t
        if d.type == "cuda":
            torch.cuda.synchronize(d)
            results[("all", "peak GPU memory", "GiB")] = {"cuda": torch.cuda.max_memory_allocated(d) / 2 ** 30}
    head = f"| benchmark | workload | GPU | {'CPU | CPU / GPU |' if args.with_cpu else ''}"
    print("\n" + head)
    print("|" + "---|" * (head.count("|") - 1))
    for (bench, what, unit), t in results.items():
        g = t.get(dev.type, float("nan"))
        line = f"| {bench} | {what} | {g:.4g} {unit} |"
        if args.with_cpu:
            c = t.get("cpu", float("nan"))
            line += f" {c:.4g} {unit} | {c / g:.1f}x |"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
