"""Rasterisation in pure torch (CPU and CUDA): soft silhouettes, z-buffer, normals, shading.

Conventions are those of ``lib.camera``: pixel (row i, column j) has its centre at image
coordinates (j + 0.5, i + 0.5), row 0 is the top of the image, depth is camera-space z.
Inputs: verts (V, 3) or (B, V, 3) float (one mesh, or B meshes with the same faces),
faces (F, 3) int64, and a ``Camera`` (unbatched or a batch of B).  A batched camera or
batched verts gives batched images (B, H, W[, C]); otherwise (H, W[, C]).  Faces with a
vertex at depth <= ``znear`` are skipped (no clipping).

Soft silhouette (SoftRas / pytorch3d style).  For pixel x and face f let s_f(x) be the
signed squared distance from the pixel centre to the projected triangle, in squared NDC
units (NDC spans [-1, 1] over the shorter image side, so one pixel is 2 / min(H, W)),
negative inside.  With r = sigma * log(1 / eps - 1) (the "blur radius")

    p_f = 1                   if s_f < -r      (deep inside; 1 - p_f < eps)
    p_f = sigmoid(-s_f/sigma)  if |s_f| <= r
    p_f = 0                   if s_f > r       (p_f < eps)
    I(x) = 1 - prod_f (1 - p_f)

so only faces within the blur radius of a pixel are ever looked at.  sigma -> 0 gives the
hard coverage.  The SVR refinement of the paper used sigma = 1e-5, eps = 1e-4 (blur
radius log(1/1e-4 - 1) * 1e-5) and 25 faces per pixel: ``faces_per_pixel=K`` keeps, per
pixel, only the K candidate faces (p_f > 0) nearest to the camera, the depth of a face
being that of its point closest to the pixel.  The gradient (custom autograd Function) is
the exact gradient of the function above w.r.t. the projected vertices, chained by
autograd to the 3D vertices (and the camera tensors).

Work is bounded by the face-pixel pairs near each face: faces' blur-expanded bounding
boxes are cut into 4 x 4 pixel tiles, and the tiles are evaluated in chunks of 256k
face-pixel slots with broadcast arithmetic (no per-pair gathers).  The forward pass keeps
24 bytes per slot (float32) for the backward pass, up to ``SAVE_SLOTS`` slots (400 MB);
beyond that the backward pass recomputes the chunks, so memory stays bounded.
``faces_per_pixel`` keeps all slots (it sorts them by pixel and depth).
"""
from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch

from lib.camera import Camera
from lib.runtime import concurrently

TILE = 4                       # face bounding boxes are cut into TILE x TILE pixel tiles
CHUNK_TILES = 1 << 14          # tiles per chunk (x 16 slots = 256k face-pixel pairs)
SAVE_SLOTS = 1 << 24           # above this many tile slots the backward pass recomputes
SVR_SIGMA = 1e-5               # the paper's SVR refinement (pytorch3d soft silhouette settings)
SVR_EPS = 1e-4
SVR_FACES_PER_PIXEL = 25


def blur_radius(sigma: float, eps: float = SVR_EPS) -> float:
    """Squared-NDC distance beyond which p_f < eps: sigma * log(1/eps - 1)."""
    return sigma * math.log(1.0 / eps - 1.0)


# ----------------------------------------------------------------- projection
@dataclass
class _Screen:
    uv: torch.Tensor        # (B*V, 2) pixel coordinates (keeps autograd history)
    z: torch.Tensor         # (B*V,) camera depth (keeps autograd history)
    tri: torch.Tensor       # (B*F, 3) int64 indices into uv
    B: int
    batched: bool
    H: int
    W: int


def _screen(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None) -> _Screen:
    if verts.dim() not in (2, 3) or verts.shape[-1] != 3:
        raise ValueError(f"verts must be (V, 3) or (B, V, 3), got {tuple(verts.shape)}")
    faces = torch.as_tensor(faces, device=verts.device)
    if faces.dim() != 2 or faces.shape[1] != 3:
        raise ValueError(f"faces must be (F, 3), got {tuple(faces.shape)}")
    faces = faces.long()
    if image_size is not None:
        camera = camera.resized(image_size)
    camera = camera.to(device=verts.device, dtype=verts.dtype)
    bv = verts.shape[0] if verts.dim() == 3 else 1
    bc = len(camera) if camera.batched else 1
    if bv > 1 and bc > 1 and bv != bc:
        raise ValueError(f"{bv} meshes but {bc} cameras; give one of each or equal numbers")
    batched = verts.dim() == 3 or camera.batched
    B = max(bv, bc)
    if not camera.batched:
        camera = Camera.stack([camera] * B) if B > 1 else Camera.stack([camera])
    elif bc == 1 and B > 1:
        camera = Camera.stack([camera[0]] * B)
    pts = verts if verts.dim() == 3 else verts[None]
    if pts.shape[0] == 1 and B > 1:
        pts = pts.expand(B, -1, -1)
    uv, z = camera.project(pts)                              # (B, V, 2), (B, V)
    V = verts.shape[-2]
    offs = (torch.arange(B, device=verts.device) * V)[:, None, None]
    tri = (faces[None] + offs).reshape(-1, 3)
    H, W = camera.image_size
    return _Screen(uv.reshape(-1, 2), z.reshape(-1), tri, B, batched, H, W)


# ---------------------------------------------------------------- face tiles
def _tiles(uvt: torch.Tensor, zt: torch.Tensor, H: int, W: int, margin: float, znear: float,
           size: int = TILE):
    """Cut each face's pixel bounding box (expanded by ``margin`` px) into size x size tiles
    (size <= TILE, so that tiles overhanging the image stay inside the padded layout).

    uvt (G, 3, 2), zt (G, 3).  Returns tile face ids (T,) and tile origins x0, y0 (T,)
    (int64).  Boxes are clipped to the image; faces with a vertex at depth <= znear or a
    non-finite projection get no tiles.
    """
    dev = uvt.device
    # elementwise over the 3 vertices (reductions over a dimension of 3 are slow on the CPU)
    u = uvt.unbind(1)
    lo = torch.minimum(torch.minimum(u[0], u[1]), u[2])               # (G, 2)
    hi = torch.maximum(torch.maximum(u[0], u[1]), u[2])
    z = zt.unbind(1)
    ok = (torch.minimum(torch.minimum(z[0], z[1]), z[2]) > znear) & torch.isfinite(lo).all(1) \
        & torch.isfinite(hi).all(1)
    lo = torch.where(ok[:, None], lo - margin, torch.zeros_like(lo))
    hi = torch.where(ok[:, None], hi + margin, torch.full_like(hi, -1.0))
    # pixel j is in the box iff lo <= j + 0.5 <= hi
    lim = torch.tensor([W - 1, H - 1], device=dev, dtype=lo.dtype)
    first = torch.ceil(lo - 0.5).clamp(min=0).minimum(lim + 1)
    last = torch.floor(hi - 0.5).minimum(lim).clamp(min=-1)
    first, last = first.long(), last.long()
    n = (last - first + 1).clamp(min=0)
    nt = (n + size - 1) // size                                 # tiles along x and y
    count = nt[:, 0] * nt[:, 1]
    total = int(count.sum())
    fid = torch.repeat_interleave(torch.arange(len(count), device=dev), count, output_size=total)
    # per-face columns gathered one by one with 1-D index_select (2-D advanced indexing is
    # several times slower on the CPU)
    start, ntx, fx, fy = (col.index_select(0, fid) for col in
                          (torch.cumsum(count, 0) - count, nt[:, 0].contiguous(), first[:, 0].contiguous(),
                           first[:, 1].contiguous()))
    local = torch.arange(total, device=dev).sub_(start)
    # row of each tile: floor(local / ntx) in float64, exact here (local < 2^31, and the
    # quotient's fraction is at least 1 / ntx, far above the rounding) and several times
    # faster than int64 division on the CPU
    ty = local.double().div_(ntx.double()).floor_().long()
    tx = local.sub_(ty * ntx)
    x0 = tx.mul_(size).add_(fx)
    y0 = ty.mul_(size).add_(fy)
    return fid, x0, y0


_CULL = True                   # private switch: False = evaluate every tile of the face boxes (tests, benchmarks)
CULL_MARGIN = 1e-3             # px: culled tiles are at least this much farther than the blur radius


def _cull_tiles(table: torch.Tensor, fid: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, r: float):
    """Indices (int64) of the TILE x TILE tiles that are not wholly beyond the blur radius.

    A tile is dropped when all its pixel centres lie outside one edge line of its face, more
    than sqrt(r) + CULL_MARGIN pixels from it: every point of the triangle is then farther
    than the blur radius from them, so each of its slots is outside the face and beyond the
    radius, and contributes exactly nothing in any mode (log-term 0, gradient weights 0, no
    depth candidate).  Dropping them leaves every other term, and the order in which terms
    meet at a pixel or a face, unchanged, so images and gradients are bitwise the same.
    The test runs in float64 so that its rounding is far below the margin.
    """
    tab = table.double()
    o = tab[15]
    ex, ey = tab[6:12:2], tab[7:12:2]
    A, Bm = o * ex, o * ey                     # edge function: A (y - vy) - Bm (x - vx), >= 0 inside
    reach = math.sqrt(r) + CULL_MARGIN
    # max over the tile's pixel centres (x0 + 0.5 + i, y0 + 0.5 + j), i, j in 0..TILE-1,
    # written as A y0 - Bm x0 + C with C per face
    span = TILE - 1.0
    C = (Bm * (tab[0:6:2] - 0.5) - A * (tab[1:6:2] - 0.5) + span * (A.clamp(min=0) - Bm.clamp(max=0))
         + reach * torch.sqrt(ex * ex + ey * ey))
    C = torch.where((o != 0)[None], C, torch.full_like(C, math.inf))     # degenerate faces: kept
    xs, ys = x0.double(), y0.double()
    far = torch.zeros(len(fid), dtype=torch.bool, device=fid.device)
    for i in range(3):
        top = A[i].index_select(0, fid) * ys - Bm[i].index_select(0, fid) * xs + C[i].index_select(0, fid)
        far |= top < 0
    return (~far).nonzero().squeeze(1)


def _face_table(uvt: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """Per-face constants, one row per quantity, (19, G): v0..v2 (rows 0-5), edges
    e_i = v_{i+1} - v_i (6-11), 1/|e_i|^2 (12-14), orientation (15: sign of the doubled
    signed area, 0 for degenerate faces), 1/z of the vertices (16-18)."""
    # built row by row (elementwise on (G,) rows; small inner dimensions are slow on the CPU)
    v = uvt.permute(1, 2, 0).reshape(6, -1)                # rows u0 v0 u1 v1 u2 v2
    e = v.roll(-2, dims=0) - v                             # rows of e_i = v_{i+1} - v_i
    sq = e[0::2] * e[0::2] + e[1::2] * e[1::2]             # (3, G)
    inv = torch.where(sq > 0, 1.0 / sq.clamp(min=1e-30), torch.zeros_like(sq))
    area2 = e[0] * (-e[5]) - e[1] * (-e[4])
    big = torch.maximum(torch.maximum(sq[0], sq[1]), sq[2])
    orient = torch.where(area2.abs() > 1e-12 * big, torch.sign(area2), torch.zeros_like(area2))
    iz = 1.0 / zt.T.clamp(min=1e-30)
    return torch.cat([v, e, inv, orient[None], iz], 0)


@dataclass
class _Setup:
    """Everything the chunks of one soft-silhouette call share.

    Pixels are indexed in a padded layout of B images of (H + TILE) x (W + TILE): tile
    slots that overhang the image land in the padding, which is dropped at the end, so
    no slot needs a validity mask.
    """
    table: torch.Tensor     # (19, G) face constants
    fid: torch.Tensor       # (T,) tile -> face instance
    x0: torch.Tensor        # (T,) tile origin (pixel column / row)
    y0: torch.Tensor
    fbatch: torch.Tensor    # (G,) image of each face instance
    B: int
    H: int
    W: int
    sigma: float            # softness in squared pixels (0 = hard)
    r: float                # blur radius in squared pixels
    want_depth: bool
    # True: a pixel inside a face keeps p_f = sigmoid(-s_f / sigma) at any depth (pytorch3d's
    # rasteriser keeps every covering face); used when r is set apart from sigma
    soft_inside: bool = False

    @property
    def npad(self) -> int:
        return self.B * (self.H + TILE) * (self.W + TILE)

    def crop(self, flat: torch.Tensor) -> torch.Tensor:
        """(npad,) padded pixel values -> (B, H, W)."""
        return flat.view(self.B, self.H + TILE, self.W + TILE)[:, :self.H, :self.W]


_BIG = 1e4   # -log(1 - p) of a deep-inside pair: exp(-1e4) == 0 in float32 and float64


_WORKSPACES = threading.local()
_REUSE = True                  # private switch: False = fresh scratch tensors per chunk (benchmarks)


def _workspace(device: torch.device, dtype: torch.dtype, n: int):
    """Named scratch buffers of n elements for one chunk, as (n // (TILE*TILE), TILE*TILE)
    views: get(name).  On the CPU the buffers are kept per thread and reused from call to
    call (at most CHUNK_TILES tiles, about 1 MB each); elsewhere (the caching allocator
    already reuses memory) they are allocated per chunk."""
    P = TILE * TILE
    if device.type != "cpu" or not _REUSE:
        return lambda name: torch.empty(n // P, P, dtype=dtype, device=device)
    pool = getattr(_WORKSPACES, "pool", None)
    if pool is None:
        pool = _WORKSPACES.pool = {}

    def get(name: str) -> torch.Tensor:
        buf = pool.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = pool[(name, dtype)] = torch.empty(max(n, CHUNK_TILES * P), dtype=dtype)
        return buf[:n].view(n // P, P)
    return get


def _chunk_terms(st: _Setup, a: int, b: int, with_grad: bool) -> dict:
    """Per-slot terms of tiles a..b, each a (T, TILE*TILE) tensor (a slot = a tile pixel).

    pix: padded pixel index (int32); lsig: log(1 - p_f) (-1e4 for deep-inside pairs, 0
    beyond the blur radius).  with_grad adds rx, ry (from the nearest point of the nearest
    edge to the pixel) and w0..w2 such that dI/d(uv of the face's vertex k) =
    -(1 - I) * w_k * (rx, ry) summed over the slots.  want_depth adds depth (of the face
    point nearest to the pixel) and cand (bool, p_f > 0).  Slots outside a face's
    blur-expanded box are farther than the blur radius, so they need no mask.

    Written for the CPU: float masks from comparisons with ``out=``, because bool masks,
    where() and masked_fill are several times slower there than plain arithmetic; the
    intermediates live in a reused ``_workspace`` (fresh tensors per op cost about a quarter
    of the time in allocation and page faults).  Every returned tensor is freshly allocated.
    """
    f = st.fid[a:b]
    T, P = len(f), TILE * TILE
    dev = f.device
    c = st.table.index_select(1, f)                         # (19, T)
    dt = c.dtype
    d = torch.arange(P, device=dev, dtype=torch.int32)
    dx = (d % TILE).to(dt)
    dy = torch.div(d, TILE, rounding_mode="floor").to(dt)
    ox, oy = st.x0[a:b], st.y0[a:b]
    ax = (ox.to(dt) + 0.5)[None] - c[0:6:2]                 # (3, T): tile origin - v_i
    ay = (oy.to(dt) + 0.5)[None] - c[1:6:2]
    ex, ey, inv, o = c[6:12:2], c[7:12:2], c[12:15], c[15]
    wp = st.W + TILE
    base = ((st.fbatch.index_select(0, f) * (st.H + TILE) + oy) * wp + ox).to(torch.int32)
    pix = base[:, None] + (torch.div(d, TILE, rounding_mode="floor") * wp + d % TILE)
    ws = _workspace(dev, dt, T * P)
    tmp = ws("tmp")
    # edge functions, scaled by the orientation so that >= 0 is the inner side; -1 for
    # degenerate faces (never inside)
    ef = []
    for i in range(3):
        a0 = o * (ex[i] * ay[i] - ey[i] * ax[i]) - (1.0 - o.abs())
        e = torch.mul(dy, (o * ex[i])[:, None], out=ws(f"ef{i}"))
        ef.append(e.sub_(torch.mul(dx, (o * ey[i])[:, None], out=tmp)).add_(a0[:, None]))
    cmin = torch.minimum(torch.minimum(ef[0], ef[1], out=ws("cmin")), ef[2], out=ws("cmin"))
    inside = torch.ge(cmin, 0.0, out=ws("inside"))
    out = {"pix": pix}
    if st.sigma <= 0:                                       # hard coverage
        out["lsig"] = inside * -_BIG
        return out
    ts, rxs, rys, ds = [], [], [], []
    for i in range(3):
        wx = torch.add(ax[i][:, None], dx, out=ws(f"rx{i}"))
        wy = torch.add(ay[i][:, None], dy, out=ws(f"ry{i}"))
        t = torch.mul(wx, (inv[i] * ex[i])[:, None], out=ws(f"t{i}"))
        t.add_(torch.mul(wy, (inv[i] * ey[i])[:, None], out=tmp)).clamp_(0.0, 1.0)
        rx = wx.sub_(torch.mul(t, ex[i][:, None], out=tmp))
        ry = wy.sub_(torch.mul(t, ey[i][:, None], out=tmp))
        ts.append(t)
        rxs.append(rx)
        rys.append(ry)
        ds.append(torch.mul(rx, rx, out=ws(f"d{i}")).addcmul_(ry, ry))
    dmin = torch.minimum(torch.minimum(ds[0], ds[1], out=ws("dmin")), ds[2], out=ws("dmin"))
    band = torch.le(dmin, st.r, out=ws("band"))
    sgs = torch.mul(inside, -2.0 / st.sigma, out=ws("sgs")).add_(1.0 / st.sigma)   # sign(s) / sigma
    zs = torch.mul(dmin, sgs, out=ws("zs"))                 # s / sigma
    if st.soft_inside:
        band = torch.maximum(band, inside, out=band)
        out["lsig"] = torch.nn.functional.logsigmoid(zs).mul_(band)
    else:
        big = torch.mul(inside, _BIG, out=ws("big"))
        out["lsig"] = torch.nn.functional.logsigmoid(zs).add_(big).mul_(band).sub_(big)
    if with_grad or st.want_depth:
        # one-hot of the nearest edge (ties -> lowest index)
        m0 = torch.ge(ds[1], ds[0], out=ws("m0")).mul_(torch.ge(ds[2], ds[0], out=tmp))
        m1 = torch.gt(ds[0], ds[1], out=ws("m1")).mul_(torch.ge(ds[2], ds[1], out=tmp))
        m = [m0, m1, torch.sub(1.0 - m0, m1, out=ws("m2"))]
    if st.want_depth:                                       # before the gradient terms reuse m, ts
        iz = [c[16 + k][:, None] for k in range(3)]
        area = (ef[0] + ef[1] + ef[2]).clamp_(min=1e-30)
        inv_in = (ef[1] * iz[0] + ef[2] * iz[1] + ef[0] * iz[2]) / area
        inv_out = sum(m[k] * ((1.0 - ts[k]) * iz[k] + ts[k] * iz[(k + 1) % 3]) for k in range(3))
        out["depth"] = 1.0 / (inside * inv_in + (1.0 - inside) * inv_out)
        out["cand"] = torch.maximum(band, inside) > 0
    if with_grad:
        # dI/ds = -(1 - I) p / sigma, ds/da = -2 sgn (1 - t) r, ds/db = -2 sgn t r for the
        # nearest edge (a, b) (t optimal: envelope theorem); vertex k starts edge k and
        # ends edge k - 1.
        q = torch.neg(zs, out=ws("q"))
        torch.sigmoid(q, out=q).mul_(band).mul_(sgs).mul_(2.0)
        out["rx"] = (m[0] * rxs[0]).addcmul_(m[1], rxs[1]).addcmul_(m[2], rxs[2])
        out["ry"] = (m[0] * rys[0]).addcmul_(m[1], rys[1]).addcmul_(m[2], rys[2])
        mq = [mk.mul_(q) for mk in m]                       # m, ts are scratch from here on
        u = [torch.mul(mq[k], ts[k], out=ts[k]) for k in range(3)]
        for k in range(3):
            out[f"w{k}"] = (mq[k] - u[k]).add_(u[k - 1])
    return out


# ------------------------------------------------- reproducible accumulation
# Sums of many terms into few slots (pixels, faces, vertices).  On the CPU index_add_ adds
# in index order, so it is reproducible; on CUDA it uses float atomics whose order (and so
# the rounding) changes from run to run.  There we add pixel terms in fixed point (exact
# integer atomics: the order cannot matter) and gradients by a sorted segment sum.
FIXED_SCALE = 2.0 ** 40          # resolution ~1e-12 for the log-terms of a pixel
FIXED_FLOOR = -64.0              # a deep-inside pair: exp(-64) ~ 1.6e-28, so I == 1 in float


def _add_log_terms(L: torch.Tensor, pix: torch.Tensor, lsig: torch.Tensor, fixed: bool | None = None) -> None:
    """L[pix] += lsig (L: (npad,) float, or int64 fixed-point when ``fixed``).

    fixed: None = chosen by device (fixed point on CUDA).  Deep-inside terms (-1e4) are
    clamped to FIXED_FLOOR in fixed point, which leaves every covered pixel at exactly 1.
    """
    if L.dtype == torch.int64:
        q = torch.round(lsig.clamp(min=FIXED_FLOOR).to(torch.float64) * FIXED_SCALE).to(torch.int64)
        L.index_add_(0, pix, q)
    else:
        L.index_add_(0, pix, lsig)


def _use_fixed(device: torch.device, fixed: bool | None) -> bool:
    return device.type != "cpu" if fixed is None else bool(fixed)


def _segment_sum(index: torch.Tensor, values: torch.Tensor, n: int, out: torch.Tensor | None = None,
                 sorted_index: bool = False, reproducible: bool | None = None) -> torch.Tensor:
    """out[index[i]] += values[i] for values (N, C), index (N,) in [0, n); returns out (n, C).

    reproducible (default: on CUDA): one sequential sum per run of equal indices (a stable
    sort first unless ``sorted_index`` says index is already non-decreasing), then a plain
    indexed add of those sums, whose indices are unique (no two atomics meet).
    """
    if out is None:
        out = values.new_zeros(n, values.shape[1])
    if not _use_fixed(values.device, reproducible):
        return out.index_add_(0, index, values)
    if not sorted_index:
        order = torch.argsort(index, stable=True)
        index, values = index[order], values[order]
    uniq, counts = torch.unique_consecutive(index, return_counts=True)
    return out.index_add_(0, uniq, torch.segment_reduce(values, "sum", lengths=counts, axis=0))


class _SoftSilhouette(torch.autograd.Function):
    """uv (N, 2) -> images (B, H, W), see ``silhouette``.  The backward pass reuses the
    per-slot terms saved by the forward pass or, above ``SAVE_SLOTS`` slots, recomputes them."""

    @staticmethod
    def forward(ctx, uv, st: _Setup, tri: torch.Tensor, K: int | None, need_grad: bool, fixed: bool | None = None):
        fixed = _use_fixed(uv.device, fixed)
        L = torch.zeros(st.npad, dtype=torch.int64 if fixed else uv.dtype, device=uv.device)
        n = len(st.fid)
        chunks = [(a, min(a + CHUNK_TILES, n)) for a in range(0, n, CHUNK_TILES)]
        save = st.sigma > 0 and (K is not None or (need_grad and n * TILE * TILE <= SAVE_SLOTS))
        saved = []
        for a, b in chunks:
            tm = _chunk_terms(st, a, b, with_grad=save)
            if K is None:
                _add_log_terms(L, tm["pix"].reshape(-1), tm.pop("lsig").reshape(-1))
            saved.append(tm if save else None)
        if K is not None and st.sigma > 0:
            _keep_nearest(saved, K)
            for tm in saved:
                _add_log_terms(L, tm["pix"].reshape(-1), tm.pop("lsig").reshape(-1))
                del tm["depth"], tm["cand"]
        if fixed:
            L = (L.to(torch.float64) / FIXED_SCALE).to(uv.dtype)
        img = -torch.expm1(st.crop(L))
        ctx.st, ctx.tri, ctx.chunks, ctx.saved, ctx.nv = st, tri, chunks, saved, uv.shape[0]
        ctx.fixed = fixed
        ctx.save_for_backward(img)
        return img

    @staticmethod
    def backward(ctx, grad_img):
        (img,) = ctx.saved_tensors
        st, tri = ctx.st, ctx.tri
        G = img.new_zeros(st.npad)
        st.crop(G).copy_(grad_img * (1.0 - img))    # 0 where covered: no gradient there
        gface = img.new_zeros(st.table.shape[1], 6)
        if st.sigma > 0:
            for (a, b), tm in zip(ctx.chunks, ctx.saved or [None] * len(ctx.chunks)):
                if tm is None:
                    tm = _chunk_terms(st, a, b, with_grad=True)
                g = G.index_select(0, tm["pix"].reshape(-1)).view_as(tm["rx"])
                gx, gy = tm.pop("rx").mul_(g), tm.pop("ry").mul_(g)        # the terms are spent here
                T = gx.shape[0]
                ws = _workspace(g.device, g.dtype, T * TILE * TILE)
                prod = ws("prod")
                sums = torch.empty(6, T, dtype=g.dtype, device=g.device)
                for j, (k, gg) in enumerate((k, gg) for k in range(3) for gg in (gx, gy)):
                    torch.sum(torch.mul(tm[f"w{k}"], gg, out=prod), 1, out=sums[j])
                _segment_sum(st.fid[a:b], sums.T, 0, out=gface, sorted_index=True, reproducible=ctx.fixed)
        grad_uv = _segment_sum(tri.reshape(-1), gface.view(-1, 2), ctx.nv, reproducible=ctx.fixed)
        ctx.saved = None
        return grad_uv, None, None, None, None, None


def _keep_nearest(terms: list[dict], K: int) -> None:
    """Zero the terms of all but the K candidate faces nearest to the camera at each pixel.

    ``terms``: one dict per chunk; none when no face comes within the blur radius of any
    pixel (a mesh out of view), and then there is nothing to drop."""
    if not terms:
        return
    pix = torch.cat([tm["pix"].reshape(-1) for tm in terms])
    depth = torch.cat([tm["depth"].reshape(-1) for tm in terms])
    idx = torch.cat([tm["cand"].reshape(-1) for tm in terms]).nonzero().squeeze(1)
    p, dd = pix[idx], depth[idx]
    order = torch.argsort(dd, stable=True)
    order = order[torch.argsort(p[order], stable=True)]
    ps = p[order]
    pos = torch.arange(len(ps), device=ps.device)
    start = torch.ones_like(ps, dtype=torch.bool)
    start[1:] = ps[1:] != ps[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    drop = torch.zeros(len(pix), dtype=torch.bool, device=pix.device)
    drop[idx[order[(pos - first) >= K]]] = True
    a = 0
    for tm in terms:
        n = tm["pix"].numel()
        dm = drop[a:a + n].view_as(tm["pix"])
        a += n
        tm["lsig"].masked_fill_(dm, 0.0)
        for k in range(3):
            tm[f"w{k}"].masked_fill_(dm, 0.0)


def silhouette(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
               sigma: float = SVR_SIGMA, eps: float = SVR_EPS, faces_per_pixel: int | None = None,
               znear: float = 1e-3, reproducible: bool | None = None, radius: float | None = None) -> torch.Tensor:
    """Soft silhouette in [0, 1], differentiable w.r.t. ``verts`` (see the module docstring).

    verts (V, 3) or (B, V, 3) float32/float64; faces (F, 3) int64; camera unbatched or a
    batch of B; image_size: H or (H, W), default the camera's (intrinsics are rescaled).
    sigma: softness in squared NDC units (0 = hard coverage, no gradient); eps: probability
    cut-off defining the blur radius; faces_per_pixel: None = all faces within the blur
    radius, K = only the K nearest (pytorch3d semantics).  radius: the blur radius in
    squared NDC units set apart from sigma, as pytorch3d's rasteriser allows (the original
    SVR refinement: sigma 1e-4, radius log(1/1e-4 - 1) * 1e-5): faces farther than it from
    an outside pixel are dropped and covering faces keep their sigmoid at any depth; None:
    sigma * log(1/eps - 1).  Returns (H, W) or (B, H, W).
    reproducible: sum in an order-independent way (fixed-point pixel sums, sorted
    gradient sums); None = on CUDA, where plain atomics would change the last bits of
    the image and gradients from run to run.  On the CPU both ways are reproducible.
    """
    sc = _screen(verts, faces, camera, image_size)
    scale = 2.0 / min(sc.H, sc.W)                 # NDC units per pixel
    sigma_px = float(sigma) / scale ** 2 if sigma > 0 else 0.0
    if radius is not None and sigma > 0:
        r_px = float(radius) / scale ** 2
    else:
        r_px = blur_radius(sigma_px, eps) if sigma > 0 else 0.0
    if len(sc.tri) == 0:
        img = sc.uv.new_zeros(sc.B, sc.H, sc.W)
    else:
        with torch.no_grad():
            uvt, zt = sc.uv[sc.tri], sc.z[sc.tri]
            fid, x0, y0 = _tiles(uvt, zt, sc.H, sc.W, math.sqrt(r_px), znear)
            table = _face_table(uvt.detach(), zt.detach())
            if _CULL:
                keep = _cull_tiles(table, fid, x0, y0, r_px)
                fid, x0, y0 = fid[keep], x0[keep], y0[keep]
            fbatch = torch.div(torch.arange(len(sc.tri), device=fid.device), len(faces),
                               rounding_mode="floor")
            st = _Setup(table, fid, x0, y0, fbatch, sc.B, sc.H,
                        sc.W, sigma_px, r_px, faces_per_pixel is not None and sigma > 0,
                        soft_inside=radius is not None)
        need_grad = torch.is_grad_enabled() and sc.uv.requires_grad
        img = _SoftSilhouette.apply(sc.uv, st, sc.tri, faces_per_pixel, need_grad, reproducible)
    return img if sc.batched else img[0]


@torch.no_grad()
def silhouette_pairs(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
                     sigma: float = SVR_SIGMA, eps: float = SVR_EPS, znear: float = 1e-3) -> dict:
    """Work counts of ``silhouette`` (diagnostics, benchmarks): ``evaluated`` face-pixel
    slots (4 x 4 tiles of the blur-expanded face boxes), ``kept`` of them after dropping the
    tiles wholly beyond the blur radius, ``within_radius`` pairs with |s| <= blur radius (the
    soft terms) and ``deep`` pairs (pixel deeper inside than it)."""
    sc = _screen(verts, faces, camera, image_size)
    scale = 2.0 / min(sc.H, sc.W)
    sigma_px = float(sigma) / scale ** 2 if sigma > 0 else 0.0
    r_px = blur_radius(sigma_px, eps) if sigma > 0 else 0.0
    uvt, zt = sc.uv[sc.tri], sc.z[sc.tri]
    fid, x0, y0 = _tiles(uvt, zt, sc.H, sc.W, math.sqrt(r_px), znear)
    fbatch = torch.div(torch.arange(len(sc.tri), device=fid.device), len(faces), rounding_mode="floor")
    st = _Setup(_face_table(uvt, zt), fid, x0, y0, fbatch, sc.B, sc.H, sc.W, max(sigma_px, 1e-30),
                r_px, False)
    within = deep = 0
    for a in range(0, len(fid), CHUNK_TILES):
        tm = _chunk_terms(st, a, min(a + CHUNK_TILES, len(fid)), with_grad=False)
        lsig = tm["lsig"]
        deep += int((lsig <= -_BIG / 2).sum())
        within += int(((lsig < 0) & (lsig > -_BIG / 2)).sum())
    kept = len(_cull_tiles(st.table, fid, x0, y0, r_px)) * TILE * TILE
    return {"evaluated": len(fid) * TILE * TILE, "kept": kept, "within_radius": within, "deep": deep}


# -------------------------------------------------------------- hard raster
@dataclass
class Fragments:
    """Result of ``rasterize`` (leading B axis only for batched inputs).

    face_idx: (..., H, W) int64, index into ``faces`` of the nearest face whose projection
        covers the pixel centre, -1 for background.
    bary: (..., H, W, 3) perspective-correct barycentric coordinates of the visible point
        w.r.t. the face's vertices (in the order of ``faces``); 0 for background.
    depth: (..., H, W) camera-space z of the visible point; 0 for background.
    bary and depth are differentiable w.r.t. the vertices (the face assignment is not).
    """
    face_idx: torch.Tensor
    bary: torch.Tensor
    depth: torch.Tensor

    @property
    def mask(self) -> torch.Tensor:
        return self.face_idx >= 0


RASTER_TILE = 2                # with _SPANS = False the z-buffer cuts face boxes into 2 x 2 tiles
_PACKED = True                 # private switch: False = the two-pass z-buffer for every dtype (tests, benchmarks)


def rasterize(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
              znear: float = 1e-3) -> Fragments:
    """Hard z-buffer rasterisation at pixel centres (see ``Fragments``).

    A pixel centre on an edge shared by two faces belongs to both; the nearer wins, ties go
    to the higher face index.  Both windings are rasterised (no back-face culling).  Callers
    that need only the face at each pixel use ``face_index`` (no barycentrics).
    """
    sc = _screen(verts, faces, camera, image_size)
    B, H, W = sc.B, sc.H, sc.W
    F = faces.shape[0]
    dev, dt = sc.uv.device, sc.uv.dtype
    face_idx = _face_ids(sc, F, znear)                                 # global face instances
    bary = torch.zeros(B, H, W, 3, dtype=dt, device=dev)
    depth = torch.zeros(B, H, W, dtype=dt, device=dev)
    hit = face_idx >= 0
    if bool(hit.any()):
        g = face_idx[hit]
        bary_h, depth_h = _bary_depth(sc, g, hit)
        bary = bary.index_put((hit,), bary_h)
        depth = depth.index_put((hit,), depth_h)
    face_idx = torch.where(hit, face_idx % max(F, 1), face_idx)
    if not sc.batched:
        face_idx, bary, depth = face_idx[0], bary[0], depth[0]
    return Fragments(face_idx, bary, depth)


@torch.no_grad()
def face_index(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
               znear: float = 1e-3) -> torch.Tensor:
    """``rasterize(...).face_idx`` without barycentrics and depth: (H, W) or (B, H, W) int64,
    the index into ``faces`` of the visible face at each pixel centre, -1 for background."""
    sc = _screen(verts.detach(), faces, camera, image_size)
    F = faces.shape[0]
    face_idx = _face_ids(sc, F, znear)
    if sc.B > 1:                 # face instances of image b are b * F + face
        face_idx = torch.where(face_idx >= 0, face_idx % max(F, 1), face_idx)
    return face_idx if sc.batched else face_idx[0]


def _face_ids(sc: _Screen, F: int, znear: float) -> torch.Tensor:
    """Visible face instance (index into sc.tri) per pixel, (B, H, W) int64, -1 = background.

    float32 depths: one amin over int64 keys (depth bits << 32) | (2^31 - 1 - face), since
    the bits of positive floats order like the floats, so the smallest key is the nearest
    face and, among equal depths, the highest index.  Other dtypes: amin of the depth, then
    amax of the face index among the slots at that depth (the same rule in two passes).
    The candidate slots are the pixels of each face's row spans (:func:`_spans`), or, with
    the private switch ``_SPANS = False``, of its bounding box cut into RASTER_TILE tiles;
    both give the same bits, since each slot's depth is computed by the same operations.
    """
    B, H, W = sc.B, sc.H, sc.W
    dev, dt = sc.uv.device, sc.uv.dtype
    if F == 0:
        return torch.full((B, H, W), -1, dtype=torch.int64, device=dev)
    with torch.no_grad():
        uvt, zt = sc.uv[sc.tri], sc.z[sc.tri]
        table = _face_table(uvt, zt)
        fbatch = torch.div(torch.arange(len(sc.tri), device=dev), F, rounding_mode="floor")
        if _SPANS:
            npad, crop = B * H * W, (lambda flat: flat.view(B, H, W))
        else:
            npad = B * (H + TILE) * (W + TILE)
            crop = (lambda flat: flat.view(B, H + TILE, W + TILE)[:, :H, :W])

        def slots(lo: int, hi: int):
            """(faces (S,), [(a, b, depth)]) of the face instances lo..hi."""
            if _SPANS:
                fid, chunks = _spans(uvt[lo:hi], zt[lo:hi], table[:, lo:hi], fbatch[lo:hi], H, W, znear)
                return fid + lo, chunks
            fid, x0, y0 = _tiles(uvt[lo:hi], zt[lo:hi], H, W, 0.0, znear, RASTER_TILE)
            st = _Setup(table[:, lo:hi], fid, x0, y0, fbatch[lo:hi], B, H, W, 0.0, 0.0, True)
            return fid + lo, [(a, min(a + 65536, len(fid)), lambda a, b: _chunk_depth(st, a, b, RASTER_TILE))
                              for a in range(0, len(fid), 65536)]

        G = len(sc.tri)
        if _PACKED and dt == torch.float32 and G < 2 ** 31:
            def packed(lo: int, hi: int) -> torch.Tensor:
                fid, chunks = slots(lo, hi)
                keys = torch.full((npad,), torch.iinfo(torch.int64).max, dtype=torch.int64, device=dev)
                low = (2 ** 31 - 1) - fid                            # higher face -> smaller key
                for a, b, depth in chunks:
                    pix, z = depth(a, b)
                    key = (z.view(torch.int32).to(torch.int64) << 32) | low[None, a:b]
                    keys.scatter_reduce_(0, pix.reshape(-1).long(), key.reshape(-1), "amin")
                return keys
            # two halves of the faces side by side on a CPU (lib.runtime.concurrently), each
            # into its own buffer: the smaller key of the two is the one buffer's
            cut = [0, G // 2, G] if G >= SPLIT_FACES else [0, G]
            parts = concurrently([lambda lo=lo, hi=hi: packed(lo, hi) for lo, hi in zip(cut[:-1], cut[1:])], dev)
            keys = parts[0] if len(parts) == 1 else torch.minimum(parts[0], parts[1], out=parts[0])
            inf_key = torch.tensor(math.inf, dtype=torch.float32).view(torch.int32).item() << 32
            face_idx = torch.where(keys < inf_key, (2 ** 31 - 1) - (keys & 0xFFFFFFFF), -1)
        else:
            fid, chunks = slots(0, G)
            face_idx = torch.full((npad,), -1, dtype=torch.int64, device=dev)
            zbuf = torch.full((npad,), math.inf, dtype=dt, device=dev)
            kept = []
            for a, b, depth in chunks:
                pix, z = depth(a, b)
                zbuf.scatter_reduce_(0, pix.reshape(-1).long(), z.reshape(-1), "amin")
                kept.append((pix, z, fid[a:b]))
            for pix, z, f in kept:
                pix = pix.reshape(-1).long()
                win = torch.isfinite(z.reshape(-1)) & (z.reshape(-1) == zbuf[pix])
                cand = torch.where(win, f[None].expand_as(z).reshape(-1), -1)
                face_idx.scatter_reduce_(0, pix, cand, "amax")
    return crop(face_idx)


SPLIT_FACES = 4096             # from this many faces the packed z-buffer runs as two halves side by side
SPAN_SLOTS = 1 << 18           # z-buffer slots (face-pixel pairs of the row spans) per chunk
_SPANS = True                  # private switch: False = the z-buffer's slots are RASTER_TILE tiles (tests, benchmarks)


def _spans(uvt: torch.Tensor, zt: torch.Tensor, table: torch.Tensor, fbatch: torch.Tensor, H: int, W: int,
           znear: float):
    """The z-buffer's candidate slots as row spans: for each face and pixel row, the pixel
    centres between the face's left and right boundary on that row, widened by a margin.

    uvt (G, 3, 2) pixel coordinates, zt (G, 3) depths, table: ``_face_table`` (19, G),
    fbatch (G,) image of each face instance.  Returns the slot faces fid (S,) int64 and the
    chunks [(a, b, depth)] with depth(a, b) -> (pix (1, b - a) int32 flat pixel index into
    the unpadded (B, H, W) layout, z (1, b - a) depth, inf where the centre is outside).

    A face's boundaries on a row are its long edge (top to bottom vertex) and one of the
    two short ones, at the row's centre clamped into the face's height.  The margin, 1/64 px
    plus 2^-16 of the face's largest coordinate, is far above the rounding of these few
    operations and of the edge test of :func:`_edge_depth` (about 2^-22 of the
    coordinates), so the spans hold every pixel centre that the test finds inside, and the
    test decides.  Degenerate faces, faces with a vertex at depth <= znear and faces with a
    non-finite projection get no spans (the tile layout gives them no inside slot).
    """
    dev = uvt.device
    G = uvt.shape[0]
    x, y = uvt.detach().permute(2, 1, 0).unbind(0)                   # (3, G): vertex, face
    z = zt.unbind(1)
    ok = (table[15] != 0) & torch.isfinite(uvt).all(2).all(1) & (torch.minimum(torch.minimum(z[0], z[1]), z[2]) > znear)
    ys, order = torch.sort(torch.where(ok[None], y, torch.zeros_like(y)), 0)        # top, middle, bottom
    xs = torch.gather(x, 0, order)
    big = torch.maximum(torch.maximum(xs.abs().amax(0), ys.abs().amax(0)), torch.full_like(ys[0], float(max(H, W))))
    margin = 1.0 / 64 + big * 2.0 ** -16
    y_top, y_mid, y_bot = ys.unbind(0)
    x_top, x_mid, x_bot = xs.unbind(0)

    def slope(dx, dy):
        return torch.where(dy > 0, dx / dy.clamp(min=1e-30), torch.zeros_like(dx))
    s_long, s_up, s_low = slope(x_bot - x_top, y_bot - y_top), slope(x_mid - x_top, y_mid - y_top), \
        slope(x_bot - x_mid, y_bot - y_mid)
    first = torch.where(ok, torch.ceil(y_top - 0.5 - margin), torch.zeros_like(y_top)).clamp(0, H)
    last = torch.where(ok, torch.floor(y_bot - 0.5 + margin), torch.full_like(y_top, -1.0)).clamp(-1, H - 1)
    nrow = (last - first + 1).clamp(min=0).long()
    R = int(nrow.sum())
    face = torch.repeat_interleave(torch.arange(G, device=dev), nrow, output_size=R)
    row = (torch.arange(R, device=dev) - (torch.cumsum(nrow, 0) - nrow).index_select(0, face)).add_(
        first.long().index_select(0, face))                            # (R,) pixel row of each span
    yr = row.to(uvt.dtype).add_(0.5)
    yc = torch.minimum(torch.maximum(yr, y_top.index_select(0, face)), y_bot.index_select(0, face))
    ym = y_mid.index_select(0, face)
    x_long = torch.addcmul(x_top.index_select(0, face), yc - y_top.index_select(0, face), s_long.index_select(0, face))
    upper = yc < ym
    x_short = torch.where(upper, torch.addcmul(x_top.index_select(0, face), yc - y_top.index_select(0, face),
                                               s_up.index_select(0, face)),
                          torch.addcmul(x_mid.index_select(0, face), yc - ym, s_low.index_select(0, face)))
    m = margin.index_select(0, face)
    c0 = torch.ceil(torch.minimum(x_long, x_short).sub_(0.5).sub_(m)).clamp_(0, W)
    c1 = torch.floor(torch.maximum(x_long, x_short).sub_(0.5).add_(m)).clamp_(-1, W - 1)
    width = (c1 - c0 + 1).clamp_(min=0).long()
    ends = torch.cumsum(width, 0)
    S = int(ends[-1]) if R else 0
    span = torch.repeat_interleave(torch.arange(R, device=dev), width, output_size=S)
    fid = face.index_select(0, span)
    col = torch.arange(S, device=dev).sub_((ends - width).sub_(c0.long()).index_select(0, span))
    # per span: the row terms (y - vy_i) ex_i of the edge functions, computed as the slots would
    terms = [torch.sub(yr, table[2 * i + 1].index_select(0, face)).mul_(table[6 + 2 * i].index_select(0, face))
             for i in range(3)]
    pix0 = (fbatch.index_select(0, face) * H + row) * W

    def depth(a: int, b: int):
        sp, f, c = span[a:b], fid[a:b], col[a:b]
        # gathers row by row with 1-D index_select (gathers along dim 1 are several times slower on the CPU)
        face_rows = lambda rs: [table[r].index_select(0, f) for r in rs]  # noqa: E731
        z = _edge_depth([t.index_select(0, sp) for t in terms], c.to(table.dtype).add_(0.5), face_rows((0, 2, 4)),
                        face_rows((7, 9, 11)), table[15].index_select(0, f), face_rows((16, 17, 18)))
        return (pix0.index_select(0, sp) + c).to(torch.int32)[None], z[None]

    chunks = [(a, min(a + SPAN_SLOTS, S), depth) for a in range(0, S, SPAN_SLOTS)]
    return fid, chunks


def _chunk_depth(st: _Setup, a: int, b: int, size: int = TILE):
    """Padded pixel index (int32) and depth (inf where the pixel centre is outside) per slot
    of the size x size tiles a..b, each (size * size, T): slots along the rows, so that the
    per-tile constants broadcast along the long axis (fast for small tiles).  Pixel centres
    are exact in floating point, so the values do not depend on how boxes are cut into tiles."""
    f = st.fid[a:b]
    P = size * size
    c = st.table.index_select(1, f)
    dt = c.dtype
    d = torch.arange(P, device=f.device, dtype=torch.int32)[:, None]
    dx = (d % size).to(dt)
    dy = torch.div(d, size, rounding_mode="floor").to(dt)
    ox, oy = st.x0[a:b], st.y0[a:b]
    wp = st.W + TILE
    base = ((st.fbatch.index_select(0, f) * (st.H + TILE) + oy) * wp + ox).to(torch.int32)
    pix = base[None] + (torch.div(d, size, rounding_mode="floor") * wp + d % size)
    x = (ox.to(dt) + 0.5)[None] + dx
    y = (oy.to(dt) + 0.5)[None] + dy
    rows = [torch.sub(y, c[2 * i + 1][None]).mul_(c[6 + 2 * i][None]) for i in range(3)]
    return pix, _edge_depth(rows, x, [c[r][None] for r in (0, 2, 4)], [c[r][None] for r in (7, 9, 11)], c[15][None],
                            [c[r][None] for r in (16, 17, 18)])


def _edge_depth(rows: list, x: torch.Tensor, vx: list, ey: list, o: torch.Tensor, iz: list) -> torch.Tensor:
    """The z-buffer's test and depth at pixel centres: depth where the centre is inside the
    face, inf elsewhere (the shape of x).

    x: the centres' columns (pixel units; overwritten); per vertex i of the face, each
    broadcastable to x: rows[i] = (y - vy_i) ex_i, the edge function's row term (overwritten),
    vx_i, ey_i (edge e_i = v_{i+1} - v_i) and 1/z_i (iz); o: the face's orientation (0 for
    degenerate faces).  ef_i = (ex (y - vy) - ey (x - vx)) o >= 0 on all three edges is inside;
    the depth is perspective-correct.  Both slot layouts (tiles, row spans) call this, so
    they give the same bits.
    """
    tmp = torch.empty_like(x)
    ef = []
    for i in range(3):
        e = rows[i]
        e.sub_(torch.sub(x, vx[i], out=tmp).mul_(ey[i])).mul_(o)
        ef.append(e)
    inside = torch.ge(ef[0], 0).logical_and_(ef[1] >= 0).logical_and_(ef[2] >= 0).logical_and_(o != 0)
    area = torch.add(ef[0], ef[1], out=x).add_(ef[2]).clamp_(min=1e-30)
    inv = torch.mul(ef[1], iz[0], out=tmp).add_(ef[2].mul_(iz[1])).add_(ef[0].mul_(iz[2])).div_(area)
    return inv.reciprocal().masked_fill_(~inside.logical_and_(inv > 0), math.inf)


def _bary_depth(sc: _Screen, g: torch.Tensor, hit: torch.Tensor):
    """Differentiable perspective-correct barycentrics (N, 3) and depth (N,) of face
    instances g at the hit pixel centres."""
    H, W = sc.H, sc.W
    rows, cols = hit.nonzero(as_tuple=True)[1:]
    p = torch.stack([cols.to(sc.uv.dtype) + 0.5, rows.to(sc.uv.dtype) + 0.5], 1)
    tri = sc.tri[g]
    v = sc.uv[tri]                                              # (N, 3, 2)
    iz = 1.0 / sc.z[tri]                                        # (N, 3)
    # screen-space barycentrics: weight of vertex i = area of the opposite sub-triangle
    lam = []
    for i in range(3):
        a, b = v[:, (i + 1) % 3], v[:, (i + 2) % 3]
        lam.append((b[:, 0] - a[:, 0]) * (p[:, 1] - a[:, 1]) - (b[:, 1] - a[:, 1]) * (p[:, 0] - a[:, 0]))
    lam = torch.stack(lam, 1)
    lam = lam / lam.sum(1, keepdim=True)
    w = lam * iz
    inv = w.sum(1)
    return w / inv[:, None], 1.0 / inv


# ------------------------------------------------------------ normals, shading
def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit face normals (..., F, 3) of verts (..., V, 3), right-hand rule on the winding
    (outwards for marching-cubes meshes); 0 for degenerate faces."""
    tri = verts[..., faces, :]
    n = torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-20)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor, reproducible: bool | None = None) -> torch.Tensor:
    """Area-weighted unit vertex normals (..., V, 3) of verts (..., V, 3), differentiable.

    reproducible: as ``silhouette`` (default: on CUDA, sorted sums instead of float atomics).
    """
    tri = verts[..., faces, :]
    n = torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)   # (..., F, 3)
    V, F = verts.shape[-2], faces.shape[0]
    per_face = n.movedim(-2, 0).reshape(F, -1)                      # (F, (...) * 3)
    acc = _segment_sum(faces.T.reshape(-1), per_face.repeat(3, 1), V, reproducible=reproducible)
    acc = acc.reshape((V,) + n.shape[:-2] + (3,)).movedim(0, -2)
    return torch.nn.functional.normalize(acc, dim=-1, eps=1e-20)


def normal_image(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, fragments: Fragments | None = None,
                 smooth: bool = True, frame: str = "world", image_size=None) -> torch.Tensor:
    """Unit normals of the visible surface per pixel, (..., H, W, 3), 0 on background.

    smooth: interpolate area-weighted vertex normals with the perspective-correct
    barycentrics, else face normals.  frame: "world" or "camera" (x right, y down, z
    forward; a surface facing the camera has n_z < 0).  Differentiable w.r.t. verts.
    """
    if frame not in ("world", "camera"):
        raise ValueError(f"frame must be 'world' or 'camera', got {frame!r}")
    faces = torch.as_tensor(faces, device=verts.device).long()
    fr = fragments if fragments is not None else rasterize(verts, faces, camera, image_size)
    batched = fr.face_idx.dim() == 3
    fidx = fr.face_idx if batched else fr.face_idx[None]
    bary = fr.bary if batched else fr.bary[None]
    B = fidx.shape[0]
    vb = verts if verts.dim() == 3 else verts[None].expand(B, -1, -1)
    hit = fidx >= 0
    bidx = torch.arange(B, device=verts.device)[:, None, None].expand_as(fidx)[hit]
    f = fidx[hit]
    if smooth:
        vn = vertex_normals(vb, faces)                                   # (B, V, 3)
        n = (vn[bidx[:, None], faces[f]] * bary[hit][..., None]).sum(1)
    else:
        n = face_normals(vb, faces)[bidx, f]
    n = torch.nn.functional.normalize(n, dim=-1, eps=1e-20)
    if frame == "camera":
        cam = camera.to(device=verts.device, dtype=verts.dtype)
        R = cam.R if len(cam) == B else cam.R.expand(B, 3, 3)
        n = (R[bidx] @ n[:, :, None])[..., 0]
    out = torch.zeros(fidx.shape + (3,), dtype=verts.dtype, device=verts.device).index_put((hit,), n)
    return out if batched else out[0]


def shade(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, light_dir=None,
          color=(0.8, 0.8, 0.8), ambient: float = 0.35, diffuse: float = 0.65, smooth: bool = True,
          fragments: Fragments | None = None, image_size=None) -> torch.Tensor:
    """Lambertian RGBA render (..., H, W, 4), float in [0, 1]; alpha = coverage, rgb 0 outside.

    light_dir: world direction towards the light (3,), default a head light (towards the
    camera).  Two-sided: |n . l|, so open meshes shade the same from both sides.
    """
    faces = torch.as_tensor(faces, device=verts.device).long()
    fr = fragments if fragments is not None else rasterize(verts, faces, camera, image_size)
    n = normal_image(verts, faces, camera, fr, smooth=smooth, frame="world")
    cam = camera.to(device=verts.device, dtype=verts.dtype)
    if light_dir is None:
        l = -cam.R[:, 2]                                            # (Bc, 3) towards the camera
        l = l.reshape((-1,) + (1,) * (n.dim() - 2) + (3,)) if n.dim() == 4 else l[0]
    else:
        l = torch.nn.functional.normalize(torch.as_tensor(light_dir, dtype=verts.dtype,
                                                          device=verts.device), dim=-1)
    lam = (n * l).sum(-1).abs()
    mask = fr.mask.to(verts.dtype)
    rgb = torch.as_tensor(color, dtype=verts.dtype, device=verts.device) * (ambient + diffuse * lam)[..., None]
    rgb = rgb.clamp(0.0, 1.0) * mask[..., None]
    return torch.cat([rgb, mask[..., None]], -1)

