"""Mesh and image metrics: topology (Euler characteristic, components, genus), Chamfer
distance, normal consistency (image space, the original's SVR metric; mesh space, an extra), IoU.

Meshes are verts (V, 3) float and faces (F, 3) int tensors or arrays.
"""
from __future__ import annotations

import numpy as np
import torch

from .ops.mesh import weld_vertices


def _np(a) -> np.ndarray:
    return a.detach().cpu().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def merge_vertices(verts, faces, decimals: int = 6) -> tuple[np.ndarray, np.ndarray]:
    """Weld vertices with equal coordinates (rounded to ``decimals``, default 6), e.g. along UV seams.

    Returns verts (V', 3) float64 and faces (F', 3) int64 numpy arrays, with the faces that became
    degenerate removed (``lib.ops.mesh.weld_vertices``, the one weld).
    """
    return weld_vertices(verts, faces, decimals=decimals, drop_degenerate=True)


def _face_tensor(faces) -> torch.Tensor:
    f = faces if isinstance(faces, torch.Tensor) else torch.as_tensor(np.asarray(faces))
    return f.reshape(-1, 3).long()


def topology(faces) -> tuple[int, int, int]:
    """(Euler characteristic, connected components, genus) of a triangle mesh's faces (F, 3).

    Works on the faces' device (no host copy of the mesh; a few scalar syncs).  Only
    vertices that faces use count, and vertices are taken as shared by index: meshes from
    marching cubes share them already, downloaded meshes may need ``merge_vertices``
    first (``genus`` does it).  chi = V - E + F; components: faces sharing a vertex are
    connected; genus = (2 * components - chi) / 2, i.e. the sum over closed components of
    (2 - chi_c) / 2 (sphere 0, torus 1).  An empty mesh gives (0, 0, 0).
    """
    f = _face_tensor(faces)
    if f.shape[0] == 0:
        return 0, 0, 0
    # the used vertices, renumbered 0..n-1 in order (a mask and a running count: cheaper than
    # torch.unique's sort)
    used = torch.zeros(int(f.max()) + 1, dtype=torch.bool, device=f.device)
    used[f.reshape(-1)] = True
    number = torch.cumsum(used, 0) - 1
    n = int(number[-1]) + 1
    g = number.index_select(0, f.reshape(-1)).view(-1, 3)
    a, b = g.reshape(-1), g.roll(-1, dims=1).reshape(-1)          # edges (0,1), (1,2), (2,0)
    keys = torch.unique(torch.minimum(a, b) * n + torch.maximum(a, b))   # undirected edges, once each
    chi = n - int(keys.shape[0]) + int(f.shape[0])
    comps = _count_components(torch.div(keys, n, rounding_mode="floor"), keys % n, n)
    return chi, comps, int(round((2 * comps - chi) / 2))


def _count_components(a: torch.Tensor, b: torch.Tensor, n: int) -> int:
    """Connected components of the graph with edges (a_i, b_i) over vertices 0..n-1.

    Minimum-label propagation with hooking onto the current labels and pointer jumping:
    labels only decrease and stay inside their component, so the fixed point labels every
    vertex with the smallest index of its component; a few rounds, each one sync.
    """
    lab = torch.arange(n, device=a.device)
    while True:
        la, lb = lab[a], lab[b]
        m = torch.minimum(la, lb)
        new = lab.clone()
        for idx in (a, b, la, lb):                               # hook the ends and their roots
            new.scatter_reduce_(0, idx, m, "amin")
        for _ in range(4):                                       # pointer jumping
            new = new[new]
        if torch.equal(new, lab):
            break
        lab = new
    return int((lab == torch.arange(n, device=a.device)).sum())


def euler_characteristic(verts, faces) -> int:
    """V - E + F of the mesh, counting only vertices used by faces (see ``topology``)."""
    return topology(faces)[0]


def connected_components(faces) -> int:
    """Number of face-connected components (faces sharing a vertex are connected)."""
    return topology(faces)[1]


def genus(verts, faces, merge: bool = True) -> int:
    """Total genus of a closed triangle mesh: sum over components of (2 - chi_c) / 2.

    With ``merge`` the vertices are welded first (seams of downloaded meshes).  For one
    closed component: sphere 0, torus 1.  A mesh with several components returns
    (2 * components - chi) / 2 (see ``topology``).
    """
    if merge:
        faces = merge_vertices(verts, faces)[1]
    return topology(faces)[2]


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
    # one gather of the (F, 3, 3) corners: cheaper than three strided column gathers, same values
    a, b, c = verts.index_select(0, faces.reshape(-1)).view(-1, 3, 3).unbind(1)
    cross = torch.linalg.cross(b - a, c - a, dim=1)
    area = cross.norm(dim=1)
    # draws happen on the generator's device (torch refuses a CPU generator for CUDA
    # tensors), so one seed gives the same samples whatever device the mesh is on
    gdev = generator.device if generator is not None else verts.device
    idx = torch.multinomial(area.double().to(gdev) + 1e-30, n, replacement=True, generator=generator).to(verts.device)
    uv = torch.rand(n, 2, generator=generator, dtype=verts.dtype, device=gdev).to(verts.device)
    flip = uv.sum(1) > 1  # reflect into the triangle: uniform over its area
    uv = torch.where(flip[:, None], 1 - uv, uv)
    # each sampled corner gathered once, by index_select (advanced indexing is slower on the CPU)
    pa, pb, pc = (t.index_select(0, idx) for t in (a, b, c))
    pts = pa + uv[:, :1] * (pb - pa) + uv[:, 1:] * (pc - pa)
    if not return_normals:
        return pts
    return pts, cross.index_select(0, idx) / area.index_select(0, idx).clamp_min(1e-30).unsqueeze(1)


def seeded_generator(seed: int, device=None) -> torch.Generator:
    """A torch.Generator on ``device`` (default CPU) seeded with ``seed``."""
    return torch.Generator(device=torch.device(device) if device is not None else "cpu").manual_seed(int(seed))


class PointReference:
    """A fixed point set (R, 3) prepared once for many nearest-neighbour queries.

    On the CPU a KD-tree (built here, once) and ``order``, its points' order along the tree's
    leaves (R,) int64 numpy (None elsewhere); on other devices the points stay there and
    queries run as chunked ``torch.cdist`` (no host round trip for the distances).
    """

    # points per KD-tree leaf: surface samples are searched with fewer node visits in larger
    # leaves than scipy's default 16; the distances found are the same for any leaf size
    LEAF_SIZE = 64

    def __init__(self, points: torch.Tensor, chunk: int = 4096):
        self.points = torch.as_tensor(points).detach()
        self.chunk = int(chunk)
        self.tree = None
        self.order = None
        if self.points.device.type == "cpu":
            from scipy.spatial import cKDTree

            self.tree = cKDTree(self.points.double().numpy(), leafsize=self.LEAF_SIZE)
            self.order = self.tree.indices

    def squared_distances(self, query: torch.Tensor, workers: int = -1, order=None) -> torch.Tensor:
        """Squared distance from each query point to its nearest reference point.

        Args:
            query: (Q, 3) points.
            workers: the KD-tree query's threads (default -1: every core; the same distances
                for any count).
            order: None, or a permutation (Q,) int64 numpy of the query rows in which the KD-tree
                runs them, e.g. the ``order`` of a PointReference of the query points: queries
                near one another in turn walk the same nodes, which are then in cache (ignored
                off the CPU).  The distances are the same, row for row.
        Returns:
            (Q,) float64 on the query's device, in the query's row order.
        """
        query = torch.as_tensor(query).detach()
        if self.tree is not None:
            q = query.cpu().double().numpy()
            if order is None:
                d, _ = self.tree.query(q, k=1, workers=workers)
            else:
                d = np.empty(q.shape[0])
                d[order] = self.tree.query(q[order], k=1, workers=workers)[0]
            return torch.from_numpy(d ** 2).to(query.device)
        ref = self.points.to(device=query.device, dtype=torch.float64)
        q = query.double()
        return torch.cat([torch.cdist(q[i:i + self.chunk], ref).amin(1).square()
                          for i in range(0, len(q), self.chunk)])


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


def mesh_chamfer(verts_a, faces_a, verts_b, faces_b, n: int = 10000, squared: bool = True, seed: int = 0) -> float:
    """Chamfer distance between two meshes from ``n`` area-weighted surface samples each (seeded)."""
    g = torch.Generator().manual_seed(seed)
    pa = sample_surface(torch.as_tensor(_np(verts_a)).float(), torch.as_tensor(_np(faces_a)), n, g)
    pb = sample_surface(torch.as_tensor(_np(verts_b)).float(), torch.as_tensor(_np(faces_b)), n, g)
    return chamfer_distance(pa, pb, squared=squared)


# pytorch3d's depth (zbuf) where no face is seen: the original's depth maps hold it beyond the silhouette
BACKGROUND_DEPTH = -1.0


def depth_normals(depth: torch.Tensor, mask: torch.Tensor, focal, principal) -> tuple[torch.Tensor, torch.Tensor]:
    """Camera-frame normals of a depth map, from unprojected pixels and their right / down neighbours.

    depth (H, W): camera-space z of the visible surface; mask (H, W) bool: pixels that see
    it; focal (fx, fy) and principal (cx, cy) in pixels (pixel (i, j) has its centre at
    (j + 0.5, i + 0.5)).  As the original: uncovered pixels hold BACKGROUND_DEPTH; each pixel
    is unprojected to P = ((u - cx) z / fx, (v - cy) z / fy, z) and the normal at (i, j) is
    normalize((P[i, j+1] - P[i, j]) x (P[i+1, j] - P[i, j])), the neighbours taken as they
    are, so a covered pixel next to the silhouette edge counts with the normal its
    background neighbour gives it.  Returns normals (H, W, 3) and valid (H, W) bool (the
    pixel in ``mask``; the last row and column, which have no neighbour, never valid).
    Camera frame: x right, y down, z forward; right x down points away from the camera
    (n_z > 0 for a surface facing it), the same orientation for every depth map, so signed
    cosines compare geometry.
    """
    n = depth_normal_field(depth, mask, focal, principal)
    valid = torch.zeros_like(mask, dtype=torch.bool)
    valid[:-1, :-1] = mask.bool()[:-1, :-1]
    return torch.where(valid[..., None], n, torch.zeros_like(n)), valid


def depth_normal_field(depth: torch.Tensor, mask: torch.Tensor, focal, principal) -> torch.Tensor:
    """The normals of ``depth_normals`` at every pixel (H, W, 3), background pixels included (the
    normal of the BACKGROUND_DEPTH plane there); 0 on the last row and column."""
    H, W = depth.shape
    dt = depth.dtype if depth.is_floating_point() else torch.float64
    m = mask.bool()
    z = torch.where(m, depth.to(dt), torch.full_like(depth, BACKGROUND_DEPTH, dtype=dt))
    f = torch.as_tensor(focal, dtype=dt, device=z.device).reshape(-1).expand(2)
    c = torch.as_tensor(principal, dtype=dt, device=z.device).reshape(-1).expand(2)
    v, u = torch.meshgrid(torch.arange(H, device=z.device, dtype=dt) + 0.5,
                          torch.arange(W, device=z.device, dtype=dt) + 0.5, indexing="ij")
    P = torch.stack([(u - c[0]) * z / f[0], (v - c[1]) * z / f[1], z], -1)        # (H, W, 3)
    right = torch.zeros_like(P)
    down = torch.zeros_like(P)
    right[:, :-1] = P[:, 1:] - P[:, :-1]
    down[:-1] = P[1:] - P[:-1]
    return torch.nn.functional.normalize(torch.cross(right, down, dim=-1), dim=-1, eps=1e-30)


def image_normal_consistency(normals_a: torch.Tensor, valid_a: torch.Tensor, normals_b: torch.Tensor,
                             valid_b: torch.Tensor) -> float:
    """Mean SIGNED cosine between two normal images (H, W, 3) over the pixels valid in both (H, W).

    The original's SVR normal consistency (reported x100): a surface seen from the wrong
    side counts against it.  NaN when no pixel is valid in both.
    """
    both = valid_a.bool() & valid_b.to(valid_a.device).bool()
    if not bool(both.any()):
        return float("nan")
    a = torch.nn.functional.normalize(normals_a[both].double(), dim=-1)
    b = torch.nn.functional.normalize(normals_b.to(normals_a.device)[both].double(), dim=-1)
    return float((a * b).sum(-1).mean())


def mesh_normal_consistency(verts_a, faces_a, verts_b, faces_b, n: int = 10000, seed: int = 0) -> float:
    """Mesh-space normal consistency (our extra, not the original's): mean |cos| between the face
    normals of surface samples of A and of their nearest samples of B, symmetrised, in [0, 1]."""
    g = torch.Generator().manual_seed(seed)
    pa, na = sample_surface(torch.as_tensor(_np(verts_a)).double(), torch.as_tensor(_np(faces_a)), n, g, True)
    pb, nb = sample_surface(torch.as_tensor(_np(verts_b)).double(), torch.as_tensor(_np(faces_b)), n, g, True)
    _, ia = nearest_neighbors(pa, pb)
    _, ib = nearest_neighbors(pb, pa)
    ab = (na * nb[torch.from_numpy(ia)]).sum(1).abs().mean()
    ba = (nb * na[torch.from_numpy(ib)]).sum(1).abs().mean()
    return float((ab + ba) / 2)


def silhouette_iou(a, b, threshold: float = 0.5) -> float:
    """Intersection over union of two silhouettes (H, W) in [0, 1], binarised at ``threshold``.

    Tensors are compared on their own device (only the result comes back to the host, one sync).
    """
    ta = a.detach() if isinstance(a, torch.Tensor) else torch.as_tensor(_np(a))
    tb = b.detach().to(ta.device) if isinstance(b, torch.Tensor) else torch.as_tensor(_np(b), device=ta.device)
    ma, mb = ta > threshold, tb > threshold
    inter, union = (ma & mb).sum().double(), (ma | mb).sum().double()
    return float(torch.where(union > 0, inter / union.clamp_min(1), 1.0))
