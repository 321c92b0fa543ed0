"""SDF sample generation: exact distances and signs, the sample mix, normalisation, robustness."""
import numpy as np
import pytest
import torch

from lib.datasets import shapes as S
from lib.errors import MeshSDFError
from lib.io import read_mesh
from lib.isosurface import marching_cubes
from lib.metrics import genus, merge_vertices
from lib.datasets.sampling import (NORMALIZATION_BUFFER, normalization, sample_points, sample_sdf, signed_distance,
                          surface_points, validate_mesh)

# Analytic shapes inside [-1, 1]^3 and their exact SDFs.
ANALYTIC = {
    "sphere": S.sphere(0.7),
    "torus": S.torus(0.55, 0.22),
    "box": S.box((0.6, 0.4, 0.5)),
}


@pytest.fixture(scope="module")
def analytic_meshes():
    return {k: tuple(t.numpy() for t in S.mesh_shape(s, 128)) for k, s in ANALYTIC.items()}


@pytest.mark.parametrize("name", sorted(ANALYTIC))
def test_samples_match_exact_sdf(analytic_meshes, name):
    v, f = analytic_meshes[name]
    pos, neg = sample_sdf(v, f, 6000, seed=1)
    rows = np.concatenate([pos, neg]).astype(np.float64)
    exact = ANALYTIC[name](torch.from_numpy(rows[:, :3])).numpy()
    err = np.abs(rows[:, 3] - exact)
    # marching cubes at h = 0.016 cuts box edges/corners by up to ~h; elsewhere far closer
    assert np.median(err) < 1e-3
    assert err.max() < (0.02 if name == "box" else 3e-3)
    far = np.abs(exact) > 0.02
    assert np.array_equal(np.sign(rows[far, 3]), np.sign(exact[far]))


def test_pos_neg_split_and_format(analytic_meshes):
    v, f = analytic_meshes["torus"]
    pos, neg = sample_sdf(v, f, 3001, seed=0)
    assert pos.dtype == np.float32 and neg.dtype == np.float32
    assert pos.shape[1] == 4 and neg.shape[1] == 4 and len(pos) + len(neg) == 3001
    assert (pos[:, 3] >= 0).all() and (neg[:, 3] < 0).all()
    assert len(neg) > 0.2 * 3001 and len(pos) > 0.2 * 3001
    # the same seed gives the same samples, another seed others
    pos2, _ = sample_sdf(v, f, 3001, seed=0)
    pos3, _ = sample_sdf(v, f, 3001, seed=5)
    assert np.array_equal(pos, pos2) and not np.array_equal(pos[:50], pos3[:50])


def test_sample_mix_is_deepsdf_preprocessors_by_default(analytic_meshes):
    """As DeepSDF's preprocessor: 47/50 near the surface, each surface point perturbed twice, by noise of
    VARIANCE 0.005 (std 0.0707) and 0.0005 (std 0.0224); 3/50 uniform in [-1, 1]^3."""
    v, f = analytic_meshes["sphere"]
    n = 20000
    pts = sample_points(v, f, n, np.random.default_rng(0))
    assert pts.shape == (n, 3)
    radial = np.linalg.norm(pts, axis=1) - 0.7  # offset along the normal of a sphere
    near = n - round(3 / 50 * n)
    a = (near + 1) // 2
    assert np.std(radial[:a]) == pytest.approx(0.005 ** 0.5, rel=0.05)
    assert np.std(radial[a:near]) == pytest.approx(0.0005 ** 0.5, rel=0.05)
    # the same surface points twice: the two perturbations of a point differ by N(0, 0.0055 I)
    pair = pts[:near - a] - pts[a:near]
    assert np.std(pair) == pytest.approx(0.0055 ** 0.5, rel=0.05)
    uni = pts[near:]
    assert len(uni) == 1200 and np.abs(uni).max() <= 1.0
    assert np.abs(uni.mean(axis=0)).max() < 0.06 and np.std(uni[:, 0]) == pytest.approx(1 / 3 ** 0.5, rel=0.1)
    # nothing else is uniform: the near points stay within 5 std of the sphere
    assert np.abs(radial[:near]).max() < 5 * 0.005 ** 0.5


def test_sample_mix_paper_option(analytic_meshes):
    """The DeepSDF paper's text: variances 0.0025 / 0.00025 (std 0.05 / 0.0158), 5 % uniform."""
    v, f = analytic_meshes["sphere"]
    n = 20000
    pts = sample_points(v, f, n, np.random.default_rng(0), "paper")
    radial = np.linalg.norm(pts, axis=1) - 0.7
    a, near = 9500, 19000
    assert np.std(radial[:a]) == pytest.approx(0.0025 ** 0.5, rel=0.05)
    assert np.std(radial[a:near]) == pytest.approx(0.00025 ** 0.5, rel=0.05)
    assert np.abs(pts[near:]).max() <= 1.0 and np.std(pts[near:, 0]) == pytest.approx(1 / 3 ** 0.5, rel=0.1)
    with pytest.raises(MeshSDFError, match="unknown sample mix 'nope'"):
        sample_points(v, f, 100, np.random.default_rng(0), "nope")


def test_surface_points_are_area_uniform():
    v = np.array([[0, 0, 0], [1, 0, 0], [0, 1, 0], [0, 0, 1], [3, 0, 1], [0, 1, 1]], dtype=np.float64)
    f = np.array([[0, 1, 2], [3, 4, 5]])  # areas 0.5 and 1.5, in planes z = 0 and z = 1
    p = surface_points(v, f, 40000, np.random.default_rng(0))
    assert np.mean(p[:, 2] > 0.5) == pytest.approx(0.75, abs=0.01)
    lo = p[p[:, 2] < 0.5]
    assert (lo[:, :2] >= 0).all() and (lo[:, 0] + lo[:, 1] <= 1 + 1e-12).all()
    assert lo[:, 0].mean() == pytest.approx(1 / 3, abs=0.01)  # centroid of a uniform triangle


def test_normalization_round_trip():
    rng = np.random.default_rng(3)
    v, f = (t.numpy() for t in S.mesh_shape(S.box((0.5, 0.3, 0.2)), 48))
    orig = v.astype(np.float64) * 7.3 + np.array([12.0, -4.0, 0.5])
    # unreferenced vertices must not affect the normalisation
    orig_with_junk = np.concatenate([orig, [[1e3, 1e3, 1e3]]])
    n = normalization(orig_with_junk, f)
    nv = n.apply(orig)
    assert np.allclose(0.5 * (nv.min(0) + nv.max(0)), 0, atol=1e-9)
    assert np.linalg.norm(nv, axis=1).max() == pytest.approx(1 / NORMALIZATION_BUFFER)
    assert np.allclose(nv, (orig + n.offset) * n.scale)  # DeepSDF: offset = -centre
    q = rng.normal(size=(100, 3))
    assert np.allclose(n.invert(n.apply(q)), q) and np.allclose(n.apply(n.invert(q)), q)


def _unit_sphere_mesh():
    v, f = S.mesh_shape(S.sphere(0.6), 40)
    return v.numpy().astype(np.float64), f.numpy()


def test_sign_robust_to_seams_orientation_and_small_holes():
    v, f = _unit_sphere_mesh()
    q = np.random.default_rng(0).uniform(-0.9, 0.9, size=(3000, 3))
    q = q[np.abs(np.linalg.norm(q, axis=1) - 0.6) > 0.02]
    ref = signed_distance(v, f, q)
    assert np.array_equal(ref < 0, np.linalg.norm(q, axis=1) < 0.6)
    # every face with its own vertices (a triangle soup, the worst case of UV seams)
    soup_v, soup_f = v[f].reshape(-1, 3), np.arange(3 * len(f)).reshape(-1, 3)
    assert np.allclose(signed_distance(soup_v, soup_f, q), ref)
    # all faces flipped
    assert np.allclose(signed_distance(v, f[:, ::-1], q), ref)
    # a few faces missing: a small hole does not flip anything away from it
    holed = np.delete(f, np.arange(0, 12), axis=0)
    assert np.array_equal(signed_distance(v, holed, q) < 0, ref < 0)


def test_validate_mesh_errors():
    v, f = _unit_sphere_mesh()
    with pytest.raises(MeshSDFError, match="thing.obj.*no faces"):
        validate_mesh(v, f[:0], "thing.obj")
    bad = v.copy()
    bad[3, 1] = np.nan
    with pytest.raises(MeshSDFError, match="thing.obj.*NaN"):
        validate_mesh(bad, f, "thing.obj")
    with pytest.raises(MeshSDFError, match="thing.obj.*indices"):
        validate_mesh(v, f + len(v), "thing.obj")
    with pytest.raises(MeshSDFError, match="thing.obj.*zero surface area"):
        validate_mesh(np.zeros_like(v), f, "thing.obj")
    with pytest.raises(MeshSDFError, match="thing.obj.*zero extent"):
        normalization(np.ones_like(v), f, "thing.obj")


@pytest.mark.parametrize("name,expected", [("bob", 1), ("spot", 0)])
def test_real_mesh_samples_have_right_genus(shared_mesh, name, expected):
    """Real meshes have duplicated UV-seam vertices; signs must still be right, so the zero
    level set of the sampled signed distance has the mesh's genus."""
    from lib.isosurface import grid_points

    v, f = read_mesh(shared_mesh(name))
    v = v.astype(np.float64)
    assert genus(*merge_vertices(v, f)) == expected
    nv = normalization(v, f).apply(v)
    res = 56
    sdf = signed_distance(nv, f, grid_points(res, dtype=torch.float64).numpy())
    mv, mf = marching_cubes(torch.from_numpy(sdf.reshape(res, res, res)))
    assert genus(mv, mf) == expected
    # the training samples themselves carry the winding-number sign of the exact test
    import igl

    pos, neg = sample_sdf(nv, f, 4000, seed=0)
    rows = np.concatenate([pos, neg]).astype(np.float64)
    w = np.abs(igl.winding_number(nv, f, rows[:, :3]))
    assert np.array_equal(rows[:, 3] < 0, w > 0.5)
