#!/usr/bin/env python
"""Time the spot -> bob demo as users run it, per silhouette renderer, and optionally per
extraction mode.

1. The whole command ``demo_optimizer.py -e experiments/bob_and_spot [--renderer R]`` in a
   fresh process (start-up, 100 iterations with the movie frames, outputs), for each
   renderer of --renderers (default: nr, the default and the original's, and soft, our option).  Per run:
   wall seconds of the command, of its optimisation loop (the ``seconds_total`` of its
   log.json: the 100 steps and their movie frames), start-up + outputs = the difference,
   final genus and silhouette IoU.  Targets (2 quiet cores, the default renderer): loop <= 20 s,
   command <= 30 s, genus 1, IoU >= 0.95.  The load average before and after each run is
   printed: on a shared machine the figures are only meaningful next to it.
2. ``--modes``: dense, sparse and fast optimisers stepped in lockstep in this process (the
   same load hits all three), median seconds per step and speed-up over dense.
3. ``--parts``: the default demo's steps in this process with each stage (extraction,
   silhouette forward and backward, MeshSDF backward, topology, the rest of the step, the movie
   frame) timed by the library's ``torch.profiler.record_function`` labels ("optimize.*",
   "render.*"); seconds per step.  The profiler adds a small
   cost per operation, so compare these parts with each other; on CUDA they are host times.

``--baseline COMMIT`` instead compares the default command of this tree with COMMIT's
(alternately, ``--repeat`` times; best wall and loop seconds) and whether every iteration's
mesh (vertex and face counts, genus) and loss agree, and writes benchmarks/results/demo_<time>.json.

Usage: python benchmarks/demo.py [--renderers nr soft] [--iterations 100] [--modes] [--parts] [--device cpu]
       python benchmarks/demo.py --baseline 707b828 [--repeat 2]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib import cli  # noqa: E402

cli.setup_process()  # before torch loads, as the scripts: OpenMP reads its wait policy once

MODES = ("dense", "sparse", "fast")


def load() -> str:
    return "load {:.1f} {:.1f} {:.1f}".format(*os.getloadavg())


def whole_command(exp: Path, renderer: str, iterations: int, device: str | None, root: Path = REPO) -> dict:
    """One run of ``root``'s demo_optimizer.py (this tree, or a baseline's worktree) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"              # a fresh folder: the demo writes it whole
        cmd = [sys.executable, str(root / "demo_optimizer.py"), "-e", str(exp), "--out", str(out),
               "--renderer", renderer, "--iters", str(iterations)] + (["--device", device] if device else [])
        before = load()
        w0 = time.perf_counter()
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True,
                              env={**os.environ, "MESHSDF_QUIET": "1"})
        wall = time.perf_counter() - w0
        if proc.returncode != 0:
            raise SystemExit(f"demo failed ({renderer}, {root}): {proc.stderr.strip().splitlines()[-1:]}")
        log = json.loads((out / "log.json").read_text())
    return {"renderer": renderer, "wall": wall, "loop": log["seconds_total"], "genus": log["final"]["genus"],
            "iou": log["final"]["iou"], "genus0": log["iterations"][0]["genus"],
            "steps": sum(r["seconds"] for r in log["iterations"]), "load": f"{before} -> {load()}",
            "meshes": [(r["vertices"], r["faces"], r["genus"]) for r in log["iterations"]],
            "losses": [r["loss"] for r in log["iterations"]]}


def compare_with(baseline: str, exp: Path, renderer: str, iterations: int, device: str | None,
                 repeat: int) -> dict:
    """The whole command of this tree and of ``baseline`` (a commit, checked out in a temporary
    worktree, run on this tree's checkpoint), alternately ``repeat`` times: best wall and loop
    seconds of each, and whether every iteration's mesh (vertex and face counts, genus) and
    loss agree."""
    base = Path(tempfile.mkdtemp(prefix="demo_base_"))
    subprocess.run(["git", "worktree", "add", "--detach", str(base), baseline], cwd=REPO, check=True,
                   capture_output=True)
    try:
        runs: dict = {"baseline": [], "this": []}
        for _ in range(repeat):
            runs["baseline"].append(whole_command(exp, renderer, iterations, device, base))
            runs["this"].append(whole_command(exp, renderer, iterations, device))
    finally:
        subprocess.run(["git", "worktree", "remove", "--force", str(base)], cwd=REPO, check=False)
    a, b = runs["baseline"][0], runs["this"][0]
    loss_rel = max((abs(x - y) / max(abs(x), 1e-12) for x, y in zip(a["losses"], b["losses"])), default=0.0)
    return {"baseline": baseline, "renderer": renderer, "iterations": iterations,
            "wall": {k: min(r["wall"] for r in v) for k, v in runs.items()},
            "loop": {k: min(r["loop"] for r in v) for k, v in runs.items()},
            "same_meshes": a["meshes"] == b["meshes"], "largest_relative_loss_difference": loss_rel,
            # (iteration, baseline's (vertices, faces, genus), this tree's) where they differ
            "mesh_differences": [(i, x, y) for i, (x, y) in enumerate(zip(a["meshes"], b["meshes"])) if x != y],
            "final": {k: {"genus": v[0]["genus"], "iou": v[0]["iou"]} for k, v in runs.items()},
            "loads": {k: [r["load"] for r in v] for k, v in runs.items()}}


def demo_setup(exp: Path, device_name: str | None):
    """(device, decoder, codes, camera, target) of the default demo in this process: the
    thread policy applied, the checkpoint loaded, bob's hard silhouette as the target."""
    import torch

    from lib import experiment, runtime
    from lib.layer import mesh_from_sdf
    from lib.render import demo_camera, silhouette
    from lib.experiment.specs import load_specs

    runtime.apply_thread_policy()
    device = runtime.choose_device(device_name)
    decoder, codes = experiment.load_decoder_and_codes(exp, load_specs(exp), "latest", device=device)
    camera = demo_camera(device=device)
    with torch.no_grad():
        bob = mesh_from_sdf(decoder, codes[0], 64, "dense")
        target = silhouette(bob.verts, bob.faces, camera, sigma=0)
    return device, decoder, codes, camera, target


def modes(exp: Path, iterations: int, device_name: str | None) -> None:
    from lib.metrics import silhouette_iou
    from lib.optimize import LatentOptimizer, SilhouetteLoss, SurfaceLostError

    _, decoder, codes, camera, target = demo_setup(exp, device_name)
    opts = {m: LatentOptimizer(decoder, codes[1], SilhouetteLoss(camera, target, renderer="nr"), lr=5e-2,
                               resolution=64, mode=m) for m in MODES}
    wall = {m: [] for m in MODES}
    stopped = {m: "" for m in MODES}
    print(f"\n2. per step, modes in lockstep ({load()})")
    for _ in range(iterations):
        for m in MODES:
            if stopped[m]:
                continue
            w0 = time.perf_counter()
            try:
                opts[m].step()
            except SurfaceLostError as err:
                stopped[m] = str(err)
                continue
            wall[m].append(time.perf_counter() - w0)
    ref = statistics.median(wall["dense"])
    print(f"{'mode':>7} {'s/step':>8} {'x dense':>8} {'final IoU':>10} {'genus':>6}   ({load()})")
    for m in MODES:
        final = opts[m].evaluate()
        mw = statistics.median(wall[m])
        print(f"{m:>7} {mw:>8.3f} {ref / mw:>7.1f}x {silhouette_iou(final.image, target):>10.3f} {final.genus:>6}"
              + (f"  stopped: {stopped[m]}" if stopped[m] else ""))


# part 3's stages: (row, profiler labels whose times add up to it; a label prefixed "-" is subtracted)
STAGES = (("extraction", ("optimize.extraction",)),
          ("{renderer} silhouette forward", ("optimize.render",)),
          ("{renderer} silhouette backward", ("render.silhouette.backward", "render.hard_silhouette.backward")),
          ("MeshSDF backward and the rest of backward", ("optimize.backward", "-render.silhouette.backward",
                                                         "-render.hard_silhouette.backward")),
          ("topology", ("optimize.topology",)))


def parts(exp: Path, iterations: int, device_name: str | None, renderer: str) -> None:
    """3. Where a step of the demo goes: its stages timed by the library's profiler labels."""
    import collections

    import torch
    from torch.profiler import ProfilerActivity, profile

    from lib.optimize import LatentOptimizer, SilhouetteLoss
    from lib.visualize import dl_ds_face_colors, dl_ds_scale, movie_frame, target_outline

    device, decoder, codes, camera, target = demo_setup(exp, device_name)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    edge = target_outline(target)
    loss_fn = SilhouetteLoss(camera, target, loss="mse", renderer=renderer)
    opt = LatentOptimizer(decoder, codes[1], loss_fn, lr=5e-2, resolution=64)
    spent = collections.defaultdict(float)
    scale = None
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(iterations):
            sync()
            t0 = time.perf_counter()
            it = opt.step()
            sync()
            spent["step"] += time.perf_counter() - t0
            t0 = time.perf_counter()
            scale = dl_ds_scale(it.dl_ds, it.faces) if scale is None else scale
            movie_frame(it.verts, it.faces, dl_ds_face_colors(it.dl_ds, it.faces, scale), camera, edge,
                        face_idx=it.face_idx)
            sync()
            spent["movie frame"] += time.perf_counter() - t0
    labels = collections.defaultdict(float)                 # seconds per profiler label
    labels.update({e.key: e.cpu_time_total * 1e-6 for e in prof.key_averages()})
    for row, keys in STAGES:
        spent[row.format(renderer=renderer)] = sum(-labels[k[1:]] if k.startswith("-") else labels[k] for k in keys)
    named = sum(v for k, v in spent.items() if k not in ("step", "movie frame"))
    spent["loss, update, rest of the step"] = spent["step"] - named
    print(f"\n3. where a step goes, {renderer} renderer, {iterations} steps, s per step ({load()})")
    for k, v in spent.items():
        print(f"  {k:<55} {v / iterations:.4f}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-e", "--experiment", default=str(REPO / "experiments" / "bob_and_spot"))
    ap.add_argument("--renderers", nargs="*", default=["nr", "soft"], choices=["nr", "soft"])
    ap.add_argument("--iterations", type=int, default=100)
    ap.add_argument("--repeat", type=int, default=1, help="runs of each whole command (default 1)")
    ap.add_argument("--modes", action="store_true", help="also part 2 (dense / sparse / fast in lockstep)")
    ap.add_argument("--parts", action="store_true", help="also part 3 (where a step of the default demo goes)")
    ap.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    ap.add_argument("--baseline", default=None, metavar="COMMIT",
                    help="instead: the default command of this tree against COMMIT's, alternately --repeat times, "
                         "with every iteration's mesh compared; writes benchmarks/results/demo_<time>.json")
    args = ap.parse_args()
    exp = Path(args.experiment)
    if args.baseline:
        r = compare_with(args.baseline, exp, (args.renderers or ["nr"])[0], args.iterations, args.device,
                         args.repeat)
        r.update(commit=subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True,
                                       text=True).stdout.strip(), cpus=os.cpu_count())
        out = REPO / "benchmarks" / "results" / time.strftime("demo_%Y%m%d_%H%M%S.json")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(r, indent=1) + "\n")
        print(f"command: {args.baseline} {r['wall']['baseline']:.1f} s, this tree {r['wall']['this']:.1f} s "
              f"(loop {r['loop']['baseline']:.1f} / {r['loop']['this']:.1f} s); every iteration's mesh the same: "
              f"{r['same_meshes']}; largest relative loss difference {r['largest_relative_loss_difference']:.1e}; "
              f"final genus/IoU {r['final']}; {r['loads']}")
        print(f"written to {out}")
        return 0
    print(f"{os.cpu_count()} CPUs visible, {len(os.sched_getaffinity(0))} usable; {args.iterations} iterations")
    print("\n1. the whole command, fresh process")
    print(f"{'renderer':>8} {'command s':>10} {'loop s':>7} {'start+out s':>12} {'s/step':>7} "
          f"{'genus':>7} {'IoU':>6}   load before -> after")
    for r in args.renderers:
        for _ in range(args.repeat):
            m = whole_command(exp, r, args.iterations, args.device)
            print(f"{r:>8} {m['wall']:>10.1f} {m['loop']:>7.1f} {m['wall'] - m['loop']:>12.1f} "
                  f"{m['steps'] / args.iterations:>7.3f} {m['genus0']:>3}->{m['genus']:<3} {m['iou']:>6.3f}   "
                  f"{m['load']}")
    print("  targets (the default renderer, 2 quiet cores): loop <= 20 s, command <= 30 s, genus 0 -> 1, IoU >= 0.95")
    if args.modes:
        modes(exp, args.iterations, args.device)
    if args.parts:
        parts(exp, args.iterations, args.device, args.renderers[0] if args.renderers else "nr")
    return 0


if __name__ == "__main__":
    sys.exit(main())
