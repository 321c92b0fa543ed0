"""Single-view reconstruction (SPEC section 8): specs, renders, encoder + decoder training,
per-view reconstruction with silhouette refinement, and the metrics table.

Pieces, each usable alone (the scripts train_svr.py, reconstruct_svr.py, metrics_svr.py
and prepare_data.py only parse arguments and call them):

- ``SVR_KEYS``: the specs keys of an SVR experiment, on top of lib.specs.DEEPSDF_KEYS.
- ``render_views``: DISN-layout RGBA renders of a mesh (prepare_data.py).
- ``EncoderDecoder``: image encoder + DeepSDF decoder in one module (one checkpoint file).
- ``svr_loss`` / ``train_step`` / ``train_svr``: joint training on the SDF loss.
- ``reconstruct_view``: encoder code -> raw mesh -> refinement of the code on the L1
  silhouette loss through the MeshSDF layer, with per-iteration logs.
- ``collect_results`` / ``metrics_table`` / ``plot_curves``: the metrics of metrics_svr.py.

Units: Chamfer distances are squared-L2 means (lib.metrics, the DeepSDF/MeshSDF convention)
in the normalised frame (unit sphere); tables show them x1000.  Normal consistency is the
mean |cos| between rendered normal images of prediction and ground truth, in [0, 1]
(tables: %).
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np
import torch
from torch import nn

from lib import checkpoint, runtime
from lib.specs import ENCODER_DEFAULTS, resolve_path
from lib.errors import MeshSDFError
from lib.log import info

# --------------------------------------------------------------------------- renders

DISN_AZIMUTH = (0.0, 360.0)        # degrees, uniform (DISN / 3D-R2N2 renders)
DISN_ELEVATION = (10.0, 40.0)      # degrees, uniform
TOY_DISTANCE_RATIO = (0.65, 0.8)   # x CAM_MAX_DIST: objects of radius ~0.5 fill ~2/3 of the image


def random_disn_cameras(count: int, rng: np.random.Generator, image_size: int = 224,
                        distance_ratio: tuple[float, float] = TOY_DISTANCE_RATIO):
    """``count`` DISN cameras (batched ``Camera``) at uniformly random azimuth / elevation / distance."""
    from lib.camera import disn_camera

    az = rng.uniform(*DISN_AZIMUTH, size=count)
    el = rng.uniform(*DISN_ELEVATION, size=count)
    ratio = rng.uniform(*distance_ratio, size=count)
    return disn_camera(az.tolist(), el.tolist(), ratio.tolist(), image_size=image_size, dtype=torch.float64)


def render_rgba(verts: torch.Tensor, faces: torch.Tensor, camera, color=(0.8, 0.8, 0.8),
                supersample: int = 2) -> torch.Tensor:
    """Anti-aliased Lambertian RGBA renders (B, S, S, 4) float in [0, 1], straight alpha.

    Rendered with ``lib.render.shade`` at ``supersample`` times the camera's size and
    box-filtered down, so alpha is the pixel's coverage (as Blender's) and rgb the mean
    colour of the covered part.
    """
    from lib.render import shade

    s = camera.image_size[0]
    big = shade(verts, faces, camera.resized(s * supersample), color=color)          # (B, sS, sS, 4)
    big = big if big.dim() == 4 else big[None]
    rgba = torch.nn.functional.avg_pool2d(big.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    alpha = rgba[..., 3:]
    rgb = torch.where(alpha > 0, rgba[..., :3] / alpha.clamp_min(1e-12), torch.zeros_like(rgba[..., :3]))
    return torch.cat([rgb.clamp(0, 1), alpha], -1)


def render_views(verts, faces, out_dir: str | os.PathLike, views: int, image_size: int = 224,
                 seed: int = 0, color=(0.8, 0.8, 0.8), chunk: int = 8, supersample: int = 2) -> None:
    """Write ``out_dir/NN.png`` (RGBA) and ``out_dir/rendering_metadata.txt`` for ``views`` views.

    verts (V, 3), faces (F, 3) in the frame the metadata describes (cameras look at the
    origin).  Views are random like DISN's (``random_disn_cameras`` with ``seed``).
    """
    from lib.camera import Camera, write_disn_metadata
    from lib.data import METADATA_FILE, view_image_name
    from lib.io import save_png

    out_dir = Path(out_dir)
    v = torch.as_tensor(np.asarray(verts), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(faces), dtype=torch.int64)
    cams64 = random_disn_cameras(views, np.random.default_rng(seed), image_size)
    cams = cams64.to(dtype=torch.float32)  # float32 rasterises several times faster
    for a in range(0, views, chunk):
        idx = range(a, min(a + chunk, views))
        sub = Camera(cams.R[a:idx.stop], cams.t[a:idx.stop], cams.focal[a:idx.stop], cams.principal[a:idx.stop],
                     cams.image_size, batched=True)
        rgba = render_rgba(v, f, sub, color=color, supersample=supersample)
        for k, img in zip(idx, rgba):
            save_png(out_dir / view_image_name(k), img.float().numpy())
    write_disn_metadata(out_dir / METADATA_FILE, cams64)


# --------------------------------------------------------------------------- datasets

def _split_instances(specs: Mapping, key: str):
    from lib.data import read_split

    if not specs.get(key):
        raise MeshSDFError(f"specs.json has no {key}; add the split file of the instances to use")
    return read_split(resolve_path(specs[key]))


def render_set_from_specs(specs: Mapping, split_key: str = "TestSplit", instances=None, cache="auto"):
    """The ``RenderSet`` of ``specs[split_key]`` (or of ``instances``) as specs.json describes it."""
    from lib.data import RenderSet

    insts = instances if instances is not None else _split_instances(specs, split_key)
    return RenderSet(resolve_path(specs["DataSource"]), insts, specs["ImageSize"], specs["NumberOfViews"],
                     specs["RendersPath"], specs["NormalizationPath"], cache=cache)


def training_set_from_specs(specs: Mapping, device=None):
    """SDF samples + renders of the TrainSplit (``lib.data.RgbaSdfSamples``)."""
    from lib.data import RgbaSdfSamples, SdfSamples

    insts = _split_instances(specs, "TrainSplit")
    sdf = SdfSamples(resolve_path(specs["DataSource"]), insts, device=device)
    return RgbaSdfSamples(sdf, render_set_from_specs(specs, instances=insts))


def ground_truth_mesh(specs: Mapping, inst) -> tuple[torch.Tensor, torch.Tensor]:
    """The normalised ground-truth mesh of ``inst``: verts (V, 3) float32, faces (F, 3) int64."""
    from lib.data import instance_path
    from lib.io import read_mesh

    path = instance_path(specs["MeshesPath"], resolve_path(specs["DataSource"]), inst)
    if not path.is_file():
        raise MeshSDFError(f"ground-truth mesh not found: {path}; fix MeshesPath in specs.json or run prepare_data.py")
    v, f = read_mesh(path)
    return torch.from_numpy(v), torch.from_numpy(f)


# --------------------------------------------------------------------------- networks

class EncoderDecoder(nn.Module):
    """Image encoder + DeepSDF decoder, saved as one ``ModelParameters`` file.

    ``encoder``: RGBA (B, 4, S, S) in [0, 1] -> codes (B, L); ``decoder``: DeepSDF calling
    convention.  ``forward(images)`` returns the codes.
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def encoder_from_specs(specs: Mapping) -> nn.Module:
    from lib.models.encoder import Encoder

    e = {**ENCODER_DEFAULTS, **specs["Encoder"]}
    return Encoder(int(specs["CodeLength"]), depth=int(e["Depth"]), norm=e["Normalization"], widths=tuple(e["Widths"]))


def network_from_specs(specs: Mapping) -> EncoderDecoder:
    from lib.models.decoder import decoder_from_specs

    return EncoderDecoder(encoder_from_specs(specs), decoder_from_specs(specs))


def load_network(exp_dir: str | os.PathLike, specs: Mapping, epoch: str | int = "latest", device=None) -> EncoderDecoder:
    """The trained encoder + decoder of an SVR experiment, in eval mode on ``device``."""
    net = network_from_specs(specs)
    net.checkpoint_epoch = checkpoint.load_model_state(exp_dir, net, epoch, map_location="cpu")
    return net.to(device).eval()


# --------------------------------------------------------------------------- training

def svr_loss(net: EncoderDecoder, images: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor, epoch: int,
             settings) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one batch: codes = encoder(images); clamped L1 SDF loss + ramped code regularisation.

    images (B, 4, S, S), xyz (B, N, 3), sdf (B, N) on the network's device.  Returns
    (total, sdf term, regularisation term, codes (B, L)).
    """
    from lib.train import auto_decoder_loss

    codes = net(images)
    total, sdf_loss, reg = auto_decoder_loss(net.decoder, codes, xyz, sdf, epoch, settings)
    return total, sdf_loss, reg, codes


def train_step(net: nn.Module, optimizer: torch.optim.Optimizer, batch: Sequence[torch.Tensor], epoch: int,
               settings, model: EncoderDecoder | None = None, weight: float = 1.0,
               sync: Callable[[torch.Tensor], torch.Tensor] | None = None) -> tuple[float, torch.Tensor]:
    """One optimisation step on ``batch`` = (images, xyz, sdf); returns (loss, codes (B, L) detached).

    ``net`` is what runs forward (the EncoderDecoder, or a DDP wrapper of it, in which case
    ``model`` is the wrapped EncoderDecoder whose decoder computes the SDF).  ``weight``
    scales the batch's mean loss and ``sync`` runs after backward (a rank's
    ``lib.distributed.local_share`` weight and ``GradientSync`` under torchrun; the
    returned loss is then the global batch's).  Raises lib.train.NonFiniteLossError before
    updating on a NaN/inf loss.
    """
    from lib.train import auto_decoder_loss, optimizer_step

    images, xyz, sdf = batch
    inner = model if model is not None else net
    codes = net(images)
    loss, _, _ = auto_decoder_loss(inner.decoder, codes, xyz, sdf, epoch, settings, weight)
    value = optimizer_step(optimizer, loss, epoch, list(inner.parameters()), settings.grad_clip_norm, sync=sync)
    return value, codes.detach()


def svr_schedules(specs: Mapping) -> list[Callable[[int], float]]:
    """[encoder schedule, decoder schedule = encoder's x DecoderLearningRateFactor]."""
    from lib.train import make_schedule

    enc = make_schedule(specs["LearningRateSchedule"][0])
    factor = float(specs["DecoderLearningRateFactor"])
    return [enc, lambda epoch: enc(epoch) * factor]


def make_optimizer(net: EncoderDecoder, schedules) -> torch.optim.Optimizer:
    return torch.optim.Adam([{"params": net.encoder.parameters(), "lr": schedules[0](1)},
                             {"params": net.decoder.parameters(), "lr": schedules[1](1)}])


def train_svr(exp_dir: str | os.PathLike, specs: Mapping, dataset, device=None, *, resume: str | int | None = None,
              seed: int = 0, num_epochs: int | None = None, should_stop: Callable[[int], bool] | None = None):
    """Train encoder + decoder jointly (SPEC section 8) on ``dataset`` (``lib.data.RgbaSdfSamples``).

    Each epoch visits every training instance once in random batches of ScenesPerBatch,
    with one random view per instance.  Writes checkpoints (``ModelParameters`` holds the
    EncoderDecoder state, keys ``encoder.*`` / ``decoder.*``; ``OptimizerParameters`` the
    Adam state, RNG states and seed) and Logs.pth, with the cadence, resume and stop
    semantics of ``lib.train.train_auto_decoder`` (``resume="latest"`` with no checkpoint
    yet is a fresh start; ``should_stop(epoch)`` true on any rank saves ``latest`` and
    returns).  A fresh run starts the decoder from ``DecoderInit``'s latest decoder when the
    specs name one.  Returns a ``lib.train.TrainResult`` (decoder = the EncoderDecoder,
    latent_codes = None).

    Several processes (torchrun, lib.distributed.init_distributed called first, ``device``
    its device): encoder and decoder are one DDP module, so their gradients are averaged and
    every rank applies the same Adam update; each global batch of ScenesPerBatch instances
    is drawn alike on every rank and split between them (``local_share``), so the specs mean
    the same optimisation on any number of processes.  There is no latent table to
    synchronise: SVR trains no per-scene codes, each code is the encoder's output for the
    batch's image and lives for one step (nothing like DeepSDF's all-reduced embedding is
    needed; LatentCodes/ is not written).  BatchNorm in the encoder ("bn"/"bin") uses the
    global batch's statistics on CUDA (SyncBatchNorm) but each rank's own share's on the CPU,
    where only "in" gives the 1-process result exactly; running statistics are rank 0's
    (DDP broadcasts buffers).  Only rank 0 writes; its checkpoint is every rank's state, so
    ``resume`` works with any number of processes.
    """
    from lib import distributed
    from lib.data import scene_batches
    from lib.train import EpochBook, NonFiniteLossError, TrainResult, TrainSettings, resume_point

    device = torch.device(device) if device is not None else runtime.choose_device(None)
    exp_dir = Path(exp_dir)
    settings = TrainSettings.from_specs(specs, num_epochs)
    schedules = svr_schedules(specs)
    world, main = distributed.world_size(), distributed.is_main_process()
    runtime.seed_everything(seed)
    resume = resume_point(exp_dir, resume)  # before DecoderInit: "latest" with nothing saved is a fresh start
    net = network_from_specs(specs)
    if specs.get("DecoderInit") and resume is None:
        init = resolve_path(specs["DecoderInit"])
        epoch0 = checkpoint.load_model_state(init, net.decoder, "latest", map_location="cpu")
        if main:
            info(f"decoder initialised from {init} (epoch {epoch0})")
    net = distributed.sync_batchnorm(net.to(device))
    optimizer = make_optimizer(net, schedules)
    # one generator for batches, views and samples, in step on every rank (same seed, same draws)
    sampler = torch.Generator(device=dataset.device)
    sampler.manual_seed(seed)

    def save(label, epoch):
        checkpoint.save_checkpoint(exp_dir, label, epoch, net, optimizer,
                                  extra={"rng_state": runtime.rng_state(sampler), "seed": seed})

    book = EpochBook(exp_dir, settings, save, "train_svr")
    seed = book.resume(resume, net, optimizer, None, sampler, seed, device)
    ddp = distributed.wrap_ddp(net, device)
    distributed.check_global_batch(settings.scenes_per_batch)
    # no parameters outside DDP: the sync only makes the logged loss the global batch's
    sync = distributed.GradientSync() if world > 1 else None
    try:
        for epoch in book.epochs(optimizer, schedules, seed):
            net.train()
            losses = []
            norms = torch.zeros(2, dtype=torch.float64, device=device)  # this rank's sum of code norms, count
            for scenes in scene_batches(len(dataset), settings.scenes_per_batch, sampler):
                # the whole global batch is drawn on every rank to keep the generators in step
                batch = dataset.batch(scenes, settings.samples_per_scene, sampler, device)
                part, weight = distributed.local_share(len(scenes))
                try:
                    value, c = train_step(ddp, optimizer, [t[part] for t in batch], epoch, settings, net, weight, sync)
                except NonFiniteLossError as err:
                    raise book.non_finite(err, "lower LearningRateSchedule") from None
                losses.append(value)
                if weight > 0:  # a borrowed item (empty share) is not this rank's
                    norms[0] += c.norm(dim=1).sum().double()
                    norms[1] += len(c)
            distributed.all_reduce_(norms)  # the epoch's mean code norm over every rank, as in one process
            if book.end_epoch(losses, float(norms[0] / norms[1].clamp_min(1)), net,
                              bool(should_stop and should_stop(epoch))):
                return TrainResult(net, None, epoch, True)
    finally:
        book.close()
    return TrainResult(net, None, book.epoch, False)


# --------------------------------------------------------------------------- reconstruction

@dataclass
class RefineSettings:
    """Specs values of the reconstruction (see SVR_KEYS)."""

    resolution: int = 256
    iterations: int = 100
    lr: float = 5e-5
    mode: str = "sparse"
    sigma: float = 1e-5
    faces_per_pixel: int | None = 25
    chamfer_samples: int = 30000

    @classmethod
    def from_specs(cls, specs: Mapping, **overrides) -> "RefineSettings":
        s = cls(resolution=int(specs["ReconstructionResolution"]), iterations=int(specs["RefinementIterations"]),
                lr=float(specs["RefinementLearningRate"]), mode=specs["ExtractionMode"],
                sigma=float(specs["SilhouetteSigma"]), faces_per_pixel=specs["SilhouetteFacesPerPixel"],
                chamfer_samples=int(specs["ChamferSamples"]))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s


LOG_KEYS = ("silhouette_loss", "chamfer", "normal_consistency", "latent_norm", "iou")


@dataclass
class ViewResult:
    """Outcome of ``reconstruct_view``.

    raw / refined: (verts (V, 3), faces (F, 3)) CPU meshes before and after refinement;
    silhouettes: "input", "raw", "refined" (S, S) float in [0, 1]; log: LOG_KEYS -> (T + 1,)
    float64 arrays, entry 0 = raw mesh, entry T = refined mesh (NaN where a mesh was empty);
    code / refined_code (L,); seconds: wall time of the refinement.
    """

    raw: tuple[torch.Tensor, torch.Tensor]
    refined: tuple[torch.Tensor, torch.Tensor]
    silhouettes: dict
    log: dict
    code: torch.Tensor
    refined_code: torch.Tensor
    seconds: float = 0.0
    messages: list = field(default_factory=list)


class GroundTruth:
    """What the per-iteration metrics compare against, prepared once per view.

    points (n, 3): surface samples of the GT mesh (fixed seed); normals (S, S, 3): its
    rendered world-frame normal image from the view's camera.
    """

    def __init__(self, verts: torch.Tensor, faces: torch.Tensor, camera, samples: int, device=None):
        from lib.metrics import sample_surface
        from lib.render import normal_image

        self.samples = int(samples)
        v = verts.to(device=device, dtype=torch.float32)
        f = faces.to(device=device, dtype=torch.int64)
        self.points = sample_surface(v, f, self.samples, torch.Generator().manual_seed(0)).cpu()
        self.normals = normal_image(v, f, camera.to(device=device, dtype=torch.float32)).cpu()

    def chamfer(self, verts: torch.Tensor, faces: torch.Tensor) -> float:
        from lib.metrics import chamfer_distance, sample_surface

        if faces.shape[0] == 0:
            return math.nan
        pts = sample_surface(verts.detach().float(), faces, self.samples, torch.Generator().manual_seed(1)).cpu()
        return chamfer_distance(pts, self.points, squared=True)

    def normal_consistency(self, verts: torch.Tensor, faces: torch.Tensor, camera) -> float:
        from lib.metrics import normal_consistency
        from lib.render import normal_image

        if faces.shape[0] == 0:
            return math.nan
        n = normal_image(verts.detach().float(), faces, camera.to(device=verts.device, dtype=torch.float32))
        return normal_consistency(n.cpu(), self.normals)


def reconstruct_view(decoder: nn.Module, code: torch.Tensor, alpha: torch.Tensor, camera, gt: GroundTruth | None,
                     settings: RefineSettings, on_iteration: Callable[[int, dict], None] | None = None) -> ViewResult:
    """Raw mesh of ``code``, then ``settings.iterations`` Adam steps on the code (decoder frozen).

    decoder: DeepSDF decoder (put in eval mode and frozen by lib.optimize); code (L,) from
    the encoder; alpha (S, S) float in [0, 1], the input image's alpha; camera: the view's
    unbatched Camera at size S in the SDF frame; gt: metrics reference (None: Chamfer and
    normal consistency are NaN).  The loop is ``lib.optimize`` with an L1
    ``SilhouetteLoss`` (sigma and faces per pixel of ``settings``) and the mesh extracted at
    ``settings.resolution`` with ``settings.mode``.  ``on_iteration(i, entry)`` sees each
    log entry.  A surface that vanishes ends the refinement (the message is kept).
    """
    from lib.metrics import silhouette_iou
    from lib.optimize import LatentOptimizer, SilhouetteLoss, optimize

    alpha = alpha.detach().float().cpu()
    loss_fn = SilhouetteLoss(camera.to(device=code.device, dtype=torch.float32), alpha, loss="l1",
                             sigma=settings.sigma, faces_per_pixel=settings.faces_per_pixel)
    opt = LatentOptimizer(decoder, code, loss_fn, lr=settings.lr, resolution=settings.resolution, mode=settings.mode)
    kept = {}          # the first ("raw") and the latest evaluated iterations

    def metrics(it) -> dict:
        entry = {"silhouette_loss": it.loss, "latent_norm": float(it.latent.norm()),
                 "iou": silhouette_iou(it.image.cpu(), alpha),
                 "chamfer": gt.chamfer(it.verts, it.faces) if gt is not None else math.nan,
                 "normal_consistency": (gt.normal_consistency(it.verts, it.faces, loss_fn.camera) if gt is not None
                                        else math.nan)}
        kept.setdefault("first", it)
        kept["last"] = it
        if on_iteration is not None:
            on_iteration(len(records), entry)
        records.append(entry)
        return entry

    records: list[dict] = []
    run = optimize(opt, settings.iterations, callbacks=[metrics], final_callbacks=[metrics], show_progress=False)
    messages = [run.stopped] if run.stopped else []
    empty = (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))
    if not kept:  # no surface for the encoder's code at all
        messages = [f"the encoder's code has no surface at resolution {settings.resolution} (the SDF has one sign "
                    "on the grid): nothing to refine; is the network trained?"]
        records.append({k: math.nan for k in LOG_KEYS})
        blank = torch.zeros_like(alpha)
        return ViewResult(empty, empty, {"input": alpha, "raw": blank, "refined": blank},
                          {k: np.asarray([r[k] for r in records], dtype=np.float64) for k in LOG_KEYS},
                          code.detach().reshape(-1).cpu(), code.detach().reshape(-1).cpu(), run.seconds, messages)
    first, last = kept["first"], kept["last"]
    return ViewResult((first.verts.cpu(), first.faces.cpu()), (last.verts.cpu(), last.faces.cpu()),
                      {"input": alpha, "raw": first.image.cpu(), "refined": last.image.cpu()},
                      {k: np.asarray([r[k] for r in records], dtype=np.float64) for k in LOG_KEYS},
                      code.detach().reshape(-1).cpu(), last.latent.detach().reshape(-1).cpu(), run.seconds, messages)


def view_dir(exp_dir: str | os.PathLike, instance: str, view: int) -> Path:
    """``<exp>/Reconstructions/<instance>/<NN>/``: where reconstruct_svr.py writes one view."""
    return checkpoint.reconstructions_dir(exp_dir) / instance / f"{int(view):02d}"


LOG_FILE = "log.npz"


def save_view(out: Path, result: ViewResult, instance: str, view: int) -> None:
    """Write predicted.ply, refined.ply, {input,raw,refined}_silhouette.png, log.npz, summary.json."""
    from lib.io import atomic_write, save_png, write_ply

    write_ply(out / "predicted.ply", *result.raw)
    write_ply(out / "refined.ply", *result.refined)
    for name, img in result.silhouettes.items():
        save_png(out / f"{name}_silhouette.png", img.clamp(0, 1).numpy())
    with atomic_write(out / LOG_FILE, suffix=".tmp.npz") as tmp:
        np.savez(tmp, code=result.code.numpy(), refined_code=result.refined_code.numpy(), **result.log)
    summary = {"instance": instance, "view": int(view), "seconds": result.seconds,
               "iterations": int(len(result.log["silhouette_loss"]) - 1), "messages": result.messages,
               **{f"raw_{k}": _finite_or_none(result.log[k][0]) for k in LOG_KEYS},
               **{f"refined_{k}": _finite_or_none(result.log[k][-1]) for k in LOG_KEYS}}
    with atomic_write(out / "summary.json") as tmp:
        tmp.write_text(json.dumps(summary, indent=1) + "\n")


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None


# --------------------------------------------------------------------------- metrics

def collect_results(exp_dir: str | os.PathLike) -> list[dict]:
    """Every ``Reconstructions/<instance>/<NN>/log.npz`` of an experiment, sorted.

    Each entry: instance, view, and the LOG_KEYS arrays (T + 1,).  Raises MeshSDFError if
    there are none or one cannot be read.
    """
    root = checkpoint.reconstructions_dir(exp_dir)
    paths = sorted(root.glob(f"*/*/{LOG_FILE}")) if root.is_dir() else []
    if not paths:
        raise MeshSDFError(f"no reconstructions in {root}; run reconstruct_svr.py -e {exp_dir} first")
    out = []
    for p in paths:
        try:
            with np.load(p, allow_pickle=False) as z:
                entry = {k: np.asarray(z[k], dtype=np.float64) for k in LOG_KEYS}
        except Exception as err:
            raise MeshSDFError(f"cannot read {p}: {type(err).__name__}: {err}; rerun reconstruct_svr.py") from None
        out.append({"instance": p.parent.parent.name, "view": int(p.parent.name), **entry})
    return out


TABLE_COLUMNS = ("instance", "view", "chamfer_raw_x1000", "chamfer_refined_x1000", "chamfer_improvement_pct",
                 "nc_raw_pct", "nc_refined_pct", "nc_improvement_pct")


def _improvement(raw: float, refined: float, lower_is_better: bool) -> float:
    if not (math.isfinite(raw) and math.isfinite(refined)) or raw == 0:
        return math.nan
    return 100.0 * ((raw - refined) if lower_is_better else (refined - raw)) / abs(raw)


def metrics_rows(results: Sequence[Mapping]) -> tuple[list[dict], dict]:
    """Per-view rows (TABLE_COLUMNS) and the summary over all views.

    Improvement % = 100 (raw - refined) / raw for Chamfer and 100 (refined - raw) / raw for
    normal consistency (positive = better).  The summary holds the means of the per-view
    values (NaN entries skipped), the improvement of the means, and ``fraction_improved``:
    the fraction of views whose Chamfer went down.
    """
    rows = []
    for r in results:
        c0, c1 = float(r["chamfer"][0]) * 1000, float(r["chamfer"][-1]) * 1000
        n0, n1 = float(r["normal_consistency"][0]) * 100, float(r["normal_consistency"][-1]) * 100
        rows.append({"instance": r["instance"], "view": r["view"], "chamfer_raw_x1000": c0,
                     "chamfer_refined_x1000": c1, "chamfer_improvement_pct": _improvement(c0, c1, True),
                     "nc_raw_pct": n0, "nc_refined_pct": n1, "nc_improvement_pct": _improvement(n0, n1, False)})

    def mean(key):
        vals = [row[key] for row in rows if math.isfinite(row[key])]
        return float(np.mean(vals)) if vals else math.nan

    both = [row for row in rows if math.isfinite(row["chamfer_raw_x1000"]) and math.isfinite(row["chamfer_refined_x1000"])]
    summary = {"instance": "mean", "view": len(rows)}
    for key in TABLE_COLUMNS[2:]:
        summary[key] = mean(key)
    summary["chamfer_improvement_pct"] = _improvement(summary["chamfer_raw_x1000"], summary["chamfer_refined_x1000"], True)
    summary["nc_improvement_pct"] = _improvement(summary["nc_raw_pct"], summary["nc_refined_pct"], False)
    summary["fraction_improved"] = (sum(r["chamfer_refined_x1000"] < r["chamfer_raw_x1000"] for r in both) / len(both)
                                    if both else math.nan)
    return rows, summary


def metrics_table(rows: Sequence[Mapping], summary: Mapping) -> str:
    """A fixed-width text table of ``metrics_rows`` (per view, then the mean line)."""
    head = ("instance", "view", "CD raw x1e3", "CD refined x1e3", "CD impr %", "NC raw %", "NC refined %", "NC impr %")
    lines = [head]
    for r in list(rows) + [summary]:
        lines.append((str(r["instance"]), str(r["view"])) + tuple(f"{r[k]:.3f}" if k.startswith("chamfer")
                                                                   and not k.endswith("pct") else f"{r[k]:.2f}"
                                                                   for k in TABLE_COLUMNS[2:]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    out = [fmt(lines[0]), "-" * len(fmt(lines[0]))] + [fmt(line) for line in lines[1:-1]]
    out += ["-" * len(fmt(lines[0])), fmt(lines[-1])]
    out.append(f"refinement lowered the Chamfer distance in {summary['fraction_improved'] * 100:.1f} % of "
               f"{summary['view']} views")
    return "\n".join(out) + "\n"


def metrics_csv(rows: Sequence[Mapping], summary: Mapping) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in list(rows) + [summary]:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in TABLE_COLUMNS})
    return buf.getvalue()


def plot_curves(results: Sequence[Mapping], path: str | os.PathLike) -> None:
    """PNG of the per-iteration curves: one thin line per view and the mean, for each LOG_KEYS
    except IoU (Chamfer x1000, normal consistency %)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lib.io import atomic_write

    panels = [("silhouette_loss", "silhouette L1 loss", 1.0), ("chamfer", "Chamfer x1000", 1000.0),
              ("normal_consistency", "normal consistency %", 100.0), ("latent_norm", "latent norm", 1.0)]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title, scale) in zip(axes, panels):
        curves = [r[key] * scale for r in results]
        for c in curves:
            ax.plot(c, color="0.7", lw=0.7)
        n = min(len(c) for c in curves)
        ax.plot(np.nanmean(np.stack([c[:n] for c in curves]), axis=0), color="C3", lw=2, label="mean")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
