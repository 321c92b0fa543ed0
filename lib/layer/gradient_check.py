"""Check the MeshSDF layer's gradients on a user's own field: layer vs re-extracted meshes.

For each parameter group, a unit direction u in that group's parameters (the exact rule's
gradient plus 30 % of its norm in a random direction); the layer's directional derivative
dL/du (``"paper"`` and ``"exact"`` rules, :mod:`lib.layer.field`) is compared with central finite
differences (L(theta + eps u) - L(theta - eps u)) / (2 eps) of meshes extracted again at the
displaced parameters.  L is a surface integral,
sum over faces of area * phi(centroid), phi(x) = 1 + 0.5 x - 0.3 z + 0.25 y^2 (smooth, not
symmetric, so that a translation, a growth or a deformation all change it).

eps is chosen per group so that the field moves by about ``move`` voxels (default 0.5) at the
surface (measured at the vertices), large enough that the marching-cubes re-discretisation
averages out and small enough to stay linear.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, Sequence

import torch

from ..errors import MeshSDFError
from ..isosurface import extract, voxel_size
from .field import GRADIENTS, INSIDE, mesh_from_field

__all__ = ["GroupCheck", "check_gradients", "format_report", "surface_integral"]


def surface_integral(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """sum_f area_f * phi(centroid_f) for verts (V, 3), faces (F, 3); a scalar."""
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    area = torch.cross(b - a, c - a, dim=1).norm(dim=1) / 2
    m = (a + b + c) / 3
    phi = 1 + 0.5 * m[:, 0] - 0.3 * m[:, 2] + 0.25 * m[:, 1] ** 2
    return (area * phi).sum()


@dataclass
class GroupCheck:
    """One parameter group: FD and layer directional derivatives, relative errors."""

    name: str
    size: int
    eps: float
    fd: float
    layer: dict          # gradient rule -> dL/du
    error: dict          # gradient rule -> |layer - fd| / |fd|


def check_gradients(field: Callable[[torch.Tensor], torch.Tensor], groups: Mapping[str, Sequence[torch.Tensor]],
                    resolution: int = 256, level: float = 0.0, inside: str = "below", mode: str = "sparse",
                    loss: Callable = surface_integral, move: float = 0.5, max_relative: float = 0.02, seed: int = 0,
                    chunk: int = 2 ** 14, device=None) -> list[GroupCheck]:
    """Layer gradient vs finite differences of re-extracted meshes, per parameter group.

    Args:
        field: points (P, 3) -> (P,), depending on the tensors in ``groups``.
        groups: name -> tensors, each a leaf; they need not require grad (the check turns it
            on for itself and restores it).
        resolution: grid points per axis (default 256).
        level, inside: the surface (default 0.0, "below"; :func:`lib.layer.field.mesh_from_field`).
        mode: the extraction mode (default "sparse").
        loss: loss(verts (V, 3), faces (F, 3)) -> scalar (default :func:`surface_integral`).
        move: the field's displacement at the surface, in voxels, that sets eps (default 0.5).
        max_relative: the largest step as a fraction of a group's norm (default 0.02).
        seed: the random direction's seed (default 0).
        chunk: points per field call (default 2^14).
        device: where the grid lives (default: the device of the first tensor of ``groups``,
            so that a closure over CUDA tensors is meshed on CUDA).
    Returns:
        one :class:`GroupCheck` per group; the parameters are left as they were.
    """
    if inside not in INSIDE:
        raise MeshSDFError(f"inside {inside!r} is unknown: use 'below' or 'above'")
    tensors = [t for ts in groups.values() for t in ts]
    if not tensors:
        raise MeshSDFError("gradient check: no parameters to check")
    sign = 1.0 if inside == "below" else -1.0
    device = torch.device(device) if device is not None else tensors[0].device
    was = [t.requires_grad for t in tensors]
    gen = torch.Generator().manual_seed(seed)
    noise = {name: [torch.randn(t.shape, generator=gen).to(t) for t in ts] for name, ts in groups.items()}
    saved = [t.detach().clone() for t in tensors]
    try:
        for t in tensors:
            t.requires_grad_(True)
        layer = {}
        for gradient in GRADIENTS:
            for t in tensors:
                t.grad = None
            mesh = mesh_from_field(field, resolution, level, mode, gradient, inside=inside, chunk=chunk,
                                   device=device)
            if mesh.state.empty:
                raise MeshSDFError(f"gradient check: {mesh.state.message}")
            loss(mesh.verts, mesh.faces).backward()
            layer[gradient] = {name: [t.grad.detach().clone() for t in groups[name]] for name in groups}
            verts = mesh.verts.detach()
        dirs = _directions(layer["exact"], noise)
        layer = {g: {name: float(sum((a * d).sum() for a, d in zip(layer[g][name], dirs[name]))) for name in groups}
                 for g in GRADIENTS}
        for t in tensors:
            t.grad = None
            t.requires_grad_(False)
        out = []
        h = voxel_size(resolution)
        for name in groups:
            # the step moves the surface by ~``move`` voxels, but changes the group by at most
            # ``max_relative`` of its norm (a nonlinear response otherwise)
            norm = float(torch.sqrt(sum((t.detach() ** 2).sum() for t in groups[name])))
            eps = min(_step(field, verts, groups[name], dirs[name], move * h, sign), max_relative * max(norm, 1e-3))
            _restore(tensors, saved)
            vals = []
            for s in (1, -1):
                _shift(groups[name], dirs[name], s * eps)
                try:
                    with torch.no_grad():
                        v, f, _ = extract(lambda p: sign * (field(p).reshape(-1) - level), resolution, mode,
                                          device=verts.device, chunk=chunk)
                    vals.append(float(loss(v, f)))
                finally:
                    _restore(tensors, saved)
            fd = (vals[0] - vals[1]) / (2 * eps)
            lay = {g: layer[g][name] for g in GRADIENTS}
            err = {g: abs(lay[g] - fd) / max(abs(fd), 1e-30) for g in GRADIENTS}
            out.append(GroupCheck(name, sum(t.numel() for t in groups[name]), eps, fd, lay, err))
        return out
    finally:
        _restore(tensors, saved)
        for t, w in zip(tensors, was):
            t.grad = None
            t.requires_grad_(w)


def _directions(grads, noise) -> dict:
    """Unit direction per group: the exact rule's gradient (the most signal over the
    re-discretisation noise of the finite differences), plus 30 % of its norm in a random
    direction so that an error orthogonal to the gradient shows too."""
    out = {}
    for name, gs in grads.items():
        gn = torch.sqrt(sum((g ** 2).sum() for g in gs))
        nn_ = torch.sqrt(sum((r ** 2).sum() for r in noise[name]))
        if not gn > 0:
            raise MeshSDFError(f"gradient check: the surface does not depend on parameter group {name!r}")
        ds = [g / gn + 0.3 * r / nn_ for g, r in zip(gs, noise[name])]
        total = torch.sqrt(sum((d ** 2).sum() for d in ds))
        out[name] = [d / total for d in ds]
    return out


@torch.no_grad()
def _restore(tensors, saved):
    for t, o in zip(tensors, saved):
        t.copy_(o)


@torch.no_grad()
def _shift(tensors, dirs, amount):
    for t, d in zip(tensors, dirs):
        t.add_(d, alpha=amount)


@torch.no_grad()
def _step(field, verts, tensors, dirs, target, sign) -> float:
    """eps such that the field, divided by its gradient norm, moves by ``target`` world units
    (RMS over the vertices): from a tiny central difference at fixed points."""
    tiny = 1e-3
    _shift(tensors, dirs, tiny)
    up = field(verts).reshape(-1)
    _shift(tensors, dirs, -2 * tiny)
    down = field(verts).reshape(-1)
    _shift(tensors, dirs, tiny)  # the caller restores the exact values
    with torch.enable_grad():
        x = verts.clone().requires_grad_(True)
        (n,) = torch.autograd.grad(field(x).sum(), x)
    speed = ((up - down) / (2 * tiny) / n.norm(dim=1).clamp_min(1e-12)).pow(2).mean().sqrt()
    if not torch.isfinite(speed) or speed <= 0:
        return tiny
    return float(target / speed)


def format_report(checks: Sequence[GroupCheck]) -> list[str]:
    """Table lines: group, size, FD, layer (exact, paper), relative errors."""
    lines = [f"{'group':<16} {'params':>8} {'finite diff':>12} {'exact':>12} {'paper':>12} "
             f"{'err exact':>10} {'err paper':>10}"]
    for c in checks:
        lines.append(f"{c.name:<16} {c.size:>8} {c.fd:>12.5g} {c.layer['exact']:>12.5g} {c.layer['paper']:>12.5g} "
                     f"{100 * c.error['exact']:>9.2f}% {100 * c.error['paper']:>9.2f}%")
    return lines
