"""Fault injection on the trainers: repeated SIGKILLs of train_deep_sdf.py at random moments
(resumed each time with the same command), SIGTERM and Ctrl-C making train_deep_sdf.py and
train_svr.py write a checkpoint before exiting, a SIGKILL between the renames of one
checkpoint save, and two trainings started on one experiment."""
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

from lib import experiment
from lib.datasets import SdfSamples, read_split
from lib.experiment.specs import load_specs, load_svr_specs
from lib.training import distributed
from lib.models.decoder import decoder_from_specs
from lib.training import TrainSettings, make_latent_codes, train_auto_decoder
from tests.test_distributed import one_thread, tiny_experiment, tiny_svr_experiment

REPO = Path(__file__).resolve().parents[1]
ENV = dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1")
TALKING = dict(ENV, MESHSDF_QUIET="0")  # messages on (stderr is a pipe: plain lines, no bars)


def start(exp: Path, *extra, script: str = "train_deep_sdf.py", env=None) -> subprocess.Popen:
    """The restart-loop command: always ``--continue latest`` (a fresh start the first time)."""
    cmd = [sys.executable, str(REPO / script), "-e", str(exp), "--continue", "latest", "--device", "cpu",
           "--seed", "4", *(["--no-reconstruct"] if script == "train_deep_sdf.py" else []), *map(str, extra)]
    return subprocess.Popen(cmd, env=env or ENV, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def logged_epoch(exp: Path) -> int:
    try:
        return int(experiment.load_logs(exp).get("epoch", 0))
    except Exception:  # noqa: BLE001 - read while being replaced: atomic, so only a missing file
        return 0


def load_resume_record(exp: Path, specs) -> int:
    """Load ``latest`` as a resume would (model, codes, Adam state); returns its epoch."""
    settings = TrainSettings.from_specs(specs)
    dec = decoder_from_specs(specs)
    codes = make_latent_codes(len(read_split(specs["TrainSplit"])), specs["CodeLength"], settings)
    opt = torch.optim.Adam([{"params": dec.parameters()}, {"params": codes.parameters()}])
    epoch, extra = experiment.load_checkpoint(exp, "latest", dec, opt, codes)
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
    logs = experiment.load_logs(exp)
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
    ref_logs = experiment.load_logs(ref_exp)
    # the loss curve continues the original one through every kill (same RNG, same batches)
    assert len(logs["loss"]) == len(ref_logs["loss"]) == epochs * 2
    assert np.allclose(logs["loss"], ref_logs["loss"], rtol=1e-5, atol=1e-7)
    dec = experiment.load_decoder(exp, specs)
    for k, v in ref.decoder.state_dict().items():
        assert torch.allclose(v, dec.state_dict()[k], atol=1e-5), k


def signal_after_first_snapshot(exp: Path, script: str = "train_deep_sdf.py", sig=signal.SIGTERM,
                                env=None, status: int | None = None) -> str:
    """Start the restart-loop command, send ``sig`` at a random moment after the epoch-1 snapshot
    is written and check that it exits ``status`` (default 128 + sig: 143 for SIGTERM, 130 for
    Ctrl-C) without a traceback; returns its stderr."""
    # the model file renamed last by each trainer: DeepSDF's 1.pth, the SVR pair's encoder_1.pth
    snapshot = exp / "ModelParameters" / ("encoder_1.pth" if script == "train_svr.py" else "1.pth")
    proc = start(exp, script=script, env=env)
    deadline = time.time() + 120
    while proc.poll() is None and not snapshot.exists() and time.time() < deadline:
        time.sleep(0.01)
    assert snapshot.exists(), f"{script} wrote no {snapshot.name} within 120 s"
    time.sleep(random.uniform(0.0, 0.2))
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == (128 + int(sig) if status is None else status), err
    assert sig != signal.SIGTERM or proc.returncode == distributed.EXIT_PREEMPTED == 143
    assert "Traceback" not in err
    return err


def sigterm_after_first_snapshot(exp: Path, script: str = "train_deep_sdf.py") -> None:
    signal_after_first_snapshot(exp, script)


@pytest.mark.slow
def test_sigterm_saves_latest_and_exits_143(tmp_path):
    """LogFrequency is huge: after the epoch-1 snapshot, the only checkpoint is the one SIGTERM asks for."""
    exp = tiny_experiment(tmp_path, epochs=100000, log_frequency=100000, samples=256, snapshots=(1,))
    specs = load_specs(exp)
    sigterm_after_first_snapshot(exp)
    epoch = load_resume_record(exp, specs)
    assert epoch >= 2 and experiment.load_logs(exp)["epoch"] == epoch
    assert not (exp / "Reconstructions").exists()


@pytest.mark.slow
def test_train_svr_sigterm_saves_latest_exits_143_and_resumes_like_an_uninterrupted_run(tmp_path):
    """train_svr.py as above, then the same command with ``--epochs`` a little further: it resumes
    from the SIGTERM checkpoint and ends where an uninterrupted run ends, weights and loss curve."""
    from lib import svr

    def new_experiment(root):
        return tiny_svr_experiment(root, scenes=3, batch=2, epochs=100000, log_frequency=100000, snapshots=(1,))

    exp = new_experiment(tmp_path / "t")
    specs = load_svr_specs(exp)
    sigterm_after_first_snapshot(exp, "train_svr.py")
    net = svr.network_from_specs(specs)
    opt = svr.make_optimizer(net, svr.svr_schedules(specs))
    epoch, extra = experiment.load_svr_checkpoint(exp, "latest", net.encoder, net.decoder, opt)
    assert epoch >= 2 and "rng_state" in extra and experiment.load_logs(exp)["epoch"] == epoch
    final = epoch + 2
    proc = start(exp, "--epochs", final, script="train_svr.py")
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    logs = experiment.load_logs(exp)
    assert logs["log_epochs"] == list(range(1, final + 1))

    ref_exp = new_experiment(tmp_path / "u")
    ref_specs = load_svr_specs(ref_exp)
    with one_thread():
        ref = svr.train_svr(ref_exp, ref_specs, svr.training_set_from_specs(ref_specs), "cpu", seed=4,
                            num_epochs=final)
    assert np.allclose(logs["loss"], experiment.load_logs(ref_exp)["loss"], rtol=1e-5, atol=1e-7)
    got = svr.load_network(exp, specs)
    assert got.checkpoint_epoch == final
    for k, v in ref.decoder.state_dict().items():
        assert torch.allclose(v, got.state_dict()[k], atol=1e-6), k


@pytest.mark.slow
def test_ctrl_c_saves_latest_says_where_it_resumes_and_exits_130(tmp_path):
    """SIGINT as SIGTERM: finish the epoch, save ``latest`` (the only checkpoint after the epoch-1
    snapshot, LogFrequency being huge), name the epoch --continue latest starts at, exit 130."""
    exp = tiny_experiment(tmp_path, epochs=100000, log_frequency=100000, samples=256, snapshots=(1,))
    err = signal_after_first_snapshot(exp, sig=signal.SIGINT, env=TALKING)
    epoch = load_resume_record(exp, load_specs(exp))
    assert epoch >= 2 and experiment.load_logs(exp)["epoch"] == epoch
    assert f"stopped by SIGINT after epoch {epoch}" in err and f"resumes at epoch {epoch + 1}" in err, err
    assert not (exp / ".meshsdf.lock").exists()


@pytest.mark.slow
def test_sighup_saves_latest_like_sigterm_and_exits_143(tmp_path):
    """A closed terminal (SIGHUP) stops training as SIGTERM does: the epoch finishes, ``latest``
    (the only checkpoint after the epoch-1 snapshot) holds it and the status is 143, so a
    restart loop resumes rather than losing the epochs since the last save."""
    exp = tiny_experiment(tmp_path, epochs=100000, log_frequency=100000, samples=256, snapshots=(1,))
    err = signal_after_first_snapshot(exp, sig=signal.SIGHUP, env=TALKING, status=distributed.EXIT_PREEMPTED)
    epoch = load_resume_record(exp, load_specs(exp))
    assert epoch >= 2 and experiment.load_logs(exp)["epoch"] == epoch
    assert f"stopped by SIGHUP after epoch {epoch}" in err, err


KILL_BETWEEN_RENAMES = """
import os, signal, sys
sys.path.insert(0, sys.argv[1])
save, real_replace = int(sys.argv[2]), os.replace
seen = 0

def replace(src, dst):
    global seen
    real_replace(src, dst)
    if str(dst).endswith(os.path.join("LatentCodes", "latest.pth")):
        seen += 1
        if seen == save:  # the record and the codes are renamed, the model is not: die here
            os.kill(os.getpid(), signal.SIGKILL)

os.replace = replace
import train_deep_sdf
from lib.cli import cli_main
cli_main(lambda: train_deep_sdf.main(sys.argv[3:]))
"""


@pytest.mark.slow
def test_kill_between_the_renames_of_one_save(tmp_path):
    """SIGKILL after the resume record and the codes of save 3 are renamed, before the model is.
    Inference refuses the mixed pair (model of epoch 2, codes of epoch 3) with one line; the
    restart command resumes from the complete record and ends where an uninterrupted run ends."""
    from lib.errors import MeshSDFError

    exp = tiny_experiment(tmp_path / "k", epochs=5, scenes=3, batch=2, dropout_prob=0.2, samples=256)
    specs = load_specs(exp)
    args = ["-e", str(exp), "--continue", "latest", "--device", "cpu", "--seed", "4", "--no-reconstruct"]
    r = subprocess.run([sys.executable, "-c", KILL_BETWEEN_RENAMES, str(REPO), "3", *args], env=ENV, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == -signal.SIGKILL, r.stderr
    assert load_resume_record(exp, specs) == 3
    with pytest.raises(MeshSDFError, match=r"ModelParameters/latest.pth is epoch 2, LatentCodes/latest.pth is "
                                           r"epoch 3: they come from different saves"):
        experiment.load_decoder_and_codes(exp, specs)
    assert (exp / ".meshsdf.lock").exists()  # the killed run's lock: stale, taken over below

    r = subprocess.run([sys.executable, str(REPO / "train_deep_sdf.py"), *args], env=TALKING, cwd=REPO,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "taking over the lock" in r.stderr and "which is no longer running" in r.stderr
    decoder, codes = experiment.load_decoder_and_codes(exp, specs)
    assert decoder.checkpoint_epoch == 5 and not (exp / ".meshsdf.lock").exists()

    ref_exp = tiny_experiment(tmp_path / "u", epochs=5, scenes=3, batch=2, dropout_prob=0.2, samples=256)
    with one_thread():
        ref = train_auto_decoder(ref_exp, load_specs(ref_exp), SdfSamples(specs["DataSource"],
                                 read_split(specs["TrainSplit"])), "cpu", seed=4)
    assert np.allclose(experiment.load_logs(exp)["loss"], experiment.load_logs(ref_exp)["loss"], rtol=1e-5, atol=1e-7)
    for k, v in ref.decoder.state_dict().items():
        assert torch.allclose(v, decoder.state_dict()[k], atol=1e-6), k
    assert torch.allclose(codes, ref.latent_codes.weight, atol=1e-6)


@pytest.mark.slow
def test_two_trainings_of_one_experiment(tmp_path):
    """A second training started while one runs exits 2 naming the first (PID and host) and leaves
    every file alone; once the first is SIGKILLed, the next start takes its stale lock over and
    deletes the temporaries of interrupted saves."""
    import hashlib
    import socket

    exp = tiny_experiment(tmp_path, epochs=100000, log_frequency=100000, samples=256, snapshots=(1,))
    first = start(exp)
    deadline = time.time() + 120
    while first.poll() is None and not (exp / "ModelParameters" / "1.pth").exists() and time.time() < deadline:
        time.sleep(0.01)
    assert first.poll() is None

    def files():
        return {p: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(exp.rglob("*.pth"))
                if p.is_file() and p.name == "1.pth"}

    before = files()
    second = subprocess.run([sys.executable, str(REPO / "train_deep_sdf.py"), "-e", str(exp), "--continue", "latest",
                             "--device", "cpu", "--no-reconstruct"], env=ENV, cwd=REPO, capture_output=True,
                            text=True, timeout=120)
    lines = second.stderr.strip().splitlines()
    assert second.returncode == 2 and len(lines) == 1, second.stderr
    assert f"is in use by train_deep_sdf.py (PID {first.pid} on {socket.gethostname()}" in lines[0]
    assert files() == before
    assert first.poll() is None  # the first run goes on

    first.send_signal(signal.SIGKILL)
    first.wait()
    stale = exp / "ModelParameters" / f".latest.pth.meshsdf-tmp-{first.pid}-a1b2c3d4.tmp.pth"  # lib.io's mark
    stale.write_bytes(b"half a checkpoint")
    third = subprocess.run([sys.executable, str(REPO / "train_deep_sdf.py"), "-e", str(exp), "--continue", "1",
                            "--epochs", "2", "--device", "cpu", "--no-reconstruct"], env=TALKING, cwd=REPO,
                           capture_output=True, text=True, timeout=120)
    assert third.returncode == 0, third.stderr
    assert f"taking over the lock of train_deep_sdf.py (PID {first.pid}" in third.stderr
    assert "removed 1 temporary file(s) left by an interrupted save" in third.stderr
    assert not stale.exists() and not (exp / ".meshsdf.lock").exists()
    assert load_resume_record(exp, load_specs(exp)) == 2
