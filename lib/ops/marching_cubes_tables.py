"""Marching cubes case tables: corner / edge / face numbering and the triangles of every cube case.

Corner c (0..7) of a cell sits at offset (c & 1, c >> 1 & 1, c >> 2 & 1) from its lowest
corner; a corner is "outside" when its value is > 0 and "inside" when <= 0 (scikit-image's
classification at level 0).  Built once, in Python, then cached per device by :func:`tables`;
:mod:`lib.ops.marching_cubes` runs them over cells.

Triangulation: on each cube face the contour segments separate inside from outside
corners; a face with four crossings (ambiguous) is resolved with the asymptotic decider
(the sign of the bilinear saddle), computed from the face's four values with commutative
products so both cells sharing the face decide identically.  Segments, oriented with a
fixed rule, chain into closed loops; a loop is triangulated as a fan from its first
vertex, or around an extra centre vertex (mean of the loop) when it contains both
segments of one ambiguous face (a fan would then create a diagonal lying in that face,
which the neighbour cell could duplicate).  The result is a closed, consistently oriented
2-manifold away from the box boundary (tested), with the same edge vertices as
scikit-image's Lewiner variant; the triangles differ (fans instead of Lewiner's tables)
and the interior ambiguities of Lewiner (its case 4, 6, 7, 10, 12, 13 tunnels) are not
modelled, so the two can differ in topology only where a cell is ambiguous.
"""
from __future__ import annotations

import functools

import numpy as np
import torch

__all__ = ["CORNER_OFFSETS", "MAX_TRIS", "MAX_CENTRES", "tables"]

CORNER_OFFSETS = [(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)]
# 12 edges as (lower corner, upper corner, axis)
_EDGES = [(c, c | (1 << a), a) for a in range(3) for c in range(8) if not (c >> a) & 1]
_EDGE_OF = {(lo, hi): e for e, (lo, hi, _) in enumerate(_EDGES)}
_EDGE_MID = [tuple((CORNER_OFFSETS[lo][k] + CORNER_OFFSETS[hi][k]) / 2 for k in range(3)) for lo, hi, _ in _EDGES]


def _faces_table():
    """6 faces as (axis, side, 4 corners in cyclic order)."""
    faces = []
    for a in range(3):
        b, c = [x for x in range(3) if x != a]
        for side in (0, 1):
            cyc = [(side << a) | (u << b) | (w << c) for u, w in ((0, 0), (1, 0), (1, 1), (0, 1))]
            faces.append((a, side, cyc))
    return faces


_FACES = _faces_table()
MAX_TRIS = 12  # loops use at most the 12 edges of a cube; a centre fan of k points gives k triangles
MAX_CENTRES = 4


def _triangulate_cell(outside: list[int], neg_connected: list[bool]):
    """Triangles of one cube configuration.

    outside: 8 booleans (corner value > 0); neg_connected: per face, whether the inside
    corners of an ambiguous face are connected.  Returns (triangles as slot triples, where
    slot < 12 is an edge and 12 + j is centre j, centres as lists of edge ids).
    """
    pts = CORNER_OFFSETS
    edge = lambda p, q: _EDGE_OF[(min(p, q), max(p, q))]  # noqa: E731
    segs = []  # (start edge, end edge, face)
    for f, (axis, side, cyc) in enumerate(_FACES):
        s = [outside[q] for q in cyc]
        cross = [i for i in range(4) if s[i] != s[(i + 1) % 4]]
        if not cross:
            continue
        pairs = []
        if len(cross) == 2:
            inside = [pts[q] for q in cyc if not outside[q]]
            pairs.append((cross[0], cross[1], tuple(sum(c) / len(inside) for c in zip(*inside))))
        else:
            cut_outside = neg_connected[f]  # cut off the corners that are not connected
            centre = tuple(sum(pts[q][k] for q in cyc) / 4 for k in range(3))
            for i in range(4):
                if bool(s[i]) == cut_outside:
                    pairs.append(((i - 1) % 4, i, centre if cut_outside else pts[cyc[i]]))
        b, c = (axis + 1) % 3, (axis + 2) % 3
        for i1, i2, ref in pairs:
            e1 = edge(cyc[i1], cyc[(i1 + 1) % 4])
            e2 = edge(cyc[i2], cyc[(i2 + 1) % 4])
            p, q = _EDGE_MID[e1], _EDGE_MID[e2]
            # inside region on a fixed side of the segment, seen from outside the cube:
            # the sign of ((q - p) x (ref - p)) . outward normal
            turn = (q[b] - p[b]) * (ref[c] - p[c]) - (q[c] - p[c]) * (ref[b] - p[b])
            if (turn if side else -turn) > 0:
                e1, e2 = e2, e1
            segs.append((e1, e2, f))
    nxt = {s[0]: (s[1], s[2]) for s in segs}
    assert len(nxt) == len(segs), "each crossing edge starts exactly one segment"
    tris, centres, seen = [], [], set()
    for start in sorted(nxt):
        if start in seen:
            continue
        loop, faces, e = [], [], start
        while e not in seen:
            seen.add(e)
            loop.append(e)
            e, f = nxt[e]
            faces.append(f)
        assert e == start
        if len(set(faces)) < len(faces):
            j = 12 + len(centres)
            centres.append(loop)
            tris += [(loop[i], loop[(i + 1) % len(loop)], j) for i in range(len(loop))]
        else:
            tris += [(loop[0], loop[i], loop[i + 1]) for i in range(1, len(loop) - 1)]
    return tris, centres


@functools.lru_cache(maxsize=None)
def _tables_np():
    """(tris (256*64, 12, 3) int64 slot ids, -1 padded; centre membership (256*64, 4, 12) bool)."""
    tris = np.full((256 * 64, MAX_TRIS, 3), -1, dtype=np.int64)
    members = np.zeros((256 * 64, MAX_CENTRES, 12), dtype=bool)
    for case in range(256):
        outside = [(case >> k) & 1 for k in range(8)]
        amb = []
        for f, (_, _, cyc) in enumerate(_FACES):
            s = [outside[q] for q in cyc]
            if s[0] == s[2] and s[1] == s[3] and s[0] != s[1]:
                amb.append(f)
        for combo in range(1 << len(amb)):
            neg = [False] * 6
            bits = 0
            for t, f in enumerate(amb):
                if (combo >> t) & 1:
                    neg[f] = True
                    bits |= 1 << f
            t_list, centres = _triangulate_cell(outside, neg)
            idx = case * 64 + bits
            assert len(t_list) <= MAX_TRIS and len(centres) <= MAX_CENTRES
            if t_list:
                tris[idx, : len(t_list)] = t_list
            for j, loop in enumerate(centres):
                members[idx, j, loop] = True
    return tris, members


def _slot_tables(device) -> dict:
    """The kernel's bit-mask tables: which edges cross and which a cell owns, and where the
    vertex of each triangle slot lives (its owner cell and the owner's slot).

    cross12 (256,) int64: mask of the edges whose ends differ, by case; ambiguous6 (256,)
    int64: mask of the faces whose four corners alternate in sign, by case; own_mask (8,) int64:
    mask of the edges a cell owns by its upper-face bits u (axis a touches the grid's upper
    face: the cell's index is N - 2 there, so nobody above owns its upper edges);
    slot_off (8, 16, 3) int64: offset of the owner of slot s (edge 0..11; 12..15 the cell's
    own loop centres: offset 0) from the cell, by u; slot_own (8, 16) int64: that slot in the
    owner's numbering (edges: the owner's edge on the same axis at the end point's corner);
    rank16 (4096 * 16,) int32: ids of slot s among the vertices of a cell whose owned-edge mask
    is m, at m * 16 + s (edges: the set bits below s; centres 12 + j: j, the base of the
    centres being separate).
    """
    cross = np.zeros(256, np.int64)
    for case in range(256):
        for e, (lo, hi, _) in enumerate(_EDGES):
            if ((case >> lo) ^ (case >> hi)) & 1:
                cross[case] |= 1 << e
    own_mask = np.zeros(8, np.int64)
    slot_off = np.zeros((8, 16, 3), np.int64)
    slot_own = np.zeros((8, 16), np.int64)
    edge_by = {(lo, a): e for e, (lo, _, a) in enumerate(_EDGES)}
    for u in range(8):
        for e, (lo, _, a) in enumerate(_EDGES):
            off = CORNER_OFFSETS[lo]
            if all(off[k] == 0 or (u >> k) & 1 for k in range(3)):
                own_mask[u] |= 1 << e
            # on an upper face the end point lies past the last cell: the owner stays, one corner up
            d = tuple(off[k] if (u >> k) & 1 else 0 for k in range(3))
            slot_off[u, e] = [off[k] - d[k] for k in range(3)]
            slot_own[u, e] = edge_by[(d[0] | d[1] << 1 | d[2] << 2, a)]
        slot_own[u, 12:] = np.arange(12, 16)
    amb = np.zeros(256, np.int64)  # bit f: face f has its outside corners on one diagonal (ambiguous)
    for case in range(256):
        for f, (_, _, cyc) in enumerate(_FACES):
            s = [(case >> q) & 1 for q in cyc]
            if s[0] == s[2] and s[1] == s[3] and s[0] != s[1]:
                amb[case] |= 1 << f
    bits = (np.arange(4096)[:, None] >> np.arange(12)) & 1
    rank16 = np.concatenate((np.cumsum(bits, 1) - bits, np.tile(np.arange(4), (4096, 1))), 1)  # (4096, 16)
    return dict(cross12=torch.from_numpy(cross).to(device), ambiguous6=torch.from_numpy(amb).to(device),
                own_mask=torch.from_numpy(own_mask).to(device),
                slot_off=torch.from_numpy(slot_off).to(device), slot_own=torch.from_numpy(slot_own).to(device),
                rank16=torch.from_numpy(rank16.astype(np.int32)).reshape(-1).to(device))


_TABLE_CACHE: dict = {}


def tables(device) -> dict:
    """The case tables and corner / edge / face numbering as tensors on ``device`` (cached).

    corner (8, 3) offsets; edge_lo / edge_hi / edge_axis (12,); face_cyc (6, 4) corners of
    each cube face in cyclic order; tris (256 * 64, 12, 3) triangle slots per (case, decider
    bits), -1 padded; members (256 * 64, 4, 12) edges of each loop-centre vertex; ntri,
    ncentre counts; edge_by (8, 3) edge id of (lower corner, axis) or -1; popcount12, rank12,
    nth_edge12: the bits of 12-bit edge masks; subsets3, subset_count3: the non-empty subsets
    of 3-bit masks.
    """
    key = str(device)
    if key not in _TABLE_CACHE:
        tris, members = _tables_np()
        edges = torch.tensor(_EDGES, dtype=torch.int64)
        bits = (np.arange(4096)[:, None] >> np.arange(12)) & 1
        rank = np.concatenate((np.zeros((4096, 1), np.int64), np.cumsum(bits, 1)), 1)  # (4096, 13)
        _TABLE_CACHE[key] = dict(
            tris=torch.from_numpy(tris).to(device),
            members=torch.from_numpy(members).to(device),
            corner=torch.tensor(CORNER_OFFSETS, dtype=torch.int64, device=device),  # (8, 3)
            edge_lo=edges[:, 0].to(device),
            edge_hi=edges[:, 1].to(device),
            edge_axis=edges[:, 2].to(device),
            face_cyc=torch.tensor([f[2] for f in _FACES], dtype=torch.int64, device=device),  # (6, 4)
            ntri=torch.from_numpy((tris[:, :, 0] >= 0).sum(1)).to(device),  # (256 * 64,)
            ncentre=torch.from_numpy(members.any(2).sum(1)).to(device),
            bits8=1 << torch.arange(8, device=device),
            bits6=1 << torch.arange(6, device=device),
            bits12=1 << torch.arange(12, device=device),
            # popcount of a 12-bit mask (4096,) and rank of edge e among the set bits below it
            popcount12=torch.from_numpy(rank[:, 12]).to(device),
            rank12=torch.from_numpy(rank[:, :12]).contiguous().to(device),  # (4096, 12)
            # the edge of each rank among a 12-bit mask's set bits, at mask * 12 + rank (0 past the last)
            nth_edge12=torch.from_numpy(np.stack([np.pad(np.flatnonzero(row), (0, 12 - row.sum()))
                                                  for row in bits]).reshape(-1)).to(device),  # (4096 * 12,)
            # the non-empty subsets of each 3-bit mask c, ascending, at c * 7 + rank (0 past the last)
            subsets3=torch.tensor([[m for m in range(1, 8) if m & c == m] + [0] * (8 - 2 ** bin(c).count("1"))
                                   for c in range(8)], device=device).view(-1),  # (8 * 7,)
            subset_count3=torch.tensor([2 ** bin(c).count("1") - 1 for c in range(8)], device=device),  # (8,)
            # edges a cell owns given which of its axes touch the grid's upper faces (bits)
            own_by_up=torch.tensor([[all(CORNER_OFFSETS[lo][a] == 0 or (u >> a) & 1 for a in range(3))
                                     for lo, _, _ in _EDGES] for u in range(8)], device=device),  # (8, 12)
            edge_by=torch.tensor([[_EDGE_OF.get((c, c | (1 << a)), -1) for a in range(3)] for c in range(8)],
                                 device=device),  # (lower corner, axis) -> edge
            **_slot_tables(device),
        )
    return _TABLE_CACHE[key]
