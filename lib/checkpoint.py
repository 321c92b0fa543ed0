"""The experiment folder's files: every checkpoint form, read and written in one place.

An experiment is a folder holding ``specs.json``; everything a run writes goes beside it::

    <exp>/ModelParameters/<epoch|latest>.pth      {"epoch": e, "model_state_dict": ...}
    <exp>/OptimizerParameters/<epoch|latest>.pth  {"epoch": e, "optimizer_state_dict": ..., "rng_state": ...,
                                                   + model and codes: the resume record}
    <exp>/LatentCodes/<epoch|latest>.pth          {"epoch": e, "latent_codes": {"weight": (K, L)}}
    <exp>/Logs.pth                                training histories (see lib.train)
    <exp>/Reconstructions/<instance>.ply          meshes of the training codes

These are the DeepSDF file layouts, so checkpoints of the original load here too (their
state dicts may carry DataParallel's ``module.`` prefix; it is stripped on load).
"""
from __future__ import annotations

import contextlib
import os
import re
from pathlib import Path
from typing import Any, Mapping

import torch

from lib.errors import MeshSDFError
from lib.io import atomic_write

MODEL_PARAMS_DIR = "ModelParameters"
OPTIMIZER_PARAMS_DIR = "OptimizerParameters"
LATENT_CODES_DIR = "LatentCodes"
LOGS_FILE = "Logs.pth"
RECONSTRUCTIONS_DIR = "Reconstructions"


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

