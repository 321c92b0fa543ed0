"""MeshSDF: differentiable iso-surface extraction for PyTorch (Remelli et al., NeurIPS 2020).

Installed, this package is ``meshsdf``; in the repository its source folder ``lib/`` is what the
paper's scripts import.  The public API (``meshsdf.__all__``):

- the layer: :func:`mesh_from_field` (any torch field), :func:`mesh_from_sdf` (a DeepSDF decoder
  and latent codes), :class:`SurfaceMesh`, :func:`check_gradients` (against finite differences);
- extraction: :func:`extract`, :class:`ExtractionState`, :func:`marching_cubes`;
- rendering: :class:`Camera`, :func:`look_at`, :func:`silhouette`, :func:`rasterize`,
  :func:`face_index`, :func:`shade`, :func:`normal_image`, :func:`face_normals`, :func:`vertex_normals`;
- metrics: :func:`chamfer_distance`, :func:`mesh_chamfer`, :func:`mesh_normal_consistency`,
  :func:`image_normal_consistency`, :func:`silhouette_iou`, :func:`genus`, :func:`sample_surface`;
- :class:`MeshSDFError`, the one exception type for a user's mistake.

Importing the package has no side effects: each name is loaded from its module on first use.
Subpackages (one concern each, see docs/architecture.md): ``ops`` (kernels), ``isosurface``,
``layer``, ``render``, ``models``, ``datasets``, ``experiment``, ``training``, ``svr``, ``runtime``.
"""
from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

__all__ = [
    # the layer
    "mesh_from_field", "mesh_from_sdf", "SurfaceMesh", "check_gradients",
    # extraction
    "extract", "ExtractionState", "marching_cubes",
    # rendering
    "Camera", "look_at", "silhouette", "rasterize", "face_index", "shade", "normal_image", "face_normals",
    "vertex_normals",
    # metrics
    "chamfer_distance", "mesh_chamfer", "mesh_normal_consistency", "image_normal_consistency", "silhouette_iou",
    "genus", "sample_surface",
    # errors
    "MeshSDFError",
]

# the module (relative to this package) that defines each public name; tests/test_package.py checks
# that it lists exactly __all__
_WHERE = {
    ".layer": ("mesh_from_field", "mesh_from_sdf", "SurfaceMesh", "check_gradients"),
    ".isosurface": ("extract", "ExtractionState"),
    ".ops": ("marching_cubes",),
    ".render": ("Camera", "look_at", "silhouette", "rasterize", "face_index", "shade", "normal_image",
                "face_normals", "vertex_normals"),
    ".metrics": ("chamfer_distance", "mesh_chamfer", "mesh_normal_consistency", "image_normal_consistency",
                 "silhouette_iou", "genus", "sample_surface"),
    ".errors": ("MeshSDFError",),
}
_API = {name: module for module, names in _WHERE.items() for name in names}

if TYPE_CHECKING:  # for type checkers and IDEs; at run time the names load lazily
    from .errors import MeshSDFError
    from .isosurface import ExtractionState, extract
    from .layer import SurfaceMesh, check_gradients, mesh_from_field, mesh_from_sdf
    from .metrics import (chamfer_distance, genus, image_normal_consistency, mesh_chamfer, mesh_normal_consistency,
                          sample_surface, silhouette_iou)
    from .ops import marching_cubes
    from .render import (Camera, face_index, face_normals, look_at, normal_image, rasterize, shade, silhouette,
                         vertex_normals)


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(module, __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
