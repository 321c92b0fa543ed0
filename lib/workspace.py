"""Experiment folders: specs.json, checkpoint files, devices, seeds and resuming.

An experiment is a folder holding ``specs.json``; everything a run writes goes beside it::

    <exp>/specs.json
    <exp>/ModelParameters/<epoch|latest>.pth      {"epoch": e, "model_state_dict": ...}
    <exp>/OptimizerParameters/<epoch|latest>.pth  {"epoch": e, "optimizer_state_dict": ..., "rng_state": ...,
                                                   + model and codes: the resume record}
    <exp>/LatentCodes/<epoch|latest>.pth          {"epoch": e, "latent_codes": {"weight": (K, L)}}
    <exp>/Logs.pth                                training histories (see lib.train)
    <exp>/Reconstructions/<instance>.ply          meshes of the training codes

These are the DeepSDF file layouts, so checkpoints of the original load here too (their
state dicts may carry DataParallel's ``module.`` prefix; it is stripped on load).

Relative paths inside specs (``DataSource``, ``TrainSplit``, ``TestSplit``) resolve against
the current working directory when they exist there, else against the repository root
(the folder that holds ``lib/``), so scripts work from the repository root and from
elsewhere.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import random
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from lib.errors import MeshSDFError
from lib.io import atomic_write

REPO_ROOT = Path(__file__).resolve().parents[1]

SPECS_FILE = "specs.json"
MODEL_PARAMS_DIR = "ModelParameters"
OPTIMIZER_PARAMS_DIR = "OptimizerParameters"
LATENT_CODES_DIR = "LatentCodes"
LOGS_FILE = "Logs.pth"
RECONSTRUCTIONS_DIR = "Reconstructions"

NETWORK_ARCHS = ("deep_sdf_decoder",)


# --------------------------------------------------------------------------- specs schema

@dataclass(frozen=True)
class Key:
    """One specs key: ``check(value) -> str | None`` returns what is wrong (None = fine)."""

    check: Callable[[Any], str | None]
    required: bool = False
    default: Any = None
    used: bool = True  # False: a known DeepSDF key this project accepts and ignores


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def str_key(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def int_key(minimum: int = 0):
    def check(v):
        return None if _is_int(v) and v >= minimum else f"must be an integer >= {minimum}"
    return check


def num_key(minimum: float = 0.0, strict: bool = False, maximum: float | None = None, nullable: bool = False):
    def check(v):
        if v is None and nullable:
            return None
        ok = _is_num(v) and (v > minimum if strict else v >= minimum) and (maximum is None or v < maximum)
        if ok:
            return None
        rng = f"{'>' if strict else '>='} {minimum}" + (f" and < {maximum}" if maximum is not None else "")
        return f"must be a number {rng}" + (" or null" if nullable else "")
    return check


def bool_key(v):
    return None if isinstance(v, bool) else "must be true or false"


def int_list_key(minimum: int = 0, nonempty: bool = False, nullable: bool = False):
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, list) and all(_is_int(i) and i >= minimum for i in v) and (v or not nonempty):
            return None
        return f"must be a {'non-empty ' if nonempty else ''}list of integers >= {minimum}" + (" or null" if nullable else "")
    return check


def any_key(v):
    return None


def _description_key(v):
    ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    return None if ok else "must be a string or a list of strings"


def _arch_key(v):
    return None if v in NETWORK_ARCHS else f"must be one of {', '.join(NETWORK_ARCHS)}"


NETWORK_SPECS_KEYS: dict[str, Key] = {
    "dims": Key(int_list_key(1, nonempty=True), required=True),
    "dropout": Key(int_list_key(0, nullable=True), default=None),
    "dropout_prob": Key(num_key(0.0, maximum=1.0), default=0.0),
    "norm_layers": Key(int_list_key(0), default=[]),
    "latent_in": Key(int_list_key(0), default=[]),
    "xyz_in_all": Key(bool_key, default=False),
    "use_tanh": Key(bool_key, default=False),
    "latent_dropout": Key(bool_key, default=False),
    "weight_norm": Key(bool_key, default=False),
    "positional_encoding": Key(bool_key, default=False),
    "fourier_degree": Key(int_key(0), default=1),
}

SCHEDULE_TYPES = {
    "Step": ("Initial", "Interval", "Factor"),
    "Warmup": ("Initial", "Final", "Length"),
    "Constant": ("Value",),
}


def _schedule_problem(item) -> str | None:
    if not isinstance(item, dict) or item.get("Type") not in SCHEDULE_TYPES:
        return f"entries must be objects with \"Type\" one of {', '.join(SCHEDULE_TYPES)}"
    need = SCHEDULE_TYPES[item["Type"]]
    extra = sorted(set(item) - set(need) - {"Type"})
    if extra:
        return f"{item['Type']} schedule has unknown field {extra[0]!r} (fields: {', '.join(need)})"
    for f in need:
        if f not in item:
            return f"{item['Type']} schedule needs field {f!r}"
        if not _is_num(item[f]) or item[f] < 0:
            return f"{item['Type']} schedule field {f!r} must be a number >= 0"
    if item["Type"] == "Step" and item["Interval"] < 1:
        return "Step schedule field 'Interval' must be >= 1"
    return None


def schedule_list_key(count: int):
    def check(v):
        if not isinstance(v, list) or len(v) < count:
            return f"must be a list of {count} learning-rate schedules"
        for item in v:
            problem = _schedule_problem(item)
            if problem:
                return problem
        return None
    return check


def _network_specs_key(v):
    return None if isinstance(v, dict) else "must be an object of decoder options"


# Keys of DeepSDF / MeshSDF auto-decoder specs.  Scripts with more keys (train_svr.py)
# pass their own additions to load_specs(extra_keys=...).
DEEPSDF_KEYS: dict[str, Key] = {
    "Description": Key(_description_key, used=False),
    "DataSource": Key(str_key, required=True),
    "TrainSplit": Key(str_key, required=True),
    "TestSplit": Key(str_key, used=False),
    "NetworkArch": Key(_arch_key, required=True),
    "NetworkSpecs": Key(_network_specs_key, required=True),
    "CodeLength": Key(int_key(1), required=True),
    "NumEpochs": Key(int_key(1), required=True),
    "SnapshotFrequency": Key(int_key(1), required=True),
    "AdditionalSnapshots": Key(int_list_key(1), default=[]),
    "LearningRateSchedule": Key(schedule_list_key(2), required=True),
    "SamplesPerScene": Key(int_key(2), required=True),
    "ScenesPerBatch": Key(int_key(1), required=True),
    "DataLoaderThreads": Key(int_key(0), default=1, used=False),
    "ClampingDistance": Key(num_key(0.0, strict=True), required=True),
    "CodeRegularization": Key(bool_key, default=True),
    "CodeRegularizationLambda": Key(num_key(0.0), default=1e-4),
    "CodeBound": Key(num_key(0.0, strict=True, nullable=True), default=None),
    "CodeInitStdDev": Key(num_key(0.0, strict=True), default=1.0),
    "GradientClipNorm": Key(num_key(0.0, strict=True, nullable=True), default=None),
    "LogFrequency": Key(int_key(1), default=10),
    "BatchSplit": Key(int_key(1), default=1, used=False),
}


def _validate(obj: Mapping, keys: Mapping[str, Key], where: str, prefix: str = "") -> dict:
    out = {}
    for name in obj:
        if name not in keys:
            raise MeshSDFError(f"{where}: unknown key \"{prefix}{name}\"; remove it or fix its spelling "
                               f"(known: {', '.join(sorted(keys))})")
    for name, key in keys.items():
        if name not in obj:
            if key.required:
                raise MeshSDFError(f"{where}: missing key \"{prefix}{name}\"; add it")
            out[name] = key.default
            continue
        problem = key.check(obj[name])
        if problem:
            raise MeshSDFError(f"{where}: key \"{prefix}{name}\" {problem}, got {json.dumps(obj[name])}")
        out[name] = obj[name]
    return out


def validate_specs(specs: Mapping, where: str = SPECS_FILE, extra_keys: Mapping[str, Key] | None = None) -> dict:
    """Check ``specs`` against the schema; return a copy with defaults filled in.

    Raises MeshSDFError naming ``where`` and the key for an unknown, missing or ill-typed key.
    """
    keys = dict(DEEPSDF_KEYS)
    keys.update(extra_keys or {})
    if not isinstance(specs, Mapping):
        raise MeshSDFError(f"{where}: must hold a JSON object of specs keys")
    out = _validate(specs, keys, where)
    if "NetworkSpecs" in out and out["NetworkSpecs"] is not None:
        net = _validate(out["NetworkSpecs"], NETWORK_SPECS_KEYS, where, prefix="NetworkSpecs.")
        n_hidden = len(net["dims"])
        for k in ("dropout", "norm_layers", "latent_in"):
            bad = [i for i in (net[k] or []) if i > n_hidden]
            if bad:
                raise MeshSDFError(f"{where}: key \"NetworkSpecs.{k}\" lists layer {bad[0]} but dims has "
                                   f"only {n_hidden} hidden layers")
        out["NetworkSpecs"] = net
    return out


def load_specs(exp_dir: str | os.PathLike, extra_keys: Mapping[str, Key] | None = None) -> dict:
    """Read and validate ``<exp_dir>/specs.json``; returns the specs with defaults filled in."""
    exp_dir = Path(exp_dir)
    path = exp_dir / SPECS_FILE
    if not exp_dir.is_dir():
        raise MeshSDFError(f"experiment folder not found: {exp_dir}; give -e a folder that holds {SPECS_FILE}")
    if not path.is_file():
        raise MeshSDFError(f"no {SPECS_FILE} in {exp_dir}; give -e the experiment folder that holds it")
    try:
        specs = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise MeshSDFError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except (OSError, UnicodeDecodeError) as err:
        raise MeshSDFError(f"cannot read {path}: {err}") from None
    return validate_specs(specs, where=str(path), extra_keys=extra_keys)


def resolve_path(path: str | os.PathLike) -> Path:
    """A specs path: absolute as is; relative against the cwd if it exists there, else the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


# --------------------------------------------------------------------------- devices, seeds

def choose_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Raises MeshSDFError for an unknown name or an unavailable CUDA device.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise MeshSDFError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MeshSDFError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MeshSDFError(f"device {name!r} does not exist: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise MeshSDFError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(*generators: torch.Generator) -> dict:
    """torch CPU (+ CUDA) default generator states and those of ``generators``: weights_only-safe."""
    state = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping, *generators: torch.Generator) -> None:
    """Restore what ``rng_state`` saved (CUDA states only when CUDA is in use here too)."""
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state.get("generators", [])):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)


# --------------------------------------------------------------------------- checkpoints

def parse_epoch(value: str | int) -> str | int:
    """``--continue`` value: "latest" or a positive epoch number (argparse ``type=``)."""
    if value == "latest":
        return "latest"
    try:
        epoch = int(value)
    except (TypeError, ValueError):
        raise MeshSDFError(f"--continue takes 'latest' or an epoch number, got {value!r}") from None
    if epoch < 1:
        raise MeshSDFError(f"--continue epoch must be >= 1, got {epoch}")
    return epoch


def checkpoint_path(exp_dir: str | os.PathLike, kind: str, epoch: str | int) -> Path:
    """``<exp>/<kind>/<epoch|latest>.pth`` for kind in ModelParameters, OptimizerParameters, LatentCodes."""
    return Path(exp_dir) / kind / f"{epoch}.pth"


def logs_path(exp_dir: str | os.PathLike) -> Path:
    return Path(exp_dir) / LOGS_FILE


def reconstructions_dir(exp_dir: str | os.PathLike) -> Path:
    return Path(exp_dir) / RECONSTRUCTIONS_DIR


def check_writable(exp_dir: str | os.PathLike) -> None:
    """MeshSDFError unless checkpoints can be written in ``exp_dir`` (checked before training,
    not after the first epochs); creates nothing that stays."""
    import tempfile

    exp_dir = Path(exp_dir)
    for d in (exp_dir, *(exp_dir / k for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR))):
        if d.exists() and not d.is_dir():
            raise MeshSDFError(f"{d} is a file but must be a folder for checkpoints; move it away")
        if d.is_dir():
            try:
                with tempfile.TemporaryFile(dir=d):
                    pass
            except OSError as err:
                raise MeshSDFError(f"cannot write to {d}: {err.strerror or err}; make the experiment folder "
                                   "writable or copy it somewhere writable") from None


def snapshot_epochs(exp_dir: str | os.PathLike) -> list[int]:
    """Numbered model snapshots present in ``<exp>/ModelParameters``, ascending."""
    d = Path(exp_dir) / MODEL_PARAMS_DIR
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"(\d+)\.pth", p.name)))


def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through atomic_write: the old file or the new one, never a truncated one."""
    with atomic_write(path) as tmp:
        torch.save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location=None) -> Any:
    """torch.load with weights_only=True; MeshSDFError naming the file if missing or unreadable."""
    path = Path(path)
    if not path.is_file():
        raise MeshSDFError(f"checkpoint not found: {path}")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # corrupt zip, pickle refused by weights_only, ...
        reason = str(err).split("\n")[0].split(". ")[0]
        raise MeshSDFError(f"cannot load {path}: {type(err).__name__}: {reason}; the file is truncated, corrupt or "
                           "not a PyTorch checkpoint") from None


def _state_dict(obj) -> dict:
    return obj.state_dict() if hasattr(obj, "state_dict") else {"weight": torch.as_tensor(obj)}


def save_checkpoint(exp_dir: str | os.PathLike, label: str | int, epoch: int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, latent_codes=None,
                    extra: Mapping[str, Any] | None = None) -> None:
    """Write ModelParameters/, OptimizerParameters/ and LatentCodes/ ``<label>.pth``.

    ``latent_codes``: an ``nn.Embedding`` or a (K, L) tensor; ``extra`` (e.g. RNG states)
    goes into the optimizer file.  Each file is written to a temporary and renamed, so no
    file is ever truncated.  Three renames cannot be one atomic step, so the optimizer file
    is the resume record: it also holds the model and latent states and is renamed last;
    a kill between renames leaves a complete, self-consistent record of the previous save.
    """
    model_state = model.state_dict()
    codes_state = _state_dict(latent_codes) if latent_codes is not None else None
    files = []
    if optimizer is not None:
        record = {"epoch": epoch, "optimizer_state_dict": optimizer.state_dict(), "model_state_dict": model_state}
        if codes_state is not None:
            record["latent_codes"] = codes_state
        record.update(extra or {})
        files.append((OPTIMIZER_PARAMS_DIR, record))
    if codes_state is not None:
        files.append((LATENT_CODES_DIR, {"epoch": epoch, "latent_codes": codes_state}))
    files.append((MODEL_PARAMS_DIR, {"epoch": epoch, "model_state_dict": model_state}))
    with contextlib.ExitStack() as stack:  # exits in reverse order: the optimizer record is renamed last
        for kind, obj in files:
            tmp = stack.enter_context(atomic_write(checkpoint_path(exp_dir, kind, label)))
            torch.save(obj, tmp)


def _strip_module_prefix(state: Mapping[str, torch.Tensor]) -> dict:
    if state and all(k.startswith("module.") for k in state):
        return {k[len("module."):]: v for k, v in state.items()}
    return dict(state)


def _checkpoint_epoch(obj, path) -> int:
    if not isinstance(obj, Mapping) or "epoch" not in obj:
        raise MeshSDFError(f"{path} is not a MeshSDF/DeepSDF checkpoint (no 'epoch' entry)")
    return int(obj["epoch"])


def load_model_state(exp_dir: str | os.PathLike, model: torch.nn.Module, epoch: str | int = "latest",
                     map_location=None) -> int:
    """Load ``ModelParameters/<epoch>.pth`` into ``model``; returns the stored epoch."""
    path = checkpoint_path(exp_dir, MODEL_PARAMS_DIR, epoch)
    if not path.is_file():
        raise MeshSDFError(_missing_checkpoint_message(exp_dir, path))
    obj = load_torch(path, map_location)
    stored = _checkpoint_epoch(obj, path)
    _load_model(model, obj.get("model_state_dict", {}), path)
    return stored


def _network_difference(own: Mapping[str, torch.Tensor], stored: Mapping) -> str | None:
    """The first difference between a model's state dict and a stored one, in words (None: same layout)."""
    for name, value in own.items():
        if name not in stored:
            return f"it lacks {name}"
        got = tuple(getattr(stored[name], "shape", ()))
        if got != tuple(value.shape):
            return f"{name} is {got} there but {tuple(value.shape)} for specs.json"
    extra = sorted(set(stored) - set(own))
    return f"it has an extra {extra[0]}" if extra else None


def _load_model(model: torch.nn.Module, state: Mapping, path) -> None:
    state = _strip_module_prefix(state)
    difference = _network_difference(model.state_dict(), state)
    if difference is None:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as err:
            difference = str(err).strip().splitlines()[-1].strip()
    raise MeshSDFError(f"{path} does not match the network of specs.json ({difference}); it was trained with "
                       "other NetworkSpecs or CodeLength; restore those in specs.json or retrain")


def _latent_tensor(codes, path) -> torch.Tensor:
    if isinstance(codes, Mapping):
        codes = _strip_module_prefix(codes).get("weight")
    if not isinstance(codes, torch.Tensor) or codes.dim() not in (2, 3):
        raise MeshSDFError(f"{path} holds no (K, L) latent-code tensor")
    return codes.reshape(codes.shape[0], -1).float()  # DeepSDF's oldest layout: (K, 1, L)


def _read_latent_codes(exp_dir, epoch) -> tuple[int, torch.Tensor]:
    path = checkpoint_path(exp_dir, LATENT_CODES_DIR, epoch)
    if not path.is_file():
        raise MeshSDFError(_missing_checkpoint_message(exp_dir, path))
    obj = load_torch(path, map_location="cpu")
    stored = _checkpoint_epoch(obj, path)
    return stored, _latent_tensor(obj.get("latent_codes"), path)


def load_latent_codes(exp_dir: str | os.PathLike, epoch: str | int = "latest", device=None) -> torch.Tensor:
    """Training latent codes ``LatentCodes/<epoch>.pth`` as a (K, L) float32 tensor on ``device``.

    Row k is the code of the k-th instance of the TrainSplit (in file order).  Accepts
    ``{"latent_codes": {"weight": ...}}`` (an embedding's state dict, DeepSDF's layout) and
    ``{"latent_codes": tensor}``.
    """
    return _read_latent_codes(exp_dir, epoch)[1].to(device)


def load_decoder(exp_dir: str | os.PathLike, specs: Mapping, epoch: str | int = "latest", device=None) -> torch.nn.Module:
    """The decoder of specs.json with ``ModelParameters/<epoch>.pth`` loaded, in eval mode on ``device``.

    The stored epoch is available as ``decoder.checkpoint_epoch``.
    """
    from lib.models.decoder import decoder_from_specs

    decoder = decoder_from_specs(specs)
    stored = load_model_state(exp_dir, decoder, epoch, map_location="cpu")
    decoder.checkpoint_epoch = stored
    return decoder.to(device).eval()


def load_checkpoint(exp_dir: str | os.PathLike, label: str | int, model: torch.nn.Module,
                    optimizer: torch.optim.Optimizer | None = None, latent_codes: torch.nn.Module | None = None,
                    map_location=None) -> tuple[int, dict]:
    """Load what ``save_checkpoint`` wrote into the given objects, for resuming training.

    With an optimizer, its file is the record (model and codes included, see
    ``save_checkpoint``); records of the original DeepSDF lack them, and then the three
    files are read and must hold the same epoch.  Returns (epoch, the record's other
    entries, e.g. "rng_state").  Raises MeshSDFError for missing or mismatching files.
    """
    if optimizer is None:
        return load_model_state(exp_dir, model, label, map_location), {}
    path = checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label)
    if not path.is_file():
        raise MeshSDFError(_missing_checkpoint_message(exp_dir, path))
    record = load_torch(path, map_location)
    epoch = _checkpoint_epoch(record, path)
    epochs = {OPTIMIZER_PARAMS_DIR: epoch}
    if "model_state_dict" in record:
        _load_model(model, record["model_state_dict"], path)
    else:
        epochs[MODEL_PARAMS_DIR] = load_model_state(exp_dir, model, label, map_location)
    if latent_codes is not None:
        if "latent_codes" in record:
            codes = _latent_tensor(record["latent_codes"], path)
        else:
            epochs[LATENT_CODES_DIR], codes = _read_latent_codes(exp_dir, label)
        if tuple(codes.shape) != tuple(latent_codes.weight.shape):
            raise MeshSDFError(f"{path} holds {tuple(codes.shape)} latent codes but the split and CodeLength give "
                               f"{tuple(latent_codes.weight.shape)}; check TrainSplit")
        with torch.no_grad():
            latent_codes.weight.copy_(codes)
    if len(set(epochs.values())) > 1:
        found = ", ".join(f"{k} {v}" for k, v in epochs.items())
        raise MeshSDFError(f"checkpoint '{label}' in {exp_dir} is inconsistent ({found}); "
                           f"resume from a numbered snapshot instead (--continue N, have {snapshot_epochs(exp_dir)})")
    try:
        optimizer.load_state_dict(record["optimizer_state_dict"])
    except (KeyError, ValueError) as err:
        raise MeshSDFError(f"{path} does not match this optimizer ({err})") from None
    extra = {k: v for k, v in record.items()
             if k not in ("epoch", "optimizer_state_dict", "model_state_dict", "latent_codes")}
    return epoch, extra


def _missing_checkpoint_message(exp_dir, path) -> str:
    have = snapshot_epochs(exp_dir)
    latest = checkpoint_path(exp_dir, MODEL_PARAMS_DIR, "latest").is_file()
    options = (["latest"] if latest else []) + [str(e) for e in have]
    hint = f"available: {', '.join(options)}" if options else "train it first with train_deep_sdf.py"
    return f"checkpoint not found: {path}; {hint}"


def save_logs(exp_dir: str | os.PathLike, logs: Mapping[str, Any]) -> None:
    """Write ``Logs.pth`` atomically (plain lists/dicts/numbers: loadable with weights_only)."""
    save_torch(dict(logs), logs_path(exp_dir))


def load_logs(exp_dir: str | os.PathLike) -> dict:
    """``Logs.pth`` as a dict, or {} when there is none yet."""
    path = logs_path(exp_dir)
    return dict(load_torch(path)) if path.is_file() else {}
