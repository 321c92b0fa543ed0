"""The soft silhouette's K-nearest-faces mode (the SVR refinement's renderer): its fast
selection and schedule against the reference sort, and image and gradient against a dense
per-pixel evaluation of the definition."""
import math

import pytest
import torch
import trimesh

from lib.render import Camera, RenderSettings, look_at, silhouette
from lib.render.screen import project_mesh
from lib.runtime import thread_settings

D64 = torch.float64


def _layers(subdiv=3, dtype=torch.float32):
    """Three nested spheres (many faces per pixel, equal depths at shared vertices)."""
    m = trimesh.creation.icosphere(subdiv, radius=0.7)
    v = torch.tensor(m.vertices, dtype=D64)
    f = torch.tensor(m.faces)
    vs = [v, 0.8 * v + torch.tensor([0.05, 0.0, 0.1], dtype=D64), 0.6 * v + torch.tensor([-0.1, 0.05, 0.0], dtype=D64)]
    fs = [f + i * len(v) for i in range(3)]
    return torch.cat(vs).to(dtype), torch.cat(fs)


def _render(v, f, cam, w, settings=RenderSettings(), **kw):
    vv = v.clone().requires_grad_(True)
    img = silhouette(vv, f, cam, **kw, settings=settings)
    (img * w).sum().backward()
    return img.detach(), vv.grad


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("kw", [dict(sigma=1e-4, faces_per_pixel=25, radius=1e-5 * math.log(1e4 - 1)),
                                dict(sigma=3e-4, faces_per_pixel=4), dict(sigma=1e-4, faces_per_pixel=2, radius=2e-4)])
def test_radix_selection_keeps_the_slots_of_the_reference_sort(dtype, kw):
    """Integer-key selection on the over-full pixels (RenderSettings.radix_nearest) gives
    the image and vertex gradient of two stable float sorts of every candidate, bit for bit,
    in both precisions, with two cameras; and the selection is not vacuous (the K nearest
    differ from all faces)."""
    v, f = _layers(3, dtype)
    cams = look_at([30, 200], [20, -15], 2.6, image_size=(40, 44), dtype=dtype)
    w = torch.rand(2, 40, 44, generator=torch.Generator().manual_seed(3), dtype=dtype)
    fast = _render(v, f, cams, w, **kw)
    ref = _render(v, f, cams, w, RenderSettings(radix_nearest=False), **kw)
    assert torch.equal(fast[0], ref[0]) and torch.equal(fast[1], ref[1])
    every = _render(v, f, cams, w, **{**kw, "faces_per_pixel": None})
    assert not torch.equal(every[0], fast[0])
    assert fast[1].abs().sum() > 0


def test_chunks_side_by_side_change_no_bit():
    """Chunks evaluated two at a time on worker threads (lib.runtime.concurrently) give the
    image and gradient of one chunk after another, with and without the K nearest."""
    v, f = _layers(3)
    cam = look_at(40, 25, 2.6, image_size=48)
    w = torch.rand(48, 48, generator=torch.Generator().manual_seed(1))
    small = RenderSettings(chunk_tiles=97)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kw in (dict(sigma=1e-4, faces_per_pixel=25, radius=1e-4), dict(sigma=3e-4)):
            side = _render(v, f, cam, w, small, **kw)
            with thread_settings(concurrent=False):
                alone = _render(v, f, cam, w, small, **kw)
            assert torch.equal(side[0], alone[0]) and torch.equal(side[1], alone[1])
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
def test_selection_in_one_piece_equals_the_two_halves(dtype):
    """RenderSettings(split_nearest=False), the K nearest chosen over all pixels at once, gives
    the image and gradient of the two pixel halves (side by side or in turn), bit for bit, for
    two cameras (the halves then split inside a batch) and a separate blur radius or none."""
    v, f = _layers(3, dtype)
    cams = Camera.stack([look_at(40, 25, 2.6, image_size=(45, 52), dtype=dtype),
                         look_at(-70, 10, 2.2, image_size=(45, 52), dtype=dtype)])
    w = torch.rand(2, 45, 52, generator=torch.Generator().manual_seed(4), dtype=dtype)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for kw in (dict(sigma=1e-4, faces_per_pixel=6, radius=2e-4), dict(sigma=3e-4, faces_per_pixel=3)):
            halves = _render(v, f, cams, w, RenderSettings(chunk_tiles=97), **kw)
            whole = _render(v, f, cams, w, RenderSettings(chunk_tiles=97, split_nearest=False), **kw)
            with thread_settings(concurrent=False):
                in_turn = _render(v, f, cams, w, RenderSettings(chunk_tiles=97), **kw)
            every = _render(v, f, cams, w, **{**kw, "faces_per_pixel": None})
            assert torch.equal(whole[0], halves[0]) and torch.equal(whole[1], halves[1])
            assert torch.equal(in_turn[0], halves[0]) and torch.equal(in_turn[1], halves[1])
            assert not torch.equal(every[0], whole[0]) and whole[1].abs().sum() > 0
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("radius", [1e-4, None])
def test_kept_slots_gradient_terms_equal_the_chunks_bit_for_bit(dtype, radius):
    """With K above every pixel's candidate count nothing is dropped, so the K path (log-terms
    of the candidates, gradient terms of the kept slots alone, lib.render.silhouette
    _pair_terms) must give the all-faces path's image and gradient (terms of every slot of
    every chunk) bit for bit: odd chunk sizes, two cameras, both precisions, with and
    without a separate blur radius."""
    v, f = _layers(3, dtype)
    cams = Camera.stack([look_at(40, 25, 2.6, image_size=(45, 52), dtype=dtype),
                         look_at(-70, 10, 2.2, image_size=(45, 52), dtype=dtype)])
    w = torch.rand(2, 45, 52, generator=torch.Generator().manual_seed(3), dtype=dtype)
    kw = dict(sigma=3e-4, radius=radius)
    for settings in (RenderSettings(chunk_tiles=97), RenderSettings()):
        every = _render(v, f, cams, w, settings, **kw)
        kept = _render(v, f, cams, w, settings, faces_per_pixel=10 ** 6, **kw)
        assert torch.equal(kept[0], every[0]) and torch.equal(kept[1], every[1])
        assert kept[1].abs().sum() > 0


def test_sigmoid_bits_do_not_depend_on_the_slice():
    """lib.render.silhouette._sigmoid_ gives each element the same bits whatever call it is
    in (torch's own sigmoid computes the tail of a call on a scalar path with other bits)."""
    from lib.render.silhouette import _sigmoid_
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, D64):
        x = torch.randn(70001, generator=g, dtype=dtype) * 8
        whole = _sigmoid_(x.clone())
        assert torch.equal(whole, torch.sigmoid(x.double()).to(dtype)) or \
            (whole - torch.sigmoid(x.double())).abs().max() < 1e-6
        for a, b in ((0, 1), (5, 38), (3, 16387), (100, 70001), (16384, 16384 + 33)):
            assert torch.equal(_sigmoid_(x[a:b].clone()), whole[a:b])


def _dense(uv, z, tri, H, W, sigma, r, K, soft_inside):
    """The definition, pixel by face, in float64: (H, W) image, differentiable w.r.t. uv."""
    jj, ii = torch.meshgrid(torch.arange(W, dtype=D64) + 0.5, torch.arange(H, dtype=D64) + 0.5, indexing="xy")
    px, py = jj.reshape(-1, 1), ii.reshape(-1, 1)                 # (P, 1)
    v = [uv[tri[:, k]] for k in range(3)]                          # (F, 2) each
    iz = [1.0 / z[tri[:, k]] for k in range(3)]
    e = [v[(k + 1) % 3] - v[k] for k in range(3)]
    area2 = e[0][:, 0] * (-e[2][:, 1]) - e[0][:, 1] * (-e[2][:, 0])
    o = torch.sign(area2)
    ef, ts, ds = [], [], []
    for k in range(3):
        wx, wy = px - v[k][:, 0], py - v[k][:, 1]                  # (P, F)
        ef.append(o * (e[k][:, 0] * wy - e[k][:, 1] * wx))
        t = ((wx * e[k][:, 0] + wy * e[k][:, 1]) / (e[k] ** 2).sum(1)).clamp(0.0, 1.0)
        ts.append(t)
        ds.append((wx - t * e[k][:, 0]) ** 2 + (wy - t * e[k][:, 1]) ** 2)
    d = torch.stack(ds, -1)
    dmin, near = d.min(-1)
    inside = (ef[0] >= 0) & (ef[1] >= 0) & (ef[2] >= 0)
    band = dmin <= r
    s = torch.where(inside, -dmin, dmin)
    lsig = torch.nn.functional.logsigmoid(s / sigma)               # log(1 - p)
    if soft_inside:
        lsig = torch.where(band | inside, lsig, torch.zeros_like(lsig))
    else:
        lsig = torch.where(band, lsig, torch.where(inside, torch.full_like(lsig, -1e4), torch.zeros_like(lsig)))
    cand = (band | inside).detach()
    with torch.no_grad():
        area = (ef[0] + ef[1] + ef[2]).clamp(min=1e-30)
        inv_in = (ef[1] * iz[0] + ef[2] * iz[1] + ef[0] * iz[2]) / area
        t = torch.stack(ts, -1).gather(-1, near[..., None])[..., 0]
        iza = torch.stack(iz, -1).expand(*near.shape, 3).gather(-1, near[..., None])[..., 0]
        izb = torch.stack([iz[1], iz[2], iz[0]], -1).expand(*near.shape, 3).gather(-1, near[..., None])[..., 0]
        inv_out = (1.0 - t) * iza + t * izb
        depth = torch.where(inside, 1.0 / inv_in, 1.0 / inv_out)
        depth = torch.where(cand, depth, torch.full_like(depth, math.inf))
        order = torch.argsort(depth, dim=1, stable=True)           # ties: the lower face index
        rank = torch.empty_like(order)
        rank.scatter_(1, order, torch.arange(depth.shape[1]).expand_as(order))
        keep = cand & (rank < K)
    L = torch.where(keep, lsig, torch.zeros_like(lsig)).sum(1)
    return (-torch.expm1(L)).reshape(H, W)


@pytest.mark.parametrize("soft_inside", [True, False])
def test_k_nearest_image_and_gradient_match_a_dense_evaluation(soft_inside):
    """Independent triangles (no shared vertices, so no two depths tie) in many layers,
    float64: the image and dI/dverts equal a dense pixel-by-face evaluation of the
    definition (its gradient by autograd) to rounding, with K well below the layer count."""
    g = torch.Generator().manual_seed(7)
    n = 60
    c = (torch.rand(n, 1, 3, generator=g, dtype=D64) - 0.5) * torch.tensor([0.8, 0.8, 0.6], dtype=D64)
    v = (c + 0.3 * torch.randn(n, 3, 3, generator=g, dtype=D64)).reshape(-1, 3)
    f = torch.arange(3 * n).reshape(n, 3)
    H, W = 20, 24
    cam = look_at(10, 15, 2.5, image_size=(H, W), dtype=D64)
    scale = 2.0 / min(H, W)
    sigma, K = 2e-3, 3
    kw = dict(sigma=sigma, faces_per_pixel=K)
    if soft_inside:
        kw["radius"] = 1e-3
        r = kw["radius"] / scale ** 2
    else:
        kw["eps"] = 1e-6
        r = sigma * math.log(1e6 - 1) / scale ** 2
    wts = torch.rand(H, W, generator=g, dtype=D64)
    img, grad = _render(v, f, cam, wts, **kw)
    vv = v.clone().requires_grad_(True)
    sc = project_mesh(vv, f, cam)
    ref = _dense(sc.uv, sc.z, sc.tri, H, W, sigma / scale ** 2, r, K, soft_inside)
    (ref * wts).sum().backward()
    torch.testing.assert_close(img, ref.detach(), rtol=0, atol=1e-12)
    torch.testing.assert_close(grad, vv.grad, rtol=1e-9, atol=1e-9 * float(vv.grad.abs().max()))
    # the K nearest matter here: all faces give another image
    assert (silhouette(v, f, cam, **{**kw, "faces_per_pixel": None}) - img).abs().max() > 1e-3
    assert float(grad.abs().max()) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, D64])
@pytest.mark.parametrize("K", [1, 3, 25])
def test_bucketed_selection_drops_what_the_full_sort_drops(dtype, K):
    """The K-nearest selection's depth buckets and partial sort against two stable sorts of
    every candidate, on adversarial candidates: many equal depths (ties go to the earlier
    candidate), depths spanning decades (the bucket clamp), pixels with fewer than K."""
    from lib.render.silhouette import _farthest_radix, _farthest_sorted

    g = torch.Generator().manual_seed(K)
    n, npad = 20000, 300
    pix = torch.randint(0, npad, (n,), generator=g, dtype=torch.int32)
    pix[pix % 7 == 0] = 5                                          # one very full pixel
    levels = torch.tensor([0.5, 1.0, 1.0 + 2 ** -20, 2.0, 3.0, 1e3, 1e-3], dtype=dtype)
    depth = torch.where(torch.rand(n, generator=g) < 0.5, levels[torch.randint(0, 7, (n,), generator=g)],
                        torch.exp(torch.randn(n, generator=g, dtype=D64) * 4).to(dtype))
    ref = _farthest_sorted(pix.long(), depth, K)
    got = _farthest_radix(pix, depth, K, npad)
    assert ref.any() and torch.equal(got, ref)
    # at most K candidates everywhere: nothing to drop
    assert _farthest_radix(torch.arange(50, dtype=torch.int32), depth[:50], 1, 60) is None


def test_hard_coverage_with_k_nearest_is_the_coverage():
    """sigma = 0 with faces_per_pixel: the K nearest faces covering a pixel cover it, so the
    image is the hard coverage (it used to come out empty)."""
    v, f = _layers(2)
    cam = look_at(30, 20, 2.5, image_size=32)
    hard = silhouette(v, f, cam, sigma=0)
    assert float(hard.sum()) > 50
    for K in (1, 25):
        assert torch.equal(silhouette(v, f, cam, sigma=0, faces_per_pixel=K), hard)
