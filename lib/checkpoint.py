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
from lib.io import atomic_write, require_file, torch_save

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
        # a folder where a checkpoint file goes would fail its save after the epochs of work
        blocked = [p for p in ((*d.glob("*.pth"),) if d != exp_dir else (logs_path(exp_dir),)) if p.is_dir()]
        if blocked:
            raise MeshSDFError(f"{blocked[0]} is a folder where a checkpoint file is written; move it away")
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
    """
    decoder = load_decoder(exp_dir, specs, epoch, device)
    code_epoch, codes = _read_latent_codes(exp_dir, epoch)
    check_same_epoch(exp_dir, epoch, {MODEL_PARAMS_DIR: decoder.checkpoint_epoch, LATENT_CODES_DIR: code_epoch})
    return decoder, codes.to(device)


def _trainer_of(exp_dir) -> str:
    """The script that trains this experiment: SVR specs name an encoder."""
    import json

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
        hint = f"train it first with {_trainer_of(exp_dir)} -e {exp_dir}"
    return f"checkpoint not found: {path}; {hint}"


def save_logs(exp_dir: str | os.PathLike, logs: Mapping[str, Any]) -> None:
    """Write ``Logs.pth`` atomically (plain lists/dicts/numbers: loadable with weights_only)."""
    save_torch(dict(logs), logs_path(exp_dir))


def load_logs(exp_dir: str | os.PathLike) -> dict:
    """``Logs.pth`` as a dict, or {} when there is none yet."""
    path = logs_path(exp_dir)
    return dict(load_torch(path)) if path.is_file() else {}



# --------------------------------------------------------------------------- one writer, nothing lost

LOCK_FILE = ".meshsdf.lock"
BACKUPS_DIR = "Backups"
# what a training run writes and a fresh start would replace: moved aside by --overwrite
TRAINING_OUTPUTS = (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR, LOGS_FILE, RECONSTRUCTIONS_DIR, "Results")
# atomic_write's temporaries: ".<name>.<8 random chars>.tmp<suffix>"
_TEMP_NAME = re.compile(r"\..+\.[A-Za-z0-9_]{8}\.tmp(\.[A-Za-z0-9]+)?")


def _process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live holder from a new process that reuses its PID)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _alive(pid: int, start: str | None) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return start is None or _process_start(pid) in (None, start)


class ExperimentLock:
    """``<exp>/.meshsdf.lock`` naming the PID and host of the one process that writes the experiment.

    Context manager.  Taking it when another live process holds it raises MeshSDFError
    naming the holder; a lock left by a dead process of this host (a SIGKILL, a crash) is
    taken over with a message.  A lock of another host cannot be checked: the message says
    which file to delete once that run is known to be gone.  The file is created complete
    (written aside, then hard-linked into place, which fails if it exists), so a reader
    never sees a half-written lock.
    """

    def __init__(self, exp_dir: str | os.PathLike, what: str = "a training run"):
        self.path = Path(exp_dir) / LOCK_FILE
        self.what = what
        self.held = False

    def _record(self) -> dict:
        import socket
        import time

        return {"pid": os.getpid(), "host": socket.gethostname(), "start": _process_start(os.getpid()),
                "what": self.what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _holder(self) -> dict | None:
        import json

        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "ExperimentLock":
        import json
        import socket

        import tempfile

        from lib.log import info

        record = json.dumps(self._record())
        for _ in range(3):
            try:
                fd, tmp = tempfile.mkstemp(prefix=f"{self.path.name}.", suffix=".tmp", dir=self.path.parent)
            except OSError as err:
                raise MeshSDFError(f"cannot create the lock {self.path}: {err.strerror or err}; check that the "
                                   "experiment folder is writable") from None
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(record)
                os.link(tmp, self.path)  # atomic and exclusive: fails when a lock exists
                self.held = True
                return self
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            holder = self._holder()
            if holder is None:  # released meanwhile
                continue
            if not holder:
                raise MeshSDFError(f"{self.path} exists but cannot be read; if no other run uses {self.path.parent}, "
                                   "delete it")
            here = holder.get("host") == socket.gethostname()
            if here and not _alive(holder["pid"], holder.get("start")):
                if self._remove_if_unchanged(holder):
                    info(f"taking over the lock of {holder.get('what', 'a run')} (PID {holder['pid']}, "
                         f"since {holder.get('since', '?')}), which is no longer running")
                continue
            where = f"PID {holder['pid']} on {holder.get('host', '?')}"
            fix = ("wait for it to finish or stop it" if here else
                   f"wait for it to finish; if it is gone, delete {self.path}")
            raise MeshSDFError(f"{self.path.parent} is in use by {holder.get('what', 'another run')} ({where}, "
                               f"since {holder.get('since', '?')}); {fix}")
        raise MeshSDFError(f"cannot take the lock {self.path}: other runs keep taking it")

    def _remove_if_unchanged(self, stale: dict) -> bool:
        """Delete the lock if it still holds ``stale``; two runs taking over one stale lock
        check and delete in turn (flock on the folder), so only one of them removes it."""
        import fcntl

        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._holder() != stale:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            os.close(fd)  # releases the flock

    def release(self) -> None:
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> "ExperimentLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def remove_stale_temporaries(exp_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of interrupted atomic writes (``.latest.pth.<random>.tmp.pth``, left by a
    SIGKILL mid-save) in the experiment folder and its checkpoint folders; returns them.

    Only call it holding the ``ExperimentLock``: then no other process is writing there.
    """
    exp_dir = Path(exp_dir)
    removed = []
    for d in (exp_dir, *(exp_dir / k for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR))):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            if _TEMP_NAME.fullmatch(p.name) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def trained_files(exp_dir: str | os.PathLike) -> list[Path]:
    """What a training run left in ``exp_dir`` (checkpoints, Logs.pth), temporaries excluded."""
    exp_dir = Path(exp_dir)
    found = []
    for kind in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR):
        d = exp_dir / kind
        if d.is_dir():
            found += sorted(p for p in d.iterdir() if p.suffix == ".pth" and not p.name.startswith("."))
    if logs_path(exp_dir).is_file():
        found.append(logs_path(exp_dir))
    return found


def move_aside(exp_dir: str | os.PathLike, names: tuple[str, ...] = TRAINING_OUTPUTS) -> Path | None:
    """Move ``names`` (files or folders of ``exp_dir``) into a new ``<exp>/Backups/<UTC time>/``.

    Renames only (nothing is copied or deleted); returns the backup folder, None when there
    was nothing to move.
    """
    import time

    exp_dir = Path(exp_dir)
    present = [n for n in names if (exp_dir / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    backup = exp_dir / BACKUPS_DIR / stamp
    k = 1
    while backup.exists():
        k += 1
        backup = exp_dir / BACKUPS_DIR / f"{stamp}-{k}"
    try:
        backup.mkdir(parents=True)
        for n in present:
            os.rename(exp_dir / n, backup / n)
    except OSError as err:
        raise MeshSDFError(f"cannot move the old files of {exp_dir} into {backup}: {err.strerror or err}; "
                           "nothing was deleted") from None
    return backup


@contextlib.contextmanager
def claim_experiment(exp_dir: str | os.PathLike, resume: str | int | None, overwrite: bool = False,
                     what: str = "a training run", main: bool = True):
    """Everything a training script does before writing into ``exp_dir``; a context manager.

    On the main process: take the ``ExperimentLock`` (held until the block ends), delete the
    stale temporaries of killed saves, and guard the trained files: without ``resume``
    they stop the run (MeshSDFError: resume with ``--continue latest`` or start afresh with
    ``--overwrite``); with ``overwrite`` they are moved into ``<exp>/Backups/<time>/`` first.
    Other processes of a torchrun job only pass through (rank 0 alone writes).
    """
    if resume is not None and overwrite:
        raise MeshSDFError("--overwrite starts afresh and --continue resumes: give one of them")
    if not main:
        yield
        return
    from lib.log import info

    with ExperimentLock(exp_dir, what):
        stale = remove_stale_temporaries(exp_dir)
        if stale:
            info(f"removed {len(stale)} temporary file(s) left by an interrupted save ({stale[0].name}, ...)")
        existing = trained_files(exp_dir)
        if existing and resume is None:
            if not overwrite:
                shown = ", ".join(str(p.relative_to(exp_dir)) for p in existing[:2])
                more = f" and {len(existing) - 2} more" if len(existing) > 2 else ""
                raise MeshSDFError(f"{exp_dir} already holds a trained model ({shown}{more}); resume it with "
                                   "--continue latest, or pass --overwrite to start afresh (the old files are "
                                   f"moved into {Path(exp_dir) / BACKUPS_DIR}/, not deleted)")
            backup = move_aside(exp_dir)
            info(f"--overwrite: moved the previous training files into {backup}")
        yield


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

SVR_PARTS = ("encoder", "decoder")


def svr_model_path(exp_dir: str | os.PathLike, part: str, epoch: str | int) -> Path:
    """``<exp>/ModelParameters/<part>_<epoch|latest>.pth`` for part in "encoder", "decoder"."""
    return Path(exp_dir) / MODEL_PARAMS_DIR / f"{part}_{epoch}.pth"


def _with_module_prefix(state: Mapping[str, torch.Tensor]) -> dict:
    return {(k if k.startswith("module.") else "module." + k): v for k, v in state.items()}


def save_svr_checkpoint(exp_dir: str | os.PathLike, label: str | int, epoch: int, encoder: torch.nn.Module,
                        decoder: torch.nn.Module, optimizer: torch.optim.Optimizer | None = None,
                        extra: Mapping[str, Any] | None = None) -> None:
    """Write the original's SVR checkpoint files ``<label>`` (see above), each atomically.

    The optimizer file is the resume record (it holds both networks too) and is renamed
    first, as ``save_checkpoint``'s: a kill between renames leaves the new, complete record.
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
    objs = [load_torch(p, map_location) for p in paths]
    epochs = [_checkpoint_epoch(obj, p) for obj, p in zip(objs, paths)]
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


def svr_snapshot_epochs(exp_dir: str | os.PathLike) -> list[int]:
    """Numbered SVR snapshots (``decoder_<e>.pth``, or an earlier version's ``<e>.pth``), ascending."""
    d = Path(exp_dir) / MODEL_PARAMS_DIR
    if not d.is_dir():
        return []
    return sorted({int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"(?:decoder_)?(\d+)\.pth", p.name))})


def _missing_svr_message(exp_dir, path) -> str:
    if Path(path).is_dir():
        return f"{path} is a folder, not a checkpoint file; move it away"
    options = (["latest"] if svr_model_path(exp_dir, "decoder", "latest").is_file()
               or checkpoint_path(exp_dir, MODEL_PARAMS_DIR, "latest").is_file() else [])
    options += [str(e) for e in svr_snapshot_epochs(exp_dir)]
    hint = f"available: {', '.join(options)}" if options else "train it first with train_svr.py"
    return f"checkpoint not found: {path}; {hint}"
