"""The training loop: one optimizer step, the epochs around it, and the DeepSDF auto-decoder trainer.

``optimizer_step`` (one update with the non-finite guard), ``EpochBook`` (the bookkeeping
around a trainer's epochs, shared with lib.svr.train), ``train_auto_decoder`` (the DeepSDF
auto-decoder: decoder + one latent code per scene) and ``reconstruct_training_shapes``.
The pieces they use live beside this module: lib.training.schedules (settings, rates),
lib.training.losses, lib.training.logs (Logs.pth), lib.training.distributed (torchrun).

Epochs are numbered from 1.  The schedule, the code-regularisation ramp and the snapshot
choice are functions of the epoch number only, and the checkpoint stores the optimizer
state and the RNG states, so a run resumed from ``latest`` continues exactly as the
uninterrupted run would have.

Several processes (torchrun, see lib.training.distributed): the decoder is wrapped in DDP and each
global batch of ScenesPerBatch scenes is split between the ranks, so a specs file means
the same optimisation on any number of processes.  The latent codes are *all-reduced*,
not owned: every rank holds the whole (K, L) table, their (mostly zero) gradients are
averaged with the loss after backward (``lib.training.distributed.GradientSync``) and every rank
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

from .. import experiment, runtime
from ..datasets import SdfSamples, scene_batches
from ..errors import MeshSDFError
from ..io import write_ply
from ..isosurface import extract_dense
from ..log import info, progress
from ..models.decoder import decoder_from_specs, sdf as decoder_sdf
from . import distributed
from .logs import TrainingLog
from .losses import SdfLoss, auto_decoder_loss
from .schedules import TrainSettings, checkpoints_due, schedules_from_specs, set_learning_rates

__all__ = ["NonFiniteLossError", "make_adam", "optimizer_step", "update_beside", "EpochBook", "EpochProgress",
           "start_epoch", "resume_training", "make_latent_codes", "TrainResult", "resume_point", "train_auto_decoder",
           "reconstruct_training_shapes"]


class NonFiniteLossError(MeshSDFError):
    """The loss became NaN or infinite; nothing was saved after the last good checkpoint."""


def make_adam(groups: Sequence[Mapping]) -> torch.optim.Adam:
    """The trainers' optimizer: torch.optim.Adam over ``groups`` with its multi-tensor ("foreach") update.

    Why: on a CPU torch otherwise runs its per-parameter loop, a dozen small operations for each
    of a decoder's ~30 parameters, serial time in every step (benchmarks/train_step.py); the
    foreach form computes the same updates bit for bit (tests) with the same state, so checkpoints
    load either way; loading one keeps the foreach update (a state dict carries its groups' settings,
    and files written before this choice say None).  On CUDA it is torch's default already.

    Args:
        groups: parameter groups, e.g. [{"params": decoder.parameters(), "lr": 5e-4}, ...].
    Returns:
        the optimizer.
    """
    optimizer = torch.optim.Adam(groups, foreach=True)
    optimizer.register_load_state_dict_post_hook(_keep_foreach)
    return optimizer


def _keep_foreach(optimizer: torch.optim.Optimizer) -> None:
    """After ``load_state_dict``: every group back on the foreach update (``make_adam``)."""
    for group in optimizer.param_groups:
        group["foreach"] = True


def optimizer_step(optimizer: torch.optim.Optimizer, loss: torch.Tensor, epoch: int,
                   clip_groups: Sequence[Sequence[torch.Tensor]] | None = None, clip_norm: float | None = None, *,
                   sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """Backward, optional gradient clipping, finite check, update; returns the loss value.

    ``clip_groups``: lists of parameters, each clipped to ``clip_norm`` on its own (the
    original clips its decoder, and in SVR its encoder and decoder separately).

    ``sync(loss) -> loss`` runs right after backward (``lib.training.distributed.GradientSync``:
    averages gradients DDP does not cover and returns the global loss, so every rank logs
    and checks the same value).  Raises NonFiniteLossError before updating when the loss is
    NaN/inf, so the parameters keep their last finite values.

    Args:
        optimizer: the run's optimizer.
        loss: scalar loss tensor of the step.
        epoch: the current epoch (for the error message).
        clip_groups: parameter lists clipped separately (default None: no clipping).
        clip_norm: GradientClipNorm (default None: no clipping).
        sync: see above (default None: one process).
    Returns:
        the (global) loss value.
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


def update_beside(update: Callable[[], float], draw: Callable[[], object] | None, device=None,
                  small_update: bool = True) -> tuple[float, object]:
    """``update()`` (a step's ``optimizer_step``), then ``draw()`` (the next step's batch), side by side.

    Why: a fused training step's backward and update are small operations on one core while the
    other waits, and drawing the next batch (gathering its rows) would be serial time at the start
    of the next step; run together (``lib.runtime.concurrently``: the update in this thread, the
    draw on a worker, one intra-op thread each) the draw leaves the critical path.  The draws
    happen in the same order as one after the other, so a run is the same either way.  Without a
    draw a small update still runs on one intra-op thread (``lib.runtime.elementwise_section``):
    waking and joining the others for each of its small operations costs more than it saves.

    Args:
        update: zero-argument callable returning the step's loss value; its exceptions are raised
            once ``draw`` has finished too.
        draw: zero-argument callable returning the next batch, or None (the last step of an epoch).
        device: where the tensors live (default None: the CPU; elsewhere the two run in order).
        small_update: whether the update is small operations only (the fused loss's backward);
            False runs the two in order on all threads, e.g. for an autograd backward with large
            GEMMs, which one thread would slow (default True).
    Returns:
        (update's value, draw's result or None).
    """
    if not small_update:
        value = update()
        return value, None if draw is None else draw()
    if draw is None:
        with runtime.elementwise_section(device):
            return update(), None
    value, batch = runtime.concurrently([update, draw], device)
    return value, batch


# --------------------------------------------------------------------------- epochs
#
# EpochBook's six jobs, each a piece of its own: resuming (``resume_training``), each epoch's
# learning rates and rank-local seeds (``start_epoch``), Logs.pth (``lib.training.logs.TrainingLog``),
# stop agreement (``lib.training.distributed.any_rank``), the checkpoints due
# (``lib.training.schedules.checkpoints_due``) and the progress bar (``EpochProgress``).

def resume_training(exp_dir: str | os.PathLike, resume: str | int, model: nn.Module,
                    optimizer: torch.optim.Optimizer, latent_codes: nn.Module | None, sampler: torch.Generator,
                    device=None, load: Callable[[str | int], tuple[int, dict]] | None = None,
                    main: bool = True) -> tuple[int, dict]:
    """Load checkpoint ``resume`` into the objects and restore the data generator's state.

    Args:
        exp_dir: the experiment folder.
        resume: "latest" or an epoch number.
        model, optimizer, latent_codes: filled in place (``latent_codes`` None: a trainer without them).
        sampler: the run's data generator; its state comes from the record's "rng_state".
        device: map_location for the tensors.
        load: ``load(resume) -> (epoch, extra)`` replacing ``lib.experiment.load_checkpoint`` for
            trainers with other checkpoint forms.
        main: whether this process reports (a resume that will differ from the uninterrupted run).
    Returns:
        (the epoch of the checkpoint, the record's other entries, e.g. "seed").
    """
    if load is None:
        epoch, extra = experiment.load_checkpoint(exp_dir, resume, model, optimizer, latent_codes,
                                                  map_location=device)
    else:
        epoch, extra = load(resume)
    if "rng_state" in extra:
        runtime.set_rng_state(extra["rng_state"], sampler)
    elif main:
        what = (f"{experiment.MODEL_PARAMS_DIR}/{resume}.pth"
                + (f" and {experiment.LATENT_CODES_DIR}/{resume}.pth" if latent_codes is not None else ""))
        info(f"resuming from epoch {epoch} of {what} with a fresh optimizer (no "
             f"{experiment.OPTIMIZER_PARAMS_DIR}/{resume}.pth, as in released models): the run will differ "
             "from an uninterrupted one" if extra.get("fresh_optimizer") else
             f"checkpoint {resume} has no RNG state: resumed run will differ from an uninterrupted one")
    return epoch, extra


def start_epoch(optimizer: torch.optim.Optimizer, schedules: Sequence[Callable[[int], float]], epoch: int,
                seed: int, main: bool = True) -> list[float]:
    """Set ``epoch``'s learning rates (param group i: ``schedules[i](epoch)``) and, on ranks other than 0,
    reseed torch's generator so dropout masks are rank-local: rank 0 keeps the stream its checkpoint
    saves, the others draw from ``lib.training.distributed.rank_seed(seed, epoch)``, so a resumed run
    repeats them too.

    Returns:
        the learning rates set, one per param group.
    """
    rates = set_learning_rates(optimizer, schedules, epoch)
    if not main:
        torch.manual_seed(distributed.rank_seed(seed, epoch))
    return rates


class EpochProgress:
    """The epochs' progress bar (main process only): loss, rates and seconds of the last epoch.

    Args:
        total: the run's last epoch.
        initial: epochs already done (a resumed run).
        desc: the bar's label.
        main: whether this process shows it.
    """

    def __init__(self, total: int, initial: int, desc: str, main: bool = True):
        self.bar = progress(total=total, initial=min(initial, total), desc=desc, unit="epoch",
                            **({} if main else {"disable": True}))

    def update(self, loss: float, rates: Sequence[float], seconds: float) -> None:
        """One epoch done."""
        self.bar.set_postfix(loss=f"{loss:.5f}", lr="/".join(f"{r:.3g}" for r in rates), s_per_epoch=f"{seconds:.2f}")
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


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
    last completed one, ``logs`` the Logs.pth content (``history``, a ``TrainingLog``).
    """

    def __init__(self, exp_dir: str | os.PathLike, settings: TrainSettings, save: Callable[[str | int, int], None],
                 desc: str = "train"):
        self.exp_dir = Path(exp_dir)
        self.settings = settings
        self.save = save
        self.desc = desc
        self.main = distributed.is_main_process()
        self.history = TrainingLog(self.exp_dir, self.main)
        self.last_saved = self.epoch = 0
        self.last_loss: float | None = None  # mean step loss of the last epoch trained by this run
        self.bar: EpochProgress | None = None
        self._current: tuple[int, list[float], float] | None = None  # epoch, rates, start time

    @property
    def logs(self) -> dict:
        """The Logs.pth content (trainers may add their own entries)."""
        return self.history.logs

    def resume(self, resume: str | int | None, model: nn.Module, optimizer: torch.optim.Optimizer,
               latent_codes: nn.Module | None, sampler: torch.Generator, seed: int, device=None,
               load: Callable[[str | int], tuple[int, dict]] | None = None) -> int:
        """Load checkpoint ``resume`` (None: nothing) into the objects and the logs up to it; returns the
        run's seed (the checkpoint's, when it saved one).  See ``resume_training`` for the arguments."""
        if resume is None:
            return seed
        self.last_saved, extra = resume_training(self.exp_dir, resume, model, optimizer, latent_codes, sampler,
                                                 device, load, self.main)
        self.epoch = self.last_saved
        self.history.resume(self.last_saved)
        return int(extra.get("seed", seed))

    def epochs(self, optimizer: torch.optim.Optimizer, schedules: Sequence[Callable[[int], float]], seed: int):
        """The epochs still to train, each after ``start_epoch`` (its rates and rank-local seeds).
        Opens the progress bar (``close`` closes it)."""
        total = self.settings.num_epochs
        self.bar = EpochProgress(total, self.last_saved, self.desc, self.main)
        for epoch in range(self.last_saved + 1, total + 1):
            rates = start_epoch(optimizer, schedules, epoch, seed, self.main)
            self._current = (epoch, rates, time.perf_counter())
            yield epoch

    def non_finite(self, err: Exception, advice: str) -> "NonFiniteLossError":
        """The error to raise for a NaN/inf loss: where the last good checkpoint is, and ``advice``."""
        latest = experiment.checkpoint_path(self.exp_dir, experiment.MODEL_PARAMS_DIR, "latest")
        kept = (f"the last good checkpoint is {latest} (epoch {self.last_saved})" if self.last_saved else
                "no checkpoint was written")
        return NonFiniteLossError(f"{err}; stopped, {kept}; {advice}, then resume with --continue latest")

    def end_epoch(self, losses: Sequence[float], codes: torch.Tensor | float, model: nn.Module,
                  stop_requested: bool) -> bool:
        """After the epoch, on every rank: log it, agree on stopping, write what is due; returns whether to stop.

        ``losses``: the epoch's step losses; ``codes``, as ``append_epoch_logs``.  Stop:
        ``stop_requested`` on any rank (``lib.training.distributed.any_rank``).  What is written:
        ``lib.training.schedules.checkpoints_due``.
        """
        epoch, rates, t0 = self._current
        seconds = time.perf_counter() - t0
        self.epoch = epoch
        self.history.add_epoch(epoch, losses, rates, seconds, codes, model)
        stop = distributed.any_rank(stop_requested)
        snapshot, latest = checkpoints_due(self.settings, epoch, stop)
        if self.main and snapshot:
            self.save(epoch, epoch)
        if latest:
            if self.main:
                # logs first: a kill between the two leaves logs ahead of the checkpoint,
                # which resuming truncates, never a checkpoint whose epoch the logs lack
                self.history.save()
                self.save("latest", epoch)
            self.last_saved = epoch
        self.last_loss = sum(losses) / max(1, len(losses))
        if self.bar is not None:
            self.bar.update(self.last_loss, rates, seconds)
        return stop

    def close(self) -> None:
        """Close the progress bar."""
        if self.bar is not None:
            self.bar.close()


# --------------------------------------------------------------------------- the loop

def make_latent_codes(num_scenes: int, code_length: int, settings: TrainSettings, device=None) -> nn.Embedding:
    """The (num_scenes, L) embedding, init N(0, CodeInitStdDev / sqrt(L)); max_norm = CodeBound.

    Args:
        num_scenes: K, the number of training scenes.
        code_length: L, CodeLength.
        settings: the run's settings (CodeInitStdDev, CodeBound).
        device: where the table goes (default None: the CPU).
    Returns:
        ``nn.Embedding`` with a (K, L) weight.
    """
    codes = nn.Embedding(num_scenes, code_length, max_norm=settings.code_bound)
    nn.init.normal_(codes.weight, 0.0, settings.code_init_std / math.sqrt(code_length))
    return codes.to(device)


@dataclass
class TrainResult:
    """What a trainer returns: the trained networks, the last completed epoch, whether it stopped early."""

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
    fresh optimizer, see ``lib.experiment.load_checkpoint``).  A numbered epoch that does
    not exist stays an error (raised when loading).

    Args:
        exp_dir: the experiment folder.
        resume: "latest", an epoch number, or None.
    Returns:
        ``resume``, or None for a fresh start.
    """
    if resume != "latest":
        return resume
    models = Path(exp_dir) / experiment.MODEL_PARAMS_DIR
    if (experiment.checkpoint_path(exp_dir, experiment.OPTIMIZER_PARAMS_DIR, "latest").is_file()
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
    SIGTERM handler only has to make it return True: lib.training.distributed.PreemptionGuard).

    Under torchrun (lib.training.distributed.init_distributed called first, ``device`` = its
    device) the decoder runs in DDP and each rank trains on its share of every global
    batch; see the module docstring for the latent codes.  Only rank 0 writes.

    Args:
        exp_dir: the experiment folder (claimed by the caller, see ``lib.experiment.claim_experiment``).
        specs: the loaded specs.json.
        dataset: the SDF samples of the TrainSplit's scenes, K of them.
        device: where the decoder trains (default None: ``lib.runtime.choose_device``).
        resume: see above (default None: a fresh start).
        seed: the run's seed (default 0; a resumed checkpoint's own seed wins).
        num_epochs: overrides NumEpochs (default None).
        should_stop: see above (default None: never).
    Returns:
        ``TrainResult``: the decoder, the (K, L) codes, the last epoch, whether it stopped early, its loss.
    """
    device = torch.device(device) if device is not None else runtime.choose_device(None)
    exp_dir = Path(exp_dir)
    settings = TrainSettings.from_specs(specs, num_epochs)
    schedules = schedules_from_specs(specs)
    world = distributed.world_size()
    runtime.seed_everything(seed)
    decoder = decoder_from_specs(specs).to(device)
    codes = make_latent_codes(len(dataset), int(specs["CodeLength"]), settings, device)
    optimizer = make_adam([{"params": decoder.parameters(), "lr": schedules[0](1)},
                           {"params": codes.parameters(), "lr": schedules[1](1)}])
    # one generator for scene order and samples, in step on every rank (same seed, same draws)
    sampler = torch.Generator(device=dataset.device)
    sampler.manual_seed(seed)

    def save(label, epoch):
        experiment.save_checkpoint(exp_dir, label, epoch, decoder, optimizer, codes,
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
            batches = scene_batches(len(dataset), settings.scenes_per_batch, sampler)
            # the whole global batch is drawn on every rank to keep the generators in step; the next
            # one beside this step's update, where that is the fused loss's small one (``update_beside``)
            draws = [lambda s=s: dataset.sample(s, settings.samples_per_scene, sampler, device=device) for s in batches]
            batch = draws[0]() if draws else None
            for j, scenes in enumerate(batches):
                xyz, sdf = batch
                batch_codes = codes(scenes.to(device))  # every rank applies CodeBound's renorm alike
                weight = 1.0
                if world > 1:
                    part, weight = distributed.local_share(len(scenes))
                    xyz, sdf, batch_codes = xyz[part], sdf[part], batch_codes[part]
                loss, _, _ = auto_decoder_loss(net, batch_codes, xyz, sdf, epoch, settings, weight)
                try:
                    value, batch = update_beside(
                        lambda: optimizer_step(optimizer, loss, epoch, [decoder.parameters()], settings.grad_clip_norm,
                                               sync=sync),
                        draws[j + 1] if j + 1 < len(draws) else None, device, decoder.fused_loss_supported)
                    losses.append(value)
                except NonFiniteLossError as err:
                    raise book.non_finite(err, "lower LearningRateSchedule or check the SDF samples") from None
            if book.end_epoch(losses, codes.weight, decoder, bool(should_stop and should_stop(epoch))):
                return TrainResult(decoder, codes, epoch, True, book.last_loss)
    finally:
        book.close()
    return TrainResult(decoder, codes, book.epoch, False, book.last_loss)


def reconstruct_training_shapes(exp_dir: str | os.PathLike, decoder: nn.Module, codes: torch.Tensor,
                                names: Sequence[str], resolution: int = 128, device=None) -> list[Path]:
    """``Reconstructions/<name>.ply`` for each code (K, L): dense marching cubes over [-1, 1]^3.

    Args:
        exp_dir: the experiment folder.
        decoder: the trained decoder.
        codes: (K, L) latent codes, row k of ``names[k]``.
        names: one file name per code.
        resolution: grid cells per axis (default 128).
        device: where the decoder runs (default None: the CPU).
    Returns:
        the written paths, one per code.
    """
    decoder.eval()
    out_dir = experiment.reconstructions_dir(exp_dir)
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
