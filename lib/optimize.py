"""Optimise a latent code through the differentiable mesh against an image loss.

One iteration (:meth:`LatentOptimizer.step`)::

    code z --marching cubes (lib.isosurface, mode dense|sparse|fast)--> mesh (V, F)
           --render + loss (an ``ImageLoss``, e.g. SilhouetteLoss)--> L
    L.backward(): dL/dverts --MeshSDF rule (lib.layer, paper|exact)--> dL/ds (V,) --> dL/dz
    Adam step on z

Only the code is optimised: the decoder is put in ``eval()`` mode and its parameters are
frozen (``requires_grad_(False)``) so the backward pass computes no weight gradients.

Users: ``demo_optimizer.py`` (spot -> bob, MSE silhouette loss, lr 5e-2, 100 iterations,
look-at camera) and ``reconstruct_svr.py`` (refinement of an encoder's code, L1 silhouette
loss, lr 5e-5, DISN camera, per-iteration metrics through callbacks).  Typical use::

    loss_fn = SilhouetteLoss(camera, target_silhouette, loss="l1")
    opt = LatentOptimizer(decoder, code, loss_fn, lr=5e-5, resolution=256, mode="fast")
    run = optimize(opt, 100, callbacks=[lambda it: {"chamfer": chamfer_to_gt(it.verts, it.faces)}])
    run.history[i]["loss"], run.history[i]["chamfer"], run.final.verts, run.stopped

Iteration ``i`` evaluates the code *before* its Adam update: ``history[i]["loss"]`` is the
loss of ``history[i]``'s mesh, and ``run.final`` (an extra gradient-free evaluation after the
last update) is the mesh of the returned code.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Mapping, Protocol, Sequence

import torch
from torch import nn

from .errors import MeshSDFError
from .isosurface import MODES, ExtractionState
from .log import info, progress
from .layer import GRADIENTS, mesh_from_sdf
from .metrics import topology
from .runtime.threads import elementwise_section

from .render import SVR_EPS, SVR_SIGMA, Camera, face_index, nr_silhouette, silhouette

LOSSES = ("mse", "l1")
# soft silhouette (lib.render.silhouette) | neural_renderer-style hard + Kato (lib.render.hard_silhouette)
RENDERERS = ("soft", "nr")
# silhouette softness of the demo at 512 x 512 (squared NDC units); see demo_sigma()
DEMO_SIGMA_512 = SVR_SIGMA


class SurfaceLostError(MeshSDFError):
    """The code's SDF has no zero crossing in [-1, 1]^3 any more (the mesh vanished)."""


class ImageLoss(Protocol):
    """What the optimiser minimises: ``loss_fn(verts (V, 3), faces (F, 3)) -> (loss, image)``.

    ``loss`` is a scalar tensor differentiable w.r.t. ``verts``; ``image`` is the rendering
    the loss compared (any shape; detached by the caller), e.g. a silhouette (H, W).
    """

    def __call__(self, verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]: ...


def demo_sigma(image_size: int) -> float:
    """Soft-silhouette sigma (squared NDC units) with the same blur in pixels at any size.

    At 512 x 512 it is the paper's SVR value 1e-5 (blur radius about 2.4 pixels); smaller
    images get a proportionally larger sigma so that small test runs still have edge
    pixels carrying gradient.
    """
    return DEMO_SIGMA_512 * (512.0 / float(image_size)) ** 2


class SilhouetteLoss:
    """Distance between the soft silhouette of a mesh and a target silhouette.

    camera: a (unbatched) :class:`lib.render.Camera` whose image size is the target's;
    target: (H, W) float in [0, 1] (moved to the vertices' device and dtype on use);
    loss: ``"mse"`` (mean squared difference, the demo) or ``"l1"`` (mean absolute
    difference, the SVR refinement); sigma / eps / faces_per_pixel: see
    :func:`lib.render.silhouette` (default sigma: ``demo_sigma(min(H, W))``);
    renderer: ``"soft"`` (that soft silhouette, exact gradient) or ``"nr"`` (the original
    demo's neural_renderer hard silhouette with Kato et al.'s approximate gradient,
    :func:`lib.render.nr_silhouette`; sigma, eps and faces_per_pixel are then unused).
    Calling it returns (loss scalar, rendered silhouette (H, W)).  Attribute ``face_idx``:
    with the nr renderer, the visible face per pixel (H, W) int64 of the last call's mesh
    (``lib.render.face_index``, which that renderer's coverage is), else None; the demo
    draws its movie frames from it instead of rasterising the same mesh again.
    """

    def __init__(self, camera: Camera, target: torch.Tensor, loss: str = "mse", sigma: float | None = None,
                 eps: float = SVR_EPS, faces_per_pixel: int | None = None, renderer: str = "soft"):
        if loss not in LOSSES:
            raise MeshSDFError(f"silhouette loss {loss!r} is unknown: use one of {', '.join(LOSSES)}")
        if renderer not in RENDERERS:
            raise MeshSDFError(f"renderer {renderer!r} is unknown: use one of {', '.join(RENDERERS)}")
        self.renderer = renderer
        target = torch.as_tensor(target)
        if tuple(target.shape) != tuple(camera.image_size):
            raise ValueError(f"target silhouette is {tuple(target.shape)} but the camera renders "
                             f"{tuple(camera.image_size)}")
        self.camera, self.target, self.loss = camera, target.detach(), loss
        self.sigma = demo_sigma(min(camera.image_size)) if sigma is None else float(sigma)
        self.eps, self.faces_per_pixel = eps, faces_per_pixel
        self.face_idx: torch.Tensor | None = None

    def render(self, verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        """The silhouette (H, W) of a mesh, with the loss's renderer, camera and softness
        (profiler label "optimize.render")."""
        with torch.profiler.record_function("optimize.render"):
            return self._render(verts, faces)

    def _render(self, verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
        if self.renderer == "nr":
            faces = torch.as_tensor(faces, device=verts.device).long()
            self.face_idx = face_index(verts, faces, self.camera)
            return nr_silhouette(verts, faces, self.camera, face_idx=self.face_idx)
        return silhouette(verts, faces, self.camera, sigma=self.sigma, eps=self.eps,
                          faces_per_pixel=self.faces_per_pixel)

    def __call__(self, verts: torch.Tensor, faces: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        image = self.render(verts, faces)
        diff = image - self.target.to(device=image.device, dtype=image.dtype)
        value = diff.square().mean() if self.loss == "mse" else diff.abs().mean()
        return value, image


@dataclass
class Iteration:
    """One evaluated code: what callbacks receive (all tensors detached).

    iteration: 0-based index (``-1`` for a gradient-free evaluation such as ``run.final``);
    latent (L,): the code evaluated (before this iteration's update); verts (V, 3) float32,
    faces (F, 3) int64: its mesh; dl_ds (V,): dL/ds per vertex (None without backward);
    image: the loss's rendering; loss: float; seconds: wall time of the step (extraction,
    rendering, backward, update; callbacks excluded); state: the extraction state
    (evaluations, stale/missed vertices of the fast mode, message); face_idx: the loss
    renderer's visible face per pixel (H, W) when it has one (``SilhouetteLoss.face_idx``),
    else None; track_topology: whether ``record()`` carries the topology (the optimiser's
    ``track_topology``).  Properties euler (V - E + F), components (connected pieces) and
    genus ((2 * components - euler) / 2): computed from the faces on first read, once
    (``lib.metrics.topology``; the optimiser computes them within the step when it tracks them).
    """

    iteration: int
    latent: torch.Tensor
    verts: torch.Tensor
    faces: torch.Tensor
    image: torch.Tensor
    loss: float
    dl_ds: torch.Tensor | None
    seconds: float
    state: ExtractionState = field(repr=False)
    face_idx: torch.Tensor | None = field(default=None, repr=False)
    track_topology: bool = field(default=True, repr=False)
    _topology: tuple[int, int, int] | None = field(default=None, init=False, repr=False)

    def topology(self) -> tuple[int, int, int]:
        """(euler, components, genus) of the mesh, computed on the first call (profiler label
        "optimize.topology") and kept."""
        if self._topology is None:
            with torch.profiler.record_function("optimize.topology"):
                self._topology = topology(self.faces)
        return self._topology

    @property
    def euler(self) -> int:
        return self.topology()[0]

    @property
    def components(self) -> int:
        return self.topology()[1]

    @property
    def genus(self) -> int:
        return self.topology()[2]

    def record(self) -> dict:
        """The JSON-friendly scalars of this iteration (genus, euler, components only when
        ``track_topology``)."""
        rec = {"iteration": self.iteration, "loss": self.loss}
        if self.track_topology:
            rec.update(genus=self.genus, euler=self.euler, components=self.components)
        rec.update({"vertices": int(self.verts.shape[0]), "faces": int(self.faces.shape[0]),
                    "sdf_evaluations": int(self.state.evaluations),
                    "missed_vertices": int(self.state.missed_vertices), "seconds": self.seconds,
                    "latent_norm": float(self.latent.norm())})
        return rec


class CodeAdam:
    """Adam (Kingma and Ba, torch's default form) on one tensor, without torch.optim.

    The same update as ``torch.optim.Adam([param], lr, betas=(0.9, 0.999), eps=1e-8)``,
    operation for operation (tests compare them bit for bit).  Why not torch.optim: its
    first ``Optimizer`` built in a process imports torch's compiler stack (torch._dynamo,
    about 1.3 s), a fifth of the demo's start-up, for a 2-float code.
    param: the leaf tensor updated in place from ``param.grad``.
    """

    def __init__(self, param: torch.Tensor, lr: float, betas=(0.9, 0.999), eps: float = 1e-8):
        self.param, self.lr, self.betas, self.eps = param, float(lr), betas, float(eps)
        self.exp_avg = torch.zeros_like(param)
        self.exp_avg_sq = torch.zeros_like(param)
        self.steps = 0

    def zero_grad(self) -> None:
        self.param.grad = None

    @torch.no_grad()
    def step(self) -> None:
        grad = self.param.grad
        if grad is None:
            return
        b1, b2 = self.betas
        self.steps += 1
        self.exp_avg.lerp_(grad, 1 - b1)
        self.exp_avg_sq.mul_(b2).addcmul_(grad, grad, value=1 - b2)
        bias1 = 1 - b1 ** self.steps
        bias2_sqrt = (1 - b2 ** self.steps) ** 0.5
        denom = (self.exp_avg_sq.sqrt() / bias2_sqrt).add_(self.eps)
        self.param.addcdiv_(self.exp_avg, denom, value=-self.lr / bias1)


class LatentOptimizer:
    """Adam on one latent code through the differentiable mesh (see the module docstring).

    decoder: DeepSDF calling convention; it is set to eval mode and frozen.
    latent: initial code (L,) or (1, L) on the decoder's device; copied, not modified.
    loss_fn: an :class:`ImageLoss` (e.g. :class:`SilhouetteLoss`).
    lr: Adam learning rate; resolution: marching-cubes grid N (N^3 over [-1, 1]^3);
    mode: ``dense`` | ``sparse`` (exact, default) | ``fast`` (the paper's heuristic, keeps
    the previous grid); gradient: ``paper`` | ``exact`` (lib.layer); chunk: SDF points
    per decoder call; kernel: use the decoder's fast path (``lib.layer.sdf.mesh_from_sdf``,
    default True; speed only); track_topology: compute each step's genus, Euler
    characteristic and components within the step, for its record and the progress bar
    (default True, the demo); False leaves them out of the records and computes them only
    if a callback reads them (the SVR refinement, whose logs do not hold them);
    extract_kwargs: passed to lib.isosurface.extract.
    Attributes: ``latent`` (the optimised leaf tensor, (L,)), ``optimizer`` (``CodeAdam``),
    ``state`` (last extraction state), ``iteration`` (steps done).
    """

    def __init__(self, decoder: nn.Module, latent: torch.Tensor, loss_fn: ImageLoss, lr: float = 5e-2,
                 resolution: int = 64, mode: str = "sparse", gradient: str = "paper", chunk: int = 2 ** 14,
                 kernel: bool = True, track_topology: bool = True, **extract_kwargs):
        if mode not in MODES:
            raise MeshSDFError(f"extraction mode {mode!r} is unknown: use one of {', '.join(MODES)}")
        if gradient not in GRADIENTS:
            raise MeshSDFError(f"gradient {gradient!r} is unknown: use one of {', '.join(GRADIENTS)}")
        if not lr > 0:
            raise MeshSDFError(f"learning rate must be > 0, got {lr}")
        self.decoder = decoder.eval()
        for p in decoder.parameters():
            p.requires_grad_(False)
        self.latent = latent.detach().reshape(-1).clone().requires_grad_(True)
        self.loss_fn = loss_fn
        self.optimizer = CodeAdam(self.latent, lr=lr)
        self.resolution, self.mode, self.gradient, self.chunk = int(resolution), mode, gradient, chunk
        self.kernel, self.track_topology = kernel, bool(track_topology)
        self.extract_kwargs = extract_kwargs
        self.state: ExtractionState | None = None
        self.iteration = 0

    def _mesh(self, grad: bool):
        with torch.enable_grad() if grad else torch.no_grad():
            mesh = mesh_from_sdf(self.decoder, self.latent, self.resolution, self.mode, self.gradient,
                                 state=self.state, chunk=self.chunk, kernel=self.kernel, **self.extract_kwargs)
        self.state = mesh.state
        if mesh.state.empty:
            if self.iteration == 0:  # no update yet: the starting code is the cause, not the learning rate
                raise SurfaceLostError(f"the starting code has no surface: {mesh.state.message}; start from "
                                       "another code or a finer resolution")
            raise SurfaceLostError(f"the mesh vanished at iteration {self.iteration}: {mesh.state.message}; "
                                   "lower the learning rate or start from another code")
        return mesh

    def _result(self, index, latent, mesh, image, loss, dl_ds, t0) -> Iteration:
        it = Iteration(index, latent, mesh.verts.detach(), mesh.faces, image.detach(), loss, dl_ds, 0.0,
                       mesh.state, getattr(self.loss_fn, "face_idx", None), self.track_topology)
        if self.track_topology:
            it.topology()
        it.seconds = time.perf_counter() - t0
        return it

    def step(self) -> Iteration:
        """Extract, render, backpropagate, update the code once; raises SurfaceLostError.

        Profiler labels of its stages: "optimize.extraction", "optimize.render" (the loss's
        renderer), "optimize.backward" (the loss's backward pass through the renderer and the
        mesh layer), "optimize.topology" (when it tracks the topology).

        Runs in a ``lib.runtime.threads.elementwise_section``: with sleeping OpenMP threads its
        elementwise passes on one intra-op thread, large decoder calls and side-by-side work
        on all of them (benchmarks/contention.py compares this policy with torch's defaults).
        """
        t0 = time.perf_counter()
        with elementwise_section(self.latent.device):
            code = self.latent.detach().clone()
            with torch.profiler.record_function("optimize.extraction"):
                mesh = self._mesh(grad=True)
            loss, image = self.loss_fn(mesh.verts, mesh.faces)
            self.optimizer.zero_grad()
            with torch.profiler.record_function("optimize.backward"):
                loss.backward()
            value = float(loss.detach())
            if not torch.isfinite(loss.detach()):
                if self.iteration == 0:  # before any update the learning rate cannot be the cause
                    raise MeshSDFError(f"the loss is {value} at the first iteration, before any update: the loss's "
                                       "weights (e.g. --regularize) or the checkpoint make it non-finite")
                raise MeshSDFError(f"the loss became {value} at iteration {self.iteration}; lower the learning rate")
            self.optimizer.step()
            result = self._result(self.iteration, code, mesh, image, value, mesh.state.dl_ds, t0)
        self.iteration += 1
        return result

    @torch.no_grad()
    def evaluate(self) -> Iteration:
        """Mesh, rendering and loss of the current code, no gradient, no update (iteration -1)."""
        t0 = time.perf_counter()
        with elementwise_section(self.latent.device):
            mesh = self._mesh(grad=False)
            loss, image = self.loss_fn(mesh.verts, mesh.faces)
            return self._result(-1, self.latent.detach().clone(), mesh, image, float(loss), None, t0)


Callback = Callable[[Iteration], "Mapping[str, float] | None"]


@dataclass
class OptimizationRun:
    """Result of :func:`optimize`.

    history: one ``Iteration.record()`` dict per completed step, merged with what the
    callbacks returned; final: evaluation of the returned code (None if the surface was
    lost or ``final=False``); latent: the final code (L,) (detached); stopped: "" when all
    iterations ran, else why the run stopped early (e.g. the surface vanished);
    seconds: total wall time including callbacks.
    """

    history: list[dict]
    final: Iteration | None
    latent: torch.Tensor
    stopped: str
    seconds: float


def optimize(opt: LatentOptimizer, iterations: int, callbacks: Sequence[Callback] = (), final: bool = True,
             desc: str = "optimize", show_progress: bool = True,
             final_callbacks: Sequence[Callback] = ()) -> OptimizationRun:
    """Run ``iterations`` steps of ``opt`` with a tqdm bar (loss, genus when ``opt.track_topology``, s/it).

    After each step every ``callbacks`` item is called with the :class:`Iteration`; a
    returned mapping is merged into that step's history record (per-iteration metrics).
    Callbacks run in the step's ``lib.runtime.threads.elementwise_section``.
    A vanished surface (:class:`SurfaceLostError`) ends the run early with
    ``stopped`` set to its message; the history up to then is kept.  With ``final`` the
    returned code is evaluated once more (``run.final``) and ``final_callbacks`` receive it.
    """
    if iterations < 0:
        raise MeshSDFError(f"iterations must be >= 0, got {iterations}")
    history: list[dict] = []
    stopped = ""
    t_start = time.perf_counter()
    bar = progress(total=iterations, desc=desc, unit="it", **({} if show_progress else {"disable": True}))
    try:
        for _ in range(iterations):
            try:
                it = opt.step()
            except SurfaceLostError as err:
                stopped = str(err)
                break
            rec = it.record()
            # the callbacks' metrics (Chamfer, renderings) are small elementwise work, as the step's
            with elementwise_section(opt.latent.device):
                for cb in callbacks:
                    extra = cb(it)
                    if extra:
                        rec.update(extra)
            history.append(rec)
            if show_progress:
                shown = {"genus": it.genus} if opt.track_topology else {}
                bar.set_postfix(loss=f"{it.loss:.3g}", **shown, s_it=f"{it.seconds:.2f}")
            bar.update(1)
    finally:
        bar.close()
    last = None
    if final and not stopped:
        try:
            last = opt.evaluate()
        except SurfaceLostError as err:
            stopped = str(err)
        else:
            with elementwise_section(opt.latent.device):
                for cb in final_callbacks:
                    cb(last)
    if stopped:
        info(f"optimize: stopped early: {stopped}")
    return OptimizationRun(history, last, opt.latent.detach().clone(), stopped, time.perf_counter() - t_start)
