"""The dense store: a full N^3 grid of field values, and the ``dense`` and ``fast`` modes' parts.

- :func:`grid_points`, :func:`dense_grid`, :func:`extract_dense`: the field on every grid
  point and its mesh, outside any state;
- :class:`_DenseGrid`: the flat value grid the driver (:mod:`.driver`) fills in the
  ``dense`` and ``fast`` modes;
- :func:`_refresh_fast`, :func:`_check_fast`: the ``fast`` mode, the original's heuristic
  (re-evaluate around the previous vertices) and its diagnostic.

Profiler labels (``torch.profiler.record_function``), so that a profile of a step separates the
field's evaluations from the bookkeeping around them: ``isosurface.field`` (the evaluations of
:class:`_DenseGrid`), ``isosurface.refresh`` (:func:`_refresh_fast`, its evaluations included),
``isosurface.update_cells`` and ``isosurface.check_fast``.
"""
from __future__ import annotations

import functools

import torch
from torch.profiler import record_function

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


def _labelled(label: str):
    """Decorator: the function runs under ``record_function(label)`` (a new one per call, so calls
    from several threads each get their own)."""
    def wrap(fn):
        @functools.wraps(fn)
        def run(*args, **kwargs):
            with record_function(label):
                return fn(*args, **kwargs)
        return run
    return wrap


def _points_of(ax: torch.Tensor, g: int, lin: torch.Tensor) -> torch.Tensor:
    """World coordinates (P, 3) of linear indices lin (P,) of a G^3 lattice with axis ``ax``."""
    return ax.index_select(0, _cell_ijk(lin, g).view(-1)).view(-1, 3)


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
        self.corner_step = self.lin(tables(self.ax.device)["corner"])  # (8,) linear offset of each cell corner

    def lin(self, ijk):
        return (ijk[..., 0] * self.g + ijk[..., 1]) * self.g + ijk[..., 2]

    def evaluate(self, lin: torch.Tensor, fn=None) -> None:
        """(Re-)evaluate the field (or ``fn``, another field) at distinct linear indices lin (P,)."""
        fn = self.sdf_fn if fn is None else fn
        with record_function("isosurface.field"):
            for s in range(0, lin.numel(), self.chunk):
                part = lin[s : s + self.chunk]
                self.values.index_copy_(0, part, fn(_points_of(self.ax, self.g, part)).reshape(-1).float())
        self.evaluations += lin.numel()

    def corner_values(self, cells: torch.Tensor) -> torch.Tensor:
        """Values at the 8 corners of cells (K, 3) int64: (K, 8), marching cubes' corner order."""
        return self.corners_at(self.lin(cells))

    def corners_at(self, lin: torch.Tensor) -> torch.Tensor:
        """:meth:`corner_values` of the cells with lower corners at linear indices lin (K,) int64: (K, 8)."""
        # one flat gather: no (K, 8, 3) lattice points to build and linearise
        return self.values.index_select(0, (lin.unsqueeze(1) + self.corner_step).view(-1)).view(lin.shape[0], 8)

    @property
    def stored(self) -> int:
        return self.values.numel()


@_labelled("isosurface.refresh")
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
    ijk = _cell_ijk(lin, n)
    step = torch.tensor([n * n, n, 1], device=keys.device)
    # a neighbour off the grid is replaced by the voxel itself (marked anyway): no masked select
    offset = torch.cat(((ijk < n - 1) * step, (ijk > 0) * -step), 1)  # (V, 6)
    # distinct and sorted through the mask: one byte-wide scan, cheaper than sorting 7 V keys
    marks.index_fill_(0, lin, True)
    marks.index_fill_(0, offset.add_(lin.unsqueeze(1)).view(-1), True)
    fresh = _marked(marks)
    before = grid.values.index_select(0, fresh) > 0
    grid.evaluate(fresh)
    flipped = fresh.masked_select((grid.values.index_select(0, fresh) > 0) != before)
    return grid, fresh, flipped


def _marked(marks: torch.Tensor) -> torch.Tensor:
    """Sorted indices (R,) int64 of the True entries of marks (M,) bool, few and clustered.

    Scans 8 marks at a time as one int64 word, then the bytes of only the nonzero words,
    gathered as words and read as int8: a full byte-wide ``nonzero`` writes or counts every
    byte of the N^3 mask, and gathering or scanning bool rows runs slower than the same
    bytes as integers.
    """
    m = marks.numel() - marks.numel() % 8
    if m == 0 or marks.storage_offset() % 8:
        return marks.nonzero().squeeze(1)
    word = marks[:m].view(torch.int64)
    words = word.nonzero().squeeze(1)
    byte = word.index_select(0, words).view(torch.int8).nonzero().squeeze(1)  # 8 per word, in memory order
    found = words.index_select(0, byte >> 3).mul_(8).add_(byte & 7)
    if m < marks.numel():
        found = torch.cat((found, marks[m:].nonzero().squeeze(1).add_(m)))
    return found


def _cell_ijk(lin: torch.Tensor, n: int) -> torch.Tensor:
    """Lattice points (P, 3) of linear indices lin (P,) of the N^3 grid."""
    row = lin // n  # one division per level: the remainders by multiply-subtract
    i = row // n
    return torch.stack((i, row - i * n, lin - row * n), 1)


@_labelled("isosurface.update_cells")
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
    out = grid.corners_at(cand) > 0
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


def _fill_signs(grid: _DenseGrid, cells: torch.Tensor, corners: torch.Tensor) -> None:
    """Fill the grid with the sign (``> 0``) of every point, +inf or -inf, then the cells'
    corner values: the field's values on the band, its signs elsewhere.

    Valid when cells (C, 3) are all the sign-changing cells of the grid, with their corner
    values corners (C, 8) (so every grid edge whose ends differ in sign is one of their
    edges): the sign at (i, j, k) is the sign at the origin flipped once per such edge
    crossed on the way (i, 0, 0) <- (0, 0, 0), then (i, j, 0), then (i, j, k).  The origin's
    value is evaluated (one point, kept) when it is not a corner.  Byte-wide prefix sums
    over the grid, no search.

    Args:
        grid: the (N^3,) grid (overwritten).
        cells, corners: as above, C > 0.
    """
    n, dev = grid.n, grid.values.device
    tab = tables(dev)
    at = (grid.lin(cells).unsqueeze(1) + grid.lin(tab["corner"])).view(-1)  # (8C,) the corners
    out = corners > 0
    c, e = (out.index_select(1, tab["edge_lo"]) != out.index_select(1, tab["edge_hi"])).nonzero(as_tuple=True)
    upper = cells.index_select(0, c) + tab["corner"].index_select(0, tab["edge_hi"].index_select(0, e))  # (E, 3)
    axis = tab["edge_axis"].index_select(0, e)
    # flips at the upper end of each sign-changing edge: along z everywhere, along y in the
    # plane k = 0, along x on the line j = k = 0; a prefix sum counts those crossed (mod 2)
    flip = torch.zeros(n ** 3, dtype=torch.int8, device=dev)
    flip.index_fill_(0, grid.lin(upper[axis == 2]), 1)
    parity = flip.view(n, n, n).cumsum(2, dtype=torch.int8)
    del flip
    at_y = upper[(axis == 1) & (upper[:, 2] == 0)]
    plane = torch.zeros(n * n, dtype=torch.int8, device=dev).index_fill_(0, at_y[:, 0] * n + at_y[:, 1], 1)
    parity += plane.view(n, n).cumsum(1, dtype=torch.int8).unsqueeze(2)
    at_x = upper[(axis == 0) & (upper[:, 1] == 0) & (upper[:, 2] == 0)]
    line = torch.zeros(n, dtype=torch.int8, device=dev).index_fill_(0, at_x[:, 0], 1)
    parity += line.cumsum(0, dtype=torch.int8).view(n, 1, 1)
    is_origin = at == 0
    if bool(is_origin.any()):
        origin = None
        origin_out = bool(corners.reshape(-1)[is_origin.nonzero()[0, 0]] > 0)
    else:
        origin = grid.sdf_fn(grid.ax[:1].expand(1, 3)).reshape(-1).float()
        grid.evaluations += 1
        origin_out = bool(origin[0] > 0)
    # outside where the parity matches the origin's side: (parity odd) != (origin outside)
    outside = parity.view(-1).bitwise_and_(1).bool() != origin_out
    del parity
    inf = grid.values.new_full((), float("inf"))
    torch.where(outside, inf, -inf, out=grid.values)
    grid.values.index_copy_(0, at, corners.reshape(-1).float())
    if origin is not None:
        grid.values[:1] = origin


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
    grid.evaluate(pending, origin)


@_labelled("isosurface.check_fast")
def _check_fast(grid: _DenseGrid, keys: torch.Tensor, marks: torch.Tensor) -> tuple[int, int]:
    """(vertices using a stale value, vertices whose edge turns out not to cross any more).

    keys (V,): the new mesh's vertex keys; marks (N^3,) bool: True at the points this call
    refreshed.  The stale ends are evaluated aside (counted in ``grid.evaluations``); the
    grid keeps the heuristic's values.
    """
    n = grid.n
    k = keys.masked_select(keys < 3 * n ** 3)
    lo = k // 3
    hi = lo + torch.tensor([n * n, n, 1], device=k.device).index_select(0, k - 3 * lo)  # one division: axis = k mod 3
    fresh_lo, fresh_hi = marks.index_select(0, lo), marks.index_select(0, hi)
    stale = (fresh_lo & fresh_hi).logical_not_()
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
