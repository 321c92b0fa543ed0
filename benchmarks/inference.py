#!/usr/bin/env python
"""The frozen-decoder inference kernels (lib.models.kernels.inference) against the autograd path they
replace, on the bob_and_spot network, ratios measured in one run.

The machine may be shared: the two sides are timed alternately, round after round, and each
figure is the median over rounds (the range is printed too).  Prints:

  1. values: SDF at ``--points`` random points (default 16384, the extraction's call size),
     ``InferenceKernel.values`` vs ``Decoder.forward`` under no_grad, µs per point;
  2. input gradients at ``--vertices`` points (default 7000, a demo mesh's vertices):
     ``values_and_input_grad`` vs one autograd forward + backward w.r.t. the input rows, ms;
  3. the demo loop (``--iterations`` steps of LatentOptimizer at N = 64, 512 px silhouettes,
     ``--renderer`` nr as the demo) with ``kernel=True`` vs ``kernel=False``: per step, the
     extraction and the MeshSDF backward (the layer's profiler labels ``meshsdf.extract`` and
     ``meshsdf.backward``, from a second, profiled run of the same steps; both sides evaluate
     only the vertices the loss moves) and the whole step (unprofiled), s (``--no-demo``: skipped);
  4. the kernels with each CPU GEMM library (``lib.models.kernels.gemm``: torch.mm's BLAS and
     oneDNN), the libraries alternating round after round: points per second of ``values`` on
     ``--points`` points (one code; two codes, rows indexed, as a mesh batch), and of
     ``values_and_input_grad``, in process CPU time (all threads: the work, whatever share of the
     cores the load leaves) and in wall time, with the library ``cpu_gemm`` picks for this CPU;
     and the sparse extraction of both codes at ``--extract-resolution`` (default 256; 0: skipped),
     seconds, with whether both libraries give the same faces.

Writes everything, with the CPU, the thread count and the load average, to a JSON file
(default benchmarks/results/inference_<time>.json; an existing file is never overwritten).

Usage: python benchmarks/inference.py [-e experiments/bob_and_spot] [--rounds 5] [--iterations 20]
       [--renderer nr|soft] [--no-demo] [--extract-resolution 256] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
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
from lib.layer import mesh_from_sdf  # noqa: E402
from lib.models.kernels import gemm  # noqa: E402
from lib.models.kernels.inference import InferenceKernel  # noqa: E402
from lib.optimize import LatentOptimizer, SilhouetteLoss  # noqa: E402
from lib.render import demo_camera, silhouette  # noqa: E402
from lib.experiment.specs import REPO_ROOT, load_specs  # noqa: E402
from lib.runtime.cpus import cpu_info  # noqa: E402


def _median_time(fn, reps: int) -> float:
    fn()
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t)
    return statistics.median(ts)


def _fmt(xs, scale=1.0, digits=3):
    xs = [x * scale for x in xs]
    return f"{statistics.median(xs):.{digits}f} [{min(xs):.{digits}f}-{max(xs):.{digits}f}]"


STAGES = {"extract": "meshsdf.extract", "field_bwd": "meshsdf.backward"}  # column -> the layer's profiler label


def _demo_loop(dec, codes, cam, target, iterations: int, use: bool, renderer: str) -> dict:
    """Per-step seconds of the extraction / the MeshSDF backward / the whole step, kernels on or off."""
    def run(steps):
        opt = LatentOptimizer(dec, codes[1], SilhouetteLoss(cam, target, loss="mse", renderer=renderer), lr=5e-2,
                              resolution=64, kernel=use)
        spent = 0.0
        for _ in range(steps):
            t = time.perf_counter()
            opt.step()
            spent += time.perf_counter() - t
        return spent

    out = {"step": run(iterations) / iterations}   # unprofiled: the profiler's own cost stays out of it
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        run(iterations)
    totals = {e.key: e.cpu_time_total for e in prof.key_averages()}   # microseconds
    for column, label in STAGES.items():
        out[column] = totals.get(label, 0.0) * 1e-6 / iterations
    return out


def _gemm_libraries(dec, kernel, codes, pts, rounds: int, resolution: int) -> tuple[dict, dict]:
    """Section 4: per GEMM library and call, best and median points/s over ``rounds`` in process
    CPU time and in wall time; the libraries alternate (ABAB, then BABA) so that load hits both
    alike.  Also the sparse extraction of every code at ``resolution`` (0: none): seconds per
    library, and per code whether the libraries' faces are equal and their largest vertex difference."""
    libraries = ["blas"] + (["onednn"] if gemm.onednn_available() else [])
    n = pts.shape[0]
    index = torch.arange(n) % codes.shape[0]
    calls = {"values, one code": (lambda: kernel.values(codes[1:2], pts), 10, n),
             f"values, {codes.shape[0]} codes indexed": (lambda: kernel.values(codes, pts, index), 10, n),
             "values_and_input_grad, one code": (lambda: kernel.values_and_input_grad(codes[1:2], pts), 4, n)}
    meshes: dict = {}
    if resolution:
        def extract():
            with torch.no_grad():
                meshes[gemm.cpu_gemm()] = [mesh_from_sdf(dec, c, resolution, "sparse") for c in codes]
        calls[f"extraction of {codes.shape[0]} codes at N = {resolution}"] = (extract, 1, 1)
    seen: dict = {}
    for r in range(rounds):
        for library in (libraries if r % 2 == 0 else libraries[::-1]):
            with gemm.forced_gemm(library):
                for name, (fn, reps, units) in calls.items():
                    if units > 1:
                        fn()  # weights prepared, scratch grown
                    c0, t0 = time.process_time(), time.perf_counter()
                    for _ in range(reps):
                        fn()
                    c, t = (time.process_time() - c0) / reps, (time.perf_counter() - t0) / reps
                    seen.setdefault(name, {}).setdefault(library, []).append((units / c, units / t))
    out = {}
    for name, per in seen.items():
        out[name] = {lib_name: {"cpu_per_s_best": max(c for c, _ in xs),
                                "cpu_per_s_median": statistics.median(c for c, _ in xs),
                                "wall_per_s_best": max(t for _, t in xs),
                                "wall_per_s_median": statistics.median(t for _, t in xs)}
                     for lib_name, xs in per.items()}
    same = {}
    if len(meshes) == 2:
        for k, (a, b) in enumerate(zip(meshes["blas"], meshes["onednn"])):
            equal = a.faces.shape == b.faces.shape and bool(torch.equal(a.faces, b.faces))
            same[f"code {k}"] = {"faces": int(a.faces.shape[0]), "faces_equal": equal,
                                 "max_vertex_difference": float((a.verts - b.verts).abs().max()) if equal else None}
    return out, same


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("-e", "--experiment", default=str(REPO_ROOT / "experiments" / "bob_and_spot"))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--points", type=int, default=16384)
    ap.add_argument("--vertices", type=int, default=7000)
    ap.add_argument("--iterations", type=int, default=20)
    ap.add_argument("--renderer", default="nr", help="the demo loss's renderer (nr, the demo's default, or soft)")
    ap.add_argument("--no-demo", action="store_true", help="skip section 3 (the demo loop)")
    ap.add_argument("--extract-resolution", type=int, default=256,
                    help="section 4's sparse extraction of both codes at this N (0: skipped)")
    ap.add_argument("--output", default=None,
                    help="JSON result file (default benchmarks/results/inference_<time>.json)")
    args = ap.parse_args(argv)
    out_path = Path(args.output) if args.output else (Path(__file__).resolve().parent / "results" /
                                                      f"inference_{time.strftime('%Y%m%d_%H%M%S')}.json")
    if out_path.exists():
        raise MeshSDFError(f"{out_path} exists: pass another --output (results are never overwritten)")
    runtime.apply_thread_policy()
    exp = Path(args.experiment)
    dec, codes = experiment.load_decoder_and_codes(exp, load_specs(exp), "latest", device="cpu")
    dec.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    codes = codes.detach()
    load_before = os.getloadavg()
    info = cpu_info()
    print(f"CPU: {info.summary()}; threads {torch.get_num_threads()}, load {load_before[0]:.2f}")
    result: dict = {"what": "the frozen-decoder inference kernels on the bob_and_spot network",
                    "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rounds": args.rounds,
                    "cpu": {"model": info.model, "vendor": info.vendor, "vector_bits": info.vector_bits,
                            "caches": info.caches, "cores": os.cpu_count()},
                    "threads": torch.get_num_threads(), "points": args.points, "vertices": args.vertices}
    code = codes[1:2]
    kernel = InferenceKernel(dec)
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(args.points, 3, generator=gen) * 2 - 1
    verts = torch.rand(args.vertices, 3, generator=gen) * 2 - 1

    def forward():
        with torch.no_grad():
            return dec(torch.cat((code.expand(pts.shape[0], -1), pts), 1))

    def autograd_rows():
        rows = torch.cat((code.expand(verts.shape[0], -1), verts), 1).requires_grad_(True)
        return torch.autograd.grad(dec(rows).sum(), rows)

    res = {k: [] for k in ("fwd", "val", "ag", "vg")}
    for _ in range(args.rounds):
        res["fwd"].append(_median_time(forward, 10) / args.points)
        res["val"].append(_median_time(lambda: kernel.values(code, pts), 10) / args.points)
        res["ag"].append(_median_time(autograd_rows, 5))
        res["vg"].append(_median_time(lambda: kernel.values_and_input_grad(code, verts), 5))
    result["values_us_per_point"] = {"forward": res["fwd"], "kernel": res["val"]}
    result["input_grad_s"] = {"autograd": res["ag"], "kernel": res["vg"]}
    ratio = [a / b for a, b in zip(res["fwd"], res["val"])]
    print(f"1. values at {args.points} points, us/point: Decoder.forward (no_grad) {_fmt(res['fwd'], 1e6)}, "
          f"kernel {_fmt(res['val'], 1e6)}; speed-up {_fmt(ratio, digits=2)}")
    ratio = [a / b for a, b in zip(res["ag"], res["vg"])]
    print(f"2. input gradients at {args.vertices} points, ms: autograd {_fmt(res['ag'], 1e3, 1)}, "
          f"kernel {_fmt(res['vg'], 1e3, 1)}; speed-up {_fmt(ratio, digits=2)}")

    if not args.no_demo:
        cam = demo_camera(image_size=512, device="cpu")
        with torch.no_grad():
            t = mesh_from_sdf(dec, codes[0], 64, "sparse")
        target = silhouette(t.verts, t.faces, cam, sigma=0)
        runs = {True: [], False: []}
        for r in range(args.rounds):
            for use in ((True, False) if r % 2 == 0 else (False, True)):
                runs[use].append(_demo_loop(dec, codes, cam, target, args.iterations, use, args.renderer))
        print(f"3. demo loop ({args.renderer}), {args.iterations} iterations x {args.rounds} rounds, "
              "s per step (median [range]):")
        for k in ("extract", "field_bwd", "step"):
            on, off = [x[k] for x in runs[True]], [x[k] for x in runs[False]]
            ratio = [b / a for a, b in zip(on, off)]
            print(f"   {k:9s} kernels {_fmt(on, digits=4)}  autograd {_fmt(off, digits=4)}  "
                  f"speed-up {_fmt(ratio, digits=2)}")
        result["demo_s_per_step"] = {"kernels": runs[True], "autograd": runs[False], "renderer": args.renderer,
                                     "iterations": args.iterations}

    chosen = gemm.cpu_gemm()
    libs, same = _gemm_libraries(dec, kernel, codes, pts, args.rounds, args.extract_resolution)
    print(f"4. GEMM libraries at {args.points} points ({args.rounds} alternating rounds; this CPU's choice: "
          f"{chosen}), thousand points/s (extraction: seconds), best [median], in process CPU and wall time:")
    for name, per in libs.items():
        points = not name.startswith("extraction")

        def show(rate):
            return f"{rate / 1e3:6.0f}" if points else f"{1 / rate:6.2f}"
        cells = "  ".join(f"{k} CPU {show(v['cpu_per_s_best'])} [{show(v['cpu_per_s_median']).strip()}]"
                          f" wall {show(v['wall_per_s_best'])} [{show(v['wall_per_s_median']).strip()}]"
                          for k, v in per.items())
        ratio = ""
        if "onednn" in per:
            best = {k: v["cpu_per_s_best"] for k, v in per.items()}
            ratio = f"  onednn/blas CPU {best['onednn'] / best['blas']:.2f}x"
        print(f"   {name:36s} {cells}{ratio}")
    for k, v in same.items():
        print(f"   extraction, {k}: {v['faces']} faces, equal with both libraries: {v['faces_equal']}"
              + (f", vertices within {v['max_vertex_difference']:.1e}" if v["faces_equal"] else ""))
    load_after = os.getloadavg()
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    result.update({"gemm_chosen": chosen, "gemm_libraries": libs, "extraction_by_library": same,
                   "load_average": {"before": load_before, "after": load_after}})
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.with_suffix(out_path.suffix + ".tmp")
    tmp.write_text(json.dumps(result, indent=1) + "\n")
    tmp.replace(out_path)
    print(f"results: {out_path}")
    return 0


if __name__ == "__main__":
    sys.exit(cli_main(main, "inference.py"))
