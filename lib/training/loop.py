"""The DeepSDF auto-decoder training loop and the pieces other trainers reuse.

Pieces (each usable alone, e.g. by train_svr.py whose codes come from an encoder):
``TrainSettings`` (specs values), learning-rate schedules, ``clamped_l1``,
``code_regularization``, ``SdfLoss`` (the module DDP wraps), ``auto_decoder_loss``, ``optimizer_step`` (one update with the
non-finite guard), ``new_logs``/``append_epoch_logs``/``truncate_logs`` (Logs.pth),
``EpochBook`` (resuming, learning rates and rank-local seeds per epoch, Logs.pth, stop
agreement, snapshots and ``latest``, progress), and ``train_auto_decoder`` which puts them
together.

Epochs are numbered from 1.  The schedule, the code-regularisation ramp and the snapshot
choice are functions of the epoch number only, and the checkpoint stores the optimizer
state and the RNG states, so a run resumed from ``latest`` continues exactly as the
uninterrupted run would have.

Several processes (torchrun, see lib.distributed): the decoder is wrapped in DDP and each
global batch of ScenesPerBatch scenes is split between the ranks, so a specs file means
the same optimisation on any number of processes.  The latent codes are *all-reduced*,
not owned: every rank holds the whole (K, L) table, their (mostly zero) gradients are
averaged with the loss after backward (``lib.distributed.GradientSync``) and every rank
applies the same Adam update.  Ownership would leave each rank's table and Adam state
partly stale, so rank 0 could not save a complete checkpoint without a gather, and a
resume with another world size would need re-sharding; the all-reduce costs K x L floats
per step, small next to the decoder's gradients.  Only rank 0 writes files; its checkpoint
is the state of every rank (the data generator is shared), so ``--continue`` works with any
number of processes.  Dropout masks come from each rank's own generator, reseeded per
epoch from the run's seed and the rank, so a multi-process run resumes exactly too.
"""
from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from lib import checkpoint, distributed, runtime
from lib.data import SdfSamples, scene_batches
from lib.errors import MeshSDFError
from lib.log import info, progress
from lib.models.decoder import Decoder, decoder_from_specs, sdf as decoder_sdf


class NonFiniteLossError(MeshSDFError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


# --------------------------------------------------------------------------- settings, schedules

@dataclass(frozen=True)
class TrainSettings:
    """The specs values the loop needs (see lib.specs.DEEPSDF_KEYS for their meaning)."""

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
            code_bound=float(specs["CodeBound"]) if specs["ApplyCodeBound"] and specs["CodeBound"] is not None else None,
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


def set_learning_rates(optimizer: torch.optim.Optimizer, schedules: Sequence[Callable[[int], float]], epoch: int) -> list[float]:
    """Set param group i's lr to schedules[i](epoch); returns the rates."""
    rates = []
    for group, schedule in zip(optimizer.param_groups, schedules):
        group["lr"] = schedule(epoch)
        rates.append(group["lr"])
    return rates


# --------------------------------------------------------------------------- losses, one step

def clamped_l1(pred: torch.Tensor, gt: torch.Tensor, clamp: float) -> torch.Tensor:
    """mean |clamp(pred) - clamp(gt)| with clamp to [-clamp, clamp]; pred, gt of equal numel."""
    return (pred.reshape(-1).clamp(-clamp, clamp) - gt.reshape(-1).clamp(-clamp, clamp)).abs().mean()


def code_reg_weight(epoch: int, lam: float) -> float:
    """lambda * min(1, epoch / 100): the regulariser ramps in over the first 100 epochs."""
    return lam * min(1.0, epoch / 100.0)


def code_regularization(codes: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the codes (B, L).

    Equals DeepSDF's sum of per-sample code norms divided by the number of samples, since
    every scene of a batch has the same number of samples.
    """
    return codes.norm(dim=1).mean()


class SdfLoss(nn.Module):
    """The clamped-L1 SDF loss of a decoder, as the module DistributedDataParallel wraps.

    ``SdfLoss(decoder)(codes, xyz, sdf, clamp)``: codes (B, L), xyz (B, S, 3), sdf (B, S)
    -> scalar mean over the B * S rows of |clamp(f(code_b, xyz_bs)) - clamp(sdf_bs)|.
    With gradients enabled and a ``Decoder`` the fused path supports (every specs file of
    the project and of the original), the loss and its gradients come from
    ``Decoder.clamped_l1_loss`` (lib.models.fused: about half the time on a CPU and a few
    MB instead of ~0.6 GB for a bob_and_spot batch); otherwise from the decoder's plain
    forward.  Wrapping this module, not the decoder, keeps ``Decoder.forward`` the
    inference forward while DDP still sees the training computation as its forward.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, codes: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor, clamp: float) -> torch.Tensor:
        b, s = sdf.shape
        dec = self.decoder
        if b * s and torch.is_grad_enabled() and isinstance(dec, Decoder) and dec.fused_loss_supported:
            return dec.clamped_l1_loss(codes, xyz, sdf, clamp)
        inputs = torch.cat((codes[:, None, :].expand(b, s, codes.shape[1]), xyz), dim=2).reshape(b * s, codes.shape[1] + 3)
        pred = dec(inputs)
        if b * s == 0:  # a zero that still reaches every parameter, as DDP needs
            return pred.sum() * 0.0 + codes.sum() * 0.0
        return clamped_l1(pred, sdf, clamp)


def auto_decoder_loss(loss: nn.Module, codes: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor,
                      epoch: int, settings: TrainSettings, weight: float = 1.0,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one batch: clamped L1 SDF loss + ramped code regularisation.

    ``loss``: an ``SdfLoss`` (possibly inside DDP) or a bare decoder (wrapped in one
    here).  codes (B, L), xyz (B, S, 3), sdf (B, S), all on the decoder's device.
    ``weight`` multiplies both terms: ``lib.distributed.loss_weight`` for a rank's shard of
    a global batch (B may then be 0: the loss is a zero that still reaches every
    parameter, as DDP needs).  Returns (total, sdf term, regularisation term) as scalar
    tensors.
    """
    if not isinstance(distributed.unwrap(loss), SdfLoss):
        loss = SdfLoss(loss)
    sdf_loss = loss(codes, xyz, sdf, settings.clamp_distance)
    if sdf.numel() == 0:
        return sdf_loss, sdf_loss, sdf_loss
    if settings.code_regularization and settings.code_reg_lambda > 0:
        reg = code_reg_weight(epoch, settings.code_reg_lambda) * code_regularization(codes)
    else:
        reg = sdf_loss.new_zeros(())
    if weight != 1.0:
        sdf_loss, reg = sdf_loss * weight, reg * weight
    return sdf_loss + reg, sdf_loss, reg


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, epoch: int,
                   clip_groups: Sequence[Sequence[torch.Tensor]] | None = None, clip_norm: float | None = None, *,
                   sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Backward, optional gradient clipping, finite check, update; returns the loss value.

    ``clip_groups``: lists of parameters, each clipped to ``clip_norm`` on its own (the
    original clips its decoder, and in SVR its encoder and decoder separately).

    ``sync(loss) -> loss`` runs right after backward (``lib.distributed.GradientSync``:
    averages gradients DDP does not cover and returns the global loss, so every rank logs
    and checks the same value).  Raises NonFiniteLossError before updating when the loss is
    NaN/inf, so the parameters keep their last finite values.
    """
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    if sync is not None:
        loss = sync(loss)
    if clip_norm is not None and clip_groups is not None:
        for group in clip_groups:
            nn.utils.clip_grad_norm_(list(group), clip_norm)
    value = float(loss.detach())
    if not math.isfinite(value):
        raise NonFiniteLossError(f"loss became {value} at epoch {epoch}")
    optimizer.step()
    return value


# --------------------------------------------------------------------------- logs

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


# --------------------------------------------------------------------------- epochs

class EpochBook:
    """The bookkeeping around a trainer's epochs: resuming, rates, Logs.pth, checkpoints, stopping, progress.

    One per run, shared by ``train_auto_decoder`` and ``lib.svr.train_svr``::

        book = EpochBook(exp_dir, settings, save)
        seed = book.resume(resume, model, optimizer, codes, sampler, seed)
        try:
            for epoch in book.epochs(optimizer, schedules, seed):
                ...  # the steps
                if book.end_epoch(losses, codes, model, stop_requested):
                    break
        finally:
            book.close()

    ``save(label, epoch)`` writes the checkpoint ``label`` (an epoch number or "latest");
    the book calls it on the main process only, which alone writes files and shows the
    progress bar.  ``last_saved`` is the epoch ``latest`` holds (0: none), ``epoch`` the
    last completed one, ``logs`` the Logs.pth content.
    """

    def __init__(self, exp_dir: str | os.PathLike, settings: TrainSettings, save: Callable[[str | int, int], None],
                 desc: str = "train"):
        self.exp_dir = Path(exp_dir)
        self.settings = settings
        self.save = save
        self.desc = desc
        self.main = distributed.is_main_process()
        self.logs = new_logs()
        self.last_saved = self.epoch = 0
        self.last_loss: float | None = None  # mean step loss of the last epoch trained by this run
        self.bar = None
        self._current: tuple[int, list[float], float] | None = None  # epoch, rates, start time

    def resume(self, resume: str | int | None, model: nn.Module, optimizer: torch.optim.Optimizer,
               latent_codes: nn.Module | None, sampler: torch.Generator, seed: int, device=None,
               load: Callable[[str | int], tuple[int, dict]] | None = None) -> int:
        """Load checkpoint ``resume`` (None: nothing) into the objects and the logs up to it; returns the
        run's seed (the checkpoint's, when it saved one).  ``load(resume) -> (epoch, extra)``
        replaces ``lib.checkpoint.load_checkpoint`` for trainers with other checkpoint forms."""
        if resume is None:
            return seed
        if load is None:
            self.last_saved, extra = checkpoint.load_checkpoint(self.exp_dir, resume, model, optimizer,
                                                               latent_codes, map_location=device)
        else:
            self.last_saved, extra = load(resume)
        self.epoch = self.last_saved
        if "rng_state" in extra:
            runtime.set_rng_state(extra["rng_state"], sampler)
        elif self.main:
            what = (f"{checkpoint.MODEL_PARAMS_DIR}/{resume}.pth"
                    + (f" and {checkpoint.LATENT_CODES_DIR}/{resume}.pth" if latent_codes is not None else ""))
            info(f"resuming from epoch {self.last_saved} of {what} with a fresh optimizer (no "
                 f"{checkpoint.OPTIMIZER_PARAMS_DIR}/{resume}.pth, as in released models): the run will differ "
                 "from an uninterrupted one" if extra.get("fresh_optimizer") else
                 f"checkpoint {resume} has no RNG state: resumed run will differ from an uninterrupted one")
        logs = checkpoint.load_logs(self.exp_dir)
        if logs and "log_epochs" not in logs and self.main:
            # another trainer's Logs.pth (e.g. DeepSDF's): keep it, this run starts its own history
            kept = checkpoint.move_aside(self.exp_dir, (checkpoint.LOGS_FILE,))
            info(f"{checkpoint.logs_path(self.exp_dir)} is not in this project's form; moved it into {kept}")
        self.logs = truncate_logs(logs, self.last_saved)
        return int(extra.get("seed", seed))

    def epochs(self, optimizer: torch.optim.Optimizer, schedules: Sequence[Callable[[int], float]], seed: int):
        """The epochs still to train, each after setting its learning rates (param group i:
        ``schedules[i](epoch)``) and, on ranks other than 0, reseeding torch's generator so
        dropout masks are rank-local: rank 0 keeps the stream its checkpoint saves, the
        others draw from ``lib.distributed.rank_seed(seed, epoch)``, so a resumed run repeats
        them too.  Opens the progress bar (``close`` closes it)."""
        total = self.settings.num_epochs
        self.bar = progress(total=total, initial=min(self.last_saved, total), desc=self.desc, unit="epoch",
                            **({} if self.main else {"disable": True}))
        for epoch in range(self.last_saved + 1, total + 1):
            rates = set_learning_rates(optimizer, schedules, epoch)
            if not self.main:
                torch.manual_seed(distributed.rank_seed(seed, epoch))
            self._current = (epoch, rates, time.perf_counter())
            yield epoch

    def non_finite(self, err: Exception, advice: str) -> "NonFiniteLossError":
        """The error to raise for a NaN/inf loss: where the last good checkpoint is, and ``advice``."""
        kept = (f"the last good checkpoint is {checkpoint.checkpoint_path(self.exp_dir, 'ModelParameters', 'latest')}"
                f" (epoch {self.last_saved})" if self.last_saved else "no checkpoint was written")
        return NonFiniteLossError(f"{err}; stopped, {kept}; {advice}, then resume with --continue latest")

    def end_epoch(self, losses: Sequence[float], codes: torch.Tensor | float, model: nn.Module,
                  stop_requested: bool) -> bool:
        """After the epoch, on every rank: log it, agree on stopping, write what is due; returns whether to stop.

        ``losses``: the epoch's step losses; ``codes``, as ``append_epoch_logs``.  Stop:
        ``stop_requested`` on any rank (``lib.distributed.any_rank``).  A snapshot epoch
        keeps ``<epoch>.pth``; snapshots, every LogFrequency-th epoch, the last epoch and a
        stop also write Logs.pth, then ``latest``.
        """
        epoch, rates, t0 = self._current
        seconds = time.perf_counter() - t0
        self.epoch = epoch
        append_epoch_logs(self.logs, epoch, losses, rates, seconds, codes, model)
        stop = distributed.any_rank(stop_requested)
        settings = self.settings
        snapshot = settings.is_snapshot(epoch)
        if self.main and snapshot:
            self.save(epoch, epoch)
        if snapshot or stop or epoch % settings.log_frequency == 0 or epoch == settings.num_epochs:
            if self.main:
                # logs first: a kill between the two leaves logs ahead of the checkpoint,
                # which resuming truncates, never a checkpoint whose epoch the logs lack
                checkpoint.save_logs(self.exp_dir, self.logs)
                self.save("latest", epoch)
            self.last_saved = epoch
        self.last_loss = sum(losses) / max(1, len(losses))
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{self.last_loss:.5f}", lr="/".join(f"{r:.3g}" for r in rates),
                                 s_per_epoch=f"{seconds:.2f}")
            self.bar.update(1)
        return stop

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the loop

def make_latent_codes(num_scenes: int, code_length: int, settings: TrainSettings, device=None) -> nn.Embedding:
    """The (num_scenes, L) embedding, init N(0, CodeInitStdDev / sqrt(L)); max_norm = CodeBound."""
    codes = nn.Embedding(num_scenes, code_length, max_norm=settings.code_bound)
    nn.init.normal_(codes.weight, 0.0, settings.code_init_std / math.sqrt(code_length))
    return codes.to(device)


@dataclass
class TrainResult:
    decoder: nn.Module
    latent_codes: nn.Embedding
    epoch: int  # last completed epoch
    stopped: bool  # True when should_stop ended the run early
    loss: float | None = None  # mean step loss of the last completed epoch (None: no epoch trained)


def resume_point(exp_dir: str | os.PathLike, resume: str | int | None) -> str | int | None:
    """``resume`` unless it is "latest" and no checkpoint exists yet: then None (a fresh start).

    This makes ``--continue latest`` always safe to pass (``torchrun --max-restarts``
    re-runs the same command after a failure).  The optimizer file is the resume record and
    is renamed first when saving; a model without it is a released model (resumed with a
    fresh optimizer, see ``lib.checkpoint.load_checkpoint``).  A numbered epoch that does
    not exist stays an error (raised when loading).
    """
    if resume != "latest":
        return resume
    models = Path(exp_dir) / checkpoint.MODEL_PARAMS_DIR
    if (checkpoint.checkpoint_path(exp_dir, checkpoint.OPTIMIZER_PARAMS_DIR, "latest").is_file()
            or (models.is_dir() and any(p.name.endswith("latest.pth") for p in models.iterdir()))):
        return resume  # (SVR models are encoder_latest.pth / decoder_latest.pth)
    if distributed.is_main_process():
        info(f"--continue latest: no checkpoint in {exp_dir} yet; starting from epoch 1")
    return None


def train_auto_decoder(exp_dir: str | os.PathLike, specs: Mapping, dataset: SdfSamples, device=None, *,
                       resume: str | int | None = None, seed: int = 0, num_epochs: int | None = None,
                       should_stop: Callable[[int], bool] | None = None) -> TrainResult:
    """Train decoder + one latent code per scene of ``dataset`` (DeepSDF auto-decoder).

    Writes checkpoints (``latest`` every LogFrequency epochs, at snapshots and at the end),
    Logs.pth, in ``exp_dir``.  ``resume``: "latest" (a fresh start when there is no
    checkpoint yet, see ``resume_point``) or an epoch to continue from (RNG states
    included); ``num_epochs`` overrides NumEpochs; ``should_stop(epoch)`` is asked after
    every epoch and, when true on any rank, ``latest`` is saved and the run returns (a
    SIGTERM handler only has to make it return True: lib.distributed.PreemptionGuard).

    Under torchrun (lib.distributed.init_distributed called first, ``device`` = its
    device) the decoder runs in DDP and each rank trains on its share of every global
    batch; see the module docstring for the latent codes.  Only rank 0 writes.
    """
    device = torch.device(device) if device is not None else runtime.choose_device(None)
    exp_dir = Path(exp_dir)
    settings = TrainSettings.from_specs(specs, num_epochs)
    schedules = schedules_from_specs(specs)
    world = distributed.world_size()
    runtime.seed_everything(seed)
    decoder = decoder_from_specs(specs).to(device)
    codes = make_latent_codes(len(dataset), int(specs["CodeLength"]), settings, device)
    optimizer = torch.optim.Adam([{"params": decoder.parameters(), "lr": schedules[0](1)},
                                  {"params": codes.parameters(), "lr": schedules[1](1)}])
    # one generator for scene order and samples, in step on every rank (same seed, same draws)
    sampler = torch.Generator(device=dataset.device)
    sampler.manual_seed(seed)

    def save(label, epoch):
        checkpoint.save_checkpoint(exp_dir, label, epoch, decoder, optimizer, codes,
                                  extra={"rng_state": runtime.rng_state(sampler), "seed": seed})

    book = EpochBook(exp_dir, settings, save, "train")
    seed = book.resume(resume_point(exp_dir, resume), decoder, optimizer, codes, sampler, seed, device)
    net = distributed.wrap_ddp(SdfLoss(decoder), device)
    sync = None
    distributed.check_global_batch(settings.scenes_per_batch)
    if world > 1:
        distributed.broadcast_parameters_(codes.parameters())
        sync = distributed.GradientSync(list(codes.parameters()))
    try:
        for epoch in book.epochs(optimizer, schedules, seed):
            decoder.train()
            losses = []
            for scenes in scene_batches(len(dataset), settings.scenes_per_batch, sampler):
                # the whole global batch is drawn on every rank to keep the generators in step
                xyz, sdf = dataset.sample(scenes, settings.samples_per_scene, sampler, device=device)
                batch_codes = codes(scenes.to(device))  # every rank applies CodeBound's renorm alike
                weight = 1.0
                if world > 1:
                    part, weight = distributed.local_share(len(scenes))
                    xyz, sdf, batch_codes = xyz[part], sdf[part], batch_codes[part]
                loss, _, _ = auto_decoder_loss(net, batch_codes, xyz, sdf, epoch, settings, weight)
                try:
                    losses.append(optimizer_step(optimizer, loss, epoch, [decoder.parameters()], settings.grad_clip_norm,
                                                 sync=sync))
                except NonFiniteLossError as err:
                    raise book.non_finite(err, "lower LearningRateSchedule or check the SDF samples") from None
            if book.end_epoch(losses, codes.weight, decoder, bool(should_stop and should_stop(epoch))):
                return TrainResult(decoder, codes, epoch, True, book.last_loss)
    finally:
        book.close()
    return TrainResult(decoder, codes, book.epoch, False, book.last_loss)


def reconstruct_training_shapes(exp_dir: str | os.PathLike, decoder: nn.Module, codes: torch.Tensor,
                                names: Sequence[str], resolution: int = 128, device=None) -> list[Path]:
    """``Reconstructions/<name>.ply`` for each code (K, L): dense marching cubes over [-1, 1]^3."""
    from lib.io import write_ply
    from lib.isosurface import extract_dense

    decoder.eval()
    out_dir = checkpoint.reconstructions_dir(exp_dir)
    paths = []
    for k, name in enumerate(progress(names, desc="reconstruct", unit="mesh")):
        z = codes[k].detach().to(device)
        verts, faces = extract_dense(lambda p: decoder_sdf(decoder, z, p), resolution, device=device)
        if faces.shape[0] == 0:
            info(f"{name}: the SDF has no zero crossing in [-1, 1]^3; writing an empty mesh")
        path = out_dir / f"{name}.ply"
        write_ply(path, verts, faces)
        paths.append(path)
    return paths
