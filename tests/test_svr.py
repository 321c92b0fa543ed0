"""Single-view reconstruction: RGBA dataset, specs, training, refinement, metrics, scripts."""
import csv
import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib import experiment, svr
from lib.experiment.specs import load_specs, load_svr_specs
from lib.svr import report
from lib.render import disn_camera, format_disn_line, DisnView
from lib.datasets import (Instance, RenderSet, RgbaSdfSamples, SdfSamples, rgba_to_tensor,
                      to_normalized_frame)
from lib.errors import MeshSDFError
from lib.io import read_png, save_png
from lib.datasets.sampling import read_normalization, split_by_sign, write_sdf_samples
from lib.isosurface import extract_dense
from lib.training import TrainSettings

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
        "CodeLength": 4, "NormType": "in", "Depth": 8, "EncoderWidths": [4, 4, 8, 8],
        "ImageSize": 16, "NumberOfViews": 2, "NumEpochs": 4, "SnapshotFrequency": 2, "LogFrequency": 1,
        "LearningRateSchedule": [{"Type": "Constant", "Value": 0.0005}, {"Type": "Constant", "Value": 0.005}],
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


def test_images_are_used_at_their_native_size(tmp_path):
    """As the original (no ImageSize key, no resize): the renders' own size for the encoder, the cameras
    and input.png; ImageSize resizes only when the specs set it."""
    _make_data(tmp_path, size=20)
    exp = _specs(tmp_path)
    specs = json.loads((exp / "specs.json").read_text())
    del specs["ImageSize"]
    (exp / "specs.json").write_text(json.dumps(specs))
    specs = load_svr_specs(exp)
    assert specs["ImageSize"] is None
    rs = svr.render_set_from_specs(specs, "TrainSplit")
    assert rs.image_size == 20 and rs.camera(1, 1).image_size == (20, 20)
    img = rs.images(torch.tensor([1]), torch.tensor([1]))
    png = read_png(tmp_path / "ds" / "renders" / "b" / "01.png")
    assert img.shape == (1, 4, 20, 20) and torch.equal((img[0] * 255).round().byte().permute(1, 2, 0),
                                                         torch.from_numpy(png))
    specs["ImageSize"] = 16
    assert svr.render_set_from_specs(specs, "TrainSplit").images(torch.tensor([1]), torch.tensor([1])).shape[-1] == 16
    # renders of several sizes without ImageSize: refused, naming the file and the fix
    save_png(tmp_path / "ds" / "renders" / "b" / "01.png", np.zeros((24, 24, 4), np.float32))
    specs["ImageSize"] = None
    with pytest.raises(MeshSDFError, match=r"b/01\.png.*24.*20.*ImageSize"):
        svr.render_set_from_specs(specs, "TrainSplit", cache=True)


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
    norm = read_normalization(tmp_path / "n.npz")  # DeepSDF's: normalised = (original + offset) * scale
    moved = to_normalized_frame(cam, norm)
    pts = torch.rand(50, 3, dtype=torch.float64) - 0.5
    uv0, z0 = cam.project(pts)
    uv1, z1 = moved.project((pts + offset) * scale)
    assert torch.allclose(uv0, uv1, atol=1e-9) and torch.allclose(z1, z0 * scale, atol=1e-9)


# ------------------------------------------------------------------ specs

def test_svr_specs_keys_and_defaults(tmp_path):
    _make_data(tmp_path)
    exp = _specs(tmp_path)
    specs = load_svr_specs(exp)
    # the original's evaluation protocol by default
    assert (specs["ReconstructionResolution"], specs["RefinementIterations"], specs["RefinementLearningRate"]) == \
        (256, 100, 5e-5)
    assert specs["ExtractionMode"] == "fast" and specs["SilhouetteFacesPerPixel"] == 25
    assert specs["SilhouetteSigma"] == 1e-4 and specs["ChamferSamples"] == 10000
    assert specs["NormalizationPath"] is None and specs["DecoderLearningRateFactor"] is None
    s = svr.RefineSettings.from_specs(specs)
    assert s.radius == pytest.approx(np.log(1 / 1e-4 - 1) * 1e-5)
    for bad, needle in [({"Depth": 10}, '"Depth" must be 6n \\+ 2'),
                        ({"NormType": "gn"}, '"NormType" must be one of'),
                        ({"NetworkEncoder": "resnet"}, '"NetworkEncoder"'),
                        ({"EncoderWidths": [4, 4]}, '"EncoderWidths"'),
                        ({"ExtractionMode": "marching"}, "ExtractionMode"),
                        ({"RendersPath": "renders"}, "RendersPath"),
                        ({"LearningRateSchedule": [{"Type": "Constant", "Value": 1.0}] * 3}, "decoder, encoder"),
                        ({"ImageSize": 4}, "ImageSize")]:
        _specs(tmp_path, **bad)
        with pytest.raises(MeshSDFError, match=needle):
            load_svr_specs(exp)


ORIGINAL_SVR_KEYS = {"Description", "DataSource", "TrainSplit", "TestSplit", "AugmentData", "NumberOfViews",
                     "NetworkEncoder", "NormType", "Depth", "NetworkDecoder", "NetworkSpecs", "CodeLength", "NumEpochs",
                     "SnapshotFrequency", "AdditionalSnapshots", "LearningRateSchedule", "SamplesPerScene",
                     "ScenesPerBatch", "DataLoaderThreads", "ClampingDistance", "CodeRegularization",
                     "CodeRegularizationLambda", "CodeBound"}


@pytest.mark.parametrize("family,epochs", [("cars", 1001), ("chairs", 2001)])
def test_committed_original_experiments_are_the_originals(family, epochs):
    raw = json.loads((REPO / "experiments" / f"{family}_svr" / "specs.json").read_text())
    assert set(raw) == ORIGINAL_SVR_KEYS
    assert raw["NetworkSpecs"] == {"dims": [512] * 5, "dropout": [0, 1, 2, 3], "dropout_prob": 0.0,
                                   "norm_layers": [0, 1, 2, 3], "xyz_in_all": False, "use_tanh": False,
                                   "latent_dropout": False, "weight_norm": True}
    assert (raw["NormType"], raw["Depth"], raw["CodeLength"], raw["NumEpochs"], raw["NumberOfViews"],
            raw["SamplesPerScene"], raw["ScenesPerBatch"], raw["CodeBound"]) == ("in", 20, 256, epochs, 16,
                                                                                  8192, 16, 1.0)
    assert raw["TrainSplit"] == f"splits/{family}_train.json" and raw["TestSplit"] == f"splits/{family}_test.json"
    specs = load_svr_specs(REPO / "experiments" / f"{family}_svr")
    from lib.datasets import read_split

    assert (len(read_split(REPO / raw["TrainSplit"])), len(read_split(REPO / raw["TestSplit"]))) == (1210, 113)
    assert sum(p.numel() for p in svr.encoder_from_specs(specs).parameters()) == 7_999_616


def test_learning_rates_of_both_groups_are_the_originals_effective_ones():
    specs = load_svr_specs(REPO / "experiments" / "cars_svr")
    schedules = svr.svr_schedules(specs)
    from lib.models.decoder import decoder_from_specs
    from lib.models.encoder import Encoder
    from lib.training import set_learning_rates

    net = svr.EncoderDecoder(Encoder(8, 8, "in", (4, 4, 4, 4)), decoder_from_specs({**specs, "CodeLength": 8}))
    opt = svr.make_optimizer(net, schedules)
    # group 0 is the decoder, group 1 the encoder (the original's order)
    assert [g["params"][0] is p for g, p in zip(opt.param_groups, (next(net.decoder.parameters()),
                                                                   next(net.encoder.parameters())))] == [True, True]
    assert set_learning_rates(opt, schedules, 1) == pytest.approx([5e-4, 1e-3])
    assert set_learning_rates(opt, schedules, 499) == pytest.approx([5e-4, 1e-3])
    assert set_learning_rates(opt, schedules, 501) == pytest.approx([2.5e-4, 5e-4])   # initial x 0.5^(epoch // 500)
    assert [g["lr"] for g in opt.param_groups] == pytest.approx([2.5e-4, 5e-4])
    assert set_learning_rates(opt, schedules, 1001) == pytest.approx([1.25e-4, 2.5e-4])
    # the opt-in factor: decoder = encoder x factor
    scaled = svr.svr_schedules({**specs, "DecoderLearningRateFactor": 0.1})
    assert [f(501) for f in scaled] == pytest.approx([5e-5, 5e-4])


def test_committed_toy_experiments_load():
    for family in ("cars", "chairs"):
        toy = load_svr_specs(REPO / "experiments" / f"toy_{family}_svr")
        assert toy["ImageSize"] <= 64 and toy["NormalizationPath"] is None and toy["ValidationSplit"]
        net = svr.network_from_specs(toy)
        assert net(torch.rand(2, 4, toy["ImageSize"], toy["ImageSize"])).shape == (2, toy["CodeLength"])
        # the DeepSDF experiment that initialises the toy decoder has the same network and shapes
        init = load_specs(REPO / toy["DecoderInit"])
        assert init["NetworkSpecs"] == toy["NetworkSpecs"] and init["CodeLength"] == toy["CodeLength"]
        assert init["TrainSplit"] == toy["TrainSplit"]
        from lib.datasets import read_split

        names = [set(i.name for i in read_split(REPO / toy[k])) for k in ("TrainSplit", "ValidationSplit", "TestSplit")]
        assert not (names[0] & names[1] or names[0] & names[2] or names[1] & names[2])


# ------------------------------------------------------------------ training

def test_train_step_fits_a_fixed_batch(tmp_path):
    _make_data(tmp_path)
    # fitting a decoder from scratch at a tenth of the rate takes long: a fast test uses equal rates
    specs = load_svr_specs(_specs(tmp_path, LearningRateSchedule=[{"Type": "Constant", "Value": 0.005}]))
    torch.manual_seed(0)
    net = svr.network_from_specs(specs)
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
        loss, _, codes = svr.train_step(net, opt, (images, xyz, sdf), 50, settings)
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


def test_resumed_training_equals_uninterrupted_and_writes_the_original_files(tmp_path):
    _make_data(tmp_path)
    exp = _specs(tmp_path)
    specs = load_svr_specs(exp)
    data = svr.training_set_from_specs(specs)
    test = svr.sdf_render_set(specs, "TestSplit")
    full = svr.train_svr(exp, specs, data, "cpu", seed=3, test_set=test).decoder
    full_state = {k: v.clone() for k, v in full.state_dict().items()}
    logs_full = experiment.load_logs(exp)
    assert sorted(p.name for p in (exp / "ModelParameters").iterdir()) == [
        "decoder_2.pth", "decoder_4.pth", "decoder_latest.pth", "encoder_2.pth", "encoder_4.pth", "encoder_latest.pth"]
    assert sorted(p.name for p in (exp / "OptimizerParameters").iterdir()) == ["2.pth", "4.pth", "latest.pth"]
    assert not (exp / "LatentCodes").exists()
    # the original's layout: {"epoch", "model_state_dict"} with DataParallel's "module." prefix
    enc = torch.load(exp / "ModelParameters" / "encoder_2.pth", weights_only=True)
    assert enc["epoch"] == 2 and all(k.startswith("module.") for k in enc["model_state_dict"])
    assert "module.conv1.weight" in enc["model_state_dict"] and "module.fc.bias" in enc["model_state_dict"]
    dec = torch.load(exp / "ModelParameters" / "decoder_latest.pth", weights_only=True)
    assert dec["epoch"] == 4 and "module.lin0.weight" in dec["model_state_dict"]
    # test loss every epoch (2 test batches of 1 scene), train loss every step (2 per epoch)
    assert logs_full["loss_sdf_test_epoch"] == [1, 1, 2, 2, 3, 3, 4, 4]
    assert len(logs_full["loss_sdf"]) == 8 and all(a < b for a, b in zip(logs_full["loss_sdf"], logs_full["loss"]))
    assert all(0 < v < 1 for v in logs_full["loss_sdf_test"])
    svr.train_svr(exp, specs, data, "cpu", seed=3, num_epochs=2, test_set=test)
    resumed = svr.train_svr(exp, specs, data, "cpu", seed=99, resume="latest", test_set=test).decoder
    for k, v in resumed.state_dict().items():
        assert torch.equal(v, full_state[k]), k
    logs = experiment.load_logs(exp)
    assert logs["loss"] == logs_full["loss"] and logs["log_epochs"] == [1, 2, 3, 4]
    assert logs["loss_sdf_test"] == logs_full["loss_sdf_test"]
    assert np.allclose(np.array(logs["learning_rate"]), [[0.0005, 0.005]] * 4)
    net = svr.load_network(exp, specs, 2)
    assert net.checkpoint_epoch == 2 and not net.training
    # the networks of snapshot 2 are what encoder_2 / decoder_2 hold
    assert torch.equal(net.encoder.conv1.weight, enc["model_state_dict"]["module.conv1.weight"])


def test_loaders_drop_the_last_batch_and_loss_sdf_is_the_sdf_term(tmp_path):
    _make_data(tmp_path, names=("a", "b", "c"), radii=(0.3, 0.6, 0.45))
    exp = _specs(tmp_path, ScenesPerBatch=2, NumEpochs=2, CodeRegularizationLambda=100.0)
    (tmp_path / "train.json").write_text(json.dumps({"ds": {"samples": ["a", "b", "c"]}}))
    specs = load_svr_specs(exp)
    svr.train_svr(exp, specs, svr.training_set_from_specs(specs), "cpu", seed=0,
                  test_set=svr.sdf_render_set(specs, "TestSplit"))
    logs = experiment.load_logs(exp)
    # 3 instances in batches of 2: one step and one test batch per epoch (drop_last)
    assert logs["loss_sdf_epoch"] == [1, 2] and logs["loss_sdf_test_epoch"] == [1, 2]
    # loss_sdf is the clamped L1 term alone; "loss" (DeepSDF's Logs) adds the code regulariser
    assert len(logs["loss"]) == 2 and all(0 < s < t for s, t in zip(logs["loss_sdf"], logs["loss"]))


def test_training_split_smaller_than_a_batch_is_refused(tmp_path):
    _make_data(tmp_path)
    exp = _specs(tmp_path, ScenesPerBatch=3)
    specs = load_svr_specs(exp)
    with pytest.raises(MeshSDFError, match="ScenesPerBatch"):
        svr.train_svr(exp, specs, svr.training_set_from_specs(specs), "cpu")


def test_gradient_clipping_clips_encoder_and_decoder_separately(tmp_path):
    _make_data(tmp_path)
    specs = load_svr_specs(_specs(tmp_path))
    torch.manual_seed(0)
    net = svr.network_from_specs(specs)
    data = RenderSet(tmp_path, [Instance("ds", "samples", n) for n in "ab"], 16, 2)
    images = data.images(torch.tensor([0, 1]), torch.tensor([0, 0]))
    rng = np.random.default_rng(1)
    rows = [_sphere_rows(r, 200, rng) for r in (0.3, 0.6)]
    xyz = torch.from_numpy(np.stack([r[:256, :3] for r in rows]))
    sdf = torch.from_numpy(np.stack([r[:256, 3] for r in rows]))
    settings = TrainSettings.from_specs(specs)

    def norms():
        return [float(torch.cat([p.grad.reshape(-1) for p in m.parameters() if p.grad is not None]).norm())
                for m in (net.encoder, net.decoder)]

    opt = torch.optim.SGD(net.parameters(), lr=0.0)       # lr 0: the gradients of one state, twice
    svr.train_step(net, opt, (images, xyz, sdf), 1, settings)
    raw = norms()
    clip = (raw[0] * raw[1]) ** 0.5                          # between the two norms
    settings = dataclasses.replace(settings, grad_clip_norm=clip)
    svr.train_step(net, opt, (images, xyz, sdf), 1, settings)
    small, large = min(raw), max(raw)
    got = norms()
    assert small < clip < large
    assert sorted(got) == pytest.approx([small, clip], rel=1e-4)    # the smaller one is left as it is


def test_test_loss_is_the_eval_mode_sdf_loss(tmp_path):
    _make_data(tmp_path)
    specs = load_svr_specs(_specs(tmp_path, NormType="bn", ScenesPerBatch=2))
    torch.manual_seed(0)
    net = svr.network_from_specs(specs).train()
    test = svr.sdf_render_set(specs, "TestSplit")
    settings = TrainSettings.from_specs(specs)
    got = svr.test_losses(net, test, settings, torch.Generator().manual_seed(4))
    assert net.training and len(got) == 1
    # the original's fixed view of item i (np.random.seed(i); randint), samples from the generator
    views = torch.tensor([svr.evaluation_view(i, 2) for i in range(2)])
    assert views.tolist() == [0, 1]
    images, xyz, sdf = test.batch(torch.arange(2), settings.samples_per_scene, torch.Generator().manual_seed(4),
                                  views=views)
    net.eval()
    with torch.no_grad():
        codes = net(images)
        pred = net.decoder(torch.cat([codes[:, None].expand(2, xyz.shape[1], 4), xyz], 2).reshape(-1, 7))
    expect = (pred.reshape(-1).clamp(-1, 1) - sdf.reshape(-1).clamp(-1, 1)).abs().mean()
    assert got[0] == pytest.approx(float(expect), rel=1e-6)


def test_original_and_earlier_checkpoint_forms_load(tmp_path):
    _make_data(tmp_path)
    specs = load_svr_specs(_specs(tmp_path))
    torch.manual_seed(1)
    net = svr.network_from_specs(specs)
    opt = svr.make_optimizer(net, svr.svr_schedules(specs))
    x = torch.rand(1, 4, 16, 16)
    # the original: separate files, "module." keys, an optimizer record without network states
    orig = tmp_path / "orig"
    (orig / "ModelParameters").mkdir(parents=True)
    (orig / "OptimizerParameters").mkdir()
    for part, m in (("encoder", net.encoder), ("decoder", net.decoder)):
        torch.save({"epoch": 7, "model_state_dict": {"module." + k: v for k, v in m.state_dict().items()}},
                   orig / "ModelParameters" / f"{part}_latest.pth")
    torch.save({"epoch": 7, "optimizer_state_dict": opt.state_dict()}, orig / "OptimizerParameters" / "latest.pth")
    # an earlier version of this project: one combined file
    old = tmp_path / "old"
    (old / "ModelParameters").mkdir(parents=True)
    torch.save({"epoch": 5, "model_state_dict": net.state_dict()}, old / "ModelParameters" / "5.pth")
    for exp, label, epoch in ((orig, "latest", 7), (old, 5, 5)):
        got = svr.load_network(exp, specs, label)
        assert got.checkpoint_epoch == epoch
        assert torch.equal(got(x), net.eval()(x))
    fresh = svr.network_from_specs(specs)
    fresh_opt = svr.make_optimizer(fresh, svr.svr_schedules(specs))
    epoch, extra = experiment.load_svr_checkpoint(orig, "latest", fresh.encoder, fresh.decoder, fresh_opt)
    assert (epoch, extra) == (7, {}) and torch.equal(fresh.eval()(x), net(x))
    # epochs that disagree, a missing file: one line naming the files
    torch.save({"epoch": 6, "model_state_dict": {}}, orig / "ModelParameters" / "decoder_latest.pth")
    with pytest.raises(MeshSDFError, match="epoch 7 but .*decoder_latest.pth epoch 6"):
        svr.load_network(orig, specs)
    with pytest.raises(MeshSDFError, match=r"checkpoint not found: .*encoder_3\.pth; available: latest"):
        svr.load_network(orig, specs, 3)


def test_decoder_init_from_another_experiment(tmp_path):
    from lib.models.decoder import decoder_from_specs

    _make_data(tmp_path)
    init = tmp_path / "deepsdf"
    specs = load_svr_specs(_specs(tmp_path))
    torch.manual_seed(5)
    dec = decoder_from_specs(specs)
    experiment.save_checkpoint(init, "latest", 7, dec)
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


# ------------------------------------------------------------------ evaluation protocol

def test_evaluation_view_is_numpys_seeded_randint():
    for n in (16, 24):
        expect = []
        for i in range(10):
            np.random.seed(i)
            expect.append(np.random.randint(0, n))
        np.random.seed(123)
        before = np.random.random()
        np.random.seed(123)
        assert [svr.evaluation_view(i, n) for i in range(10)] == expect
        assert np.random.random() == before      # the global stream is left alone
    assert len(set(svr.evaluation_view(i, 16) for i in range(10))) > 3


def test_ground_truth_chamfer_and_normal_consistency():
    from lib.metrics import mesh_normal_consistency

    cam = disn_camera(30.0, 20.0, 1.5, image_size=48)
    v, f = extract_dense(lambda p: p.norm(dim=1) - 0.5, 40)
    gt = svr.GroundTruth(v, f, cam, 3000)
    assert gt.points.shape == (3000, 3) and gt.valid.sum() > 250
    # brute force with the same seeded samples
    from lib.metrics import PointReference, sample_surface, seeded_generator

    vb, fb = extract_dense(lambda p: p.norm(dim=1) - 0.6, 40)
    pb = sample_surface(vb, fb, 3000, seeded_generator(1))
    d = torch.cdist(pb.double(), gt.points.double())
    assert gt.chamfer(vb, fb) == pytest.approx(float(d.min(1).values.square().mean() + d.min(0).values.square().mean()))
    assert gt.chamfer(vb, fb) == pytest.approx(0.02, rel=0.1) and gt.chamfer(v, f) < 1e-3   # sampling noise only
    assert gt.chamfer(vb, fb) == gt.chamfer(vb, fb)       # seeded: repeatable
    assert gt.normal_consistency(v, f) == pytest.approx(1.0)
    # the pixels next to the silhouette edge count (with normals from the background depth): at 48 px many
    assert 0.75 < gt.normal_consistency(vb, fb) < 0.95
    # the mesh-space extra is lib.metrics.mesh_normal_consistency against the ground truth
    assert gt.mesh_normal_consistency(vb, fb) == pytest.approx(mesh_normal_consistency(vb, fb, v, f, n=3000))
    assert np.isnan(gt.chamfer(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)))
    # the per-step pair, side by side where there are two threads (conftest): the two calls' values
    assert gt.scores(vb, fb) == (gt.chamfer(vb, fb), gt.normal_consistency(vb, fb))
    assert gt.chamfer(vb, fb, workers=1) == gt.chamfer(vb, fb)          # the KD-tree's threads: same value
    # the queries run in each tree's leaf order: the same value as in the samples' order, bit for bit
    pred = PointReference(pb)
    assert gt.chamfer(vb, fb) == float(gt.reference.squared_distances(pb).mean()
                                       + pred.squared_distances(gt.points).mean())
    assert all(np.isnan(gt.scores(torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))))


def test_normal_pictures_are_the_originals_camera_frame_depth_normals():
    """predicted.png / refined.png: RGB, 255 (0.5 - 0.5 n) truncated, n the depth-derived normal in
    the camera frame (x right, y down, z forward): a plane tilted by a about the camera's x axis has
    n = (0, -sin a, cos a)."""
    from lib.render import Camera

    cam = Camera(torch.eye(3), torch.zeros(3), (40.0, 40.0), (16.0, 16.0), 32)
    a = np.radians(30.0)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]])
    v = torch.stack([corners[:, 0], corners[:, 1] * np.cos(a), 3.0 + corners[:, 1] * np.sin(a)], 1).float()
    f = torch.tensor([[0, 1, 2], [0, 2, 3]])
    img = svr.reconstruct.normal_map(v, f, cam)
    assert img.shape == (32, 32, 3) and img.dtype == np.uint8
    expect = np.floor(255 * (0.5 - 0.5 * np.array([0.0, -np.sin(a), np.cos(a)])))
    assert (img[10:20, 10:20] == expect.astype(np.uint8)).all()
    assert expect.tolist() == [127, 191, 17]


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


def _capsule_target(size=48):
    from lib.render import silhouette

    dec = CapsuleDecoder()
    target = torch.log(torch.tensor([1.3, 0.6]))
    cam = disn_camera(30.0, 30.0, 1.5, image_size=size)
    gt_v, gt_f = extract_dense(lambda p: dec(torch.cat([target.expand(len(p), 2), p], 1))[:, 0], 48)
    return dec, target, cam, gt_v, gt_f, silhouette(gt_v, gt_f, cam, sigma=0)


def test_refinement_toward_a_known_silhouette_lowers_loss_and_chamfer():
    dec, target, cam, gt_v, gt_f, alpha = _capsule_target()
    gt = svr.GroundTruth(gt_v, gt_f, cam, 2000)
    # the original's form (blur radius a tenth of sigma's, 25 faces per pixel, fast extraction);
    # sigma: a blurrier soft silhouette is dilated (it aggregates the tails of many faces) and
    # biases the fit towards smaller shapes
    settings = svr.RefineSettings(resolution=32, iterations=30, lr=0.05, sigma=2e-4, chamfer_samples=2000)
    seen = []
    res = svr.reconstruct_view(dec, torch.zeros(2), alpha, cam, gt, settings, on_iteration=lambda i, e: seen.append(i))
    log = res.log
    assert seen == list(range(31)) and all(len(v) == 31 for v in log.values())
    assert log["silhouette_loss"][-1] < 0.3 * log["silhouette_loss"][0]
    assert log["chamfer"][-1] < 0.3 * log["chamfer"][0]
    assert log["iou"][-1] > 0.9 > log["iou"][0]
    assert log["normal_consistency"][-1] > log["normal_consistency"][0]
    assert log["latent"][0] == 0 and log["latent"][-1] > 0.1
    assert torch.equal(res.code, torch.zeros(2))
    assert torch.allclose(res.refined_code, target, atol=0.15)
    # the raw mesh is the capsule of the initial code, the refined one the mesh of the returned code
    assert float(res.raw[0][:, 1].max()) == pytest.approx(0.6, abs=0.03)
    vr, _ = extract_dense(lambda p: dec(torch.cat([res.refined_code.expand(len(p), 2), p], 1))[:, 0], 32)
    assert torch.allclose(vr.mean(0), res.refined[0].mean(0), atol=2e-3)
    assert len(res.extra["mesh_nc"]) == 2 and res.extra["mesh_nc"][1] > res.extra["mesh_nc"][0]


def test_refinement_metrics_carry_their_profiler_label_once_per_log_entry():
    """Each log entry's metrics (Chamfer, normal consistency, IoU) run under ``svr.metrics``, so a
    profile of the refinement separates them from the step."""
    from torch.profiler import profile

    dec, target, cam, gt_v, gt_f, alpha = _capsule_target(24)
    gt = svr.GroundTruth(gt_v, gt_f, cam, 300)
    settings = svr.RefineSettings(resolution=24, iterations=2, lr=0.05, sigma=2e-4, chamfer_samples=300)
    with profile() as prof:
        res = svr.reconstruct_view(dec, torch.tensor([0.2, -0.1]), alpha, cam, gt, settings)
    assert sum(e.count for e in prof.key_averages() if e.key == "svr.metrics") == len(res.log["chamfer"]) == 3
    assert np.isfinite(res.log["chamfer"]).all() and np.isfinite(res.log["normal_consistency"]).all()


def test_refinement_steps_and_logs_are_the_originals():
    """--iterations T makes T + 1 Adam steps (the original's 101 for 100) and logs T + 1 entries, one
    per step, each of the mesh the step started from; refined.* is the mesh after the last step;
    with --regularize the logged loss is the silhouette term alone."""
    dec, target, cam, gt_v, gt_f, alpha = _capsule_target(24)
    code = torch.tensor([0.2, -0.1])
    for iterations in (0, 2):
        settings = svr.RefineSettings(resolution=24, iterations=iterations, lr=0.05, sigma=2e-4, regularize=10.0)
        res = svr.reconstruct_view(dec, code, alpha, cam, None, settings)
        assert all(len(v) == iterations + 1 for v in res.log.values())
        assert res.log["latent"][0] == pytest.approx(float(code.square().mean()))
        # silhouette term only: the raw entry is |raw silhouette - alpha| averaged
        assert res.log["silhouette_loss"][0] == pytest.approx(float((res.silhouettes["raw"] - alpha).abs().mean()),
                                                              rel=1e-5)
        # iterations + 1 steps of Adam at lr 0.05 (each moves every coordinate by about lr)
        moved = (res.refined_code - code).abs()
        assert (moved > 0.5 * 0.05 * (iterations + 1)).all() and (moved < 1.01 * 0.05 * (iterations + 1)).all()
        vr, _ = extract_dense(lambda p: dec(torch.cat([res.refined_code.expand(len(p), 2), p], 1))[:, 0], 24)
        assert torch.allclose(vr.mean(0), res.refined[0].mean(0), atol=2e-3)
        assert float(res.refined[0][:, 1].max()) == pytest.approx(float(vr[:, 1].max()), abs=1e-3)


class _CountingGroundTruth(svr.GroundTruth):
    """The ground truth, keeping the meshes it was asked to score."""

    def scores(self, verts, faces):
        self.scored = getattr(self, "scored", []) + [(verts.clone(), faces.clone())]
        return super().scores(verts, faces)


def test_refinement_metrics_beside_the_rendering_are_each_steps_own():
    """The per-step Chamfer and normal consistency, computed beside the step's soft silhouette
    (RefinementLoss(beside=...), two threads), are those of the mesh the entry logs: once per
    entry (none for the final evaluation), the raw entry's equal to scoring the raw mesh
    afterwards, and every curve bit for bit the same with the work in order (one thread)."""
    from lib.runtime import thread_settings

    dec, target, cam, gt_v, gt_f, alpha = _capsule_target(32)
    settings = svr.RefineSettings(resolution=32, iterations=3, lr=0.05, sigma=2e-4, chamfer_samples=500)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        gt = _CountingGroundTruth(gt_v, gt_f, cam, 500)
        side = svr.reconstruct_view(dec, torch.zeros(2), alpha, cam, gt, settings)
        with thread_settings(concurrent=False):
            alone = svr.reconstruct_view(dec, torch.zeros(2), alpha, cam, svr.GroundTruth(gt_v, gt_f, cam, 500),
                                         settings)
    finally:
        torch.set_num_threads(threads)
    assert len(gt.scored) == len(side.log["chamfer"]) == 4
    assert torch.equal(gt.scored[0][1], side.raw[1]) and torch.equal(gt.scored[0][0], side.raw[0])
    assert (side.log["chamfer"][0], side.log["normal_consistency"][0]) == gt.scores(*side.raw)
    assert len({float(c) for c in side.log["chamfer"]}) == 4          # the meshes differ step to step
    for key in svr.LOG_KEYS:
        assert np.array_equal(side.log[key], alone.log[key]), key


def test_refinement_loss_beside_work_leaves_image_and_gradient_alone():
    """RefinementLoss(beside=f) returns the image and gives the gradient of the loss without it,
    bit for bit, and keeps f(mesh) with the faces it was computed for."""
    from lib.svr.reconstruct import RefinementLoss

    dec, target, cam, gt_v, gt_f, alpha = _capsule_target(32)
    gt = svr.GroundTruth(gt_v, gt_f, cam, 500)
    settings = svr.RefineSettings(sigma=2e-4)
    v = (gt_v * 0.9).requires_grad_(True)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = {}
        for beside in (None, gt.scores):
            fn = RefinementLoss(cam, alpha, settings, beside=beside)
            x = v.detach().clone().requires_grad_(True)
            loss, image = fn(x, gt_f)
            loss.backward()
            out[beside is None] = (loss.detach(), image.detach(), x.grad, fn.beside_result)
    finally:
        torch.set_num_threads(threads)
    (l1, i1, g1, r1), (l0, i0, g0, r0) = out[False], out[True]
    assert r0 is None and r1[0] is gt_f and r1[1] == gt.scores(v.detach(), gt_f)
    assert torch.equal(l1, l0) and torch.equal(i1, i0) and torch.equal(g1, g0) and g1.abs().sum() > 0


class _CountingCapsule(CapsuleDecoder):
    """The capsule, counting the rows it evaluates without gradient (the extraction's)."""

    rows = 0

    def forward(self, inputs):
        if not torch.is_grad_enabled():
            self.rows += inputs.shape[0]
        return super().forward(inputs)


def test_refinement_dense_start_gives_the_band_starts_logs():
    """--dense-start: the fast mode's first grid is the whole N^3 (the original's); the default
    band start evaluates far fewer points and logs the same curves."""
    _, target, cam, gt_v, gt_f, alpha = _capsule_target(32)
    gt = svr.GroundTruth(gt_v, gt_f, cam, 500)
    runs = {}
    for dense in (False, True):
        dec = _CountingCapsule()
        settings = svr.RefineSettings(resolution=96, iterations=2, lr=0.05, sigma=2e-4, chamfer_samples=500,
                                      dense_start=dense)
        torch.manual_seed(0)
        runs[dense] = (svr.reconstruct_view(dec, torch.zeros(2), alpha, cam, gt, settings), dec.rows)
    (band, band_rows), (dense, dense_rows) = runs[False], runs[True]
    assert dense_rows - band_rows > 96 ** 3 // 2, (dense_rows, band_rows)   # the later steps evaluate alike
    for key in svr.LOG_KEYS:
        assert np.allclose(band.log[key], dense.log[key], rtol=1e-6, atol=0, equal_nan=True), key
    assert torch.equal(band.refined[1], dense.refined[1])


def test_refinement_loss_regularizer_and_nan_gradients():
    dec, target, cam, gt_v, gt_f, alpha = _capsule_target(24)
    settings = svr.RefineSettings(sigma=1e-3, regularize=0.5)
    loss_fn = svr.reconstruct.RefinementLoss(cam, alpha, settings)
    z = torch.tensor([0.3, -0.2], requires_grad=True)
    loss_fn.latent = z
    v = gt_v.clone().requires_grad_(True)
    value, image = loss_fn(v, gt_f)
    plain = (image - alpha).abs().mean()
    assert float(value.detach()) == pytest.approx(float(plain.detach()) + 0.5 * float(z.detach().square().mean()))
    value.backward()
    assert torch.allclose(z.grad, 0.5 * z.detach())                # d(w mean z^2)/dz = w z (2 entries)
    # a NaN entry of dL/dx is set to 0, the others are kept
    grads = []
    for poison in (0.0, float("nan")):
        v2 = gt_v.clone().requires_grad_(True)
        loss2, _ = svr.reconstruct.RefinementLoss(cam, alpha, svr.RefineSettings(sigma=1e-3))(v2, gt_f)
        (loss2 + v2[0, 0] * poison).backward()
        grads.append(v2.grad)
    clean = grads[0]
    assert v2.grad[0, 0] == 0 and torch.allclose(v2.grad[1:], clean[1:], rtol=1e-5, atol=1e-12)
    assert torch.isfinite(v2.grad).all() and clean.abs().sum() > 0


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

def _write_logs(root: Path, name: str, chd, nc, view=None, mesh_nc=(0.9, 0.95), instance=None, settings=None):
    from lib.svr.reconstruct import LOG_FILES, META_FILE

    d = root / name
    d.mkdir(parents=True)
    t = len(chd)
    curves = {"chamfer": chd, "normal_consistency": nc, "silhouette_loss": np.linspace(0.1, 0.05, t),
              "latent": np.linspace(0.0, 0.1, t), "iou": np.linspace(0.5, 0.6, t)}
    for key, fname in LOG_FILES.items():
        np.save(d / fname, np.asarray(curves[key], dtype=np.float64))
    meta = {"instance": instance or name, "view": view, "mesh_nc": list(mesh_nc)}
    if settings is not None:
        meta["settings"] = settings
    (d / META_FILE).write_text(json.dumps(meta))


def _test_split_experiment(tmp_path, names):
    (tmp_path / "test.json").write_text(json.dumps({"ds": {"samples": list(names)}}))
    return _specs(tmp_path, TestSplit=str(tmp_path / "test.json"))


def test_metrics_svr_prints_the_originals_seven_lines_first(tmp_path, capsys):
    import metrics_svr

    exp = _test_split_experiment(tmp_path, ["x", "y", "z", "w"])
    root = exp / "Reconstructions" / "latest"
    view = [svr.evaluation_view(i, 2) for i in range(4)]
    # three instances, 5 logged iterations each (one ended early after 3 and is extended)
    _write_logs(root, "x", [2e-3, 1.8e-3, 1.5e-3, 1.2e-3, 1e-3], [0.8, 0.82, 0.85, 0.88, 0.9], view[0])
    _write_logs(root, "y", [1e-3, 1.5e-3, 2e-3], [0.9, 0.85, 0.8], view[1])
    _write_logs(root, "z", [4e-3, 3.5e-3, 3.2e-3, 3.1e-3, 3e-3], [0.5, 0.52, 0.55, 0.58, 0.6], view[2])
    # no surface: NaN metrics, left out of the averages and said so
    _write_logs(root, "w", [np.nan] * 5, [np.nan] * 5, view[3])
    # not the TestSplit's protocol views: another view of x, an instance outside the split
    _write_logs(root, f"x_view{1 - view[0]:02d}", [9e-3] * 5, [0.1] * 5, 1 - view[0], instance="x")
    _write_logs(root, "q", [9e-3] * 5, [0.1] * 5, 0)
    assert metrics_svr.main(["-e", str(exp)]) == 0
    out = capsys.readouterr().out.splitlines()
    raw, refined = (2 + 1 + 4) / 3, (1 + 2 + 3) / 3
    nc0, nc1 = 100 * (0.8 + 0.9 + 0.5) / 3, 100 * (0.9 + 0.8 + 0.6) / 3
    expect = ["Stats:", f"Raw CHD {raw:.2f}", f"Refined CHD {refined:.2f}",
              f"Improvement in CHD {100 * (raw - refined) / raw:.2f} %", f"Raw NC {nc0:.2f} %",
              f"Refined NC {nc1:.2f} %", f"Improvement in NC {100 * (nc1 - nc0) / nc0:.2f} %"]
    assert out[:7] == expect
    notes = "\n".join(out[7:])
    assert "1 of 4" in notes and " w" in notes                  # the NaN instance, named
    assert "q" in notes and f"x_view{1 - view[0]:02d}" in notes  # the folders left out, named
    table = "\n".join(out[7:])
    assert "extra: mesh NC raw %" in table and "66.7 % of 3 instances" in table
    parsed = list(csv.DictReader((root / "svr_metrics.csv").open()))
    assert [r["instance"] for r in parsed] == ["x", "y", "z", "mean"]
    assert float(parsed[1]["chamfer_improvement_pct"]) == pytest.approx(-100.0)
    assert float(parsed[0]["extra_mesh_nc_refined_pct"]) == pytest.approx(95.0)
    assert (root / "svr_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (root / "svr_metrics.txt").read_text().splitlines()[:7] == expect
    # -c N reads Reconstructions/N/
    with pytest.raises(MeshSDFError, match=r"no reconstructions in .*Reconstructions/3"):
        metrics_svr.main(["-e", str(exp), "-c", "3"])


def test_metrics_svr_refuses_folders_of_different_settings(tmp_path):
    import metrics_svr

    exp = _test_split_experiment(tmp_path, ["x", "y"])
    root = exp / "Reconstructions" / "latest"
    base = {"resolution": 256, "iterations": 100, "regularize": 0.0}
    _write_logs(root, "x", [2e-3, 1e-3], [0.8, 0.9], svr.evaluation_view(0, 2), settings=base)
    _write_logs(root, "y", [2e-3, 1e-3], [0.8, 0.9], svr.evaluation_view(1, 2), settings={**base, "regularize": 0.5})
    with pytest.raises(MeshSDFError, match=r"x.* y.*regularize|y.* x.*regularize"):
        metrics_svr.main(["-e", str(exp)])
    # nothing of the TestSplit at all: refused, not an empty average
    other = tmp_path / "other"
    other.mkdir()
    exp = _test_split_experiment(other, ["u"])
    _write_logs(exp / "Reconstructions" / "latest", "x", [2e-3, 1e-3], [0.8, 0.9], 0)
    with pytest.raises(MeshSDFError, match="TestSplit"):
        metrics_svr.main(["-e", str(exp)])


def test_metrics_rows_summary():
    results = [{"instance": n, "view": 0, "mesh_nc": [0.9, 0.9], "chamfer": np.array(c), "normal_consistency":
                np.array(nc), "silhouette_loss": np.zeros(2), "latent": np.zeros(2), "iou": np.zeros(2)}
               for n, c, nc in (("x", [2e-3, 1e-3], [0.8, 0.9]), ("y", [1e-3, 2e-3], [0.9, 0.8]))]
    rows, summary = report.metrics_rows(results)
    assert [r["chamfer_improvement_pct"] for r in rows] == pytest.approx([50.0, -100.0])
    assert rows[0]["nc_improvement_pct"] == pytest.approx(12.5)
    assert summary["fraction_improved"] == pytest.approx(0.5) and summary["count"] == 2
    assert summary["chamfer_raw_x1000"] == pytest.approx(1.5)


# ------------------------------------------------------------------ the scripts, end to end

def toy_experiment(tmp_path: Path, family: str = "chairs", epochs: int = 40, snapshot: int = 20,
                   log_frequency: int = 5) -> Path:
    """prepare_data.py's toy_<family> (4 instances: 1 train, 1 validation, 2 test; 2 views of 32 px)
    and a tiny SVR experiment on it, from the committed toy specs."""
    import prepare_data

    data = tmp_path / "data"
    ds = f"toy_{family}"
    assert prepare_data.main(["--builtin", ds, "--count", "4", "--views", "2", "--image-size", "32",
                              "--samples", "3000", "--resolution", "40", "--test-count", "2", "--val-count", "1",
                              "--out", str(data)]) == 0
    exp = tmp_path / "exp"
    exp.mkdir()
    specs = json.loads((REPO / "experiments" / f"{ds}_svr" / "specs.json").read_text())
    specs.update({"DataSource": str(data), "TrainSplit": str(data / ds / "split_train.json"),
                  "TestSplit": str(data / ds / "split_test.json"), "ImageSize": None, "NumberOfViews": 2,
                  "ValidationSplit": str(data / ds / "split_val.json"),
                  "NumEpochs": epochs, "SnapshotFrequency": snapshot, "LogFrequency": log_frequency,
                  "SamplesPerScene": 512, "ScenesPerBatch": 1, "CodeLength": 4, "EncoderWidths": [4, 8, 8, 8],
                  "LearningRateSchedule": [{"Type": "Constant", "Value": 0.01}], "ClampingDistance": 1.0,
                  "DecoderInit": None, "ReconstructionResolution": 20, "RefinementIterations": 2})
    specs["NetworkSpecs"]["dims"] = [32, 32, 32, 32]
    (exp / "specs.json").write_text(json.dumps(specs))
    return exp


@pytest.mark.slow
def test_tiny_pipeline_writes_every_output_and_resumes(tmp_path):
    import metrics_svr
    import reconstruct_svr
    import train_svr

    exp = toy_experiment(tmp_path)
    data = tmp_path / "data"
    assert json.loads((data / "toy_chairs" / "split_val.json").read_text()) == {
        "toy_chairs": {"samples": ["chair_001"]}}
    assert train_svr.main(["-e", str(exp), "--epochs", "20", "--device", "cpu"]) == 0
    assert train_svr.main(["-e", str(exp), "--continue", "latest", "--device", "cpu"]) == 0
    logs = experiment.load_logs(exp)
    # 2 test instances in batches of 1: two test losses per epoch
    assert logs["log_epochs"] == list(range(1, 41)) and logs["loss_sdf_test_epoch"] == [e for e in range(1, 41)
                                                                                         for _ in range(2)]
    assert sorted(p.name for p in (exp / "OptimizerParameters").iterdir()) == ["20.pth", "40.pth", "latest.pth"]
    assert reconstruct_svr.main(["-e", str(exp), "--device", "cpu", "--chamfer-samples", "300"]) == 0
    root = exp / "Reconstructions" / "latest"
    assert sorted(p.name for p in root.iterdir()) == ["chair_002", "chair_003"]
    names = sorted(p.name for p in (root / "chair_002").iterdir())
    assert names == ["input.png", "input_silhouette.png", "log_chd.npy", "log_iou.npy", "log_latent.npy",
                     "log_nc.npy", "log_silhouette.npy", "meta.json", "predicted.ply", "predicted.png",
                     "predicted_silhouette.png", "refined.ply", "refined.png", "refined_silhouette.png"]
    meta = json.loads((root / "chair_002" / "meta.json").read_text())
    assert meta["instance"] == "chair_002" and meta["iterations"] == 2, meta["messages"]
    assert meta["view"] == svr.evaluation_view(0, 2) and meta["item"] == 0
    chd = np.load(root / "chair_002" / "log_chd.npy")
    assert chd.shape == (3,) and np.isfinite(chd).all() and (chd > 0).all()
    # the input image is the view's render, its alpha the input silhouette
    view_png = read_png(data / "toy_chairs" / "renders" / "chair_002" / f"{meta['view']:02d}.png")
    assert np.array_equal(read_png(root / "chair_002" / "input.png"), view_png)     # native size, unchanged
    assert read_png(root / "chair_002" / "predicted.png").shape == view_png.shape[:2] + (3,)
    # resumable: finished instances are skipped and left as they are
    stamp = (root / "chair_002" / "log_chd.npy").stat().st_mtime_ns
    (root / "chair_003" / "meta.json").unlink()     # damage one: it still exists, so it is still skipped
    assert reconstruct_svr.main(["-e", str(exp), "--device", "cpu", "--chamfer-samples", "300"]) == 0
    assert (root / "chair_002" / "log_chd.npy").stat().st_mtime_ns == stamp
    assert not (root / "chair_003" / "meta.json").exists()
    # other views and the validation split are options
    assert reconstruct_svr.main(["-e", str(exp), "--device", "cpu", "--chamfer-samples", "300", "--split",
                                 "validation", "--views", "0", "1", "--out", str(tmp_path / "val")]) == 0
    default = svr.evaluation_view(0, 2)
    assert sorted(p.name for p in (tmp_path / "val").iterdir()) == sorted(
        ["chair_001", f"chair_001_view{1 - default:02d}"])
    assert metrics_svr.main(["-e", str(exp)]) == 0
    assert sorted(p.name for p in root.iterdir() if p.is_file()) == ["svr_curves.png", "svr_metrics.csv",
                                                                      "svr_metrics.txt"]
    assert len(list(csv.DictReader((root / "svr_metrics.csv").open()))) == 3
    # user mistakes: one line, exit 2
    for args, needle in [(["reconstruct_svr.py", "-e", str(exp), "--views", "5"], "view 5 does not exist"),
                         (["reconstruct_svr.py", "-e", str(exp), "--instances", "chair_000"], "not in the TestSplit"),
                         (["reconstruct_svr.py", "-e", str(exp), "-c", "7"],
                          "encoder_7.pth; available: latest, 20, 40"),
                         (["metrics_svr.py", "-e", str(tmp_path)], "no specs.json")]:
        p = subprocess.run([sys.executable, str(REPO / args[0])] + args[1:], capture_output=True, text=True,
                           cwd=REPO, env={"MESHSDF_QUIET": "1", "PATH": "/usr/bin:/bin"})
        assert p.returncode == 2 and needle in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
