"""Single-view reconstruction: RGBA dataset, specs, training, refinement, metrics, scripts."""
import csv
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib import checkpoint, svr
from lib.specs import load_specs, load_svr_specs
from lib.camera import disn_camera, format_disn_line, DisnView
from lib.data import (Instance, RenderSet, RgbaSdfSamples, SdfSamples, read_normalization_file, rgba_to_tensor,
                      to_normalized_frame)
from lib.errors import MeshSDFError
from lib.io import read_png, save_png
from lib.sampling import split_by_sign, write_sdf_samples
from lib.isosurface import extract_dense
from lib.train import TrainSettings

REPO = Path(__file__).resolve().parents[1]


# ------------------------------------------------------------------ a tiny synthetic dataset on disk

def _sphere_rows(radius, n, rng):
    p = rng.uniform(-1, 1, (n, 3))
    near = rng.normal(size=(n, 3))
    near = near / np.linalg.norm(near, axis=1, keepdims=True) * (radius + rng.normal(scale=0.05, size=(n, 1)))
    p = np.concatenate([p, near])
    d = np.linalg.norm(p, axis=1) - radius
    return np.column_stack([p, d]).astype(np.float32)


def _make_data(root: Path, names=("a", "b"), views=2, size=16, radii=(0.3, 0.6)):
    """Samples of spheres and RGBA images of disks whose size encodes the radius."""
    rng = np.random.default_rng(0)
    for k, (name, r) in enumerate(zip(names, radii)):
        rows = _sphere_rows(r, 1500, rng)
        write_sdf_samples(root / "ds" / "samples" / f"{name}.npz", *split_by_sign(rows))
        d = root / "ds" / "renders" / name
        yy, xx = np.mgrid[:size, :size] + 0.5
        for v in range(views):
            # a disk whose size encodes the radius (instance norm would erase a plain brightness)
            img = np.zeros((size, size, 4), np.float32)
            disk = np.hypot(xx - size / 2 - v, yy - size / 2) < r * size * 0.7
            img[disk] = [r, 0.5, 1 - r, 1.0]
            save_png(d / f"{v:02d}.png", img)
        lines = [format_disn_line(DisnView(30.0 * v, 20.0, 0.0, 1.5, 49.1)) for v in range(views)]
        (d / "rendering_metadata.txt").write_text("\n".join(lines) + "\n")
    insts = [Instance("ds", "samples", n) for n in names]
    return insts


def _specs(tmp: Path, **over):
    specs = {
        "DataSource": str(tmp), "TrainSplit": str(tmp / "train.json"), "TestSplit": str(tmp / "train.json"),
        "NetworkArch": "deep_sdf_decoder",
        "NetworkSpecs": {"dims": [32, 32, 32], "latent_in": [2], "dropout_prob": 0.0},
        "CodeLength": 4, "Encoder": {"Depth": 10, "Normalization": "in", "Widths": [4, 4, 8, 8]},
        "ImageSize": 16, "NumberOfViews": 2, "NumEpochs": 4, "SnapshotFrequency": 2, "LogFrequency": 1,
        "LearningRateSchedule": [{"Type": "Constant", "Value": 0.005}],
        "SamplesPerScene": 256, "ScenesPerBatch": 1, "ClampingDistance": 1.0,
    }
    specs.update(over)
    (tmp / "train.json").write_text(json.dumps({"ds": {"samples": ["a", "b"]}}))
    exp = tmp / "exp"
    exp.mkdir(exist_ok=True)
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


# ------------------------------------------------------------------ RGBA dataset

def test_render_set_images_cameras_and_batches(tmp_path):
    insts = _make_data(tmp_path)
    rs = RenderSet(tmp_path, insts, 8, 2, cache=True)
    img = rs.images(torch.tensor([0, 1]), torch.tensor([1, 0]))
    assert img.shape == (2, 4, 8, 8) and img.dtype == torch.float32
    # 16 -> 8 px by area averaging of the stored PNG
    for k, (inst, view) in enumerate([("a", 1), ("b", 0)]):
        png = read_png(tmp_path / "ds" / "renders" / inst / f"0{view}.png").astype(np.float64) / 255
        expect = png.reshape(8, 2, 8, 2, 4).mean((1, 3)).transpose(2, 0, 1)
        assert np.allclose(img[k].numpy(), expect, atol=1 / 255)
    assert img[1, 0, 8 // 2, 8 // 2] == pytest.approx(0.6, abs=1 / 255)
    cam = rs.camera(0, 1)
    assert cam.image_size == (8, 8)
    expect = disn_camera(30.0, 20.0, 1.5, image_size=8)
    assert torch.allclose(cam.R, expect.R, atol=1e-5) and torch.allclose(cam.t, expect.t, atol=1e-5)
    with pytest.raises(MeshSDFError, match="view 2"):
        rs.camera(0, 2)
    sdf = SdfSamples(tmp_path, insts)
    data = RgbaSdfSamples(sdf, rs)
    g = torch.Generator().manual_seed(0)
    images, xyz, s = data.batch(torch.tensor([1, 0]), 64, g)
    assert images.shape == (2, 4, 8, 8) and xyz.shape == (2, 64, 3) and s.shape == (2, 64)
    # scene 1 is the sphere of radius 0.6 and its image says so
    assert torch.allclose(xyz[0].norm(dim=1) - 0.6, s[0], atol=1e-5)
    assert images[0, 0, 4, 4] == pytest.approx(0.6, abs=1 / 255)


def test_rgba_to_tensor_resizes_and_rejects_non_rgba(tmp_path):
    img = np.zeros((4, 4, 4), np.uint8)
    img[:2, :2] = 200
    out = rgba_to_tensor(img, tmp_path / "x.png", 2)
    assert out.tolist()[0] == [[200, 0], [0, 0]]
    assert rgba_to_tensor(img, tmp_path / "x.png", 8).shape == (4, 8, 8)
    with pytest.raises(MeshSDFError, match=r"x\.png: expected an RGBA image"):
        rgba_to_tensor(img[..., :3], tmp_path / "x.png", 2)
    with pytest.raises(MeshSDFError, match="square"):
        rgba_to_tensor(img[:3], tmp_path / "x.png", 2)


@pytest.mark.parametrize("damage,needle", [
    ("missing_png", r"render not found: .*a/01\.png"),
    ("corrupt_png", r"cannot read image .*a/00\.png"),
    ("rgb_png", r"a/00\.png: expected an RGBA image"),
    ("missing_meta", r"rendering metadata not found: .*a/rendering_metadata\.txt"),
    ("bad_meta", r"a/rendering_metadata\.txt, line 2"),
    ("short_meta", r"a/rendering_metadata\.txt describes 1 views but NumberOfViews is 2"),
    ("missing_dir", r"renders not found: .*renders/a"),
    ("missing_norm", r"normalisation file not found: .*a_normalization\.npz"),
    ("corrupt_norm", r"cannot read normalisation .*a_normalization\.npz"),
])
def test_bad_render_files_name_the_file(tmp_path, damage, needle):
    import shutil

    insts = _make_data(tmp_path)
    d = tmp_path / "ds" / "renders" / "a"
    meta = d / "rendering_metadata.txt"
    norm = None
    if damage == "missing_png":
        (d / "01.png").unlink()
    elif damage == "corrupt_png":
        (d / "00.png").write_bytes(b"\x89PNG not really")
    elif damage == "rgb_png":
        save_png(d / "00.png", np.zeros((16, 16, 3)))
    elif damage == "missing_meta":
        meta.unlink()
    elif damage == "bad_meta":
        meta.write_text(meta.read_text().splitlines()[0] + "\n1 2 three 4 5\n")
    elif damage == "short_meta":
        meta.write_text(meta.read_text().splitlines()[0] + "\n")
    elif damage == "missing_dir":
        shutil.rmtree(d)
    else:
        norm = "{dataset}/samples/{instance}_normalization.npz"
        np.savez(tmp_path / "ds" / "samples" / "b_normalization.npz", offset=np.zeros(3), scale=1.0)
        if damage == "corrupt_norm":
            (tmp_path / "ds" / "samples" / "a_normalization.npz").write_bytes(b"junk")
    with pytest.raises(MeshSDFError, match=needle):
        RenderSet(tmp_path, insts, 16, 2, normalization_path=norm, cache=True)


def test_normalized_frame_camera_sees_the_same_pixels(tmp_path):
    cam = disn_camera([10.0, 200.0], [25.0, 35.0], [0.8, 0.7], image_size=64, dtype=torch.float64)
    offset, scale = torch.tensor([0.1, -0.2, 0.05], dtype=torch.float64), 1.7
    np.savez(tmp_path / "n.npz", offset=offset.numpy(), scale=scale)
    norm = read_normalization_file(tmp_path / "n.npz")
    moved = to_normalized_frame(cam, norm)
    pts = torch.rand(50, 3, dtype=torch.float64) - 0.5
    uv0, z0 = cam.project(pts)
    uv1, z1 = moved.project((pts - offset) * scale)
    assert torch.allclose(uv0, uv1, atol=1e-9) and torch.allclose(z1, z0 * scale, atol=1e-9)


# ------------------------------------------------------------------ specs

def test_svr_specs_keys_and_defaults(tmp_path):
    _make_data(tmp_path)
    exp = _specs(tmp_path)
    specs = load_svr_specs(exp)
    assert specs["ReconstructionResolution"] == 256 and specs["RefinementLearningRate"] == 5e-5
    assert specs["RefinementIterations"] == 100 and specs["DecoderLearningRateFactor"] == 0.1
    assert specs["ExtractionMode"] == "sparse" and specs["SilhouetteFacesPerPixel"] == 25
    for bad, needle in [({"Encoder": {"Depth": 7}}, '"Encoder" .*Depth'),
                        ({"Encoder": {"Norm": "in"}}, "unknown field 'Norm'"),
                        ({"Encoder": {"Normalization": "gn"}}, "Normalization"),
                        ({"ExtractionMode": "marching"}, "ExtractionMode"),
                        ({"RendersPath": "renders"}, "RendersPath"),
                        ({"ImageSize": 4}, "ImageSize")]:
        _specs(tmp_path, **bad)
        with pytest.raises(MeshSDFError, match=needle):
            load_svr_specs(exp)


def test_committed_experiments_load():
    cars = load_svr_specs(REPO / "experiments" / "cars_svr")
    assert cars["Encoder"] == {"Depth": 20, "Normalization": "in", "Widths": [64, 128, 256, 256]}
    assert cars["NetworkSpecs"]["dims"] == [512] * 5 and cars["CodeLength"] == 256
    assert (cars["NumEpochs"], cars["SnapshotFrequency"], cars["SamplesPerScene"], cars["ScenesPerBatch"],
            cars["NumberOfViews"]) == (1001, 1000, 8192, 16, 16)
    assert cars["RefinementIterations"] == 100 and cars["RefinementLearningRate"] == 5e-5
    assert cars["ReconstructionResolution"] == 256 and cars["SilhouetteSigma"] == 1e-5
    toy = load_svr_specs(REPO / "experiments" / "toy_cars_svr")
    assert toy["ImageSize"] <= 64 and toy["DecoderLearningRateFactor"] == 0.1
    net = svr.network_from_specs(toy)
    assert net(torch.rand(2, 4, toy["ImageSize"], toy["ImageSize"])).shape == (2, toy["CodeLength"])
    # the DeepSDF experiment that initialises the toy decoder has the same network and shapes
    init = load_specs(REPO / toy["DecoderInit"])
    assert init["NetworkSpecs"] == toy["NetworkSpecs"] and init["CodeLength"] == toy["CodeLength"]
    assert init["TrainSplit"] == toy["TrainSplit"]


# ------------------------------------------------------------------ training

def test_train_step_fits_a_fixed_batch_and_decoder_lr_is_a_tenth(tmp_path):
    _make_data(tmp_path)
    specs = load_svr_specs(_specs(tmp_path))
    torch.manual_seed(0)
    net = svr.network_from_specs(specs)
    schedules = svr.svr_schedules(specs)
    opt = svr.make_optimizer(net, schedules)
    from lib.train import set_learning_rates

    assert set_learning_rates(opt, schedules, 1) == pytest.approx([0.005, 0.0005])
    assert [len(g["params"]) for g in opt.param_groups] == [len(list(m.parameters())) for m in (net.encoder, net.decoder)]
    # fitting a decoder from scratch at a tenth of the rate takes long: a fast test uses equal rates
    specs = load_svr_specs(_specs(tmp_path, DecoderLearningRateFactor=1.0))
    opt = svr.make_optimizer(net, svr.svr_schedules(specs))
    settings = TrainSettings.from_specs(specs)
    rng = np.random.default_rng(1)
    rows = [_sphere_rows(r, 200, rng) for r in (0.3, 0.6)]
    xyz = torch.from_numpy(np.stack([r[:256, :3] for r in rows]))
    sdf = torch.from_numpy(np.stack([r[:256, 3] for r in rows]))
    data = RenderSet(tmp_path, [Instance("ds", "samples", n) for n in "ab"], 16, 2)
    images = data.images(torch.tensor([0, 1]), torch.tensor([0, 0]))
    enc0 = [p.detach().clone() for p in net.encoder.parameters()]
    first = None
    for _ in range(100):
        loss, codes = svr.train_step(net, opt, (images, xyz, sdf), 50, settings)
        first = loss if first is None else first
    assert codes.shape == (2, 4) and not codes.requires_grad
    assert loss < 0.1 * first
    assert any(not torch.equal(a, b) for a, b in zip(enc0, net.encoder.parameters()))
    # the two images map to different codes and the decoder tells the radii apart
    def err(codes):
        with torch.no_grad():
            d = net.decoder(torch.cat([codes[:, None].expand(2, 256, 4), xyz], 2).reshape(-1, 7)).reshape(2, 256)
        return (d.clamp(-0.1, 0.1) - sdf.clamp(-0.1, 0.1)).abs().mean(1)

    c = net(images).detach()
    own, swapped = err(c), err(c.flip(0))
    assert (own < 0.01).all() and (swapped > 3 * own).all()


def test_resumed_training_equals_uninterrupted(tmp_path):
    _make_data(tmp_path)
    exp = _specs(tmp_path)
    specs = load_svr_specs(exp)
    data = svr.training_set_from_specs(specs)
    full = svr.train_svr(exp, specs, data, "cpu", seed=3).decoder
    full_state = {k: v.clone() for k, v in full.state_dict().items()}
    logs_full = checkpoint.load_logs(exp)
    assert sorted(p.name for p in (exp / "ModelParameters").iterdir()) == ["2.pth", "4.pth", "latest.pth"]
    assert not (exp / "LatentCodes").exists()
    svr.train_svr(exp, specs, data, "cpu", seed=3, num_epochs=2)
    resumed = svr.train_svr(exp, specs, data, "cpu", seed=99, resume="latest").decoder
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, full_state[k]), k
    logs = checkpoint.load_logs(exp)
    assert logs["loss"] == logs_full["loss"] and logs["log_epochs"] == [1, 2, 3, 4]
    assert np.allclose(np.array(logs["learning_rate"]), [[0.005, 0.0005]] * 4)
    net = svr.load_network(exp, specs, 2)
    assert net.checkpoint_epoch == 2 and not net.training


def test_decoder_init_from_another_experiment(tmp_path):
    from lib.models.decoder import decoder_from_specs

    _make_data(tmp_path)
    init = tmp_path / "deepsdf"
    specs = load_svr_specs(_specs(tmp_path))
    torch.manual_seed(5)
    dec = decoder_from_specs(specs)
    checkpoint.save_checkpoint(init, "latest", 7, dec)
    exp = _specs(tmp_path, DecoderInit=str(init), LearningRateSchedule=[{"Type": "Constant", "Value": 0.0}])
    specs = load_svr_specs(exp)
    # "latest" with nothing saved yet is a fresh start (torchrun --max-restarts): DecoderInit applies
    net = svr.train_svr(exp, specs, svr.training_set_from_specs(specs), "cpu", num_epochs=1, resume="latest").decoder
    for k, v in dec.state_dict().items():
        assert torch.equal(net.decoder.state_dict()[k], v), k
    exp = _specs(tmp_path, DecoderInit=str(tmp_path / "nowhere"))
    with pytest.raises(MeshSDFError, match="nowhere"):
        specs = load_svr_specs(exp)
        svr.train_svr(exp, specs, svr.training_set_from_specs(specs), "cpu", num_epochs=1)


# ------------------------------------------------------------------ refinement

class CapsuleDecoder(nn.Module):
    """Analytic "decoder", an exact SDF: code z (2,) -> vertical capsule of radius 0.3 exp(z0)
    around the segment y in [-h, h], h = 0.3 exp(z1).  Both numbers show in a silhouette, so
    the silhouette determines the code (no single-view depth ambiguity)."""

    def forward(self, inputs):
        r = 0.3 * torch.exp(inputs[:, 0])
        h = 0.3 * torch.exp(inputs[:, 1])
        p = inputs[:, 2:]
        y = p[:, 1] - p[:, 1].clamp(-h, h)
        return (torch.stack([p[:, 0], y, p[:, 2]], 1).norm(dim=1) - r)[:, None]


def test_refinement_toward_a_known_silhouette_lowers_loss_and_chamfer():
    from lib.render import silhouette

    dec = CapsuleDecoder()
    target = torch.log(torch.tensor([1.3, 0.6]))
    cam = disn_camera(30.0, 30.0, 1.5, image_size=48)
    gt_v, gt_f = extract_dense(lambda p: dec(torch.cat([target.expand(len(p), 2), p], 1))[:, 0], 48)
    alpha = silhouette(gt_v, gt_f, cam, sigma=0)
    gt = svr.GroundTruth(gt_v, gt_f, cam, 2000)
    # sigma: a blur of about 0.6 px; a blurrier soft silhouette is dilated (it aggregates the
    # tails of many faces) and would bias the fit towards smaller shapes
    settings = svr.RefineSettings(resolution=32, iterations=30, lr=0.05, sigma=1e-4, faces_per_pixel=25,
                                  chamfer_samples=2000)
    seen = []
    res = svr.reconstruct_view(dec, torch.zeros(2), alpha, cam, gt, settings, on_iteration=lambda i, e: seen.append(i))
    log = res.log
    assert seen == list(range(31)) and all(len(v) == 31 for v in log.values())
    assert log["silhouette_loss"][-1] < 0.3 * log["silhouette_loss"][0]
    assert log["chamfer"][-1] < 0.3 * log["chamfer"][0]
    assert log["iou"][-1] > 0.9 > log["iou"][0]
    assert log["normal_consistency"][-1] > log["normal_consistency"][0]
    assert log["latent_norm"][0] == 0 and log["latent_norm"][-1] == pytest.approx(float(res.refined_code.norm()))
    assert torch.equal(res.code, torch.zeros(2))
    assert torch.allclose(res.refined_code, target, atol=0.1)
    # the raw mesh is the capsule of the initial code, the refined one the mesh of the returned code
    assert float(res.raw[0][:, 1].max()) == pytest.approx(0.6, abs=0.03)
    vr, _ = extract_dense(lambda p: dec(torch.cat([res.refined_code.expand(len(p), 2), p], 1))[:, 0], 32)
    assert torch.allclose(vr.mean(0), res.refined[0].mean(0), atol=1e-3)


def test_refinement_with_no_surface_keeps_the_code():
    dec = CapsuleDecoder()
    cam = disn_camera(30.0, 30.0, 1.5, image_size=16)
    settings = svr.RefineSettings(resolution=16, iterations=3, lr=0.05, sigma=1e-3, chamfer_samples=200)
    code = torch.full((2,), -5.0)    # radius 0.002: no grid crossing
    res = svr.reconstruct_view(dec, code, torch.zeros(16, 16), cam, None, settings)
    assert res.raw[1].shape == (0, 3) and torch.equal(res.refined_code, code)
    assert res.messages and "has no surface" in res.messages[0]
    assert np.isnan(res.log["chamfer"]).all()


# ------------------------------------------------------------------ metrics

def _fake_results():
    def run(c0, c1, n0, n1):
        t = np.linspace(0, 1, 5)
        return {"chamfer": c0 + (c1 - c0) * t, "normal_consistency": n0 + (n1 - n0) * t,
                "silhouette_loss": 0.1 - 0.05 * t, "latent_norm": 1 + t, "iou": 0.5 + 0.1 * t}
    return [{"instance": "x", "view": 0, **run(2e-3, 1e-3, 0.8, 0.9)},
            {"instance": "y", "view": 3, **run(1e-3, 2e-3, 0.9, 0.8)},
            {"instance": "z", "view": 1, **run(4e-3, 3e-3, 0.5, 0.6)}]


def test_metrics_rows_table_and_csv(tmp_path):
    rows, summary = svr.metrics_rows(_fake_results())
    assert [r["chamfer_improvement_pct"] for r in rows] == pytest.approx([50.0, -100.0, 25.0])
    assert rows[0]["nc_improvement_pct"] == pytest.approx(12.5)
    assert summary["chamfer_raw_x1000"] == pytest.approx(7 / 3) and summary["chamfer_refined_x1000"] == pytest.approx(2.0)
    assert summary["chamfer_improvement_pct"] == pytest.approx(100 * (7 / 3 - 2) / (7 / 3))
    assert summary["fraction_improved"] == pytest.approx(2 / 3)
    assert summary["nc_raw_pct"] == pytest.approx(220 / 3)
    text = svr.metrics_table(rows, summary)
    assert "66.7 % of 3 views" in text and text.splitlines()[-2].startswith("mean")
    parsed = list(csv.DictReader(io.StringIO(svr.metrics_csv(rows, summary))))
    assert [r["instance"] for r in parsed] == ["x", "y", "z", "mean"]
    assert float(parsed[1]["chamfer_refined_x1000"]) == pytest.approx(2.0)
    svr.plot_curves(_fake_results(), tmp_path / "c.png")
    assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"


# ------------------------------------------------------------------ the scripts, end to end

def toy_cars_experiment(tmp_path: Path, epochs: int = 40, snapshot: int = 20, log_frequency: int = 5) -> Path:
    """prepare_data.py's toy_cars (3 instances, 2 views of 32 px) and a tiny SVR experiment on it."""
    import prepare_data

    data = tmp_path / "data"
    assert prepare_data.main(["--builtin", "toy_cars", "--count", "3", "--views", "2", "--image-size", "32",
                              "--samples", "3000", "--resolution", "40", "--out", str(data)]) == 0
    exp = tmp_path / "exp"
    exp.mkdir()
    specs = json.loads((REPO / "experiments" / "toy_cars_svr" / "specs.json").read_text())
    specs.update({"DataSource": str(data), "TrainSplit": str(data / "toy_cars" / "split_train.json"),
                  "TestSplit": str(data / "toy_cars" / "split_test.json"), "ImageSize": 32, "NumberOfViews": 2,
                  "NumEpochs": epochs, "SnapshotFrequency": snapshot, "LogFrequency": log_frequency,
                  "SamplesPerScene": 512,
                  "ScenesPerBatch": 2, "CodeLength": 4, "Encoder": {"Depth": 10, "Widths": [4, 8, 8, 8]},
                  "LearningRateSchedule": [{"Type": "Constant", "Value": 0.01}], "DecoderLearningRateFactor": 1.0,
                  "ClampingDistance": 1.0, "DecoderInit": None,
                  "ReconstructionResolution": 20, "ReconstructionViews": [0, 1], "RefinementIterations": 2,
                  "ChamferSamples": 300})
    specs["NetworkSpecs"]["dims"] = [32, 32, 32, 32]
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


@pytest.mark.slow
def test_tiny_pipeline_writes_every_output(tmp_path):
    import metrics_svr
    import reconstruct_svr
    import train_svr

    exp = toy_cars_experiment(tmp_path)
    assert train_svr.main(["-e", str(exp), "--epochs", "20", "--device", "cpu"]) == 0
    assert train_svr.main(["-e", str(exp), "--continue", "latest", "--device", "cpu"]) == 0
    assert checkpoint.load_logs(exp)["log_epochs"] == list(range(1, 41))
    for kind in ("ModelParameters", "OptimizerParameters"):
        assert sorted(p.name for p in (exp / kind).iterdir()) == ["20.pth", "40.pth", "latest.pth"]
    assert reconstruct_svr.main(["-e", str(exp), "--device", "cpu"]) == 0
    out = exp / "Reconstructions" / "car_002"
    for view in ("00", "01"):
        names = sorted(p.name for p in (out / view).iterdir())
        assert names == ["input_silhouette.png", "log.npz", "predicted.ply", "raw_silhouette.png", "refined.ply",
                         "refined_silhouette.png", "summary.json"]
        with np.load(out / view / "log.npz") as z:
            assert all(len(z[k]) == 3 for k in svr.LOG_KEYS)
        summary = json.loads((out / view / "summary.json").read_text())
        assert summary["instance"] == "car_002" and summary["iterations"] == 2, summary["messages"]
        assert summary["raw_chamfer"] > 0 and summary["refined_silhouette_loss"] < 1
    assert metrics_svr.main(["-e", str(exp)]) == 0
    res = exp / "Results"
    assert sorted(p.name for p in res.iterdir()) == ["svr_curves.png", "svr_metrics.csv", "svr_metrics.txt"]
    assert len(list(csv.DictReader((res / "svr_metrics.csv").open()))) == 3
    # user mistakes: one line, exit 2
    for args, needle in [(["reconstruct_svr.py", "-e", str(exp), "--views", "5"], "view 5 does not exist"),
                         (["reconstruct_svr.py", "-e", str(exp), "--instances", "car_000"], "not in the TestSplit"),
                         (["metrics_svr.py", "-e", str(tmp_path)], "no specs.json" if False else "no reconstructions")]:
        p = subprocess.run([sys.executable, str(REPO / args[0])] + args[1:], capture_output=True, text=True,
                           cwd=REPO, env={"MESHSDF_QUIET": "1", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
