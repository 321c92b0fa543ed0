import math

import pytest

import numpy as np
import torch

from lib.isosurface import extract_dense
from lib.metrics import (PointReference, chamfer_distance, depth_normals, image_normal_consistency, mesh_chamfer,
                         mesh_normal_consistency, sample_surface, seeded_generator, silhouette_iou)


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


def test_sample_surface_draws_the_documented_stream():
    """The samples are the area-weighted draw written out plainly (per-corner gathers, face
    areas, one multinomial, then the (u, v) pairs of the same generator): the per-step
    Chamfer of the SVR logs depends on this stream staying the same."""
    v, f = extract_dense(lambda p: (p * torch.tensor([1.0, 0.7, 0.5])).norm(dim=1) - 0.6, 20)
    got = sample_surface(v, f, 3000, seeded_generator(1))
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    g = seeded_generator(1)
    idx = torch.multinomial(torch.cross(b - a, c - a, dim=1).norm(dim=1).double() + 1e-30, 3000, replacement=True,
                            generator=g)
    uv = torch.rand(3000, 2, generator=g)
    uv = torch.where((uv.sum(1) > 1)[:, None], 1 - uv, uv)
    assert torch.equal(got, a[idx] + uv[:, :1] * (b[idx] - a[idx]) + uv[:, 1:] * (c[idx] - a[idx]))


def test_mesh_chamfer_of_concentric_spheres():
    va, fa = extract_dense(lambda p: p.norm(dim=1) - 0.5, 64)
    vb, fb = extract_dense(lambda p: p.norm(dim=1) - 0.6, 64)
    # every point is 0.1 from the other sphere: squared means 0.01 each way, summed
    assert abs(mesh_chamfer(va, fa, vb, fb, squared=False) - 0.1) < 0.005
    assert abs(mesh_chamfer(va, fa, vb, fb, squared=True) - 2 * 0.01) < 0.002
    assert mesh_chamfer(va, fa, vb, fb) == mesh_chamfer(va, fa, vb, fb)      # 10,000 seeded samples
    assert mesh_normal_consistency(va, fa, vb, fb, n=5000) > 0.99


def test_point_reference_matches_brute_force():
    g = seeded_generator(3)
    ref, q = torch.rand(5000, 3, generator=g), torch.rand(300, 3, generator=g)   # a tree many leaves deep
    expect = torch.cdist(q.double(), ref.double()).min(1).values.square()
    assert torch.allclose(PointReference(ref).squared_distances(q), expect)
    chunked = PointReference(ref, chunk=64)
    chunked.tree = None      # the path used off the CPU: chunked cdist
    assert torch.allclose(chunked.squared_distances(q), expect)


def test_point_reference_queries_in_a_given_order_return_rows_in_query_order():
    g = seeded_generator(4)
    ref, q = PointReference(torch.rand(4000, 3, generator=g)), torch.rand(3000, 3, generator=g)
    order = PointReference(q).order            # the queries' own tree's leaf order: not the identity
    assert sorted(order.tolist()) == list(range(3000)) and (order != np.arange(3000)).any()
    plain = ref.squared_distances(q)
    assert torch.equal(ref.squared_distances(q, order=order), plain)    # bit for bit, row for row
    assert torch.equal(ref.squared_distances(q, workers=1, order=order[::-1].copy()), plain)


def _plane(angle_deg: float, depth: float = 3.0):
    """A square of half-size 1 facing the camera at z = depth, tilted by ``angle`` about the x axis."""
    a = math.radians(angle_deg)
    corners = torch.tensor([[-1.0, -1.0], [1.0, -1.0], [1.0, 1.0], [-1.0, 1.0]], dtype=torch.float64)
    y, z = corners[:, 1] * math.cos(a), depth + corners[:, 1] * math.sin(a)
    return torch.stack([corners[:, 0], y, z], 1), torch.tensor([[0, 1, 2], [0, 2, 3]])


def test_image_normal_consistency_of_planes():
    from lib.render import Camera, rasterize

    cam = Camera(torch.eye(3, dtype=torch.float64), torch.zeros(3, dtype=torch.float64), (40.0, 40.0),
                 (16.0, 16.0), 32)

    def normals(angle):
        v, f = _plane(angle)
        fr = rasterize(v, f, cam)
        return depth_normals(fr.depth, fr.mask, (40.0, 40.0), (16.0, 16.0))

    def interior(m):   # pixels whose right and down neighbours are covered too
        out = torch.zeros_like(m)
        out[:-1, :-1] = m[:-1, :-1] & m[:-1, 1:] & m[1:, :-1]
        return out

    n0, m0 = normals(0.0)
    i0 = interior(m0)
    assert i0.sum() > 300 and torch.allclose(n0[i0], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-9)
    assert image_normal_consistency(n0, m0, n0, m0) == pytest.approx(1.0)
    for angle in (20.0, 50.0):
        n1, m1 = normals(angle)
        i1 = interior(m1)
        assert image_normal_consistency(n0, i0, n1, i1) == pytest.approx(math.cos(math.radians(angle)), abs=1e-9)
        # the pixels next to the edge count too, with normals from the background depth: lower
        assert image_normal_consistency(n0, m0, n1, m1) < math.cos(math.radians(angle)) - 1e-3
    # signed: a normal field that points the other way counts -1
    assert image_normal_consistency(n0, m0, -n0, m0) == pytest.approx(-1.0)
    assert math.isnan(image_normal_consistency(n0, m0, n0, torch.zeros_like(m0)))


def test_depth_normals_count_the_pixels_next_to_the_silhouette_edge():
    """As the original: a pixel counts when covered; its right / down differences use the depth map
    as it is, i.e. pytorch3d's background depth -1 beyond the silhouette edge."""
    depth = torch.zeros(8, 8, dtype=torch.float64)
    mask = torch.zeros(8, 8, dtype=torch.bool)
    mask[2:6, 2:6] = True
    depth[mask] = 2.0
    f, c = (10.0, 12.0), (4.0, 3.5)
    n, valid = depth_normals(depth, mask, f, c)
    assert torch.equal(valid, mask)
    assert torch.allclose(n[2:5, 2:5], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-12)

    def unproject(i, j, z):
        return torch.tensor([(j + 0.5 - c[0]) * z / f[0], (i + 0.5 - c[1]) * z / f[1], z], dtype=torch.float64)

    for i, j in ((5, 3), (3, 5), (5, 5)):
        p = unproject(i, j, 2.0)
        right = unproject(i, j + 1, 2.0 if mask[i, j + 1] else -1.0) - p
        down = unproject(i + 1, j, 2.0 if mask[i + 1, j] else -1.0) - p
        expect = torch.nn.functional.normalize(torch.cross(right, down, dim=0), dim=0)
        assert torch.allclose(n[i, j], expect, atol=1e-12), (i, j)
        assert not torch.allclose(n[i, j], torch.tensor([0.0, 0.0, 1.0], dtype=torch.float64), atol=1e-3)


def test_silhouette_iou():
    a = np.zeros((10, 10))
    a[:5] = 1
    b = np.zeros((10, 10))
    b[:, :5] = 1
    assert silhouette_iou(a, b) == 25 / 75        # the counts' quotient, as the host divides them
    assert silhouette_iou(a, a) == 1.0
    assert silhouette_iou(np.zeros((4, 4)), np.zeros((4, 4))) == 1.0     # both empty: equal
