"""neural_renderer's conventions in pure torch: the hard silhouette with the approximate
gradient of Kato et al. (Neural 3D Mesh Renderer, CVPR 2018), and its default lighting.

The original MeshSDF demo renders with neural_renderer (CUDA only).  Two things of it are
reproduced here, on any device:

- ``nr_silhouette``: the hard coverage of the mesh at pixel centres (anti-aliasing off; both
  windings drawn, as its ``fill_back``) whose backward pass is Kato et al.'s edge-based
  rule, not a derivative of a soft image (its true derivative is zero almost everywhere).
  For each face edge and each pixel row / column that it crosses, with the pixel just
  inside the edge ("in") and the one just outside ("out"):
    * out: if the face is visible at the in-pixel, every pixel P beyond the edge, up to the
      image border along that scanline, would change by dI = I_in - I_P if the edge
      reached it.  Moving one endpoint of the edge across the scanline by
      d = (x_1 - x_0) / (x_1 - x_s) * (P - cross) (x_0, x_1 the endpoints' positions along
      the scanline axis, x_1 the other, fixed endpoint, x_s the scanline) moves the edge's
      crossing onto P, so the rule adds the slope dL/dp = dI * dL/dI_P / d, but only where
      that move would LOWER the loss (dI * dL/dI_P < 0); the others give 0.
    * in: every pixel P of the face on this scanline would take the out-pixel's value if
      the edge moved past it; same formula with dI = I_out - I_P.
  Distances get +-eps (in NDC units, 1e-4 as its silhouettes; eps * size / 2 in pixels) so
  that a pixel on the edge gives a finite slope.  Pixels are single-valued coverages
  (0 / 1), so the pairs that can contribute are: out: background pixels with dL/dI < 0;
  in: covered pixels of the face with dL/dI > 0 and a background out-pixel.  They are
  enumerated per scanline by sorted keys (no per-pixel Python loops), and summed in a
  fixed order (``lib.render``'s reproducible sums on CUDA).
- ``nr_shade``: flat-shaded RGBA renders lit as neural_renderer lights them.

Conventions are ``lib.camera``'s (rows down, pixel centres at integer + 0.5), which are
also neural_renderer's in projection mode after its own flips, so images match its
orientation pixel for pixel.
"""
from __future__ import annotations

import torch

from lib.camera import Camera
from lib.render import _screen, _segment_sum, _use_fixed, face_index

NR_EPS = 1e-4                # neural_renderer's rasterize_silhouettes eps (NDC units)
NR_AMBIENT, NR_DIRECTIONAL, NR_LIGHT_DIRECTION = 0.5, 0.5, (0.0, 1.0, 0.0)   # its default light
PAIR_CHUNK = 1 << 21         # about this many (crossing, pixel) pairs evaluated at once in the backward pass


def nr_silhouette(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, eps: float = NR_EPS,
                  reproducible: bool | None = None, face_idx: torch.Tensor | None = None) -> torch.Tensor:
    """Hard silhouette (H, W) in {0, 1} with Kato et al.'s approximate gradient (module doc).

    verts (V, 3) float, differentiable; faces (F, 3) int64; camera unbatched.  The coverage is
    ``lib.render.face_index``'s (nearest face at each pixel centre, both windings); a caller
    that also needs that index (e.g. for a picture of the same mesh and camera) computes it
    once and passes it as ``face_idx`` (H, W) int64.
    reproducible: as ``lib.render.silhouette`` (default: on CUDA).
    """
    if verts.dim() != 2 or camera.batched:
        raise ValueError("nr_silhouette renders one mesh (V, 3) with an unbatched camera")
    faces = torch.as_tensor(faces, device=verts.device).long()
    sc = _screen(verts, faces, camera)
    fidx = face_index(verts, faces, camera) if face_idx is None else face_idx
    return _KatoSilhouette.apply(sc.uv, fidx, faces, float(eps), _use_fixed(verts.device, reproducible))


class _KatoSilhouette(torch.autograd.Function):
    """uv (V, 2) pixel coordinates -> coverage (H, W); backward: Kato et al.'s rule."""

    @staticmethod
    def forward(ctx, uv, face_idx, faces, eps, reproducible):
        alpha = (face_idx >= 0).to(uv.dtype)
        ctx.save_for_backward(uv, face_idx, faces)
        ctx.eps, ctx.reproducible = eps, reproducible
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha):
        uv, face_idx, faces = ctx.saved_tensors
        H, W = face_idx.shape
        grad_uv = uv.new_zeros(uv.shape)
        g = grad_alpha.to(uv.dtype)
        # index coordinates: pixel centres on the integers (column X, row Y)
        X, Y = uv[:, 0].detach() - 0.5, uv[:, 1].detach() - 0.5
        # axis 0: scanlines are columns (position X), moves along Y -> gradient of v;
        # axis 1: scanlines are rows (position Y), moves along X -> gradient of u
        for axis, (p0, p1, fi, gg, n0, n1, size) in enumerate(
                ((X, Y, face_idx.T, g.T, W, H, H), (Y, X, face_idx, g, H, W, W))):
            contrib = _kato_axis(p0, p1, faces, fi.contiguous(), gg.contiguous(), n0, n1, ctx.eps * size / 2.0,
                                 ctx.reproducible)
            grad_uv[:, 1 - axis] += contrib
        return grad_uv, None, None, None, None


def _kato_axis(p0, p1, faces, fi, g, n0, n1, eps_px, reproducible):
    """dL/d(p1) (V,) of Kato's rule for scanlines at integer p0 (0..n0-1), pixels along p1.

    fi (n0, n1) face index and g (n0, n1) dL/dI, indexed [scanline, position along it].
    """
    dev, dt = p0.device, p0.dtype
    V = p0.shape[0]
    alpha = fi >= 0
    visible = torch.zeros(faces.shape[0] + 1, dtype=torch.bool, device=dev)
    visible[fi.reshape(-1) + 1] = True                      # slot 0 collects the background
    vf = visible[1:].nonzero().squeeze(1)
    if vf.numel() == 0:
        return p0.new_zeros(V)
    tri = faces[vf]                                          # (Fv, 3)
    ia = tri.reshape(-1)                                     # edge k of a face: (k, k+1), third k+2
    ib = tri.roll(-1, dims=1).reshape(-1)
    ic = tri.roll(-2, dims=1).reshape(-1)
    fe = vf.repeat_interleave(3)
    a0, a1, b0, b1, c0, c1 = p0[ia], p1[ia], p0[ib], p1[ib], p0[ic], p1[ic]
    lo = torch.ceil(torch.minimum(a0, b0)).clamp(min=0)
    hi = torch.floor(torch.maximum(a0, b0)).clamp(max=n0 - 1)
    slope = (b1 - a1) / torch.where(b0 != a0, b0 - a0, torch.ones_like(a0))
    inner = torch.sign(c1 - (a1 + slope * (c0 - a0)))       # side of the face along p1
    count = torch.where((b0 != a0) & (inner != 0), (hi - lo + 1).clamp(min=0), torch.zeros_like(lo)).long()
    e = torch.repeat_interleave(torch.arange(len(count), device=dev), count)
    if e.numel() == 0:
        return p0.new_zeros(V)
    start = torch.cumsum(count, 0) - count
    d0 = (lo[e] + (torch.arange(len(e), device=dev) - start[e]).to(dt))
    cross = a1[e] + slope[e] * (d0 - a0[e])
    direction = -inner[e]                                    # towards the outside
    d1_in = torch.where(direction > 0, torch.floor(cross), torch.ceil(cross))
    d1_out = d1_in + direction
    ok = (d1_in >= 0) & (d1_in <= n1 - 1) & (d1_out >= 0) & (d1_out <= n1 - 1)
    d0i = d0.long()
    din = d1_in.long().clamp(0, n1 - 1)
    dout = d1_out.long().clamp(0, n1 - 1)
    f_in = fi[d0i, din]
    a_out = alpha[d0i, dout]

    # per crossing: moving endpoint a (resp. b) alone by k_a * dc (k_b * dc) moves the crossing
    # by dc; k = span / lever, unusable when the lever is 0 (the scanline through the endpoint)
    span = (b0 - a0)[e]
    lever_a, lever_b = b0[e] - d0, d0 - a0[e]
    use_a, use_b = lever_a != 0, lever_b != 0
    k_a = span / torch.where(use_a, lever_a, torch.ones_like(lever_a))
    k_b = span / torch.where(use_b, lever_b, torch.ones_like(lever_b))
    sum_a, sum_b = p0.new_zeros(len(e)), p0.new_zeros(len(e))

    def slope_sum(k, dc, diff, lengths):
        """Per crossing: sum over its pixels of -diff / (k dc +- eps), pairs contiguous per crossing."""
        dist = k * dc
        dist = torch.where(dist > 0, dist + eps_px, dist - eps_px)
        return torch.segment_reduce(-diff / dist, "sum", lengths=lengths)

    def pairs(sel, keys, key_lo, key_hi, diff_of):
        """Add the slopes of pairs (crossing in sel, candidate pixel with key in [key_lo, key_hi])."""
        if sel.numel() == 0 or keys.numel() == 0:
            return
        s = torch.searchsorted(keys, key_lo[sel])
        n = (torch.searchsorted(keys, key_hi[sel], right=True) - s).clamp(min=0)
        keep = n > 0
        sel, s, n = sel[keep], s[keep], n[keep]
        if sel.numel() == 0:
            return
        ends = torch.cumsum(n, 0)
        # groups of whole crossings with about PAIR_CHUNK pairs each (bounded memory)
        total = int(ends[-1])
        bounds = [0, len(sel)]
        if total > PAIR_CHUNK:
            marks = torch.arange(PAIR_CHUNK, total, PAIR_CHUNK, device=dev)
            cuts = (torch.searchsorted(ends, marks) + 1).clamp(max=len(sel)).unique().tolist()
            bounds = [0] + cuts + ([len(sel)] if cuts[-1] != len(sel) else [])
        for lo_c, hi_c in zip(bounds[:-1], bounds[1:]):
            if hi_c <= lo_c:
                continue
            cs, cn, cx = s[lo_c:hi_c], n[lo_c:hi_c], sel[lo_c:hi_c]
            k = torch.repeat_interleave(torch.arange(len(cn), device=dev), cn)
            first = torch.cumsum(cn, 0) - cn
            cand = cs[k] + (torch.arange(len(k), device=dev) - first[k])
            d1, diff = diff_of(cand)                         # position along p1, dI * dL/dI (> 0)
            dc = d1.to(dt) - cross[cx][k]
            sum_a.index_add_(0, cx, slope_sum(k_a[cx][k], dc, diff, cn))   # cx unique: no atomics race
            sum_b.index_add_(0, cx, slope_sum(k_b[cx][k], dc, diff, cn))

    # out: the face is visible at the in-pixel; background pixels beyond with dL/dI < 0
    sel_out = (ok & (f_in == fe[e])).nonzero().squeeze(1)
    cand_out = (~alpha & (g < 0)).reshape(-1).nonzero().squeeze(1)          # sorted keys
    base = d0i * n1
    lo_out = torch.where(direction > 0, base + dout, base)
    hi_out = torch.where(direction > 0, base + n1 - 1, base + dout)
    g_flat = g.reshape(-1)
    pairs(sel_out, cand_out, lo_out, hi_out,
          lambda c: (cand_out[c] % n1, -g_flat[cand_out[c]]))               # dI = 0 - 1
    # in: background out-pixel; this face's pixels on the scanline with dL/dI > 0
    sel_in = (ok & ~a_out).nonzero().squeeze(1)
    px = (alpha & (g > 0)).reshape(-1).nonzero().squeeze(1)
    fkey = fi.reshape(-1)[px] * (n0 * n1) + px
    order = torch.argsort(fkey)
    keys_in, px_in = fkey[order], px[order]
    fbase = fe[e] * (n0 * n1) + base
    pairs(sel_in, keys_in, fbase, fbase + n1 - 1,
          lambda c: (px_in[c] % n1, g_flat[px_in[c]]))                      # dI = 1 - 0
    idx = torch.cat([ia[e][use_a], ib[e][use_b]])
    val = torch.cat([sum_a[use_a], sum_b[use_b]])
    return _segment_sum(idx, val[:, None], V, reproducible=reproducible)[:, 0]


def nr_shade(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, face_colors=None, color: float = 0.7,
             ambient: float = NR_AMBIENT, directional: float = NR_DIRECTIONAL,
             light_direction=NR_LIGHT_DIRECTION, face_idx: torch.Tensor | None = None) -> torch.Tensor:
    """RGBA render (H, W, 4) lit as neural_renderer lights a mesh in projection mode.

    The original demo's pictures (target.png, initialization.png, movie frames) come from
    neural_renderer with its default light (see ``nr_face_rgb``), black background, alpha =
    hard coverage.  verts (V, 3), faces (F, 3) int64, unbatched camera; face_colors (F, 3)
    in [0, 1] or None for uniform grey ``color``; face_idx: ``lib.render.face_index`` of this
    mesh and camera (H, W) if the caller has it already, else computed.  Not
    differentiable (pictures only).
    """
    verts = verts.detach()
    faces = torch.as_tensor(faces, device=verts.device).long()
    fidx = face_idx if face_idx is not None else face_index(verts, faces, camera)
    H, W = fidx.shape[-2:]
    if faces.shape[0] == 0:
        return torch.zeros(H, W, 4, dtype=verts.dtype, device=verts.device)
    rgb = nr_face_rgb(verts, faces, camera, face_colors, color, ambient, directional, light_direction)
    # one gather from a table of face colours whose row 0 is the black, transparent background
    table = torch.cat([rgb.new_zeros(1, 4), torch.cat([rgb, torch.ones_like(rgb[:, :1])], 1)], 0)
    return table.index_select(0, (fidx + 1).reshape(-1)).view(H, W, 4)


def nr_face_rgb(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, face_colors=None, color: float = 0.7,
                ambient: float = NR_AMBIENT, directional: float = NR_DIRECTIONAL,
                light_direction=NR_LIGHT_DIRECTION) -> torch.Tensor:
    """The lit colour (F, 3) of each face as neural_renderer draws it (``nr_shade``'s pixels).

    Flat per-face colour c times ``ambient + directional * max(0, n . light_direction)``
    (world frame; its default light comes from +y).  Its face normal is cross(v0 - v1,
    v2 - v1) and it draws each face twice (both windings), keeping at each pixel the copy
    that is counter-clockwise in its y-up image, i.e. clockwise in ours (rows down).  So the
    normal it lights is the face normal turned AWAY from the camera, whatever the mesh's
    winding: surfaces facing down get the directional light, surfaces facing up and the
    camera only the ambient part.  We reproduce that, not a physical light.
    verts (V, 3) and faces (F, 3) int64 on one device; face_colors (F, 3) or None (grey ``color``).
    """
    verts = verts.detach()
    uv, _ = camera.to(device=verts.device, dtype=verts.dtype).project(verts)
    flat = faces.reshape(-1)                                         # index_select: ~3x faster than x[faces]
    t = uv.index_select(0, flat).view(-1, 3, 2)                      # (F, 3, 2)
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    clockwise = (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) < 0      # in our rows-down image
    tri = verts.index_select(0, flat).view(-1, 3, 3)
    n = torch.nn.functional.normalize(torch.cross(tri[:, 0] - tri[:, 1], tri[:, 2] - tri[:, 1], dim=1),
                                      dim=1, eps=1e-5)
    n = torch.where(clockwise[:, None], n, -n)                      # the copy neural_renderer draws
    light_dir = torch.as_tensor(light_direction, dtype=verts.dtype, device=verts.device)
    light = ambient + directional * (n @ light_dir).clamp(min=0.0)   # (F,)
    if face_colors is None:
        return (color * light)[:, None].expand(-1, 3)
    return torch.as_tensor(face_colors, dtype=verts.dtype, device=verts.device) * light[:, None]
