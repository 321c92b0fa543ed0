"""When things happen in a training run, as functions of the epoch number only (epochs count from 1).

``TrainSettings`` (the specs values a trainer needs, and which epochs keep a snapshot),
learning-rate schedules (``LearningRateSchedule`` entries), the code-regularisation ramp
and which checkpoints are due after an epoch.  Because none of them depends on anything but
the epoch, a run resumed from a checkpoint continues as the uninterrupted run would have.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..errors import MeshSDFError

__all__ = ["TrainSettings", "StepSchedule", "WarmupSchedule", "ConstantSchedule", "make_schedule",
           "schedules_from_specs", "set_learning_rates", "code_reg_weight", "checkpoints_due"]


@dataclass(frozen=True)
class TrainSettings:
    """The specs values the loop needs (see lib.experiment.specs.DEEPSDF_KEYS for their meaning)."""

    num_epochs: int
    snapshot_frequency: int | None  # None: no periodic snapshots
    additional_snapshots: tuple[int, ...]
    log_frequency: int
    samples_per_scene: int
    scenes_per_batch: int
    clamp_distance: float
    code_regularization: bool
    code_reg_lambda: float
    code_bound: float | None
    code_init_std: float
    grad_clip_norm: float | None

    @classmethod
    def from_specs(cls, specs: Mapping, num_epochs: int | None = None) -> "TrainSettings":
        """``num_epochs`` overrides NumEpochs (short runs); everything else follows the specs."""
        return cls(
            num_epochs=int(num_epochs if num_epochs is not None else specs["NumEpochs"]),
            snapshot_frequency=None if specs["SnapshotFrequency"] is None else int(specs["SnapshotFrequency"]),
            additional_snapshots=tuple(int(e) for e in specs["AdditionalSnapshots"]),
            log_frequency=int(specs["LogFrequency"]),
            samples_per_scene=int(specs["SamplesPerScene"]),
            scenes_per_batch=int(specs["ScenesPerBatch"]),
            clamp_distance=float(specs["ClampingDistance"]),
            code_regularization=bool(specs["CodeRegularization"]),
            code_reg_lambda=float(specs["CodeRegularizationLambda"]),
            # the original reads CodeBound and ignores it; ApplyCodeBound (ours) applies it
            code_bound=(float(specs["CodeBound"]) if specs["ApplyCodeBound"] and specs["CodeBound"] is not None
                        else None),
            code_init_std=float(specs["CodeInitStdDev"]),
            grad_clip_norm=None if specs["GradientClipNorm"] is None else float(specs["GradientClipNorm"]),
        )

    def is_snapshot(self, epoch: int) -> bool:
        """Whether ``ModelParameters/<epoch>.pth`` (and friends) is kept after ``epoch``."""
        periodic = self.snapshot_frequency is not None and epoch % self.snapshot_frequency == 0
        return periodic or epoch in self.additional_snapshots


@dataclass(frozen=True)
class StepSchedule:
    """initial * factor ** (epoch // interval)."""

    initial: float
    interval: int
    factor: float

    def __call__(self, epoch: int) -> float:
        return self.initial * self.factor ** (epoch // self.interval)


@dataclass(frozen=True)
class WarmupSchedule:
    """Linear from initial to final over ``length`` epochs, then final."""

    initial: float
    final: float
    length: int

    def __call__(self, epoch: int) -> float:
        if epoch > self.length:
            return self.final
        return self.initial + (self.final - self.initial) * epoch / self.length


@dataclass(frozen=True)
class ConstantSchedule:
    """``value`` at every epoch."""

    value: float

    def __call__(self, epoch: int) -> float:
        return self.value


def make_schedule(entry: Mapping) -> Callable[[int], float]:
    """One validated ``LearningRateSchedule`` entry -> epoch -> learning rate."""
    kind = entry["Type"]
    if kind == "Step":
        return StepSchedule(float(entry["Initial"]), int(entry["Interval"]), float(entry["Factor"]))
    if kind == "Warmup":
        return WarmupSchedule(float(entry["Initial"]), float(entry["Final"]), max(1, int(entry["Length"])))
    if kind == "Constant":
        return ConstantSchedule(float(entry["Value"]))
    raise MeshSDFError(f"unknown learning-rate schedule type {kind!r}; use Step, Warmup or Constant")


def schedules_from_specs(specs: Mapping) -> list[Callable[[int], float]]:
    """All LearningRateSchedule entries; for the auto-decoder [0] = decoder, [1] = latent codes."""
    return [make_schedule(e) for e in specs["LearningRateSchedule"]]


def set_learning_rates(optimizer: torch.optim.Optimizer, schedules: Sequence[Callable[[int], float]],
                       epoch: int) -> list[float]:
    """Set param group i's lr to schedules[i](epoch); returns the rates."""
    rates = []
    for group, schedule in zip(optimizer.param_groups, schedules):
        group["lr"] = schedule(epoch)
        rates.append(group["lr"])
    return rates


def code_reg_weight(epoch: int, lam: float) -> float:
    """lambda * min(1, epoch / 100): the regulariser ramps in over the first 100 epochs."""
    return lam * min(1.0, epoch / 100.0)


def checkpoints_due(settings: TrainSettings, epoch: int, stop: bool) -> tuple[bool, bool]:
    """Which checkpoints to write after ``epoch``.

    Args:
        settings: the run's settings (SnapshotFrequency, AdditionalSnapshots, LogFrequency, epochs).
        epoch: the epoch just trained.
        stop: whether the run stops after it (a requested stop on any rank).
    Returns:
        (snapshot, latest): keep ``<epoch>.pth``; write Logs.pth and ``latest`` (at snapshots, every
        LogFrequency-th epoch, the last epoch and a stop).
    """
    snapshot = settings.is_snapshot(epoch)
    latest = snapshot or stop or epoch % settings.log_frequency == 0 or epoch == settings.num_epochs
    return snapshot, latest
