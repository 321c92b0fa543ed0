"""The experiment folder's files: its layout and every checkpoint form, read and written in one place.

An experiment is a folder holding ``specs.json``; everything a run writes goes beside it::

    <exp>/ModelParameters/<epoch|latest>.pth      {"epoch": e, "model_state_dict": ...}
    <exp>/OptimizerParameters/<epoch|latest>.pth  {"epoch": e, "optimizer_state_dict": ..., "rng_state": ...,
                                                   + model and codes: the resume record}
    <exp>/LatentCodes/<epoch|latest>.pth          {"epoch": e, "latent_codes": {"weight": (K, L)}}
    <exp>/Logs.pth                                training histories (see lib.training.logs)
    <exp>/Reconstructions/<instance>.ply          meshes of the training codes

These are the DeepSDF file layouts, so checkpoints of the original load here too (their
state dicts may carry DataParallel's ``module.`` prefix; it is stripped on load).  The
single-view reconstruction files (encoder + decoder) are here too, not in lib.svr: resume
checks and "which epochs exist" messages read both forms, and they share the loaders.
Who may write the folder is ``lib.experiment.writer``'s concern.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Any, Mapping

import torch

from ..errors import MeshSDFError
from ..io import atomic_write, require_file, torch_save
from ..models.decoder import decoder_from_specs
from .lock import active_writer

__all__ = [
    "MODEL_PARAMS_DIR", "OPTIMIZER_PARAMS_DIR", "LATENT_CODES_DIR", "LOGS_FILE", "RECONSTRUCTIONS_DIR",
    "BACKUPS_DIR", "OPTIMIZATIONS_DIR", "SVR_PARTS", "WRITER_WAIT_S",
    "checkpoint_path", "svr_model_path", "logs_path", "reconstructions_dir",
    "snapshot_epochs", "svr_snapshot_epochs", "saved_epochs", "record_epoch",
    "save_torch", "load_torch",
    "save_checkpoint", "load_checkpoint", "load_model_state", "load_latent_codes", "load_decoder",
    "load_decoder_and_codes", "check_same_epoch", "read_while_saved",
    "save_svr_checkpoint", "load_svr_checkpoint", "load_svr_networks",
    "save_logs", "load_logs",
]

MODEL_PARAMS_DIR = "ModelParameters"
OPTIMIZER_PARAMS_DIR = "OptimizerParameters"
LATENT_CODES_DIR = "LatentCodes"
LOGS_FILE = "Logs.pth"
RECONSTRUCTIONS_DIR = "Reconstructions"
BACKUPS_DIR = "Backups"  # where --overwrite moves an earlier model (lib.experiment.writer.move_aside)
OPTIMIZATIONS_DIR = "Optimizations"  # demo_optimizer.py's default output
SVR_PARTS = ("encoder", "decoder")


# --------------------------------------------------------------------------- paths

def checkpoint_path(exp_dir: str | os.PathLike, kind: str, epoch: str | int) -> Path:
    """``<exp>/<kind>/<epoch|latest>.pth`` for kind in ModelParameters, OptimizerParameters, LatentCodes."""
    return Path(exp_dir) / kind / f"{epoch}.pth"


def svr_model_path(exp_dir: str | os.PathLike, part: str, epoch: str | int) -> Path:
    """``<exp>/ModelParameters/<part>_<epoch|latest>.pth`` for part in "encoder", "decoder"."""
    return Path(exp_dir) / MODEL_PARAMS_DIR / f"{part}_{epoch}.pth"


def logs_path(exp_dir: str | os.PathLike) -> Path:
    """``<exp>/Logs.pth``, the training histories."""
    return Path(exp_dir) / LOGS_FILE


def reconstructions_dir(exp_dir: str | os.PathLike) -> Path:
    """``<exp>/Reconstructions``, the meshes of the training codes."""
    return Path(exp_dir) / RECONSTRUCTIONS_DIR


def snapshot_epochs(exp_dir: str | os.PathLike) -> list[int]:
    """Numbered model snapshots present in ``<exp>/ModelParameters``, ascending."""
    d = Path(exp_dir) / MODEL_PARAMS_DIR
    if not d.is_dir():
        return []
    return sorted(int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"(\d+)\.pth", p.name)))


def svr_snapshot_epochs(exp_dir: str | os.PathLike) -> list[int]:
    """Numbered SVR snapshots (``decoder_<e>.pth``, or an earlier version's ``<e>.pth``), ascending."""
    d = Path(exp_dir) / MODEL_PARAMS_DIR
    if not d.is_dir():
        return []
    return sorted({int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"(?:decoder_)?(\d+)\.pth", p.name))})


def saved_epochs(exp_dir: str | os.PathLike) -> list[int]:
    """Every numbered snapshot of any checkpoint folder (DeepSDF's or SVR's), ascending."""
    found = set(svr_snapshot_epochs(exp_dir))
    d = Path(exp_dir) / OPTIMIZER_PARAMS_DIR
    if d.is_dir():
        found |= {int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"(\d+)\.pth", p.name))}
    return sorted(found)


def record_epoch(exp_dir: str | os.PathLike, label: str | int) -> int | None:
    """The epoch of checkpoint ``label``: of its resume record (OptimizerParameters), else of its model file
    (a released DeepSDF model, or SVR's decoder file); None when there is no such checkpoint."""
    for path in (checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label),
                 checkpoint_path(exp_dir, MODEL_PARAMS_DIR, label), svr_model_path(exp_dir, "decoder", label)):
        if path.is_file():
            return _checkpoint_epoch(load_torch(path, map_location="cpu"), path)
    return None


# --------------------------------------------------------------------------- torch files, auto-decoder checkpoints

def save_torch(obj: Any, path: str | os.PathLike) -> None:
    """torch.save through atomic_write: the old file or the new one, never a truncated one."""
    with atomic_write(path) as tmp:
        torch_save(obj, tmp)


def load_torch(path: str | os.PathLike, map_location=None) -> Any:
    """torch.load with weights_only=True; MeshSDFError naming the file if missing or unreadable."""
    path = require_file(path, "checkpoint")
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
    is the resume record: it also holds the model and latent states and is renamed FIRST.
    A kill between renames then leaves the new, complete record (resuming uses it alone)
    beside model / code files of the previous save, which inference refuses to mix (see
    ``load_decoder_and_codes``) until the next save; renamed last, the very first save of
    a run could leave a model without a record, and resuming would lose the Adam state.

    Args:
        exp_dir: the experiment folder.
        label: the file name: an epoch number or "latest".
        epoch: the epoch stored in every file.
        model: its state dict goes into ModelParameters/ (and the record).
        optimizer: None writes no record (default).
        latent_codes: an ``nn.Embedding`` or a (K, L) tensor, or None: no LatentCodes/ file (default).
        extra: more record entries (default none).
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
    with contextlib.ExitStack() as stack:  # exits in reverse order: files[0], the resume record, is renamed first
        for kind, obj in reversed(files):
            tmp = stack.enter_context(atomic_write(checkpoint_path(exp_dir, kind, label)))
            torch_save(obj, tmp)


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
    """Load ``ModelParameters/<epoch>.pth`` into ``model``; returns the stored epoch.

    Args:
        exp_dir: the experiment folder.
        model: filled in place; a ``module.`` prefix of the stored keys is stripped.
        epoch: "latest" (default) or an epoch number.
        map_location: as ``torch.load``'s (default None).
    Returns:
        the epoch stored in the file.
    """
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
            if name.endswith(".num_batches_tracked"):  # older torch did not save it; loading fills it in
                continue
            return f"it lacks {name}"
        got = tuple(getattr(stored[name], "shape", ()))
        if got != tuple(value.shape):
            return f"{name} is {got} there but {tuple(value.shape)} for specs.json"
    extra = sorted(set(stored) - set(own))
    return f"it has an extra {extra[0]}" if extra else None


def _check_finite(tensors: Mapping, path) -> None:
    """MeshSDFError naming ``path`` and the first tensor holding NaN or infinity (a diverged training)."""
    for name, t in tensors.items():
        if isinstance(t, torch.Tensor) and t.is_floating_point() and not torch.isfinite(t).all():
            raise MeshSDFError(f"{path} holds NaN or infinite values (in {name!r}): the training that wrote it "
                               "diverged; use an earlier snapshot or retrain with a lower learning rate")


def _load_model(model: torch.nn.Module, state: Mapping, path, part: str | None = None) -> None:
    state = _strip_module_prefix(state)
    _check_finite(state, path)
    difference = _network_difference(model.state_dict(), state)
    if difference is None:
        try:
            model.load_state_dict(state)
            return
        except RuntimeError as err:
            difference = str(err).strip().splitlines()[-1].strip()
    if part == "encoder" or "encoder" in Path(path).name or "encoder." in difference:
        keys = "encoder settings (NormType, Depth, EncoderWidths)"
    else:
        keys = "NetworkSpecs or CodeLength"
    raise MeshSDFError(f"{path} does not match the network of specs.json ({difference}); it was trained with "
                       f"other {keys}; restore those in specs.json or retrain")


def _latent_tensor(codes, path) -> torch.Tensor:
    if isinstance(codes, Mapping):
        codes = _strip_module_prefix(codes).get("weight")
    if not isinstance(codes, torch.Tensor) or codes.dim() not in (2, 3):
        raise MeshSDFError(f"{path} holds no (K, L) latent-code tensor")
    _check_finite({"latent_codes": codes}, path)
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

    Args:
        exp_dir: the experiment folder.
        epoch: "latest" (default) or an epoch number.
        device: where the codes go (default None: the CPU).
    Returns:
        (K, L) float32 codes.
    """
    return _read_latent_codes(exp_dir, epoch)[1].to(device)


def load_decoder(exp_dir: str | os.PathLike, specs: Mapping, epoch: str | int = "latest",
                 device=None) -> torch.nn.Module:
    """The decoder of specs.json with ``ModelParameters/<epoch>.pth`` loaded, in eval mode on ``device``.

    The stored epoch is available as ``decoder.checkpoint_epoch``.

    Args:
        exp_dir: the experiment folder.
        specs: the loaded specs.json (``lib.experiment.load_specs``).
        epoch: "latest" (default) or an epoch number.
        device: where the decoder goes (default None: the CPU).
    Returns:
        the decoder, in eval mode.
    """
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

    Args:
        exp_dir: the experiment folder.
        label: "latest" or an epoch number.
        model: filled in place.
        optimizer: filled in place; None loads the model alone (default).
        latent_codes: an ``nn.Embedding`` filled in place, or None (default).
        map_location: as ``torch.load``'s (default None).
    Returns:
        (the stored epoch, the record's other entries; ``{"fresh_optimizer": True}`` for a released
        model without a record).
    """
    if optimizer is None:
        return load_model_state(exp_dir, model, label, map_location), {}
    path = checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label)
    if not path.is_file():
        if checkpoint_path(exp_dir, MODEL_PARAMS_DIR, label).is_file():
            # a released model (DeepSDF / MeshSDF ship no optimizer state): model + codes, fresh Adam
            return _load_without_record(exp_dir, label, model, latent_codes, map_location), {"fresh_optimizer": True}
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
        state = record["optimizer_state_dict"]
        optimizer.load_state_dict(state)
    except (KeyError, ValueError) as err:
        raise MeshSDFError(f"{path} does not match this optimizer ({err})") from None
    _check_optimizer_shapes(optimizer, path)
    extra = {k: v for k, v in record.items()
             if k not in ("epoch", "optimizer_state_dict", "model_state_dict", "latent_codes")}
    return epoch, extra


def _check_optimizer_shapes(optimizer: torch.optim.Optimizer, path) -> None:
    """Refuse an optimizer state whose per-parameter tensors (Adam's moments) do not have their
    parameter's shape: torch maps saved state to parameters by position only, so a file whose
    parameter order differs (e.g. written by a network that registers its parameters in
    another order) would otherwise feed one layer's moments to another."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            for name, value in optimizer.state.get(p, {}).items():
                if isinstance(value, torch.Tensor) and value.dim() > 0 and tuple(value.shape) != tuple(p.shape):
                    raise MeshSDFError(
                        f"{path}: optimizer state {name!r} of shape {tuple(value.shape)} belongs to no parameter of "
                        f"shape {tuple(p.shape)} at its position (written with another parameter order); move "
                        f"{Path(path).parent.name}/ aside to resume the model and codes with a fresh optimizer")


def _load_without_record(exp_dir, label, model, latent_codes, map_location) -> int:
    epochs = {MODEL_PARAMS_DIR: load_model_state(exp_dir, model, label, map_location)}
    if latent_codes is not None:
        epochs[LATENT_CODES_DIR], codes = _read_latent_codes(exp_dir, label)
        if tuple(codes.shape) != tuple(latent_codes.weight.shape):
            raise MeshSDFError(f"{checkpoint_path(exp_dir, LATENT_CODES_DIR, label)} holds {tuple(codes.shape)} latent "
                               f"codes but the split and CodeLength give {tuple(latent_codes.weight.shape)}; check "
                               "TrainSplit")
        with torch.no_grad():
            latent_codes.weight.copy_(codes)
    return check_same_epoch(exp_dir, label, epochs)


def check_same_epoch(exp_dir: str | os.PathLike, label: str | int, epochs: Mapping[str, int]) -> int:
    """The one epoch of ``{kind: stored epoch}`` (files ``<kind>/<label>.pth``); MeshSDFError when they differ.

    A model and the codes (or encoder) it is used with must come from the same save: mixing
    epochs gives shapes that belong to neither.
    """
    if len(set(epochs.values())) <= 1:
        return next(iter(epochs.values()))
    found = ", ".join(f"{kind}/{label}.pth is epoch {e}" for kind, e in epochs.items())
    snaps = [e for e in snapshot_epochs(exp_dir) if all(checkpoint_path(exp_dir, k, e).is_file() for k in epochs)]
    fix = f"use a snapshot whose files agree ({', '.join(map(str, snaps))})" if snaps else "restore matching files"
    raise MeshSDFError(f"{exp_dir}: {found}: they come from different saves; {fix}, or rewrite them with the "
                       f"training script and --continue {label}")


def load_decoder_and_codes(exp_dir: str | os.PathLike, specs: Mapping, epoch: str | int = "latest",
                           device=None) -> tuple[torch.nn.Module, torch.Tensor]:
    """``load_decoder`` and ``load_latent_codes`` of one checkpoint, checked to be of the same epoch.

    Returns (decoder in eval mode, codes (K, L) float32), both on ``device``.

    Args:
        exp_dir: the experiment folder.
        specs: the loaded specs.json.
        epoch: "latest" (default) or an epoch number.
        device: where both go (default None: the CPU).
    """
    def read():
        decoder = load_decoder(exp_dir, specs, epoch, device)
        code_epoch, codes = _read_latent_codes(exp_dir, epoch)
        return {MODEL_PARAMS_DIR: decoder.checkpoint_epoch, LATENT_CODES_DIR: code_epoch}, (decoder, codes.to(device))

    epochs, loaded = read_while_saved(exp_dir, epoch, read)
    check_same_epoch(exp_dir, epoch, epochs)
    return loaded


WRITER_WAIT_S = 30.0  # how long a reader waits for a running trainer's save to complete


def read_while_saved(exp_dir: str | os.PathLike, label: str | int, read):
    """``read() -> ({file: stored epoch}, value)``, repeated while the epochs differ because a running
    trainer is between the renames of one save (they agree once it ends); returns the last result.

    MeshSDFError naming the writer when its save does not end within ``WRITER_WAIT_S``; epochs that
    differ with no writer running are left to ``check_same_epoch``'s message.

    Args:
        exp_dir: the experiment folder.
        label: the checkpoint read ("latest" or an epoch), for the message.
        read: ``read() -> ({file: stored epoch}, value)``, called again while the epochs differ.
    Returns:
        ``read()``'s last result.
    """
    deadline = time.monotonic() + WRITER_WAIT_S
    while True:
        epochs, value = read()
        if len(set(epochs.values())) <= 1:
            return epochs, value
        writer = active_writer(exp_dir)
        if writer is None:
            return epochs, value
        if time.monotonic() > deadline:
            found = ", ".join(f"{kind if kind.endswith('.pth') else f'{kind}/{label}.pth'} is epoch {e}"
                              for kind, e in epochs.items())
            raise MeshSDFError(f"{exp_dir} is being written by {writer.get('what', 'a training run')} (PID "
                               f"{writer['pid']} on {writer.get('host', '?')}) and its files still differ ({found}) "
                               f"after {WRITER_WAIT_S:g} s; run this again when its save is done, or give a numbered "
                               f"snapshot (have {', '.join(map(str, saved_epochs(exp_dir))) or 'none'})")
        time.sleep(0.1)


# --------------------------------------------------------------------------- single-view reconstruction
#
#   <exp>/ModelParameters/encoder_<e|latest>.pth   {"epoch", "model_state_dict"}, keys "module.<name>"
#   <exp>/ModelParameters/decoder_<e|latest>.pth   the same for the decoder
#   <exp>/OptimizerParameters/<e|latest>.pth       {"epoch", "optimizer_state_dict" (groups: decoder,
#                                                   encoder), + "encoder_state_dict", "decoder_state_dict",
#                                                   RNG states: our resume record}
#
# The original trains both networks inside DataParallel, hence the "module." prefix; this
# project writes it too so that its files load in the original.  Earlier versions of this
# project wrote one ModelParameters/<e>.pth holding "encoder.*" and "decoder.*" keys; it is
# still read.

def _with_module_prefix(state: Mapping[str, torch.Tensor]) -> dict:
    return {(k if k.startswith("module.") else "module." + k): v for k, v in state.items()}


def save_svr_checkpoint(exp_dir: str | os.PathLike, label: str | int, epoch: int, encoder: torch.nn.Module,
                        decoder: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        extra: Mapping[str, Any] | None = None) -> None:
    """Write the original's SVR checkpoint files ``<label>`` (see above), each atomically.

    The optimizer file is the resume record (it holds both networks too) and is renamed
    first, as ``save_checkpoint``'s: a kill between renames leaves the new, complete record.

    Args:
        exp_dir: the experiment folder.
        label: the file label: an epoch number or "latest".
        epoch: the epoch stored in every file.
        encoder, decoder: the networks (their keys are written with a ``module.`` prefix, as the original's).
        optimizer: None writes no record (default).
        extra: more record entries, e.g. RNG states (default none).
    """
    states = {part: net.state_dict() for part, net in zip(SVR_PARTS, (encoder, decoder))}
    with contextlib.ExitStack() as stack:  # exits in reverse order: the record, entered last, is renamed first
        for part, state in states.items():
            tmp = stack.enter_context(atomic_write(svr_model_path(exp_dir, part, label)))
            torch_save({"epoch": epoch, "model_state_dict": _with_module_prefix(state)}, tmp)
        if optimizer is not None:
            record = {"epoch": epoch, "optimizer_state_dict": optimizer.state_dict(),
                      **{f"{part}_state_dict": s for part, s in states.items()}, **(extra or {})}
            torch_save(record, stack.enter_context(atomic_write(checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label))))


def _split_combined(state: Mapping, path) -> dict:
    """``encoder.*`` / ``decoder.*`` keys of an earlier version's combined state dict, by part."""
    state = _strip_module_prefix(state)
    parts = {p: {k[len(p) + 1:]: v for k, v in state.items() if k.startswith(p + ".")} for p in SVR_PARTS}
    if not all(parts.values()):
        raise MeshSDFError(f"{path} holds no encoder and decoder (not an SVR checkpoint); "
                           "give the experiment that train_svr.py wrote")
    return parts


def load_svr_networks(exp_dir: str | os.PathLike, encoder: torch.nn.Module, decoder: torch.nn.Module,
                      epoch: str | int = "latest", map_location=None) -> int:
    """Load the SVR networks of checkpoint ``epoch`` into ``encoder`` and ``decoder``; returns its epoch.

    Reads ``encoder_<epoch>.pth`` and ``decoder_<epoch>.pth`` (the original's files, or
    ours), which must hold the same epoch, else the combined ``<epoch>.pth`` of earlier
    versions.  MeshSDFError when neither exists or a file does not match the specs' networks.

    Args:
        exp_dir: the experiment folder.
        encoder, decoder: filled in place.
        epoch: "latest" (default) or an epoch number.
        map_location: as ``torch.load``'s (default None).
    Returns:
        the stored epoch.
    """
    paths = [svr_model_path(exp_dir, part, epoch) for part in SVR_PARTS]
    combined = checkpoint_path(exp_dir, MODEL_PARAMS_DIR, epoch)
    if not all(p.is_file() for p in paths) and combined.is_file():
        obj = load_torch(combined, map_location)
        stored = _checkpoint_epoch(obj, combined)
        parts = _split_combined(obj.get("model_state_dict", {}), combined)
        _load_model(encoder, parts["encoder"], combined, "encoder")
        _load_model(decoder, parts["decoder"], combined, "decoder")
        return stored
    for p in paths:
        if not p.is_file():
            raise MeshSDFError(_missing_svr_message(exp_dir, p))

    def read():
        objs = [load_torch(p, map_location) for p in paths]
        return {f"{MODEL_PARAMS_DIR}/{p.name}": _checkpoint_epoch(obj, p) for obj, p in zip(objs, paths)}, objs

    found, objs = read_while_saved(exp_dir, epoch, read)
    epochs = list(found.values())
    if epochs[0] != epochs[1]:
        raise MeshSDFError(f"{paths[0]} holds epoch {epochs[0]} but {paths[1]} epoch {epochs[1]}; "
                           f"use a numbered snapshot (have {svr_snapshot_epochs(exp_dir)})")
    for net, obj, p, part in zip((encoder, decoder), objs, paths, SVR_PARTS):
        _load_model(net, obj.get("model_state_dict", {}), p, part)
    return epochs[0]


def load_svr_checkpoint(exp_dir: str | os.PathLike, label: str | int, encoder: torch.nn.Module,
                        decoder: torch.nn.Module, optimizer: torch.optim.Optimizer,
                        map_location=None) -> tuple[int, dict]:
    """Load what ``save_svr_checkpoint`` wrote, for resuming; returns (epoch, other record entries).

    The record's own network states are used when it has them (ours, or the combined
    ``model_state_dict`` of earlier versions); an original's record has none, and then
    the ModelParameters files are read and must hold the record's epoch.

    Args:
        exp_dir: the experiment folder.
        label: "latest" or an epoch number.
        encoder, decoder, optimizer: filled in place.
        map_location: as ``torch.load``'s (default None).
    Returns:
        (the stored epoch, the record's other entries, e.g. "rng_state").
    """
    path = checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label)
    if not path.is_file():
        raise MeshSDFError(_missing_svr_message(exp_dir, path))
    record = load_torch(path, map_location)
    epoch = _checkpoint_epoch(record, path)
    if all(f"{p}_state_dict" in record for p in SVR_PARTS):
        _load_model(encoder, record["encoder_state_dict"], path, "encoder")
        _load_model(decoder, record["decoder_state_dict"], path, "decoder")
    elif "model_state_dict" in record:
        parts = _split_combined(record["model_state_dict"], path)
        _load_model(encoder, parts["encoder"], path, "encoder")
        _load_model(decoder, parts["decoder"], path, "decoder")
    else:
        stored = load_svr_networks(exp_dir, encoder, decoder, label, map_location)
        if stored != epoch:
            raise MeshSDFError(f"checkpoint '{label}' in {exp_dir} is inconsistent (OptimizerParameters {epoch}, "
                               f"ModelParameters {stored}); resume from a numbered snapshot instead "
                               f"(--continue N, have {svr_snapshot_epochs(exp_dir)})")
    try:
        optimizer.load_state_dict(record["optimizer_state_dict"])
    except (KeyError, ValueError) as err:
        raise MeshSDFError(f"{path} does not match this optimizer ({err})") from None
    skip = {"epoch", "optimizer_state_dict", "model_state_dict"} | {f"{p}_state_dict" for p in SVR_PARTS}
    return epoch, {k: v for k, v in record.items() if k not in skip}


# --------------------------------------------------------------------------- Logs.pth

def save_logs(exp_dir: str | os.PathLike, logs: Mapping[str, Any]) -> None:
    """Write ``Logs.pth`` atomically (plain lists/dicts/numbers: loadable with weights_only)."""
    save_torch(dict(logs), logs_path(exp_dir))


def load_logs(exp_dir: str | os.PathLike) -> dict:
    """``Logs.pth`` as a dict, or {} when there is none yet."""
    path = logs_path(exp_dir)
    return dict(load_torch(path)) if path.is_file() else {}


# --------------------------------------------------------------------------- messages

def _trainer_of(exp_dir) -> str:
    """The script that trains this experiment: SVR specs name an encoder."""
    try:
        text = (Path(exp_dir) / "specs.json").read_text(encoding="utf-8-sig")
        specs = json.loads(text)
    except (OSError, ValueError):
        specs = {}
    svr = isinstance(specs, dict) and any(k in specs for k in ("NetworkEncoder", "Encoder", "NumberOfViews"))
    return "train_svr.py" if svr else "train_deep_sdf.py"


def _missing_checkpoint_message(exp_dir, path) -> str:
    path = Path(path)
    if path.is_dir():
        return f"{path} is a folder, not a checkpoint file; move it away"
    kind, label = path.parent.name, path.stem
    model = checkpoint_path(exp_dir, MODEL_PARAMS_DIR, label)
    if kind == LATENT_CODES_DIR and model.is_file():
        return (f"{path} is missing but {model} exists: the latent codes of that model were not copied; copy "
                f"{LATENT_CODES_DIR}/{label}.pth from where the model came from, or retrain")
    have = snapshot_epochs(exp_dir)
    latest = checkpoint_path(exp_dir, MODEL_PARAMS_DIR, "latest").is_file()
    options = (["latest"] if latest else []) + [str(e) for e in have]
    if options:
        hint = f"available: {', '.join(options)}"
    else:
        hint = _backup_hint(exp_dir) or f"train it first with {_trainer_of(exp_dir)} -e {exp_dir}"
    return f"checkpoint not found: {path}; {hint}"


def _missing_svr_message(exp_dir, path) -> str:
    if Path(path).is_dir():
        return f"{path} is a folder, not a checkpoint file; move it away"
    options = (["latest"] if svr_model_path(exp_dir, "decoder", "latest").is_file()
               or checkpoint_path(exp_dir, MODEL_PARAMS_DIR, "latest").is_file() else [])
    options += [str(e) for e in svr_snapshot_epochs(exp_dir)]
    hint = (f"available: {', '.join(options)}" if options else
            _backup_hint(exp_dir) or "train it first with train_svr.py")
    return f"checkpoint not found: {path}; {hint}"


def _backup_hint(exp_dir) -> str | None:
    """Where ``--overwrite`` put the newest earlier model of ``exp_dir``, in words (None: no backup)."""
    backups = Path(exp_dir) / BACKUPS_DIR
    found = sorted((p for p in backups.iterdir() if (p / MODEL_PARAMS_DIR).is_dir()), key=lambda p: p.stat().st_mtime) \
        if backups.is_dir() else []
    if not found:
        return None
    return (f"--overwrite moved the previous model into {found[-1]}: move its folders back into {exp_dir} to use it, "
            f"or train a new one with {_trainer_of(exp_dir)} -e {exp_dir}")
