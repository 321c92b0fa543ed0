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

import sys
from typing import Callable

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
MIN_SIDE_BY_SIDE = 2 ** 13  # cells per step below which steps run in order (too little work to hand over)
_B = 3  # owner look-up blocks of 2^3 cells per axis, with a one-cell halo above: 9^3 slots each
_H = (1 << _B) + 1


def marching_cubes_cells(cells: torch.Tensor, corner_values, resolution: int, axis: torch.Tensor | None = None,
                         chunk: int = CELL_CHUNK, side_by_side: Callable[[list], list] | None = None, ways: int = 1
                         ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Vectorised marching cubes on a set of cells of the N^3 grid (any device).

    Args:
        cells: (C, 3) int64 lower-corner indices (each in [0, N-2]).
        corner_values: (C, 8) float32 in the corner order of this module, or a callable
            mapping cells (K, 3) to their corner values (K, 8), called twice per step of
            ``chunk`` cells, once when they fit in one step, so that no (C, 8) array need
            exist (what the sparse extraction passes).  Classified against 0 (pass values -
            level for another level).
        resolution: N.
        axis: (N,) grid coordinates (default :func:`grid_axis`).
        chunk: cells per step (default :data:`CELL_CHUNK`); the result does not depend on it.
        side_by_side: runs a list of zero-argument callables, possibly at once, and returns
            their results in order (e.g. ``lib.runtime.concurrently``); default None: in
            order.  The steps of each pass write disjoint slices, so they may overlap.  Not
            used with a callable ``corner_values`` (it may evaluate and store: one thread).
        ways: how many steps ``side_by_side`` runs at once (default 1): the cells are then cut
            into a multiple of ``ways`` steps of equal size (at most ``chunk`` cells each).

    Returns:
        verts (V, 3) float32 world coordinates; faces (F, 3) int64, normals towards SDF > 0,
        faces in C order of their cells; keys (V,) int64 naming each vertex: an edge vertex
        has key (linear index of its lower grid point) * 3 + axis < 3 N^3, a loop-centre
        vertex 3 N^3 + (linear index of its cell) * 4 + j.  Vertices are in a canonical order
        (by owning cell in C order, then edge; centres last), so any superset of the
        sign-changing cells of a grid gives the full-grid mesh, bitwise, whatever ``chunk``.

    Transient memory is O(chunk); what persists over the steps is 12 bytes per cell (case,
    owned edges, first vertex id, owner look-up slot) and the owner look-up: a (N/8)^3 int32
    block table and 9^3 int32 per 8^3 block holding cells (the blocks of the sparse store),
    besides the output.
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
    if ways > 1 and side_by_side is not None and ncell >= ways * MIN_SIDE_BY_SIDE and not callable(corner_values):
        parts = -(-ncell // chunk)
        parts += -parts % ways  # whole rounds of ``ways`` steps of equal size
        chunk = -(-ncell // parts)
    else:
        ways, side_by_side = 1, None
    run = side_by_side or (lambda tasks: [t() for t in tasks])
    steps = [(s, cells[s : s + chunk]) for s in range(0, ncell, chunk)]
    up_w = torch.tensor([1, 2, 4], device=dev)
    # pass 1: per cell, its table index and owned crossing edges (what persists over the
    # steps), so that the vertices of a cell in a later step (an edge's owner lies at or
    # after its cells in C order) have known ids
    case = torch.empty(ncell, dtype=torch.int16, device=dev)  # case * 64 + decider bits < 2^14
    owned = torch.empty(ncell, dtype=torch.int16, device=dev)  # bit e: the cell owns edge e's vertex

    top = bool(cells.max() >= n - 2)  # a cell on the grid's upper faces (their cells own fewer edges)

    def classify(s: int, c: torch.Tensor) -> torch.Tensor:
        vals = values_of(c, s)
        idx = _case_index(vals, tab)
        case[s : s + c.shape[0]] = idx
        own_mask = (tab["own_mask"].index_select(0, ((c == n - 2).long() * up_w).sum(1)) if top
                    else tab["own_mask"][0])  # no cell on the grid's upper faces: one mask for all
        owned[s : s + c.shape[0]] = tab["cross12"].index_select(0, idx >> 6) & own_mask
        return vals

    kept = None
    for i in range(0, len(steps), ways):
        got = run([lambda s=s, c=c: classify(s, c) for s, c in steps[i : i + ways]])
        kept = got[0] if len(steps) == 1 else None  # one step: no second look-up
    case_l = case.long()
    ntri = tab["ntri"].index_select(0, case_l)
    nc = tab["ncentre"].index_select(0, case_l)
    nown = tab["popcount12"].index_select(0, owned.long())
    del case_l
    # Each crossing grid edge gets one vertex, owned by one cell: the cell whose lower corner
    # is the edge's lower end point, moved down on the other axes where that point lies on
    # the grid's upper faces.  Vertex ids follow (owner cell, edge) order, then loop centres.
    own_end = torch.cumsum(nown, 0)
    cen_end = torch.cumsum(nc, 0)
    tri_end = torch.cumsum(ntri, 0)
    ends = torch.tensor([min(s + chunk, ncell) - 1 for s, _ in steps], device=dev)
    own_at, cen_at, tri_at = (torch.cat((ends.new_zeros(1), x.index_select(0, ends))).tolist()
                              for x in (own_end, cen_end, tri_end))  # per step, and the totals: one sync
    n_own, n_cen, n_tri = own_at[-1], cen_at[-1], tri_at[-1]
    if n_tri == 0:
        return empty
    # the triangle-corner ids in int32 (half the memory traffic) when the ids and the owner
    # table's slots fit, else int64
    idt = torch.int32 if n_own + n_cen < 2 ** 31 else torch.int64
    own_base = (own_end - nown).to(idt)  # (C,) first vertex id of each cell's own edges
    del nown, own_end, cen_end, tri_end  # before the owner look-up: the peak of memory
    slot_of, halo = _owner_lookup(cells, n)
    if halo.shape[0] >= 2 ** 31:
        idt, own_base = torch.int64, own_base.long()
    slot_of = slot_of.to(idt)
    slot_off = tab["slot_off"].view(-1, 3)
    slot_off = (slot_off[:, 0] * _H + slot_off[:, 1]) * _H + slot_off[:, 2]  # (8 * 16,) in a halo block
    # per slot (by upper faces): the owner's offset in the halo table and the slot in its
    # numbering, in one word (one gather per triangle corner instead of two)
    slot_word = (slot_off * 16 + tab["slot_own"].view(-1)).to(idt)  # (8 * 16,)
    owned16 = owned.to(idt) * 16  # (C,) the rows of rank16 of each cell's mask
    lo_off = tab["corner"].index_select(0, tab["edge_lo"])  # (12, 3)
    key_off = 3 * ((lo_off[:, 0] * n + lo_off[:, 1]) * n + lo_off[:, 2]) + tab["edge_axis"]  # (12,) key less 3 lin
    rank16 = tab["rank16"].to(idt)
    tris = tab["tris"].view(-1, 3).to(idt)  # (256 * 64 * 12, 3)
    up_w16 = up_w.to(idt) * 16
    # outputs written in place step by step (no list of parts and copy at the end)
    verts = torch.empty(n_own + n_cen, 3, device=dev)
    keys = torch.empty(n_own + n_cen, dtype=torch.int64, device=dev)
    faces = torch.empty(n_tri, 3, dtype=torch.int64, device=dev)

    def mesh_step(step: int, s: int, c: torch.Tensor) -> None:
        k = c.shape[0]
        vals = values_of(c, s) if kept is None else kept
        idx = case[s : s + k].long()
        # faces: the slots of each triangle, each slot's vertex id from its owner's numbering
        t0, t1 = tri_at[step], tri_at[step + 1]
        ntri_k = ntri[s : s + k]
        cell_of = _runs(ntri_k, t1 - t0, idt)  # (T,)
        first = torch.cumsum(ntri_k, 0, dtype=idt) - ntri_k.to(idt)
        tri = ((idx.to(idt) * MAX_TRIS - first).index_select(0, cell_of)
               + torch.arange(t1 - t0, device=dev, dtype=idt))
        del first
        slot = tris.index_select(0, tri)  # (T, 3) slot ids
        del tri
        us = slot.view(-1)  # (3T,) the slots, offset by each cell's upper faces' table row where any
        if top:
            up16 = ((c == n - 2).to(idt) * up_w16).sum(1, dtype=idt)  # (K,)
            us = us + _triple(up16.index_select(0, cell_of))
        word = slot_word.index_select(0, us)  # (3T,)
        orow = halo.index_select(0, _triple(slot_of[s : s + k].index_select(0, cell_of)) + (word >> 4))  # owner rows
        if int(orow.min()) < 0:
            raise ValueError("marching_cubes_cells: the cells must include every sign-changing neighbour "
                             "of the cells given (the owner of a crossing edge is missing)")
        vid = own_base.index_select(0, orow) + rank16.index_select(0, owned16.index_select(0, orow) + (word & 15))
        del orow, us, word
        c0, c1 = cen_at[step], cen_at[step + 1]
        if c1 > c0:  # loop-centre slots: the cell's own centres, numbered after every edge vertex
            nc_k = nc[s : s + k]
            cen_loc = torch.cumsum(nc_k, 0) - nc_k  # (K,) each cell's first centre among the step's
            cen_first = (cen_loc + (n_own + c0 - 12)).to(idt)  # (K,) its first centre id, less the first centre slot
            centre = slot.view(-1) >= 12
            vid = torch.where(centre, _triple(cen_first.index_select(0, cell_of)) + slot.view(-1), vid)
        faces[t0:t1] = vid.view(-1, 3)
        del vid, slot, cell_of
        # positions: edge vertices from their owner's values, centres from their loop; the
        # own vertices of this step are the next ids in order
        # the (cell, edge) pairs of the owned edges, in that order: each cell's run of ranks
        # read through the table of its mask (no (K, 12) pass)
        at, o1 = own_at[step], own_at[step + 1]
        own_k = owned[s : s + k].long()
        oc = _runs(tab["popcount12"].index_select(0, own_k), o1 - at, torch.int64)
        rank = (torch.arange(at, o1, device=dev, dtype=idt) - own_base[s : s + k].index_select(0, oc)).long()
        oe = tab["nth_edge12"].index_select(0, own_k.index_select(0, oc) * 12 + rank)
        del own_k, rank
        c_oc = c.index_select(0, oc)
        verts[at : at + oc.shape[0]] = _edge_points(c_oc, vals, oc, oe, ax, tab)
        keys[at : at + oc.shape[0]] = 3 * lin[s : s + k].index_select(0, oc) + key_off.index_select(0, oe)
        del oc, oe, c_oc
        if c1 > c0:
            cen_c = _runs(nc_k, c1 - c0, torch.int64)
            cen_j = torch.arange(c1 - c0, device=dev) - cen_loc.index_select(0, cen_c)
            member = tab["members"][idx[cen_c], cen_j]  # (K, 12)
            kc = cen_c.shape[0]
            loop = _edge_points(c[cen_c].repeat_interleave(12, 0), vals, cen_c.repeat_interleave(12),
                                torch.arange(12, device=dev).repeat(kc), ax, tab).reshape(kc, 12, 3)
            loop = torch.where(member.unsqueeze(-1), loop, torch.zeros((), device=dev))
            verts[n_own + c0 : n_own + c1] = loop.sum(1) / member.sum(1, keepdim=True)
            keys[n_own + c0 : n_own + c1] = 3 * n ** 3 + 4 * lin[s + cen_c] + cen_j

    for i in range(0, len(steps), ways):
        run([lambda j=j, s=s, c=c: mesh_step(j, s, c) for j, (s, c) in enumerate(steps[i : i + ways], start=i)])
    return verts, faces, keys


def _runs(counts: torch.Tensor, total: int, dtype: torch.dtype) -> torch.Tensor:
    """``torch.repeat_interleave(arange(K), counts)`` of ``total`` entries, as a cumulative sum
    of run starts (a few passes instead of its per-run copies).

    Args:
        counts: (K,) int64, each >= 0; total: their sum; dtype: of the result.

    Returns:
        (total,) index i repeated counts[i] times, in order.
    """
    start = torch.cumsum(counts, 0) - counts  # (K,) each run's first position (empty runs share the next one's)
    flag = torch.zeros(total + 1, dtype=dtype, device=counts.device)
    flag.index_add_(0, start, torch.ones(1, dtype=dtype, device=counts.device).expand(counts.shape[0]))
    return torch.cumsum(flag[:total], 0, dtype=dtype) - 1


def _triple(x: torch.Tensor) -> torch.Tensor:
    """x (T,) with each entry three times in a row: (3T,) (a per-triangle value for its corners;
    a stack, several times cheaper than broadcasting against (T, 3))."""
    return torch.stack((x, x, x), 1).view(-1)


def _owner_lookup(cells: torch.Tensor, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Rows of cells by position, for the owner of every triangle slot: two gathers, no search.

    The cells are grouped in blocks of 8^3 cells; each block holding cells gets 9^3 slots
    of a table, its own cells and the one-cell layer of its upper neighbours, so that a
    cell's owners (at offsets 0 or 1 per axis) sit at a fixed offset from its own slot.

    Args:
        cells: (C, 3) int64, in [0, N-2].
        n: N.

    Returns:
        slot (C,) int64 of each cell in the table, and the table (blocks * 9^3,) int32 of
        rows (-1: no cell there).
    """
    dev = cells.device
    nb = ((n - 1) + (1 << _B) - 1) >> _B  # blocks per axis
    blk = cells >> _B
    loc = cells & ((1 << _B) - 1)
    bkey = (blk[:, 0] * nb + blk[:, 1]) * nb + blk[:, 2]
    row_of = torch.zeros(nb ** 3, dtype=torch.int32, device=dev)
    row_of.index_fill_(0, bkey, 1)
    nblocks = int(row_of.sum())
    row_of = torch.where(row_of > 0, torch.cumsum(row_of, 0, dtype=torch.int32) - 1, -1)  # block -> row, or -1
    halo = torch.full((nblocks * _H ** 3,), -1, dtype=torch.int32, device=dev)
    local = (loc[:, 0] * _H + loc[:, 1]) * _H + loc[:, 2]  # (C,) each cell's place in its block's slots
    slot = row_of.index_select(0, bkey).long() * _H ** 3 + local
    rows = torch.arange(cells.shape[0], dtype=torch.int32, device=dev)
    halo.index_copy_(0, slot, rows)
    # cells on a block's lower faces are also the upper halo of the blocks below: bit a of
    # code, the cell is on the lower face along axis a (and a block lies below)
    low = ((loc == 0) & (blk > 0)).to(torch.uint8)  # (C, 3)
    code = low[:, 0] | (low[:, 1] << 1) | (low[:, 2] << 2)
    pick = code.nonzero().squeeze(1)
    code, lb, local, lrows = code.index_select(0, pick).long(), bkey.index_select(0, pick), local[pick], rows[pick]
    # every non-empty subset (mask 1..7) of those axes names one block below, all in one pass:
    # (cell, mask) pairs, each block's offset in the block table and the slot shift in its halo
    tab = tables(dev)
    many = tab["subset_count3"].index_select(0, code)  # (P,) subsets of each cell's code
    sel = _runs(many, int(many.sum()), torch.int64)
    rank = torch.arange(sel.shape[0], device=dev) - (torch.cumsum(many, 0) - many).index_select(0, sel)
    mask = tab["subsets3"].index_select(0, code.index_select(0, sel) * 7 + rank)  # (Q,) in 1..7
    axes = (torch.arange(8, device=dev).unsqueeze(1) >> torch.arange(3, device=dev)) & 1  # (8 masks, 3)
    block_step = (axes * torch.tensor([nb * nb, nb, 1], device=dev)).sum(1)  # (8,)
    shift = (axes * (1 << _B) * torch.tensor([_H * _H, _H, 1], device=dev)).sum(1)  # (8,)
    lower = row_of.index_select(0, lb.index_select(0, sel) - block_step.index_select(0, mask)).long()
    has = (lower >= 0).nonzero().squeeze(1)
    sel, mask, lower = sel.index_select(0, has), mask.index_select(0, has), lower.index_select(0, has)
    at = lower * _H ** 3 + local.index_select(0, sel) + shift.index_select(0, mask)
    halo.index_copy_(0, at, lrows.index_select(0, sel))  # distinct slots: the order of the writes is free
    return slot, halo


def _case_index(vals: torch.Tensor, tab: dict) -> torch.Tensor:
    """Table index (K,) int64 of cells with corner values (K, 8): case * 64 + decider bits."""
    out = vals > 0  # (K, 8)
    if sys.byteorder == "little":
        # the 8 sign bytes of a cell as one word (byte k: corner k), folded onto its low byte
        w = out.view(torch.int64).squeeze(1)
        w = w | (w >> 7)  # byte j: bit 0 corner j, bit 1 corner j + 1
        w = w | (w >> 14)  # bits 2, 3: corners j + 2, j + 3
        case = (w | (w >> 28)) & 255  # bits 4..7: corners j + 4 .. j + 7
    else:
        case = (out.long() * tab["bits8"]).sum(1)
    # asymptotic decider on the ambiguous faces only (few cells have one); products are
    # commutative so neighbours agree
    amb = tab["ambiguous6"].index_select(0, case)  # (K,) bit f: face f is ambiguous
    rows = amb.nonzero().squeeze(1)
    if rows.numel() == 0:
        return case * 64
    fv = vals.index_select(0, rows).index_select(1, tab["face_cyc"].view(-1)).view(-1, 6, 4)  # (A, 6, 4)
    d02 = fv[..., 0] * fv[..., 2]
    d13 = fv[..., 1] * fv[..., 3]
    # saddle <= 0 (inside) <=> (product of outside diagonal) <= (product of inside diagonal)
    neg_conn = torch.where(fv[..., 0] > 0, d02 <= d13, d13 <= d02)
    bits = (neg_conn.long() * tab["bits6"]).sum(1) & amb.index_select(0, rows)
    return (case * 64).index_add_(0, rows, bits)


def _edge_points(cells, vals, rows, edges, ax, tab):
    """Interpolated zero crossing on edge ``edges`` (K,) of cells (K, 3) whose corner values
    are rows ``rows`` (K,) of vals (R, 8) (only each edge's two values are read)."""
    lo_c, hi_c = tab["edge_lo"].index_select(0, edges), tab["edge_hi"].index_select(0, edges)
    axis = tab["edge_axis"].index_select(0, edges)
    flat, at = vals.reshape(-1), rows * 8
    v_lo = flat.index_select(0, at + lo_c)
    v_hi = flat.index_select(0, at + hi_c)
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
