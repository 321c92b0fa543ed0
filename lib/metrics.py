"""Mesh and image metrics: genus, Chamfer distance, normal consistency, IoU.

Meshes are verts (V, 3) float and faces (F, 3) int tensors or arrays.
"""
from __future__ import annotations

import numpy as np
import torch


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def merge_vertices(verts, faces, decimals: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Weld vertices with equal coordinates (rounded to ``decimals``), e.g. along UV seams.

    Returns verts (V', 3) and faces (F', 3) with faces that became degenerate removed.
    """
    v = _np(verts).astype(np.float64)
    f = _np(faces).astype(np.int64)
    _, first, inverse = np.unique(np.round(v, decimals), axis=0, return_index=True, return_inverse=True)
    f = inverse.reshape(-1)[f]
    keep = (f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])
    return v[first], f[keep]


def euler_characteristic(verts, faces) -> int:
    """V - E + F of the mesh, counting only vertices used by faces."""
    f = _np(faces).astype(np.int64).reshape(-1, 3)
    if len(f) == 0:
        return 0
    nv = len(np.unique(f))
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    ne = len(np.unique(edges, axis=0))
    return int(nv - ne + len(f))


def connected_components(faces) -> int:
    """Number of face-connected components (faces sharing a vertex are connected)."""
    from scipy.sparse import coo_matrix
    from scipy.sparse.csgraph import connected_components as cc

    f = _np(faces).astype(np.int64).reshape(-1, 3)
    if len(f) == 0:
        return 0
    used, g = np.unique(f, return_inverse=True)
    g = g.reshape(-1, 3)
    rows = np.concatenate([g[:, 0], g[:, 1]])
    cols = np.concatenate([g[:, 1], g[:, 2]])
    adj = coo_matrix((np.ones(len(rows)), (rows, cols)), shape=(len(used), len(used)))
    return int(cc(adj, directed=False)[0])


def genus(verts, faces, merge: bool = True) -> int:
    """Total genus of a closed triangle mesh: sum over components of (2 - chi_c) / 2.

    With ``merge`` the vertices are welded first (seams of downloaded meshes).  For one
    closed component: sphere 0, torus 1.  A mesh with several components returns
    (2 * components - chi) / 2.
    """
    v, f = merge_vertices(verts, faces) if merge else (_np(verts), _np(faces))
    if len(f) == 0:
        return 0
    chi = euler_characteristic(v, f)
    return int(round((2 * connected_components(f) - chi) / 2))
