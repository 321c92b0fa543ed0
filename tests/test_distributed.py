"""lib.training.distributed and multi-process training: sharding maths, pre-emption flag, and real
2-process torchrun (gloo, CPU) runs of train_deep_sdf.py and train_svr.py compared step by step
with 1-process runs."""
import json
import os
import signal
import subprocess
import sys
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest
import torch

import lib.svr.train as svr_train_mod
import lib.training.loop as train_mod
from lib import experiment
from lib.datasets import SdfSamples, read_split
from lib.datasets.sampling import split_by_sign, write_sdf_samples
from lib.errors import MeshSDFError
from lib.experiment.specs import load_specs, load_svr_specs
from lib.models.decoder import decoder_from_specs
from lib.training import TrainSettings, auto_decoder_loss, distributed, resume_point, train_auto_decoder

REPO = Path(__file__).resolve().parents[1]


def tiny_experiment(root: Path, *, scenes=4, epochs=3, batch=3, code_bound=1.0, dropout_prob=0.0, log_frequency=1,
                    samples=64, dims=(16, 16, 16), snapshots=()) -> Path:
    """Spheres of radii 0.3 .. (one per scene), a small decoder; returns the experiment folder."""
    rng = np.random.default_rng(0)
    names = []
    for k in range(scenes):
        p = rng.uniform(-1, 1, (1500, 3))
        sdf = np.linalg.norm(p, axis=1) - (0.3 + 0.1 * k)
        write_sdf_samples(root / "data" / "toy" / "s" / f"ball{k}.npz", *split_by_sign(np.column_stack([p, sdf])))
        names.append(f"ball{k}")
    (root / "split.json").write_text(json.dumps({"toy": {"s": names}}))
    exp = root / "exp"
    exp.mkdir(parents=True)
    specs = {
        "DataSource": str(root / "data"), "TrainSplit": str(root / "split.json"), "NetworkArch": "deep_sdf_decoder",
        "NetworkSpecs": {"dims": list(dims), "dropout": list(range(len(dims))), "dropout_prob": dropout_prob,
                         "norm_layers": list(range(len(dims))), "latent_in": [1], "weight_norm": True},
        "CodeLength": 3, "NumEpochs": epochs, "SnapshotFrequency": 1000, "AdditionalSnapshots": list(snapshots),
        "LearningRateSchedule": [{"Type": "Constant", "Value": 1e-3}, {"Type": "Constant", "Value": 2e-3}],
        "SamplesPerScene": samples, "ScenesPerBatch": batch, "ClampingDistance": 0.1, "LogFrequency": log_frequency,
        "CodeBound": code_bound, "ApplyCodeBound": True, "CodeRegularizationLambda": 1e-2,
    }
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


def tiny_svr_experiment(root: Path, *, scenes=4, epochs=3, batch=3, views=2, size=16, norm="in", **kw) -> Path:
    """``tiny_experiment``'s balls with ``views`` RGBA renders each (a disk whose size and colour
    encode the radius) and SVR specs: an 8-layer encoder of normalisation ``norm``; returns the
    experiment folder.  ``kw`` goes to ``tiny_experiment``."""
    from lib.render import DisnView, format_disn_line
    from lib.io import save_png

    exp = tiny_experiment(root, scenes=scenes, epochs=epochs, batch=batch, **kw)
    yy, xx = np.mgrid[:size, :size] + 0.5
    for k in range(scenes):
        radius = 0.3 + 0.1 * k
        d = root / "data" / "toy" / "renders" / f"ball{k}"
        for v in range(views):
            img = np.zeros((size, size, 4), np.float32)
            img[np.hypot(xx - size / 2 - v, yy - size / 2) < radius * size * 0.6] = [radius, 0.5, 1 - radius, 1.0]
            save_png(d / f"{v:02d}.png", img)
        (d / "rendering_metadata.txt").write_text(
            "".join(format_disn_line(DisnView(30.0 * v, 25.0, 0.0, 0.7, 25.0)) + "\n" for v in range(views)))
    specs = json.loads((exp / "specs.json").read_text())
    specs.update(ImageSize=size, NumberOfViews=views, NormType=norm, Depth=8, EncoderWidths=[4, 4, 4, 4],
                 LearningRateSchedule=[{"Type": "Constant", "Value": 2e-3}], DecoderLearningRateFactor=0.5)
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


# --------------------------------------------------------------------------- single-process maths

@pytest.mark.parametrize("n,w", [(7, 2), (3, 3), (1, 2), (0, 2), (10, 4)])
def test_local_slices_partition_the_batch(n, w):
    parts = [distributed.local_slice(n, r, w) for r in range(w)]
    covered = [i for p in parts for i in range(n)[p]]
    assert covered == list(range(n))  # contiguous, in order, no overlap
    sizes = [len(range(n)[p]) for p in parts]
    assert max(sizes) - min(sizes) <= 1


def test_local_share_borrows_an_item_with_weight_zero_when_empty(monkeypatch):
    monkeypatch.setattr(distributed, "world_size", lambda: 3)
    shares = []
    for r in range(3):
        monkeypatch.setattr(distributed, "rank", lambda r=r: r)
        shares.append(distributed.local_share(2))
    assert shares == [(slice(0, 1), 1.5), (slice(1, 2), 1.5), (slice(0, 1), 0.0)]
    assert sum(w for _, w in shares) / 3 == 1.0  # the weights average to a full batch


def test_single_process_is_a_no_op(monkeypatch):
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(k, raising=False)
    ctx = distributed.init_distributed("cpu")
    assert (ctx.rank, ctx.world_size, ctx.backend, ctx.device.type) == (0, 1, None, "cpu") and ctx.is_main
    assert distributed.world_size() == 1 and distributed.is_main_process()
    assert distributed.local_slice(5) == slice(0, 5) and distributed.loss_weight(2, 5) == 1.0
    t = torch.tensor([1.0, 2.0])
    assert torch.equal(distributed.all_reduce_(t, mean=True), torch.tensor([1.0, 2.0]))
    assert distributed.any_rank(True) and not distributed.any_rank(False)
    distributed.barrier()
    distributed.cleanup()
    net = torch.nn.Linear(2, 2)
    assert distributed.wrap_ddp(net) is net and distributed.unwrap(net) is net


def test_torchrun_environment_errors(monkeypatch):
    monkeypatch.setenv("WORLD_SIZE", "two")
    with pytest.raises(MeshSDFError, match="WORLD_SIZE"):
        distributed.env_ranks()
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "2")
    with pytest.raises(MeshSDFError, match="inconsistent"):
        distributed.env_ranks()
    # every process would take the same GPU: refused with the fix
    with pytest.raises(MeshSDFError, match="cuda:LOCAL_RANK"):
        distributed._device_for_rank("cuda:1", 0)
    with pytest.raises(MeshSDFError, match="unknown device"):
        distributed._device_for_rank("gpu", 0)


def _grads(decoder, codes):
    return [p.grad.clone() for p in decoder.parameters()] + [codes.grad.clone()]


@pytest.mark.parametrize("world", [2, 3, 5])
def test_weighted_shard_gradients_average_to_the_global_batch_gradient(tmp_path, world):
    """What DDP computes (mean over ranks of each shard's weighted gradient) equals the 1-process gradient.

    A batch of 4 scenes over 3 or 5 ranks gives unequal and empty shards; unweighted shard
    means would not average to the global mean.
    """
    exp = tiny_experiment(tmp_path, scenes=4)
    specs = load_specs(exp)
    settings = TrainSettings.from_specs(specs)
    torch.manual_seed(0)
    decoder = decoder_from_specs(specs)
    b, s = 4, 32
    codes = torch.randn(b, 3, requires_grad=True)
    xyz, sdf = torch.rand(b, s, 3) * 2 - 1, torch.rand(b, s) * 0.2 - 0.1
    full, _, _ = auto_decoder_loss(decoder, codes, xyz, sdf, 50, settings)
    full.backward()
    want = _grads(decoder, codes)
    avg, naive, total = None, None, 0.0
    for r in range(world):
        part = distributed.local_slice(b, r, world)
        for weighted in (True, False):
            decoder.zero_grad()
            codes.grad = None
            w = distributed.loss_weight(len(range(b)[part]), b, world) if weighted else 1.0
            loss, _, _ = auto_decoder_loss(decoder, codes[part], xyz[part], sdf[part], 50, settings, w)
            loss.backward()
            g = [x / world for x in _grads(decoder, codes)]
            if weighted:
                avg = g if avg is None else [a + x for a, x in zip(avg, g)]
                total += float(loss.detach()) / world
            elif len(range(b)[part]):
                naive = g if naive is None else [a + x for a, x in zip(naive, g)]
    for a, x in zip(avg, want):
        assert torch.allclose(a, x, atol=1e-7, rtol=1e-5)
    assert total == pytest.approx(float(full.detach()), rel=1e-6)
    if b % world:
        assert not all(torch.allclose(a, x, atol=1e-7, rtol=1e-5) for a, x in zip(naive, want))


def test_preemption_guard_sets_the_flag_and_restores_handlers():
    before = signal.getsignal(signal.SIGTERM)
    with distributed.PreemptionGuard() as guard:
        assert not guard(1)
        os.kill(os.getpid(), signal.SIGTERM)  # delivered to the main thread before the next bytecode
        assert guard(2) and guard.received == signal.SIGTERM
    assert signal.getsignal(signal.SIGTERM) is before


def test_continue_latest_without_checkpoint_starts_fresh(tmp_path):
    exp = tiny_experiment(tmp_path, epochs=2)
    assert resume_point(exp, "latest") is None and resume_point(exp, 3) == 3 and resume_point(exp, None) is None
    specs = load_specs(exp)
    data = SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]))
    fresh = train_auto_decoder(exp, specs, data, "cpu", seed=1, resume="latest")
    assert fresh.epoch == 2 and resume_point(exp, "latest") == "latest"
    with pytest.raises(MeshSDFError, match="checkpoint not found"):
        train_auto_decoder(exp, specs, data, "cpu", resume=7)


# --------------------------------------------------------------------------- 2 processes

WRAPPER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import lib.training.loop as T
import train_deep_sdf
snaps, real = [], T.optimizer_step
first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
def recording(optimizer, *a, **k):
    if first_attempt and os.environ["RANK"] == "1" and len(snaps) == 2:
        os.kill(os.getpid(), signal.SIGKILL)  # in epoch 2: torchrun restarts both from latest = epoch 1
    value = real(optimizer, *a, **k)
    snaps.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])
    return value
T.optimizer_step = recording
rc = train_deep_sdf.main(sys.argv[2:])
torch.save(snaps, os.path.join(sys.argv[1], "rank%s.pt" % os.environ.get("RANK", "0")))
sys.exit(rc)
"""


def torchrun(nproc: int, script: Path, *args, restarts=0, timeout=240, **kw) -> subprocess.CompletedProcess:
    env = dict(os.environ, MESHSDF_QUIET="1", OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           f"--max-restarts={restarts}", "--monitor_interval=0.1", str(script), *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout, **kw)


def record_steps(monkeypatch) -> list:
    """Make lib.training.loop.optimizer_step (used by both trainers; lib.svr.train holds its own binding)
    append every parameter after each step to the returned list."""
    snaps = []
    real = train_mod.optimizer_step

    def recording(optimizer, *a, **k):
        value = real(optimizer, *a, **k)
        snaps.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])
        return value

    monkeypatch.setattr(train_mod, "optimizer_step", recording)
    monkeypatch.setattr(svr_train_mod, "optimizer_step", recording)
    return snaps


@contextmanager
def one_thread():
    """torch on 1 thread, as the torchrun workers (same reduction order, same rounding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.mark.slow
def test_two_process_run_matches_one_process_and_resumes_with_one(tmp_path, monkeypatch):
    """torchrun, 2 gloo processes, global batch 3 over 4 scenes (shards 2+1, then 1+0).

    Rank 1 is SIGKILLed in epoch 2 and torchrun (--max-restarts=1) restarts the group with
    the same ``--continue latest`` command.  Both ranks of the restarted group hold
    identical weights and codes after every step, equal (to float rounding) to a 1-process
    run; the 2-process checkpoint then resumes in 1 process up to epoch 5."""
    exp = tiny_experiment(tmp_path / "ddp", epochs=3)
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.format(repo=str(REPO)))
    r = torchrun(2, wrapper, tmp_path, "-e", exp, "--device", "cpu", "--seed", 5, "--no-reconstruct",
                 "--continue", "latest", restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    rank0, rank1 = torch.load(tmp_path / "rank0.pt"), torch.load(tmp_path / "rank1.pt")
    assert len(rank0) == len(rank1) == 2 * 2  # epochs 2 and 3 after the restart, 2 steps each (3 + 1 scenes)
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), f"ranks differ after step {step + 1}"

    # the same experiment in one process, continued from the 2-process checkpoint to epoch 5
    import train_deep_sdf

    snaps = record_steps(monkeypatch)
    with one_thread():
        assert train_deep_sdf.main(["-e", str(exp), "--device", "cpu", "--continue", "latest", "--epochs", "5",
                                    "--no-reconstruct"]) == 0
        resumed = list(snaps)
        snaps.clear()
        ref_exp = tiny_experiment(tmp_path / "ref", epochs=5)
        specs = load_specs(ref_exp)
        data = SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]))
        train_auto_decoder(ref_exp, specs, data, "cpu", seed=5)
    assert len(snaps) == 10 and len(resumed) == 4
    for step, (got, want) in enumerate(zip(rank0 + resumed, snaps[2:]), start=2):
        for g, w in zip(got, want):
            assert torch.allclose(g, w, rtol=1e-4, atol=2e-6), f"step {step + 1} differs from the 1-process run"
    logs, ref_logs = experiment.load_logs(exp), experiment.load_logs(ref_exp)
    assert logs["log_epochs"] == ref_logs["log_epochs"] == [1, 2, 3, 4, 5]
    assert np.allclose(logs["loss"], ref_logs["loss"], rtol=1e-5, atol=1e-7)


SVR_WRAPPER = """
import os, signal, sys
import torch
torch.set_num_threads(1)
sys.path.insert(0, {repo!r})
import lib.svr.train as S
import lib.training.loop as T
import train_svr
snaps, real = [], T.optimizer_step
attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
def recording(optimizer, *a, **k):
    if attempt == "0" and os.environ["RANK"] == "1" and len(snaps) == 2:
        os.kill(os.getpid(), signal.SIGTERM)  # in epoch 2, to rank 1 only: both ranks stop after it
    value = real(optimizer, *a, **k)
    snaps.append([p.detach().clone() for g in optimizer.param_groups for p in g["params"]])
    return value
T.optimizer_step = S.optimizer_step = recording
rc = train_svr.main(sys.argv[2:])
torch.save({{"rc": rc, "snaps": snaps}},
           os.path.join(sys.argv[1], "rank%s_attempt%s.pt" % (os.environ["RANK"], attempt)))
sys.exit(rc)
"""


@pytest.mark.slow
def test_two_process_svr_matches_one_process_stops_on_sigterm_and_resumes_with_one(tmp_path, monkeypatch):
    """train_svr.py under torchrun, 2 gloo processes, 6 instances in global batches of 3 (shards
    2+1; SVR drops a last incomplete batch, as the original), encoder with instance norm.

    Rank 1 alone gets SIGTERM in epoch 2: both ranks finish the epoch, rank 0 saves ``latest``,
    both exit 143 and torchrun (--max-restarts=1) reruns ``--continue latest``.  Encoder and
    decoder are identical on both ranks after every step and equal (to float rounding) to a
    1-process run of the same global batches; the 2-process checkpoint then resumes in one
    process to epoch 4, with Logs.pth (loss, mean code norm) as the 1-process run's."""
    import train_svr
    from lib import svr

    exp = tiny_svr_experiment(tmp_path / "ddp", scenes=6, epochs=3)
    wrapper = tmp_path / "svr_wrapper.py"
    wrapper.write_text(SVR_WRAPPER.format(repo=str(REPO)))
    r = torchrun(2, wrapper, tmp_path, "-e", exp, "--device", "cpu", "--seed", 5, "--continue", "latest", restarts=1)
    assert r.returncode == 0, r.stderr[-3000:]
    runs = {(rank, a): torch.load(tmp_path / f"rank{rank}_attempt{a}.pt") for rank in (0, 1) for a in (0, 1)}
    assert [runs[k]["rc"] for k in sorted(runs)] == [distributed.EXIT_PREEMPTED, 0] * 2
    rank0, rank1 = (runs[(rank, 0)]["snaps"] + runs[(rank, 1)]["snaps"] for rank in (0, 1))
    assert len(rank0) == len(rank1) == 3 * 2  # epochs 1-2, stop, then epoch 3; 2 steps each (3 + 3 instances)
    for step, (a, b) in enumerate(zip(rank0, rank1)):
        for pa, pb in zip(a, b):
            assert torch.equal(pa, pb), f"ranks differ after step {step + 1}"

    snaps = record_steps(monkeypatch)
    with one_thread():
        assert train_svr.main(["-e", str(exp), "--device", "cpu", "--continue", "latest", "--epochs", "4"]) == 0
        resumed = list(snaps)
        snaps.clear()
        ref_exp = tiny_svr_experiment(tmp_path / "ref", scenes=6, epochs=4)
        specs = load_svr_specs(ref_exp)
        svr.train_svr(ref_exp, specs, svr.training_set_from_specs(specs), "cpu", seed=5)
    assert len(snaps) == 8 and len(resumed) == 2
    names = [n for n, _ in svr.network_from_specs(specs).named_parameters()]
    assert any(n.startswith("encoder.") for n in names) and len(names) == len(snaps[0])
    for step, (got, want) in enumerate(zip(rank0 + resumed, snaps)):
        for name, g, w in zip(names, got, want):
            assert torch.allclose(g, w, rtol=1e-4, atol=2e-6), f"{name} after step {step + 1} differs from 1 process"
    logs, ref_logs = experiment.load_logs(exp), experiment.load_logs(ref_exp)
    assert logs["log_epochs"] == ref_logs["log_epochs"] == [1, 2, 3, 4]
    for key in ("loss", "latent_magnitude"):
        assert np.allclose(logs[key], ref_logs[key], rtol=1e-5, atol=1e-7), key


RELEASE_SCRIPT = """
import os
import sys
import torch
sys.path.insert(0, {repo!r})
from lib.training import distributed
ctx = distributed.init_distributed("cpu")
late = 0
for step in range(300):
    t = torch.ones(3)
    uses = t._use_count()
    if step % 2:
        distributed.all_reduce_(t)
    else:
        distributed.broadcast_(t)
    late += t._use_count() > uses   # gloo's worker still holds the tensor it must drop under the GIL
assert torch.equal(t, torch.full((3,), 2.0)) or torch.equal(t, torch.ones(3))
os.write(1, f"late {{late}}\\n".encode())   # one write: the two ranks' lines must not interleave
distributed.cleanup()
"""


@pytest.mark.slow
def test_gloo_collectives_return_after_the_worker_let_go_of_the_tensor(tmp_path):
    """The cause of the rank that aborted at exit ("terminate called without an active
    exception", SIGABRT; most often the rank without scenes, which has nothing to save after
    its last collective): gloo's worker thread drops its reference to a finished collective's
    tensor after the caller was woken, and a tensor Python created is dropped under the GIL,
    which CPython refuses during interpreter shutdown by ending the thread inside a C++
    destructor.  Every collective of lib.training.distributed returns only once the worker let go, so
    no worker is left waiting for the GIL when a rank exits (about half of plain calls return
    before it)."""
    script = tmp_path / "release.py"
    script.write_text(RELEASE_SCRIPT.format(repo=str(REPO)))
    r = torchrun(2, script, timeout=120)
    assert r.returncode == 0, r.stderr[-3000:]
    assert r.stdout.count("late 0") == 2, r.stdout


def test_gradient_clip_norm_clips_each_update(tmp_path):
    """GradientClipNorm: ``optimizer_step`` rescales the gradient of the given parameters to at most
    the norm before updating (an SGD step of lr 1 is the gradient itself), and the specs key
    reaches every step of training (the loss curve departs from the unclipped one after the
    first step).  tests/test_cuda.py runs the same training on a GPU."""
    torch.manual_seed(0)
    net = torch.nn.Linear(4, 3)
    x = torch.randn(8, 4)
    start = [p.detach().clone() for p in net.parameters()]
    for clip in (1e-3, 1e6):
        with torch.no_grad():
            for p, s in zip(net.parameters(), start):
                p.copy_(s)
        loss = (net(x) ** 2).sum()
        norm = float(torch.sqrt(sum((g ** 2).sum() for g in torch.autograd.grad(loss, list(net.parameters()),
                                                                                retain_graph=True))))
        train_mod.optimizer_step(torch.optim.SGD(net.parameters(), lr=1.0), loss, 1, [list(net.parameters())], clip)
        with torch.no_grad():
            step = float(torch.sqrt(sum(((p - s) ** 2).sum() for p, s in zip(net.parameters(), start))))
        assert step == pytest.approx(min(clip, norm), rel=1e-4) and norm > 1e-3

    losses = {}
    for clip in (None, 1e-6):
        exp = tiny_experiment(tmp_path / str(clip), epochs=3)
        specs = load_specs(exp)
        specs["GradientClipNorm"] = clip
        data = SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]))
        train_auto_decoder(exp, specs, data, "cpu", seed=2)
        losses[clip] = experiment.load_logs(exp)["loss"]
    assert losses[None][0] == losses[1e-6][0] and losses[None][1:] != losses[1e-6][1:]
