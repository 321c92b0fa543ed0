"""Iso-surface extraction over the box [-1, 1]^3: the dense, fast and sparse modes.

Grid convention: resolution N, origin (-1, -1, -1), voxel size 2 / (N - 1); grid value
[i, j, k] is the field at (-1 + i*h, -1 + j*h, -1 + k*h).  Meshes come back in world
coordinates as verts (V, 3) float32 and faces (F, 3) int64 torch tensors.

``sdf_fn`` everywhere is a callable mapping points (P, 3) to values (P,); the surface is
``sdf_fn = level`` and "outside" is where ``sdf_fn > level`` (as for an SDF).  It is called
under ``torch.no_grad()``.  Every mode triangulates with the one torch marching cubes of
:mod:`lib.ops.marching_cubes` (re-exported here as :func:`marching_cubes`).

Contents: :func:`extract` (the modes, with a reusable :class:`ExtractionState`),
:func:`extract_dense` / :func:`dense_grid` (a full grid), :func:`same_mesh` (canonical mesh
comparison).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from lib.errors import MeshSDFError
from lib.log import info
from lib.ops.marching_cubes import (CORNER_OFFSETS, cell_corner_values, crossing_cells, grid_axis, marching_cubes,  # noqa: F401
                                    marching_cubes_cells, tables, voxel_size)

SdfFn = Callable[[torch.Tensor], torch.Tensor]


def grid_points(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All grid points, (N^3, 3), in [i, j, k] C order (x slowest, z fastest)."""
    ax = torch.linspace(-1.0, 1.0, resolution, device=device, dtype=dtype)
    return torch.cartesian_prod(ax, ax, ax)


@torch.no_grad()
def dense_grid(sdf_fn: SdfFn, resolution: int, device=None, chunk: int = 2 ** 18) -> torch.Tensor:
    """The field on the full N^3 grid: (N, N, N) float32 tensor on ``device``.

    Points are generated chunk by chunk (no N^3 x 3 coordinate array), with the same
    coordinates as :func:`grid_points`.
    """
    grid = _DenseGrid(sdf_fn, resolution, resolution, device, chunk)
    grid.evaluate(torch.arange(resolution ** 3, device=grid.ax.device))
    return grid.values.reshape(resolution, resolution, resolution)


def extract_dense(sdf_fn: SdfFn, resolution: int = 128, device=None, level: float = 0.0
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesh of the level set from the full grid: verts (V, 3), faces (F, 3) on ``device``."""
    return marching_cubes(dense_grid(sdf_fn, resolution, device=device), level)


MODES = ("dense", "fast", "sparse")


@dataclass
class ExtractionState:
    """What one extraction leaves for the next call (pass it back as ``state=``), plus stats.

    values: dense and fast modes: the flat (N^3,) float32 grid of ``sdf_fn - level`` (the
    ``fast`` mode refreshes it); sparse mode: None (values live in a block-sparse store of
    the band the call evaluated, freed after the call); full: whether ``values`` holds every grid
    point; verts (V, 3) / faces (F, 3) / keys (V,) / cells (C, 3): the last mesh (see
    :func:`lib.ops.marching_cubes.marching_cubes_cells`); the sparse mode starts its next
    call from ``cells`` (warm start); evaluations: points evaluated by the last call;
    warm: whether the last sparse call started from the previous cells; empty / message: no
    surface in the box and why; stale_vertices: in ``fast`` mode, vertices interpolated from
    at least one value not refreshed by this call (their position is approximate: normal for
    small steps); missed_vertices: of those, the ones whose edge does not cross the surface
    any more once the stale end is re-evaluated (a diagnostic only, the grid keeps the
    heuristic's values): > 0 means the surface moved out of the refreshed band and the mesh
    is wrong there; verified: result of ``verify=True`` (None when not run); grid_size: G,
    points per axis of the value lattice (sparse: the seeding lattice padded past the box);
    peak_points: the most grid values held at once (sparse: value slots of the block pool at
    its largest, 512 per 8^3 block; a warm call starts with that many); dl_ds: per-vertex dL/ds
    (V,) written by the backward pass of :mod:`lib.meshsdf` (None before a backward).
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
    dl_ds: torch.Tensor | None = field(default=None, repr=False)


SENTINEL_FACTOR = 4  # warm start: sentinel lattice stride = this x the coarse stride


def default_coarse_stride(resolution: int) -> int:
    """Power of two giving about 32 coarse cells per axis (N=64: 2, 128: 4, 256: 8)."""
    s = 1
    while (resolution - 1) / (2 * s) >= 24:
        s *= 2
    return s


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


class _BlockGrid:
    """Field values on a G^3 lattice, held in blocks of 8^3 points allocated on first use.

    Memory follows the blocks the extraction touches (a band around the surface), not G^3:
    a dense block table, (ceil(G / 8))^3 int32 (N = 2048: 68 MB), holds each block's row in a
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
    Same ``values_at`` / ``evaluations`` / ``stored`` interface as :class:`_DenseGrid`.
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
        # index_select / masked_select / index_copy_ rather than x[i]: 2-3x faster on a CPU (isolated)
        row = self.table.index_select(0, blk)
        if allocate:
            absent = row < 0
            if bool(absent.any()):
                self._allocate(torch.unique(blk.masked_select(absent)))
                row = self.table.index_select(0, blk)
        # offset in the block: (i & 7) << 6 | (j & 7) << 3 | (k & 7)
        off = ((key >> (2 * b - 2 * sh)) & (7 << 2 * sh)) | ((key >> (b - sh)) & (7 << sh)) | (key & 7)
        slot = (row.long() << (3 * sh)) | off
        return slot if allocate else torch.where(row < 0, -1, slot)

    def _allocate(self, blocks: torch.Tensor) -> None:
        k = blocks.numel()
        if self.rows + k > self.pool.shape[0]:
            cap = max(self.rows + k, self.pool.shape[0] * 3 // 2)
            self.pool = torch.cat((self.pool[: self.rows], self.pool.new_full((cap - self.rows, self.B3), float("nan"))))
            self.marks = torch.cat((self.marks[: self.rows], self.marks.new_zeros((cap - self.rows, self.B3))))
            self.peak_rows = max(self.peak_rows, cap)
        self.table[blocks] = torch.arange(self.rows, self.rows + k, dtype=torch.int32, device=blocks.device)
        self.rows += k

    def field(self, ijk: torch.Tensor) -> torch.Tensor:
        """The field at lattice points ijk (P, 3), evaluated now in chunks, not stored: (P,).

        The chunks are of even size, at most ``chunk`` (no short last call: a small batch
        runs the network below its rate)."""
        p = ijk.shape[0]
        size = max(1, -(-p // max(1, -(-p // self.chunk))))
        out = [self.sdf_fn(self.ax[ijk[s : s + size]]).reshape(-1).float() for s in range(0, p, size)]
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
        slot = self._slots(key, allocate=True)
        flat = self.pool.view(-1)
        v = flat.index_select(0, slot)
        miss = torch.isnan(v)
        more = None
        if bool(miss.any()):
            ms = slot.masked_select(miss)
            # one representative per distinct missing point, without sorting them all: each
            # writes its number into its (NaN) slot and the one whose number stays wins
            ticket = torch.arange(ms.shape[0], device=ms.device, dtype=flat.dtype)  # exact below 2^24
            flat.index_copy_(0, ms, ticket)
            won = flat.index_select(0, ms) == ticket
            new, order = torch.sort(key.masked_select(miss).masked_select(won))  # C order: the same batch whoever won
            ms = ms.masked_select(won).index_select(0, order)
            pts = self.ijk(new)
            got = self.field(pts if extra is None else torch.cat((pts, extra)))
            flat.index_copy_(0, ms, got[: new.shape[0]])
            more = None if extra is None else got[new.shape[0]:]
            v = flat.index_select(0, slot)
        if extra is None:
            return v.reshape(shape)
        return v.reshape(shape), (self.field(extra) if more is None else more)

    def peek(self, ijk: torch.Tensor) -> torch.Tensor:
        """Stored values at lattice points ijk (..., 3), NaN where not evaluated; evaluates nothing."""
        slot = self._slots(self.lin(ijk).reshape(-1), allocate=False)
        v = self.pool.view(-1)[slot.clamp(min=0)]
        return torch.where(slot >= 0, v, float("nan")).reshape(ijk.shape[:-1])

    corner_values = _DenseGrid.corner_values

    def store(self, ijk: torch.Tensor, values: torch.Tensor) -> None:
        """Keep known values (P,) at points ijk (P, 3) (evaluated elsewhere)."""
        slot = self._slots(self.lin(ijk), allocate=True)  # may grow the pool: index it after
        self.pool.view(-1)[slot] = values.float()

    def mark_new_keys(self, key: torch.Tensor) -> torch.Tensor:
        """Mark the cells of keys (K,) visited; returns the distinct keys not marked before, sorted."""
        slot = self._slots(key, allocate=False)
        seen = self.marks.view(-1).index_select(0, slot.clamp(min=0)) & (slot >= 0)
        new = torch.unique(key.masked_select(~seen))
        slot = self._slots(new, allocate=True)  # may grow the pools: index them after
        self.marks.view(-1).index_fill_(0, slot, True)
        return new

    def drop_marks(self) -> None:
        """Free the marks and the pool's unused rows (before meshing, when memory peaks)."""
        self.marks = None
        if self.rows < self.pool.shape[0]:
            self.pool = self.pool[: self.rows].clone()


@torch.no_grad()
def extract(sdf_fn: SdfFn, resolution: int = 64, mode: str = "sparse", state: ExtractionState | None = None,
            device=None, chunk: int = 2 ** 14, verify: bool = False, coarse_stride: int | None = None,
            band: float = 1.5, level: float = 0.0, warm: bool = True) -> tuple[torch.Tensor, torch.Tensor, ExtractionState]:
    """Mesh of the level set ``sdf_fn = level`` on the N^3 grid over [-1, 1]^3.

    Returns verts (V, 3) float32 (world coordinates), faces (F, 3) int64 (normals towards
    ``sdf_fn > level``), both on ``device``, and an :class:`ExtractionState` to pass to the
    next call.  All modes triangulate with :func:`lib.ops.marching_cubes.marching_cubes_cells`,
    so they agree exactly when they see the same values on the sign-changing cells.

    mode:
      ``dense``  every grid point (N^3 evaluations, an N^3 float grid).
      ``fast``   the original's heuristic: keep ``state``'s full grid, re-evaluate only the
                 voxel of each previous vertex and its 6 neighbours, stale values elsewhere;
                 ``state.missed_vertices > 0`` (with a message) reports a surface that
                 left the refreshed band (the mesh is then wrong), found by re-evaluating
                 the stale ends of crossing edges (counted in ``evaluations``).  Without a
                 full grid and a non-empty mesh in ``state`` it runs ``dense``.
      ``sparse`` exact narrow band, memory proportional to the surface (values and visited
                 cells in 8^3-point blocks allocated where the band passes, a (G/8)^3 int32
                 block table, the mesh's cells in a list; no N^3 array).  Cold
                 start: a coarse grid (stride ``coarse_stride``), a bisection on every
                 coarse edge with a sign change to find fine sign-changing cells, recursive
                 refinement of coarse cells that show no sign change but have a corner with
                 |s| < band * half their diagonal (a hidden component, e.g. a thin part,
                 unless they touch a sign-changing cell), then surface tracking: every
                 neighbour across a cell face with mixed signs is evaluated until the set of
                 sign-changing cells is closed.  Warm start (``state`` from a non-empty sparse
                 call at the same resolution, ``warm=True``): instead of the coarse pass,
                 the tracking starts from the previous call's cells, with a sentinel
                 lattice of ``SENTINEL_FACTOR`` (4) times the coarse stride (N = 64: stride
                 8, 729 points) evaluated in the same first batch; once the tracking has
                 closed, every sentinel edge whose ends differ in sign is completed from
                 the stored values (evaluating only runs of unknown points between
                 opposite signs) and its fine crossings seed more tracking.  The mesh is
                 identical to ``dense`` whenever every connected piece of the surface is
                 seeded (cold: ``band`` is a Lipschitz safety factor; warm: a piece touches
                 the previous surface's cells or crosses a sentinel edge whose ends differ
                 in sign (of the pieces crossing one such edge, at least one is found), as
                 a piece does that holds a ball of sqrt(3) sentinel strides apart from the
                 rest of the surface; a piece that does neither, e.g. a small new blob far
                 from the old surface and from the sentinel lines, is missed until the
                 next cold call).
                 ``verify=True`` also runs ``dense``, compares with :func:`same_mesh`, records
                 ``state.verified`` and returns the dense mesh if they differ.
    chunk: points per call of ``sdf_fn``.  The default, 2^14, keeps a 128-wide network's
    activations (chunk x 128 x 4 bytes) under glibc's 32 MB mmap threshold: larger calls get
    fresh pages from the kernel for every layer, which measured 2x slower on CPU.
    No surface in the box gives an empty mesh, ``state.empty`` and ``state.message``.
    The ``state`` passed in is consumed: its grid buffer is reused (overwritten) by this call.
    """
    if mode not in MODES:
        raise MeshSDFError(f"extraction mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    n = int(resolution)
    if n < 2:
        raise MeshSDFError(f"resolution {n} is too small: use at least 2 grid points per axis")
    if device is None:
        device = state.cells.device if state is not None else torch.device("cpu")
    device = torch.device(device)
    fn = sdf_fn if not level else (lambda p: sdf_fn(p) - level)
    if state is not None and state.level != level:
        state = None  # another level set: nothing to reuse
    reuse = state.values if (state is not None and state.values is not None and state.values.device == device) else None
    fresh, warm_cells, rows, corners = None, None, 64, None
    if (mode == "fast" and state is not None and state.full and state.resolution == n and reuse is not None
            and state.keys.numel()):
        grid, fresh = _refresh_fast(fn, state, chunk)
        cells = crossing_cells(grid.values.reshape(n, n, n))
    elif mode == "sparse":
        if (warm and state is not None and state.mode == "sparse" and state.resolution == n and not state.empty
                and state.cells.device == device):
            warm_cells = state.cells
            rows = state.peak_points // _BlockGrid.B3  # about the pool the last call needed
        grid, cells, corners = _sparse(fn, n, device, chunk, coarse_stride or default_coarse_stride(n), band,
                                       warm_cells, rows)
    else:
        grid = _DenseGrid(fn, n, n, device, chunk, reuse)
        grid.evaluate(torch.arange(n ** 3, device=grid.ax.device))
        cells = crossing_cells(grid.values.reshape(n, n, n))
    verts, faces, keys = marching_cubes_cells(cells, grid.corner_values if corners is None else corners, n, grid.ax)
    stale, missed = _check_fast(grid, keys, fresh) if fresh is not None else (0, 0)
    dense_values = grid.values if isinstance(grid, _DenseGrid) else None
    st = ExtractionState(resolution=n, mode=mode, grid_size=grid.g, values=dense_values, full=(mode != "sparse"),
                         verts=verts, faces=faces, keys=keys, cells=cells, evaluations=grid.evaluations,
                         warm=warm_cells is not None, stale_vertices=stale, missed_vertices=missed,
                         peak_points=grid.stored, level=level)
    del grid
    if verify and mode != "dense":
        dv, df, dst = extract(sdf_fn, n, "dense", None, device, chunk, level=level)
        ok, why = same_mesh(verts, faces, dv, df)
        st.verified = ok
        if not ok:
            info(f"extract: {mode} mesh differs from dense ({why}); returning the dense mesh")
            verts, faces, st.keys, st.cells = dv, df, dst.keys, dst.cells
            st.verts, st.faces = dv, df
        st.evaluations += dst.evaluations
    if faces.shape[0] == 0:
        st.empty = True
        st.message = (f"no surface in the box at resolution {n}: the field is on one side of the level "
                      f"{level:g} at every {'evaluated ' if mode == 'sparse' else ''}grid point")
    elif missed:
        st.message = (f"fast extraction lost the surface: {missed} of {verts.shape[0]} vertices lie on edges "
                      "that no longer cross it (it moved more than the refreshed band); use mode 'sparse'")
    if st.message:
        info(f"extract: {st.message}")
    return verts, faces, st


def _refresh_fast(sdf_fn, state: ExtractionState, chunk: int):
    """The paper's heuristic: re-evaluate each previous vertex's voxel and its 6 neighbours."""
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
    lin = torch.unique(grid.lin(nb))
    grid.evaluate(lin)
    fresh = torch.zeros(n ** 3, dtype=torch.bool, device=keys.device)
    fresh[lin] = True
    return grid, fresh


def _check_fast(grid: _DenseGrid, keys: torch.Tensor, fresh: torch.Tensor) -> tuple[int, int]:
    """(vertices using a stale value, vertices whose edge turns out not to cross any more)."""
    n = grid.n
    k = keys[keys < 3 * n ** 3]
    lo = k // 3
    hi = lo + torch.tensor([n * n, n, 1], device=k.device)[k % 3]
    stale = ~fresh[lo] | ~fresh[hi]
    if not bool(stale.any()):
        return 0, 0
    lo, hi = lo[stale], hi[stale]
    ends = torch.unique(torch.cat((lo, hi))[~fresh[torch.cat((lo, hi))]])
    pts = torch.stack((grid.ax[ends // (n * n)], grid.ax[(ends // n) % n], grid.ax[ends % n]), 1)
    now = grid.values.clone()
    now[ends] = torch.cat([grid.sdf_fn(pts[s : s + grid.chunk]).reshape(-1).float()
                           for s in range(0, ends.numel(), grid.chunk)])
    grid.evaluations += ends.numel()
    missed = (now[lo] > 0) == (now[hi] > 0)
    return int(stale.sum()), int(missed.sum())


_NEIGH26 = [(a, b, c) for a in (-1, 0, 1) for b in (-1, 0, 1) for c in (-1, 0, 1) if (a, b, c) != (0, 0, 0)]


def _lattice(s: int, m: int, dev) -> torch.Tensor:
    """Lower corners (m^3, 3) of the stride-s cells of a lattice with m cells per axis."""
    ci = torch.arange(m, device=dev) * s
    return torch.stack(torch.meshgrid(ci, ci, ci, indexing="ij"), -1).reshape(-1, 3)


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
        return (grid, *_track(grid, warm_cells, n, extra=lattice,
                              reseed=lambda sv: _sentinel_seeds(grid, sv.reshape(m + 1, m + 1, m + 1), s0)))
    h = voxel_size(n)
    corner = tables(dev)["corner"]
    neigh = torch.tensor(_NEIGH26, device=dev)
    cells = _lattice(s0, m, dev)
    # the seeding lattices are sparse (a point per stride^3): evaluated, not stored
    vol = grid.field(lattice).reshape(m + 1, m + 1, m + 1)
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


KEEP_CORNERS = 2 ** 18  # cells whose corner values the tracking keeps for meshing (8 MB)


def _track(grid: _BlockGrid, seeds: torch.Tensor, n: int, extra: torch.Tensor | None = None, reseed=None):
    """Grow from seed cells across every face with mixed signs until closed.

    The neighbour across a mixed face shares that face, so it changes sign too: every cell
    evaluated here after the seeds belongs to the mesh.  Visited cells are marked in the
    block grid (memory proportional to the surface).  A few host syncs per round (the sizes
    of what is new), none per lookup.  extra: points (A, 3) evaluated, not stored, in the
    first field call; reseed(their values (A,)) -> more seed cells, called once when the
    tracking has closed (it may evaluate more), after which the tracking goes on from them.
    Returns the sign-changing cells (C, 3) in C order and their corner values (C, 8), or
    None instead of the values beyond ``KEEP_CORNERS`` cells (the mesher looks them up).
    """
    dev = seeds.device
    tab = tables(dev)
    face_cyc = tab["face_cyc"]
    corner_key = grid.lin(tab["corner"])  # (8,) key offsets of a cell's corners
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
            for part in front.split(2 ** 16):  # bounded transients (~20 MB) however large the front
                ck = part.unsqueeze(1) + corner_key  # (F, 8)
                if extra is not None and extra_values is None:
                    v, extra_values = grid.values_of(ck, extra)
                else:
                    v = grid.values_of(ck)
                out = v > 0
                nout = out.sum(1)
                sc = (nout > 0) & (nout < 8)
                rows = sc.nonzero().squeeze(1)
                c, out = part.index_select(0, rows), out.index_select(0, rows)
                found.append(c)
                count += c.shape[0]
                if kept is not None:
                    kept = kept + [v.index_select(0, rows)] if count <= KEEP_CORNERS else None
                nf = out.index_select(1, face_cyc.view(-1)).view(-1, 6, 4).sum(2)  # (K, 6) outside corners per face
                ijk = grid.ijk(c)
                # a neighbour across each face with mixed signs, inside the grid
                go = (nf > 0) & (nf < 4) & torch.stack((ijk > 0, ijk < m - 1), 2).reshape(-1, 6)
                new.append((c.unsqueeze(1) + face_key).masked_select(go))
            front = grid.mark_new_keys(torch.cat(new))
        if reseed is None:
            break
        if extra is not None and extra_values is None:
            extra_values = grid.field(extra)
        front = grid.mark_new_keys(grid.lin(inside(reseed(extra_values))))
        reseed = None
    grid.drop_marks()
    if not found:
        return torch.zeros(0, 3, dtype=torch.int64, device=dev), None
    key = torch.cat(found)
    del found
    key, order = torch.sort(key)  # keys sort like C order
    values = torch.cat(kept)[order] if kept is not None else None
    return grid.ijk(key), values


def same_mesh(verts_a, faces_a, verts_b, faces_b, atol: float = 1e-5) -> tuple[bool, str]:
    """Whether two meshes are the same up to vertex order: (equal, reason if not).

    Canonical comparison: coincident vertices are welded in each mesh, every vertex of A
    must have a distinct vertex of B within ``atol`` (world units), and the oriented
    triangles, each rotated to start at its smallest index, must be the same set.
    """
    from scipy.spatial import cKDTree

    def weld(v, f):
        v = v.detach().cpu().double().numpy() if isinstance(v, torch.Tensor) else np.asarray(v, np.float64)
        f = f.detach().cpu().numpy() if isinstance(f, torch.Tensor) else np.asarray(f)
        u, inv = np.unique(v, axis=0, return_inverse=True)
        return u, inv.reshape(-1)[f.astype(np.int64)].reshape(-1, 3)

    va, fa = weld(verts_a, faces_a)
    vb, fb = weld(verts_b, faces_b)
    if len(va) != len(vb) or len(fa) != len(fb):
        return False, f"sizes differ: {len(va)} vs {len(vb)} vertices, {len(fa)} vs {len(fb)} faces"
    if len(va) == 0:
        return True, ""
    dist, j = cKDTree(vb).query(va)
    if dist.max() > atol:
        return False, f"a vertex is {dist.max():.3g} away from the other mesh"
    if len(np.unique(j)) != len(j):
        return False, "vertices do not match one to one"

    def canon(f):
        r = np.argmin(f, axis=1)
        f = np.stack([f[np.arange(len(f)), (r + k) % 3] for k in range(3)], 1)
        return f[np.lexsort(f.T[::-1])]

    if not np.array_equal(canon(j[fa]), canon(fb)):
        return False, "faces differ"
    return True, ""
