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


def _refresh_fast(sdf_fn, state: ExtractionState, chunk: int, marks: torch.Tensor
                  ) -> tuple[_DenseGrid, torch.Tensor, torch.Tensor]:
    """The paper's heuristic: re-evaluate each previous vertex's voxel and its 6 neighbours.

    Args:
        sdf_fn: the field, points (P, 3) -> values (P,).
        state: the previous fast/dense call's state (full grid ``values``, vertex ``keys``).
        chunk: points per call of ``sdf_fn``.
        marks: (N^3,) bool, all False; left True at the refreshed points (the caller clears
            them, see :func:`_check_fast`).

    Returns:
        the grid (``state.values`` updated in place), the refreshed grid points (R,) and those
        of them whose sign (``> 0``) changed (F,), both int64 sorted linear indices.
    """
    n = state.resolution
    grid = _DenseGrid(sdf_fn, n, n, state.values.device, chunk, state.values, keep=True)
    keys = state.keys
    n3 = 3 * n ** 3
    # voxel of a vertex: the lower end of its edge (the cell's lower corner for centres)
    lin = torch.where(keys < n3, keys // 3, (keys - n3).clamp(min=0) // 4)
    i, j, k = lin // (n * n), (lin // n) % n, lin % n
    inside = torch.stack((torch.ones_like(i, dtype=torch.bool), i < n - 1, i > 0, j < n - 1, j > 0, k < n - 1, k > 0), 1)
    step = torch.tensor([0, n * n, -n * n, n, -n, 1, -1], device=keys.device)
    # distinct and sorted through the mask: one byte-wide scan, cheaper than sorting 7 V keys
    marks.index_fill_(0, (lin.unsqueeze(1) + step).masked_select(inside), True)
    fresh = marks.nonzero().squeeze(1)
    before = grid.values.index_select(0, fresh) > 0
    grid.evaluate(fresh)
    flipped = fresh.masked_select((grid.values.index_select(0, fresh) > 0) != before)
    return grid, fresh, flipped


def _cell_ijk(lin: torch.Tensor, n: int) -> torch.Tensor:
    """Lattice points (P, 3) of linear indices lin (P,) of the N^3 grid."""
    return torch.stack((lin // (n * n), (lin // n) % n, lin % n), 1)


def _update_cells(grid: _DenseGrid, cells: torch.Tensor, flipped: torch.Tensor) -> torch.Tensor:
    """The sign-changing cells of the grid after a refresh, from those before it.

    Only a cell with a corner whose sign changed can change status, so the result is the
    previous cells without such corners plus those of the cells around the changed points
    that change sign now: the cells a full scan of the grid finds, without one.

    Args:
        grid: the refreshed grid.
        cells: (C, 3) int64, C order: the sign-changing cells of the grid before the refresh.
        flipped: (F,) int64 linear indices of the grid points whose sign changed.

    Returns:
        (C', 3) int64 sign-changing cells, C order, and the linear indices (A,) int64 of
        those among them that were not sign-changing before.
    """
    if flipped.numel() == 0:
        return cells, flipped
    n = grid.n
    corner = tables(cells.device)["corner"]
    around = (_cell_ijk(flipped, n).unsqueeze(1) - corner).reshape(-1, 3)  # cells having a flipped corner
    around = around[((around >= 0) & (around < n - 1)).all(1)]
    cand = torch.unique(grid.lin(around))
    out = grid.corner_values(_cell_ijk(cand, n)) > 0
    crossing = out.any(1) & ~out.all(1)
    prev = grid.lin(cells)
    if prev.numel():
        at = torch.searchsorted(prev, cand).clamp_(max=prev.numel() - 1)
        present = prev.index_select(0, at) == cand
    else:
        at, present = torch.zeros_like(cand), torch.zeros_like(cand, dtype=torch.bool)
    gone, new = at.masked_select(present & ~crossing), cand.masked_select(~present & crossing)
    if gone.numel() == 0 and new.numel() == 0:
        return cells, new
    keep = torch.ones_like(prev, dtype=torch.bool)
    keep.index_fill_(0, gone, False)
    prev = prev.masked_select(keep)
    # merge the sorted additions into the sorted remainder: each lands after the remainder's
    # smaller entries and the additions before it
    pos = torch.searchsorted(prev, new) + torch.arange(new.numel(), device=new.device)
    merged = prev.new_empty(prev.numel() + new.numel())
    is_new = torch.zeros_like(merged, dtype=torch.bool)
    is_new.index_fill_(0, pos, True)
    merged.index_copy_(0, pos, new)
    merged.masked_scatter_(~is_new, prev)
    return _cell_ijk(merged, n), new


def _fill_signs(values: torch.Tensor, known: torch.Tensor, n: int) -> None:
    """Give every point of a (N^3,) grid not ``known`` the sign (``> 0``) of the known ones:
    +inf or -inf, in place.

    Valid when the known points include both ends of every grid edge whose ends differ in
    sign (the corners of all sign-changing cells): then no edge with an unknown end changes
    sign, so an unknown point has the sign of the nearest known point on its line along z,
    else (a line with none) of the nearest line filled in its (x, y) plane, else of the
    nearest plane filled.  Nothing changes when no point is known.

    Args:
        values: (N^3,) float32, the known values (any value elsewhere).
        known: (N^3,) bool.
        n: N.
    """
    # +1 outside, -1 inside (NaN included, as ``> 0`` classifies it), 0 unknown
    code = torch.where(values > 0, 1, -1).to(torch.int8).mul_(known)
    c = code.view(n, n, n)
    idx = torch.int16 if n < 2 ** 15 else torch.int32
    for dim in (2, 1, 0):
        if not bool((c == 0).any()) or not bool(known.any()):
            break
        other = (dim + 1) % 3
        for part in c.split(max(1, 2 ** 22 // (n * n)), other):  # slabs: bounded transients
            has = part != 0
            at = torch.arange(n, dtype=idx, device=c.device).view([-1 if d == dim else 1 for d in range(3)])
            at = at.expand_as(part)
            # nearest known index before each point, else the first one after it (a line with
            # none stays unknown, for the next axis)
            before = torch.where(has, at, -1).cummax(dim).values
            after = torch.where(has, at, n).flip(dim).cummin(dim).values.flip(dim)
            src = torch.where(before >= 0, before, after).clamp_(max=n - 1).long()
            part.copy_(torch.where(has, part, part.gather(dim, src)))
    values.copy_(torch.where(known, values, torch.where(code > 0, float("inf"), float("-inf"))))


def _resolve(grid: _DenseGrid, cells: torch.Tensor, origin) -> None:
    """Evaluate with ``origin`` the corners of cells (K, 3) that hold only a sign (+-inf).

    The fast mode started from the band (see :func:`lib.isosurface.extract`): those points
    were never evaluated, so a dense start would hold the first call's field there, which
    ``origin`` computes.  Counted in ``grid.evaluations``.
    """
    if cells.numel() == 0:
        return
    corner = grid.lin(cells).unsqueeze(1) + grid.lin(tables(cells.device)["corner"])  # (K, 8)
    pending = torch.unique(corner.masked_select(torch.isinf(grid.values.index_select(0, corner.view(-1)).view(-1, 8))))
    if pending.numel():
        for s in range(0, pending.numel(), grid.chunk):
            part = pending[s : s + grid.chunk]
            grid.values[part] = origin(_points_of(grid.ax, grid.g, part)).reshape(-1).float()
        grid.evaluations += pending.numel()


def _check_fast(grid: _DenseGrid, keys: torch.Tensor, marks: torch.Tensor) -> tuple[int, int]:
    """(vertices using a stale value, vertices whose edge turns out not to cross any more).

    keys (V,): the new mesh's vertex keys; marks (N^3,) bool: True at the points this call
    refreshed.  The stale ends are evaluated aside (counted in ``grid.evaluations``); the
    grid keeps the heuristic's values.
    """
    n = grid.n
    k = keys[keys < 3 * n ** 3]
    lo = k // 3
    hi = lo + torch.tensor([n * n, n, 1], device=k.device)[k % 3]
    fresh_lo, fresh_hi = marks.index_select(0, lo), marks.index_select(0, hi)
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
