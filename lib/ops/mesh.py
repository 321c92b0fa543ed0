"""Mesh utilities without policy: the one vertex weld.

Meshes are verts (V, 3) float and faces (F, 3) int, as torch tensors or numpy arrays.
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["weld_vertices"]


def _numpy(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def weld_vertices(verts, faces, decimals: int | None = None, drop_degenerate: bool = False
                  ) -> tuple[np.ndarray, np.ndarray]:
    """Merge vertices with equal coordinates into one and re-index the faces.

    Args:
        verts: (V, 3) float, tensor or array (any device).
        faces: (F, 3) int indices into ``verts``.
        decimals: coordinates are compared rounded to this many decimals (e.g. 6 for the
            seams of downloaded meshes); None (default): compared exactly.
        drop_degenerate: remove faces that end up using one vertex twice (default False:
            every face is kept, in order).

    Returns:
        verts (V', 3) float64 numpy: one vertex per distinct (rounded) position, in
        lexicographic order of the compared coordinates, each at the unrounded position of
        its first occurrence; faces (F', 3) int64 numpy, F' = F unless ``drop_degenerate``.
    """
    v = _numpy(verts).astype(np.float64)
    f = _numpy(faces).astype(np.int64).reshape(-1, 3)
    key = v if decimals is None else np.round(v, decimals)
    _, first, inverse = np.unique(key, axis=0, return_index=True, return_inverse=True)
    f = inverse.reshape(-1)[f]
    if drop_degenerate:
        f = f[(f[:, 0] != f[:, 1]) & (f[:, 1] != f[:, 2]) & (f[:, 0] != f[:, 2])]
    return v[first], f
