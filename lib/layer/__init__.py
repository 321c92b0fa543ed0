"""The differentiable iso-surface layer (the paper's contribution).

- :mod:`.field`: :func:`mesh_from_field` on any torch field, :class:`SurfaceMesh`, the
  autograd layer and its backward (the paper's and the exact rule);
- :mod:`.sdf`: :func:`mesh_from_sdf`, a DeepSDF decoder and latent codes as a field, using
  the decoder's fast path when it offers one (``decoder.field_kernel()``);
- :mod:`.gradient_check`: :func:`check_gradients`, the layer against finite differences of
  re-extracted meshes.
"""
from .field import (DELTA, GRADIENTS, INSIDE, Field, SurfaceMesh, dl_ds_rule, field_backward, field_device,
                    mesh_from_field, refuse_dropout)
from .gradient_check import GroupCheck, check_gradients, format_report, surface_integral
from .sdf import mesh_from_sdf

__all__ = ["DELTA", "GRADIENTS", "INSIDE", "Field", "GroupCheck", "SurfaceMesh", "check_gradients", "dl_ds_rule",
           "field_backward", "field_device", "format_report", "mesh_from_field", "mesh_from_sdf", "refuse_dropout",
           "surface_integral"]
