import math

import numpy as np
import torch

from lib.isosurface import extract_dense
from lib.metrics import (chamfer_distance, mesh_chamfer, mesh_normal_consistency, normal_consistency,
                         sample_surface, silhouette_iou)


def _brute_chamfer(a, b, squared):
    d = torch.cdist(torch.as_tensor(a, dtype=torch.float64), torch.as_tensor(b, dtype=torch.float64))
    da, db = d.min(1).values, d.min(0).values
    return float((da ** 2).mean() + (db ** 2).mean()) if squared else float((da.mean() + db.mean()) / 2)


def test_chamfer_matches_brute_force():
    g = torch.Generator().manual_seed(1)
    a, b = torch.rand(300, 3, generator=g), torch.rand(200, 3, generator=g) + 0.1
    for sq in (True, False):
        assert math.isclose(chamfer_distance(a, b, squared=sq), _brute_chamfer(a, b, sq), rel_tol=1e-9)
    assert chamfer_distance(a, a) == 0.0


def test_sample_surface_is_uniform_on_sphere_and_normals_outward():
    v, f = extract_dense(lambda p: p.norm(dim=1) - 0.5, 48)
    p, n = sample_surface(v, f, 20000, torch.Generator().manual_seed(0), return_normals=True)
    assert (p.norm(dim=1) - 0.5).abs().max() < 0.01
    assert ((n * p).sum(1) > 0.9 * 0.5).float().mean() > 0.99  # outward unit normals
    # area-weighted: octant counts are even for a sphere
    counts = torch.bincount(((p > 0).long() * torch.tensor([4, 2, 1])).sum(1), minlength=8).float()
    assert (counts / counts.mean() - 1).abs().max() < 0.08


def test_mesh_chamfer_of_concentric_spheres():
    va, fa = extract_dense(lambda p: p.norm(dim=1) - 0.5, 64)
    vb, fb = extract_dense(lambda p: p.norm(dim=1) - 0.6, 64)
    # every point is ~0.1 from the other sphere
    assert abs(mesh_chamfer(va, fa, vb, fb, n=5000, squared=False) - 0.1) < 0.005
    assert abs(mesh_chamfer(va, fa, vb, fb, n=5000, squared=True) - 2 * 0.01) < 0.002
    assert mesh_normal_consistency(va, fa, vb, fb, n=5000) > 0.99


def test_normal_consistency_images():
    n = torch.zeros(4, 4, 3)
    n[..., 2] = 1
    m = n.clone()
    m[:2] = torch.tensor([1.0, 0, 0])  # half the pixels perpendicular
    assert math.isclose(normal_consistency(n, n), 1.0)
    assert math.isclose(normal_consistency(n, m), 0.5)
    assert math.isclose(normal_consistency(n, -n), 1.0)  # orientation-free (absolute cosine)


def test_silhouette_iou():
    a = np.zeros((10, 10)); a[:5] = 1
    b = np.zeros((10, 10)); b[:, :5] = 1
    assert math.isclose(silhouette_iou(a, b), 25 / 75)
    assert silhouette_iou(a, a) == 1.0
