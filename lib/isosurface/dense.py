"""The dense store: a full N^3 grid of field values, and the ``dense`` and ``fast`` modes' parts.

- :func:`grid_points`, :func:`dense_grid`, :func:`extract_dense`: the field on every grid
  point and its mesh, outside any state;
- :class:`_DenseGrid`: the flat value grid the driver (:mod:`.driver`) fills in the
  ``dense`` and ``fast`` modes;
- :func:`_refresh_fast`, :func:`_check_fast`: the ``fast`` mode, the original's heuristic
  (re-evaluate around the previous vertices) and its diagnostic.
"""
from __future__ import annotations

import torch

from ..ops.marching_cubes import grid_axis, marching_cubes
from ..ops.marching_cubes_tables import tables
from .state import ExtractionState, SdfFn

__all__ = ["dense_grid", "extract_dense", "grid_points"]


def grid_points(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All points of the N^3 grid over [-1, 1]^3.

    Args:
        resolution: N, points per axis.
        device, dtype: of the result (default CPU, float32).

    Returns:
        (N^3, 3) coordinates in [i, j, k] C order (x slowest, z fastest).
    """
    ax = torch.linspace(-1.0, 1.0, resolution, device=device, dtype=dtype)
    return torch.cartesian_prod(ax, ax, ax)


@torch.no_grad()
def dense_grid(sdf_fn: SdfFn, resolution: int, device=None, chunk: int = 2 ** 18) -> torch.Tensor:
    """The field on the full N^3 grid over [-1, 1]^3.

    Points are generated chunk by chunk (no N^3 x 3 coordinate array), with the same
    coordinates as :func:`grid_points`.

    Args:
        sdf_fn: the field, points (P, 3) -> values (P,), called under ``torch.no_grad()``.
        resolution: N, points per axis.
        device: where the points and values live (default CPU).
        chunk: points per call of ``sdf_fn`` (default 2^18).

    Returns:
        (N, N, N) float32 values; [i, j, k] is the field at grid point (i, j, k).
    """
    grid = _DenseGrid(sdf_fn, resolution, resolution, device, chunk)
    grid.evaluate(torch.arange(resolution ** 3, device=grid.ax.device))
    return grid.values.reshape(resolution, resolution, resolution)


def extract_dense(sdf_fn: SdfFn, resolution: int = 128, device=None, level: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesh of the level set ``sdf_fn = level`` from the full grid (:func:`dense_grid`).

    Args:
        sdf_fn: the field, points (P, 3) -> values (P,).
        resolution: N, points per axis (default 128).
        device: where the grid and mesh live (default CPU).
        level: the level set (default 0).

    Returns:
        verts (V, 3) float32 world coordinates and faces (F, 3) int64 (normals towards
        ``sdf_fn > level``) on ``device``; both empty when the level set misses the grid.
    """
    return marching_cubes(dense_grid(sdf_fn, resolution, device=device), level)


def _points_of(ax: torch.Tensor, g: int, lin: torch.Tensor) -> torch.Tensor:
    """World coordinates (P, 3) of linear indices lin (P,) of a G^3 lattice with axis ``ax``."""
    g2 = g * g
    return torch.stack((ax[lin // g2], ax[(lin // g) % g], ax[lin % g]), 1)


class _DenseGrid:
    """A flat (G^3,) value grid filled lazily through ``sdf_fn``; counts evaluations."""

    def __init__(self, sdf_fn, resolution, size, device, chunk, buffer=None, keep=False):
        self.sdf_fn, self.n, self.g, self.chunk = sdf_fn, resolution, size, chunk
        self.ax = grid_axis(resolution, size, device)
        if buffer is not None and buffer.numel() == size ** 3 and buffer.device == self.ax.device:
            self.values = buffer if keep else buffer.fill_(float("nan"))
        else:
            self.values = torch.full((size ** 3,), float("nan"), device=device)
        self.evaluations = 0

    def lin(self, ijk):
        return (ijk[..., 0] * self.g + ijk[..., 1]) * self.g + ijk[..., 2]

    def evaluate(self, lin: torch.Tensor) -> None:
        """(Re-)evaluate the field at distinct linear indices lin (P,)."""
        for s in range(0, lin.numel(), self.chunk):
            part = lin[s : s + self.chunk]
            self.values[part] = self.sdf_fn(_points_of(self.ax, self.g, part)).reshape(-1).float()
        self.evaluations += lin.numel()

    def values_at(self, ijk: torch.Tensor) -> torch.Tensor:
        """Values at lattice points ijk (..., 3) int64 (all evaluated): (...)."""
        return self.values[self.lin(ijk)]

    def corner_values(self, cells: torch.Tensor) -> torch.Tensor:
        """Values at the 8 corners of cells (K, 3): (K, 8), marching cubes' corner order."""
        return self.values_at(cells.unsqueeze(1) + tables(cells.device)["corner"])

    @property
    def stored(self) -> int:
        return self.values.numel()


def _refresh_fast(sdf_fn, state: ExtractionState, chunk: int) -> tuple[_DenseGrid, torch.Tensor]:
    """The paper's heuristic: re-evaluate each previous vertex's voxel and its 6 neighbours.

    Args:
        sdf_fn: the field, points (P, 3) -> values (P,).
        state: the previous fast/dense call's state (full grid ``values``, vertex ``keys``).
        chunk: points per call of ``sdf_fn``.

    Returns:
        the grid (``state.values`` updated in place) and the refreshed grid points (R,), int64
        sorted linear indices (no N^3 mask: ``_check_fast`` looks them up by binary search).
    """
    n = state.resolution
    grid = _DenseGrid(sdf_fn, n, n, state.values.device, chunk, state.values, keep=True)
    keys = state.keys
    n3 = 3 * n ** 3
    # voxel of a vertex: the lower end of its edge (the cell's lower corner for centres)
    lin = torch.where(keys < n3, keys // 3, (keys - n3).clamp(min=0) // 4)
    ijk = torch.stack((lin // (n * n), (lin // n) % n, lin % n), 1)
    steps = torch.tensor([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]],
                         device=keys.device)
    nb = (ijk.unsqueeze(1) + steps).reshape(-1, 3)
    nb = nb[((nb >= 0) & (nb < n)).all(1)]
    fresh = torch.unique(grid.lin(nb))
    grid.evaluate(fresh)
    return grid, fresh


def _is_in(sorted_values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Whether each entry of x (...) int64 is in ``sorted_values`` (R,) (sorted, distinct): bool (...)."""
    if sorted_values.numel() == 0:
        return torch.zeros_like(x, dtype=torch.bool)
    at = torch.searchsorted(sorted_values, x).clamp_(max=sorted_values.numel() - 1)
    return sorted_values[at] == x


def _check_fast(grid: _DenseGrid, keys: torch.Tensor, fresh: torch.Tensor) -> tuple[int, int]:
    """(vertices using a stale value, vertices whose edge turns out not to cross any more).

    keys (V,): the new mesh's vertex keys; fresh (R,): the sorted linear indices this call
    refreshed.  The stale ends are evaluated aside (counted in ``grid.evaluations``); the
    grid keeps the heuristic's values.
    """
    n = grid.n
    k = keys[keys < 3 * n ** 3]
    lo = k // 3
    hi = lo + torch.tensor([n * n, n, 1], device=k.device)[k % 3]
    fresh_lo, fresh_hi = _is_in(fresh, lo), _is_in(fresh, hi)
    stale = ~fresh_lo | ~fresh_hi
    if not bool(stale.any()):
        return 0, 0
    lo, hi, fresh_lo, fresh_hi = lo[stale], hi[stale], fresh_lo[stale], fresh_hi[stale]
    ends = torch.unique(torch.cat((lo[~fresh_lo], hi[~fresh_hi])))
    pts = torch.stack((grid.ax[ends // (n * n)], grid.ax[(ends // n) % n], grid.ax[ends % n]), 1)
    now = torch.cat([grid.sdf_fn(pts[s : s + grid.chunk]).reshape(-1).float()
                     for s in range(0, ends.numel(), grid.chunk)])
    grid.evaluations += ends.numel()

    def value(p, is_fresh):  # the re-evaluated value at a stale end, the grid's at a fresh one
        return torch.where(is_fresh, grid.values[p], now[torch.searchsorted(ends, p).clamp_(max=ends.numel() - 1)])

    missed = (value(lo, fresh_lo) > 0) == (value(hi, fresh_hi) > 0)
    return int(stale.sum()), int(missed.sum())
