"""Drop-in compatibility with the original MeshSDF: its specs files, checkpoints, splits and
file formats, rebuilt here from the documented facts (no file of the original is copied).

The "original" network is built in the test the way the original builds it: torch's own
``nn.utils.weight_norm`` around ``nn.Linear`` layers named lin0..lin8, inside
``nn.DataParallel`` (so state-dict keys carry ``module.``), and its output is compared with a
forward pass written here from the description of the original's decoder.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from lib import experiment
from lib.render import DisnView, disn_camera, read_disn_metadata, write_disn_metadata
from lib.errors import MeshSDFError
from lib.datasets.sampling import normalization, read_normalization, write_normalization
from lib.experiment.specs import load_specs, load_svr_specs

REPO = Path(__file__).resolve().parents[1]
# the original used torch's classic weight_norm, which torch now flags as deprecated
pytestmark = pytest.mark.filterwarnings("ignore:.*weight_norm.*:FutureWarning")

NET_BOB = {"dims": [128] * 8, "dropout": list(range(8)), "dropout_prob": 0.2, "norm_layers": list(range(8)),
           "latent_in": [4], "xyz_in_all": False, "use_tanh": False, "latent_dropout": False, "weight_norm": True,
           "positional_encoding": True, "fourier_degree": 5}
STEP = [{"Type": "Step", "Initial": 0.0005, "Interval": 500, "Factor": 0.5},
        {"Type": "Step", "Initial": 0.001, "Interval": 500, "Factor": 0.5}]

# The original's three specs files, key for key (descriptions reworded).
ORIGINAL_SPECS = {
    "bob_and_spot": {
        "Description": ["bob and spot"], "DataSource": "data", "TrainSplit": "splits/bob_and_spot.json",
        "NetworkSpecs": NET_BOB, "CodeLength": 2, "NumEpochs": 4000, "LearningRateSchedule": STEP,
        "SamplesPerScene": 32192, "ScenesPerBatch": 2, "DataLoaderThreads": 2, "ClampingDistance": 0.1,
        "CodeRegularization": True, "CodeRegularizationLambda": 1e-4,
    },
}
for _cls, _epochs in (("cars", 1001), ("chairs", 2001)):
    ORIGINAL_SPECS[f"{_cls}_svr"] = {
        "Description": [f"single-view reconstruction of {_cls}"], "DataSource": "data",
        "TrainSplit": f"splits/{_cls}_train.json", "TestSplit": f"splits/{_cls}_test.json",
        "AugmentData": False, "NumberOfViews": 16, "NetworkEncoder": "encoder", "NormType": "in", "Depth": 20,
        "NetworkDecoder": "decoder",
        "NetworkSpecs": {"dims": [512] * 5, "dropout": [0, 1, 2, 3], "dropout_prob": 0.0, "norm_layers": [0, 1, 2, 3],
                         "xyz_in_all": False, "use_tanh": False, "latent_dropout": False, "weight_norm": True},
        "CodeLength": 256, "NumEpochs": _epochs, "SnapshotFrequency": 1000, "AdditionalSnapshots": [],
        "LearningRateSchedule": STEP, "SamplesPerScene": 8192, "ScenesPerBatch": 16, "DataLoaderThreads": 4,
        "ClampingDistance": 0.1, "CodeRegularization": True, "CodeRegularizationLambda": 1e-4, "CodeBound": 1.0,
    }


def _write_specs(folder: Path, specs: dict) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "specs.json").write_text(json.dumps(specs, indent=2))
    return folder


@pytest.fixture
def loud(monkeypatch):
    """Messages on (the suite runs with MESHSDF_QUIET=1) so warnings can be read from stderr."""
    monkeypatch.setenv("MESHSDF_QUIET", "0")


# --------------------------------------------------------------------------- specs


def test_original_bob_and_spot_specs_load_with_the_originals_defaults(tmp_path, loud, capsys):
    s = load_specs(_write_specs(tmp_path / "bob_and_spot", ORIGINAL_SPECS["bob_and_spot"]))
    assert "WARNING" not in capsys.readouterr().err  # every key of the original is known
    assert s["NetworkSpecs"]["fourier_degree"] == 5 and s["NetworkArch"] == "deep_sdf_decoder"
    # absent keys: latest + Logs.pth every epoch, no periodic snapshots, N(0, 1/sqrt(L)) codes, no clipping
    assert s["LogFrequency"] == 1 and s["SnapshotFrequency"] is None and s["AdditionalSnapshots"] == []
    assert s["CodeInitStdDev"] == 1.0 and s["GradientClipNorm"] is None and s["CodeBound"] is None
    from lib.training import TrainSettings
    settings = TrainSettings.from_specs(s)
    assert [e for e in range(1, 4001) if settings.is_snapshot(e)] == []


def test_code_bound_is_read_and_ignored_as_the_original_does(tmp_path):
    """The original's trainers read CodeBound and never apply it; ApplyCodeBound (ours) opts into
    DeepSDF's max-norm embedding."""
    from lib.training import TrainSettings, make_latent_codes

    specs = dict(ORIGINAL_SPECS["bob_and_spot"], CodeBound=0.01)
    settings = TrainSettings.from_specs(load_specs(_write_specs(tmp_path / "a", specs)))
    assert settings.code_bound is None
    codes = make_latent_codes(3, 2, settings)
    before = codes.weight.detach().clone()
    codes(torch.arange(3))
    assert torch.equal(codes.weight.detach(), before)            # no renormalisation on lookup
    settings = TrainSettings.from_specs(load_specs(_write_specs(tmp_path / "b", dict(specs, ApplyCodeBound=True))))
    assert settings.code_bound == 0.01
    codes = make_latent_codes(3, 2, settings)
    codes(torch.arange(3))
    assert torch.allclose(codes.weight.detach().norm(dim=1), torch.full((3,), 0.01), rtol=1e-3)


@pytest.mark.parametrize("name", ["cars_svr", "chairs_svr"])
def test_original_svr_specs_load(tmp_path, name):
    s = load_svr_specs(_write_specs(tmp_path / name, ORIGINAL_SPECS[name]))
    assert s["CodeLength"] == 256 and s["NumEpochs"] == ORIGINAL_SPECS[name]["NumEpochs"]
    assert s["NetworkSpecs"]["dims"] == [512] * 5 and s["CodeBound"] == 1.0


def test_shipped_bob_and_spot_specs_are_the_originals_key_for_key():
    shipped = json.loads((REPO / "experiments" / "bob_and_spot" / "specs.json").read_text())
    original = ORIGINAL_SPECS["bob_and_spot"]
    assert set(shipped) == set(original)
    assert {k: v for k, v in shipped.items() if k != "Description"} == \
        {k: v for k, v in original.items() if k != "Description"}


def test_shipped_splits_are_where_the_specs_point():
    for name, count in (("cars_train", 1210), ("cars_test", 113), ("chairs_train", 1210), ("chairs_test", 113)):
        split = json.loads((REPO / "splits" / f"{name}.json").read_text())
        (dataset, classes), = split.items()
        assert dataset == name.split("_")[0] and len(classes["samples"]) == count
    assert json.loads((REPO / "splits" / "bob_and_spot.json").read_text()) == \
        {"bob_and_spot": {"samples": ["bob", "spot"]}}


@pytest.mark.parametrize("key, typo, where", [
    ("SamplesPerScene", "SamplesPerScen", ""),
    ("CodeRegularizationLambda", "CodeRegularisationLambda", ""),
    ("dropout_prob", "dropout_probability", "NetworkSpecs."),
])
def test_unknown_key_warns_naming_the_closest_known_key(tmp_path, loud, capsys, key, typo, where):
    specs = json.loads(json.dumps(ORIGINAL_SPECS["bob_and_spot"]))
    target = specs["NetworkSpecs"] if where else specs
    target[typo] = target[key]
    s = load_specs(_write_specs(tmp_path, specs))
    warnings = [line for line in capsys.readouterr().err.splitlines() if "WARNING" in line]
    assert len(warnings) == 1 and f'"{where}{typo}"' in warnings[0] and f'"{where}{key}"' in warnings[0]
    assert typo not in (s["NetworkSpecs"] if where else s)  # ignored, not passed on


def test_relative_split_inside_the_experiment_wins(tmp_path, monkeypatch):
    """A copied experiment with its own edited splits/bob_and_spot.json uses that file."""
    monkeypatch.chdir(tmp_path)
    exp = _write_specs(tmp_path / "experiments" / "mine", ORIGINAL_SPECS["bob_and_spot"])
    assert load_specs(exp)["TrainSplit"] == "splits/bob_and_spot.json"  # resolved later: cwd, then repo root
    (exp / "splits").mkdir()
    (exp / "splits" / "bob_and_spot.json").write_text(json.dumps({"bob_and_spot": {"samples": ["bob"]}}))
    assert Path(load_specs(exp)["TrainSplit"]) == exp / "splits" / "bob_and_spot.json"


# --------------------------------------------------------------------------- checkpoints


def original_network(latent=2, dims=(128,) * 8, latent_in=(4,), degree=5) -> nn.Module:
    """The original's layer layout with torch's own weight norm, inside DataParallel."""
    width = latent + 6 * degree
    full = [width, *dims, 1]
    net = nn.Module()
    for i in range(len(full) - 1):
        out = full[i + 1] - width if (i + 1) in latent_in else full[i + 1]
        lin = nn.Linear(full[i], out)
        setattr(net, f"lin{i}", nn.utils.weight_norm(lin) if i < len(dims) else lin)
    return nn.DataParallel(net)


def reference_sdf(state: dict, z: torch.Tensor, xyz: torch.Tensor, degree=5, latent_in=(4,)) -> torch.Tensor:
    """The original decoder's eval forward from its description, float64: input = [z, cos(2^l
    3.1415 xyz) for l < L, sin(2^l 3.1415 xyz) for l < L]; ReLU hidden layers, the input
    re-concatenated before latent_in layers, w = g v / |v| per row, tanh on the output."""
    state = {k[len("module."):]: v.double() for k, v in state.items()}
    xyz = xyz.double()
    feats = [torch.cos(2.0 ** k * 3.1415 * xyz) for k in range(degree)] + \
            [torch.sin(2.0 ** k * 3.1415 * xyz) for k in range(degree)]
    inp = torch.cat([z.double().expand(len(xyz), -1), *feats], dim=1)
    x, n = inp, sum(1 for k in state if k.endswith(".bias"))
    for i in range(n):
        if i in latent_in:
            x = torch.cat([x, inp], dim=1)
        if f"lin{i}.weight_g" in state:
            v = state[f"lin{i}.weight_v"]
            w = state[f"lin{i}.weight_g"] * v / v.norm(dim=1, keepdim=True)
        else:
            w = state[f"lin{i}.weight"]
        x = x @ w.t() + state[f"lin{i}.bias"]
        if i < n - 1:
            x = torch.relu(x)
    return torch.tanh(x).reshape(-1)


def _original_experiment(root: Path, epoch: int = 1) -> tuple[Path, nn.Module, torch.Tensor]:
    """An original-layout repository under ``root``: splits/, data/ (sphere-like samples) and
    experiments/bob_and_spot/ with ModelParameters, LatentCodes, OptimizerParameters and Logs.pth
    as the original writes them after ``epoch`` epochs."""
    torch.manual_seed(0)
    net = original_network()
    codes = torch.randn(2, 2) * 0.3
    # shift the last bias so that each code's zero level set crosses the box (the demo needs a surface)
    grid = torch.stack(torch.meshgrid(*[torch.linspace(-0.9, 0.9, 12)] * 3, indexing="ij"), -1).reshape(-1, 3)
    with torch.no_grad():
        pre = torch.cat([torch.atanh(reference_sdf(net.state_dict(), c, grid).clamp(-0.999, 0.999)) for c in codes])
        net.module.lin8.bias -= pre.median().float()
    # one real Adam step over (decoder, codes) in the original's parameter order
    emb = nn.Embedding(2, 2)
    emb.weight.data.copy_(codes)
    opt = torch.optim.Adam([{"params": net.parameters(), "lr": 5e-4}, {"params": emb.parameters(), "lr": 1e-3}])
    inp = torch.cat([emb.weight[:1].expand(64, 2), torch.rand(64, 3)], 1)
    feats = [f(2.0 ** k * 3.1415 * inp[:, 2:]) for f in (torch.cos, torch.sin) for k in range(5)]
    x0 = torch.cat([inp[:, :2], *feats[:5], *feats[5:]], 1)
    x = x0
    for i in range(9):
        x = torch.cat([x, x0], 1) if i == 4 else x
        x = getattr(net.module, f"lin{i}")(x)
        x = torch.relu(x) if i < 8 else torch.tanh(x)
    x.abs().mean().backward()
    opt.step()

    exp = root / "experiments" / "bob_and_spot"
    _write_specs(exp, ORIGINAL_SPECS["bob_and_spot"])
    (root / "splits").mkdir()
    (root / "splits" / "bob_and_spot.json").write_text(json.dumps({"bob_and_spot": {"samples": ["bob", "spot"]}}))
    rng = np.random.default_rng(0)
    for name, r in (("bob", 0.5), ("spot", 0.4)):
        pts = rng.uniform(-1, 1, (4000, 3))
        sdf = np.linalg.norm(pts, axis=1) - r
        rows = np.column_stack([pts, sdf]).astype(np.float32)
        (root / "data" / "bob_and_spot" / "samples").mkdir(parents=True, exist_ok=True)
        np.savez(root / "data" / "bob_and_spot" / "samples" / f"{name}.npz", pos=rows[sdf > 0], neg=rows[sdf <= 0])
    for kind, obj in (("ModelParameters", {"epoch": epoch, "model_state_dict": net.state_dict()}),
                      ("LatentCodes", {"epoch": epoch, "latent_codes": emb.state_dict()}),
                      ("OptimizerParameters", {"epoch": epoch, "optimizer_state_dict": opt.state_dict()})):
        (exp / kind).mkdir()
        torch.save(obj, exp / kind / "latest.pth")
    torch.save({"epoch": epoch, "loss": [0.05] * epoch}, exp / "Logs.pth")
    return exp, net, emb.weight.detach().clone()


def test_original_state_dict_names_and_shapes():
    state = original_network().state_dict()
    assert all(k.startswith("module.") for k in state)
    assert state["module.lin0.weight_v"].shape == (128, 32) and state["module.lin0.weight_g"].shape == (128, 1)
    assert state["module.lin3.weight_v"].shape == (96, 128)  # 128 - input width before latent_in 4
    assert state["module.lin8.weight"].shape == (1, 128)
    from lib.models.decoder import Decoder
    ours = Decoder(2, **NET_BOB).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == \
        {k[len("module."):]: tuple(v.shape) for k, v in state.items()}


def test_original_checkpoint_gives_the_originals_sdf(tmp_path):
    exp, net, codes = _original_experiment(tmp_path)
    decoder = experiment.load_decoder(exp, load_specs(exp))
    xyz = torch.rand(500, 3) * 2 - 1
    for k in range(2):
        want = reference_sdf(net.state_dict(), codes[k], xyz)
        with torch.no_grad():
            got = decoder(torch.cat([codes[k].expand(500, 2), xyz], 1)).reshape(-1)
        assert want.abs().max() > 1e-3 and want.std() > 1e-4  # a real signal, not a constant
        assert torch.allclose(got.double(), want, atol=2e-6, rtol=1e-5)


def test_both_latent_code_forms_load(tmp_path):
    codes = torch.randn(3, 2)
    (tmp_path / "LatentCodes").mkdir()
    torch.save({"epoch": 7, "latent_codes": {"weight": codes}}, tmp_path / "LatentCodes" / "latest.pth")
    torch.save({"epoch": 7, "latent_codes": codes.clone()}, tmp_path / "LatentCodes" / "7.pth")
    assert torch.equal(experiment.load_latent_codes(tmp_path), codes)
    assert torch.equal(experiment.load_latent_codes(tmp_path, 7), codes)


def test_original_optimizer_state_resumes_onto_the_right_parameters(tmp_path):
    """torch matches optimizer state to parameters by position, so our parameter order must be
    weight_norm(nn.Linear)'s (bias, weight_g, weight_v): each Adam moment lands on its tensor."""
    from lib.models.decoder import Decoder

    exp, net, codes = _original_experiment(tmp_path)
    dec, emb = Decoder(2, **NET_BOB), nn.Embedding(2, 2)
    opt = torch.optim.Adam([{"params": dec.parameters()}, {"params": emb.parameters()}])
    epoch, _ = experiment.load_checkpoint(exp, "latest", dec, opt, emb)
    assert epoch == 1 and torch.equal(emb.weight.detach(), codes)
    stored = torch.load(exp / "OptimizerParameters" / "latest.pth", weights_only=False)["optimizer_state_dict"]
    names = [k[len("module."):] for k, _ in net.named_parameters()]
    params = dict(dec.named_parameters())
    for i, name in enumerate(names):
        assert torch.equal(opt.state[params[name]]["exp_avg"], stored["state"][i]["exp_avg"]), name


def test_original_logs_are_adopted_on_resume():
    from lib.training import truncate_logs

    original = {"epoch": 2, "loss": [0.4, 0.3, 0.2, 0.1], "timing": [1.5, 1.4]}
    kept = truncate_logs(original, 2)
    assert kept["loss"] == original["loss"] and kept["loss_epoch"] == [1, 1, 2, 2] and kept["timing"] == [1.5, 1.4]
    assert truncate_logs(original, 1)["loss"] == [0.4, 0.3]


# --------------------------------------------------------------------------- data files


def test_deepsdf_normalization_file_round_trips_a_mesh(tmp_path):
    """A file in DeepSDF's convention (offset = -centre, (x + offset) * scale) maps a
    normalised mesh back to its original frame with x / scale - offset."""
    rng = np.random.default_rng(1)
    verts = rng.normal(size=(200, 3)) * [3.0, 1.0, 0.5] + [10.0, -7.0, 2.0]
    faces = rng.integers(0, 200, size=(300, 3))
    centre = 0.5 * (verts.min(0) + verts.max(0))
    radius = np.linalg.norm(verts - centre, axis=1).max() * 1.03
    np.savez(tmp_path / "inst.npz", offset=-centre, scale=1.0 / radius)  # as DeepSDF writes it
    norm = read_normalization(tmp_path / "inst.npz")
    normalised = (verts - centre) / radius
    assert np.allclose(norm.apply(verts), normalised) and np.allclose(norm.invert(normalised), verts)
    # ours writes the same numbers (plus a marker), and reads them back
    ours = normalization(verts, faces)
    assert np.allclose(ours.offset, -centre) and ours.scale == pytest.approx(1.0 / radius)
    write_normalization(tmp_path / "ours.npz", ours)
    with np.load(tmp_path / "ours.npz") as z:
        assert np.allclose(z["offset"], -centre) and float(z["scale"]) == pytest.approx(1.0 / radius)
    assert np.allclose(read_normalization(tmp_path / "ours.npz").invert(normalised), verts)


def test_normalization_file_of_an_earlier_version_is_converted_not_misapplied(tmp_path, loud, capsys):
    """Earlier versions wrote samples/<inst>_normalization.npz with offset = +centre and no marker."""
    centre, scale = np.array([1.0, 2.0, -3.0]), 0.25
    np.savez(tmp_path / "car_normalization.npz", offset=centre, scale=scale)
    norm = read_normalization(tmp_path / "car_normalization.npz")
    assert np.allclose(norm.apply(centre[None]), 0.0)  # the centre still goes to the origin
    assert "old sign" in capsys.readouterr().err
    np.savez(tmp_path / "x.npz", offset=-centre, scale=scale, convention=np.array("other"))
    with pytest.raises(MeshSDFError, match="unknown normalisation convention"):
        read_normalization(tmp_path / "x.npz")


def test_disn_metadata_lines_are_readable_by_the_originals_parser(tmp_path):
    cams = disn_camera([10.0, 200.5], [25.0, 35.25], [0.8, 0.7], image_size=224, dtype=torch.float64)
    path = tmp_path / "rendering_metadata.txt"
    write_disn_metadata(path, cams)
    text = path.read_text()
    assert text.endswith("]\n") and text.startswith("[")
    with open(path) as f:
        # the original's reading: drop the first character and the last two, then comma-separated floats
        parsed = [np.array([float(v) for v in line[1:-2].split(",")]) for line in f.readlines()]
    assert np.allclose(parsed[1][[0, 1, 3]], [200.5, 35.25, 0.7]) and len(parsed[1]) == 5
    assert [v.azimuth for v in read_disn_metadata(path)] == pytest.approx([10.0, 200.5])
    # and this project's older space-separated lines still read
    path.write_text("10 25 0 0.8 25\n")
    assert read_disn_metadata(path) == [DisnView(10.0, 25.0, 0.0, 0.8, 25.0)]


# --------------------------------------------------------------------------- the scripts, unchanged folder


def _run(script, args, cwd):
    env = {**os.environ, "MESHSDF_QUIET": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, str(REPO / script), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def _iters_flag() -> str:
    import demo_optimizer
    try:
        demo_optimizer.parse_args(["-e", "x", "--iters", "2"])
        return "--iters"
    except SystemExit:
        return "--iterations"


@pytest.mark.slow
def test_original_layout_folder_runs_the_demo_and_resumes_training(tmp_path):
    """From the repository root of an original-layout checkout: the demo on the original's
    checkpoint, then train_deep_sdf.py resuming it (its Adam state, codes and epoch)."""
    exp, _, codes = _original_experiment(tmp_path)
    rel = "experiments/bob_and_spot"
    demo = _run("demo_optimizer.py", ["-e", rel, _iters_flag(), "2", "--resolution", "32", "--image-size", "64"],
                tmp_path)
    assert demo.returncode == 0, demo.stderr
    log = json.loads((exp / "Optimizations" / "log.json").read_text())
    assert len(log["iterations"]) == 2 and log["checkpoint_epoch"] == 1
    train = _run("train_deep_sdf.py", ["-e", rel, "--continue", "latest", "--epochs", "3", "--resolution", "16"],
                 tmp_path)
    assert train.returncode == 0, train.stderr
    assert torch.load(exp / "ModelParameters" / "latest.pth", weights_only=False)["epoch"] == 3
    record = torch.load(exp / "OptimizerParameters" / "latest.pth", weights_only=False)
    assert int(record["optimizer_state_dict"]["state"][0]["step"]) == 3  # 1 original step + 2 epochs x 1 batch
    assert not torch.equal(experiment.load_latent_codes(exp), codes)
    assert sorted(p.name for p in (exp / "Reconstructions").glob("*.ply")) == ["bob.ply", "spot.ply"]
    logs = experiment.load_logs(exp)  # the original's history kept, ours appended
    assert logs["loss"][0] == 0.05 and len(logs["loss"]) == 3 and logs["log_epochs"] == [1, 2, 3]
