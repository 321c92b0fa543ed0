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
from lib.io import atomic_write, marked_tempfile, temporary_writer

MODEL_PARAMS_DIR = "ModelParameters"
OPTIMIZER_PARAMS_DIR = "OptimizerParameters"
LATENT_CODES_DIR = "LatentCodes"
LOGS_FILE = "Logs.pth"
RECONSTRUCTIONS_DIR = "Reconstructions"


def parse_epoch(value: str | int, flag: str = "--continue") -> str | int:
    """The value of the checkpoint flag ``flag``: "latest" or a positive epoch number."""
    if value == "latest":
        return "latest"
    try:
        epoch = int(value)
    except (TypeError, ValueError):
        raise MeshSDFError(f"{flag} takes 'latest' or an epoch number, got {value!r}") from None
    if epoch < 1:
        raise MeshSDFError(f"{flag} epoch must be >= 1, got {epoch}")
    return epoch


def epoch_type(flag: str):
    """argparse ``type=`` for the checkpoint flag ``flag`` (its errors name that flag)."""
    return lambda value: parse_epoch(value, flag)


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
            if name.endswith(".num_batches_tracked"):  # older torch did not save it; loading fills it in
                continue
            return f"it lacks {name}"
        got = tuple(getattr(stored[name], "shape", ()))
        if got != tuple(value.shape):
            return f"{name} is {got} there but {tuple(value.shape)} for specs.json"
    extra = sorted(set(stored) - set(own))
    return f"it has an extra {extra[0]}" if extra else None


def _load_model(model: torch.nn.Module, state: Mapping, path, part: str | None = None) -> None:
    state = _strip_module_prefix(state)
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
    def read():
        decoder = load_decoder(exp_dir, specs, epoch, device)
        code_epoch, codes = _read_latent_codes(exp_dir, epoch)
        return {MODEL_PARAMS_DIR: decoder.checkpoint_epoch, LATENT_CODES_DIR: code_epoch}, (decoder, codes.to(device))

    epochs, loaded = read_while_saved(exp_dir, epoch, read)
    check_same_epoch(exp_dir, epoch, epochs)
    return loaded


WRITER_WAIT_S = 30.0  # how long a reader waits for a running trainer's save to complete


def active_writer(exp_dir: str | os.PathLike) -> dict | None:
    """The lock record of the run writing ``exp_dir`` now (see ``ExperimentLock``), None when there is none
    (a lock of another host counts as live: it cannot be checked)."""
    import socket

    holder = ExperimentLock(exp_dir)._holder()
    if not holder:
        return None
    if holder.get("host") == socket.gethostname() and not _alive(holder["pid"], holder.get("start")):
        return None
    return holder


def read_while_saved(exp_dir: str | os.PathLike, label: str | int, read):
    """``read() -> ({file: stored epoch}, value)``, repeated while the epochs differ because a running
    trainer is between the renames of one save (they agree once it ends); returns the last result.

    MeshSDFError naming the writer when its save does not end within ``WRITER_WAIT_S``; epochs that
    differ with no writer running are left to ``check_same_epoch``'s message.
    """
    import time

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


def _backup_hint(exp_dir) -> str | None:
    """Where ``--overwrite`` put the newest earlier model of ``exp_dir``, in words (None: no backup)."""
    backups = Path(exp_dir) / BACKUPS_DIR
    found = sorted((p for p in backups.iterdir() if (p / MODEL_PARAMS_DIR).is_dir()), key=lambda p: p.stat().st_mtime) \
        if backups.is_dir() else []
    if not found:
        return None
    return (f"--overwrite moved the previous model into {found[-1]}: move its folders back into {exp_dir} to use it, "
            f"or train a new one with {_trainer_of(exp_dir)} -e {exp_dir}")


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
OPTIMIZATIONS_DIR = "Optimizations"  # demo_optimizer.py's default output
# every output of a model (training files and what the other commands made of them): moved aside by --overwrite,
# with the earlier outputs that lib.io.staged_dir kept beside them (<name>.previous-<time>, <name>.incomplete-<time>)
TRAINING_OUTPUTS = (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR, LOGS_FILE, RECONSTRUCTIONS_DIR,
                    OPTIMIZATIONS_DIR, "Results")


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

        from lib.log import info

        record = json.dumps(self._record())
        for _ in range(3):
            try:
                fd, tmp = marked_tempfile(self.path.parent, self.path.name)
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
    """Delete the temporaries of interrupted writes (``.latest.pth.meshsdf-tmp-<pid>-<random>.tmp.pth``, left
    by a SIGKILL mid-save) in the experiment folder and its checkpoint folders; returns them.

    Only files with this project's mark (``lib.io.marked_tempfile``) whose writer is no longer
    running are removed: a user's ``.notes.tmp.txt`` never is, nor the lock temporary of a
    run starting right now.  Call it holding the ``ExperimentLock``.
    """
    exp_dir = Path(exp_dir)
    removed = []
    for d in (exp_dir, *(exp_dir / k for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR))):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            pid = temporary_writer(p.name)
            if pid is not None and not _alive(pid, None) and p.is_file():
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


def model_outputs(exp_dir: str | os.PathLike) -> list[str]:
    """Names of the entries of ``exp_dir`` that belong to its model: ``TRAINING_OUTPUTS`` and the
    ``<output>.previous-<time>`` / ``<output>.incomplete-<time>`` folders kept beside them."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    kept = re.compile("(" + "|".join(map(re.escape, TRAINING_OUTPUTS)) + r")\.(previous|incomplete)-.+")
    return sorted(p.name for p in exp_dir.iterdir() if p.name in TRAINING_OUTPUTS or kept.fullmatch(p.name))


def move_aside(exp_dir: str | os.PathLike, names: tuple[str, ...] | None = None) -> Path | None:
    """Move ``names`` (files or folders of ``exp_dir``; default: every ``model_outputs``) into a new
    ``<exp>/Backups/<UTC time>/``.

    Renames only (nothing is copied or deleted); returns the backup folder, None when there
    was nothing to move.
    """
    import time

    exp_dir = Path(exp_dir)
    names = model_outputs(exp_dir) if names is None else names
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


def record_epoch(exp_dir: str | os.PathLike, label: str | int) -> int | None:
    """The epoch of checkpoint ``label``: of its resume record (OptimizerParameters), else of its model file
    (a released DeepSDF model, or SVR's decoder file); None when there is no such checkpoint."""
    for path in (checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label),
                 checkpoint_path(exp_dir, MODEL_PARAMS_DIR, label), svr_model_path(exp_dir, "decoder", label)):
        if path.is_file():
            return _checkpoint_epoch(load_torch(path, map_location="cpu"), path)
    return None


def saved_epochs(exp_dir: str | os.PathLike) -> list[int]:
    """Every numbered snapshot of any checkpoint folder (DeepSDF's or SVR's), ascending."""
    found = set(svr_snapshot_epochs(exp_dir))
    d = Path(exp_dir) / OPTIMIZER_PARAMS_DIR
    if d.is_dir():
        found |= {int(m.group(1)) for p in d.iterdir() if (m := re.fullmatch(r"(\d+)\.pth", p.name))}
    return sorted(found)


def _check_resume(exp_dir: Path, resume: str | int | None, last_epoch: int | None, epochs_flag: bool) -> int:
    """The epoch a run resuming from ``resume`` starts after (0: a fresh start); MeshSDFError when the run
    would rewrite a newer ``latest`` or snapshot, or when ``--epochs`` leaves nothing to train."""
    latest = record_epoch(exp_dir, "latest") if resume is not None else None
    start = latest or 0 if resume == "latest" else resume or 0
    if isinstance(resume, int):
        newest = max([latest or 0, *saved_epochs(exp_dir)])
        names = (f"{resume}.pth", *(f"{part}_{resume}.pth" for part in SVR_PARTS))
        files = ", ".join(f"{k}/{n}" for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR) for n in names
                          if (exp_dir / k / n).is_file())
        if resume < newest and files:  # (a snapshot that does not exist: the loader's message lists those that do)
            raise MeshSDFError(f"--continue {resume} in {exp_dir} would overwrite the newer epoch {newest} (latest, "
                               f"its snapshots and {LOGS_FILE}); nothing was changed: go on from there with "
                               f"--continue latest, or to branch from epoch {resume} copy specs.json, {LOGS_FILE} "
                               f"and {files} into a new experiment folder and run --continue {resume} there")
    if epochs_flag and last_epoch is not None and start >= last_epoch:
        raise MeshSDFError(f"nothing to train: {exp_dir} is at epoch {start} and --epochs {last_epoch} ends at or "
                           f"before it; "
                           f"pass --epochs {start + 1} or more to train further (nothing was changed)")
    return start


def _deepsdf_model(exp_dir: Path) -> bool:
    """Whether ``exp_dir`` holds an auto-decoder's files (latent codes: SVR training writes none)."""
    d = exp_dir / LATENT_CODES_DIR
    return d.is_dir() and any(p.suffix == ".pth" and not p.name.startswith(".") for p in d.iterdir())


class Claim:
    """What ``claim_experiment`` yields: ``start_epoch``, the epoch the run starts after (main process
    only, else None), and ``clear()``, which moves the old model's outputs aside for ``--overwrite``."""

    def __init__(self, exp_dir: Path, overwrite: bool, start_epoch: int | None):
        self.exp_dir, self.overwrite, self.start_epoch = exp_dir, overwrite, start_epoch
        self.backup: Path | None = None

    def clear(self) -> None:
        """With ``--overwrite`` on the main process: move every output of the old model into
        ``<exp>/Backups/<time>/``.  Call it once every input is validated, right before training."""
        from lib.log import info

        if self.overwrite and self.start_epoch is not None and self.backup is None:
            self.backup = move_aside(self.exp_dir)
            if self.backup is not None:
                info(f"--overwrite: moved the previous training files into {self.backup}")


@contextlib.contextmanager
def claim_experiment(exp_dir: str | os.PathLike, resume: str | int | None, overwrite: bool = False,
                     what: str = "a training run", main: bool = True, *, svr: bool = False,
                     last_epoch: int | None = None, epochs_flag: bool = False):
    """Everything a training script checks before writing into ``exp_dir``; a context manager yielding a ``Claim``.

    On the main process: take the ``ExperimentLock`` (held until the block ends), delete the
    stale temporaries of killed saves, and guard the trained files: without ``resume``
    they stop the run (MeshSDFError: resume with ``--continue latest`` or start afresh with
    ``--overwrite``); with ``overwrite`` they are moved into ``<exp>/Backups/<time>/`` by
    ``Claim.clear``, which the script calls once all its inputs are validated.  A numbered
    ``resume`` older than the newest checkpoint is refused (training from it would rewrite
    ``latest``); so is ``epochs_flag`` (``--epochs`` given) with ``last_epoch`` at or below the
    epoch resumed.  ``svr``: the run is train_svr.py, which refuses an auto-decoder's experiment.
    Other processes of a torchrun job only pass through (rank 0 alone writes).
    """
    if resume is not None and overwrite:
        raise MeshSDFError("--overwrite starts afresh and --continue resumes: give one of them")
    exp_dir = Path(exp_dir)
    if not main:
        yield Claim(exp_dir, overwrite, None)
        return
    from lib.log import info

    with ExperimentLock(exp_dir, what):
        stale = remove_stale_temporaries(exp_dir)
        if stale:
            info(f"removed {len(stale)} temporary file(s) left by an interrupted save ({stale[0].name}, ...)")
        if svr and _deepsdf_model(exp_dir):
            raise MeshSDFError(f"{exp_dir} holds a DeepSDF auto-decoder model ({LATENT_CODES_DIR}/, "
                               f"{MODEL_PARAMS_DIR}/), not a single-view reconstruction one; train_svr.py needs an "
                               "experiment folder of its own: put the SVR specs.json into a new folder and run "
                               "train_svr.py -e on it (to start from that decoder, set DecoderInit to this folder)")
        existing = trained_files(exp_dir)
        if existing and resume is None and not overwrite:
            shown = ", ".join(str(p.relative_to(exp_dir)) for p in existing[:2])
            more = f" and {len(existing) - 2} more" if len(existing) > 2 else ""
            raise MeshSDFError(f"{exp_dir} already holds a trained model ({shown}{more}); resume it with "
                               "--continue latest, or pass --overwrite to start afresh (the old files are "
                               f"moved into {exp_dir / BACKUPS_DIR}/, not deleted)")
        start = _check_resume(exp_dir, resume, last_epoch, epochs_flag)
        yield Claim(exp_dir, overwrite and bool(existing or model_outputs(exp_dir)), start)


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
            torch.save({"epoch": epoch, "model_state_dict": _with_module_prefix(state)}, tmp)
        if optimizer is not None:
            record = {"epoch": epoch, "optimizer_state_dict": optimizer.state_dict(),
                      **{f"{part}_state_dict": s for part, s in states.items()}, **(extra or {})}
            torch.save(record, stack.enter_context(atomic_write(checkpoint_path(exp_dir, OPTIMIZER_PARAMS_DIR, label))))


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
    options = (["latest"] if svr_model_path(exp_dir, "decoder", "latest").is_file()
               or checkpoint_path(exp_dir, MODEL_PARAMS_DIR, "latest").is_file() else [])
    options += [str(e) for e in svr_snapshot_epochs(exp_dir)]
    hint = (f"available: {', '.join(options)}" if options else
            _backup_hint(exp_dir) or "train it first with train_svr.py")
    return f"checkpoint not found: {path}; {hint}"
