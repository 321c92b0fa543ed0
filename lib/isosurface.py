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
from lib.ops.marching_cubes import (cell_corner_values, crossing_cells, grid_axis, marching_cubes,  # noqa: F401
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
    ``fast`` mode refreshes it); sparse mode: None (values live in a hash map of the
    evaluated points only, freed after the call); full: whether ``values`` holds every grid
    point; verts (V, 3) / faces (F, 3) / keys (V,) / cells (C, 3): the last mesh (see
    :func:`lib.ops.marching_cubes.marching_cubes_cells`); the sparse mode starts its next
    call from ``cells`` (warm start); evaluations: points evaluated by the last call;
    warm: whether the last sparse call started from the previous cells; empty / message: no
    surface in the box and why; stale_vertices: in ``fast`` mode, vertices interpolated from
    at least one value not refreshed by this call (their position is approximate: normal for
    small steps); missed_vertices: of those, the ones whose edge does not cross the surface
    any more once the stale end is re-evaluated (a diagnostic only, the grid keeps the
    heuristic's values): > 0 means the surface moved out of the refreshed band and the mesh
    is wrong there; verified: result of ``verify=True`` (None when not run); peak_points:
    the most grid values held at once (sparse: hash-map entries); dl_ds: per-vertex dL/ds
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

    def at(self, ijk):
        return self.values[self.lin(ijk)]

    @property
    def stored(self) -> int:
        return self.values.numel()


def _hash(key: torch.Tensor, mask: int) -> torch.Tensor:
    # a SplitMix64-style finaliser (int64 products wrap modulo 2^64 in torch on every
    # device); lattice keys are very regular, weaker mixers make long linear-probing chains
    x = key * -7046029254386353131
    x = x ^ (x >> 29)
    x = x * -4658895280553007687
    return (x ^ (x >> 32)) & mask


class _HashGrid:
    """Field values at the evaluated points of a G^3 lattice only (open-addressing hash map).

    Same interface as :class:`_DenseGrid` (``lin``, ``at``, ``evaluations``) plus
    :meth:`values_at`, which evaluates what is missing; memory is proportional to the points
    evaluated, not to G^3.  Keys are int64 linear indices (-1 = empty slot), probed linearly
    in vectorised rounds; the table doubles when half full.
    """

    def __init__(self, sdf_fn, resolution, size, device, chunk, capacity=2 ** 16):
        self.sdf_fn, self.n, self.g, self.chunk = sdf_fn, resolution, size, chunk
        self.ax = grid_axis(resolution, size, device)
        self.keys = torch.full((capacity,), -1, dtype=torch.int64, device=self.ax.device)
        self.vals = torch.empty(capacity, device=self.ax.device)
        self.count = 0
        self.evaluations = 0

    lin = _DenseGrid.lin

    @property
    def stored(self) -> int:
        return self.keys.numel()

    def _find(self, key: torch.Tensor) -> torch.Tensor:
        """Slot of each key (K,) or -1 when absent."""
        mask = self.keys.numel() - 1
        slot = torch.full_like(key, -1)
        idx = torch.arange(key.numel(), device=key.device)
        pos = _hash(key, mask)
        while idx.numel():
            cur = self.keys[pos]
            k = key[idx]
            hit = cur == k
            slot[idx[hit]] = pos[hit]
            go = ~hit & (cur >= 0)
            idx, pos = idx[go], (pos[go] + 1) & mask
        return slot

    def _insert(self, key: torch.Tensor) -> torch.Tensor:
        """Insert distinct keys (K,) that are absent; returns their slots."""
        if 2 * (self.count + key.numel()) > self.keys.numel():
            self._grow(2 * (self.count + key.numel()))
        mask = self.keys.numel() - 1
        slot = torch.empty_like(key)
        idx = torch.arange(key.numel(), device=key.device)
        pos = _hash(key, mask)
        while idx.numel():
            free = self.keys[pos] < 0
            # claim the free slots; where several keys claim one, one of them wins
            self.keys[pos[free]] = key[idx[free]]
            won = self.keys[pos] == key[idx]
            slot[idx[won]] = pos[won]
            idx, pos = idx[~won], (pos[~won] + 1) & mask
        self.count += key.numel()
        return slot

    def _grow(self, need: int) -> None:
        cap = self.keys.numel()
        while cap < need:
            cap *= 2
        used = self.keys >= 0
        keys, vals = self.keys[used], self.vals[used]
        self.keys = torch.full((cap,), -1, dtype=torch.int64, device=keys.device)
        self.vals = torch.empty(cap, device=keys.device)
        self.count = 0
        self.vals[self._insert(keys)] = vals

    def values_at(self, lin: torch.Tensor) -> torch.Tensor:
        """Values at linear indices lin (any shape), evaluating the field where missing."""
        shape = lin.shape
        lin = lin.reshape(-1)
        slot = self._find(lin)
        miss = slot < 0
        new = torch.unique(lin[miss])
        if new.numel():
            size = self.keys.numel()
            new_slot = self._insert(new)
            for s in range(0, new.numel(), self.chunk):
                part = new[s : s + self.chunk]
                self.vals[new_slot[s : s + self.chunk]] = self.sdf_fn(_points_of(self.ax, self.g, part)).reshape(-1).float()
            self.evaluations += new.numel()
            if self.keys.numel() != size:  # the table grew: every slot moved
                slot = self._find(lin)
            else:
                slot[miss] = new_slot[torch.searchsorted(new, lin[miss])]
        return self.vals[slot].reshape(shape)

    def at(self, ijk):
        return self.values_at(self.lin(ijk))


class _HashSet:
    """A set of int64 keys >= 0 (the visited cells of the tracking), same hashing as above."""

    def __init__(self, device, capacity=2 ** 16):
        self._map = _HashGrid(None, 2, 2, device, 1, capacity)

    def add_new(self, key: torch.Tensor) -> torch.Tensor:
        """Insert keys (K,) and return the distinct ones that were not in the set (sorted)."""
        key = key[self._map._find(key) < 0]
        new = torch.unique(key)
        if new.numel():
            self._map._insert(new)
        return new


@torch.no_grad()
def extract(sdf_fn: SdfFn, resolution: int = 64, mode: str = "sparse", state: ExtractionState | None = None,
            device=None, chunk: int = 2 ** 16, verify: bool = False, coarse_stride: int | None = None,
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
      ``sparse`` exact narrow band, memory proportional to the surface (values, visited
                 cells and the mesh's cells in hash maps and lists; no N^3 array).  Cold
                 start: a coarse grid (stride ``coarse_stride``), a bisection on every
                 coarse edge with a sign change to find fine sign-changing cells, recursive
                 refinement of coarse cells that show no sign change but have a corner with
                 |s| < band * half their diagonal (a hidden component, e.g. a thin part,
                 unless they touch a sign-changing cell), then surface tracking: every
                 neighbour across a cell face with mixed signs is evaluated until the set of
                 sign-changing cells is closed.  Warm start (``state`` from a non-empty sparse
                 call at the same resolution, ``warm=True``): the tracking starts from the
                 previous call's cells plus the seeds of a sentinel lattice of twice the
                 coarse stride, instead of the coarse pass.  The mesh is identical to
                 ``dense`` whenever every connected piece of the surface is seeded (cold:
                 ``band`` is a Lipschitz safety factor; warm: a piece touches the previous
                 surface's cells or crosses a sentinel edge; a piece that is neither, e.g. a
                 small new blob far from the old surface, is missed until the next cold call).
                 ``verify=True`` also runs ``dense``, compares with :func:`same_mesh`, records
                 ``state.verified`` and returns the dense mesh if they differ.
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
    fresh, warm_cells = None, None
    if (mode == "fast" and state is not None and state.full and state.resolution == n and reuse is not None
            and state.keys.numel()):
        grid, fresh = _refresh_fast(fn, state, chunk)
        cells = crossing_cells(grid.values.reshape(n, n, n))
    elif mode == "sparse":
        if (warm and state is not None and state.mode == "sparse" and state.resolution == n and not state.empty
                and state.cells.device == device):
            warm_cells = state.cells
        grid, cells = _sparse(fn, n, device, chunk, coarse_stride or default_coarse_stride(n), band, warm_cells)
    else:
        grid = _DenseGrid(fn, n, n, device, chunk, reuse)
        grid.evaluate(torch.arange(n ** 3, device=grid.ax.device))
        cells = crossing_cells(grid.values.reshape(n, n, n))
    corners = grid.lin(cells).unsqueeze(1) + grid.lin(tables(cells.device)["corner"])  # (C, 8)
    corner_values = grid.values_at(corners) if isinstance(grid, _HashGrid) else grid.values[corners]
    verts, faces, keys = marching_cubes_cells(cells, corner_values, n, grid.ax)
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


def _sparse(sdf_fn, n, device, chunk, s0, band, warm_cells):
    """Seeds (coarse pass, or the previous cells + a sentinel lattice) + surface tracking.

    Returns the hash grid of evaluated values and the sign-changing cells (C, 3) in C order.
    """
    if s0 < 1 or s0 & (s0 - 1):
        raise MeshSDFError(f"coarse_stride {s0} must be a power of two")
    if warm_cells is not None:
        s0 = 2 * s0  # the sentinel lattice
    m = -(-(n - 1) // s0)
    g = m * s0 + 1  # coarse lattice padded just past the box so every coarse cell is whole
    grid = _HashGrid(sdf_fn, n, g, device, chunk)
    dev = grid.ax.device
    h = voxel_size(n)
    corner = tables(dev)["corner"]
    neigh = torch.tensor(_NEIGH26, device=dev)
    cells = _lattice(s0, m, dev)
    seeds = [] if warm_cells is None else [warm_cells]
    s = s0
    while True:
        v = grid.values_at(grid.lin(cells).unsqueeze(1) + grid.lin(corner * s))  # (K, 8)
        out = v > 0
        sc = out.any(1) & ~out.all(1)
        seeds.append(cells[sc] if s == 1 else _bisect_seeds(grid, cells[sc], out[sc], s))
        if s == 1 or warm_cells is not None:
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
    seeds = torch.cat(seeds)
    return grid, _track(grid, seeds, n)


def _bisect_seeds(grid, cells: torch.Tensor, out: torch.Tensor, s: int) -> torch.Tensor:
    """Fine sign-changing cells found by bisecting every crossing edge of stride-s cells."""
    tab = tables(cells.device)
    corner = tab["corner"]
    cross = out[:, tab["edge_lo"]] != out[:, tab["edge_hi"]]  # (K, 12)
    k_idx, e_idx = cross.nonzero(as_tuple=True)
    start = cells[k_idx] + corner[tab["edge_lo"][e_idx]] * s
    key = torch.unique(grid.lin(start) * 3 + tab["edge_axis"][e_idx])
    lin, axis = key // 3, key % 3
    g = grid.g
    start = torch.stack((lin // (g * g), (lin // g) % g, lin % g), 1)
    unit = torch.nn.functional.one_hot(axis, 3)
    lo = torch.zeros_like(lin)
    hi = torch.full_like(lin, s)
    out_lo = grid.at(start) > 0
    while s > 1:
        mid = (lo + hi) // 2
        same = (grid.at(start + unit * mid.unsqueeze(1)) > 0) == out_lo
        lo = torch.where(same, mid, lo)
        hi = torch.where(same, hi, mid)
        s //= 2
    p = start + unit * lo.unsqueeze(1)
    # the 4 cells sharing the fine edge: step back by 0 or 1 along the two other axes
    b = torch.nn.functional.one_hot((axis + 1) % 3, 3)
    c = torch.nn.functional.one_hot((axis + 2) % 3, 3)
    return torch.cat((p, p - b, p - c, p - b - c))


def _track(grid, seeds: torch.Tensor, n: int) -> torch.Tensor:
    """Grow from seed cells across every face with mixed signs until closed.

    The neighbour across a mixed face shares that face, so it changes sign too: every cell
    evaluated here after the seeds belongs to the mesh.  Visited cells are kept in a hash
    set (memory proportional to the surface).  One host sync per round (the loop test).
    Returns the sign-changing cells (C, 3) in C order.
    """
    dev = seeds.device
    tab = tables(dev)
    corner, face_cyc = tab["corner"], tab["face_cyc"]
    face_dir = torch.tensor([[-1, 0, 0], [1, 0, 0], [0, -1, 0], [0, 1, 0], [0, 0, -1], [0, 0, 1]], device=dev)
    m = n - 1
    seeds = seeds[((seeds >= 0) & (seeds < m)).all(1)]
    visited = _HashSet(dev)
    front = visited.add_new((seeds[:, 0] * m + seeds[:, 1]) * m + seeds[:, 2])
    g = grid.g
    corner_lin = grid.lin(corner)  # (8,) offsets of the corners in the value lattice
    found = []
    while front.numel():
        new = []
        for part in front.split(2 ** 18):  # bounded transients however large the front
            c = torch.stack((part // (m * m), (part // m) % m, part % m), 1)
            out = grid.values_at(((c[:, :1] * g + c[:, 1:2]) * g + c[:, 2:]) + corner_lin) > 0  # (F, 8)
            sc = out.any(1) & ~out.all(1)
            c, out = c[sc], out[sc]
            found.append(part[sc])
            fo = out[:, face_cyc]  # (F, 6, 4)
            mixed = fo.any(2) & ~fo.all(2)
            nb = c.unsqueeze(1) + face_dir
            nb = nb[mixed & ((nb >= 0) & (nb < m)).all(2)]
            new.append((nb[:, 0] * m + nb[:, 1]) * m + nb[:, 2])
        front = visited.add_new(torch.cat(new))
    lin = torch.sort(torch.cat(found)).values if found else torch.zeros(0, dtype=torch.int64, device=dev)
    return torch.stack((lin // (m * m), (lin // m) % m, lin % m), 1)


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
