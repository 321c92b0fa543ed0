"""Logs.pth: the training histories a run keeps, resumes and writes.

``new_logs`` / ``append_epoch_logs`` / ``truncate_logs`` / ``deepsdf_logs`` work on the dict
itself; ``TrainingLog`` is a run's history: read back and truncated when resuming, one entry
per epoch, written beside the checkpoints (the file is ``lib.experiment.checkpoints``').
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..experiment import LOGS_FILE, load_logs, logs_path, move_aside, save_logs
from ..log import info

__all__ = ["new_logs", "append_epoch_logs", "deepsdf_logs", "truncate_logs", "TrainingLog"]


def new_logs() -> dict:
    """Logs.pth content (DeepSDF keys + ``loss_epoch``/``log_epochs`` to truncate on resume).

    loss, loss_epoch: per step; log_epochs, learning_rate ([decoder, latent]), timing
    (seconds), latent_magnitude (mean code norm), param_magnitude {name: [norm]}: per epoch.
    """
    return {"epoch": 0, "loss": [], "loss_epoch": [], "log_epochs": [], "learning_rate": [], "timing": [],
            "latent_magnitude": [], "param_magnitude": {}}


def append_epoch_logs(logs: dict, epoch: int, losses: Sequence[float], rates: Sequence[float], seconds: float,
                      codes: torch.Tensor | float, model: nn.Module) -> None:
    """Add one epoch: step losses, rates, seconds, mean code norm and parameter norms.

    ``codes``: the (K, L) codes whose mean L2 norm is logged, or that mean already computed
    (a trainer whose codes are spread over ranks reduces it first).

    Args:
        logs: the dict of ``new_logs``, extended in place.
        epoch: the epoch just trained.
        losses: its step losses.
        rates: its learning rates, one per param group.
        seconds: its duration.
        codes: see above.
        model: the trained network (one norm per parameter).
    """
    logs["epoch"] = epoch
    logs["loss"].extend(float(v) for v in losses)
    logs["loss_epoch"].extend([epoch] * len(losses))
    logs["log_epochs"].append(epoch)
    logs["learning_rate"].append([float(r) for r in rates])
    logs["timing"].append(float(seconds))
    with torch.no_grad():
        magnitude = codes.detach().norm(dim=1).mean() if isinstance(codes, torch.Tensor) else codes
        logs["latent_magnitude"].append(float(magnitude))
        for name, p in model.named_parameters():
            logs["param_magnitude"].setdefault(name, []).append(float(p.detach().norm()))


def deepsdf_logs(logs: Mapping) -> dict:
    """A DeepSDF-style Logs.pth ({"epoch", "loss"} per step, optionally "learning_rate",
    "timing", "latent_magnitude" and "param_magnitude" per epoch) in this project's form.

    Steps are attributed to epochs evenly (DeepSDF runs the same number of batches every
    epoch); per-epoch lists whose length is not the epoch count are dropped rather than
    misaligned.  Returns {} for anything else.
    """
    try:
        epoch, loss = int(logs["epoch"]), [float(v) for v in logs["loss"]]
    except (KeyError, TypeError, ValueError):
        return {}
    out = new_logs()
    out["epoch"], out["loss"] = epoch, loss
    per = len(loss) // epoch if epoch > 0 and len(loss) % epoch == 0 else None
    out["loss_epoch"] = [i // per + 1 for i in range(len(loss))] if per else [epoch] * len(loss)
    out["log_epochs"] = list(range(1, epoch + 1))
    for key in ("learning_rate", "timing", "latent_magnitude"):
        values = logs.get(key)
        out[key] = list(values) if isinstance(values, list) and len(values) == epoch else [None] * epoch
    mags = logs.get("param_magnitude")
    if isinstance(mags, Mapping):
        out["param_magnitude"] = {k: list(v) for k, v in mags.items() if isinstance(v, list) and len(v) == epoch}
    return out


def truncate_logs(logs: Mapping, epoch: int) -> dict:
    """Logs as they were after ``epoch`` (resume from an earlier snapshot drops later entries).

    Logs of DeepSDF / the original MeshSDF lack our per-step epoch record; they are adopted
    (``deepsdf_logs``) so that resuming one of their runs keeps its history.

    Args:
        logs: Logs.pth content (this project's form or DeepSDF's).
        epoch: the last epoch kept.
    Returns:
        a new dict in ``new_logs``'s form.
    """
    if logs and "log_epochs" not in logs:
        logs = deepsdf_logs(logs)
    if not logs or "log_epochs" not in logs:
        return new_logs()
    out = new_logs()
    keep_step = [i for i, e in enumerate(logs["loss_epoch"]) if e <= epoch]
    keep_epoch = [i for i, e in enumerate(logs["log_epochs"]) if e <= epoch]
    out["epoch"] = min(int(logs["epoch"]), epoch)
    out["loss"] = [logs["loss"][i] for i in keep_step]
    out["loss_epoch"] = [logs["loss_epoch"][i] for i in keep_step]
    for key in ("log_epochs", "learning_rate", "timing", "latent_magnitude"):
        out[key] = [logs[key][i] for i in keep_epoch]
    out["param_magnitude"] = {k: [v[i] for i in keep_epoch] for k, v in logs["param_magnitude"].items()}
    return out


class TrainingLog:
    """One run's Logs.pth content (``logs``, a dict as ``new_logs``): resumed, extended per epoch, saved.

    Args:
        exp_dir: the experiment folder whose Logs.pth this is.
        main: whether this process writes files (rank 0); other ranks keep the history in memory only.
    """

    def __init__(self, exp_dir: str | os.PathLike, main: bool = True):
        self.exp_dir = Path(exp_dir)
        self.main = main
        self.logs = new_logs()

    def resume(self, epoch: int) -> None:
        """The history as it was after ``epoch`` (the checkpoint resumed); a Logs.pth not in this
        project's form (e.g. DeepSDF's) is moved aside on the main process and kept there."""
        logs = load_logs(self.exp_dir)
        if logs and "log_epochs" not in logs and self.main:
            # another trainer's Logs.pth (e.g. DeepSDF's): keep it, this run starts its own history
            kept = move_aside(self.exp_dir, (LOGS_FILE,))
            info(f"{logs_path(self.exp_dir)} is not in this project's form; moved it into {kept}")
        self.logs = truncate_logs(logs, epoch)

    def add_epoch(self, epoch: int, losses: Sequence[float], rates: Sequence[float], seconds: float,
                  codes: torch.Tensor | float, model: nn.Module) -> None:
        """One epoch's entries (see ``append_epoch_logs``)."""
        append_epoch_logs(self.logs, epoch, losses, rates, seconds, codes, model)

    def save(self) -> None:
        """Write Logs.pth atomically (main process only)."""
        if self.main:
            save_logs(self.exp_dir, self.logs)
