#!/usr/bin/env python
"""Time one bob_and_spot-sized DeepSDF training step against the GEMM roofline of this machine.

Step = sample 2 scenes x SamplesPerScene rows from ~500k-row scenes, forward, backward,
Adam update, with the real experiments/bob_and_spot network.  In the same run (rounds
interleaved, best of each kept, so other load on the machine affects all alike) it times

  * roofline: the step's GEMM FLOPs (forward 2*N*sum(in*out), backward twice that) divided
    by the throughput of a dense 2048^3 float32 GEMM on the same threads, the faster of
    torch.mm (MKL on x86) and oneDNN's linear (torch's mkldnn op): on a CPU where one of them
    runs narrower kernels (MKL on non-Intel AVX-512 CPUs) the other is the machine's rate;
  * baseline: a plain PyTorch version (nn.Dropout, relu, concatenations, per-scene
    np.random.choice sampling without replacement);
  * ours: lib.training.auto_decoder_loss (the fused forward + backward of
    lib.models.kernels.fused) + optimizer_step beside lib.datasets.SdfSamples.sample of the next
    step's batch (lib.training.update_beside, as training runs it), with the GEMM library
    ``lib.models.kernels.gemm.cpu_gemm`` picks for this CPU, and also with each other one.

Prints the CPU (model, vendor, vector width, caches), both GEMM rates, the times and the
ratios step / roofline, where the fused step's wall time goes (before, during and after its two
side-by-side halves), and writes them to a JSON file under benchmarks/results/.
Usage: python benchmarks/train_step.py [--rounds R] [--output FILE]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from lib import cli  # noqa: E402

cli.setup_process()  # before torch loads, as the scripts: OpenMP reads its wait policy once
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from lib import runtime  # noqa: E402
from lib.datasets import Instance, SdfSamples  # noqa: E402
from lib.models.decoder import decoder_from_specs, positional_encoding  # noqa: E402
from lib.training import (TrainSettings, auto_decoder_loss, clamped_l1, make_adam, optimizer_step,  # noqa: E402
                          update_beside)
from lib.experiment.specs import REPO_ROOT, load_specs  # noqa: E402
from lib.models.kernels import fused, gemm  # noqa: E402
from lib.runtime.cpus import cpu_info  # noqa: E402

ROWS = 250_000  # per pos / neg array, like the prepared bob and spot files


def step_flops(decoder, n: int) -> float:
    fwd = sum(2.0 * n * m.in_features * m.out_features if hasattr(m, "in_features") else
              2.0 * n * m.weight_v.shape[0] * m.weight_v.shape[1]
              for name, m in decoder.named_children() if name.startswith("lin"))
    return 3.0 * fwd


def naive_forward(dec, inputs):
    """Same parameters and function as lib's Decoder, written the plain way."""
    latent, xyz = inputs[:, : dec.latent_size], inputs[:, dec.latent_size:]
    if dec.fourier_degree:
        xyz = positional_encoding(xyz, dec.fourier_degree)
    x0 = torch.cat((latent, xyz), 1)
    x = x0
    for i in range(dec.num_layers):
        lin = getattr(dec, f"lin{i}")
        if i in dec.latent_in:
            x = torch.cat((x, x0), 1)
        x = F.linear(x, lin.weight, lin.bias)
        if i == dec.num_layers - 1:
            break
        x = F.relu(x)
        if i in dec.dropout:
            x = F.dropout(x, dec.dropout_prob, training=True)
    return torch.tanh(x)


def write_synthetic_scenes(root, count: int, rows: int = ROWS, seed: int = 0) -> list[Instance]:
    """``count`` sample files of uniform random rows (``rows`` pos, ``rows`` neg) under ``root``."""
    rng = np.random.default_rng(seed)
    insts = [Instance("bench", "samples", f"s{k}") for k in range(count)]
    for inst in insts:
        p = inst.samples_path(root)
        p.parent.mkdir(parents=True, exist_ok=True)
        pts = rng.uniform(-1, 1, (2 * rows, 4)).astype(np.float32)
        np.savez(p, pos=np.abs(pts[:rows]), neg=-np.abs(pts[rows:]))
    return insts


def halves_balance(step, rounds: int) -> dict | None:
    """Where one fused step's wall time goes: the median over ``rounds`` steps of the time before the
    two halves of the fused loss start (setup), each half's wall and thread CPU time (the calling
    thread's half first, then the worker's), and the time after the last one ends (gradients,
    backward, Adam, beside them the next step's sampling).  None if the step has no halves.

    Why: the halves run side by side, one thread each; a step longer than its CPU time / 2 is
    spent in the serial parts, in a half that ends late, or in a thread that waits.
    """
    real = fused._half
    seen = []

    def timed(sh, rows, chunks):
        t0, c0 = time.perf_counter(), time.thread_time()
        part = real(sh, rows, chunks)
        seen.append((threading.current_thread() is not threading.main_thread(), t0, time.perf_counter(),
                     time.thread_time() - c0))
        return part

    steps = []
    fused._half = timed
    try:
        for _ in range(rounds):
            seen.clear()
            t0 = time.perf_counter()
            step()
            t1 = time.perf_counter()
            if len(seen) == 2:
                seen.sort()  # the caller's half first
                steps.append((t1 - t0, min(s for _, s, _, _ in seen) - t0, t1 - max(e for _, _, e, _ in seen),
                              [e - s for _, s, e, _ in seen], [c for _, _, _, c in seen]))
    finally:
        fused._half = real
    if not steps:
        return None
    steps.sort(key=lambda r: r[0])
    wall, before, after, halves, cpus = steps[len(steps) // 2]
    return {"step_ms": wall * 1e3, "before_ms": before * 1e3, "after_ms": after * 1e3,
            "half_ms": [h * 1e3 for h in halves], "half_cpu_ms": [c * 1e3 for c in cpus]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5, help="interleaved rounds; the best of each row is kept")
    ap.add_argument("--output", default=None,
                    help="JSON result file (default benchmarks/results/train_step_<time>.json)")
    args = ap.parse_args()
    runtime.apply_thread_policy()
    specs = load_specs(REPO_ROOT / "experiments" / "bob_and_spot")
    settings = TrainSettings.from_specs(specs)
    s, b = settings.samples_per_scene, settings.scenes_per_batch
    torch.manual_seed(0)
    with tempfile.TemporaryDirectory() as tmp:
        data = SdfSamples(tmp, write_synthetic_scenes(tmp, b))
    raw = [(data.rows[data.pos_start[k]:data.pos_start[k] + data.pos_count[k]].numpy(),
            data.rows[data.neg_start[k]:data.neg_start[k] + data.neg_count[k]].numpy()) for k in range(b)]

    dec = decoder_from_specs(specs)
    codes = torch.nn.Embedding(b, specs["CodeLength"])
    opt = make_adam([{"params": dec.parameters(), "lr": 1e-5}, {"params": codes.parameters(), "lr": 1e-5}])
    # the plain version's own optimizer: torch's default Adam (its per-parameter loop on a CPU)
    plain_opt = torch.optim.Adam([{"params": dec.parameters(), "lr": 1e-5}, {"params": codes.parameters(), "lr": 1e-5}])
    gen = torch.Generator().manual_seed(0)
    scenes = torch.arange(b)
    dec.train()

    drawn = []  # the batch the last step drew beside its update, as train_auto_decoder does

    def ours():
        xyz, sdf = drawn.pop() if drawn else data.sample(scenes, s, gen)
        loss, _, _ = auto_decoder_loss(dec, codes(scenes), xyz, sdf, 1000, settings)
        drawn.append(update_beside(lambda: optimizer_step(opt, loss, 1000), lambda: data.sample(scenes, s, gen))[1])

    def baseline():
        rows = []
        for pos, neg in raw:
            rows.append(torch.from_numpy(pos[np.random.choice(len(pos), s // 2, replace=False)]))
            rows.append(torch.from_numpy(neg[np.random.choice(len(neg), s - s // 2, replace=False)]))
        batch = torch.cat(rows).reshape(b, s, 4)
        lat = codes(scenes).repeat_interleave(s, dim=0)
        pred = naive_forward(dec, torch.cat((lat, batch[..., :3].reshape(-1, 3)), 1))
        loss = clamped_l1(pred, batch[..., 3], settings.clamp_distance) + 1e-4 * lat.norm(dim=1).mean()
        plain_opt.zero_grad()
        loss.backward()
        plain_opt.step()

    a = torch.randn(2048, 2048)
    bm = torch.randn(2048, 2048)
    bm_t = bm.t().contiguous()  # oneDNN's linear computes a @ W^T

    def gemm_mm():
        a @ bm

    def gemm_onednn():
        torch.ops.mkldnn._linear_pointwise(a, bm_t, None, "none", [], "")

    def best_of(fn, reps):
        """(wall, process CPU) seconds of fn, each the best of ``reps`` calls after a warm-up."""
        fn()
        t = c = float("inf")
        for _ in range(reps):
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            t, c = min(t, time.perf_counter() - t0), min(c, time.process_time() - c0)
        return t, c

    chosen = gemm.cpu_gemm()
    libraries = ["blas"] + (["onednn"] if gemm.onednn_available() else [])

    def with_gemm(library, concurrent=True):
        def run():
            # the fused loss's halves are the step's only side-by-side work
            with gemm.forced_gemm(library), runtime.thread_settings(concurrent=concurrent):
                ours()
        return run

    timed = {"gemm torch.mm": (gemm_mm, 3), "baseline": (baseline, 1)}
    if "onednn" in libraries:
        timed["gemm onednn"] = (gemm_onednn, 3)
    for lib_name in libraries:
        timed[f"ours {lib_name}"] = (with_gemm(lib_name), 2)
    timed[f"ours {chosen}, in order"] = (with_gemm(chosen, concurrent=False), 2)
    load_before = os.getloadavg()
    best = {k: float("inf") for k in timed}
    cpu = {k: float("inf") for k in timed}
    for _ in range(args.rounds):  # rounds interleaved: load that comes and goes hits every row alike
        for k, (fn, reps) in timed.items():
            t, c = best_of(fn, reps)
            best[k], cpu[k] = min(best[k], t), min(cpu[k], c)
    load_after = os.getloadavg()
    balance = halves_balance(with_gemm(chosen), rounds=max(3, args.rounds))
    rates = {k.split()[1]: 2 * 2048 ** 3 / t / 1e9 for k, t in best.items() if k.startswith("gemm")}
    rate_lib = max(rates, key=rates.get)
    flops = step_flops(dec, b * s)
    roof = flops / (rates[rate_lib] * 1e9)
    # the same in process CPU time (all threads): the work, whatever share of the cores the load left us
    roof_cpu = flops / (2 * 2048 ** 3) * cpu[f"gemm {rate_lib}"]
    info = cpu_info()
    caches = ", ".join(f"L{k} {v // 1024} KiB" for k, v in sorted(info.caches.items()))
    print(f"CPU: {info.model or platform.processor()} ({info.vendor}), {info.vector_bits}-bit vectors "
          f"(torch kernels: {torch.backends.cpu.get_cpu_capability()}), {caches}")
    print(f"{runtime.thread_policy_summary()}; step {b} scenes x {s} samples, {flops / 1e9:.1f} GFLOP; "
          f"fused loss GEMMs here: {chosen}")
    print(f"load average {load_before[0]:.2f} before, {load_after[0]:.2f} after")
    for lib_name, r in rates.items():
        print(f"dense 2048^3 GEMM, {lib_name:9s} {r:8.1f} GFLOP/s" + ("   <- roofline" if lib_name == rate_lib else ""))
    print(f"roofline               {roof * 1e3:8.1f} ms wall, {roof_cpu * 1e3:8.1f} ms CPU")
    rows = {}
    for k, t in best.items():
        if k.startswith("gemm"):
            continue
        rows[k] = {"ms": t * 1e3, "x_roofline": t / roof, "cpu_ms": cpu[k] * 1e3, "cpu_x_roofline": cpu[k] / roof_cpu}
        extra = f"   (speed-up over baseline {best['baseline'] / t:.2f}x)" if k != "baseline" else ""
        print(f"{k:28s} {t * 1e3:8.1f} ms  = {t / roof:5.2f} x roofline; CPU time {cpu[k] / roof_cpu:5.2f} x{extra}")
    if balance:
        print(f"ours {chosen}, where the wall time goes (median step {balance['step_ms']:.1f} ms): "
              f"{balance['before_ms']:.1f} ms before the halves (setup), halves (caller / worker) "
              + " / ".join(f"{w:.1f}" for w in balance["half_ms"]) + " ms wall ("
              + " / ".join(f"{c:.1f}" for c in balance["half_cpu_ms"]) + " ms thread CPU), "
              f"{balance['after_ms']:.1f} ms after (gradients, Adam; the next batch drawn beside)")
    result = {
        "what": "one bob_and_spot DeepSDF training step (sample, fused loss, backward, Adam) vs its GEMM roofline",
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "rounds": args.rounds,
        "cpu": {"model": info.model, "vendor": info.vendor, "vector_bits": info.vector_bits,
                "torch_capability": torch.backends.cpu.get_cpu_capability(), "caches": info.caches,
                "cores": os.cpu_count()},
        "threads": torch.get_num_threads(), "load_average": {"before": load_before, "after": load_after},
        "step_gflop": flops / 1e9, "gemm_gflops": rates, "roofline_library": rate_lib, "roofline_ms": roof * 1e3,
        "roofline_cpu_ms": roof_cpu * 1e3,
        "fused_gemm": chosen, "rows": rows, "halves_balance": balance,
    }
    out = Path(args.output) if args.output else (Path(__file__).resolve().parent / "results" /
                                                 f"train_step_{time.strftime('%Y%m%d_%H%M%S')}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp_out = out.with_suffix(out.suffix + ".tmp")
    tmp_out.write_text(json.dumps(result, indent=1) + "\n")
    tmp_out.replace(out)
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
