"""What an extraction leaves for the next one: :class:`ExtractionState`, and the vocabulary of
the package: the extraction :data:`MODES` and the field type :data:`SdfFn`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch

__all__ = ["MODES", "ExtractionState", "SdfFn"]

SdfFn = Callable[[torch.Tensor], torch.Tensor]
"""A field: points (P, 3) float32 -> values (P,); the surface is where it equals the level."""

MODES = ("dense", "fast", "sparse")


@dataclass
class ExtractionState:
    """What one extraction leaves for the next call (pass it back as ``state=``), plus stats.

    Attributes:
        resolution: N, grid points per axis of the extraction.
        mode: the mode that made it, one of :data:`MODES`.
        grid_size: G, points per axis of the value lattice (sparse: the seeding lattice
            padded past the box).
        values: dense and fast modes: the flat (N^3,) float32 grid of ``sdf_fn - level``
            (the ``fast`` mode refreshes it; started from the band, +-inf marks a point
            never evaluated, of that sign); sparse mode: None (values live in a
            block-sparse store of the band the call evaluated, freed after the call).
        full: whether ``values`` holds every grid point.
        verts: (V, 3) float32, the last mesh's vertices.
        faces: (F, 3) int64, the last mesh's faces.
        keys: (V,) int64 vertex keys (see :func:`lib.ops.marching_cubes.marching_cubes_cells`).
        cells: (C, 3) int64 sign-changing cells; the sparse mode starts its next call from
            them (warm start).
        evaluations: points evaluated by the last call.
        warm: whether the last sparse call started from the previous cells.
        empty: no surface in the box (``message`` says why).
        message: why the mesh is empty or wrong, else "".
        stale_vertices: in ``fast`` mode, vertices interpolated from at least one value not
            refreshed by this call (their position is approximate: normal for small steps).
        missed_vertices: of those, the ones whose edge does not cross the surface any more
            once the stale end is re-evaluated (a diagnostic only, the grid keeps the
            heuristic's values): > 0 means the surface moved out of the refreshed band and
            the mesh is wrong there.
        verified: result of ``verify=True`` (None when not run).
        peak_points: the most grid values held at once (sparse: value slots of the block
            pool at its largest, 512 per 8^3 block; a warm call starts with that many).
        level: the level set extracted.
        tracking: sparse mode: how the cold start tracked the surface, "cells" or "blocks"
            (whole 8^3-cell blocks, chosen for a field cheap per point); else "".
        dl_ds: per-vertex dL/ds (V,) written by the backward pass of :mod:`lib.layer.field`
            (None before a backward).
        origin: fast mode started from the band (``extract(..., freeze=)``): the first call's
            field, frozen, with which a later call evaluates the grid points that start left
            as signs (+-inf in ``values``) when the heuristic reads them; else None.
        marks: fast and dense modes: (N^3,) bool, all False, the next fast call's scratch
            (it marks the points it refreshes); None until a fast call made one.
    """

    resolution: int
    mode: str
    grid_size: int
    values: torch.Tensor | None
    full: bool
    verts: torch.Tensor
    faces: torch.Tensor
    keys: torch.Tensor
    cells: torch.Tensor
    evaluations: int = 0
    warm: bool = False
    empty: bool = False
    message: str = ""
    stale_vertices: int = 0
    missed_vertices: int = 0
    verified: bool | None = None
    peak_points: int = 0
    level: float = 0.0
    tracking: str = ""
    dl_ds: torch.Tensor | None = field(default=None, repr=False)
    marks: torch.Tensor | None = field(default=None, repr=False)
    origin: SdfFn | None = field(default=None, repr=False)
