import copy
import json
import os
from pathlib import Path

import pytest
import torch

from lib import cli, experiment, runtime
from lib.experiment.specs import Key, int_key, load_specs, resolve_path
from lib.errors import MeshSDFError
from lib.models.decoder import Decoder, decoder_from_specs

REPO = Path(__file__).resolve().parents[1]
BOB_AND_SPOT = REPO / "experiments" / "bob_and_spot"


def _specs():
    return json.loads((BOB_AND_SPOT / "specs.json").read_text())


def _write(tmp_path, specs) -> Path:
    (tmp_path / "specs.json").write_text(json.dumps(specs))
    return tmp_path


def test_bob_and_spot_specs_have_the_original_values():
    s = load_specs(BOB_AND_SPOT)
    net = s["NetworkSpecs"]
    assert net["dims"] == [128] * 8 and net["dropout"] == list(range(8)) and net["dropout_prob"] == 0.2
    assert net["latent_in"] == [4] and net["weight_norm"] and net["positional_encoding"] and net["fourier_degree"] == 5
    assert (s["CodeLength"], s["NumEpochs"], s["SamplesPerScene"], s["ScenesPerBatch"]) == (2, 4000, 32192, 2)
    assert s["LearningRateSchedule"][0] == {"Type": "Step", "Initial": 0.0005, "Interval": 500, "Factor": 0.5}
    assert s["LearningRateSchedule"][1] == {"Type": "Step", "Initial": 0.001, "Interval": 500, "Factor": 0.5}
    assert s["ClampingDistance"] == 0.1 and s["CodeRegularizationLambda"] == 1e-4 and s["CodeBound"] is None
    # the original's defaults for the keys its file leaves out
    assert s["LogFrequency"] == 1 and s["CodeInitStdDev"] == 1.0 and s["GradientClipNorm"] is None
    assert s["SnapshotFrequency"] is None and s["NetworkArch"] == "deep_sdf_decoder" and s["CodeBound"] is None
    assert s["TrainSplit"] == "splits/bob_and_spot.json"
    split = json.loads(resolve_path(s["TrainSplit"]).read_text())
    assert split == {"bob_and_spot": {"samples": ["bob", "spot"]}}


@pytest.mark.parametrize("edit, words", [
    (lambda s: s.pop("CodeLength"), ["missing key", "CodeLength"]),
    (lambda s: s.update(CodeLength="2"), ["CodeLength", "integer"]),
    (lambda s: s.update(NumEpochs=True), ["NumEpochs", "integer"]),
    (lambda s: s.update(ClampingDistance=-0.1), ["ClampingDistance"]),
    (lambda s: s.update(CodeRegularization="yes"), ["CodeRegularization", "true or false"]),
    (lambda s: s.update(NetworkArch="resnet"), ["NetworkArch", "deep_sdf_decoder"]),
    (lambda s: s["NetworkSpecs"].update(dims=[128, "x"]), ["NetworkSpecs.dims"]),
    (lambda s: s["NetworkSpecs"].update(dropout_prob=1.0), ["NetworkSpecs.dropout_prob"]),
    (lambda s: s["NetworkSpecs"].update(latent_in=[12]), ["NetworkSpecs.latent_in", "12"]),
    (lambda s: s["LearningRateSchedule"][0].pop("Interval"), ["LearningRateSchedule", "Interval"]),
    (lambda s: s["LearningRateSchedule"].pop(), ["LearningRateSchedule", "2"]),
    (lambda s: s["LearningRateSchedule"][1].update(Type="Cosine"), ["LearningRateSchedule", "Type"]),
])
def test_bad_specs_name_key_and_file(tmp_path, edit, words):
    specs = _specs()
    edit(specs)
    exp = _write(tmp_path, specs)
    with pytest.raises(MeshSDFError) as err:
        load_specs(exp)
    msg = str(err.value)
    assert "\n" not in msg and str(exp / "specs.json") in msg
    for w in words:
        assert w in msg


def test_known_deepsdf_keys_are_accepted(tmp_path):
    specs = _specs()
    specs.update(TestSplit="x.json", DataLoaderThreads=4, BatchSplit=1, Description=["a", "b"], CodeBound=1.0,
                 GradientClipNorm=2.0, LogFrequency=5, CodeInitStdDev=0.5)
    specs["LearningRateSchedule"] = [{"Type": "Warmup", "Initial": 0.0, "Final": 1e-3, "Length": 10},
                                     {"Type": "Constant", "Value": 1e-3}]
    s = load_specs(_write(tmp_path, specs))
    assert s["CodeBound"] == 1.0 and s["LogFrequency"] == 5
    extra = {"NumberOfViews": Key(int_key(1), required=True)}
    specs["NumberOfViews"] = 16
    assert load_specs(_write(tmp_path, specs), extra_keys=extra)["NumberOfViews"] == 16


def test_missing_folder_file_and_bad_json(tmp_path):
    with pytest.raises(MeshSDFError, match="experiment folder not found"):
        load_specs(tmp_path / "nope")
    with pytest.raises(MeshSDFError, match="no specs.json"):
        load_specs(tmp_path)
    (tmp_path / "specs.json").write_text('{"CodeLength": 2,}')
    with pytest.raises(MeshSDFError, match="invalid JSON at line 1"):
        load_specs(tmp_path)


def test_resolve_path_prefers_cwd_then_repo_root(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert resolve_path("splits/bob_and_spot.json") == REPO / "splits/bob_and_spot.json"
    (tmp_path / "splits").mkdir(parents=True)
    (tmp_path / "splits" / "bob_and_spot.json").write_text("{}")
    assert resolve_path("splits/bob_and_spot.json") == Path("splits/bob_and_spot.json")
    assert resolve_path(tmp_path) == tmp_path


def test_choose_device():
    assert runtime.choose_device("cpu") == torch.device("cpu")
    assert runtime.choose_device(None).type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert runtime.choose_device("auto") == runtime.choose_device(None)
    with pytest.raises(MeshSDFError, match="unknown device"):
        runtime.choose_device("gpu0")
    if not torch.cuda.is_available():
        with pytest.raises(MeshSDFError, match="CUDA is not available"):
            runtime.choose_device("cuda")


def test_parse_epoch():
    assert cli.parse_epoch("latest") == "latest" and cli.parse_epoch("1000") == 1000
    for bad in ("last", "0", "-3"):
        with pytest.raises(MeshSDFError, match="--continue"):
            cli.parse_epoch(bad)


def _small():
    torch.manual_seed(0)
    dec = Decoder(2, dims=[8, 8], weight_norm=True, norm_layers=[0, 1])
    codes = torch.nn.Embedding(3, 2)
    opt = torch.optim.Adam([{"params": dec.parameters()}, {"params": codes.parameters()}])
    dec(torch.randn(4, 5)).sum().backward()
    codes.weight.sum().backward()
    opt.step()
    return dec, codes, opt


def test_checkpoint_round_trip_and_loaders(tmp_path):
    dec, codes, opt = _small()
    experiment.save_checkpoint(tmp_path, "latest", 7, dec, opt, codes, extra={"rng_state": runtime.rng_state()})
    experiment.save_checkpoint(tmp_path, 5, 5, dec, opt, codes)
    assert experiment.snapshot_epochs(tmp_path) == [5]
    dec2, codes2, opt2 = Decoder(2, dims=[8, 8], weight_norm=True, norm_layers=[0, 1]), torch.nn.Embedding(3, 2), None
    opt2 = torch.optim.Adam([{"params": dec2.parameters()}, {"params": codes2.parameters()}])
    epoch, extra = experiment.load_checkpoint(tmp_path, "latest", dec2, opt2, codes2)
    assert epoch == 7 and "rng_state" in extra
    for a, b in zip(dec.state_dict().values(), dec2.state_dict().values()):
        assert torch.equal(a, b)
    assert torch.equal(codes.weight, codes2.weight)
    assert opt2.state_dict()["state"][0]["step"] == opt.state_dict()["state"][0]["step"]
    assert torch.equal(experiment.load_latent_codes(tmp_path, 5), codes.weight.detach())
    specs = {"CodeLength": 2, "NetworkSpecs": {"dims": [8, 8], "weight_norm": True, "norm_layers": [0, 1]}}
    loaded = experiment.load_decoder(tmp_path, specs, 5)
    assert not loaded.training and loaded.checkpoint_epoch == 5
    with pytest.raises(MeshSDFError, match="available: latest, 5"):
        experiment.load_decoder(tmp_path, specs, 9)
    with pytest.raises(MeshSDFError, match="does not match the network"):
        experiment.load_decoder(tmp_path, {"CodeLength": 2, "NetworkSpecs": {"dims": [16, 8]}}, "latest")


def test_loads_original_deepsdf_layouts(tmp_path):
    """DataParallel 'module.' prefixes and a bare (K, 1, L) latent tensor, as old DeepSDF wrote them."""
    dec, codes, _ = _small()
    (tmp_path / "ModelParameters").mkdir()
    (tmp_path / "LatentCodes").mkdir()
    torch.save({"epoch": 3, "model_state_dict": {f"module.{k}": v for k, v in dec.state_dict().items()}},
               tmp_path / "ModelParameters" / "latest.pth")
    torch.save({"epoch": 3, "latent_codes": codes.weight.detach()[:, None, :]}, tmp_path / "LatentCodes" / "latest.pth")
    dec2 = Decoder(2, dims=[8, 8], weight_norm=True, norm_layers=[0, 1])
    assert experiment.load_model_state(tmp_path, dec2) == 3
    assert torch.equal(dec2.lin0.weight_v, dec.lin0.weight_v)
    assert experiment.load_latent_codes(tmp_path).shape == (3, 2)


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    dec, codes, opt = _small()
    experiment.save_checkpoint(tmp_path, "latest", 1, dec, opt, codes)
    before = {p: p.read_bytes() for p in tmp_path.rglob("*.pth")}
    real_save = torch.save
    calls = []

    def dying_save(obj, f, *a, **kw):
        calls.append(f)
        if len(calls) == 3:  # the third file: write half of it, then die
            import io

            buf = io.BytesIO()
            real_save(obj, buf, *a, **kw)
            half = buf.getvalue()[: len(buf.getvalue()) // 2]
            f.write(half) if hasattr(f, "write") else Path(f).write_bytes(half)  # a file object or a path
            raise KeyboardInterrupt("killed")
        return real_save(obj, f, *a, **kw)

    monkeypatch.setattr(torch, "save", dying_save)
    with torch.no_grad():
        dec.lin0.bias.add_(1.0)
    with pytest.raises(KeyboardInterrupt):
        experiment.save_checkpoint(tmp_path, "latest", 2, dec, opt, codes)
    monkeypatch.setattr(torch, "save", real_save)
    after = {p: p.read_bytes() for p in tmp_path.rglob("*.pth")}
    assert after == before  # nothing renamed over the old checkpoint
    assert [p.name for p in tmp_path.rglob("*") if p.is_file() and p.suffix != ".pth"] == []  # no temp left
    assert experiment.load_checkpoint(tmp_path, "latest", dec, opt, codes)[0] == 1


def test_resume_record_survives_a_kill_between_renames(tmp_path):
    """Model file renamed, optimizer record not yet: resuming uses the older, complete record."""
    dec, codes, opt = _small()
    experiment.save_checkpoint(tmp_path, "latest", 4, dec, opt, codes)
    old = {k: v.clone() for k, v in dec.state_dict().items()}
    with torch.no_grad():
        dec.lin0.bias.add_(1.0)
    experiment.save_checkpoint(tmp_path, 6, 6, dec, opt, codes)
    os.replace(tmp_path / "ModelParameters" / "6.pth", tmp_path / "ModelParameters" / "latest.pth")
    os.replace(tmp_path / "LatentCodes" / "6.pth", tmp_path / "LatentCodes" / "latest.pth")
    epoch, _ = experiment.load_checkpoint(tmp_path, "latest", dec, opt, codes)
    assert epoch == 4 and torch.equal(dec.lin0.bias, old["lin0.bias"])


def test_inconsistent_deepsdf_checkpoint_is_reported(tmp_path):
    dec, codes, opt = _small()
    for kind, epoch in (("ModelParameters", 4), ("LatentCodes", 4), ("OptimizerParameters", 3)):
        (tmp_path / kind).mkdir()
        obj = {"epoch": epoch, "model_state_dict": dec.state_dict(), "latent_codes": codes.state_dict(),
               "optimizer_state_dict": opt.state_dict()}
        if kind == "OptimizerParameters":
            obj = {"epoch": epoch, "optimizer_state_dict": opt.state_dict()}
        torch.save(obj, tmp_path / kind / "latest.pth")
    with pytest.raises(MeshSDFError, match="inconsistent.*--continue N"):
        experiment.load_checkpoint(tmp_path, "latest", dec, opt, codes)


def test_optimizer_state_in_another_parameter_order_is_refused(tmp_path):
    """torch maps optimizer state by position: a record written with another parameter order
    (here: reversed) must stop with a hint, not feed one layer's Adam moments to another."""
    dec, codes, opt = _small()
    experiment.save_checkpoint(tmp_path, "latest", 2, dec, opt, codes)
    path = tmp_path / "OptimizerParameters" / "latest.pth"
    record = torch.load(path, weights_only=False)
    state = record["optimizer_state_dict"]
    n = len(state["param_groups"][0]["params"])
    state["state"] = {**{n - 1 - i: state["state"][i] for i in range(n)},
                      **{k: v for k, v in state["state"].items() if k >= n}}
    torch.save(record, path)
    with pytest.raises(MeshSDFError, match="fresh optimizer") as err:
        fresh_dec, fresh_codes, fresh_opt = _small()
        experiment.load_checkpoint(tmp_path, "latest", fresh_dec, fresh_opt, fresh_codes)
    assert "\n" not in str(err.value) and "OptimizerParameters" in str(err.value)


def test_logs_round_trip(tmp_path):
    assert experiment.load_logs(tmp_path) == {}
    logs = {"epoch": 2, "loss": [0.5, 0.25], "param_magnitude": {"a": [1.0, 2.0]}}
    experiment.save_logs(tmp_path, logs)
    assert experiment.load_logs(tmp_path) == logs


def test_decoder_from_bob_and_spot_specs_runs():
    dec = decoder_from_specs(load_specs(BOB_AND_SPOT)).eval()
    assert dec(torch.zeros(3, 5)).shape == (3, 1)
    assert copy.deepcopy(dec).input_size == 32
