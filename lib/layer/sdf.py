"""The MeshSDF layer on a DeepSDF decoder: a decoder and latent codes as a field.

Owns :func:`mesh_from_sdf` and the field it meshes (:class:`_CodeField`), which gives the
layer its tensors without a probe and takes every per-vertex derivative of the backward from
one decoder pass (:meth:`_CodeField.layer_backward`, the protocol of :mod:`.field`).

Decoders: ``decoder(inputs (P, L + 3) = [latent | xyz]) -> (P, 1)``.  This module never
imports a decoder class.  A decoder may offer a fast path that evaluates it without autograd
by a method the layer asks for, ``decoder.field_kernel()``, returning None or a new object
(the layer asks once per mesh) with

- ``supported(device) -> bool``: whether it computes the decoder's current function (its
  train/eval mode) on ``device``; asked at every evaluation;
- ``values(codes (B, L), xyz (P, 3), index (P,) int64 | None) -> (P,)``: the decoder at
  [codes[index] | xyz] (code 0 for every row when index is None), no autograd graph;
- ``values_and_input_grad(codes, xyz, index) -> (values (P,), ds/dcode (P, L), ds/dxyz (P, 3))``:
  values and the gradient of sum_p s_p w.r.t. each input row, no autograd graph.

``lib.models.decoder.Decoder.field_kernel`` returns its inference kernels
(:mod:`lib.models.kernels.inference`).  ``mesh_from_sdf(..., kernel=False)`` ignores the
offer: the decoder's autograd forward everywhere, which changes speed only (the same values
and derivatives up to float rounding).
"""
from __future__ import annotations

import copy
from typing import Sequence

import torch
from torch import nn

from ..runtime.threads import FEW_ROWS, all_threads
from .field import SurfaceMesh, dl_ds_rule, mesh_from_field, refuse_dropout

__all__ = ["mesh_from_sdf"]


def mesh_from_sdf(decoder: nn.Module, latent: torch.Tensor, resolution: int = 64, mode: str = "sparse",
                  gradient: str = "paper", state=None, chunk: int = 2 ** 14, kernel: bool = True,
                  **kwargs) -> SurfaceMesh | list[SurfaceMesh]:
    """The zero level set of a DeepSDF ``decoder`` at ``latent`` as a differentiable mesh.

    Args:
        decoder: (P, L + 3) [latent | xyz] -> (P, 1), in ``eval()`` mode (dropout in train
            mode is refused: MeshSDFError).
        latent: (L,) or (1, L) gives one :class:`SurfaceMesh`; (B, L) with B > 1 a list of B
            (one call, one backward).  The grid lives on the latent's device.
        resolution: grid points per axis (default 64).
        mode, gradient, state, chunk: as :func:`lib.layer.field.mesh_from_field` (defaults
            "sparse", "paper", None, 2^14).
        kernel: use the decoder's fast path (``decoder.field_kernel()``, module docstring)
            where it offers one (default True); speed only: False gives the same values and
            derivatives up to float rounding.
        kwargs: the other arguments of :func:`lib.layer.field.mesh_from_field`.
    Returns:
        a :class:`SurfaceMesh` (one code) or a list of B of them.
    """
    refuse_dropout(decoder)
    batched = latent.dim() == 2 and latent.shape[0] > 1
    field = _CodeField(decoder, latent if batched else latent.reshape(1, -1), kernel)
    return mesh_from_field(field if batched else field.single, resolution, mode=mode, gradient=gradient, state=state,
                           batch=latent.shape[0] if batched else None, chunk=chunk, device=latent.device, **kwargs)


class _CodeField:
    """The DeepSDF field s(x) = decoder([codes[b] | x]) of surface b, codes (B, L).

    Offers the layer's protocol (:mod:`.field`): ``layer_leaves`` names the codes tensor (a
    leaf, or e.g. an encoder's output, through which autograd carries on) and the decoder's
    parameters that require grad, without a probe; ``layer_backward`` takes every
    per-vertex derivative the backward needs, ds/dx and ds/dcode, from ONE backward pass
    through the decoder (the derivative w.r.t. the whole input row), instead of one pass for
    the normals and a second for the codes, whenever the decoder's own parameters do not
    require grad.

    Evaluations that need no gradient and that one-pass backward go through the decoder's
    fast path (module docstring) when it offers one, ``kernel`` is True and the path
    supports the decoder's current mode and device; elsewhere through its autograd forward.
    ``layer_freeze`` gives the fast mode its frozen copy (the band start, see :mod:`.field`).
    """

    def __init__(self, decoder: nn.Module, codes: torch.Tensor, kernel: bool = True):
        self.decoder, self.codes = decoder, codes
        offer = getattr(decoder, "field_kernel", None) if kernel else None
        self._kernel = offer() if callable(offer) else None

    def kernel(self, device):
        """The decoder's fast path when it computes the decoder's current function on ``device``, else None."""
        k = self._kernel
        return k if k is not None and k.supported(device) else None

    def _plain(self, points: torch.Tensor):
        """The fast path when this evaluation needs no autograd graph (grad off, or nothing requires grad)."""
        if torch.is_grad_enabled() and (points.requires_grad or self.codes.requires_grad
                                        or any(p.requires_grad for p in self.decoder.parameters())):
            return None
        return self.kernel(points.device)

    @staticmethod
    def threads(rows: int):
        """Context for a decoder evaluation of ``rows`` rows: inside a
        ``lib.runtime.threads.elementwise_section``, all the process's threads from ``FEW_ROWS``
        rows (GEMMs), the section's one thread below; elsewhere nothing changes."""
        return all_threads(rows >= FEW_ROWS)

    def __call__(self, points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
        """s (P,) at points (P, 3), surface ``index[p]`` (P,) int64 for row p."""
        with self.threads(points.shape[0]):
            kernel = self._plain(points)
            if kernel is not None:
                return kernel.values(self.codes, points, index)
            return self.decoder(torch.cat((self.codes[index], points), 1)).reshape(-1)

    def single(self, points: torch.Tensor) -> torch.Tensor:
        """s (P,) at points (P, 3) of the one code (codes (1, L))."""
        with self.threads(points.shape[0]):
            kernel = self._plain(points)
            if kernel is not None:
                return kernel.values(self.codes, points)
            return self.decoder(torch.cat((self.codes.expand(points.shape[0], -1), points), 1)).reshape(-1)

    def layer_freeze(self) -> "_CodeField":
        """This field as it is now, kept when the codes (or the decoder's trainable
        parameters) change in place: the codes cloned, the decoder copied when an optimiser
        may change it (some parameter requires grad), else shared."""
        decoder = copy.deepcopy(self.decoder) if not self.rows_only() else self.decoder
        return _CodeField(decoder, self.codes.detach().clone(), self._kernel is not None)

    def rows_only(self) -> bool:
        """Whether the codes are the only path to tensors requiring grad (frozen decoder)."""
        return not any(p.requires_grad for p in self.decoder.parameters())

    def layer_leaves(self) -> tuple[list[torch.Tensor], torch.device]:
        """The tensors the field's gradients go to (the codes when they require grad, then the
        decoder's parameters that do) and the codes' device."""
        found = [self.codes] if self.codes.requires_grad else []
        return found + [p for p in self.decoder.parameters() if p.requires_grad], self.codes.device

    def layer_backward(self, sign: float, verts: torch.Tensor, grad_verts: torch.Tensor, index: torch.Tensor,
                       leaves: Sequence[torch.Tensor], gradient: str, delta: float, chunk: int):
        """:func:`lib.layer.field.field_backward` with a frozen decoder, one decoder backward;
        None when the decoder's parameters require grad (the generic two-pass rule runs).

        Each value s_i depends on its own input row [code_b | x_i] only, so the derivative of
        sum_i s_i w.r.t. the (V, L + 3) input rows is, row by row, (ds_i/dcode, ds_i/dx_i): the
        normals and the per-vertex code derivatives at once (by the fast path's manual
        backward where it applies, else by autograd in chunks of ``chunk``).  dL/dcodes[index]
        = dL/ds_i * ds_i/dcode then flows by autograd through ``codes[index]`` into the leaves
        (a latent, an encoder's output).  Same values as the two-pass path up to float rounding.
        (:func:`lib.layer.field.field_backward` passes only the vertices the loss moves where
        it can.)

        Args:
            sign: +1 or -1, how the field enters s = sign * (field - level).
            verts, grad_verts, index, leaves, gradient, delta, chunk: as
                :func:`lib.layer.field.field_backward`.
        Returns:
            (dl_ds (V,) detached, one gradient per tensor of ``leaves``), or None.
        """
        if not self.rows_only():
            return None
        L = self.codes.shape[1]
        kernel = self.kernel(verts.device)
        with self.threads(verts.shape[0]):
            if kernel is not None:
                _, rows_grad, normal = kernel.values_and_input_grad(self.codes.detach(), verts.detach(), index)
            else:
                with torch.enable_grad():
                    parts = []
                    for s in range(0, verts.shape[0], chunk):
                        x = verts[s : s + chunk].detach()
                        inp = torch.cat((self.codes.detach()[index[s : s + chunk]], x), 1).requires_grad_(True)
                        (j,) = torch.autograd.grad(self.decoder(inp).reshape(-1).sum(), inp)
                        parts.append(j)
                j = torch.cat(parts) if parts else verts.new_zeros(0, L + 3)
                rows_grad, normal = j[:, :L], j[:, L:]
        if sign < 0:  # s = sign * (field - level): the level drops out
            rows_grad, normal = -rows_grad, -normal
        dl_ds = dl_ds_rule(normal, grad_verts, gradient, delta)
        code_rows = rows_grad * dl_ds.unsqueeze(1)
        with torch.enable_grad():
            # a scalar output: an explicit grad_outputs tensor makes torch import sympy (slow, once)
            grads = torch.autograd.grad((self.codes[index] * code_rows).sum(), leaves, allow_unused=True)
        grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
        return dl_ds.detach(), grads
