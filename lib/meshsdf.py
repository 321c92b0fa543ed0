"""MeshSDF: differentiable iso-surface extraction (the paper's layer, SPEC section 6).

Forward: marching cubes on the decoder's SDF (:func:`lib.isosurface.extract`, no graph).
Backward: for a loss L on the vertices, with g_i = dL/dx_i and the SDF gradient
n_i = d s(x_i, z) / dx at each vertex (autograd through the decoder),

    paper:  dL/ds_i = -(g_i . n_i) / |n_i|          (the original's formula, unit normal)
    exact:  dL/ds_i = -(g_i . n_i) / |n_i|^2        (implicit function theorem)

and the gradient sum_i dL/ds_i * ds(x_i, z) flows into the latent code z and into every
decoder parameter that requires grad.  The two agree when |n| = 1 (a true distance field).

Typical use (every optimisation iteration)::

    mesh = mesh_from_sdf(decoder, latent, resolution=64, state=mesh.state if it else None)
    loss = render_loss(mesh.verts, mesh.faces)
    loss.backward()               # latent.grad, decoder grads; mesh.state.dl_ds (V,)

The decoder follows the DeepSDF calling convention ((P, L + 3) [latent | xyz] -> (P, 1)) and
should be in ``eval()`` mode (dropout would make the SDF random).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import nn

from lib.errors import MeshSDFError
from lib.isosurface import ExtractionState, extract
from lib.models.decoder import sdf as decoder_sdf

GRADIENTS = ("paper", "exact")


class SurfaceMesh(NamedTuple):
    """verts (V, 3) float32 carrying gradients, faces (F, 3) int64, state for the next call.

    ``state.dl_ds`` holds the per-vertex dL/ds (V,) after a backward pass (e.g. to colour
    faces); ``state.empty`` / ``state.message`` say when no surface was found.
    """

    verts: torch.Tensor
    faces: torch.Tensor
    state: ExtractionState


def mesh_from_sdf(decoder: nn.Module, latent: torch.Tensor, resolution: int = 64, mode: str = "sparse",
                  gradient: str = "paper", state: ExtractionState | None = None, chunk: int = 2 ** 16,
                  **extract_kwargs) -> SurfaceMesh:
    """Extract the zero level set of ``decoder`` at ``latent`` as a differentiable mesh.

    latent: (L,) or (1, L) on the decoder's device (the grid lives there too).
    resolution / mode / state / extract_kwargs (verify, coarse_stride, band): see
    :func:`lib.isosurface.extract`; gradient: ``"paper"`` or ``"exact"`` (module docstring);
    chunk: points per decoder call, forward and backward.
    """
    lat = latent.reshape(-1)
    verts, faces, st = extract(lambda p: decoder_sdf(decoder, lat.detach(), p, chunk), resolution, mode, state,
                               device=latent.device, chunk=chunk, **extract_kwargs)
    st.dl_ds = None
    return SurfaceMesh(attach_gradients(verts, decoder, lat, gradient=gradient, state=st, chunk=chunk), faces, st)


def attach_gradients(verts: torch.Tensor, decoder: nn.Module, latent: torch.Tensor, gradient: str = "paper",
                     state: ExtractionState | None = None, chunk: int = 2 ** 16) -> torch.Tensor:
    """Return a copy of surface vertices (V, 3) whose backward follows the MeshSDF rule.

    verts must lie on the zero level set of ``decoder`` at ``latent`` (L,) (e.g. from any
    extraction mode).  Gradients go to ``latent`` (if it requires grad) and to the decoder
    parameters that require grad; ``state.dl_ds`` (if a state is given) receives dL/ds.
    Without grad mode or anything to differentiate, returns ``verts`` unchanged.
    """
    if gradient not in GRADIENTS:
        raise MeshSDFError(f"gradient {gradient!r} is unknown: use one of {', '.join(GRADIENTS)}")
    params = tuple(p for p in decoder.parameters() if p.requires_grad)
    if not torch.is_grad_enabled() or not (latent.requires_grad or params):
        return verts
    return _MeshSDF.apply(verts.detach(), decoder, gradient, state, chunk, latent, *params)


class _MeshSDF(torch.autograd.Function):
    @staticmethod
    def forward(ctx, verts, decoder, gradient, state, chunk, latent, *params):
        ctx.save_for_backward(verts, latent, *params)
        ctx.decoder, ctx.gradient, ctx.state, ctx.chunk = decoder, gradient, state, chunk
        return verts.clone()

    @staticmethod
    def backward(ctx, grad_verts):
        verts, latent, *params = ctx.saved_tensors
        wants_latent = ctx.needs_input_grad[5]
        dl_ds, g_latent, g_params = sdf_backward(ctx.decoder, latent, verts, grad_verts, ctx.gradient, ctx.chunk,
                                                 wants_latent, params)
        if ctx.state is not None:
            ctx.state.dl_ds = dl_ds
        if g_latent is not None:
            g_latent = g_latent.reshape(latent.shape)
        return (None, None, None, None, None, g_latent, *g_params)


def sdf_backward(decoder: nn.Module, latent: torch.Tensor, verts: torch.Tensor, grad_verts: torch.Tensor,
                 gradient: str = "paper", chunk: int = 2 ** 16, wants_latent: bool = True, params=()):
    """The MeshSDF backward pass, in chunks of vertices.

    Returns dl_ds (V,) (detached), the gradient for ``latent`` (L,) (None unless
    ``wants_latent``) and a list with one gradient (or None) per tensor of ``params``.
    """
    lat = latent.detach().reshape(-1).requires_grad_(wants_latent)
    inputs = ([lat] if wants_latent else []) + list(params)
    grads = [None] * len(inputs)
    dl_ds = torch.zeros(verts.shape[0], device=verts.device, dtype=verts.dtype)
    with torch.enable_grad():
        for s in range(0, verts.shape[0], chunk):
            x = verts[s : s + chunk].detach().requires_grad_(True)
            value = decoder(torch.cat((lat.reshape(1, -1).expand(x.shape[0], -1), x), 1)).reshape(-1)
            (normal,) = torch.autograd.grad(value.sum(), x, retain_graph=bool(inputs))
            norm = normal.norm(dim=1).clamp_min(1e-12)
            d = -(grad_verts[s : s + chunk] * normal).sum(1) / norm
            if gradient == "exact":
                d = d / norm
            dl_ds[s : s + chunk] = d.detach()
            if inputs:
                part = torch.autograd.grad(value, inputs, grad_outputs=d.detach(), allow_unused=True)
                grads = [a if b is None else (b if a is None else a + b) for a, b in zip(grads, part)]
    g_latent = grads.pop(0) if wants_latent else None
    if g_latent is None and wants_latent:
        g_latent = torch.zeros_like(lat)
    return dl_ds, g_latent, grads
