"""The block store and the ``sparse`` mode: seeding (coarse pass or warm start) and surface tracking.

- :class:`_BlockGrid`: field values on a G^3 lattice in 8^3-point blocks allocated where the
  extraction passes (memory proportional to the surface band, not to G^3);
- :func:`_sparse`: seeds (a coarse lattice with bisection and recursive refinement, or the
  previous call's cells plus a sentinel lattice) then :func:`_track`, which grows the set of
  sign-changing cells across faces with mixed signs until it is closed; or, on a cold start
  with a field cheap per point, :func:`_track_blocks`, the same closure on whole blocks;
- :func:`default_coarse_stride`, :data:`SENTINEL_FACTOR`, :data:`KEEP_CORNERS`,
  :data:`BLOCK_COST_RATIO`, :data:`BLOCK_MIN_CELLS`, :data:`COST_PROBE_POINTS`: its constants.

The driver is :func:`lib.isosurface.driver.extract` (``mode="sparse"``).
"""
from __future__ import annotations

import math
import time

import numpy as np
import torch

from ..errors import MeshSDFError
from ..ops.indexing import flat_nonzero
from ..ops.marching_cubes import grid_axis, voxel_size
from ..ops.marching_cubes_tables import CORNER_OFFSETS, tables
from ..runtime.threads import FEW_ROWS, all_threads, concurrently, elementwise_section
from .dense import _cell_ijk

__all__ = ["BLOCK_COST_RATIO", "BLOCK_MIN_CELLS", "COST_PROBE_POINTS", "KEEP_CORNERS", "SENTINEL_FACTOR",
           "default_coarse_stride"]


SENTINEL_FACTOR = 4  # warm start: sentinel lattice stride = this x the coarse stride

# A cold start tracks whole 8^3-cell blocks instead of cells when the field, timed on part of
# the call's coarse lattice, costs less per point than this many times the cost per key of a
# sort of as many keys (the cell tracking's typical bookkeeping step), both in one thread's
# CPU time: block tracking evaluates several times more points, in far fewer and cheaper steps.
BLOCK_COST_RATIO = 16.0
BLOCK_MIN_CELLS = 64  # and only with at least this many cells per axis (8 blocks): below, a
# surface's blocks are most of the box
COST_PROBE_POINTS = 4096  # points per timed field call of the cost probe (at most two calls)


def _distinct(key: torch.Tensor) -> torch.Tensor:
    """The distinct values (D,), sorted, of integer keys (K,): ``torch.unique``'s result.

    A sort then a pass over neighbours.  On the CPU numpy's sort (vectorised): torch's CPU
    sort falls back to a comparison sort, several times slower, below its radix-sort size
    (2^15 keys), where most of the tracking's rounds are; elsewhere torch's stable sort (a
    merge or radix sort), which beats its default one and ``torch.unique``."""
    if key.device.type == "cpu":
        return torch.unique_consecutive(torch.from_numpy(np.sort(key.numpy())))
    return torch.unique_consecutive(torch.sort(key, stable=True)[0])


def _sort_distinct(key: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Distinct integer keys (K,) sorted, and where each came from (K,) int64: ``torch.sort``'s
    result (the keys being distinct, every sort gives the same), by numpy on the CPU (see
    :func:`_distinct`)."""
    if key.device.type == "cpu":
        a = key.numpy()
        order = np.argsort(a)
        return torch.from_numpy(a[order]), torch.from_numpy(order)
    return torch.sort(key, stable=True)


def _any_negative(x: torch.Tensor) -> bool:
    """Whether integers x (K,) hold a value below 0 (one host sync): a minimum, cheaper than
    ``bool((x < 0).any())`` (a pass writing K bools, then their reduction)."""
    return x.numel() > 0 and int(x.min()) < 0


def default_coarse_stride(resolution: int, warm: bool = False) -> int:
    """The default coarse stride of the sparse mode's cold start (or, warm, the base of its sentinel lattice).

    Above N = 64 a cold start takes about 16 coarse cells per axis instead of 32: its lattice
    is an evaluation per stride^3 of the box that the mesh does not need, while seeds further
    apart only add tracking rounds (and bisection steps) over the surface.  The sentinel
    lattice of a warm start keeps the denser base (it is what finds new pieces).

    Args:
        resolution: N, grid points per axis.
        warm: the base of the warm start's sentinel lattice (SENTINEL_FACTOR x it) instead.

    Returns:
        the power of two giving about 32 coarse cells per axis up to N = 64 and when ``warm``
        (N = 64: 2, 128: 4, 256: 8), else about 16 (N = 128: 8, 256: 16, 512: 32).
    """
    cells = 24 if warm or resolution <= 64 else 12
    s = 1
    while (resolution - 1) / (2 * s) >= cells:
        s *= 2
    return s


class _BlockGrid:
    """Field values on a G^3 lattice, held in blocks of 8^3 points allocated on first use.

    Memory follows the blocks the extraction touches (a band around the surface), not G^3:
    a dense block table, (ceil(G / 8))^3 int32 (G^3 / 128 bytes), holds each block's row in a
    growable pool of values, (rows, 512) float32 with NaN = not evaluated yet, and in a pool
    of visited-cell marks of the same shape (bool; cell (i, j, k) is marked in its lower
    corner's slot).  Lookups are gathers: no hashing or probing.  The host syncs of a lookup
    are the tests "any block missing" and "any value missing" and the count of points to
    evaluate (the field needs a concrete batch).  A field that returns NaN somewhere is
    re-evaluated there on every lookup (same mesh, more evaluations).

    Points are named by packed keys, int64 (i << 2S) | (j << S) | k with S bits per axis
    (2^S >= G): ordered like C order, a corner or face neighbour is one addition (the
    callers keep coordinates in range), and the block and offset in it are shifts and
    masks (no division).  ``lin`` / ``ijk`` convert; ``values_at`` / ``peek`` / ``store``
    take coordinates, ``values_of`` / ``mark_new_keys`` keys.
    Same ``values_at`` / ``evaluations`` / ``stored`` interface as :class:`.dense._DenseGrid`.
    """

    SHIFT = 3  # block edge 2^3 = 8 points
    B3 = 512  # points per block

    def __init__(self, sdf_fn, resolution, size, device, chunk, rows=64):
        self.sdf_fn, self.n, self.g, self.chunk = sdf_fn, resolution, size, chunk
        self.ax = grid_axis(resolution, size, device)
        dev = self.ax.device
        self.nb = -(-size >> self.SHIFT)  # blocks per axis
        self.bits = max(self.SHIFT, (size - 1).bit_length())
        self.table = torch.full((self.nb ** 3,), -1, dtype=torch.int32, device=dev)
        rows = max(1, int(rows))
        self.pool = torch.full((rows, self.B3), float("nan"), device=dev)
        self.marks = torch.zeros((rows, self.B3), dtype=torch.bool, device=dev)
        self.rows = 0  # rows in use
        self.peak_rows = rows
        self.evaluations = 0
        self.tracking = "cells"  # or "blocks" (see _track_blocks)
        self._steps = None  # corner lookup steps (see _corner_step), built on first use

    @property
    def stored(self) -> int:
        """Value slots allocated at the largest (pool rows x 512)."""
        return self.peak_rows * self.B3

    def lin(self, ijk: torch.Tensor) -> torch.Tensor:
        """Keys (...) of lattice points ijk (..., 3) int64."""
        b = self.bits
        return (ijk[..., 0] << (2 * b)) | (ijk[..., 1] << b) | ijk[..., 2]

    def ijk(self, key: torch.Tensor) -> torch.Tensor:
        """Lattice points (..., 3) of keys (...)."""
        b, mask = self.bits, (1 << self.bits) - 1
        return torch.stack((key >> (2 * b), (key >> b) & mask, key & mask), -1)

    def _slots(self, key: torch.Tensor, allocate: bool) -> torch.Tensor:
        """Flat pool slots (P,) of keys (P,); absent blocks: allocated, or -1."""
        b, sh, nb = self.bits, self.SHIFT, self.nb
        bm = ((1 << b) - 1) >> sh
        blk = ((key >> (2 * b + sh)) * nb + ((key >> (b + sh)) & bm)) * nb + ((key >> sh) & bm)
        # index_select / masked_select / index_copy_ rather than x[i]: faster on a CPU
        # (benchmarks/extraction.py's sparse extraction)
        row = self.table.index_select(0, blk)
        if allocate:
            if _any_negative(row):
                self._allocate(_distinct(blk.masked_select(row < 0)))
                row = self.table.index_select(0, blk)
        # offset in the block: (i & 7) << 6 | (j & 7) << 3 | (k & 7)
        off = ((key >> (2 * b - 2 * sh)) & (7 << 2 * sh)) | ((key >> (b - sh)) & (7 << sh)) | (key & 7)
        slot = (row.long() << (3 * sh)) | off
        return slot if allocate else torch.where(row < 0, -1, slot)

    def _allocate(self, blocks: torch.Tensor) -> None:
        k = blocks.numel()
        if self.rows + k > self.pool.shape[0]:
            cap = max(self.rows + k, self.pool.shape[0] * 3 // 2)
            self.pool = torch.cat((self.pool[: self.rows],
                                   self.pool.new_full((cap - self.rows, self.B3), float("nan"))))
            self.marks = torch.cat((self.marks[: self.rows], self.marks.new_zeros((cap - self.rows, self.B3))))
            self.peak_rows = max(self.peak_rows, cap)
        rows = torch.arange(self.rows, self.rows + k, dtype=torch.int32, device=blocks.device)
        self.table.index_copy_(0, blocks, rows)
        self.rows += k

    def field(self, ijk: torch.Tensor) -> torch.Tensor:
        """The field at lattice points ijk (P, 3), evaluated now in chunks, not stored: (P,).

        The chunks are of even size, at most ``chunk`` (no short last call: a small batch
        runs the network below its rate)."""
        p = ijk.shape[0]
        size = max(1, -(-p // max(1, -(-p // self.chunk))))
        # points by a flat gather of the axis (cheaper than advanced indexing with (P, 3) indices)
        out = [_call_field(self.sdf_fn, self.ax.index_select(0, ijk[s : s + size].reshape(-1)).view(-1, 3))
               for s in range(0, p, size)]
        self.evaluations += ijk.shape[0]
        return torch.cat(out) if out else self.ax.new_zeros(0)

    def field_once(self, ijk: torch.Tensor) -> torch.Tensor:
        """The field at points ijk (..., 3), each distinct point evaluated once, not stored: (...).

        For the sparse lattices of the seeding passes (coarse, sentinel), whose points would
        each occupy a block of their own in the pool.
        """
        lin, inv = torch.unique(self.lin(ijk), return_inverse=True)
        return self.field(self.ijk(lin))[inv]

    def values_at(self, ijk: torch.Tensor, extra: torch.Tensor | None = None):
        """Values at lattice points ijk (..., 3) int64, evaluating the field where missing
        and storing what it evaluates: (...); see :meth:`values_of`."""
        return self.values_of(self.lin(ijk), extra)

    def values_of(self, key: torch.Tensor, extra: torch.Tensor | None = None):
        """Values at keys (...), evaluating the field where missing and storing it: (...).

        extra: points (A, 3) evaluated (not stored) in the same field call as the missing
        values (one batch instead of two small ones); then returns (values, extra values (A,)).
        """
        shape = key.shape
        key = key.reshape(-1)
        if key.shape[0] > 2 ** 23:  # keeps the tickets below exact floats
            parts = [self.values_of(part) for part in key.split(2 ** 23)]
            v = torch.cat(parts).reshape(shape)
            return v if extra is None else (v, self.field(extra))
        return self._lookup(self._slots(key, allocate=True), lambda i: key.index_select(0, i), shape, extra)

    def corner_values_of(self, cell: torch.Tensor, extra: torch.Tensor | None = None):
        """Values (F, 8) at the corners of the cells of keys (F,) (marching cubes' corner
        order), evaluating the field where missing and storing it; the same lookups,
        evaluations and batches as :meth:`values_of` on the corners' keys, with the slots
        derived per cell.  extra: as in :meth:`values_of`."""
        if cell.shape[0] > 2 ** 20:  # keeps the tickets below exact floats
            v = torch.cat([self.corner_values_of(part) for part in cell.split(2 ** 20)])
            return v if extra is None else (v, self.field(extra))
        step = self._corner_step(cell.device)[2]
        return self._lookup(self._corner_slots(cell),
                            lambda i: cell.index_select(0, i >> 3) + step.index_select(0, i & 7),
                            (cell.shape[0], 8), extra)

    def _lookup(self, slot: torch.Tensor, key_at, shape, extra: torch.Tensor | None):
        """Values (shape) at pool slots (P,) (allocated), evaluating the field where missing;
        key_at(indices (M,) into slot) -> their keys (M,).  extra: as in :meth:`values_of`."""
        flat = self.pool.view(-1)
        v = flat.index_select(0, slot)
        miss = flat_nonzero(torch.isnan(v))  # lookups to evaluate (a point may repeat)
        more = None
        if miss.shape[0]:
            ms = slot.index_select(0, miss)
            # one representative per distinct missing point, without sorting them all: each
            # writes its number into its (NaN) slot and the one whose number stays wins
            ticket = torch.arange(ms.shape[0], device=ms.device, dtype=flat.dtype)  # exact below 2^24
            flat.index_copy_(0, ms, ticket)
            won = flat_nonzero(flat.index_select(0, ms) == ticket)
            # C order: the same batch whoever won
            new, order = _sort_distinct(key_at(miss.index_select(0, won)))
            pts = self.ijk(new)
            got = self.field(pts if extra is None else torch.cat((pts, extra)))
            flat.index_copy_(0, ms.index_select(0, won.index_select(0, order)), got[: new.shape[0]])
            more = None if extra is None else got[new.shape[0]:]
            v.index_copy_(0, miss, flat.index_select(0, ms))  # only the missing lookups change
        if extra is None:
            return v.reshape(shape)
        return v.reshape(shape), (self.field(extra) if more is None else more)

    def _corner_step(self, dev) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """For :meth:`_corner_slots`: per in-block offset of a cell (its i, j, k & 7 as 3 bits
        each) and corner, the block index step and the corner's own in-block offset, (512, 8)
        each (a corner is in the next block along the axes where the cell is last in its block
        and the corner steps); and the corners' key offsets (8,)."""
        if self._steps is None:
            corner = tables(dev)["corner"]  # (8, 3)
            loc = torch.cartesian_prod(*[torch.arange(8, device=dev)] * 3)  # (512, 3) offsets in C order
            carry = ((loc == 7).long().unsqueeze(1) & corner)  # (512, 8 corners, 3): the corner is in the next block
            nb = self.nb
            blk = (carry * torch.tensor([nb * nb, nb, 1], device=dev)).sum(2)
            off = ((loc.unsqueeze(1) + corner - (carry << self.SHIFT)) * torch.tensor([64, 8, 1], device=dev)).sum(2)
            self._steps = (blk, off, self.lin(corner))
        return self._steps

    def _corner_slots(self, cell: torch.Tensor) -> torch.Tensor:
        """Flat pool slots (F * 8,) of the corners of the cells of keys (F,), their blocks
        allocated (the blocks :meth:`_slots` allocates for the corners' keys, in the same order).

        A cell's block and offset are computed once; a corner is in the same block, one step
        further, unless the cell is last in its block along an axis where the corner steps:
        both read from tables by the cell's offset."""
        b, sh, nb = self.bits, self.SHIFT, self.nb
        bm = ((1 << b) - 1) >> sh
        blk = ((cell >> (2 * b + sh)) * nb + ((cell >> (b + sh)) & bm)) * nb + ((cell >> sh) & bm)
        off = ((cell >> (2 * b - 2 * sh)) & (7 << 2 * sh)) | ((cell >> (b - sh)) & (7 << sh)) | (cell & 7)
        step_blk, corner_off, _ = self._corner_step(cell.device)
        blk8 = (blk.unsqueeze(1) + step_blk.index_select(0, off)).view(-1)  # (F * 8,)
        row = self.table.index_select(0, blk8)
        if _any_negative(row):
            self._allocate(_distinct(blk8.masked_select(row < 0)))
            row = self.table.index_select(0, blk8)
        return (row.long() << (3 * sh)) | corner_off.index_select(0, off).view(-1)

    def peek(self, ijk: torch.Tensor) -> torch.Tensor:
        """Stored values at lattice points ijk (..., 3), NaN where not evaluated; evaluates nothing."""
        slot = self._slots(self.lin(ijk).reshape(-1), allocate=False)
        v = self.pool.view(-1)[slot.clamp(min=0)]
        return torch.where(slot >= 0, v, float("nan")).reshape(ijk.shape[:-1])

    def corner_values(self, cells: torch.Tensor) -> torch.Tensor:
        """Values at the 8 corners of cells (K, 3): (K, 8), marching cubes' corner order."""
        return self.corner_values_of(self.lin(cells))

    def store(self, ijk: torch.Tensor, values: torch.Tensor) -> None:
        """Keep known values (P,) at points ijk (P, 3) (evaluated elsewhere)."""
        slot = self._slots(self.lin(ijk), allocate=True)  # may grow the pool: index it after
        self.pool.view(-1)[slot] = values.float()

    def mark_new_keys(self, key: torch.Tensor) -> torch.Tensor:
        """Mark the cells of keys (K,) visited; returns the distinct keys not marked before, sorted."""
        # every candidate's block is allocated: a marked cell's block exists, and an unmarked
        # one's is allocated to mark it (the same blocks, in the same order, as marking alone)
        slot = self._slots(key, allocate=True)
        marks = self.marks.view(-1)
        fresh = flat_nonzero(~marks.index_select(0, slot))
        marks.index_fill_(0, slot.index_select(0, fresh), True)
        return _distinct(key.index_select(0, fresh))

    def drop_marks(self, values: bool = True) -> None:
        """Free the marks and the pool's unused rows, or the whole pool when ``values`` is False
        (the caller holds the values it still needs): before meshing, when memory peaks.

        Args:
            values: whether the stored values are read later (:meth:`corner_values`).
        """
        self.marks = None
        if not values:  # no copy of the used rows either (as large as the pool itself)
            self.pool = self.pool.new_empty((0, self.B3))
        elif self.rows < self.pool.shape[0]:
            self.pool = self.pool[: self.rows].clone()


_NEIGH26 = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]


def _lattice(s: int, m: int, dev) -> torch.Tensor:
    """Lower corners (m^3, 3) of the stride-s cells of a lattice with m cells per axis."""
    ci = torch.arange(m, device=dev) * s
    return torch.stack(torch.meshgrid(ci, ci, ci, indexing="ij"), -1).reshape(-1, 3)


def _call_field(sdf_fn, points: torch.Tensor) -> torch.Tensor:
    """sdf_fn at points (P, 3) as float32 (P,), with the process's intra-op threads from
    ``FEW_ROWS`` points (inside the block tracking's one-thread section, see :func:`_sparse`)."""
    with all_threads(points.shape[0] >= FEW_ROWS):
        return sdf_fn(points).reshape(-1).float()


def _sparse(sdf_fn, n, device, chunk, s0, band, warm_cells, rows):
    """Seeds (coarse pass, or the previous cells + a sentinel lattice) + surface tracking.

    Returns the block grid of evaluated values, the sign-changing cells (C, 3) in C order and
    their corner values (C, 8) (None when too many to keep, see :func:`_track`).
    """
    if s0 < 1 or s0 & (s0 - 1):
        raise MeshSDFError(f"coarse_stride {s0} must be a power of two")
    if warm_cells is not None:
        s0 = SENTINEL_FACTOR * s0  # the sentinel lattice
    m = -(-(n - 1) // s0)
    g = m * s0 + 1  # coarse lattice padded just past the box so every coarse cell is whole
    grid = _BlockGrid(sdf_fn, n, g, device, chunk, rows)
    dev = grid.ax.device
    ci = torch.arange(m + 1, device=dev) * s0
    lattice = torch.cartesian_prod(ci, ci, ci)  # ((m + 1)^3, 3), C order
    if warm_cells is not None:
        # the sentinel lattice is evaluated in the tracking's first field call (one batch), and
        # its sign-changing edges seed the tracking once it has closed around the old cells
        with elementwise_section(device):  # as below
            return (grid, *_track(grid, warm_cells, n, extra=lattice,
                                  reseed=lambda sv: _sentinel_seeds(grid, sv.reshape(m + 1, m + 1, m + 1), s0)))
    h = voxel_size(n)
    corner = tables(dev)["corner"]
    neigh = torch.tensor(_NEIGH26, device=dev)
    cells = _lattice(s0, m, dev)
    # the seeding lattices are sparse (a point per stride^3): evaluated, not stored
    if n - 1 >= BLOCK_MIN_CELLS:
        vol, relative_cost = _timed_field(grid, lattice)
    else:
        vol, relative_cost = grid.field(lattice), float("inf")
    if relative_cost < BLOCK_COST_RATIO:
        # a cheap field: the time is the bookkeeping's passes over 10^5 - 10^6 values, run on
        # one intra-op thread (waking sleeping threads for each pass costs more than they save,
        # far more on a busy machine); the field's calls take one thread or all (_FieldCalls)
        with elementwise_section(device):
            return (grid, *_track_blocks(grid, n, band, (vol.reshape(m + 1, m + 1, m + 1), s0)))
    vol = vol.reshape(m + 1, m + 1, m + 1)
    v = torch.stack([vol[a : a + m, b : b + m, c : c + m].reshape(-1) for a, b, c in CORNER_OFFSETS], 1)  # (m^3, 8)
    del vol
    seeds = []
    s = s0
    while True:
        out = v > 0
        sc = out.any(1) & ~out.all(1)
        seeds.append(cells[sc] if s == 1 else _bisect_seeds(grid, cells[sc], v[sc], s))
        if s == 1:
            break
        # cells with no sign change but a corner close enough to the surface to hide a piece of it
        near = ~sc & (v.abs().amin(1) < band * 0.5 * math.sqrt(3) * s * h)
        if bool(near.any()) and bool(sc.any()):
            w = g + 2 * s
            key = lambda c: ((c[..., 0] + s) * w + c[..., 1] + s) * w + c[..., 2] + s  # noqa: E731
            idx = near.nonzero().squeeze(1)
            touching = torch.isin(key(cells[idx].unsqueeze(1) + neigh * s), key(cells[sc])).any(1)
            near[idx[touching]] = False
        if not bool(near.any()):
            break
        s //= 2
        cells = (cells[near].unsqueeze(1) + corner * s).reshape(-1, 3)
        v = grid.field_once(cells.unsqueeze(1) + corner * s)  # (K, 8)
    seeds = torch.cat(seeds)
    # the tracking's passes over 10^4 - 10^6 values on one intra-op thread, as the block
    # tracking's; its field calls get the process's threads (_call_field)
    with elementwise_section(device):
        return (grid, *_track(grid, seeds, n))


def _sentinel_seeds(grid, sv: torch.Tensor, s: int) -> torch.Tensor:
    """Seed cells (K, 3) from the sign-changing edges of the sentinel lattice (warm start).

    sv (m+1, m+1, m+1): the field at the lattice points (stride s).  Along each edge whose
    ends differ in sign, the values the tracking stored are looked up (no evaluation); every
    run of unknown points between two known values of opposite signs is evaluated (and
    stored), so that the crossings between consecutive known values are then all fine grid
    edges: every one of them seeds its 4 cells.  Hence at least one piece of surface
    crossing each such edge is seeded, as a bisection would, and usually nothing is
    evaluated at all (a crossing of a piece already tracked lies between stored values).
    """
    dev = sv.device
    out = sv > 0
    eye = torch.eye(3, dtype=torch.int64, device=dev)
    starts, units = [], []
    for a in range(3):
        lo, hi = out.narrow(a, 0, out.shape[a] - 1), out.narrow(a, 1, out.shape[a] - 1)
        idx = (lo != hi).nonzero()  # (E_a, 3) lattice index of each edge's lower end
        starts.append(idx * s)
        units.append(eye[a].expand(idx.shape[0], 3))
    start, unit = torch.cat(starts), torch.cat(units)  # (E, 3)
    if start.shape[0] == 0:
        return start
    t = torch.arange(s + 1, device=dev)
    pts = start.unsqueeze(1) + t.view(1, -1, 1) * unit.unsqueeze(1)  # (E, s + 1, 3)
    vals = grid.peek(pts)
    vals[:, 0] = sv[tuple((start // s).T)]
    vals[:, -1] = sv[tuple((start // s + unit).T)]
    known = ~torch.isnan(vals)
    # nearest known value on each side of every point (the ends are known)
    left = torch.cummax(torch.where(known, t, 0), 1).values
    right = torch.cummin(torch.where(known, t, s).flip(1), 1).values.flip(1)
    vout = vals > 0
    need = ~known & (vout.gather(1, left) != vout.gather(1, right))
    if bool(need.any()):
        vals[need] = grid.values_at(pts[need])
        known |= need
        vout = vals > 0
    e, k = (known[:, :-1] & known[:, 1:] & (vout[:, :-1] != vout[:, 1:])).nonzero(as_tuple=True)
    p, axis = pts[e, k], unit[e].argmax(1)
    return _edge_cells(p, axis)


def _edge_cells(p: torch.Tensor, axis: torch.Tensor) -> torch.Tensor:
    """The 4 cells (4K, 3) sharing each grid edge from p (K, 3) along axis (K,): a step back
    by 0 or 1 along the two other axes."""
    b = torch.nn.functional.one_hot((axis + 1) % 3, 3)
    c = torch.nn.functional.one_hot((axis + 2) % 3, 3)
    return torch.cat((p, p - b, p - c, p - b - c))


def _bisect_seeds(grid, cells: torch.Tensor, v: torch.Tensor, s: int) -> torch.Tensor:
    """Fine sign-changing cells found by bisecting every crossing edge of stride-s cells.

    cells (K, 3) lower corners, v (K, 8) their corner values.  The midpoints are evaluated,
    not stored; the two ends of each fine crossing edge found are stored (they are corners
    of the seed cells, which the tracking evaluates next).
    """
    tab = tables(cells.device)
    corner = tab["corner"]
    out = v > 0
    cross = out[:, tab["edge_lo"]] != out[:, tab["edge_hi"]]  # (K, 12)
    k_idx, e_idx = cross.nonzero(as_tuple=True)
    start = cells[k_idx] + corner[tab["edge_lo"][e_idx]] * s
    key, inv = torch.unique(grid.lin(start) * 3 + tab["edge_axis"][e_idx], return_inverse=True)
    v_lo = v.new_empty(key.shape[0])
    v_hi = v.new_empty(key.shape[0])
    v_lo[inv] = v[k_idx, tab["edge_lo"][e_idx]]  # the values at each edge's ends (known)
    v_hi[inv] = v[k_idx, tab["edge_hi"][e_idx]]
    out_lo = v_lo > 0
    start, axis = grid.ijk(key // 3), key % 3
    unit = torch.nn.functional.one_hot(axis, 3)
    lo = torch.zeros_like(axis)
    hi = torch.full_like(axis, s)
    while s > 1:
        mid = (lo + hi) // 2  # strictly inside its edge: distinct points
        v_mid = grid.field(start + unit * mid.unsqueeze(1))
        same = (v_mid > 0) == out_lo
        lo, v_lo = torch.where(same, mid, lo), torch.where(same, v_mid, v_lo)
        hi, v_hi = torch.where(same, hi, mid), torch.where(same, v_hi, v_mid)
        s //= 2
    p = start + unit * lo.unsqueeze(1)
    grid.store(torch.cat((p, p + unit)), torch.cat((v_lo, v_hi)))
    return _edge_cells(p, axis)


_FACE_DIR = [[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]]


KEEP_CORNERS = 2 ** 20  # cells whose corner values the tracking keeps for meshing (32 MB: C x 8 float32)


def _track(grid: _BlockGrid, seeds: torch.Tensor, n: int, extra: torch.Tensor | None = None, reseed=None):
    """Grow from seed cells across every face with mixed signs until closed.

    The neighbour across a mixed face shares that face, so it changes sign too: every cell
    evaluated here after the seeds belongs to the mesh.  Visited cells are marked in the
    block grid (memory proportional to the surface).  A few host syncs per round (the sizes
    of what is new), none per lookup.  extra: points (A, 3) evaluated, not stored, in the
    first field call; reseed(their values (A,)) -> more seed cells, called once when the
    tracking has closed (it may evaluate more), after which the tracking goes on from them.
    Returns the sign-changing cells (C, 3) in C order and their corner values (C, 8) (the
    grid's pool of values then freed), or None instead of the values beyond ``KEEP_CORNERS``
    cells (the mesher looks them up in the pool).
    """
    dev = seeds.device
    tab = tables(dev)
    # a cell's corner signs (K, 8) bool read as one int64 word each (a view, no copy): a
    # face's corners are a byte mask of it, built by the same view (whatever the byte order)
    on = torch.zeros(6, 8, dtype=torch.bool, device=dev)
    on[torch.arange(6, device=dev).unsqueeze(1), tab["face_cyc"]] = True
    face_bytes = on.view(torch.int64).squeeze(1)  # (6,)
    all_out = torch.ones(8, dtype=torch.bool, device=dev).view(torch.int64)  # (1,) every corner outside
    b = grid.bits
    # (6,) key offsets of the face neighbours (a step of -1 is exact where the coordinate is > 0)
    face_key = (torch.tensor(_FACE_DIR, device=dev) * torch.tensor([1 << 2 * b, 1 << b, 1], device=dev)).sum(1)
    m = n - 1
    inside = lambda c: c[((c >= 0) & (c < m)).all(1)]  # noqa: E731
    front = grid.mark_new_keys(grid.lin(inside(seeds)))
    found, kept, count = [], [], 0
    extra_values = None
    while True:
        while front.shape[0]:
            new = []
            for part in front.split(2 ** 16):  # bounded transients however large the front
                if extra is not None and extra_values is None:
                    v, extra_values = grid.corner_values_of(part, extra)  # (F, 8)
                else:
                    v = grid.corner_values_of(part)
                signs = (v > 0).view(torch.int64).squeeze(1)  # (F,) the 8 corner signs as the bytes of one word
                changing = (signs != 0) & (signs != all_out)
                c = part
                if int(changing.sum()) < part.shape[0]:  # seeds (a later front changes sign throughout)
                    rows = flat_nonzero(changing)
                    c, signs, v = (x.index_select(0, rows) for x in (part, signs, v))
                found.append(c)
                count += c.shape[0]
                if kept is not None:
                    kept = kept + [v] if count <= KEEP_CORNERS else None
                on_face = signs.unsqueeze(1) & face_bytes  # (K, 6) the signs of each face's corners
                ijk = grid.ijk(c)
                # a neighbour across each face with mixed signs, inside the grid
                go = (on_face != 0) & (on_face != face_bytes) & torch.stack((ijk > 0, ijk < m - 1), 2).reshape(-1, 6)
                new.append((c.unsqueeze(1) + face_key).view(-1).index_select(0, flat_nonzero(go.view(-1))))
            front = grid.mark_new_keys(new[0] if len(new) == 1 else torch.cat(new))
        if reseed is None:
            break
        if extra is not None and extra_values is None:
            extra_values = grid.field(extra)
        front = grid.mark_new_keys(grid.lin(inside(reseed(extra_values))))
        reseed = None
    grid.drop_marks(values=kept is None or not found)  # kept: the mesher reads them, not the pool
    if not found:
        return torch.zeros(0, 3, dtype=torch.int64, device=dev), None
    key = torch.cat(found)
    del found
    # keys sort like C order (distinct keys: any sort gives the same order; int32 sorts faster)
    key, order = torch.sort(key.int() if 3 * grid.bits < 31 else key)
    values = torch.cat(kept).index_select(0, order) if kept is not None else None
    return grid.ijk(key.long()), values


def _timed_field(grid: _BlockGrid, ijk: torch.Tensor):
    """The field at points ijk (P, 3) (see :meth:`_BlockGrid.field`) and its cost relative to
    the bookkeeping.

    Its first two calls of :data:`COST_PROBE_POINTS` points run on one intra-op thread, each
    followed by a sort of the keys of its points (the cell tracking's typical step), both
    timed in the calling thread's CPU time (on CUDA: wall time, synchronised), and the least
    of each kept: time other processes take from this one, or idle threads waking up, does
    not count, so the choice does not follow the machine's load.  The second call is skipped
    when the first one's ratio is over 4 x :data:`BLOCK_COST_RATIO` (a slow call only makes a
    cheap field look dearer).  The rest of ijk is evaluated with the process's threads.

    Returns:
        values (P,) and the ratio (field seconds per point) / (sort seconds per key).
    """
    dev = grid.ax.device
    if dev.type == "cuda":
        clock = lambda: (torch.cuda.synchronize(dev), time.perf_counter())[1]  # noqa: E731
    else:
        clock = time.thread_time
    head, out, field_best, sort_best = ijk[: 2 * COST_PROBE_POINTS], [], float("inf"), float("inf")
    # all_threads leaves an enclosing one-thread section, so that a field entering all_threads
    # itself (the decoder) stays on the one thread set here, all of its work in this thread's time
    with all_threads():
        threads = torch.get_num_threads()
        torch.set_num_threads(1)
        try:
            for part in head.split(COST_PROBE_POINTS):
                if field_best > 4 * BLOCK_COST_RATIO * sort_best:
                    break
                t = clock()
                out.append(grid.field(part))
                field_best = min(field_best, (clock() - t) / part.shape[0])
                keys = grid.lin(part).flip(0)  # reversed: a sort that has to move every key
                t = clock()
                torch.sort(keys)
                sort_best = min(sort_best, (clock() - t) / part.shape[0])
        finally:
            torch.set_num_threads(threads)
    done = sum(o.shape[0] for o in out)
    if ijk.shape[0] > done:
        out.append(grid.field(ijk[done:]))
    return torch.cat(out), field_best / max(sort_best, 1e-12)


_BLOCK = 8  # cells per block edge in block tracking (points per edge: 9, shared with the neighbour)
_BLOCK_BITS = 3 * (_BLOCK.bit_length() - 1)  # a block holds 2^_BLOCK_BITS cells (_BLOCK a power of two)
BLOCKS_PER_STEP = 256  # blocks evaluated per step: bounded transients (256 x 729 points)


def _track_blocks(grid: _BlockGrid, n: int, band: float, coarse: tuple[torch.Tensor, int] | None = None):
    """Cold start for a cheap field: seeds and tracking on whole blocks of 8^3 cells.

    The block lattice (stride 8) is evaluated; a block is a seed when its corners change
    sign, or when a corner is closer to the surface than ``band`` x its half diagonal and no
    neighbouring block changes sign (the same Lipschitz rule as the cell seeding's coarse
    pass).  Then every point of each front block is evaluated (9^3, its cells whole), its
    sign-changing cells kept, and the neighbour across each block face on which some grid
    face has mixed signs joins the front: the cell tracking's closure, a block at a time, so
    the cells found are a superset of those the cell tracking finds from the same surface,
    and all of them sign-changing cells of the dense grid.

    Args:
        grid: the block store (its field, axis and evaluation count).
        n: N.
        band: the Lipschitz safety factor of the seeding.
        coarse: the coarse lattice already evaluated, values (M+1, M+1, M+1) at stride s (a
            power of two), and s: its points on the block lattice are not evaluated again.

    Returns:
        the sign-changing cells (C, 3) in C order and their corner values (C, 8) (None when
        there are none).
    """
    dev = grid.ax.device
    grid.tracking = "blocks"
    m = n - 1  # cells per axis
    nb = -(-m // _BLOCK)  # blocks per axis
    ax = grid_axis(n, _BLOCK * nb + 1, dev)
    calls = _FieldCalls(grid)
    vol = _block_lattice(calls, ax, nb, coarse)
    v = torch.stack([vol[a : a + nb, b : b + nb, c : c + nb] for a, b, c in CORNER_OFFSETS], -1)  # (nb, nb, nb, 8)
    out = v > 0
    sc = out.any(-1) & ~out.all(-1)
    near = ~sc & (v.abs().amin(-1) < band * 0.5 * math.sqrt(3) * _BLOCK * voxel_size(n))
    if bool(near.any()):
        # a near block beside a sign-changing one: its surface, if any, is left to the tracking
        pad = torch.nn.functional.pad(sc.float()[None, None], (1, 1, 1, 1, 1, 1))
        touching = torch.nn.functional.max_pool3d(pad, 3, stride=1)[0, 0] > 0
        near &= ~touching
    del vol, v, out
    front = (sc | near).reshape(-1).nonzero().squeeze(1)
    visited = torch.zeros(nb ** 3, dtype=torch.bool, device=dev)
    visited[front] = True
    r9 = torch.arange(_BLOCK + 1, device=dev)
    corner_off = (tables(dev)["corner"] * torch.tensor([81, 9, 1], device=dev)).sum(1)  # (8,) in a 9^3 block
    cell_loc = torch.cartesian_prod(r9[:-1], r9[:-1], r9[:-1])  # (512, 3) cells of a block, C order
    cell_at = (cell_loc * torch.tensor([81, 9, 1], device=dev)).sum(1)  # (512,) their lower corners in a 9^3 block
    nbr = torch.tensor(_FACE_DIR, device=dev)
    ends = torch.tensor([0, _BLOCK], device=dev)  # a block's first and last planes of points
    # the cells found are kept as C-order keys (int32 sorts faster), their coordinates made once sorted
    stride = torch.tensor([m * m, m, 1], device=dev)
    cell_key = (cell_loc * stride).sum(1)  # (512,) of the cells of a block, from its lower corner's
    key_type = torch.int32 if m ** 3 < 2 ** 31 else torch.int64
    found, kept = [], []

    def step(bijk: torch.Tensor, val: torch.Tensor):
        """The sign-changing cells (keys, corner values (C, 8)) of blocks bijk (K, 3) with values
        val (K, 9, 9, 9), and the blocks their surface crosses into."""
        k = bijk.shape[0]
        base = bijk * _BLOCK
        o = val > 0
        # sign changes reduced over pairs of points along k, j, then i (as crossing_cells):
        # the partial reductions are the mixed grid faces of the block's boundary planes
        some, every = o[..., 1:] | o[..., :-1], o[..., 1:] & o[..., :-1]  # (K, 9, 9, 8) k-edges
        some, every = some[:, :, 1:] | some[:, :, :-1], every[:, :, 1:] & every[:, :, :-1]  # (K, 9, 8, 8) i-faces
        mixed_i = (some & ~every).index_select(1, ends)  # (K, 2, 8, 8)
        sc = (some[:, 1:] | some[:, :-1]) & ~(every[:, 1:] & every[:, :-1])  # (K, 8, 8, 8) cells
        del some, every
        mixed_j = _mixed_faces(o.index_select(2, ends).permute(0, 2, 1, 3))  # (K, 2, 8, 8) over (i, k)
        mixed_k = _mixed_faces(o.index_select(3, ends).permute(0, 3, 1, 2))  # (K, 2, 8, 8) over (i, j)
        mixed = torch.stack((mixed_i, mixed_j, mixed_k), 1)  # (K, 3 axes, 2 sides, 8, 8)
        del o
        lim = (m - base).clamp(max=_BLOCK)  # (K, 3) cells of each block inside the grid
        if bool((lim < _BLOCK).any()):  # blocks past the grid's upper faces: only their inside counts
            r = torch.arange(_BLOCK, device=dev)
            ins = [r < lim[:, a : a + 1] for a in range(3)]  # (K, 8) per axis
            sc &= ins[0][:, :, None, None] & ins[1][:, None, :, None] & ins[2][:, None, None, :]
            for a in range(3):
                a1, a2 = [x for x in range(3) if x != a]
                mixed[:, a] &= (ins[a1][:, :, None] & ins[a2][:, None, :]).unsqueeze(1)
        at = flat_nonzero(sc.view(-1))  # (C,) b * _BLOCK^3 + c: cell c of the step's block b
        bi, cl = at >> _BLOCK_BITS, at & ((1 << _BLOCK_BITS) - 1)
        key = (base * stride).sum(1).index_select(0, bi) + cell_key.index_select(0, cl)
        # corner values kept whatever the count (32 bytes a cell, beside the cell's 24): a
        # cheap field, but a second pass over the cells costs as much as this one
        loc = bi * 729 + cell_at.index_select(0, cl)
        corners = val.view(-1).index_select(0, (loc.unsqueeze(1) + corner_off).view(-1)).view(-1, 8)
        # block faces crossed by the surface: a grid face with mixed signs on the block's
        # boundary plane, inside the grid (its two cells are then both sign-changing)
        go = mixed.flatten(3).any(3)  # (K, 3, 2)
        go[:, :, 0] &= bijk > 0
        go[:, :, 1] &= base + _BLOCK < m
        nxt = (bijk.unsqueeze(1) + nbr)[go.view(k, 6)]  # _FACE_DIR order: (axis, side)
        return key.to(key_type), corners, (nxt[:, 0] * nb + nxt[:, 1]) * nb + nxt[:, 2]

    while front.shape[0]:
        new = []
        parts = front.split(BLOCKS_PER_STEP)
        for i in range(0, len(parts), 2):
            # the field in this thread (a user's callable is called from one thread only), then
            # two parts' passes side by side: one-thread work over 10^5 values each
            blocks = [_cell_ijk(part, nb) for part in parts[i : i + 2]]  # (K, 3) each
            pair = [(bijk, _eval_blocks(calls, ax, bijk * _BLOCK)) for bijk in blocks]
            for key, corners, nxt in concurrently([lambda a=a, b=b: step(a, b) for a, b in pair], dev):
                found.append(key)
                kept.append(corners)
                new.append(nxt)
        cand = _distinct(torch.cat(new))
        front = cand.masked_select(~visited.index_select(0, cand))
        visited.index_fill_(0, front, True)
    if not found:
        return torch.zeros(0, 3, dtype=torch.int64, device=dev), None
    key, order = torch.sort(torch.cat(found))  # distinct keys
    del found
    cells = _cell_ijk(key, m).long()
    return cells, torch.cat(kept).index_select(0, order)


def _mixed_faces(plane: torch.Tensor) -> torch.Tensor:
    """Grid faces with mixed signs on planes of points: (K, P, 9, 9) bool -> (K, P, 8, 8)."""
    some, every = plane[..., 1:, :] | plane[..., :-1, :], plane[..., 1:, :] & plane[..., :-1, :]
    some, every = some[..., 1:] | some[..., :-1], every[..., 1:] & every[..., :-1]
    return some & ~every


def _block_lattice(calls: _FieldCalls, ax: torch.Tensor, nb: int, coarse) -> torch.Tensor:
    """The field on the block lattice (stride 8, (nb + 1)^3 points of axis ``ax``): (nb + 1,
    nb + 1, nb + 1), taken from the coarse lattice (values, stride) where their points coincide."""
    dev = ax.device
    step = torch.arange(nb + 1, device=dev) * _BLOCK
    if coarse is None:
        return calls(ax[torch.cartesian_prod(step, step, step)]).reshape(nb + 1, nb + 1, nb + 1)
    cv, s = coarse
    w = nb + 1
    on = (step % s == 0) & (step // s < cv.shape[0])  # (nb + 1,) block lattice points on the coarse one
    pick = (step // s).masked_select(on)
    vol = torch.empty(w, w, w, device=dev)
    at = on.nonzero().squeeze(1)
    vol[at[:, None, None], at[None, :, None], at[None, None, :]] = cv[pick[:, None, None], pick[None, :, None],
                                                                      pick[None, None, :]].float()
    # the other points, flat in C order, written with one flat copy (not a 3-index put)
    missing = (~(on[:, None, None] & on[None, :, None] & on[None, None, :])).view(-1).nonzero().squeeze(1)
    if missing.shape[0]:
        ijk = _cell_ijk(missing, w) * _BLOCK
        vol.view(-1).index_copy_(0, missing, calls(ax[ijk]))
    return vol


def _eval_blocks(calls: "_FieldCalls", ax: torch.Tensor, base: torch.Tensor) -> torch.Tensor:
    """The field at the 9^3 points of blocks with lower corners base (K, 3) of axis ``ax``:
    (K, 9, 9, 9)."""
    k = base.shape[0]
    co = ax.take(base.unsqueeze(2) + torch.arange(_BLOCK + 1, device=base.device))  # (K, 3, 9) coordinates
    pts = torch.stack((co[:, 0, :, None, None].expand(k, 9, 9, 9), co[:, 1, None, :, None].expand(k, 9, 9, 9),
                       co[:, 2, None, None, :].expand(k, 9, 9, 9)), -1).view(-1, 3)
    return calls(pts).view(k, 9, 9, 9)


class _FieldCalls:
    """The field's calls of block tracking: points (P, 3) -> values (P,), in chunks of even
    size (see :meth:`_BlockGrid.field`), counted in the grid's evaluations.

    Inside the tracking's one-thread section a call of a cheap field may run on one intra-op
    thread or on the process's (as :func:`_call_field` runs every large call): the threads save
    little on so little work per point and, on a busy machine, waiting for them to be scheduled
    costs far more.  So its first calls alternate between the two (one thread first), timed
    (wall time: what the waiting costs), and the rest take whichever was faster: at once where
    one call each differ two-fold, else in the median of :attr:`TRIALS` calls each.  Either
    way, the same values.
    """

    TRIALS = 3

    def __init__(self, grid: _BlockGrid):
        self.grid = grid
        with all_threads():
            many = torch.get_num_threads()
        # nothing to choose outside a one-thread section (all_threads then changes nothing)
        self.many = None if many > torch.get_num_threads() else True
        self.times = {False: [], True: []}  # seconds per point of the trial calls

    def __call__(self, pts: torch.Tensor) -> torch.Tensor:
        grid, p = self.grid, pts.shape[0]
        size = max(1, -(-p // max(1, -(-p // grid.chunk))))
        out = []
        for s in range(0, p, size):
            part = pts[s : s + size]
            many = self.many
            if many is None:
                many = len(self.times[True]) < len(self.times[False])
                t = time.perf_counter()
            with all_threads(many and part.shape[0] >= FEW_ROWS):
                out.append(grid.sdf_fn(part).reshape(-1).float())
            if self.many is None:
                self.times[many].append((time.perf_counter() - t) / part.shape[0])
                self._decide()
        grid.evaluations += p
        return out[0].contiguous() if len(out) == 1 else torch.cat(out) if out else grid.ax.new_zeros(0)

    def _decide(self) -> None:
        one, many = self.times[False], self.times[True]
        if not one or not many:
            return
        if min(many) > 2 * max(one) or min(one) > 2 * max(many):  # clear already: no more costly trials
            self.many = min(one) > min(many)
        elif len(many) >= self.TRIALS:
            self.many = sorted(many)[len(many) // 2] < sorted(one)[len(one) // 2]
