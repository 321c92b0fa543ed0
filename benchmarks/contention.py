#!/usr/bin/env python
"""The demo and a training epoch, each on a quiet machine and next to one CPU-bound competitor.

Why: on a 2-core laptop that is doing something else, torch's default of one intra-op
thread per core with busy-waiting OpenMP threads made the demo several times slower next to ONE
competing process.  This benchmark measures what the thread policy of ``lib.runtime``
(``MESHSDF_THREADS``, see the README "Threads and busy machines") buys.

Workloads (each in a fresh process, so the OpenMP settings of the policy apply from the
start, and timed after start-up):

  * demo:  30 iterations of the default demo loop (spot -> bob, experiments/bob_and_spot, nr renderer,
           N = 64, 512 x 512, default extraction mode); total seconds of the 30 iterations;
  * train: a bob_and_spot training run (real network and specs, synthetic 250k-row
           scenes) of ``--epochs`` epochs; median seconds per epoch (lib.training's timing,
           the first epoch dropped as warm-up).

Each workload runs quiet and next to one competitor (a Python busy loop, one process:
"a laptop doing one other thing"), under each policy: ``off`` = torch's defaults
(today's behaviour without the policy) and ``auto`` = the policy.  Rounds interleave
every combination so that load from other processes hits all alike; the report gives
median and range over rounds and the ratios contended / quiet (target <= 2x) and
auto-quiet / off-quiet (target <= 1, "quiet no slower").  Each round also times off's
quiet run a second time, last, as a control: auto's quiet run is compared with the mean
of off's two (drift cancels), and off against itself says how finely this run can tell
two times apart (``quiet_verdict``).  ``uptime`` before and after says what else ran.

Usage: python benchmarks/contention.py [--rounds 5] [--epochs 8] [--iterations 30]
       [--policies off,auto] [--workloads demo,train] [--competitors 1]
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

COMPETITOR = "while True: pass"


# --------------------------------------------------------------------------- workers

def worker_demo(iterations: int) -> dict:
    import torch

    from lib import experiment, runtime
    from lib.layer import mesh_from_sdf
    from lib.optimize import LatentOptimizer, SilhouetteLoss
    from lib.render import demo_camera, silhouette
    from lib.experiment.specs import load_specs

    runtime.apply_thread_policy()
    exp = REPO / "experiments" / "bob_and_spot"
    specs = load_specs(exp)
    decoder = experiment.load_decoder(exp, specs, device="cpu")
    codes = experiment.load_latent_codes(exp, device="cpu")
    camera = demo_camera(image_size=512)
    with torch.no_grad():
        bob = mesh_from_sdf(decoder, codes[0], 64, "dense")
        target = silhouette(bob.verts, bob.faces, camera, sigma=0)
    opt = LatentOptimizer(decoder, codes[1], SilhouetteLoss(camera, target, renderer="nr"), lr=5e-2, resolution=64)
    t0 = time.perf_counter()
    for _ in range(iterations):
        opt.step()
    return {"seconds": time.perf_counter() - t0, "threads": torch.get_num_threads()}


def worker_train(epochs: int) -> dict:
    import torch

    from lib import runtime
    from lib.datasets import SdfSamples
    from lib.experiment.specs import load_specs
    from lib.training import train_auto_decoder

    sys.path.insert(0, str(REPO / "benchmarks"))
    from train_step import write_synthetic_scenes  # 250k-row scenes, like prepared bob and spot files

    runtime.apply_thread_policy()
    specs = dict(load_specs(REPO / "experiments" / "bob_and_spot"))
    with tempfile.TemporaryDirectory() as tmp:
        data = SdfSamples(tmp, write_synthetic_scenes(tmp, 2))
        exp = Path(tmp) / "exp"
        exp.mkdir()
        result = train_auto_decoder(exp, specs, data, "cpu", num_epochs=epochs)
        timing = torch.load(exp / "Logs.pth", weights_only=False)["timing"] if (exp / "Logs.pth").is_file() else []
    del result
    steady = timing[1:] or timing
    return {"seconds": statistics.median(steady), "threads": torch.get_num_threads()}


# --------------------------------------------------------------------------- driver

def run_worker(workload: str, policy: str, args) -> dict:
    env = dict(os.environ, MESHSDF_QUIET="1")
    env.pop("OMP_NUM_THREADS", None)
    env["MESHSDF_THREADS"] = policy
    cmd = [sys.executable, __file__, "--worker", workload, "--iterations", str(args.iterations),
           "--epochs", str(args.epochs)]
    out = subprocess.run(cmd, env=env, cwd=REPO, capture_output=True, text=True, timeout=1800)
    if out.returncode != 0:
        raise SystemExit(f"worker {workload}/{policy} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_competitors(n: int) -> list[subprocess.Popen]:
    procs = [subprocess.Popen([sys.executable, "-c", COMPETITOR]) for _ in range(n)]
    time.sleep(0.5)  # let them reach the loop
    return procs


def stop(procs: list[subprocess.Popen]) -> None:
    for p in procs:
        p.kill()
    for p in procs:
        p.wait()


def uptime() -> str:
    try:
        return Path("/proc/loadavg").read_text().strip()
    except OSError:
        return "?"


def _ratio_line(ratios: list[float]) -> str:
    r = sorted(ratios)
    return f"{statistics.median(r):.2f}x ({r[0]:.2f}-{r[-1]:.2f})"


def quiet_verdict(policy_q: list[float], base_q: list[float], base_q2: list[float]) -> tuple[float, float, str]:
    """(median ratio, noise, verdict) of "the policy's quiet run no slower than the base's".

    Each round times the base quiet twice, before and after the policy's quiet run, so the
    policy is compared with the mean of the two (a slow drift of the machine cancels) and
    the two base runs against each other give the noise of this very run: the median of
    |base / base' - 1|.  Verdict: "met" for a median ratio <= 1, "met within noise" for
    <= 1 + noise (closer than this run can tell apart), else "NOT met".
    """
    ratios = [p / ((a + b) / 2) for p, a, b in zip(policy_q, base_q, base_q2)]
    noise = statistics.median(abs(a / b - 1) for a, b in zip(base_q, base_q2))
    med = statistics.median(ratios)
    verdict = "met" if med <= 1 else "met within noise" if med <= 1 + noise else "NOT met"
    return med, noise, verdict


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--iterations", type=int, default=30, help="demo iterations per run (default 30)")
    ap.add_argument("--epochs", type=int, default=8, help="training epochs per run (default 8)")
    ap.add_argument("--policies", default="off,auto",
                    help="MESHSDF_THREADS values to compare, the base first (default off,auto)")
    ap.add_argument("--workloads", default="demo,train")
    ap.add_argument("--competitors", type=int, default=1, help="CPU-bound competitor processes (default 1)")
    ap.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        res = worker_demo(args.iterations) if args.worker == "demo" else worker_train(args.epochs)
        print(json.dumps(res))
        return 0

    policies = args.policies.split(",")
    base = policies[0]
    workloads = args.workloads.split(",")
    print(f"cores {os.cpu_count()}, affinity {len(os.sched_getaffinity(0))}; /proc/loadavg before: {uptime()}")
    print(f"demo: {args.iterations} iterations (s total); train: median s/epoch of {args.epochs} epochs; "
          f"{args.competitors} competitor(s); {args.rounds} rounds interleaved; each round times {base} quiet "
          f"twice, first and last (the noise control)")
    times: dict = {}
    threads: dict = {}
    for r in range(args.rounds):
        for w in workloads:
            # the base's quiet run first and again last: the others are compared with their mean
            runs = [(pol, c) for pol in policies for c in (False, True)] + [(base + "'", False)]
            for pol, contended in runs:
                procs = start_competitors(args.competitors) if contended else []
                try:
                    res = run_worker(w, pol.rstrip("'"), args)
                finally:
                    stop(procs)
                times.setdefault((w, pol, contended), []).append(res["seconds"])
                threads[(w, pol, contended)] = res["threads"]
                print(f"  round {r + 1} {w:5s} {pol:>5s} {'contended' if contended else 'quiet':9s} "
                      f"{res['seconds']:7.3f} s  ({res['threads']} threads; load {uptime().split()[0]})",
                      flush=True)
    print(f"/proc/loadavg after: {uptime()}")
    print(f"\n{'workload':8s} {'policy':>6s} {'quiet s (range)':>24s} {'contended s (range)':>24s} "
          f"{'contended/quiet (rounds)':>26s} {'quiet/' + base + ' quiet (rounds)':>26s}")
    verdicts = []
    for w in workloads:
        for pol in policies:
            q, c = times[(w, pol, False)], times[(w, pol, True)]
            mq, mc = statistics.median(q), statistics.median(c)
            vs = [qi / ((a + b) / 2) for qi, a, b in zip(q, times[(w, base, False)], times[(w, base + "'", False)])]
            print(f"{w:8s} {pol:>6s} {mq:8.3f} ({min(q):6.3f}-{max(q):6.3f}) {mc:8.3f} ({min(c):6.3f}-{max(c):6.3f}) "
                  f"{_ratio_line([ci / qi for qi, ci in zip(q, c)]):>26s} {_ratio_line(vs):>26s}   "
                  f"threads {threads[(w, pol, False)]}/{threads[(w, pol, True)]}")
            cq = statistics.median(ci / qi for qi, ci in zip(q, c))
            verdicts.append(f"{w} {pol}: contended/quiet {cq:.2f}x {'met' if cq <= 2 else 'NOT met'}")
            if pol != base:
                med, noise, verdict = quiet_verdict(q, times[(w, base, False)], times[(w, base + "'", False)])
                verdicts.append(f"{w} {pol}: quiet/{base} quiet {med:.2f}x, {verdict} "
                                f"(this run's noise: {base} against itself {noise * 100:.1f}%)")
    print("\ntargets: contended/quiet <= 2x (median over rounds) for both workloads; "
          f"the policy's quiet run no slower than {base}'s")
    for v in verdicts:
        print("  " + v)
    return 0


if __name__ == "__main__":
    sys.exit(main())
