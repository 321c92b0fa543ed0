#!/usr/bin/env python
"""Kill/resume soak: train_deep_sdf.py killed many times at random moments still ends exactly
where an uninterrupted run ends.

Two ways of dying and coming back (``--mode``):

  * single:   SIGKILL the script (``--kills`` times), then start the same command again,
              ``--continue latest`` (a fresh start the first time);
  * torchrun: one ``torchrun --nproc_per_node=2 --max-restarts=K`` job; SIGKILL one of its
              workers at random (``--kills`` times) and let torchrun restart the group with
              the same command;
  * both (default);
  * exits:    no kills: ``--runs`` consecutive 2-process torchrun trainings where one rank gets
              no scenes (2 scenes, ScenesPerBatch 1) and ``--runs`` with full ranks
              (ScenesPerBatch 2), counting how each ended; every one must exit 0 (a rank once
              aborted at exit, see lib.training.distributed._collective).  Prints the counts per
              exit status.

After every kill the ``latest`` resume record must load (model, codes, Adam state, RNG) and
the logs must never be behind it.  At the end: epochs 1..N each logged once, and the loss
curve and weights equal those of an uninterrupted run of the same configuration (same
world size, same threads).  Prints kills survived, epochs redone per kill and the result.
Usage: python benchmarks/faults.py [--kills 20] [--mode both|single|torchrun|exits] [--runs 50] [--seed 0]
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib import experiment  # noqa: E402
from lib.datasets import read_split  # noqa: E402
from lib.models.decoder import decoder_from_specs  # noqa: E402
from lib.training import TrainSettings, make_latent_codes  # noqa: E402
from lib.datasets.sampling import split_by_sign, write_sdf_samples  # noqa: E402
from lib.experiment.specs import load_specs  # noqa: E402

ENV = dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1")


def make_experiment(root: Path, epochs: int, scenes: int = 4, scenes_per_batch: int = 2) -> Path:
    rng = np.random.default_rng(0)
    names = []
    for k in range(scenes):
        p = rng.uniform(-1, 1, (4000, 3)).astype(np.float32)
        sdf = np.linalg.norm(p, axis=1) - (0.3 + 0.1 * k)
        write_sdf_samples(root / "data" / "soak" / "s" / f"ball{k}.npz", *split_by_sign(np.column_stack([p, sdf])))
        names.append(f"ball{k}")
    (root / "split.json").write_text(json.dumps({"soak": {"s": names}}))
    exp = root / "exp"
    exp.mkdir(parents=True)
    specs = {
        "DataSource": str(root / "data"), "TrainSplit": str(root / "split.json"), "NetworkArch": "deep_sdf_decoder",
        "NetworkSpecs": {"dims": [32, 32, 32], "dropout": [0, 1, 2], "dropout_prob": 0.2, "norm_layers": [0, 1, 2],
                         "latent_in": [1], "weight_norm": True},
        "CodeLength": 4, "NumEpochs": epochs, "SnapshotFrequency": 25, "LogFrequency": 1,
        "LearningRateSchedule": [{"Type": "Step", "Initial": 1e-3, "Interval": 50, "Factor": 0.5}] * 2,
        "SamplesPerScene": 512, "ScenesPerBatch": scenes_per_batch, "ClampingDistance": 0.1, "CodeBound": 1.0,
        "ApplyCodeBound": True,
    }
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


def command(exp: Path, nproc: int, restarts: int = 0) -> list[str]:
    script = [str(REPO / "train_deep_sdf.py"), "-e", str(exp), "--continue", "latest", "--device", "cpu",
              "--seed", "7", "--no-reconstruct"]
    if nproc == 1:
        return [sys.executable, *script]
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
            f"--max-restarts={restarts}", "--monitor_interval=0.1", *script]


def logged_epoch(exp: Path) -> int:
    try:
        return int(experiment.load_logs(exp).get("epoch", 0))
    except Exception:  # noqa: BLE001
        return 0


def check_resume_record(exp: Path) -> int:
    """Load ``latest`` as a resume does; returns its epoch (0 when there is none yet)."""
    if not experiment.checkpoint_path(exp, "OptimizerParameters", "latest").is_file():
        return 0
    specs = load_specs(exp)
    dec = decoder_from_specs(specs)
    codes = make_latent_codes(len(read_split(specs["TrainSplit"])), specs["CodeLength"],
                              TrainSettings.from_specs(specs))
    opt = torch.optim.Adam([{"params": dec.parameters()}, {"params": codes.parameters()}])
    epoch, extra = experiment.load_checkpoint(exp, "latest", dec, opt, codes)
    assert "rng_state" in extra
    return epoch


def workers(pid: int) -> list[int]:
    """Child processes of ``pid`` (torchrun's workers)."""
    out = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if int((d / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(d.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def wait_progress(exp: Path, before: int, proc: subprocess.Popen, timeout: float = 300) -> None:
    deadline = time.time() + timeout
    while proc.poll() is None and logged_epoch(exp) <= before and time.time() < deadline:
        time.sleep(0.01)


def soak_single(exp: Path, kills: int, rng: random.Random) -> list[tuple[int, int]]:
    history = []
    for _ in range(kills):
        before = logged_epoch(exp)
        proc = subprocess.Popen(command(exp, 1), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_progress(exp, before, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        if proc.poll() is not None:
            raise SystemExit("training finished before the planned kills; raise --epochs")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        history.append((logged_epoch(exp), check_resume_record(exp)))
    r = subprocess.run(command(exp, 1), env=ENV, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"final run failed: {r.stderr[-2000:]}")
    return history


def soak_torchrun(exp: Path, kills: int, rng: random.Random) -> list[tuple[int, int]]:
    history = []
    err_file = exp.parent / "torchrun.err"
    with open(err_file, "w") as err_out:
        proc = subprocess.Popen(command(exp, 2, restarts=kills), env=ENV, cwd=REPO, stdout=subprocess.DEVNULL,
                                stderr=err_out)
    for k in range(kills):
        before = logged_epoch(exp)
        wait_progress(exp, before, proc)
        time.sleep(rng.uniform(0.0, 0.3))
        pids = workers(proc.pid)
        if proc.poll() is not None or not pids:
            raise SystemExit("training finished before the planned kills; raise --epochs")
        os.kill(rng.choice(pids), signal.SIGKILL)
        # torchrun notices, stops the other worker and restarts both; wait for the old ones to go
        deadline = time.time() + 60
        while any(p in workers(proc.pid) for p in pids) and time.time() < deadline:
            time.sleep(0.02)
        history.append((logged_epoch(exp), check_resume_record(exp)))
        print(f"  kill {k + 1}: pid {pids} at epoch {history[-1][0]} (checkpoint {history[-1][1]})", file=sys.stderr)
    proc.wait()
    if proc.returncode != 0:
        failures = [ln for ln in err_file.read_text().splitlines() if "exitcode" in ln or "Error:" in ln]
        raise SystemExit(f"torchrun failed after {len(history)} kills:\n" + "\n".join(failures[-20:]))
    return history


def soak_exits(runs: int, scenes_per_batch: int, root: Path, epochs: int = 3) -> dict[int, int]:
    """``runs`` fresh 2-process torchrun trainings of 2 scenes in global batches of
    ``scenes_per_batch``; returns {exit status: count} and prints each failure's last lines."""
    counts: dict[int, int] = {}
    for k in range(runs):
        exp = make_experiment(root / f"{scenes_per_batch}_{k}", epochs, scenes=2, scenes_per_batch=scenes_per_batch)
        r = subprocess.run(command(exp, 2), env=ENV, cwd=REPO, capture_output=True, text=True)
        counts[r.returncode] = counts.get(r.returncode, 0) + 1
        if r.returncode != 0:
            died = [ln for ln in r.stderr.splitlines() if "terminate" in ln or "exitcode" in ln or "Error" in ln]
            print(f"  run {k + 1}: exit {r.returncode}: " + " | ".join(died[-4:]), file=sys.stderr, flush=True)
        shutil.rmtree(exp.parent)
        print(f"  ScenesPerBatch {scenes_per_batch}: {k + 1}/{runs} runs, exits {counts}", file=sys.stderr,
              flush=True)
    return counts


def reference(root: Path, epochs: int, nproc: int) -> Path:
    exp = make_experiment(root, epochs)
    r = subprocess.run(command(exp, nproc), env=ENV, cwd=REPO, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"reference run failed: {r.stderr[-2000:]}")
    return exp


def compare(exp: Path, ref: Path, epochs: int) -> str:
    logs, ref_logs = experiment.load_logs(exp), experiment.load_logs(ref)
    assert logs["log_epochs"] == list(range(1, epochs + 1)), "epochs missing or repeated"
    loss_diff = float(np.max(np.abs(np.array(logs["loss"]) - np.array(ref_logs["loss"]))))
    specs = load_specs(exp)
    a, b = experiment.load_decoder(exp, specs), experiment.load_decoder(ref, specs)
    w_diff = max(float((x - y).abs().max()) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    ok = loss_diff <= 1e-5 and w_diff <= 1e-5
    return (f"max |loss - uninterrupted| {loss_diff:.2e}, max |weight diff| {w_diff:.2e}: "
            f"{'EQUAL' if ok else 'DIFFERENT'}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=None, help="default: 12 per kill + 20")
    ap.add_argument("--mode", choices=("single", "torchrun", "both", "exits"), default="both")
    ap.add_argument("--runs", type=int, default=50, help="--mode exits: trainings per kind (default 50)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if args.mode == "exits":
        with tempfile.TemporaryDirectory() as tmp:
            for spb, what in ((1, "one rank without scenes"), (2, "both ranks with scenes")):
                t0 = time.perf_counter()
                counts = soak_exits(args.runs, spb, Path(tmp))
                print(f"ScenesPerBatch {spb} ({what}): {counts.get(0, 0)} of {args.runs} 2-process torchrun trainings "
                      f"exited 0; all exits {dict(sorted(counts.items()))}; {time.perf_counter() - t0:.0f} s",
                      flush=True)
        return
    epochs = args.epochs or 12 * args.kills + 20
    modes = ("single", "torchrun") if args.mode == "both" else (args.mode,)
    for mode in modes:
        rng = random.Random(args.seed)
        with tempfile.TemporaryDirectory() as tmp:
            exp = make_experiment(Path(tmp) / "soak", epochs)
            t0 = time.perf_counter()
            history = (soak_single if mode == "single" else soak_torchrun)(exp, args.kills, rng)
            seconds = time.perf_counter() - t0
            for logged, ckpt in history:
                assert ckpt <= logged, "a checkpoint ahead of the logs"
            redone = [logged - ckpt for logged, ckpt in history]
            result = compare(exp, reference(Path(tmp) / "ref", epochs, 1 if mode == "single" else 2), epochs)
        print(f"{mode:8s}: {len(history)} SIGKILLs survived over {epochs} epochs in {seconds:.0f} s; killed at epochs "
              f"{[h[0] for h in history]}; latest loadable after every kill; epochs redone per kill: mean "
              f"{np.mean(redone):.1f}, max {max(redone)}; {result}", flush=True)


if __name__ == "__main__":
    main()
