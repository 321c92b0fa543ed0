"""Single-view reconstruction of one view: encoder code -> raw mesh -> silhouette refinement,
and the original's output folder of an instance.

The refinement is the original's: Adam (lr 5e-5) on the code, the decoder frozen,
``--iterations`` 100 + 1 = 101 steps, the mesh extracted every step with the fast heuristic
at N = 256, loss = mean |soft silhouette - input alpha| with pytorch3d's soft-silhouette
settings (sigma 1e-4, blur radius log(1/1e-4 - 1) x 1e-5, 25 faces per pixel), NaN entries
of dL/dx set to 0, and ``--regularize w`` adding w mean(z^2).  Each step logs, for the mesh
it starts from, the silhouette term of the loss (without the regulariser), Chamfer and
image-space normal consistency to the ground truth (lib.svr.evaluate), mean z^2 and (ours)
the silhouette IoU: 101 entries, the first of the raw mesh (profiler label ``svr.metrics``;
Chamfer and normal consistency are computed beside the step's soft silhouette, see
``RefinementLoss``, and only collected there).
The refined mesh is the one of the code after the last step (not in the logs, as in the original).
"""
from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

import numpy as np
import torch
from torch import nn

from .. import experiment
from ..errors import MeshSDFError
from ..io import save_png, write_ply
from ..metrics import silhouette_iou
from ..optimize import LatentOptimizer, optimize
from ..render import DEFAULT, SVR_EPS, RenderSettings, blur_radius, silhouette
from ..runtime.threads import concurrently
from .evaluate import normal_picture

__all__ = ["RefineSettings", "RefinementLoss", "LOG_FILES", "LOG_KEYS", "META_FILE", "ViewResult", "reconstruct_view",
           "output_root", "instance_folder_name", "normal_map", "save_instance"]


@dataclass
class RefineSettings:
    """The reconstruction settings (specs keys of lib.experiment.specs.SVR_KEYS, script flags over them)."""

    resolution: int = 256
    iterations: int = 100
    lr: float = 5e-5
    mode: str = "fast"
    sigma: float = 1e-4
    blur_ratio: float = 0.1
    faces_per_pixel: int | None = 25
    chamfer_samples: int = 10000
    regularize: float = 0.0
    dense_start: bool = False   # fast mode: the first grid dense (the original's) instead of the band

    @classmethod
    def from_specs(cls, specs: Mapping, **overrides) -> "RefineSettings":
        s = cls(resolution=int(specs["ReconstructionResolution"]), iterations=int(specs["RefinementIterations"]),
                lr=float(specs["RefinementLearningRate"]), mode=specs["ExtractionMode"],
                sigma=float(specs["SilhouetteSigma"]), blur_ratio=float(specs["BlurSigmaRatio"]),
                faces_per_pixel=specs["SilhouetteFacesPerPixel"], chamfer_samples=int(specs["ChamferSamples"]))
        for k, v in overrides.items():
            if v is not None:
                setattr(s, k, v)
        return s

    @property
    def radius(self) -> float:
        """The rasteriser's blur radius (squared NDC): log(1/eps - 1) x sigma x blur_ratio."""
        return blur_radius(self.sigma * self.blur_ratio, SVR_EPS)


_ONE_THREAD = RenderSettings(split_nearest=False)


class RefinementLoss:
    """mean |soft silhouette - alpha| (+ regularize x mean(z^2)), the NaN entries of dL/dx zeroed.

    camera: unbatched Camera at the alpha's size S; alpha (S, S) in [0, 1].  ``latent`` (the
    optimised code) must be set before the first call when ``regularize`` > 0.  Calling it
    returns (loss scalar, soft silhouette (S, S)).

    ``beside``: None, or a function of the mesh (verts (V, 3) detached, faces (F, 3)) run side
    by side with the rendering of each call that builds a gradient (``lib.runtime.concurrently``:
    each on one thread, and the work inside either runs in order), its result kept in
    ``beside_result`` as (faces, result).  Why: the per-step metrics (KD-tree queries, a hard
    raster) and the soft silhouette are both mostly one-thread passes over the same new mesh,
    so the pair keeps both cores busy, where each alone splits small passes over two.
    """

    def __init__(self, camera, alpha: torch.Tensor, settings: RefineSettings, beside: Callable | None = None):
        self.camera, self.alpha = camera, alpha.detach()
        self.settings = settings
        self.latent: torch.Tensor | None = None
        self.beside = beside
        self.beside_result: tuple | None = None

    def render(self, verts: torch.Tensor, faces: torch.Tensor,
               speed: RenderSettings = DEFAULT) -> torch.Tensor:
        """The soft silhouette (S, S) of verts (V, 3), faces (F, 3); ``speed``: the renderer's
        ``RenderSettings`` (default the renderer's own default; they change no bit)."""
        s = self.settings
        return silhouette(verts, faces, self.camera, sigma=s.sigma, eps=SVR_EPS, faces_per_pixel=s.faces_per_pixel,
                          radius=s.radius, settings=speed)

    def __call__(self, verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if verts.requires_grad:
            # a degenerate face (zero-length edge) can give NaN; the original zeroes those entries
            verts.register_hook(lambda g: torch.nan_to_num(g, nan=0.0))
        if self.beside is not None and verts.requires_grad:
            mesh = verts.detach()
            # beside other work the renderer's halves would run in turn: no split selection
            image, done = concurrently([lambda: self.render(verts, faces, _ONE_THREAD),
                                        lambda: self.beside(mesh, faces)], verts.device)
            self.beside_result = (faces, done)
        else:
            image = self.render(verts, faces)
        loss = (image - self.alpha.to(device=image.device, dtype=image.dtype)).abs().mean()
        if self.settings.regularize > 0 and self.latent is not None:
            loss = loss + self.settings.regularize * self.latent.square().mean()
        return loss, image


LOG_FILES = {"silhouette_loss": "log_silhouette.npy", "chamfer": "log_chd.npy", "normal_consistency": "log_nc.npy",
             "latent": "log_latent.npy", "iou": "log_iou.npy"}
LOG_KEYS = tuple(LOG_FILES)
META_FILE = "meta.json"


@dataclass
class ViewResult:
    """Outcome of ``reconstruct_view``.

    raw / refined: (verts (V, 3), faces (F, 3)) CPU meshes before and after refinement;
    silhouettes: "input", "raw", "refined" (S, S) float in [0, 1]; log: LOG_KEYS -> (T + 1,)
    float64 arrays, entry i = the mesh step i started from (entry 0 = raw mesh; NaN where a
    mesh was empty), the refined mesh being the one after step T;
    code / refined_code (L,); seconds: wall time of the refinement; extra: our metrics of
    the raw and refined meshes beyond the original's (mesh-space normal consistency).
    """

    raw: tuple[torch.Tensor, torch.Tensor]
    refined: tuple[torch.Tensor, torch.Tensor]
    silhouettes: dict
    log: dict
    code: torch.Tensor
    refined_code: torch.Tensor
    seconds: float = 0.0
    messages: list = field(default_factory=list)
    extra: dict = field(default_factory=dict)


def reconstruct_view(decoder: nn.Module, code: torch.Tensor, alpha: torch.Tensor, camera, gt,
                     settings: RefineSettings, on_iteration: Callable[[int, dict], None] | None = None) -> ViewResult:
    """Raw mesh of ``code``, then ``settings.iterations`` + 1 Adam steps on the code (decoder frozen).

    decoder: DeepSDF decoder (put in eval mode and frozen by lib.optimize); code (L,) from
    the encoder, on the decoder's device; alpha (S, S) float in [0, 1], the input image's
    alpha; camera: the view's unbatched Camera at size S in the SDF frame; gt: a
    ``lib.svr.evaluate.GroundTruth`` (None: Chamfer and normal consistency are NaN).
    ``on_iteration(i, entry)`` sees each log entry.  A surface that vanishes ends the
    refinement (the message is kept).
    """
    dev = code.device
    alpha = alpha.detach().float().to(dev)
    # Chamfer and normal consistency of each step's mesh computed beside its rendering
    loss_fn = RefinementLoss(camera.to(device=dev, dtype=torch.float32), alpha, settings,
                             beside=gt.scores if gt is not None else None)
    # the logs hold no topology: no genus per step
    start = {"freeze": None} if settings.dense_start else {}   # freeze=None: the fast mode's dense first grid
    opt = LatentOptimizer(decoder, code, loss_fn, lr=settings.lr, resolution=settings.resolution, mode=settings.mode,
                          track_topology=False, **start)
    loss_fn.latent = opt.latent
    kept = {}          # the first ("raw") and the latest evaluated iterations
    records: list[dict] = []

    def metrics(it) -> dict:
        with torch.profiler.record_function("svr.metrics"):
            return log_entry(it)

    def log_entry(it) -> dict:
        silhouette_term = float((it.image - alpha).abs().mean())   # it.loss holds the regulariser too
        side = loss_fn.beside_result
        if gt is None:
            chamfer, nc = math.nan, math.nan
        elif side is not None and side[0] is it.faces:      # computed beside this mesh's rendering
            chamfer, nc = side[1]
        else:
            chamfer, nc = gt.scores(it.verts, it.faces)
        loss_fn.beside_result = None
        entry = {"silhouette_loss": silhouette_term, "latent": float(it.latent.square().mean()),
                 "iou": silhouette_iou(it.image, alpha), "chamfer": chamfer, "normal_consistency": nc}
        kept.setdefault("first", it)
        kept["logged"] = it
        if on_iteration is not None:
            on_iteration(len(records), entry)
        records.append(entry)
        return entry

    run = optimize(opt, settings.iterations + 1, callbacks=[metrics], show_progress=False)
    messages = [run.stopped] if run.stopped else []
    if kept:   # the mesh after the last step, or the last one there was if the surface vanished
        kept["last"] = run.final if run.final is not None else kept["logged"]
    code_cpu = code.detach().reshape(-1).cpu()
    if not kept:  # no surface for the encoder's code at all
        empty = (torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64))
        messages = [f"the encoder's code has no surface at resolution {settings.resolution} (the SDF has one sign "
                    "on the grid): nothing to refine; is the network trained?"]
        records.append({k: math.nan for k in LOG_KEYS})
        blank = torch.zeros_like(alpha).cpu()
        return ViewResult(empty, empty, {"input": alpha.cpu(), "raw": blank, "refined": blank},
                          {k: np.asarray([r[k] for r in records], dtype=np.float64) for k in LOG_KEYS},
                          code_cpu, code_cpu, run.seconds, messages, {"mesh_nc": [math.nan, math.nan]})
    first, last = kept["first"], kept["last"]
    extra = {"mesh_nc": [gt.mesh_normal_consistency(m.verts, m.faces) if gt is not None else math.nan
                         for m in (first, last)]}
    return ViewResult((first.verts.cpu(), first.faces.cpu()), (last.verts.cpu(), last.faces.cpu()),
                      {"input": alpha.cpu(), "raw": first.image.cpu(), "refined": last.image.cpu()},
                      {k: np.asarray([r[k] for r in records], dtype=np.float64) for k in LOG_KEYS},
                      code_cpu, last.latent.detach().reshape(-1).cpu(), run.seconds, messages, extra)


# --------------------------------------------------------------------------- the output tree

def output_root(exp_dir: str | os.PathLike, label: str | int, out: str | os.PathLike | None = None) -> Path:
    """``<exp>/Reconstructions/<checkpoint label>/`` (the original's), or ``out`` when given."""
    return Path(out) if out is not None else experiment.reconstructions_dir(exp_dir) / str(label)


def instance_folder_name(instance: str, view: int, default_view: int) -> str:
    """``<instance>`` for the protocol's view of an instance, ``<instance>_view<NN>`` for another view."""
    return instance if view == default_view else f"{instance}_view{int(view):02d}"


def normal_map(verts: torch.Tensor, faces: torch.Tensor, camera) -> np.ndarray:
    """RGB uint8 (S, S, 3): the original's normal picture (``lib.svr.evaluate.normal_picture``)."""
    return normal_picture(verts, faces, camera)


def save_instance(folder: Path, result: ViewResult, image: torch.Tensor, camera, meta: Mapping) -> None:
    """Write an instance's folder as the original lays it out, all or nothing.

    folder: ``<root>/<name>``; image (4, S, S) the RGBA input in [0, 1]; camera: the view's
    unbatched Camera.  Files: input.png, input_silhouette.png, predicted.ply, predicted.png
    (RGB camera-frame depth normals, ``normal_map``), predicted_silhouette.png, refined.ply, refined.png,
    refined_silhouette.png, log_silhouette.npy, log_chd.npy, log_nc.npy, log_latent.npy
    (mean z^2) and, ours, log_iou.npy and meta.json.  Everything is written into a
    temporary sibling folder that is renamed into place at the end, so a folder that
    exists is complete (what reconstruct_svr.py's resume relies on).
    """
    folder = Path(folder)
    if folder.exists():
        raise MeshSDFError(f"{folder} exists already; reconstruct_svr.py skips finished instances and never "
                           "overwrites them (remove the folder to redo it)")
    tmp = folder.parent / f".{folder.name}.partial"
    if tmp.exists():      # left by a run that was killed while writing this instance: incomplete, ours
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    cam = camera.to(device="cpu", dtype=torch.float32)
    save_png(tmp / "input.png", image.detach().cpu().permute(1, 2, 0).clamp(0, 1).numpy())
    write_ply(tmp / "predicted.ply", *result.raw)
    write_ply(tmp / "refined.ply", *result.refined)
    save_png(tmp / "predicted.png", normal_map(*result.raw, cam))
    save_png(tmp / "refined.png", normal_map(*result.refined, cam))
    for name, key in (("input", "input"), ("predicted", "raw"), ("refined", "refined")):
        save_png(tmp / f"{name}_silhouette.png", result.silhouettes[key].clamp(0, 1).numpy())
    for key, fname in LOG_FILES.items():
        np.save(tmp / fname, np.asarray(result.log[key], dtype=np.float64))
    info = {**meta, "seconds": result.seconds, "iterations": int(len(result.log["silhouette_loss"]) - 1),
            "messages": result.messages, "code": result.code.tolist(), "refined_code": result.refined_code.tolist(),
            **{k: [_finite_or_none(x) for x in v] for k, v in result.extra.items()}}
    (tmp / META_FILE).write_text(json.dumps(info, indent=1) + "\n")
    os.replace(tmp, folder)


def _finite_or_none(x) -> float | None:
    x = float(x)
    return x if math.isfinite(x) else None
