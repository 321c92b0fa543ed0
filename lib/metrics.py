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


def sample_surface(verts: torch.Tensor, faces: torch.Tensor, n: int, generator: torch.Generator | None = None,
                   return_normals: bool = False):
    """Area-weighted uniform samples on a triangle mesh.

    verts (V, 3) float, faces (F, 3) int64 tensors (any device); ``generator`` on any
    device.  Returns points (n, 3) on the mesh's device and, with ``return_normals``, unit
    face normals (n, 3) of the sampled faces.
    """
    verts = torch.as_tensor(verts)
    faces = torch.as_tensor(faces, dtype=torch.int64, device=verts.device)
    if faces.numel() == 0:
        raise ValueError("cannot sample an empty mesh")
    a, b, c = verts[faces[:, 0]], verts[faces[:, 1]], verts[faces[:, 2]]
    cross = torch.cross(b - a, c - a, dim=1)
    area = cross.norm(dim=1)
    # draws happen on the generator's device (torch refuses a CPU generator for CUDA
    # tensors), so one seed gives the same samples whatever device the mesh is on
    gdev = generator.device if generator is not None else verts.device
    idx = torch.multinomial(area.double().to(gdev) + 1e-30, n, replacement=True, generator=generator).to(verts.device)
    uv = torch.rand(n, 2, generator=generator, dtype=verts.dtype, device=gdev).to(verts.device)
    flip = uv.sum(1) > 1  # reflect into the triangle: uniform over its area
    uv[flip] = 1 - uv[flip]
    pts = a[idx] + uv[:, :1] * (b[idx] - a[idx]) + uv[:, 1:] * (c[idx] - a[idx])
    if not return_normals:
        return pts
    return pts, cross[idx] / area[idx].clamp_min(1e-30).unsqueeze(1)


def nearest_neighbors(query, reference) -> tuple[np.ndarray, np.ndarray]:
    """For each query point (Q, 3) its nearest reference point (R, 3): (distances (Q,), indices (Q,))."""
    from scipy.spatial import cKDTree

    d, i = cKDTree(_np(reference).astype(np.float64)).query(_np(query).astype(np.float64), k=1, workers=-1)
    return d, i


def chamfer_distance(points_a, points_b, squared: bool = True) -> float:
    """Symmetric Chamfer distance between point sets (A, 3) and (B, 3).

    ``squared=True`` (the DeepSDF/MeshSDF convention): mean_a min_b |a-b|^2 + mean_b min_a |a-b|^2.
    ``squared=False`` (Chamfer-L1): the mean of the two directed mean distances,
    (mean_a min_b |a-b| + mean_b min_a |a-b|) / 2, in the units of the points.
    """
    da, _ = nearest_neighbors(points_a, points_b)
    db, _ = nearest_neighbors(points_b, points_a)
    if squared:
        return float((da ** 2).mean() + (db ** 2).mean())
    return float((da.mean() + db.mean()) / 2)


def mesh_chamfer(verts_a, faces_a, verts_b, faces_b, n: int = 30000, squared: bool = True, seed: int = 0) -> float:
    """Chamfer distance between two meshes from ``n`` area-weighted surface samples each."""
    g = torch.Generator().manual_seed(seed)
    pa = sample_surface(torch.as_tensor(_np(verts_a)).float(), torch.as_tensor(_np(faces_a)), n, g)
    pb = sample_surface(torch.as_tensor(_np(verts_b)).float(), torch.as_tensor(_np(faces_b)), n, g)
    return chamfer_distance(pa, pb, squared=squared)


def normal_consistency(normals_a, normals_b, mask=None) -> float:
    """Mean absolute cosine between two normal maps (H, W, 3) over ``mask`` (H, W) bool.

    Used on rendered normal images of a prediction and the ground truth from the same camera;
    ``mask`` defaults to the pixels where both maps are non-zero.  Returns a value in [0, 1].
    """
    na = torch.as_tensor(_np(normals_a)).double()
    nb = torch.as_tensor(_np(normals_b)).double()
    if mask is None:
        mask = (na.norm(dim=-1) > 0) & (nb.norm(dim=-1) > 0)
    mask = torch.as_tensor(_np(mask)).bool()
    if not mask.any():
        return 0.0
    a = torch.nn.functional.normalize(na[mask], dim=-1)
    b = torch.nn.functional.normalize(nb[mask], dim=-1)
    return float((a * b).sum(-1).abs().mean())


def mesh_normal_consistency(verts_a, faces_a, verts_b, faces_b, n: int = 30000, seed: int = 0) -> float:
    """Mean |cos| between normals of surface samples of A and of their nearest samples of B, symmetrised."""
    g = torch.Generator().manual_seed(seed)
    pa, na = sample_surface(torch.as_tensor(_np(verts_a)).double(), torch.as_tensor(_np(faces_a)), n, g, True)
    pb, nb = sample_surface(torch.as_tensor(_np(verts_b)).double(), torch.as_tensor(_np(faces_b)), n, g, True)
    _, ia = nearest_neighbors(pa, pb)
    _, ib = nearest_neighbors(pb, pa)
    ab = (na * nb[torch.from_numpy(ia)]).sum(1).abs().mean()
    ba = (nb * na[torch.from_numpy(ib)]).sum(1).abs().mean()
    return float((ab + ba) / 2)


def silhouette_iou(a, b, threshold: float = 0.5) -> float:
    """Intersection over union of two silhouettes (H, W) in [0, 1], binarised at ``threshold``."""
    ma = torch.as_tensor(_np(a)) > threshold
    mb = torch.as_tensor(_np(b)) > threshold
    union = int((ma | mb).sum())
    return int((ma & mb).sum()) / union if union > 0 else 1.0
