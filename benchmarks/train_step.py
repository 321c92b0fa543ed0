#!/usr/bin/env python
"""Time one bob_and_spot-sized DeepSDF training step against the GEMM roofline of this machine.

Step = sample 2 scenes x SamplesPerScene rows from ~500k-row scenes, forward, backward,
Adam update, with the real experiments/bob_and_spot network.  In the same run (rounds
interleaved, best of each kept, so other load on the machine affects all alike) it times

  * roofline: the step's GEMM FLOPs (forward 2*N*sum(in*out), backward twice that) divided
    by the throughput of a dense 2048^3 float32 GEMM on the same threads;
  * baseline: a plain PyTorch version (nn.Dropout, relu, concatenations, per-scene
    np.random.choice sampling without replacement);
  * ours: lib.datasets.SdfSamples.sample + lib.training.auto_decoder_loss (the fused
    forward + backward of lib.models.kernels.fused) + optimizer_step.

Prints the times and the ratios step / roofline.  Usage: python benchmarks/train_step.py [--rounds R]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
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
from lib.training import TrainSettings, auto_decoder_loss, clamped_l1, optimizer_step  # noqa: E402
from lib.experiment.specs import REPO_ROOT, load_specs  # noqa: E402

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


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
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
    opt = torch.optim.Adam([{"params": dec.parameters(), "lr": 1e-5}, {"params": codes.parameters(), "lr": 1e-5}])
    gen = torch.Generator().manual_seed(0)
    scenes = torch.arange(b)
    dec.train()

    def ours():
        xyz, sdf = data.sample(scenes, s, gen)
        loss, _, _ = auto_decoder_loss(dec, codes(scenes), xyz, sdf, 1000, settings)
        optimizer_step(opt, loss, 1000)

    def baseline():
        rows = []
        for pos, neg in raw:
            rows.append(torch.from_numpy(pos[np.random.choice(len(pos), s // 2, replace=False)]))
            rows.append(torch.from_numpy(neg[np.random.choice(len(neg), s - s // 2, replace=False)]))
        batch = torch.cat(rows).reshape(b, s, 4)
        lat = codes(scenes).repeat_interleave(s, dim=0)
        pred = naive_forward(dec, torch.cat((lat, batch[..., :3].reshape(-1, 3)), 1))
        loss = clamped_l1(pred, batch[..., 3], settings.clamp_distance) + 1e-4 * lat.norm(dim=1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    a = torch.randn(2048, 2048)
    bm = torch.randn(2048, 2048)

    def gemm():
        a @ bm

    def best_of(fn, reps):
        fn()
        t = float("inf")
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            t = min(t, time.perf_counter() - t0)
        return t

    def ours_in_order():
        # the fused loss's halves are the step's only side-by-side work
        with runtime.thread_settings(concurrent=False):
            ours()

    best = {"gemm": float("inf"), "baseline": float("inf"), "ours": float("inf"), "in order": float("inf")}
    for _ in range(args.rounds):
        best["gemm"] = min(best["gemm"], best_of(gemm, 3))
        best["baseline"] = min(best["baseline"], best_of(baseline, 1))
        best["ours"] = min(best["ours"], best_of(ours, 2))
        best["in order"] = min(best["in order"], best_of(ours_in_order, 2))
    gflops_rate = 2 * 2048 ** 3 / best["gemm"] / 1e9
    flops = step_flops(dec, b * s)
    roof = flops / (gflops_rate * 1e9)
    print(f"{runtime.thread_policy_summary()}; step {b} scenes x {s} samples, {flops / 1e9:.1f} GFLOP")
    print(f"dense GEMM throughput  {gflops_rate:8.1f} GFLOP/s -> roofline {roof * 1e3:8.1f} ms")
    print(f"baseline step          {best['baseline'] * 1e3:8.1f} ms  = {best['baseline'] / roof:5.2f} x roofline")
    print(f"ours step              {best['ours'] * 1e3:8.1f} ms  = {best['ours'] / roof:5.2f} x roofline"
          f"   (speed-up {best['baseline'] / best['ours']:.2f}x)")
    print(f"ours, halves in order  {best['in order'] * 1e3:8.1f} ms  = {best['in order'] / roof:5.2f} x roofline"
          f"   (side by side / in order {best['ours'] / best['in order']:.2f}x)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
