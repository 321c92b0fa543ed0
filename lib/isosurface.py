"""Marching cubes on signed distance functions sampled over the box [-1, 1]^3.

Grid convention: resolution N, origin (-1, -1, -1), voxel size 2 / (N - 1); grid value
[i, j, k] is the SDF at (-1 + i*h, -1 + j*h, -1 + k*h).  Meshes come back in world
coordinates as verts (V, 3) float32 and faces (F, 3) int64 torch tensors.

``sdf_fn`` everywhere is a callable mapping points (P, 3) to SDF values (P,) (e.g.
``lambda p: decoder.sdf(dec, latent, p)``); it is called under ``torch.no_grad()``.
"""
from __future__ import annotations

from typing import Callable

import numpy as np
import torch

SdfFn = Callable[[torch.Tensor], torch.Tensor]


def voxel_size(resolution: int) -> float:
    return 2.0 / (resolution - 1)


def grid_points(resolution: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """All grid points, (N^3, 3), in [i, j, k] C order (x slowest, z fastest)."""
    ax = torch.linspace(-1.0, 1.0, resolution, device=device, dtype=dtype)
    return torch.cartesian_prod(ax, ax, ax)


@torch.no_grad()
def dense_grid(sdf_fn: SdfFn, resolution: int, device=None, chunk: int = 2 ** 18) -> torch.Tensor:
    """SDF on the full N^3 grid: (N, N, N) float32 tensor on ``device``."""
    pts = grid_points(resolution, device=device)
    vals = torch.cat([sdf_fn(pts[s : s + chunk]).reshape(-1).float() for s in range(0, pts.shape[0], chunk)])
    return vals.reshape(resolution, resolution, resolution)


def marching_cubes(values, level: float = 0.0) -> tuple[torch.Tensor, torch.Tensor]:
    """scikit-image (Lewiner) marching cubes on an (N, N, N) grid, mapped to world coordinates.

    Returns verts (V, 3) float32 and faces (F, 3) int64 CPU tensors, both empty when the
    level set does not cross the grid.  Faces are wound so that normals point to SDF > 0
    (outside).
    """
    from skimage import measure

    vol = values.detach().cpu().numpy() if isinstance(values, torch.Tensor) else np.asarray(values)
    vol = vol.astype(np.float32, copy=False)
    n = vol.shape[0]
    if not (vol.min() < level < vol.max()):
        return torch.zeros(0, 3), torch.zeros(0, 3, dtype=torch.int64)
    verts, faces, _, _ = measure.marching_cubes(vol, level=level, spacing=(voxel_size(n),) * 3)
    verts = verts - 1.0
    # skimage's default ("descent") winding already gives normals towards increasing
    # values, i.e. outwards for an SDF; tests pin this.
    return torch.from_numpy(np.ascontiguousarray(verts, dtype=np.float32)), torch.from_numpy(
        np.ascontiguousarray(faces, dtype=np.int64))


def extract_dense(sdf_fn: SdfFn, resolution: int = 128, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesh of the zero level set from the full grid: verts (V, 3), faces (F, 3) on CPU."""
    return marching_cubes(dense_grid(sdf_fn, resolution, device=device))
