import torch

from lib.isosurface import extract_dense
from lib.metrics import euler_characteristic, genus
from lib.io import read_mesh

from fields import sphere, torus, union


_double_torus = union(torus(0.35, 0.12).translate((0.45, 0.0, 0.0)), torus(0.35, 0.12).translate((-0.45, 0.0, 0.0)))


def test_genus_of_analytic_shapes():
    v, f = extract_dense(lambda p: p.norm(dim=1) - 0.5, 40)
    assert euler_characteristic(v, f) == 2 and genus(v, f) == 0
    v, f = extract_dense(torus(0.5, 0.2), 48)
    assert genus(v, f) == 1
    v, f = extract_dense(_double_torus, 64)
    assert genus(v, f) == 2
    # two separate spheres: chi = 4, genus 0
    v, f = extract_dense(lambda p: torch.minimum((p - 0.5).norm(dim=1), (p + 0.5).norm(dim=1)) - 0.3, 40)
    assert euler_characteristic(v, f) == 4 and genus(v, f) == 0


def test_dense_mesh_is_outward_and_on_surface():
    v, f = extract_dense(lambda p: p.norm(dim=1) - 0.6, 64)
    assert (v.norm(dim=1) - 0.6).abs().max() < 0.01
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    n = torch.cross(b - a, c - a, dim=1)
    assert ((n * (a + b + c)).sum(1) > 0).all()


def test_empty_level_set():
    v, f = extract_dense(lambda p: p.norm(dim=1) + 1.0, 16)
    assert v.shape == (0, 3) and f.shape == (0, 3)


def test_real_meshes_genus(shared_mesh):
    assert genus(*read_mesh(shared_mesh("bob"))) == 1
    assert genus(*read_mesh(shared_mesh("spot"))) == 0


def test_topology_counts_scrambled_pieces():
    """Three tori and two spheres with the vertex indices shuffled (so component labels must
    travel far through the index order): chi = 2 * 2 + 0 * 3, 5 pieces, genus 3."""
    from lib.metrics import topology

    shapes = [torus(0.18, 0.06).translate(c) for c in ([-0.6, -0.5, 0.0], [0.0, 0.5, 0.0], [0.6, -0.5, 0.0])]
    shapes += [sphere(0.15, (0.0, -0.5, 0.5)), sphere(0.2, (0.0, 0.0, -0.6))]
    v, f = extract_dense(union(*shapes), 72)
    perm = torch.randperm(len(v), generator=torch.Generator().manual_seed(0))
    f = perm[torch.as_tensor(f).long()]
    assert topology(f) == (4, 5, 3)
    assert topology(f.flip(0)) == (4, 5, 3)
