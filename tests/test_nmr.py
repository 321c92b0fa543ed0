"""lib.render.hard_silhouette: Kato et al.'s approximate silhouette gradient checked against the pixel flips it
stands for, and neural_renderer's lighting conventions written out from its rules."""
import math

import pytest
import torch

from lib.isosurface import extract
from lib.render import DEFAULT, NR_EPS, Camera, RenderSettings, demo_camera, nr_shade, nr_silhouette, rasterize
from lib.render.hard_silhouette import _kato_axis

D64 = torch.float64
S = 32
F_PX = 16.0          # u = 16 x / z + 16 for the test camera


def _camera():
    return Camera(torch.eye(3, dtype=D64), torch.zeros(3, dtype=D64), torch.tensor([F_PX, F_PX], dtype=D64),
                  torch.tensor([S / 2, S / 2], dtype=D64), (S, S))


def _triangle():
    # in the z = 1 plane, so a world move of x or y by d moves u or v by 16 d exactly
    return torch.tensor([[-0.61, -0.43, 1.0], [0.52, -0.58, 1.0], [0.07, 0.66, 1.0]], dtype=D64)


FACE = torch.tensor([[0, 1, 2]])


def _one_pixel_grad(verts, i, j, sign, eps=NR_EPS):
    v = verts.clone().requires_grad_(True)
    (sign * nr_silhouette(v, FACE, _camera(), eps=eps)[i, j]).backward()
    return v.grad


def test_kato_gradient_is_the_slope_of_the_move_that_flips_the_pixel():
    """L = -I_P for a background pixel (covering it lowers L) or +I_P for a covered one.
    Kato's slope dL/dp = dI dL/dI / d says: moving that vertex coordinate by -1/slope flips
    P.  Checked for every pixel and every vertex coordinate on exactly one edge crossing the
    pixel's scanline, for moves of 0.2 to 3 pixels: 5 % short of the move P is unchanged,
    5 % beyond it P has flipped.  With a tiny eps, which otherwise lengthens every move by
    eps * S / 2 pixels (0.016 px at the original's 1e-3: 8 % of a 0.2 px move)."""
    verts = _triangle()
    cam = _camera()
    base = nr_silhouette(verts, FACE, cam).detach()
    assert 60 < int(base.sum()) < 400
    uvx = verts[:, :2] * F_PX + S / 2 - 0.5              # pixel centres on the integers
    checked = {0.0: 0, 1.0: 0}
    # pixels within 3 px of the silhouette's border (farther ones need longer moves), a third of them
    m = base[None, None]
    ring = (torch.nn.functional.max_pool2d(m, 7, 1, 3) > 0) & (-torch.nn.functional.max_pool2d(-m, 7, 1, 3) < 1)
    for i, j in ring[0, 0].nonzero().tolist():
        if (i + j) % 2:
            continue
        if True:
            sign = 1.0 if base[i, j] > 0 else -1.0
            g = _one_pixel_grad(verts, i, j, sign, eps=1e-6)
            for k in range(3):
                for ax in range(2):
                    if float(g[k, ax]) == 0.0:
                        continue
                    move = -1.0 / float(g[k, ax])             # L drops by 1 when P flips
                    if not 0.2 <= abs(move) * F_PX <= 3.0:
                        continue
                    # y moves come from column scanlines (X = j), x moves from rows (Y = i)
                    pos, coord = (j, uvx[:, 0]) if ax == 1 else (i, uvx[:, 1])
                    spanning = [e for e in ((0, 1), (1, 2), (2, 0))
                                if min(coord[e[0]], coord[e[1]]) <= pos <= max(coord[e[0]], coord[e[1]])]
                    if sum(k in e for e in spanning) != 1:
                        continue
                    for frac, flipped in ((0.95, False), (1.05, True)):
                        w = verts.clone()
                        w[k, ax] += move * frac
                        now = float(nr_silhouette(w, FACE, cam)[i, j])
                        assert (now != float(base[i, j])) == flipped, (i, j, k, ax, move, frac)
                    checked[float(base[i, j])] += 1
    assert checked[0.0] > 15 and checked[1.0] > 5           # both the out and the in rule


def test_no_gradient_from_moves_that_would_raise_the_loss():
    verts = _triangle()
    base = nr_silhouette(verts, FACE, _camera()).detach()
    outside = (base == 0).nonzero()[::25]
    inside = (base == 1).nonzero()[::6]
    for (i, j) in outside.tolist():            # L = +I_P: covering P would raise L
        assert float(_one_pixel_grad(verts, i, j, 1.0).abs().sum()) == 0.0
    for (i, j) in inside.tolist():             # L = -I_P: uncovering P would raise L
        assert float(_one_pixel_grad(verts, i, j, -1.0).abs().sum()) == 0.0


def test_forward_is_the_hard_coverage_and_mse_descends():
    """The image is the z-buffer's coverage; a small step against Kato's gradient of the demo
    loss (MSE to a larger sphere's silhouette) lowers it, and the gradient grows the sphere."""
    cam = demo_camera(image_size=48)
    v, f, _ = extract(lambda p: p.norm(dim=1) - 0.45, 20, "dense")
    img = nr_silhouette(v, f, cam)
    assert torch.equal(img, rasterize(v, f, cam).mask.float())
    tv, tf, _ = extract(lambda p: p.norm(dim=1) - 0.55, 20, "dense")
    target = rasterize(tv, tf, cam).mask.float()
    vv = v.double().requires_grad_(True)
    loss = (nr_silhouette(vv, f, cam) - target).square().mean()
    loss.backward()
    g = vv.grad
    radial = (g * vv.detach()).sum(1)
    assert float(radial.sum()) < 0                          # descent pushes vertices outwards
    step = vv.detach() - 0.02 * g / g.norm(dim=1, keepdim=True).max()
    assert float((nr_silhouette(step, f, cam) - target).square().mean()) < float(loss.detach())


def test_eps_is_the_originals_in_ndc():
    """Distances carry +-eps = 1e-3 NDC units (the rasterizer_eps the original's nr.Renderer
    passes, docs/compatibility.md), eps * S / 2 pixels, by default and so in the demo's loss: for a
    pixel 0.001 px inside an edge, the slope of the one endpoint whose lever is known is
    -1 / (span / lever * 0.001 + eps * S / 2) per pixel of v."""
    assert NR_EPS == 1e-3
    v = torch.tensor([[-0.5, -0.5, 1.0], [0.5, -0.5, 1.0], [-0.5, 0.5, 1.0]], dtype=D64)
    v[:2, 1] = (8.5 - 0.001 - S / 2) / F_PX          # edge v0-v1 0.001 px above row 8's centres
    g = _one_pixel_grad(v, 8, 12, 1.0)                 # P = (8, 12) covered; uncovering lowers L
    x0, x1 = float(v[0, 0]) * F_PX + S / 2 - 0.5, float(v[1, 0]) * F_PX + S / 2 - 0.5
    dist = (x1 - x0) / (x1 - 12) * 0.001 + 1e-3 * S / 2
    assert float(g[0, 1]) / F_PX == pytest.approx(-1.0 / dist, rel=1e-6)
    # the demo's loss renderer takes the default
    from lib.optimize import SilhouetteLoss

    cam = _camera()
    target = torch.zeros(S, S, dtype=D64)
    vv = v.clone().requires_grad_(True)
    SilhouetteLoss(cam, target, loss="mse", renderer="nr")(vv, FACE)[0].backward()
    ref = v.clone().requires_grad_(True)
    (nr_silhouette(ref, FACE, cam, eps=1e-3) - target).square().mean().backward()
    assert torch.equal(vv.grad, ref.grad) and float(vv.grad.abs().max()) > 0


def test_nr_shade_lights_the_normal_facing_the_camera():
    """As the original: light = 0.5 + 0.5 max(0, n . (0, 1, 0)), grey 0.7, n the unit face normal
    turned towards the camera (whatever the winding).  A horizontal square seen from above
    gets the full light (0.7), seen from below the ambient part only (0.35)."""
    sq = torch.tensor([[-0.5, 0.0, -0.5], [0.5, 0.0, -0.5], [0.5, 0.0, 0.5], [-0.5, 0.0, 0.5]])
    faces = torch.tensor([[0, 1, 2], [0, 2, 3]])
    for el, expect in ((60.0, 0.7), (-60.0, 0.35)):
        from lib.render import look_at
        cam = look_at(20.0, el, 3.0, image_size=32)
        for fc in (faces, faces.flip(1)):
            img = nr_shade(sq, fc, cam)
            cov = img[..., 3] > 0
            assert int(cov.sum()) > 50
            assert torch.allclose(img[cov][:, :3], torch.full_like(img[cov][:, :3], expect), atol=1e-5)
            assert float(img[~cov].abs().sum()) == 0                           # black, transparent
    # per-face colours are multiplied by the same light
    cam = look_at(20.0, 60.0, 3.0, image_size=32)
    img = nr_shade(sq, faces, cam, face_colors=torch.tensor([[1.0, 0.0, 0.7], [0.0, 1.0, 0.7]]))
    cols = {tuple(round(float(c), 4) for c in px) for px in img[img[..., 3] > 0][:, :3]}
    assert cols == {(1.0, 0.0, 0.7), (0.0, 1.0, 0.7)}
    # a tilted face: the directional part follows max(0, n . y) with n facing the camera
    tilt = math.radians(30)
    tri = torch.tensor([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0], [0.0, math.sin(tilt), math.cos(tilt)]]) - 0.3
    cam = look_at(0.0, 70.0, 3.0, image_size=32)
    n = torch.nn.functional.normalize(torch.cross(tri[1] - tri[0], tri[2] - tri[0], dim=0), dim=0)
    towards = n if float(n @ (cam.eye - tri.mean(0))) > 0 else -n
    expect = 0.7 * (0.5 + 0.5 * max(0.0, float(towards[1])))
    assert expect > 0.55                                  # the directional part is there
    for fc in (torch.tensor([[0, 1, 2]]), torch.tensor([[0, 2, 1]])):
        img = nr_shade(tri, fc, cam)
        cov = img[..., 3] > 0
        assert torch.allclose(img[cov][:, 0], torch.full_like(img[cov][:, 0], expect), atol=1e-5)


def test_pair_chunks_and_reproducible_sums_do_not_change_the_gradient(monkeypatch):
    cam = demo_camera(image_size=40)
    v, f, _ = extract(lambda p: p.norm(dim=1) - 0.45, 16, "dense")
    tv, tf, _ = extract(lambda p: (p - 0.08).norm(dim=1) - 0.5, 16, "dense")
    target = rasterize(tv, tf, cam).mask.double()
    grads = []
    for chunk in (DEFAULT.kato_pair_chunk, 300):
        vv = v.double().requires_grad_(True)
        (nr_silhouette(vv, f, cam, settings=RenderSettings(kato_pair_chunk=chunk)) - target).square().sum().backward()
        grads.append(vv.grad)
    vv = v.double().requires_grad_(True)                      # the CUDA path's sorted sums, on the CPU
    (nr_silhouette(vv, f, cam, reproducible=True) - target).square().sum().backward()
    grads.append(vv.grad)
    assert float(grads[0].abs().sum()) > 0
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(grads[2], grads[0], rtol=1e-12, atol=1e-12)
    # the two axes side by side (lib.runtime.concurrently, 2 threads) or in order: the same bits
    from lib import runtime
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for side_by_side in (True, False):
            monkeypatch.setattr(runtime.SETTINGS, "concurrent", side_by_side)
            vv = v.double().requires_grad_(True)
            (nr_silhouette(vv, f, cam) - target).square().sum().backward()
            grads.append(vv.grad)
    finally:
        torch.set_num_threads(old)
    assert torch.equal(grads[-2], grads[-1]) and torch.equal(grads[-1], grads[1])


def _kato_reference(p0, p1, faces, fi, g, eps_px):
    """Kato's rule of lib.render.hard_silhouette's module doc, pair by pair in plain Python: for every edge of
    every visible face and every scanline it crosses, the in-pixel / out-pixel rules, each
    candidate pixel P on the scanline, and each endpoint whose lever is not 0.  Returns
    dL/d(p1) per vertex and counts of what was exercised."""
    n0, n1 = len(fi), len(fi[0])
    grad = [0.0] * len(p0)
    seen = {"out": 0, "in": 0, "up": 0, "down": 0, "on edge": 0, "lever 0": 0}
    for f in sorted({x for row in fi for x in row} - {-1}):
        tri = faces[f]
        for kk in range(3):
            a, b, c = tri[kk], tri[(kk + 1) % 3], tri[(kk + 2) % 3]
            a0, a1, b0, b1, c0, c1 = p0[a], p1[a], p0[b], p1[b], p0[c], p1[c]
            if a0 == b0:
                continue
            slope = (b1 - a1) / (b0 - a0)
            side = c1 - (a1 + slope * (c0 - a0))
            if side == 0:
                continue
            direction = 1 if side < 0 else -1                 # towards the outside of the face
            for d0 in range(max(0, math.ceil(min(a0, b0))), min(n0 - 1, math.floor(max(a0, b0))) + 1):
                cross = a1 + slope * (d0 - a0)
                d_in = math.floor(cross) if direction > 0 else math.ceil(cross)
                d_out = d_in + direction
                if not (0 <= d_in < n1 and 0 <= d_out < n1):
                    continue
                pairs = []
                if fi[d0][d_in] == f:                         # out: pixels beyond, up to the border
                    P = d_out
                    while 0 <= P < n1:
                        if fi[d0][P] < 0 and g[d0][P] < 0:    # dI = I_in - I_P = 1, dI dL/dI < 0
                            pairs.append((P, 1.0))
                            seen["out"] += 1
                        P += direction
                if fi[d0][d_out] < 0:                         # in: the face's pixels on the scanline
                    for P in range(n1):
                        if fi[d0][P] == f and g[d0][P] > 0:   # dI = I_out - I_P = -1
                            pairs.append((P, -1.0))
                            seen["in"] += 1
                seen["up" if direction > 0 else "down"] += len(pairs)
                for P, dI in pairs:
                    seen["on edge"] += P == cross
                    for v, lever in ((a, b0 - d0), (b, d0 - a0)):
                        if lever == 0:
                            seen["lever 0"] += 1
                            continue
                        dist = (b0 - a0) / lever * (P - cross)
                        dist = dist + eps_px if dist > 0 else dist - eps_px
                        grad[v] += dI * g[d0][P] / dist
    return torch.tensor(grad, dtype=D64), seen


def _inside(tri, q0, q1):
    (x0, y0), (x1, y1), (x2, y2) = tri
    d = [(x1 - x0) * (q1 - y0) - (y1 - y0) * (q0 - x0), (x2 - x1) * (q1 - y1) - (y2 - y1) * (q0 - x1),
         (x0 - x2) * (q1 - y2) - (y0 - y2) * (q0 - x2)]
    return min(d) >= 0 or max(d) <= 0


def test_kato_axis_matches_the_rule_pair_by_pair():
    """hard_silhouette._kato_axis against _kato_reference on a 16 x 16 image: three triangles, one
    with edges along both axes through pixel centres (pixels on the edge: the eps path),
    vertices on scanlines (levers of 0) and off them, a face index with stray pixels (faces seen outside
    their triangles, holes), dL/dI of both signs and zeros; both scanline axes (the image and
    its transpose, as the backward pass calls it), the reproducible sums, tiny pair chunks and
    both extremes of block merging."""
    gen = torch.Generator().manual_seed(5)
    n = 16
    p = torch.tensor([[2.0, 3.0], [12.0, 3.0], [2.0, 12.0], [14.7, 8.2], [8.0, 14.5], [0.6, 14.9]], dtype=D64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 4], [2, 4, 5]])
    fi = torch.full((n, n), -1, dtype=torch.long)
    for i in range(n):
        for j in range(n):
            for f, tri in enumerate(faces.tolist()):
                if _inside([p[v].tolist() for v in tri], i, j):
                    fi[i, j] = f
                    break
    stray = torch.rand(n, n, generator=gen) < 0.12
    fi[stray] = torch.randint(-1, 3, (int(stray.sum()),), generator=gen)
    g = torch.randn(n, n, generator=gen, dtype=D64) * (torch.rand(n, n, generator=gen) < 0.85)
    eps_px = NR_EPS * n / 2
    for q0, q1, fq, gq in ((p[:, 0], p[:, 1], fi, g), (p[:, 1], p[:, 0], fi.T.contiguous(), g.T.contiguous())):
        ref, seen = _kato_reference(q0.tolist(), q1.tolist(), faces.tolist(), fq.tolist(), gq.tolist(), eps_px)
        assert min(seen.values()) > 0, seen                  # every path is exercised
        runs = [_kato_axis(q0, q1, faces, fq, gq, n, n, eps_px, False),
                _kato_axis(q0, q1, faces, fq, gq, n, n, eps_px, True)]
        for chunk, small in ((5, DEFAULT.kato_small_block), (DEFAULT.kato_pair_chunk, 0),
                             (DEFAULT.kato_pair_chunk, 1 << 30)):
            settings = RenderSettings(kato_pair_chunk=chunk, kato_small_block=small)
            runs.append(_kato_axis(q0, q1, faces, fq, gq, n, n, eps_px, False, settings=settings))
        assert float(ref.abs().max()) > 1.0
        for got in runs:
            torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9 * float(ref.abs().max()))
        for reproducible in (False, True):                    # no pairs at all: zeros
            assert not _kato_axis(q0, q1, faces, fq, gq * 0, n, n, eps_px, reproducible).any()


def test_nr_silhouette_backward_is_the_rule_on_both_axes():
    """End to end: the vertex gradient of sum(G * nr_silhouette) is the rule applied to column
    scanlines (moves of v) and row scanlines (moves of u), eps = NR_EPS * S / 2 pixels, in
    index coordinates (pixel centres on the integers): on the z = 1 plane dL/dx = 16 dL/du."""
    gen = torch.Generator().manual_seed(3)
    verts = torch.tensor([[-0.61, -0.43, 1.0], [0.52, -0.58, 1.0], [0.07, 0.66, 1.0], [0.8, 0.45, 1.0]], dtype=D64)
    faces = torch.tensor([[0, 1, 2], [1, 3, 2]])
    cam = _camera()
    G = torch.randn(S, S, generator=gen, dtype=D64)
    v = verts.clone().requires_grad_(True)
    (nr_silhouette(v, faces, cam) * G).sum().backward()
    from lib.render import face_index
    fi = face_index(verts, faces, cam)
    uvx = verts[:, :2] * F_PX + S / 2 - 0.5
    eps_px = NR_EPS * S / 2
    d_v, _ = _kato_reference(uvx[:, 0].tolist(), uvx[:, 1].tolist(), faces.tolist(), fi.T.tolist(), G.T.tolist(),
                             eps_px)
    d_u, _ = _kato_reference(uvx[:, 1].tolist(), uvx[:, 0].tolist(), faces.tolist(), fi.tolist(), G.tolist(), eps_px)
    expect = torch.stack([d_u, d_v], 1) * F_PX
    assert float(expect.abs().max()) > 1.0
    torch.testing.assert_close(v.grad[:, :2], expect, rtol=1e-9, atol=1e-9 * float(expect.abs().max()))
