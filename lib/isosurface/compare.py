"""Mesh comparison up to vertex order: :func:`same_mesh` (what ``extract(verify=True)`` and the
tests use to check that two extractions gave the same mesh)."""
from __future__ import annotations

import numpy as np

from ..ops.mesh import weld_vertices

__all__ = ["same_mesh"]


def same_mesh(verts_a, faces_a, verts_b, faces_b, atol: float = 1e-5, triangles: bool = True
              ) -> tuple[bool, str]:
    """Whether two meshes are the same up to vertex order.

    Canonical comparison: coincident vertices are welded in each mesh
    (:func:`lib.ops.mesh.weld_vertices`), every vertex of A must have a distinct vertex of B
    within ``atol``, and the oriented triangles, each rotated to start at its smallest
    index, must be the same set.

    Args:
        verts_a, verts_b: (V, 3) float vertices, tensors or arrays (any device).
        faces_a, faces_b: (F, 3) int faces.
        atol: largest distance between matched vertices, world units (default 1e-5).
        triangles: compare the triangles too (default True); False compares the vertices and the
            face count only, for a mesher whose case tables split ambiguous cells its own way.

    Returns:
        (equal, reason): reason is "" when equal, else one line saying what differs.
    """
    from scipy.spatial import cKDTree  # only this comparison needs scipy: extraction itself runs on torch alone

    va, fa = weld_vertices(verts_a, faces_a)
    vb, fb = weld_vertices(verts_b, faces_b)
    if len(va) != len(vb) or len(fa) != len(fb):
        return False, f"sizes differ: {len(va)} vs {len(vb)} vertices, {len(fa)} vs {len(fb)} faces"
    if len(va) == 0:
        return True, ""
    dist, j = cKDTree(vb).query(va)
    if dist.max() > atol:
        return False, f"a vertex is {dist.max():.3g} away from the other mesh"
    if len(np.unique(j)) != len(j):
        return False, "vertices do not match one to one"
    if not triangles:
        return True, ""

    def canon(f):
        r = np.argmin(f, axis=1)
        f = np.stack([f[np.arange(len(f)), (r + k) % 3] for k in range(3)], 1)
        return f[np.lexsort(f.T[::-1])]

    if not np.array_equal(canon(j[fa]), canon(fb)):
        return False, "faces differ"
    return True, ""
