"""Fault injection on the trainers: repeated SIGKILLs of train_deep_sdf.py at random moments
(resumed each time with the same command), and SIGTERM making train_deep_sdf.py and
train_svr.py write a checkpoint before exiting."""
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from lib import checkpoint, distributed
from lib.specs import load_specs, load_svr_specs
from lib.data import SdfSamples, read_split
from lib.models.decoder import decoder_from_specs
from lib.train import TrainSettings, make_latent_codes, train_auto_decoder
from tests.test_distributed import one_thread, tiny_experiment, tiny_svr_experiment

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1")


def start(exp: Path, *extra, script: str = "train_deep_sdf.py") -> subprocess.Popen:
    """The restart-loop command: always ``--continue latest`` (a fresh start the first time)."""
    cmd = [sys.executable, str(REPO / script), "-e", str(exp), "--continue", "latest", "--device", "cpu",
           "--seed", "4", *(["--no-reconstruct"] if script == "train_deep_sdf.py" else []), *map(str, extra)]
    return subprocess.Popen(cmd, env=ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


def logged_epoch(exp: Path) -> int:
    try:
        return int(checkpoint.load_logs(exp).get("epoch", 0))
    except Exception:  # noqa: BLE001 - read while being replaced: atomic, so only a missing file
        return 0


def load_resume_record(exp: Path, specs) -> int:
    """Load ``latest`` as a resume would (model, codes, Adam state); returns its epoch."""
    settings = TrainSettings.from_specs(specs)
    dec = decoder_from_specs(specs)
    codes = make_latent_codes(len(read_split(specs["TrainSplit"])), specs["CodeLength"], settings)
    opt = torch.optim.Adam([{"params": dec.parameters()}, {"params": codes.parameters()}])
    epoch, extra = checkpoint.load_checkpoint(exp, "latest", dec, opt, codes)
    assert "rng_state" in extra and all(torch.isfinite(p).all() for p in dec.parameters())
    return epoch


def kill_and_resume(exp: Path, specs, kills: int, rng: random.Random, timeout: float = 120.0) -> list[tuple[int, int]]:
    """SIGKILL the training ``kills`` times at random moments after it made progress, restarting it
    with the same command each time; then let it finish.  Returns (logged, checkpoint) epochs per kill."""
    history = []
    for _ in range(kills):
        before = logged_epoch(exp)
        target = before + rng.randint(1, 3)  # a few epochs of progress, whatever the machine's speed
        proc = start(exp)
        deadline = time.time() + timeout
        while proc.poll() is None and logged_epoch(exp) < target and time.time() < deadline:
            time.sleep(0.005)
        time.sleep(rng.uniform(0.0, 0.03))  # anywhere in an epoch or a checkpoint write
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert proc.returncode == -signal.SIGKILL, f"finished before the kill: {proc.stderr.read()}"
        ckpt = load_resume_record(exp, specs)
        logged = logged_epoch(exp)
        assert before < logged and ckpt <= logged  # progress, and logs never behind the checkpoint
        history.append((logged, ckpt))
    proc = start(exp)
    _, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return history


@pytest.mark.slow
def test_sigkill_five_times_then_finish_like_an_uninterrupted_run(tmp_path):
    epochs = 60
    exp = tiny_experiment(tmp_path / "k", epochs=epochs, scenes=3, batch=2, dropout_prob=0.2, samples=256,
                          dims=(32, 32, 32))
    specs = load_specs(exp)
    history = kill_and_resume(exp, specs, kills=5, rng=random.Random(0))
    assert len(history) == 5 and history[-1][0] < epochs
    logs = checkpoint.load_logs(exp)
    assert logs["log_epochs"] == list(range(1, epochs + 1)) and load_resume_record(exp, specs) == epochs

    ref_exp = tiny_experiment(tmp_path / "u", epochs=epochs, scenes=3, batch=2, dropout_prob=0.2, samples=256,
                              dims=(32, 32, 32))
    data = SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]))
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        ref = train_auto_decoder(ref_exp, load_specs(ref_exp), data, "cpu", seed=4)
    finally:
        torch.set_num_threads(threads)
    ref_logs = checkpoint.load_logs(ref_exp)
    # the loss curve continues the original one through every kill (same RNG, same batches)
    assert len(logs["loss"]) == len(ref_logs["loss"]) == epochs * 2
    assert np.allclose(logs["loss"], ref_logs["loss"], rtol=1e-5, atol=1e-7)
    dec = checkpoint.load_decoder(exp, specs)
    for k, v in ref.decoder.state_dict().items():
        assert torch.allclose(v, dec.state_dict()[k], atol=1e-5), k


def sigterm_after_first_snapshot(exp: Path, script: str = "train_deep_sdf.py") -> None:
    """Start the restart-loop command, SIGTERM it at a random moment after ``1.pth`` is written
    and check that it exits 143 without a traceback."""
    proc = start(exp, script=script)
    deadline = time.time() + 120
    while proc.poll() is None and not (exp / "ModelParameters" / "1.pth").exists() and time.time() < deadline:
        time.sleep(0.01)
    time.sleep(random.uniform(0.0, 0.2))
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == distributed.EXIT_PREEMPTED == 143, err
    assert "Traceback" not in err


@pytest.mark.slow
def test_sigterm_saves_latest_and_exits_143(tmp_path):
    """LogFrequency is huge: after the epoch-1 snapshot, the only checkpoint is the one SIGTERM asks for."""
    exp = tiny_experiment(tmp_path, epochs=100000, log_frequency=100000, samples=256, snapshots=(1,))
    specs = load_specs(exp)
    sigterm_after_first_snapshot(exp)
    epoch = load_resume_record(exp, specs)
    assert epoch >= 2 and checkpoint.load_logs(exp)["epoch"] == epoch
    assert not (exp / "Reconstructions").exists()


@pytest.mark.slow
def test_train_svr_sigterm_saves_latest_exits_143_and_resumes_like_an_uninterrupted_run(tmp_path):
    """train_svr.py as above, then the same command with ``--epochs`` a little further: it resumes
    from the SIGTERM checkpoint and ends where an uninterrupted run ends, weights and loss curve."""
    from lib import svr

    def experiment(root):
        return tiny_svr_experiment(root, scenes=3, batch=2, epochs=100000, log_frequency=100000, snapshots=(1,))

    exp = experiment(tmp_path / "t")
    specs = load_svr_specs(exp)
    sigterm_after_first_snapshot(exp, "train_svr.py")
    net = svr.network_from_specs(specs)
    opt = svr.make_optimizer(net, svr.svr_schedules(specs))
    epoch, extra = checkpoint.load_checkpoint(exp, "latest", net, opt)
    assert epoch >= 2 and "rng_state" in extra and checkpoint.load_logs(exp)["epoch"] == epoch
    final = epoch + 2
    proc = start(exp, "--epochs", final, script="train_svr.py")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    logs = checkpoint.load_logs(exp)
    assert logs["log_epochs"] == list(range(1, final + 1))

    ref_exp = experiment(tmp_path / "u")
    ref_specs = load_svr_specs(ref_exp)
    with one_thread():
        ref = svr.train_svr(ref_exp, ref_specs, svr.training_set_from_specs(ref_specs), "cpu", seed=4,
                            num_epochs=final)
    assert np.allclose(logs["loss"], checkpoint.load_logs(ref_exp)["loss"], rtol=1e-5, atol=1e-7)
    got = svr.load_network(exp, specs)
    assert got.checkpoint_epoch == final
    for k, v in ref.decoder.state_dict().items():
        assert torch.allclose(v, got.state_dict()[k], atol=1e-6), k
