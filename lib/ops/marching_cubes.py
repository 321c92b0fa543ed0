"""Marching cubes kernel: a vectorised cell triangulation and grid helpers (no extraction policy).

Grid convention: resolution N, origin (-1, -1, -1), voxel size 2 / (N - 1); grid value
[i, j, k] sits at (-1 + i h, -1 + j h, -1 + k h).  Everything runs on the tensors' device.
The case tables live in :mod:`lib.ops.marching_cubes_tables`.

- :func:`marching_cubes`: a full (N, N, N) grid -> verts (V, 3) float32, faces (F, 3) int64.
- :func:`marching_cubes_cells`: any set of cells with their 8 corner values (what the sparse
  extraction in :mod:`lib.isosurface` calls); :func:`crossing_cells`,
  :func:`cell_corner_values`: helpers for a full grid; :func:`voxel_size`, :func:`grid_axis`:
  the grid's coordinates.
"""
from __future__ import annotations

import torch

from .marching_cubes_tables import MAX_TRIS, tables

__all__ = ["CELL_CHUNK", "cell_corner_values", "crossing_cells", "grid_axis", "marching_cubes",
           "marching_cubes_cells", "voxel_size"]


def voxel_size(resolution: int) -> float:
    """Grid spacing h = 2 / (N - 1) (world units) of the N^3 grid over [-1, 1]^3."""
    return 2.0 / (resolution - 1)


def grid_axis(resolution: int, size: int | None = None, device=None) -> torch.Tensor:
    """Coordinates of grid indices 0..size-1 along one axis, (size,) float32.

    The first ``resolution`` entries are ``torch.linspace(-1, 1, resolution)``; indices beyond
    continue with the voxel size, just outside the box (the sparse extractor pads its coarse
    lattice with them).
    """
    size = resolution if size is None else size
    ax = torch.linspace(-1.0, 1.0, resolution, device=device)
    if size > resolution:
        steps = torch.arange(1, size - resolution + 1, device=device, dtype=torch.float32)
        ax = torch.cat((ax, 1.0 + voxel_size(resolution) * steps))
    return ax


# Cell (i, j, k) is the cube whose lowest corner is grid point (i, j, k); its corners and edges
# are numbered as in lib.ops.marching_cubes_tables.  Vertices lie on the grid edges whose end
# points are classified differently, linearly interpolated; they are identified by an integer
# key, (linear index of the lower end point in the N^3 grid) * 3 + axis, so a mesh built from
# any subset of cells is made of exactly the same vertices as the full-grid mesh.


def cell_corner_values(values: torch.Tensor, cells: torch.Tensor) -> torch.Tensor:
    """values (G, G, G) or flat (G^3,), cells (C, 3) int64 -> corner values (C, 8)."""
    g = round(values.numel() ** (1 / 3))
    off = tables(cells.device)["corner"]
    base = (cells[:, 0] * g + cells[:, 1]) * g + cells[:, 2]
    return values.reshape(-1)[base.unsqueeze(1) + (off[:, 0] * g + off[:, 1]) * g + off[:, 2]]


CELL_CHUNK = 2 ** 16  # cells per kernel step: bounds the (K, 16)-sized transients, whatever the mesh size


def marching_cubes_cells(cells: torch.Tensor, corner_values, resolution: int, axis: torch.Tensor | None = None,
                         chunk: int = CELL_CHUNK) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised marching cubes on a set of cells of the N^3 grid (any device).

    cells (C, 3) int64 lower-corner indices (each in [0, N-2]); corner_values: (C, 8) float32
    in the corner order of this module, or a callable mapping cells (K, 3) to their corner
    values (K, 8) (called twice per step of ``chunk`` cells, once when they fit in one step,
    so that no (C, 8) array need exist: what the sparse extraction passes).  Returns verts (V, 3) float32 world
    coordinates, faces (F, 3) int64 (normals towards SDF > 0, faces in C order of their
    cells), and keys (V,) int64 naming each vertex: an edge vertex has key (linear index of
    its lower grid point) * 3 + axis < 3 N^3, a loop-centre vertex 3 N^3 + (linear index of
    its cell) * 4 + j.  Values are classified against 0 (pass values - level for another
    level).  Vertices are in a canonical order (by owning cell in C order, then edge; centres
    last), so any superset of the sign-changing cells of a grid gives the full-grid mesh,
    bitwise, whatever ``chunk``.  Transient memory is O(chunk); what persists over the steps
    is 20 bytes per cell (its linear index, for the owner search, and counts / first vertex
    ids), besides the output.
    """
    n = int(resolution)
    dev = cells.device
    ax = grid_axis(n, device=dev) if axis is None else axis
    empty = (torch.zeros(0, 3, device=dev), torch.zeros(0, 3, dtype=torch.int64, device=dev),
             torch.zeros(0, dtype=torch.int64, device=dev))
    ncell = cells.shape[0]
    if ncell == 0:
        return empty
    tab = tables(dev)
    lin = (cells[:, 0] * n + cells[:, 1]) * n + cells[:, 2]
    if ncell > 1 and not bool((lin[1:] > lin[:-1]).all()):
        order = torch.argsort(lin)
        cells, lin = cells[order], lin[order]
        if not callable(corner_values):
            corner_values = corner_values[order]
    if callable(corner_values):
        values_of = lambda c, s: corner_values(c).float()  # noqa: E731
    else:
        values_of = lambda c, s: corner_values[s : s + c.shape[0]].float()  # noqa: E731
    steps = [(s, cells[s : s + chunk]) for s in range(0, ncell, chunk)]
    # pass 1: per cell, its triangles, loop centres and owned crossing edges, so that the
    # vertices of a cell in a later step (an edge's owner lies at or after its cells in C
    # order) have known ids; small dtypes: this is what persists over the steps
    ntri = torch.empty(ncell, dtype=torch.uint8, device=dev)
    nc = torch.empty(ncell, dtype=torch.uint8, device=dev)
    owned = torch.empty(ncell, dtype=torch.int16, device=dev)  # bit e: the cell owns edge e's vertex
    kept = None
    for s, c in steps:
        vals = values_of(c, s)
        idx, cross, owns = _classify(c, vals, n, tab)
        ntri[s : s + c.shape[0]] = tab["ntri"].index_select(0, idx)
        nc[s : s + c.shape[0]] = tab["ncentre"].index_select(0, idx)
        owned[s : s + c.shape[0]] = (owns.long() * tab["bits12"]).sum(1)
        kept = (vals, idx, cross, owns) if len(steps) == 1 else None  # one step: no second look-up
    if not bool(ntri.any()):
        return empty
    # Each crossing grid edge gets one vertex, owned by one cell: the cell whose lower corner
    # is the edge's lower end point, moved down on the other axes where that point lies on
    # the grid's upper faces.  Vertex ids follow (owner cell, edge) order, then loop centres.
    nown = tab["popcount12"].index_select(0, owned.long())
    own_base = torch.cumsum(nown, 0) - nown  # (C,) first vertex id of each cell's own edges
    n_own = int(own_base[-1] + nown[-1])
    del nown
    cen_base = n_own + torch.cumsum(nc, 0) - nc  # (C,) first id of each cell's loop centres
    n_cen = int(cen_base[-1] + nc[-1]) - n_own
    if n_own + n_cen < 2 ** 31:  # ids fit in int32: half the memory
        own_base, cen_base = own_base.int(), cen_base.int()
    lo_off = tab["corner"][tab["edge_lo"]]  # (12, 3)
    # the owner search runs on int32 keys where they fit: half the memory traffic of a search
    slin = lin.int() if n ** 3 < 2 ** 31 else lin
    # outputs written in place step by step (no list of parts and copy at the end)
    verts = torch.empty(n_own + n_cen, 3, device=dev)
    keys = torch.empty(n_own + n_cen, dtype=torch.int64, device=dev)
    faces = torch.empty(int(ntri.sum(dtype=torch.int64)), 3, dtype=torch.int64, device=dev)
    tri_at = cen_at = 0
    for s, c in steps:
        k = c.shape[0]
        if kept is None:
            vals = values_of(c, s)
            idx, cross, owns = _classify(c, vals, n, tab)
        else:
            vals, idx, cross, owns = kept
        rows = torch.arange(k, device=dev)
        ntri_k, nc_k = ntri[s : s + k].long(), nc[s : s + k].long()
        # vid (k, 16): vertex id of each cell's 12 edge slots and 4 centre slots (-1: none)
        vid = torch.full((k * 16,), -1, dtype=torch.int64, device=dev)
        cen_c = torch.repeat_interleave(rows, nc_k)
        cen_j = torch.arange(cen_c.shape[0], device=dev) - (torch.cumsum(nc_k, 0) - nc_k)[cen_c]
        vid.index_copy_(0, cen_c * 16 + 12 + cen_j, cen_base.index_select(0, s + cen_c).long() + cen_j)
        # (index_select / index_copy_ / take of flat tensors rather than x[i]: faster on a CPU,
        # see benchmarks/extraction.py's marching cubes part)
        pc, pe = cross.nonzero(as_tuple=True)
        point = c[pc] + lo_off.index_select(0, pe)  # lower end point of each crossing (cell, edge)
        owner = point.clamp(max=n - 2)
        # owner rows: the cells are sorted by linear index, so a binary search finds each owner
        # (no (N-1)^3 lookup table: memory stays proportional to the cells given)
        olin = (owner[:, 0] * n + owner[:, 1]) * n + owner[:, 2]
        orow = torch.searchsorted(slin, olin.to(slin.dtype)).clamp_(max=ncell - 1)
        if not bool(lin.index_select(0, orow).eq(olin).all()):
            raise ValueError("marching_cubes_cells: the cells must include every sign-changing neighbour "
                             "of the cells given (the owner of a crossing edge is missing)")
        d = point - owner
        oedge = tab["edge_by"].view(-1).index_select(0, (d[:, 0] + 2 * d[:, 1] + 4 * d[:, 2]) * 3
                                                     + tab["edge_axis"].index_select(0, pe))
        rank = tab["rank12"].view(-1).index_select(0, owned.index_select(0, orow).long() * 12 + oedge)
        vid.index_copy_(0, pc * 16 + pe, own_base.index_select(0, orow).long() + rank)
        del pc, pe, point, owner, olin, orow, d, oedge, rank
        cell_of = torch.repeat_interleave(rows, ntri_k)
        first = torch.cumsum(ntri_k, 0) - ntri_k
        tri = (idx.index_select(0, cell_of) * MAX_TRIS + torch.arange(cell_of.shape[0], device=dev)
               - first.index_select(0, cell_of))
        slots = tab["tris"].view(-1, 3).index_select(0, tri)  # (T, 3) slot ids
        faces[tri_at : tri_at + slots.shape[0]] = vid.take(cell_of.unsqueeze(1) * 16 + slots)
        tri_at += slots.shape[0]
        del vid, cell_of, slots, tri
        # positions: edge vertices from their owner's values, centres from their loop; the
        # own vertices of this step are the next ids in order
        oc, oe = owns.nonzero(as_tuple=True)
        at = int(own_base[s])
        c_oc = c[oc]
        verts[at : at + oc.shape[0]] = _edge_points(c_oc, vals[oc], oe, ax, tab)
        lin_lo = c_oc + lo_off.index_select(0, oe)
        keys[at : at + oc.shape[0]] = (3 * ((lin_lo[:, 0] * n + lin_lo[:, 1]) * n + lin_lo[:, 2])
                                       + tab["edge_axis"].index_select(0, oe))
        if cen_c.numel():
            member = tab["members"][idx[cen_c], cen_j]  # (K, 12)
            kc = cen_c.shape[0]
            loop = _edge_points(c[cen_c].repeat_interleave(12, 0), vals[cen_c].repeat_interleave(12, 0),
                                torch.arange(12, device=dev).repeat(kc), ax, tab).reshape(kc, 12, 3)
            loop = torch.where(member.unsqueeze(-1), loop, torch.zeros((), device=dev))
            verts[n_own + cen_at : n_own + cen_at + kc] = loop.sum(1) / member.sum(1, keepdim=True)
            keys[n_own + cen_at : n_own + cen_at + kc] = 3 * n ** 3 + 4 * lin[s + cen_c] + cen_j
            cen_at += kc
    return verts, faces, keys


def _classify(cells: torch.Tensor, vals: torch.Tensor, n: int, tab: dict):
    """Per cell: table index (K,) int64 (case * 64 + decider bits), crossing edges (K, 12),
    edges whose vertex the cell owns (K, 12)."""
    k = vals.shape[0]
    out = vals > 0  # (K, 8)
    case = (out.long() * tab["bits8"]).sum(1)
    # asymptotic decider per face; products are commutative so neighbours agree
    fv = vals.index_select(1, tab["face_cyc"].view(-1)).view(k, 6, 4)  # (K, 6, 4)
    fo = fv > 0
    amb = (fo[..., 0] == fo[..., 2]) & (fo[..., 1] == fo[..., 3]) & (fo[..., 0] != fo[..., 1])
    d02 = fv[..., 0] * fv[..., 2]
    d13 = fv[..., 1] * fv[..., 3]
    # saddle <= 0 (inside) <=> (product of outside diagonal) <= (product of inside diagonal)
    neg_conn = torch.where(fo[..., 0], d02 <= d13, d13 <= d02) & amb
    index = case * 64 + (neg_conn.long() * tab["bits6"]).sum(1)
    cross = (vals.index_select(1, tab["edge_lo"]) > 0) != (vals.index_select(1, tab["edge_hi"]) > 0)  # (K, 12)
    # a cell owns the crossing edges at its lower corner, plus those that no cell above it
    # can own because it lies on the grid's upper faces: a (8, 12) table by boundary bits
    up = cells == n - 2  # (K, 3)
    owns = cross & tab["own_by_up"].index_select(0, up[:, 0].long() + 2 * up[:, 1].long() + 4 * up[:, 2].long())
    return index, cross, owns


def _edge_points(cells, vals, edges, ax, tab):
    """Interpolated zero crossing on edge ``edges`` (K,) of cells (K, 3) with values (K, 8)."""
    lo_c, hi_c = tab["edge_lo"].index_select(0, edges), tab["edge_hi"].index_select(0, edges)
    axis = tab["edge_axis"].index_select(0, edges)
    v_lo = vals.gather(1, lo_c.unsqueeze(1)).squeeze(1)
    v_hi = vals.gather(1, hi_c.unsqueeze(1)).squeeze(1)
    t = v_lo / (v_lo - v_hi)
    base = cells + tab["corner"].index_select(0, lo_c)  # (K, 3)
    p = ax.take(base)
    a = axis.unsqueeze(1)
    p0 = p.gather(1, a).squeeze(1)
    p1 = ax.take(base.gather(1, a).squeeze(1) + 1)
    return p.scatter(1, a, (p0 + t * (p1 - p0)).unsqueeze(1))


def crossing_cells(values: torch.Tensor, resolution: int | None = None) -> torch.Tensor:
    """Cells (C, 3) int64, C order, whose 8 corners are not all on one side of 0.

    values: (G, G, G) grid (G >= resolution); only the first ``resolution`` points per axis
    are used.  Separable: "any corner outside" and "all corners outside" are reduced over
    pairs along x, then y, then z (6 byte-wide passes instead of 8 shifts and ors).
    """
    n = values.shape[0] if resolution is None else int(resolution)
    out = values[:n, :n, :n] > 0
    some, every = out[1:] | out[:-1], out[1:] & out[:-1]
    some, every = some[:, 1:] | some[:, :-1], every[:, 1:] & every[:, :-1]
    some, every = some[:, :, 1:] | some[:, :, :-1], every[:, :, 1:] & every[:, :, :-1]
    return (some & ~every).nonzero()


def marching_cubes(values: torch.Tensor, level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """Marching cubes of the level set ``values == level`` on a full (N, N, N) grid.

    Returns verts (V, 3) float32 world coordinates and faces (F, 3) int64 on the grid's
    device, both empty when the level set does not cross the grid; normals point towards
    values > level (outwards for an SDF); coincident vertices are shared (welded).
    """
    values = torch.as_tensor(values, dtype=torch.float32)
    if level:
        values = values - level
    n = values.shape[0]
    cells = crossing_cells(values)
    v, f, _ = marching_cubes_cells(cells, cell_corner_values(values, cells), n)
    return v, f
