"""Analytic SDF primitives, composition, transforms and the built-in bob/spot stand-ins."""
import math

import numpy as np
import pytest
import torch

from lib.datasets import shapes as S
from lib.isosurface import dense_grid, marching_cubes
from lib.metrics import connected_components, genus
from lib.datasets.sampling import normalization

# ---------------------------------------------------------------- exactness of primitives


def _eikonal(shape, pts):
    """|grad f| at pts (P, 3) float64."""
    p = pts.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(shape(p).sum(), p)
    return g.norm(dim=-1)


EXACT = {
    "sphere": S.sphere(0.5, (0.1, 0.0, -0.2)),
    "box": S.box((0.3, 0.5, 0.2)),
    "rounded_box": S.rounded_box((0.3, 0.5, 0.2), 0.1),
    "capsule": S.capsule((-0.3, 0.1, 0.0), (0.4, -0.2, 0.3), 0.15),
    "cylinder": S.cylinder(0.3, 0.4, axis=2),
    "torus": S.torus(0.5, 0.15),
    "halfspace": S.halfspace((1.0, 2.0, -1.0), 0.2),
    "transformed": S.box((0.3, 0.2, 0.1)).rotate(S.rotation((1, 1, 0), 30)).translate((0.1, 0.2, 0.3)).scale(1.5),
    "elongated": S.sphere(0.2).elongate((0.3, 0.0, 0.1)),
}


@pytest.mark.parametrize("name", sorted(EXACT))
def test_exact_primitives_are_distance_functions(name):
    g = torch.Generator().manual_seed(0)
    pts = torch.rand(4000, 3, generator=g, dtype=torch.float64) * 2 - 1
    grad = _eikonal(EXACT[name], pts)
    # |grad| = 1 almost everywhere (medial axes have measure zero)
    assert (grad - 1).abs().lt(1e-6).float().mean() > 0.99


def test_known_values():
    p = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [1.0, 1.0, 0.0], [0.0, 0.7, 0.0]], dtype=torch.float64)
    assert torch.allclose(S.sphere(0.5)(p), torch.tensor([-0.5, 0.5, 2 ** 0.5 - 0.5, 0.2], dtype=torch.float64))
    box = S.box((0.5, 0.5, 0.5))(p)
    assert torch.allclose(box, torch.tensor([-0.5, 0.5, 0.5 * 2 ** 0.5, 0.2], dtype=torch.float64))
    # torus ring in x-z: centre of the hole is major - minor away from the tube surface
    tor = S.torus(0.6, 0.2)
    q = torch.tensor([[0.0, 0.0, 0.0], [0.6, 0.0, 0.0], [0.0, 0.0, -0.6], [0.6, 0.5, 0.0]], dtype=torch.float64)
    assert torch.allclose(tor(q), torch.tensor([0.4, -0.2, -0.2, 0.3], dtype=torch.float64))
    cap = S.capsule((0, -1, 0), (0, 1, 0), 0.25)(torch.tensor([[0.5, 0.0, 0.0], [0.0, 1.5, 0.0]]))
    assert torch.allclose(cap, torch.tensor([0.25, 0.25]))
    cyl = S.cylinder(0.5, 1.0, axis=0)(torch.tensor([[2.0, 0.0, 0.0], [0.0, 0.0, 0.8], [1.3, 0.9, 0.0]]))
    assert torch.allclose(cyl, torch.tensor([1.0, 0.3, 0.5]))
    rb = S.rounded_box((0.5, 0.5, 0.5), 0.2)(torch.tensor([[0.5, 0.0, 0.0], [1.0, 1.0, 1.0]]))
    assert torch.allclose(rb, torch.tensor([0.0, 0.7 * 3 ** 0.5 - 0.2]), atol=1e-6)


def test_ellipsoid_surface_and_sign():
    r = torch.tensor([0.5, 0.2, 0.3], dtype=torch.float64)
    d = torch.randn(1000, 3, dtype=torch.float64)
    d = d / d.norm(dim=-1, keepdim=True)
    on = d * r  # points (r * u) with |u| = 1 lie on the ellipsoid
    e = S.ellipsoid(r.tolist())
    assert e(on).abs().max() < 1e-12
    assert (e(on * 1.1) > 0).all() and (e(on * 0.9) < 0).all()


def test_transforms():
    p = torch.rand(500, 3, dtype=torch.float64) * 2 - 1
    box = S.box((0.4, 0.2, 0.1))
    # 90 degrees about y maps the x half-extent onto z
    rot = box.rotate(S.rotation((0, 1, 0), 90))
    assert torch.allclose(rot(p), S.box((0.1, 0.2, 0.4))(p), atol=1e-12)
    assert torch.allclose(box.translate((0.3, -0.1, 0.2))(p + torch.tensor([0.3, -0.1, 0.2], dtype=torch.float64)),
                          box(p))
    assert torch.allclose(S.sphere(0.25).scale(2.0)(p), S.sphere(0.5)(p))
    R = S.rotation((0.3, -1.0, 0.5), 37.0)
    assert torch.allclose(R @ R.T, torch.eye(3, dtype=torch.float64), atol=1e-12)
    assert abs(torch.linalg.det(R).item() - 1) < 1e-12
    # rotate moves the shape by R: a sphere at c lands at R c
    c = torch.tensor([0.5, 0.1, -0.2], dtype=torch.float64)
    moved = S.sphere(0.1, c.tolist()).rotate(R)
    assert abs(moved((R @ c)[None]).item() + 0.1) < 1e-12
    # mirror: a shape built at +x appears at -x too
    m = S.sphere(0.1, (0.5, 0.0, 0.0)).mirror(0)
    assert m(torch.tensor([[-0.5, 0.0, 0.0]])).item() == pytest.approx(-0.1)
    assert torch.allclose(S.sphere(0.3).round(0.1)(p), S.sphere(0.4)(p))


def test_booleans_and_smooth_blends():
    p = torch.rand(2000, 3, dtype=torch.float64) * 2 - 1
    a, b = S.sphere(0.4, (-0.2, 0, 0)), S.box((0.3, 0.3, 0.3)).translate((0.2, 0, 0))
    da, db = a(p), b(p)
    assert torch.equal((a | b)(p), torch.minimum(da, db))
    assert torch.equal((a & b)(p), torch.maximum(da, db))
    assert torch.equal((a - b)(p), torch.maximum(da, -db))
    k = 0.1
    su = S.smooth_union(a, b, k)(p)
    assert (su <= torch.minimum(da, db) + 1e-12).all()
    assert (su >= torch.minimum(da, db) - k / 4 - 1e-12).all()  # the blend adds at most k/4
    far = (da - db).abs() >= k
    assert torch.allclose(su[far], torch.minimum(da, db)[far])
    ss = S.smooth_subtraction(a, b, k)(p)
    assert (ss >= torch.maximum(da, -db) - 1e-12).all()
    si = S.smooth_intersection(a, b, k)(p)
    assert (si >= torch.maximum(da, db) - 1e-12).all()
    assert torch.equal(S.smooth_union(a, b, 0.0)(p), torch.minimum(da, db))
    assert torch.allclose(S.smooth_union_all([a, b], k)(p), su)


def test_dtype_and_device_follow_the_points():
    s = S.smooth_union(S.torus(0.5, 0.1), S.ellipsoid((0.2, 0.3, 0.1)).mirror(1), 0.05)
    for dtype in (torch.float32, torch.float64):
        out = s(torch.zeros(7, 3, dtype=dtype))
        assert out.dtype == dtype and out.shape == (7,)
    if torch.cuda.is_available():
        pts = torch.rand(100, 3)
        assert torch.allclose(s(pts.cuda()).cpu(), s(pts), atol=1e-5)


# ---------------------------------------------------------------- built-in stand-ins

@pytest.fixture(scope="module")
def builtin_meshes():
    out = {}
    for name, make in S.BUILTIN.items():
        grid = dense_grid(make(), 112)
        v, f = marching_cubes(grid)
        out[name] = (grid, v.numpy(), f.numpy())
    return out


@pytest.mark.parametrize("name,expected_genus", [("bob", 1), ("spot", 0)])
def test_builtin_watertight_genus_and_inside_the_box(builtin_meshes, name, expected_genus):
    grid, v, f = builtin_meshes[name]
    # the shape must not touch the box faces, or marching cubes would leave it open
    faces_of_box = torch.cat([grid[0].flatten(), grid[-1].flatten(), grid[:, 0].flatten(),
                              grid[:, -1].flatten(), grid[:, :, 0].flatten(), grid[:, :, -1].flatten()])
    assert faces_of_box.min() > 0.05
    edges = np.sort(np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]]), axis=1)
    _, counts = np.unique(edges, axis=0, return_counts=True)
    assert (counts == 2).all()  # closed 2-manifold
    assert connected_components(f) == 1
    assert genus(v, f) == expected_genus


@pytest.mark.parametrize("name,expected_genus", [("bob", 1), ("spot", 0)])
def test_builtin_has_no_thin_parts(builtin_meshes, name, expected_genus):
    """Eroding by 0.025 keeps one piece with the same genus: every part is > 0.05 thick."""
    grid, _, _ = builtin_meshes[name]
    v, f = marching_cubes(grid, level=-0.025)
    assert connected_components(f.numpy()) == 1
    assert genus(v, f) == expected_genus


def _demo_camera_silhouette(verts, faces, res=128):
    """Silhouette (res, res) bool from the demo camera, by libigl ray casting (independent of
    lib/ renderers): azimuth 45, elevation 30, distance 2.5, focal 35 mm / sensor 32 mm."""
    import igl

    az, el, dist = math.radians(45), math.radians(30), 2.5
    eye = dist * np.array([math.cos(el) * math.sin(az), math.sin(el), -math.cos(el) * math.cos(az)])
    fwd = -eye / np.linalg.norm(eye)
    right = np.cross(fwd, [0.0, 1.0, 0.0])
    right /= np.linalg.norm(right)
    up = np.cross(right, fwd)
    half = 16.0 / 35.0
    u = ((np.arange(res) + 0.5) / res * 2 - 1) * half
    X, Y = np.meshgrid(u, -u)
    d = fwd + X[..., None] * right + Y[..., None] * up
    d = np.ascontiguousarray((d / np.linalg.norm(d, axis=-1, keepdims=True)).reshape(-1, 3))
    v = np.ascontiguousarray(verts, dtype=np.float64)
    f = np.ascontiguousarray(faces, dtype=np.int64)
    tree = igl.AABB()
    tree.init(v, f)
    hit, _, _ = tree.intersect_ray_first(v, f, np.ascontiguousarray(np.broadcast_to(eye, d.shape)), d)
    return (hit >= 0).reshape(res, res)


def _enclosed_background(sil):
    """Sizes of background components that do not touch the image border."""
    from scipy import ndimage

    lab, n = ndimage.label(~sil)
    border = set(np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]])).tolist())
    return [int((lab == i).sum()) for i in range(1, n + 1) if i not in border]


def test_bob_hole_is_visible_from_the_demo_camera(builtin_meshes):
    _, v, f = builtin_meshes["bob"]
    nv = normalization(v, f).apply(v)  # as written to data/<ds>/meshes/bob.obj
    sil = _demo_camera_silhouette(nv, f)
    holes = _enclosed_background(sil)
    assert len(holes) == 1 and holes[0] >= 60  # >= 0.35 % of the image: a clear see-through hole
    assert 0.1 < sil.mean() < 0.5  # the whole duck is in view


def test_spot_silhouette_has_no_hole(builtin_meshes):
    from lib.datasets.sampling import rotate_about_y

    _, v, f = builtin_meshes["spot"]
    v = rotate_about_y(v, S.ORIGINAL_TURN_Y["spot"])          # as prepare_data.py turns it
    sil = _demo_camera_silhouette(normalization(v, f).apply(v), f)
    assert _enclosed_background(sil) == [] and 0.1 < sil.mean() < 0.5


def test_spot_stand_in_faces_like_spot_obj(builtin_meshes):
    """In its own frame the stand-in's head (its top tenth: ears, horns) is towards -z, as in
    Keenan Crane's spot.obj; ORIGINAL_TURN_Y turns it by +90 degrees about +y, head to -x."""
    _, v, _ = builtin_meshes["spot"]
    top = v[v[:, 1] > np.percentile(v[:, 1], 90)]
    assert top[:, 2].mean() < -0.25 and abs(top[:, 0].mean()) < 0.05
    assert S.ORIGINAL_TURN_Y == {"spot": 90.0}
