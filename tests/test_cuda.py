"""Every script path on a CUDA GPU, with tiny settings, against the CPU result where it must agree.

All tests are marked ``cuda``: tests/conftest.py skips them (with the reason) where torch
sees no GPU.  Run them alone with ``python -m pytest -m cuda``.  What must agree with the
CPU and why: training draws its batches and dropout seeds from CPU generators on both
devices, so a GPU run is the CPU run up to float rounding; meshes of an analytic SDF are
the CPU's up to vertex rounding; the rasterizer and the fused loss compute the same
functions.
"""
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import check_gradients as check_gradients_command
import demo_optimizer
import metrics_svr
import reconstruct_svr
import train_deep_sdf
import train_svr
from lib import experiment
from lib.datasets import SdfSamples, read_split, scene_batches
from lib.layer.gradient_check import check_gradients
from lib.isosurface import MODES, extract, same_mesh
from lib.layer import mesh_from_field, mesh_from_sdf
from lib.metrics import genus, sample_surface
from lib.models.decoder import Decoder
from lib.render import look_at, normal_image, rasterize, silhouette
from lib.datasets.shapes import mesh_shape, torus
from lib.experiment.specs import load_specs
from test_demo import EXP as DEMO_EXP, SMALL as DEMO_SMALL
from test_distributed import tiny_experiment, tiny_svr_experiment, torchrun
from test_fused import CONFIGS, _both_losses
from test_svr import toy_experiment

pytestmark = pytest.mark.cuda
REPO = Path(__file__).resolve().parents[1]
CUDA = torch.device("cuda")


def _state(exp: Path) -> dict:
    return torch.load(exp / "ModelParameters" / "latest.pth", map_location="cpu",
                      weights_only=False)["model_state_dict"]


def _assert_close_states(a: dict, b: dict, rtol: float, atol: float) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], rtol=rtol, atol=atol), k


# ------------------------------------------------------------------ data on the way to the GPU

def test_batches_through_pinned_buffers_equal_the_cpu_batches(tmp_path):
    specs = load_specs(tiny_experiment(tmp_path))
    data = SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]))
    scenes = torch.tensor([0, 2, 1])
    g = torch.Generator().manual_seed(3)
    ref = [data.sample(scenes, 64, g) for _ in range(5)]
    g = torch.Generator().manual_seed(3)
    got = [data.sample(scenes, 64, g, device=CUDA) for _ in range(5)]  # 5 > 2 buffers: each refilled
    torch.cuda.synchronize()
    for (x, s), (xr, sr) in zip(got, ref):
        assert x.is_cuda and s.is_cuda and torch.equal(x.cpu(), xr) and torch.equal(s.cpu(), sr)
    assert all(b.is_pinned() for b in data._staging._bufs if b is not None)
    # samples held on the GPU with a generator there, and an epoch's permutation on it
    gdata = SdfSamples(specs["DataSource"], read_split(specs["TrainSplit"]), device=CUDA)
    gen = torch.Generator(device=CUDA).manual_seed(0)
    batches = scene_batches(len(gdata), 3, gen)
    assert all(b.is_cuda for b in batches) and sorted(torch.cat(batches).tolist()) == list(range(len(gdata)))
    x, s = gdata.sample(batches[0], 64, gen)
    assert x.is_cuda and x.shape == (len(batches[0]), 64, 3) and bool((s[:, :32] >= 0).all())


def test_surface_samples_do_not_depend_on_the_mesh_device():
    v, f = mesh_shape(torus(0.5, 0.2), 24)
    a = sample_surface(v, f, 500, torch.Generator().manual_seed(0))
    b = sample_surface(v.to(CUDA), f.to(CUDA), 500, torch.Generator().manual_seed(0))
    assert b.is_cuda and torch.allclose(a, b.cpu(), atol=1e-6)
    c = sample_surface(v.to(CUDA), f.to(CUDA), 500, torch.Generator(device=CUDA).manual_seed(0))
    assert c.is_cuda and c.shape == (500, 3)


# ------------------------------------------------------------------ fused loss

@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_fused_loss_on_gpu_equals_autograd_and_the_cpu(name):
    torch.manual_seed(0)
    dec = Decoder(3, **CONFIGS[name]).train()
    b, s = 3, 1000
    codes = torch.randn(b, 3)
    xyz = torch.rand(b, s, 3) * 2 - 1
    sdf = torch.rand(b, s) * 0.3 - 0.15
    cpu = _both_losses(dec, codes.clone().requires_grad_(True), xyz, sdf, 0.1)[0]
    dec.cuda()
    assert dec.fused_plan(CUDA).chunk >= b * s  # the whole batch in one chunk
    (fused, g_fused), (plain, g_plain) = _both_losses(dec, codes.cuda().requires_grad_(True), xyz.cuda(),
                                                      sdf.cuda(), 0.1)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-5)
    assert fused.item() == pytest.approx(cpu[0].item(), rel=1e-5)  # same seed: same dropout masks
    for got, want, ref in zip(g_fused, g_plain, cpu[1]):
        scale = float(want.abs().max())
        assert torch.allclose(got, want, rtol=1e-3, atol=1e-5 * scale)
        assert torch.allclose(got.cpu(), ref, rtol=1e-3, atol=1e-5 * scale)


# ------------------------------------------------------------------ training

def test_training_on_gpu_matches_cpu_and_resumes(tmp_path):
    exps = {k: tiny_experiment(tmp_path / k, epochs=2, dropout_prob=0.2) for k in ("cpu", "gpu", "resumed")}
    assert train_deep_sdf.main(["-e", str(exps["cpu"]), "--device", "cpu", "--no-reconstruct"]) == 0
    assert train_deep_sdf.main(["-e", str(exps["gpu"]), "--device", "cuda", "--resolution", "16"]) == 0
    assert train_deep_sdf.main(["-e", str(exps["resumed"]), "--device", "cuda", "--epochs", "1",
                                "--no-reconstruct"]) == 0
    assert train_deep_sdf.main(["-e", str(exps["resumed"]), "--device", "cuda", "--continue", "latest",
                                "--no-reconstruct"]) == 0
    logs = {k: experiment.load_logs(e) for k, e in exps.items()}
    assert logs["gpu"]["log_epochs"] == logs["resumed"]["log_epochs"] == [1, 2]
    np.testing.assert_allclose(logs["gpu"]["loss"], logs["cpu"]["loss"], rtol=1e-3)
    np.testing.assert_allclose(logs["resumed"]["loss"], logs["gpu"]["loss"], rtol=1e-5)
    _assert_close_states(_state(exps["gpu"]), _state(exps["cpu"]), rtol=1e-3, atol=1e-5)
    _assert_close_states(_state(exps["resumed"]), _state(exps["gpu"]), rtol=1e-4, atol=1e-6)
    assert len(list((exps["gpu"] / "Reconstructions").glob("*.ply"))) == 4


def test_gradient_clip_norm_on_gpu_matches_cpu(tmp_path):
    """GradientClipNorm small enough to clip every step: the GPU run is the CPU run (the CPU half,
    that the key reaches the step and clips, is tests/test_distributed.py's)."""
    exps = {k: tiny_experiment(tmp_path / k, epochs=2) for k in ("cpu", "gpu")}
    for exp in exps.values():
        specs = json.loads((exp / "specs.json").read_text())
        (exp / "specs.json").write_text(json.dumps({**specs, "GradientClipNorm": 1e-3}))
    for dev, exp in exps.items():
        assert train_deep_sdf.main(["-e", str(exp), "--device", dev, "--no-reconstruct"]) == 0
    logs = {k: experiment.load_logs(e) for k, e in exps.items()}
    assert logs["gpu"]["log_epochs"] == [1, 2]
    np.testing.assert_allclose(logs["gpu"]["loss"], logs["cpu"]["loss"], rtol=1e-3)
    _assert_close_states(_state(exps["gpu"]), _state(exps["cpu"]), rtol=1e-3, atol=1e-5)


def test_train_svr_under_torchrun_on_gpu_matches_one_process(tmp_path):
    """train_svr.py under torchrun on CUDA (nccl): 2 processes where 2 GPUs exist, else 1 (two
    processes may not share a GPU).  4 instances in global batches of 3: with 2 processes the
    second batch leaves rank 1 without instances.  The run ends with status 0 and its losses and
    weights are those of a 1-process GPU run."""
    nproc = min(2, torch.cuda.device_count())
    one = tiny_svr_experiment(tmp_path / "one", epochs=2)
    run = tiny_svr_experiment(tmp_path / "run", epochs=2)
    assert train_svr.main(["-e", str(one), "--device", "cuda"]) == 0
    p = torchrun(nproc, REPO / "train_svr.py", "-e", run, "--device", "cuda", "--continue", "latest")
    assert p.returncode == 0, p.stderr[-3000:]
    logs, ref = experiment.load_logs(run), experiment.load_logs(one)
    assert logs["log_epochs"] == ref["log_epochs"] == [1, 2]
    np.testing.assert_allclose(logs["loss"], ref["loss"], rtol=1e-3)
    state = lambda e: torch.load(e / "ModelParameters" / "decoder_latest.pth", map_location="cpu",  # noqa: E731
                                 weights_only=False)["model_state_dict"]
    _assert_close_states(state(run), state(one), rtol=1e-3, atol=1e-5)


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA GPUs")
def test_two_process_nccl_training_matches_one_process(tmp_path):
    one = tiny_experiment(tmp_path / "one", epochs=2)
    two = tiny_experiment(tmp_path / "two", epochs=2)
    assert train_deep_sdf.main(["-e", str(one), "--device", "cuda", "--no-reconstruct"]) == 0
    p = torchrun(2, REPO / "train_deep_sdf.py", "-e", two, "--no-reconstruct")
    assert p.returncode == 0, p.stderr[-3000:]
    assert experiment.load_logs(two)["log_epochs"] == [1, 2]
    _assert_close_states(_state(two), _state(one), rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------ rasterizer and extraction

def test_rasterizer_forward_and_backward_match_cpu():
    v, f = mesh_shape(torus(0.5, 0.2), 32)
    torch.manual_seed(0)
    weights = torch.rand(64, 64)
    out = {}
    for dev in ("cpu", "cuda"):
        cam = look_at(45.0, 30.0, 2.5, image_size=64, device=dev)
        verts = v.to(dev).requires_grad_(True)
        img = silhouette(verts, f.to(dev), cam, sigma=1e-4)
        (img * weights.to(dev)).sum().backward()
        frags = rasterize(verts.detach(), f.to(dev), cam)
        normals = normal_image(verts.detach(), f.to(dev), cam)
        out[dev] = [t.detach().cpu() for t in (img, verts.grad, frags.depth, frags.face_idx, normals)]
    (img, grad, depth, face, nrm), (gimg, ggrad, gdepth, gface, gnrm) = out["cpu"], out["cuda"]
    assert img.max() > 0.9 and grad.abs().max() > 0
    assert torch.allclose(gimg, img, atol=1e-5)
    assert torch.allclose(ggrad, grad, rtol=1e-3, atol=1e-5 * float(grad.abs().max()))
    same = gface == face  # a pixel centre on a shared edge may go to either face
    assert same.float().mean() > 0.99
    assert torch.allclose(gdepth[same], depth[same], atol=1e-5)
    assert torch.allclose(gnrm[same], nrm[same], atol=1e-4)


@pytest.mark.parametrize("mode", MODES)
def test_extraction_on_gpu_is_the_cpu_mesh(mode):
    shape = torus(0.5, 0.2)
    v, f, st = extract(shape, 48, mode)
    gv, gf, gst = extract(shape, 48, mode, device=CUDA)
    assert gv.is_cuda and gf.is_cuda
    assert same_mesh(gv, gf, v, f, atol=1e-5) == (True, "")
    # a second call from the previous state (what fast and sparse reuse): still the CPU's
    moved = torus(0.52, 0.2)
    v2, f2, _ = extract(moved, 48, mode, state=st)
    gv2, gf2, _ = extract(moved, 48, mode, state=gst, device=CUDA)
    assert same_mesh(gv2, gf2, v2, f2, atol=1e-5) == (True, "")
    assert genus(gv2.cpu(), gf2.cpu()) == 1


def test_mesh_gradients_on_gpu_match_cpu():
    specs = load_specs(DEMO_EXP)
    res = {}
    for dev in ("cpu", "cuda"):
        dec = experiment.load_decoder(DEMO_EXP, specs, device=dev)
        z = experiment.load_latent_codes(DEMO_EXP, device=dev)[1].clone().requires_grad_(True)
        mesh = mesh_from_sdf(dec, z, 32, "dense")
        (mesh.verts ** 2).sum().backward()
        res[dev] = (mesh.verts.detach().cpu(), mesh.faces.cpu(), z.grad.cpu())
    (v, f, g), (gv, gf, gg) = res["cpu"], res["cuda"]
    assert gf.shape == f.shape and torch.allclose(gv.sort(0).values, v.sort(0).values, atol=1e-4)
    assert torch.allclose(gg, g, rtol=1e-3, atol=1e-5)


def _closure_field(decoder, code):
    """The field as check_gradients.py writes it: a closure over a decoder and a code."""
    def field(points):
        return decoder(torch.cat((code.reshape(1, -1).expand(points.shape[0], -1), points), 1)).reshape(-1)
    return field


def test_check_gradients_on_gpu():
    """check_gradients.py on CUDA (its default where a GPU exists): its closure field used to be
    probed on the CPU, and torch.cat mixed devices.  The layer's directional derivative on the
    GPU is the CPU's."""
    assert check_gradients_command.main(["-e", str(DEMO_EXP), "--resolution", "48", "--device", "cuda"]) == 0
    specs = load_specs(DEMO_EXP)
    layer = {}
    for dev in ("cpu", "cuda"):
        dec = experiment.load_decoder(DEMO_EXP, specs, device=dev).eval()
        for p in dec.parameters():
            p.requires_grad_(False)
        code = experiment.load_latent_codes(DEMO_EXP, device=dev)[0].clone()
        field = _closure_field(dec, code)
        (check,) = check_gradients(field, {"latent code": [code]}, resolution=48)
        layer[dev] = check.layer
        code.requires_grad_(True)
        mesh = mesh_from_field(field, 32)        # no device given: the closure's
        assert mesh.verts.device.type == dev
        mesh.verts.sum().backward()
        assert code.grad is not None and code.grad.device.type == dev
    for rule in ("paper", "exact"):
        assert layer["cuda"][rule] == pytest.approx(layer["cpu"][rule], rel=1e-2)


# ------------------------------------------------------------------ the demo and SVR scripts

@pytest.mark.parametrize("extra", [["--renderer", "soft"], ["--gradient", "exact"]], ids=["soft", "exact"])
def test_demo_on_gpu_with_the_soft_renderer_and_the_exact_gradient(tmp_path, extra):
    out = tmp_path / "out"
    assert demo_optimizer.main(["-e", str(DEMO_EXP), "--out", str(out), *DEMO_SMALL, *extra, "--device", "cuda"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["settings"]["device"].startswith("cuda") and log["stopped"] == ""
    assert log["settings"]["renderer"] == ("soft" if "soft" in extra else "nr")
    assert log["settings"]["gradient"] == ("exact" if "exact" in extra else "paper")
    assert log["iterations"][0]["genus"] == 0 and log["final"]["loss"] < log["iterations"][0]["loss"] / 5
    assert log["final"]["iou"] > 0.9



@pytest.mark.parametrize("mode", MODES)
def test_demo_on_gpu_in_every_mode(tmp_path, mode):
    out = tmp_path / "out"
    assert demo_optimizer.main(["-e", str(DEMO_EXP), "--out", str(out), *DEMO_SMALL, "--mode", mode,
                                "--device", "cuda"]) == 0
    log = json.loads((out / "log.json").read_text())
    assert log["settings"]["device"].startswith("cuda") and log["settings"]["mode"] == mode
    assert log["stopped"] == "" and log["iterations"][0]["genus"] == 0
    assert log["final"]["loss"] < log["iterations"][0]["loss"] / 10
    assert log["final"]["iou"] > 0.9 and log["final"]["genus"] == 1
    for name in ("target.png", "initialization.png", "movie.gif", "final.ply"):
        assert (out / name).stat().st_size > 0


def test_svr_pipeline_on_gpu(tmp_path):
    exp = toy_experiment(tmp_path, "cars", epochs=4, snapshot=2, log_frequency=1)
    assert train_svr.main(["-e", str(exp), "--epochs", "2", "--device", "cuda"]) == 0
    assert train_svr.main(["-e", str(exp), "--continue", "latest", "--device", "cuda"]) == 0
    logs = experiment.load_logs(exp)
    assert logs["log_epochs"] == [1, 2, 3, 4] and logs["loss_sdf_test_epoch"] == [1, 2, 3, 4]
    # the protocol's view of each test instance, the ground truth's samples drawn on the GPU
    assert reconstruct_svr.main(["-e", str(exp), "--device", "cuda", "--mode", "sparse"]) == 0
    root = exp / "Reconstructions" / "latest"
    for name in ("car_002", "car_003"):
        meta = json.loads((root / name / "meta.json").read_text())
        assert meta["iterations"] == 2, meta["messages"]
        chd = np.load(root / name / "log_chd.npy")
        assert len(chd) == 3 and np.isfinite(chd).all() and (chd > 0).all()
        assert np.isfinite(np.load(root / name / "log_nc.npy")).all()
    assert metrics_svr.main(["-e", str(exp)]) == 0
    assert (root / "svr_metrics.txt").read_text().startswith("Stats:\nRaw CHD ")


def test_reconstruct_svr_on_gpu_in_its_default_fast_mode(tmp_path):
    """reconstruct_svr.py as a user runs it (ExtractionMode fast, the soft silhouette keeping the
    nearest faces per pixel) on CUDA, every test instance refined and saved."""
    exp = toy_experiment(tmp_path, "cars", epochs=4, snapshot=2, log_frequency=1)
    assert train_svr.main(["-e", str(exp), "--device", "cuda"]) == 0
    assert reconstruct_svr.main(["-e", str(exp), "--device", "cuda"]) == 0
    root = exp / "Reconstructions" / "latest"
    for name in ("car_002", "car_003"):
        meta = json.loads((root / name / "meta.json").read_text())
        assert meta["settings"]["mode"] == "fast" and meta["iterations"] == 2, meta["messages"]
        chd = np.load(root / name / "log_chd.npy")
        assert len(chd) == 3 and np.isfinite(chd).all() and (chd > 0).all()
