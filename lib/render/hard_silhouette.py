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
  Distances get +-eps (in NDC units, 1e-3 as in the original's call path, whose
  ``nr.Renderer`` passes rasterizer_eps 1e-3; eps * size / 2 in pixels) so that a pixel on
  the edge gives a finite slope.  Pixels are single-valued coverages
  (0 / 1), so the pairs that can contribute are: out: background pixels with dL/dI < 0;
  in: covered pixels of the face with dL/dI > 0 and a background out-pixel.  They are
  enumerated per scanline by sorted keys (no per-pixel Python loops): a crossing's pixels
  are one contiguous range of a sorted candidate list, and crossings with similar counts
  are evaluated together as one dense block.  Every sum is in a fixed order, the sums per
  vertex too on CUDA (:mod:`.sums`).
- ``nr_shade``: flat-shaded RGBA renders lit as neural_renderer lights them.

Conventions are :mod:`.camera`'s (rows down, pixel centres at integer + 0.5), which are
also neural_renderer's in projection mode after its own flips, so images match its
orientation pixel for pixel.

Profiler labels: "render.hard_silhouette.forward", "render.hard_silhouette.backward".
"""
from __future__ import annotations

import torch

from ..runtime import concurrently
from .camera import Camera
from .screen import project_mesh
from .settings import DEFAULT, RenderSettings
from .sums import reproducible_on, segment_sum
from .zbuffer import face_index

__all__ = ["nr_silhouette", "nr_shade", "nr_face_rgb", "NR_EPS", "NR_AMBIENT", "NR_DIRECTIONAL",
           "NR_LIGHT_DIRECTION"]

NR_EPS = 1e-3                # the eps the original's nr.Renderer passes to rasterize_silhouettes (NDC units)
NR_AMBIENT, NR_DIRECTIONAL, NR_LIGHT_DIRECTION = 0.5, 0.5, (0.0, 1.0, 0.0)   # its default light


def nr_silhouette(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, eps: float = NR_EPS,
                  reproducible: bool | None = None, face_idx: torch.Tensor | None = None,
                  settings: RenderSettings = DEFAULT) -> torch.Tensor:
    """Hard silhouette in {0, 1} with Kato et al.'s approximate gradient (module doc).

    Args:
        verts: (V, 3) float, differentiable.
        faces: (F, 3) int64.
        camera: unbatched.
        eps: the +-eps of the distances in NDC units; default ``NR_EPS``.
        reproducible: as :func:`.silhouette.silhouette` (default None: on CUDA).
        face_idx: (H, W) int64 :func:`.zbuffer.face_index` of this mesh and camera, whose
            coverage this is (nearest face at each pixel centre, both windings); a caller
            that also needs that index (e.g. for a picture) computes it once and passes it.
            Default None: computed here.
        settings: speed/memory knobs (:class:`RenderSettings`; they do not change the output).

    Returns:
        (H, W) image of verts' dtype.
    """
    if verts.dim() != 2 or camera.batched:
        raise ValueError("nr_silhouette renders one mesh (V, 3) with an unbatched camera")
    with torch.profiler.record_function("render.hard_silhouette.forward"):
        faces = torch.as_tensor(faces, device=verts.device).long()
        sc = project_mesh(verts, faces, camera)
        fidx = face_index(verts, faces, camera, settings=settings) if face_idx is None else face_idx
        return _KatoSilhouette.apply(sc.uv, fidx, faces, float(eps), reproducible_on(verts.device, reproducible),
                                     settings)


class _KatoSilhouette(torch.autograd.Function):
    """uv (V, 2) pixel coordinates -> coverage (H, W); backward: Kato et al.'s rule."""

    @staticmethod
    def forward(ctx, uv, face_idx, faces, eps, reproducible, settings):
        alpha = (face_idx >= 0).to(uv.dtype)
        ctx.save_for_backward(uv, face_idx, faces)
        ctx.eps, ctx.reproducible, ctx.settings = eps, reproducible, settings
        return alpha

    @staticmethod
    def backward(ctx, grad_alpha):
        with torch.profiler.record_function("render.hard_silhouette.backward"):
            return _KatoSilhouette._backward(ctx, grad_alpha)

    @staticmethod
    def _backward(ctx, grad_alpha):
        uv, face_idx, faces = ctx.saved_tensors
        H, W = face_idx.shape
        grad_uv = uv.new_zeros(uv.shape)
        g = grad_alpha.to(uv.dtype)
        # index coordinates: pixel centres on the integers (column X, row Y)
        X, Y = uv[:, 0].detach() - 0.5, uv[:, 1].detach() - 0.5
        visible = _visible_faces(face_idx, faces.shape[0])     # the same for both axes
        # axis 0: scanlines are columns (position X), moves along Y -> gradient of v;
        # axis 1: scanlines are rows (position Y), moves along X -> gradient of u.
        # The two are independent: side by side on a CPU with two threads or more
        def axis_task(p0, p1, fi, gg, n0, n1, size):
            return lambda: _kato_axis(p0, p1, faces, fi.contiguous(), gg.contiguous(), n0, n1, ctx.eps * size / 2.0,
                                      ctx.reproducible, visible, ctx.settings)
        du, dv = concurrently([axis_task(Y, X, face_idx, g, H, W, W), axis_task(X, Y, face_idx.T, g.T, W, H, H)],
                              uv.device)
        grad_uv[:, 0] += du
        grad_uv[:, 1] += dv
        return grad_uv, None, None, None, None, None


def _visible_faces(face_idx: torch.Tensor, n_faces: int) -> torch.Tensor:
    """Sorted indices (Fv,) of the faces that face_idx (any shape, -1 = background) shows."""
    return (torch.bincount(face_idx.reshape(-1) + 1, minlength=n_faces + 1)[1:] > 0).nonzero().squeeze(1)


def _kato_axis(p0, p1, faces, fi, g, n0, n1, eps_px, reproducible, visible=None, settings: RenderSettings = DEFAULT):
    """dL/d(p1) (V,) of Kato's rule for scanlines at integer p0 (0..n0-1), pixels along p1.

    p0, p1 (V,) vertex positions in index coordinates (pixel centres on the integers);
    fi (n0, n1) face index and g (n0, n1) dL/dI, indexed [scanline, position along it];
    eps_px: the +-eps of the distances, in pixels; visible: ``_visible_faces`` of fi, if known;
    settings: the pair-chunk sizes (``kato_pair_chunk``, ``kato_small_block``).
    """
    # selections are sums and products of masks and gathers are index_select: on the CPU
    # torch.where and advanced indexing cost several times more
    dev, dt = p0.device, p0.dtype
    V = p0.shape[0]
    zero = p0.new_zeros(V)
    fi_flat, g_flat = fi.reshape(-1), g.reshape(-1)
    npx = n0 * n1
    vf = _visible_faces(fi, faces.shape[0]) if visible is None else visible
    if vf.numel() == 0:
        return zero

    # edges of the visible faces: edge k of a face is (k, k+1), its third vertex k+2
    tri = faces.index_select(0, vf)                          # (Fv, 3)
    ia, ib, ic = tri.reshape(-1), tri.roll(-1, dims=1).reshape(-1), tri.roll(-2, dims=1).reshape(-1)
    a0, a1, b0, b1, c0, c1 = (p.index_select(0, i) for i in (ia, ib, ic) for p in (p0, p1))
    lo = torch.ceil(torch.minimum(a0, b0)).clamp(min=0)
    hi = torch.floor(torch.maximum(a0, b0)).clamp(max=n0 - 1)
    flat = b0 == a0
    slope = (b1 - a1) / (b0 - a0 + flat)                     # flat edges: any finite value
    inner = torch.sign(c1 - (a1 + slope * (c0 - a0)))       # side of the face along p1
    count = ((hi - lo + 1).clamp(min=0) * (~flat & (inner != 0))).long()

    # crossings (edge, scanline d0), grouped by edge; integers in int32 (pixel indices < 2^31)
    e = torch.repeat_interleave(count.int())
    nc = e.numel()
    if nc == 0:
        return zero
    ca0, ca1, cb0, cslope, direction = torch.stack([a0, a1, b0, slope, -inner]).index_select(1, e)
    first = (lo.long() - (torch.cumsum(count, 0) - count)).int()
    first, fe = torch.stack([first, vf.int().repeat_interleave(3)]).index_select(1, e)
    d0i = torch.arange(nc, dtype=torch.int32, device=dev) + first
    d0 = d0i.to(dt)
    cross = ca1 + cslope * (d0 - ca0)
    d1_in = direction * torch.floor(direction * cross)      # the pixel just inside: floor or ceil
    d1_out = d1_in + direction                               # direction: towards the outside
    both = d1_in + d1_out                                    # adjacent pixels: both in [0, n1 - 1]
    ok = (both >= 1) & (both <= 2 * n1 - 3)
    pix = torch.stack([d1_in, d1_out]).int().clamp_(0, n1 - 1) + d0i * n1      # (2, Nc) in / out pixel
    f_pix = fi_flat.index_select(0, pix.view(-1)).view(2, -1)

    # candidate pixels (module doc): out: background with dL/dI < 0, in: covered with dL/dI > 0;
    # one sorted list of keys, out pixels by pixel index, then in pixels by (face + 1, pixel)
    nz = (g_flat != 0).nonzero().squeeze(1)
    f_nz, g_nz = fi_flat.index_select(0, nz), g_flat.index_select(0, nz)
    ci = ((g_nz < 0) == (f_nz < 0)).nonzero().squeeze(1)
    keys, order = torch.sort(nz.index_select(0, ci) + (f_nz.index_select(0, ci) + 1) * npx)
    diff = g_nz.index_select(0, ci.index_select(0, order)).abs()                     # dI * dL/dI
    line = torch.searchsorted(keys, torch.arange(n0 + 1, device=dev) * n1)          # scanline starts
    run = torch.div(keys, n1, rounding_mode="floor")         # one scanline of one list
    pos = (keys - run * n1).to(dt)                           # position along the scanline
    # per scanline: the first and last position of an out candidate (none: n1 and -1)
    ends = torch.tensor([n1, -1], dtype=dt, device=dev).repeat_interleave(n0 + 1)
    line_of = run.clamp(max=n0)                              # in candidates: a slot of their own
    ends[:n0 + 1].scatter_reduce_(0, line_of, pos, "amin")
    ends[n0 + 1:].scatter_reduce_(0, line_of, pos, "amax")

    # rows: out: the face is visible at the in-pixel; its candidates beyond the edge up to the
    # border (none when the first / last out candidate of the scanline is short of d1_out).
    # in: the out-pixel is background; the face's candidates on the scanline.
    up = direction > 0
    beyond = direction * (ends.index_select(0, d0i + up * (n0 + 1)) - d1_out) >= 0
    rows_out = (ok & beyond & (f_pix[0] == fe)).nonzero().squeeze(1)
    rows_in = (ok & (f_pix[1] < 0)).nonzero().squeeze(1)
    up = up.index_select(0, rows_out).int()
    q_out = pix[1].index_select(0, rows_out) + 1 - up       # candidates from dout on / up to dout
    q_in = (fe.index_select(0, rows_in).long() + 1) * npx + d0i.index_select(0, rows_in) * n1
    r = torch.searchsorted(keys, torch.cat([q_out.long(), q_in, q_in + n1]))
    no, ni = len(rows_out), len(rows_in)
    border = line.index_select(0, d0i.index_select(0, rows_out) + up)            # scanline end / start
    s = torch.cat([torch.minimum(r[:no], border), r[no:no + ni]])
    n = torch.cat([torch.maximum(r[:no], border), r[no + ni:]]) - s
    # the rows with candidates, by n
    keep = (n > 0).nonzero().squeeze(1)
    if keep.numel() == 0:
        return zero
    n, by_n = torch.sort(n.index_select(0, keep), stable=True)
    sel = keep.index_select(0, by_n)
    rc = torch.cat([rows_out, rows_in]).index_select(0, sel)
    s = s.index_select(0, sel)
    back = torch.cat([1 - up, up.new_zeros(ni)]).index_select(0, sel)          # end at the out-pixel

    # per row: moving endpoint a (b) by k dc moves the crossing by dc, k = span / lever > 0; a
    # lever of 0 (the scanline through that endpoint) gives it nothing (dummy vertex V)
    ra0, rb0, rd0 = ca0.index_select(0, rc), cb0.index_select(0, rc), d0.index_select(0, rc)
    lever = torch.stack([rb0 - rd0, rd0 - ra0])              # (2, R)
    unused = lever == 0
    k = (rb0 - ra0) / (lever + unused)
    v = torch.stack([ia, ib]).index_select(1, e.index_select(0, rc))
    v = v + unused * (V - v)
    return _kato_pairs(run, pos, diff, s, n, back, cross.index_select(0, rc), k, v, V, n1, eps_px, reproducible,
                       settings.kato_pair_chunk, settings.kato_small_block)


def _kato_pairs(run, pos, diff, s, n, back, x, k, vert, V, n1, eps_px, reproducible, pair_chunk, small_block):
    """Sum Kato's slopes over all (row, candidate) pairs onto the rows' edge endpoints.

    run, pos, diff (Nk,): the candidates in key order: run id (non-decreasing; one scanline
    of one list), position along the scanline, dI * dL/dI (> 0).  Rows (R,), sorted by
    1 <= n <= n1: candidates s .. s + n - 1, within one run, which they start (back = 1) or end
    (back = 0), for a crossing at position x, its endpoints' k (2, R) and vertices vert
    (2, R) (V: none).  Each pair adds -diff / (k dc +- eps) (dc = pos - x, -eps where
    dc <= 0) to the vertex.  Rows are bucketed by n and each bucket is one dense
    (width, rows) block, rows along the contiguous axis: no pair gathers its row's
    attributes, and the row sums are plain sums.  Blocks hold about ``pair_chunk`` pairs at
    a time; a block of fewer than ``small_block`` pairs joins a wider one (fixed costs).
    """
    dev, dt = x.device, x.dtype
    nk = run.numel()
    # slots: a zero-weight slot before every run and one after the last.  A row's block is
    # padded after its last candidate and reads the slot after its run (rows that end there),
    # or, for the back rows (which start their run), the same in a reversed copy
    new_run = torch.ones(nk, dtype=torch.long, device=dev)
    new_run[1:] = run[1:] != run[:-1]
    slot = torch.arange(nk, device=dev) + torch.cumsum(new_run, 0)
    m = 2 * nk + 1                                           # at least nk + runs + 1
    a_pos = x.new_zeros(m).index_copy_(0, slot, pos)
    a_diff = x.new_zeros(m).index_copy_(0, slot, diff)
    a_pos, a_diff = torch.cat([a_pos, a_pos.flip(0)]), torch.cat([a_diff, a_diff.flip(0)])
    t = slot.index_select(0, s)
    start = (t + back * (2 * m - 2 * t - n)).int()           # reversed: 2m - 1 - (t + n - 1)
    n = n.int()

    # widths 1, 2, 3, 4, 6, 8, 12, ... (at most 1.5x padding); a block too small to pay for
    # its own passes joins the next wider one
    widths = sorted({w for i in range(n1.bit_length() + 1) for w in (1 << i, 3 << i >> 1) if w})
    widths = widths[:next(i for i, w in enumerate(widths) if w >= n1) + 1]
    bounds = torch.searchsorted(n, torch.tensor(widths, dtype=n.dtype, device=dev), right=True).tolist()
    blocks, pending = [], None
    for w, r0, r1 in zip(widths, [0] + bounds[:-1], bounds):
        if r1 == r0:
            continue
        if pending is not None and (pending[2] - pending[1]) * w > small_block:
            blocks.append(pending)
            pending = None
        pending = (w, r0 if pending is None else pending[1], r1)
    if pending is not None:
        blocks.append(pending)

    sums = x.new_empty(2, len(n))
    eps = torch.tensor(eps_px, dtype=dt, device=dev)
    j = torch.arange(widths[-1], dtype=torch.int32, device=dev)[:, None]
    for w, r0, r1 in blocks:
        step = max(1, pair_chunk // w)                       # bounded memory
        for c0 in range(r0, r1, step):
            c1 = min(c0 + step, r1)
            c = (start[c0:c1] + torch.minimum(j[:w], n[c0:c1])).view(-1)     # (w, rows) slots
            # r = -dc; den = k r + sign(r) eps = -(k dc +- eps) (dc = 0: r = +0, den = +eps)
            r = x[c0:c1] - a_pos.index_select(0, c).view(w, -1)
            den = torch.addcmul(torch.copysign(eps, r), k[:, None, c0:c1], r)    # (2, w, rows)
            sums[:, c0:c1] = torch.div(a_diff.index_select(0, c).view(w, -1), den, out=den).sum(1)
    return segment_sum(vert.reshape(-1), sums.reshape(-1, 1), V + 1, reproducible=reproducible)[:V, 0]


def nr_shade(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, face_colors=None, color: float = 0.7,
             ambient: float = NR_AMBIENT, directional: float = NR_DIRECTIONAL,
             light_direction=NR_LIGHT_DIRECTION, face_idx: torch.Tensor | None = None) -> torch.Tensor:
    """RGBA render lit as neural_renderer lights a mesh in projection mode (pictures only,
    not differentiable).

    The original demo's pictures (target.png, initialization.png, movie frames) come from
    neural_renderer with its default light (see ``nr_face_rgb``), black background, alpha =
    hard coverage.

    Args:
        verts: (V, 3) float.
        faces: (F, 3) int64.
        camera: unbatched.
        face_colors: (F, 3) in [0, 1]; default None = uniform grey ``color``.
        color: the grey level; default 0.7.
        ambient, directional, light_direction: the light; default neural_renderer's.
        face_idx: (H, W) int64 :func:`.zbuffer.face_index` of this mesh and camera if the
            caller has it; default None = computed here.

    Returns:
        (H, W, 4) float in [0, 1].
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
    (world frame; its default light comes from +y), where n is the unit face normal turned
    TOWARDS the camera, whatever the mesh's winding (both windings are drawn): on a closed
    surface the outward normal of what is seen, so surfaces facing up are lit and surfaces
    facing down get only the ambient part.  This reproduces the original's
    pictures.

    Args: as :func:`nr_shade` (verts (V, 3) and faces (F, 3) int64 on one device, unbatched
    camera, face_colors (F, 3) or None for grey ``color``, the light).

    Returns:
        (F, 3) float.
    """
    verts = verts.detach()
    uv, _ = camera.to(device=verts.device, dtype=verts.dtype).project(verts)
    flat = faces.reshape(-1)                                         # index_select: faster than x[faces] on the CPU
    t = uv.index_select(0, flat).view(-1, 3, 2)                      # (F, 3, 2)
    e1, e2 = t[:, 1] - t[:, 0], t[:, 2] - t[:, 0]
    clockwise = (e1[:, 0] * e2[:, 1] - e1[:, 1] * e2[:, 0]) < 0      # in our rows-down image
    tri = verts.index_select(0, flat).view(-1, 3, 3)
    n = torch.nn.functional.normalize(torch.cross(tri[:, 0] - tri[:, 1], tri[:, 2] - tri[:, 1], dim=1),
                                      dim=1, eps=1e-5)
    # a face clockwise on screen (rows down) has cross(v0 - v1, v2 - v1) pointing away from the camera
    n = torch.where(clockwise[:, None], -n, n)
    light_dir = torch.as_tensor(light_direction, dtype=verts.dtype, device=verts.device)
    light = ambient + directional * (n @ light_dir).clamp(min=0.0)   # (F,)
    if face_colors is None:
        return (color * light)[:, None].expand(-1, 3)
    return torch.as_tensor(face_colors, dtype=verts.dtype, device=verts.device) * light[:, None]
