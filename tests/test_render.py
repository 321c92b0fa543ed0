import math

import numpy as np
import pytest
import torch
import trimesh

from lib.io import read_mesh
from lib.render import (RenderSettings, blur_radius, face_index, face_normals, look_at, normal_image, rasterize, shade,
                        silhouette, vertex_normals)
from lib.render.screen import TILE, Screen, face_table, face_tiles, project_mesh
from lib.render.silhouette import _cull_tiles
from lib.render.zbuffer import _face_ids

D64 = torch.float64


def _ray_cast(cam, verts, faces):
    """Independent reference: Moller-Trumbore in world space for the ray through every pixel
    centre (both windings).  Returns hit mask (H, W) and camera depth (H, W) (numpy)."""
    H, W = cam.image_size
    K, R, eye = cam.K.double().numpy(), cam.R[0].double().numpy(), cam.eye.double().numpy()
    jj, ii = np.meshgrid(np.arange(W) + 0.5, np.arange(H) + 0.5)
    d_cam = np.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], np.ones_like(jj)], -1).reshape(-1, 3)
    dirs = d_cam @ R                                              # R^T d, with d_cam.z = 1
    v = np.asarray(verts, np.float64)
    v0 = v[faces[:, 0]]
    e1, e2 = v[faces[:, 1]] - v0, v[faces[:, 2]] - v0
    s = eye - v0
    q = np.cross(s, e1)
    tq = (e2 * q).sum(-1)
    best = np.full(len(dirs), np.inf)
    for a in range(0, len(dirs), 256):
        d = dirs[a:a + 256, None, :]
        p = np.cross(d, e2[None])
        det = (p * e1[None]).sum(-1)
        ok = np.abs(det) > 1e-14
        inv = np.where(ok, 1.0 / np.where(ok, det, 1.0), 0.0)
        u = (p * s[None]).sum(-1) * inv
        w = (d * q[None]).sum(-1) * inv
        t = tq[None] * inv
        hit = ok & (u >= 0) & (w >= 0) & (u + w <= 1) & (t > 0)
        best[a:a + 256] = np.where(hit, t, np.inf).min(1)
    hit = np.isfinite(best)
    # the ray parameter t multiplies d_cam whose z is 1, so t is the camera depth
    return hit.reshape(H, W), np.where(hit, best, 0.0).reshape(H, W)


def _sphere():
    m = trimesh.creation.icosphere(3, radius=0.7)
    return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int64)


def _cube():
    m = trimesh.creation.box(extents=(1.0, 0.8, 1.2))
    m.apply_translation([0.1, -0.05, 0.0])
    return np.asarray(m.vertices, np.float32), np.asarray(m.faces, np.int64)


def _meshes(shared_mesh):
    return {"sphere": _sphere, "cube": _cube, "bob": lambda: read_mesh(shared_mesh("bob"))}


@pytest.mark.parametrize("name,size", [("sphere", (56, 56)), ("cube", (48, 64)), ("bob", (48, 48))])
def test_coverage_and_depth_match_ray_casting(shared_mesh, name, size):
    v, f = _meshes(shared_mesh)[name]()
    cam = look_at(45, 30, 2.5, image_size=size)
    hit, depth = _ray_cast(cam, v, f)
    assert 0.1 < hit.mean() < 0.9
    vt, ft = torch.from_numpy(v), torch.from_numpy(f)
    fr = rasterize(vt, ft, cam)
    hard = silhouette(vt, ft, cam, sigma=0.0)
    sharp = silhouette(vt, ft, cam, sigma=1e-9)
    assert (fr.mask.numpy() == hit).mean() > 0.995
    assert (hard.numpy() == hit).mean() > 0.995
    assert ((sharp.numpy() > 0.5) == hit).mean() > 0.995
    assert set(np.unique(hard.numpy())) <= {0.0, 1.0}
    both = hit & fr.mask.numpy()
    assert np.abs(fr.depth.numpy()[both] - depth[both]).max() < 1e-4
    # the visible face's barycentrics reproduce the pixel's depth and are a partition of 1
    b = fr.bary.numpy()[both]
    np.testing.assert_allclose(b.sum(-1), 1.0, atol=1e-5)
    assert (b > -1e-5).all()


def test_bob_silhouette_has_its_hole(shared_mesh):
    v, f = read_mesh(shared_mesh("bob"))
    img = silhouette(torch.from_numpy(v), torch.from_numpy(f), look_at(45, 30, 2.5, image_size=128), sigma=0)
    # the hole of the ring is background enclosed by the silhouette: flood fill the
    # background from the border and find pixels it cannot reach
    from scipy import ndimage
    bg, n = ndimage.label(img.numpy() < 0.5)
    border = set(np.unique(np.r_[bg[0], bg[-1], bg[:, 0], bg[:, -1]])) - {0}
    assert len(set(range(1, n + 1)) - border) >= 1


def _loss_and_grad(v, f, cam, w, **kw):
    vv = v.clone().requires_grad_(True)
    loss = (silhouette(vv, f, cam, **kw) * w).sum()
    loss.backward()
    return vv.grad


def _fd(v, f, cam, w, idx, h=1e-6, **kw):
    out = torch.zeros(len(idx), 3, dtype=D64)
    for n, i in enumerate(idx):
        for k in range(3):
            vp, vm = v.clone(), v.clone()
            vp[i, k] += h
            vm[i, k] -= h
            out[n, k] = ((silhouette(vp, f, cam, **kw) - silhouette(vm, f, cam, **kw)) * w).sum() / (2 * h)
    return out


@pytest.mark.parametrize("kw", [dict(sigma=2e-3, eps=1e-12), dict(sigma=5e-4, eps=1e-12, faces_per_pixel=3)])
def test_silhouette_gradient_matches_finite_differences(kw):
    m = trimesh.creation.icosphere(1, radius=0.8)
    v = torch.tensor(m.vertices, dtype=D64)
    v = v + 0.05 * torch.randn(v.shape, generator=torch.Generator().manual_seed(1), dtype=D64)
    f = torch.tensor(m.faces)
    cam = look_at(30, 20, 2.5, image_size=(28, 36), dtype=D64)
    w = torch.rand(28, 36, dtype=D64, generator=torch.Generator().manual_seed(0))
    g = _loss_and_grad(v, f, cam, w, **kw)
    idx = list(range(0, len(v), 3))
    num = _fd(v, f, cam, w, idx, **kw)
    assert num.norm() > 1.0
    assert float((g[idx] - num).norm() / num.norm()) < 1e-2
    assert float((g[idx] - num).abs().max() / num.abs().max()) < 1e-2


def test_batched_cameras_meshes_and_recomputed_backward():
    v, f = _sphere()
    v = torch.from_numpy(v).double()
    f = torch.from_numpy(f)
    cams = look_at([0, 120], [10, 40], 2.5, image_size=40, dtype=D64)
    w = torch.rand(2, 40, 40, dtype=D64, generator=torch.Generator().manual_seed(0))
    kw = dict(sigma=1e-3)
    vv = v.clone().requires_grad_(True)
    imgs = silhouette(vv, f, cams, **kw)
    assert imgs.shape == (2, 40, 40)
    (imgs * w).sum().backward()
    g_batch = vv.grad.clone()
    g_single = torch.zeros_like(v)
    for i in range(2):
        vi = v.clone().requires_grad_(True)
        img = silhouette(vi, f, cams[i], **kw)
        torch.testing.assert_close(img, imgs[i].detach())
        (img * w[i]).sum().backward()
        g_single += vi.grad
    torch.testing.assert_close(g_batch, g_single)
    # B meshes (same faces) with one camera each
    vb = torch.stack([v, v * 0.8]).requires_grad_(True)
    out = silhouette(vb, f, cams, **kw)
    torch.testing.assert_close(out[1], silhouette(v * 0.8, f, cams[1], **kw))
    # tiny chunks and the recompute-in-backward path give the same values and gradient
    small = RenderSettings(chunk_tiles=50, save_slots=0)
    vv = v.clone().requires_grad_(True)
    imgs2 = silhouette(vv, f, cams, **kw, settings=small)
    (imgs2 * w).sum().backward()
    torch.testing.assert_close(imgs2.detach(), imgs.detach())
    torch.testing.assert_close(vv.grad, g_batch)


def _centroid(img):
    H, W = img.shape
    rows, cols = torch.meshgrid(torch.arange(H) + 0.5, torch.arange(W) + 0.5, indexing="ij")
    m = img.sum()
    return float((img * cols).sum() / m), float((img * rows).sum() / m)


def test_translating_right_and_up_moves_the_silhouette_right_and_up():
    v, f = _cube()
    v, f = torch.from_numpy(v), torch.from_numpy(f)
    cam = look_at(45, 30, 3.0, image_size=64)
    u0, r0 = _centroid(silhouette(v, f, cam, sigma=1e-4))
    right = cam.R[0, 0]
    u1, r1 = _centroid(silhouette(v + 0.3 * right, f, cam, sigma=1e-4))
    assert u1 > u0 + 3 and abs(r1 - r0) < 0.5
    u2, r2 = _centroid(silhouette(v + torch.tensor([0.0, 0.3, 0.0]), f, cam, sigma=1e-4))
    assert r2 < r0 - 2                                      # world +y is up in the image


def test_soft_silhouette_properties():
    v, f = _sphere()
    v, f = torch.from_numpy(v), torch.from_numpy(f)
    cam = look_at(0, 0, 2.5, image_size=64)
    soft = silhouette(v, f, cam, sigma=1e-4)
    hard = silhouette(v, f, cam, sigma=0)
    assert float(soft.min()) >= 0 and float(soft.max()) <= 1
    edge = (hard > 0.5) != (soft > 0.5)
    assert edge.float().mean() < 0.03                      # only pixels at the boundary differ
    blur = (soft > 1e-3) & (soft < 1 - 1e-3)
    assert blur.sum() > hard.sum() ** 0.5                  # a soft band around the contour
    # faces behind the camera are skipped, an empty mesh renders empty
    behind = silhouette(v + torch.tensor([0.0, 0.0, -10.0]), f, cam, sigma=1e-4)
    assert float(behind.sum()) == 0
    assert float(silhouette(v, f[:0], cam).sum()) == 0


def test_normals_of_a_sphere_point_outwards():
    v, f = _sphere()
    v, f = torch.from_numpy(v).double(), torch.from_numpy(f)
    cam = look_at(20, 15, 2.5, image_size=48, dtype=D64)
    fr = rasterize(v, f, cam)
    n = normal_image(v, f, cam, fr, smooth=True)
    # rebuild the visible 3D points from depth: p = eye + depth * R^T K^-1 (u, v, 1)
    H, W = cam.image_size
    jj, ii = torch.meshgrid(torch.arange(W) + 0.5, torch.arange(H) + 0.5, indexing="xy")
    K = cam.K
    dcam = torch.stack([(jj - K[0, 2]) / K[0, 0], (ii - K[1, 2]) / K[1, 1], torch.ones_like(jj)], -1).double()
    p = cam.eye + fr.depth[..., None] * (dcam @ cam.R[0])
    m = fr.mask
    assert m.float().mean() > 0.2
    radial = torch.nn.functional.normalize(p[m], dim=-1)
    assert float((n[m] * radial).sum(-1).min()) > 0.995
    nf = normal_image(v, f, cam, fr, smooth=False)
    assert float((nf[m] * radial).sum(-1).min()) > 0.98
    # camera frame: visible surfaces face the camera (n_z < 0)
    nc = normal_image(v, f, cam, fr, frame="camera")
    assert float(nc[m][:, 2].max()) < 0.2
    assert float(n[~m].abs().max()) == 0
    torch.testing.assert_close(face_normals(v, f).norm(dim=-1), torch.ones(len(f), dtype=D64))
    torch.testing.assert_close(vertex_normals(v, f), torch.nn.functional.normalize(v, dim=-1), atol=2e-2, rtol=0)
    # the sorted (CUDA) sums give the same normals and gradients, batched too
    vb = torch.stack([v, 0.5 * v]).double().requires_grad_(True)
    w = torch.rand(vb.shape, dtype=D64, generator=torch.Generator().manual_seed(2))
    out = {}
    for repro in (False, True):
        vb.grad = None
        nb = vertex_normals(vb, f, reproducible=repro)
        (nb * w).sum().backward()
        out[repro] = (nb.detach(), vb.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(out[True][0][1], out[True][0][0], rtol=1e-10, atol=1e-12)


def test_depth_is_differentiable_and_shade_is_rgba():
    v, f = _sphere()
    v, f = torch.from_numpy(v).double(), torch.from_numpy(f)
    cam = look_at(0, 0, 2.5, image_size=32, dtype=D64)
    vv = v.clone().requires_grad_(True)
    fr = rasterize(vv, f, cam)
    # scaling the scene about the camera centre by (1 + e) keeps every pixel's face and
    # scales its depth: d(sum depth)/de = sum depth = sum_v grad_v . (v - eye)
    (fr.depth.sum()).backward()
    assert float((vv.grad * (v - cam.eye)).sum()) == pytest.approx(float(fr.depth.detach().sum()), rel=1e-9)
    img = shade(v, f, cam)
    assert img.shape == (32, 32, 4)
    torch.testing.assert_close(img[..., 3], fr.mask.double())
    rgb = img[..., :3].mean(-1)
    assert float(rgb[16, 16]) == pytest.approx(0.8, abs=1e-2)   # head light, normal facing it
    assert float(rgb[16, 16]) >= float(rgb[fr.mask].max()) - 1e-2
    assert float(img[0, 0].abs().sum()) == 0


def test_reproducible_sums_are_order_independent_and_agree():
    """The CUDA path (fixed-point pixel sums, sorted gradient sums) forced on the CPU: the
    image is bitwise the same whatever the order of the faces (integer sums cannot depend
    on it), and image and gradient equal the plain index_add_ path to rounding."""
    v, f = _sphere()
    v = torch.from_numpy(v).double().requires_grad_(True)
    f = torch.from_numpy(f)
    cam = look_at(30, 20, 2.5, image_size=40, dtype=D64)
    w = torch.rand(40, 40, dtype=D64, generator=torch.Generator().manual_seed(3))
    out = {}
    for repro in (False, True):
        v.grad = None
        img = silhouette(v, f, cam, sigma=1e-3, reproducible=repro)
        (img * w).sum().backward()
        out[repro] = (img.detach(), v.grad.clone())
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-10)
    torch.testing.assert_close(out[True][1], out[False][1], rtol=1e-10, atol=1e-12)
    perm = torch.randperm(len(f), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        again = silhouette(v, f[perm], cam, sigma=1e-3, reproducible=True)
    assert torch.equal(again, out[True][0])
    covered = silhouette(v.detach(), f, cam, sigma=0, reproducible=True)
    assert set(covered.unique().tolist()) <= {0.0, 1.0}      # deep-inside pixels stay exactly 1


def _soup(n, seed, dtype=torch.float32):
    """n random triangles in front of the camera, of a few pixels to a third of the image,
    plus exact duplicates of every fifth face (equal depths: the tie rule decides) and a
    fan sharing edges (pixel centres on shared edges)."""
    g = torch.Generator().manual_seed(seed)
    c = (torch.rand(n, 1, 3, generator=g, dtype=D64) - 0.5) * torch.tensor([1.6, 1.6, 1.0], dtype=D64)
    v = (c + 0.25 * torch.rand(n, 1, 1, generator=g, dtype=D64) * torch.randn(n, 3, 3, generator=g, dtype=D64))
    v = v.reshape(-1, 3)
    f = torch.arange(3 * n).reshape(n, 3)
    f = torch.cat([f, f[::5], f[::7].flip(1)])               # duplicates, and duplicates wound the other way
    ang = torch.linspace(0, 2 * math.pi, 9, dtype=D64)[:-1]
    fan = torch.cat([torch.zeros(1, 3, dtype=D64), torch.stack([0.3 * ang.cos(), 0.3 * ang.sin(), 0 * ang], 1)])
    fv = torch.arange(8)
    f = torch.cat([f, torch.stack([torch.full((8,), 3 * n), 3 * n + 1 + fv, 3 * n + 1 + (fv + 1) % 8], 1)])
    return torch.cat([v, fan]).to(dtype), f


@pytest.mark.parametrize("seed", [0, 1])
def test_packed_zbuffer_equals_the_two_pass_rule(seed):
    """The one-pass z-buffer (packed depth/face keys, row spans) gives the face index of
    the two-pass rule (amin of depth, then amax of the face among the slots at that depth,
    on 4 x 4 tiles), ties and batches included; face_index is rasterize's face_idx."""
    v, f = _soup(300, seed)
    cams = look_at([10, 200], [15, -20], 3.0, image_size=(61, 67))
    vb = torch.stack([v, v.flip(1) * 0.9])                   # two meshes with the same faces
    fast = rasterize(vb, f, cams)
    assert torch.equal(face_index(vb, f, cams), fast.face_idx)
    dup = f.shape[0] - 8 - len(f[::7]) - len(f[::5])
    for shown in fast.face_idx[0].unique().tolist():
        assert shown < 0 or not (shown < dup and shown % 5 == 0)    # a duplicated face loses its tie
    slow = rasterize(vb, f, cams, settings=RenderSettings(packed_zbuffer=False, row_spans=False, raster_tile=TILE))
    assert torch.equal(fast.face_idx, slow.face_idx)
    assert torch.equal(fast.depth, slow.depth) and torch.equal(fast.bary, slow.bary)
    assert (fast.face_idx >= 0).float().mean() > 0.3
    # float64 takes the two-pass rule; one mesh with an unbatched camera
    single = face_index(v.double(), f, cams[0])
    assert torch.equal(single, rasterize(v.double(), f, cams[0]).face_idx)


def _hard_triangles(seed: int, H: int, W: int):
    """Groups of screen-space triangles (G, 3, 2) that stress a row-span z-buffer: vertices
    on pixel centres and half-way between them (edges through centres), horizontal and
    vertical edges on centre rows and columns, slivers, sub-pixel faces, faces reaching far
    outside the image, and random ones; with depths (G, 3) in [1, 3]."""
    g = torch.Generator().manual_seed(seed)
    n = 300
    snap = (torch.randint(-3, max(H, W) + 3, (n, 3, 2), generator=g).float()
            + 0.5 * torch.randint(0, 2, (n, 3, 2), generator=g))
    axis = snap.clone()
    axis[: n // 2, 1, 1] = axis[: n // 2, 0, 1]               # horizontal edges
    axis[n // 2:, 1, 0] = axis[n // 2:, 0, 0]                 # vertical edges
    base = torch.rand(n, 1, 2, generator=g) * torch.tensor([W, H])
    d = torch.randn(n, 1, 2, generator=g) * 20
    sliver = torch.cat([base, base + d, base + d * (1 + 1e-3) + 1e-2 * torch.randn(n, 1, 2, generator=g)], 1)
    tiny = base + 0.6 * torch.rand(n, 3, 2, generator=g)
    far = base + torch.randn(n, 3, 2, generator=g) * torch.tensor([[3.0], [3.0], [3e4]])   # one vertex far away
    rand = torch.rand(n, 3, 2, generator=g) * torch.tensor([W, H]) * 1.2 - 5
    groups = {"snapped": snap, "axis-aligned edges": axis, "slivers": sliver, "sub-pixel": tiny, "far": far,
              "random": rand}
    return {k: (uvt, 1 + 2 * torch.rand(n, 3, generator=g)) for k, uvt in groups.items()}


@pytest.mark.parametrize("seed", [0, 1])
def test_row_spans_find_every_pixel_the_tiles_find(seed):
    """The z-buffer's row spans (margins included) hold every pixel centre that the edge test
    finds inside a face: the face index is bit for bit that of the bounding-box tiles, which
    hold every centre of a face's box, on faces made to hit the spans' edge cases."""
    H, W = 37, 45
    for name, (uvt, zt) in _hard_triangles(seed, H, W).items():
        G = uvt.shape[0]
        sc = Screen(uvt.reshape(-1, 2), zt.reshape(-1), torch.arange(3 * G).reshape(G, 3), 1, False, H, W)
        spans = _face_ids(sc, G, 1e-3, RenderSettings(row_spans=True))
        tiles = _face_ids(sc, G, 1e-3, RenderSettings(row_spans=False))
        assert torch.equal(spans, tiles), name
        assert len(tiles.unique()) > 5, name                  # the group shows several faces


def test_zbuffer_halves_side_by_side_give_the_whole_face_index(monkeypatch):
    """The packed z-buffer split into two halves of the faces, run side by side (2 threads),
    gives the face index of one pass over all faces, ties between the halves included
    (duplicated faces land in different halves)."""
    from lib import runtime
    v, f = _soup(300, 4)
    cams = look_at([10, 200], [15, -20], 3.0, image_size=(61, 67))
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        whole = face_index(v, f, cams, settings=RenderSettings(split_faces=10 ** 9))
        halves = face_index(v, f, cams, settings=RenderSettings(split_faces=1))
        monkeypatch.setattr(runtime.SETTINGS, "concurrent", False)
        in_order = face_index(v, f, cams, settings=RenderSettings(split_faces=1))
    finally:
        torch.set_num_threads(old)
    assert torch.equal(whole, halves) and torch.equal(whole, in_order)
    assert (whole >= 0).float().mean() > 0.3


@pytest.mark.parametrize("kw", [dict(), dict(faces_per_pixel=4), dict(sigma=3e-3, radius=2e-3), dict(sigma=0.0)])
def test_tile_culling_changes_no_bit(kw):
    """Tiles wholly beyond the blur radius of their face are skipped; image and vertex
    gradient are bitwise those of evaluating every tile, in every mode, batched too, and
    the culling does skip tiles (so the comparison is not vacuous)."""
    m = trimesh.creation.icosphere(2, radius=0.7)
    sv, sf = torch.tensor(m.vertices, dtype=torch.float32), torch.tensor(m.faces)
    pv, pf = _soup(60, 3)
    v = torch.cat([sv, pv + torch.tensor([0.2, 0.1, -0.3])])
    f = torch.cat([sf, pf + len(sv)])
    cams = look_at([30, 160], [20, -10], 2.8, image_size=(90, 96))
    kw = {"sigma": 3e-4, **kw}
    w = torch.rand(2, 90, 96, generator=torch.Generator().manual_seed(4))
    out = {}
    for cull in (True, False):
        vv = torch.stack([v, v * 0.9]).requires_grad_(True)
        img = silhouette(vv, f, cams, **kw, settings=RenderSettings(cull_tiles=cull))
        (img * w).sum().backward()
        out[cull] = (img.detach(), vv.grad)
    assert torch.equal(out[True][0], out[False][0])
    assert torch.equal(out[True][1], out[False][1])
    if kw["sigma"] > 0:
        assert out[True][1].abs().sum() > 0
    sc = project_mesh(v, f, cams[0])
    uvt, zt = sc.uv[sc.tri], sc.z[sc.tri]
    r = blur_radius(kw["sigma"] / (2 / 90) ** 2) if kw["sigma"] > 0 else 0.0
    if "radius" in kw:
        r = kw["radius"] / (2 / 90) ** 2
    fid, x0, y0 = face_tiles(uvt, zt, 90, 96, math.sqrt(r), 1e-3)
    assert len(_cull_tiles(face_table(uvt, zt), fid, x0, y0, r)) < 0.95 * len(fid)


@pytest.mark.parametrize("kw", [dict(sigma=1e-3), dict(sigma=1e-3, faces_per_pixel=2)])
def test_interleaved_silhouettes_keep_their_terms(kw):
    """The per-chunk scratch buffers are reused from call to call: two silhouettes whose
    backward passes run after both forward passes get the gradients of one at a time."""
    v, f = _sphere()
    v, f = torch.from_numpy(v), torch.from_numpy(f)
    cam = look_at(30, 20, 2.5, image_size=48)
    w = torch.rand(48, 48, generator=torch.Generator().manual_seed(5))
    meshes = [v, 0.7 * v + torch.tensor([0.1, 0.0, 0.0])]
    alone = []
    for m in meshes:
        vv = m.clone().requires_grad_(True)
        (silhouette(vv, f, cam, **kw) * w).sum().backward()
        alone.append(vv.grad)
    vs = [m.clone().requires_grad_(True) for m in meshes]
    imgs = [silhouette(vv, f, cam, **kw) for vv in vs]
    for img in reversed(imgs):
        (img * w).sum().backward()
    for vv, g in zip(vs, alone):
        assert torch.equal(vv.grad, g)
    assert not torch.equal(alone[0], alone[1])


@pytest.mark.parametrize("kw", [dict(sigma=1e-4, faces_per_pixel=25), dict(sigma=1e-4),
                                dict(sigma=1e-4, faces_per_pixel=3, radius=1e-4)])
def test_a_mesh_out_of_view_renders_empty_with_zero_gradient(kw):
    """A mesh that drifted out of the picture (no face near any pixel, every face in front of
    the camera): the image is all zero and backward gives a zero gradient, whatever the
    nearest-faces setting (the SVR refinement's default keeps the 25 nearest)."""
    v, f = _sphere()
    v, f = torch.from_numpy(v).double(), torch.from_numpy(f)
    cam = look_at(0, 0, 2.5, image_size=32)
    right = cam.R[0, 0].double()
    out = (v + 20.0 * right).requires_grad_(True)   # beside the view cone, at the same depth
    img = silhouette(out, f, cam, **kw)
    assert img.shape == (32, 32) and float(img.detach().abs().sum()) == 0
    (img * torch.rand(32, 32, dtype=D64)).sum().backward()
    assert out.grad is not None and torch.equal(out.grad, torch.zeros_like(out))
    # the same mesh moved back into view is seen and gets a gradient
    inside = v.clone().requires_grad_(True)
    seen = silhouette(inside, f, cam, **kw)
    (seen * torch.rand(32, 32, dtype=D64)).sum().backward()
    assert float(seen.detach().sum()) > 10 and float(inside.grad.abs().sum()) > 0


def test_fresh_scratch_buffers_change_no_bit():
    """RenderSettings(reuse_buffers=False) (fresh tensors per chunk) gives the image and the
    vertex gradient of the reused per-thread buffers, bit for bit."""
    v, f = map(torch.from_numpy, _sphere())
    cam = look_at(30, 20, 2.8, image_size=(48, 52))
    w = torch.rand(48, 52, generator=torch.Generator().manual_seed(2))
    out = []
    for reuse in (True, False):
        vv = v.clone().requires_grad_(True)
        img = silhouette(vv, f, cam, sigma=3e-4, settings=RenderSettings(reuse_buffers=reuse, chunk_tiles=64))
        (img * w).sum().backward()
        out.append((img.detach(), vv.grad))
    assert torch.equal(out[0][0], out[1][0]) and torch.equal(out[0][1], out[1][1])
    assert out[0][1].abs().sum() > 0


def test_render_settings_refuse_a_tile_wider_than_the_padding():
    with pytest.raises(ValueError, match="raster_tile"):
        RenderSettings(raster_tile=TILE + 1)
    with pytest.raises(ValueError, match="chunk_tiles"):
        RenderSettings(chunk_tiles=0)


def test_stages_carry_profiler_labels():
    """The renderers label their stages for torch.profiler (benchmarks/demo.py reads them)."""
    from lib.render import nr_silhouette

    v, f = map(torch.from_numpy, _sphere())
    cam = look_at(30, 20, 2.8, image_size=32)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        vv = v.clone().requires_grad_(True)
        silhouette(vv, f, cam, sigma=3e-4).sum().backward()
        vv = v.clone().requires_grad_(True)
        nr_silhouette(vv, f, cam).sum().backward()
        rasterize(v, f, cam)
    names = {e.key for e in prof.key_averages()}
    for label in ("render.silhouette.forward", "render.silhouette.backward", "render.hard_silhouette.forward",
                  "render.hard_silhouette.backward", "render.face_index", "render.rasterize"):
        assert label in names, label


@pytest.mark.parametrize("size", [4, 3, 1])
def test_face_tiles_cut_each_visible_face_box_into_tiles(size):
    """lib.render.screen.face_tiles against a face-by-face enumeration of the definition: each
    face with all depths above znear and a finite projection gets the tiles of its
    margin-expanded pixel box (pixel j in it iff lo <= j + 0.5 <= hi, clipped to the image),
    row by row, faces in order; small faces (one tile each, the fast path) and large ones,
    faces off the image, behind the camera and not finite."""
    from lib.render.screen import face_tiles
    g = torch.Generator().manual_seed(5)
    H, W, margin, znear = 30, 37, 0.7, 1e-3
    for spread in (0.8, 15.0):                  # every box within one tile, then many tiles
        c = torch.rand(300, 1, 2, generator=g) * torch.tensor([W + 10.0, H + 10.0]) - 5.0
        uvt = c + spread * (torch.rand(300, 3, 2, generator=g) - 0.5)
        zt = 0.5 + torch.rand(300, 3, generator=g)
        zt[::17, 1] = 0.0                       # behind the near plane
        uvt[::23, 2, 0] = float("nan")
        uvt[::29, 0, 1] = float("inf")
        want = []
        for i in range(300):
            u = uvt[i].double()
            if not (bool(torch.isfinite(u).all()) and float(zt[i].min()) > znear):
                continue
            lo, hi = u.min(0).values - margin, u.max(0).values + margin
            cols = [j for j in range(W) if lo[0] <= j + 0.5 <= hi[0]]
            rows = [j for j in range(H) if lo[1] <= j + 0.5 <= hi[1]]
            if cols and rows:
                want += [(i, x, y) for y in rows[::size] for x in cols[::size]]
        fid, x0, y0 = face_tiles(uvt, zt, H, W, margin, znear, size)
        assert list(zip(fid.tolist(), x0.tolist(), y0.tolist())) == want
        assert len(want) > 100


def test_face_table_rows_are_their_definitions_bit_for_bit():
    """lib.render.screen.face_table's 19 rows, written in place, hold each quantity's own
    arithmetic: corners, edges v_{i+1} - v_i, 1/|e|^2 (0 for a zero edge), the orientation (0 when
    degenerate), 1/z; float32 and float64, with degenerate faces, zero and negative depths."""
    g = torch.Generator().manual_seed(5)
    for dt in (torch.float32, torch.float64):
        uvt = torch.rand(300, 3, 2, generator=g, dtype=dt) * 50
        zt = torch.rand(300, 3, generator=g, dtype=dt) + 0.5
        uvt[:4, 1] = uvt[:4, 0]                                 # a zero edge
        uvt[4:7] = torch.tensor([[3.0, 1.0], [5.0, 2.0], [9.0, 4.0]], dtype=dt)  # collinear corners
        zt[7:9, 0], zt[9, 1] = 0.0, -2.0
        tab = face_table(uvt, zt)
        assert tab.shape == (19, 300) and tab.dtype == dt and tab.is_contiguous()
        v = [uvt[:, k] for k in range(3)]
        e = [v[(k + 1) % 3] - v[k] for k in range(3)]
        sq = torch.stack([ek[:, 0] * ek[:, 0] + ek[:, 1] * ek[:, 1] for ek in e])
        area2 = e[0][:, 0] * (-e[2][:, 1]) - e[0][:, 1] * (-e[2][:, 0])
        big = sq.max(0).values
        orient = torch.where(area2.abs() > 1e-12 * big, torch.sign(area2), torch.zeros_like(area2))
        for k in range(3):
            assert torch.equal(tab[2 * k:2 * k + 2], v[k].T) and torch.equal(tab[6 + 2 * k:8 + 2 * k], e[k].T)
            inv = torch.where(sq[k] > 0, 1.0 / sq[k].clamp(min=1e-30), torch.zeros_like(sq[k]))
            assert torch.equal(tab[12 + k], inv)
            assert torch.equal(tab[16 + k], 1.0 / zt[:, k].clamp(min=1e-30))
        assert torch.equal(tab[15], orient) and (orient[:7] == 0).all() and (orient[7:] != 0).all()
