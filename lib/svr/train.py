"""Joint training of the image encoder and the DeepSDF decoder on the SDF loss (train_svr.py).

As the original runs it: Adam with two parameter groups, decoder first, encoder second;
every epoch group i gets ``LearningRateSchedule[i]`` (so the decoder trains at schedule 0,
5e-4 halving every 500 epochs in cars_svr, and the encoder at schedule 1, 1e-3 halving
every 500: the original builds its decoder group at a tenth of the rate, but its schedule
overwrites that each epoch).  ``DecoderLearningRateFactor`` (ours, opt-in) makes the decoder
rate the encoder's times a factor instead.  Each training item is one uniformly random view
of the instance; loss = clamped L1 (sum / samples) + lambda min(1, epoch/100) sum |z| /
samples; GradientClipNorm clips the encoder's and the decoder's gradients separately.  Both
loaders drop the last incomplete batch.  After every epoch the SDF loss of the TestSplit is
computed with the networks in eval mode (item i seen from its fixed view
``lib.svr.data.evaluation_view(i)``, samples from a generator seeded by the run's seed and
the epoch, so it never disturbs the training stream) and logged per test batch as
``loss_sdf_test``; ``loss_sdf`` is the SDF term of each training step (without the code
regulariser, which the DeepSDF ``loss`` entry includes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from .. import experiment, runtime
from ..datasets import scene_batches
from ..errors import MeshSDFError
from ..experiment.specs import resolve_path
from ..log import info
from ..training import (EpochBook, NonFiniteLossError, TrainResult, TrainSettings, auto_decoder_loss, clamped_l1,
                        distributed, make_adam, make_schedule, optimizer_step, resume_point)
from .data import evaluation_view
from .network import EncoderDecoder, network_from_specs

__all__ = ["SVR_LOG_KEYS", "train_step", "svr_schedules", "make_optimizer", "test_losses", "train_svr"]

# Logs.pth entries beyond lib.training's: per step / per test batch, with the epoch of each entry
SVR_LOG_KEYS = ("loss_sdf", "loss_sdf_test")


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: Sequence[torch.Tensor], epoch: int,
               settings, model: EncoderDecoder | None = None, weight: float = 1.0,
               sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, float, torch.Tensor]:
    """One optimisation step on ``batch`` = (images (B, 4, S, S), xyz (B, N, 3), sdf (B, N)).

    Returns (loss, its SDF term, codes (B, L) detached); both losses are the global batch's
    under torchrun.  ``net`` is what runs forward (the EncoderDecoder,
    or a DDP wrapper of it, in which case ``model`` is the wrapped EncoderDecoder whose
    decoder computes the SDF).  ``weight`` scales the batch's mean loss and ``sync`` runs
    after backward (a rank's ``lib.training.distributed.local_share`` weight and ``GradientSync``
    under torchrun; the returned loss is then the global batch's).  Raises
    lib.training.NonFiniteLossError before updating on a NaN/inf loss.
    """
    images, xyz, sdf = batch
    inner = model if model is not None else net
    codes = net(images)
    loss, sdf_term, _ = auto_decoder_loss(inner.decoder, codes, xyz, sdf, epoch, settings, weight)
    value = optimizer_step(optimizer, loss, epoch, [inner.encoder.parameters(), inner.decoder.parameters()],
                           settings.grad_clip_norm, sync=sync)
    sdf_value = sdf_term.detach().reshape(1)
    distributed.all_reduce_(sdf_value, mean=True)  # the rank's weighted share: its mean is the global batch's
    return value, float(sdf_value), codes.detach()


def svr_schedules(specs: Mapping) -> list[Callable[[int], float]]:
    """[decoder schedule, encoder schedule] (the optimizer's group order) as the original applies them.

    Two LearningRateSchedule entries: the decoder gets the first, the encoder the second;
    one entry: both.  With DecoderLearningRateFactor f (ours, opt-in) the decoder's rate is
    the encoder's times f.
    """
    entries = specs["LearningRateSchedule"]
    dec = make_schedule(entries[0])
    enc = make_schedule(entries[1]) if len(entries) > 1 else dec
    factor = specs.get("DecoderLearningRateFactor")
    if factor is not None:
        return [lambda epoch: enc(epoch) * float(factor), enc]
    return [dec, enc]


def make_optimizer(net: EncoderDecoder, schedules) -> torch.optim.Optimizer:
    """Adam over [decoder, encoder] (the original's group order) at the epoch-1 rates
    (``lib.training.make_adam``: the same updates as torch's default Adam)."""
    return make_adam([{"params": net.decoder.parameters(), "lr": schedules[0](1)},
                      {"params": net.encoder.parameters(), "lr": schedules[1](1)}])


@torch.no_grad()
def test_losses(net: EncoderDecoder, dataset, settings, generator: torch.Generator, device=None) -> list[float]:
    """Clamped-L1 SDF loss of each full test batch (ScenesPerBatch items in split order, the last
    incomplete batch left out; item i seen from ``evaluation_view(i)``), networks in eval mode
    (restored afterwards).  ``dataset``: ``lib.datasets.RgbaSdfSamples``; ``generator`` draws the samples."""
    was = net.training
    net.eval()
    out = []
    try:
        order = torch.arange(len(dataset))
        views = torch.tensor([evaluation_view(i, dataset.renders.num_views) for i in range(len(dataset))])
        for scenes in order.split(settings.scenes_per_batch):
            if len(scenes) < settings.scenes_per_batch:
                break
            images, xyz, sdf = dataset.batch(scenes, settings.samples_per_scene, generator, device, views[scenes])
            codes = net(images)
            b, s = sdf.shape
            inputs = torch.cat((codes[:, None, :].expand(b, s, codes.shape[1]), xyz), 2).reshape(b * s, -1)
            out.append(float(clamped_l1(net.decoder(inputs), sdf, settings.clamp_distance)))
    finally:
        net.train(was)
    return out


def _svr_logs(logs: Mapping, epoch: int) -> dict:
    """The SVR_LOG_KEYS entries of a Logs.pth up to ``epoch`` (resume drops later ones)."""
    out = {}
    for key in SVR_LOG_KEYS:
        values, epochs = list(logs.get(key, [])), list(logs.get(key + "_epoch", []))
        keep = [i for i, e in enumerate(epochs) if e <= epoch] if len(epochs) == len(values) else []
        out[key] = [values[i] for i in keep]
        out[key + "_epoch"] = [epochs[i] for i in keep]
    return out


def train_svr(exp_dir: str | os.PathLike, specs: Mapping, dataset, device=None, *, resume: str | int | None = None,
              seed: int = 0, num_epochs: int | None = None, should_stop: Callable[[int], bool] | None = None,
              test_set=None):
    """Train encoder + decoder jointly on ``dataset`` (``lib.datasets.RgbaSdfSamples``); see the module docstring.

    Each epoch visits the training instances in random full batches of ScenesPerBatch (the
    last incomplete batch dropped; MeshSDFError when the split is smaller than one batch),
    with one random view per instance.  Writes the original's checkpoint files
    (``lib.experiment.save_svr_checkpoint``: ModelParameters/encoder_<e>.pth and
    decoder_<e>.pth, OptimizerParameters/<e>.pth with the RNG states and seed) and Logs.pth
    (lib.training's entries + ``loss_sdf`` per step and ``loss_sdf_test`` per test batch of
    ``test_set``, every epoch; none without a test set), with the cadence, resume and stop
    semantics of ``lib.training.train_auto_decoder`` (``resume="latest"`` with no checkpoint
    yet is a fresh start; ``should_stop(epoch)`` true on any rank saves ``latest`` and
    returns).  A fresh run starts the decoder from ``DecoderInit``'s latest decoder when the
    specs name one.  Returns a ``lib.training.TrainResult`` (decoder = the EncoderDecoder,
    latent_codes = None).

    Several processes (torchrun, lib.training.distributed.init_distributed called first, ``device``
    its device): encoder and decoder are one DDP module, so their gradients are averaged and
    every rank applies the same Adam update; each global batch of ScenesPerBatch instances
    is drawn alike on every rank and split between them (``local_share``), so the specs mean
    the same optimisation on any number of processes.  There is no latent table to
    synchronise: each code is the encoder's output for the batch's image and lives for one
    step (LatentCodes/ is not written).  BatchNorm in the encoder ("bn") uses the global
    batch's statistics on CUDA (SyncBatchNorm) but each rank's own share's on the CPU, and
    "bin" each rank's own share's everywhere: only "in" gives the 1-process result exactly;
    running statistics are rank 0's (DDP broadcasts buffers).  Every rank computes the same
    test loss.  Only rank 0 writes; its checkpoint is every rank's state, so ``resume``
    works with any number of processes.
    """
    device = torch.device(device) if device is not None else runtime.choose_device(None)
    exp_dir = Path(exp_dir)
    settings = TrainSettings.from_specs(specs, num_epochs)
    if len(dataset) < settings.scenes_per_batch:  # the last incomplete batch is dropped: no step at all
        raise MeshSDFError(f"the TrainSplit has {len(dataset)} instances, fewer than ScenesPerBatch = "
                           f"{settings.scenes_per_batch}; lower ScenesPerBatch in specs.json")
    schedules = svr_schedules(specs)
    world, main = distributed.world_size(), distributed.is_main_process()
    runtime.seed_everything(seed)
    resume = resume_point(exp_dir, resume)  # before DecoderInit: "latest" with nothing saved is a fresh start
    net = network_from_specs(specs)
    if specs.get("DecoderInit") and resume is None:
        init = resolve_path(specs["DecoderInit"])
        epoch0 = experiment.load_model_state(init, net.decoder, "latest", map_location="cpu")
        if main:
            info(f"decoder initialised from {init} (epoch {epoch0})")
    net = distributed.sync_batchnorm(net.to(device))
    optimizer = make_optimizer(net, schedules)
    # one generator for batches, views and samples, in step on every rank (same seed, same draws)
    sampler = torch.Generator(device=dataset.device)
    sampler.manual_seed(seed)

    def save(label, epoch):
        experiment.save_svr_checkpoint(exp_dir, label, epoch, net.encoder, net.decoder, optimizer,
                                       extra={"rng_state": runtime.rng_state(sampler), "seed": seed})

    def load(label):
        return experiment.load_svr_checkpoint(exp_dir, label, net.encoder, net.decoder, optimizer, map_location=device)

    book = EpochBook(exp_dir, settings, save, "train_svr")
    seed = book.resume(resume, net, optimizer, None, sampler, seed, device, load=load)
    book.logs.update(_svr_logs(experiment.load_logs(exp_dir) if resume is not None else {}, book.last_saved))
    ddp = distributed.wrap_ddp(net, device)
    distributed.check_global_batch(settings.scenes_per_batch)
    # no parameters outside DDP: the sync only makes the logged loss the global batch's
    sync = distributed.GradientSync() if world > 1 else None
    try:
        for epoch in book.epochs(optimizer, schedules, seed):
            net.train()
            losses, sdf_losses = [], []
            norms = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's sum of code norms, count
            for scenes in scene_batches(len(dataset), settings.scenes_per_batch, sampler, drop_last=True):
                # the whole global batch is drawn on every rank to keep the generators in step
                batch = dataset.batch(scenes, settings.samples_per_scene, sampler, device)
                part, weight = distributed.local_share(len(scenes))
                try:
                    value, sdf_value, c = train_step(ddp, optimizer, [t[part] for t in batch], epoch, settings, net,
                                                     weight, sync)
                except NonFiniteLossError as err:
                    raise book.non_finite(err, "lower LearningRateSchedule") from None
                losses.append(value)
                sdf_losses.append(sdf_value)
                if weight > 0:  # a borrowed item (empty share) is not this rank's
                    norms[0] += c.norm(dim=1).sum().double()
                    norms[1] += len(c)
            distributed.all_reduce_(norms)  # the epoch's mean code norm over every rank, as in one process
            book.logs["loss_sdf"].extend(sdf_losses)
            book.logs["loss_sdf_epoch"].extend([epoch] * len(sdf_losses))
            if test_set is not None:
                g = torch.Generator(device=test_set.device).manual_seed(1_000_003 * (seed + 1) + epoch)
                tests = test_losses(net, test_set, settings, g, device)
                book.logs["loss_sdf_test"].extend(tests)
                book.logs["loss_sdf_test_epoch"].extend([epoch] * len(tests))
            if book.end_epoch(losses, float(norms[0] / norms[1].clamp_min(1)), net,
                              bool(should_stop and should_stop(epoch))):
                return TrainResult(net, None, epoch, True)
    finally:
        book.close()
    return TrainResult(net, None, book.epoch, False)
