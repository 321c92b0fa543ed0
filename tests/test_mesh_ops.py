"""The one vertex weld (lib.ops.mesh.weld_vertices)."""
import numpy as np
import torch

from lib.ops.mesh import weld_vertices


def split_cube():
    """A unit cube as 6 separately indexed quads: 24 vertices (each corner 3 times), 12 faces."""
    corners = np.array([[i & 1, (i >> 1) & 1, (i >> 2) & 1] for i in range(8)], dtype=np.float32)
    quads = [(0, 2, 6, 4), (1, 5, 7, 3), (0, 4, 5, 1), (2, 3, 7, 6), (0, 1, 3, 2), (4, 6, 7, 5)]
    verts, faces = [], []
    for q in quads:
        base = len(verts)
        verts += [corners[c] for c in q]
        faces += [(base, base + 1, base + 2), (base, base + 2, base + 3)]
    return np.array(verts), np.array(faces, dtype=np.int64)


def test_weld_shares_coincident_vertices_and_keeps_every_triangle_in_place():
    v, f = split_cube()
    wv, wf = weld_vertices(torch.from_numpy(v), torch.from_numpy(f))
    assert wv.shape == (8, 3) and wf.shape == (12, 3)
    assert wv.dtype == np.float64 and wf.dtype == np.int64
    np.testing.assert_array_equal(wv[wf], v[f])  # same triangles, same corner order
    assert np.array_equal(wv, np.unique(v, axis=0))  # lexicographic order of positions
    # closed surface once welded: every edge is shared by exactly two faces
    e = np.sort(np.concatenate([wf[:, [0, 1]], wf[:, [1, 2]], wf[:, [2, 0]]]), 1)
    _, count = np.unique(e, axis=0, return_counts=True)
    assert (count == 2).all()


def test_weld_rounding_and_degenerate_faces():
    v, f = split_cube()
    v = v.astype(np.float64)
    v[1] += 1e-9  # a seam vertex a rounding error away from its copies
    assert weld_vertices(v, f)[0].shape[0] == 9  # exact comparison keeps it apart
    wv, wf = weld_vertices(v, f, decimals=6)
    assert wv.shape[0] == 8
    assert (wv == v[1]).all(1).any()  # v[1] is its corner's first copy: kept unrounded
    assert (wv == np.round(wv)).all(1).sum() == 7
    # a sliver whose two corners coincide after rounding: kept by default, dropped on request
    v2 = np.concatenate([v, [[0.5, 0.5, 2.0], [0.5, 0.5, 2.0 + 1e-8]]])
    f2 = np.concatenate([f, [[0, 24, 25]]])
    assert weld_vertices(v2, f2, decimals=6)[1].shape[0] == 13
    wv, wf = weld_vertices(v2, f2, decimals=6, drop_degenerate=True)
    assert wf.shape[0] == 12 and wv.shape[0] == 9


def test_weld_of_an_empty_mesh():
    wv, wf = weld_vertices(np.zeros((0, 3)), np.zeros((0, 3), dtype=np.int64))
    assert wv.shape == (0, 3) and wf.shape == (0, 3)
