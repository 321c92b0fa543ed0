import copy
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

import lib.training.loop as train_mod
from lib import experiment
from lib.experiment.specs import load_specs
from lib.datasets import SdfSamples, read_split
from lib.errors import MeshSDFError
from lib.io import read_mesh
from lib.metrics import genus, merge_vertices
from lib.datasets.sampling import split_by_sign, write_sdf_samples
from lib.training import (StepSchedule, TrainSettings, ConstantSchedule, WarmupSchedule, checkpoints_due, clamped_l1,
                          code_reg_weight, reconstruct_training_shapes, train_auto_decoder, truncate_logs)

from fields import on_numpy, sphere, torus

REPO = Path(__file__).resolve().parents[1]


_sphere = on_numpy(sphere(0.55))
_torus = on_numpy(torus(0.5, 0.2))


def _write_npz(path, fn, n, seed):
    """DeepSDF-style samples of an analytic SDF: near-surface jitter plus uniform points."""
    rng = np.random.default_rng(seed)
    uni = rng.uniform(-1, 1, (n, 3))
    d = rng.normal(size=(4 * n, 3))
    d /= np.linalg.norm(d, axis=1, keepdims=True)
    near = rng.uniform(-1, 1, (4 * n, 3))
    near = near[np.abs(fn(near)) < 0.15][:n] + rng.normal(scale=0.02,
                                                          size=(min(n, int((np.abs(fn(near)) < 0.15).sum())), 3))
    pts = np.concatenate([uni, near])
    sdf = fn(pts)
    write_sdf_samples(path, *split_by_sign(np.column_stack([pts, sdf])))


def _experiment(tmp, *, epochs=10, dims=(32, 32, 32, 32), dropout=(), samples=1024, log_frequency=5,
                lr=(1e-3, 1e-3), snapshot=1000, n=4000, interval=500):
    data = tmp / "data"
    _write_npz(data / "toy" / "samples" / "sphere.npz", _sphere, n, 0)
    _write_npz(data / "toy" / "samples" / "torus.npz", _torus, n, 1)
    (tmp / "split.json").write_text(json.dumps({"toy": {"samples": ["sphere", "torus"]}}))
    exp = tmp / "exp"
    exp.mkdir()
    specs = {
        "DataSource": str(data), "TrainSplit": str(tmp / "split.json"), "NetworkArch": "deep_sdf_decoder",
        "NetworkSpecs": {"dims": list(dims), "dropout": list(dropout), "dropout_prob": 0.2 if dropout else 0.0,
                         "norm_layers": list(range(len(dims))), "latent_in": [2], "weight_norm": True,
                         "positional_encoding": True, "fourier_degree": 2},
        "CodeLength": 2, "NumEpochs": epochs, "SnapshotFrequency": snapshot, "AdditionalSnapshots": [3],
        "LearningRateSchedule": [{"Type": "Step", "Initial": lr[0], "Interval": interval, "Factor": 0.5},
                                 {"Type": "Step", "Initial": lr[1], "Interval": interval, "Factor": 0.5}],
        "SamplesPerScene": samples, "ScenesPerBatch": 2, "ClampingDistance": 0.1, "CodeRegularization": True,
        "CodeRegularizationLambda": 1e-4, "LogFrequency": log_frequency,
    }
    (exp / "specs.json").write_text(json.dumps(specs))
    specs = load_specs(exp)
    return exp, specs, SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]))


def test_schedules_and_ramp():
    s = StepSchedule(5e-4, 500, 0.5)
    assert [s(e) for e in (1, 499, 500, 999, 1000, 4000)] == [5e-4, 5e-4, 2.5e-4, 2.5e-4, 1.25e-4, 5e-4 * 0.5 ** 8]
    w = WarmupSchedule(0.0, 1.0, 10)
    assert w(5) == 0.5 and w(10) == 1.0 and w(11) == 1.0
    assert ConstantSchedule(3.0)(77) == 3.0
    assert code_reg_weight(1, 1e-4) == pytest.approx(1e-6) and code_reg_weight(50, 1e-4) == pytest.approx(5e-5)
    assert code_reg_weight(100, 1e-4) == code_reg_weight(4000, 1e-4) == 1e-4


def test_clamped_l1():
    pred = torch.tensor([[0.5], [0.05], [-0.3], [0.0]])
    gt = torch.tensor([0.2, -0.05, -0.02, 0.0])
    # clamp(pred) = .1, .05, -.1, 0; clamp(gt) = .1, -.05, -.02, 0
    assert clamped_l1(pred, gt, 0.1).item() == pytest.approx((0 + 0.1 + 0.08 + 0) / 4)


def test_snapshot_choice():
    specs = load_specs(REPO / "experiments" / "bob_and_spot")
    st = TrainSettings.from_specs(dict(specs, AdditionalSnapshots=[5], SnapshotFrequency=1000), num_epochs=20)
    assert st.num_epochs == 20
    assert [e for e in range(1, 3001) if st.is_snapshot(e)] == [5, 1000, 2000, 3000]
    # the original's bob_and_spot specs have no SnapshotFrequency: AdditionalSnapshots only
    st = TrainSettings.from_specs(dict(specs, AdditionalSnapshots=[5]))
    assert [e for e in range(1, 4001) if st.is_snapshot(e)] == [5]


def test_checkpoints_due_after_an_epoch():
    """(snapshot, latest): a snapshot keeps <epoch>.pth; Logs.pth and latest are written at snapshots, every
    LogFrequency-th epoch, the last epoch and a requested stop, and at no other epoch."""
    specs = load_specs(REPO / "experiments" / "bob_and_spot")
    st = TrainSettings.from_specs(dict(specs, AdditionalSnapshots=[3], SnapshotFrequency=5, LogFrequency=4),
                                  num_epochs=11)
    due = {e: checkpoints_due(st, e, stop=False) for e in range(1, 12)}
    assert [e for e, (snap, _) in due.items() if snap] == [3, 5, 10]
    assert [e for e, (_, latest) in due.items() if latest] == [3, 4, 5, 8, 10, 11]
    assert checkpoints_due(st, 7, stop=True) == (False, True)


def test_truncate_logs():
    logs = {"epoch": 3, "loss": [1, 2, 3, 4, 5, 6], "loss_epoch": [1, 1, 2, 2, 3, 3], "log_epochs": [1, 2, 3],
            "learning_rate": [[1, 1]] * 3, "timing": [0.1, 0.2, 0.3], "latent_magnitude": [1, 2, 3],
            "param_magnitude": {"w": [4, 5, 6]}}
    t = truncate_logs(logs, 2)
    assert t["loss"] == [1, 2, 3, 4] and t["timing"] == [0.1, 0.2] and t["param_magnitude"] == {"w": [4, 5]}
    assert t["epoch"] == 2


def _state(result):
    return {k: v.clone() for k, v in result.decoder.state_dict().items()}, result.latent_codes.weight.detach().clone()


def test_interrupted_and_resumed_run_equals_uninterrupted(tmp_path):
    """Stop after epoch 7 (latest saved at 5 and on stop), resume: same weights, codes, LR and loss history."""
    exp_a, specs, data = _experiment(tmp_path / "a", epochs=12, dropout=(0, 1, 2, 3), samples=512, interval=4,
                                     log_frequency=5)
    ref = train_auto_decoder(exp_a, specs, data, "cpu", seed=3)
    logs_ref = experiment.load_logs(exp_a)

    exp_b, specs_b, data_b = _experiment(tmp_path / "b", epochs=12, dropout=(0, 1, 2, 3), samples=512, interval=4,
                                         log_frequency=5)
    part = train_auto_decoder(exp_b, specs_b, data_b, "cpu", seed=3, should_stop=lambda e: e == 7)
    assert part.stopped and part.epoch == 7
    assert experiment.load_logs(exp_b)["epoch"] == 7
    resumed = train_auto_decoder(exp_b, specs_b, data_b, "cpu", seed=999, resume="latest")
    assert resumed.epoch == 12 and not resumed.stopped
    (wa, ca), (wb, cb) = _state(ref), _state(resumed)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert torch.equal(ca, cb)
    logs_b = experiment.load_logs(exp_b)
    assert logs_b["loss"] == logs_ref["loss"] and logs_b["learning_rate"] == logs_ref["learning_rate"]
    assert logs_b["log_epochs"] == list(range(1, 13))
    assert logs_ref["learning_rate"][3] == [1e-3 / 2, 1e-3 / 2]  # Step interval 4: halved at epoch 4
    assert experiment.snapshot_epochs(exp_b) == [3]  # AdditionalSnapshots
    # resuming from the epoch-3 snapshot replays the same schedule, RNG included
    again = train_auto_decoder(exp_b, specs_b, data_b, "cpu", resume=3)
    for k, v in _state(again)[0].items():
        assert torch.equal(v, wa[k])


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    exp, specs, data = _experiment(tmp_path, epochs=10, samples=256, log_frequency=2)
    real = train_mod.auto_decoder_loss
    calls = []

    def poisoned(*args, **kw):
        calls.append(1)
        total, sdf_loss, reg = real(*args, **kw)
        return (total * float("nan") if len(calls) == 5 else total), sdf_loss, reg

    monkeypatch.setattr(train_mod, "auto_decoder_loss", poisoned)
    with pytest.raises(MeshSDFError) as err:
        train_auto_decoder(exp, specs, data, "cpu")
    msg = str(err.value)
    assert "epoch 5" in msg and "nan" in msg and "epoch 4" in msg and "--continue latest" in msg
    dec = train_mod.decoder_from_specs(specs)
    assert experiment.load_model_state(exp, dec, "latest") == 4
    assert all(torch.isfinite(p).all() for p in dec.parameters())


@pytest.mark.slow
def test_overfits_sphere_and_torus_with_right_genus(tmp_path):
    exp, specs, data = _experiment(tmp_path, epochs=200, dims=(64, 64, 64, 64), samples=2048, log_frequency=200,
                                   lr=(2e-3, 1e-2), interval=100, n=20000)
    torch.set_num_threads(2)
    result = train_auto_decoder(exp, specs, data, "cpu", seed=0)
    loss = experiment.load_logs(exp)["loss"]
    assert len(loss) == 200
    assert np.mean(loss[-10:]) < np.mean(loss[:3]) / 10
    paths = reconstruct_training_shapes(exp, result.decoder, result.latent_codes.weight, data.names, 64, "cpu")
    assert [p.name for p in paths] == ["sphere.ply", "torus.ply"]
    genera = []
    for p in paths:
        v, f = merge_vertices(*read_mesh(p))
        genera.append(genus(v, f))
    assert genera == [0, 1]


def _run_cli(args, **kw):
    env = dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="2")
    return subprocess.run([sys.executable, str(REPO / "train_deep_sdf.py"), *args], capture_output=True, text=True,
                          env=env, cwd=kw.pop("cwd", REPO), **kw)


def test_cli_names_missing_samples_and_the_command(tmp_path):
    exp = tmp_path / "exp"
    exp.mkdir()
    specs = json.loads((REPO / "experiments" / "bob_and_spot" / "specs.json").read_text())
    specs["DataSource"] = str(tmp_path / "nodata")
    (exp / "specs.json").write_text(json.dumps(specs))
    r = _run_cli(["-e", str(exp), "--epochs", "1"])
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1
    assert str(tmp_path / "nodata" / "bob_and_spot" / "samples" / "bob.npz") in lines[0]
    assert "python prepare_data.py --builtin bob_and_spot" in lines[0]
    r = _run_cli(["-e", str(exp), "--continue", "last"])
    assert r.returncode == 2 and "--continue" in r.stderr


@pytest.mark.slow
def test_cli_killed_and_resumed(tmp_path):
    """SIGKILL the script mid-run, --continue latest, and compare with an uninterrupted in-process run."""
    exp, specs, data = _experiment(tmp_path / "k", epochs=80, samples=256, log_frequency=1, dropout=(1,))
    proc = subprocess.Popen([sys.executable, str(REPO / "train_deep_sdf.py"), "-e", str(exp), "--device", "cpu",
                             "--seed", "4", "--no-reconstruct"], env=dict(os.environ, MESHSDF_QUIET="1"),
                            stderr=subprocess.PIPE, cwd=REPO)
    latest = exp / "ModelParameters" / "latest.pth"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and experiment.load_logs(exp).get("epoch", 0) >= 15:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = experiment.load_logs(exp)["epoch"]
    assert 15 <= killed_at < 80
    r = _run_cli(["-e", str(exp), "--continue", "latest", "--device", "cpu", "--resolution", "24"])
    assert r.returncode == 0, r.stderr
    logs = experiment.load_logs(exp)
    assert logs["log_epochs"] == list(range(1, 81))
    assert sorted(p.name for p in (exp / "Reconstructions").iterdir()) == ["sphere.ply", "torus.ply"]

    exp2, specs2, data2 = _experiment(tmp_path / "u", epochs=80, samples=256, log_frequency=1, dropout=(1,))
    torch.set_num_threads(2)
    ref = train_auto_decoder(exp2, specs2, data2, "cpu", seed=4)
    assert experiment.load_logs(exp2)["learning_rate"] == logs["learning_rate"]
    dec = train_mod.decoder_from_specs(specs)
    experiment.load_model_state(exp, dec)
    for k, v in ref.decoder.state_dict().items():
        assert torch.allclose(v, dec.state_dict()[k], atol=1e-6), k
    assert math.isclose(logs["loss"][-1], experiment.load_logs(exp2)["loss"][-1], rel_tol=1e-5)


def test_the_trainers_adam_makes_torchs_default_updates_bit_for_bit_with_the_same_state():
    """make_adam (foreach) against torch.optim.Adam's default (its per-parameter loop on a CPU): the same
    parameters after a few fused-loss steps, the same state entries, and either's state loads into the other."""
    from lib.models.decoder import Decoder
    from lib.training import make_adam, optimizer_step

    torch.manual_seed(0)
    dec = Decoder(2, dims=[16, 16, 16], dropout=[0, 1, 2], dropout_prob=0.2, norm_layers=[0, 1, 2], latent_in=[2],
                  weight_norm=True, positional_encoding=True, fourier_degree=2).train()
    codes = torch.nn.Embedding(3, 2)
    nets = [(dec, codes), (copy.deepcopy(dec), copy.deepcopy(codes))]
    opts = [make_adam([{"params": d.parameters(), "lr": 1e-3}, {"params": c.parameters(), "lr": 2e-3}])
            for d, c in nets[:1]]
    opts.append(torch.optim.Adam([{"params": nets[1][0].parameters(), "lr": 1e-3},
                                  {"params": nets[1][1].parameters(), "lr": 2e-3}]))
    assert opts[0].param_groups[0]["foreach"] and not opts[1].param_groups[0]["foreach"]
    xyz, sdf = torch.rand(2, 50, 3) * 2 - 1, torch.rand(2, 50) * 0.2 - 0.1
    scenes = torch.tensor([0, 2])
    for step in range(4):
        for (d, c), opt in zip(nets, opts):
            torch.manual_seed(step)  # the same dropout masks for both
            optimizer_step(opt, d.clamped_l1_loss(c(scenes), xyz, sdf, 0.1), 1)
    for a, b in zip(list(dec.parameters()) + list(codes.parameters()),
                    list(nets[1][0].parameters()) + list(nets[1][1].parameters())):
        assert torch.equal(a, b)
    states = [opt.state_dict() for opt in opts]
    assert states[0]["state"].keys() == states[1]["state"].keys()
    for k in states[0]["state"]:
        assert states[0]["state"][k].keys() == states[1]["state"][k].keys()
        for name in states[0]["state"][k]:
            assert torch.equal(states[0]["state"][k][name], states[1]["state"][k][name])
    opts[0].load_state_dict(states[1])  # a file of torch's default Adam: make_adam's update stays foreach
    opts[1].load_state_dict(states[0])
    assert opts[0].param_groups[1]["foreach"] is True and states[1]["param_groups"][1]["foreach"] is None
    assert opts[0].param_groups[1]["lr"] == 2e-3


def test_drawing_the_next_batch_beside_the_update_trains_the_same_as_in_order(tmp_path, monkeypatch):
    """Two batches per epoch: the second is drawn beside the first's update (lib.runtime.concurrently), the
    second's update runs on one intra-op thread; the same weights, codes and losses bit for bit as with
    everything in order on all threads."""
    from lib import runtime

    pairs = []
    real = runtime.concurrently

    def watched(tasks, device=None):
        pairs.append(len(tasks))
        return real(tasks, device)

    monkeypatch.setattr(runtime, "concurrently", watched)
    results = []
    for name, concurrent in (("beside", True), ("in_order", False)):  # in order: all threads too (one_thread off)
        exp, specs, data = _experiment(tmp_path / name, epochs=3, dropout=(0, 1, 2, 3), samples=256)
        specs["ScenesPerBatch"] = 1
        drawn = []
        sample = data.sample
        monkeypatch.setattr(data, "sample",
                            lambda scenes, *a, **k: drawn.append(int(scenes)) or sample(scenes, *a, **k))
        with runtime.thread_settings(concurrent=concurrent, one_thread=concurrent):
            results.append((train_auto_decoder(exp, specs, data, "cpu", seed=4), experiment.load_logs(exp)))
        assert [sorted(drawn[e:e + 2]) for e in (0, 2, 4)] == [[0, 1]] * 3  # each scene once an epoch
    assert pairs.count(2) == 2 * 3  # one draw beside an update per epoch, in each run
    (wa, ca), (wb, cb) = _state(results[0][0]), _state(results[1][0])
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    assert torch.equal(ca, cb)
    assert results[0][1]["loss"] == results[1][1]["loss"]
