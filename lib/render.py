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

Work is bounded by the number of face-pixel pairs within the blur radius: faces are cut
into 4 x 4 pixel tiles of their (blur-expanded) bounding boxes and processed in chunks, so
memory stays small (about 50 bytes per pair kept for the backward pass).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from lib.camera import Camera

TILE = 4                       # face bounding boxes are cut into TILE x TILE pixel tiles
CHUNK_TILES = 16384
SAVE_SLOTS = 1 << 24           # above this many tile slots the backward pass recomputes
SVR_SIGMA = 1e-5               # SPEC section 8 (pytorch3d soft silhouette settings)
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
def _tiles(uvt: torch.Tensor, zt: torch.Tensor, H: int, W: int, margin: float, znear: float):
    """Cut each face's pixel bounding box (expanded by ``margin`` px) into TILE x TILE tiles.

    uvt (G, 3, 2), zt (G, 3).  Returns tile face ids (T,) and tile origins x0, y0 (T,)
    (int64).  Boxes are clipped to the image; faces with a vertex at depth <= znear or a
    non-finite projection get no tiles.
    """
    dev = uvt.device
    ok = (zt > znear).all(1) & torch.isfinite(uvt).all(2).all(1)
    lo = torch.where(ok[:, None], uvt.min(1).values - margin, torch.zeros_like(uvt[:, 0]))
    hi = torch.where(ok[:, None], uvt.max(1).values + margin, torch.full_like(uvt[:, 0], -1.0))
    # pixel j is in the box iff lo <= j + 0.5 <= hi
    lim = torch.tensor([W - 1, H - 1], device=dev, dtype=lo.dtype)
    first = torch.ceil(lo - 0.5).clamp(min=0).minimum(lim + 1)
    last = torch.floor(hi - 0.5).minimum(lim).clamp(min=-1)
    first, last = first.long(), last.long()
    n = (last - first + 1).clamp(min=0)
    nt = (n + TILE - 1) // TILE                                 # tiles along x and y
    count = nt[:, 0] * nt[:, 1]
    total = int(count.sum())
    fid = torch.repeat_interleave(torch.arange(len(count), device=dev), count, output_size=total)
    start = torch.cumsum(count, 0) - count
    local = torch.arange(total, device=dev) - start[fid]
    ntx = nt[fid, 0]
    ty = torch.div(local, ntx, rounding_mode="floor")
    tx = local - ty * ntx
    x0 = first[fid, 0] + tx * TILE
    y0 = first[fid, 1] + ty * TILE
    return fid, x0, y0


def _face_table(uvt: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """Per-face constants, one row per quantity, (19, G): v0..v2 (rows 0-5), edges
    e_i = v_{i+1} - v_i (6-11), 1/|e_i|^2 (12-14), orientation (15: sign of the doubled
    signed area, 0 for degenerate faces), 1/z of the vertices (16-18)."""
    v = uvt
    e = v.roll(-1, dims=1) - v
    sq = (e * e).sum(2)
    inv = torch.where(sq > 0, 1.0 / sq.clamp(min=1e-30), torch.zeros_like(sq))
    area2 = e[:, 0, 0] * (-e[:, 2, 1]) - e[:, 0, 1] * (-e[:, 2, 0])
    orient = torch.where(area2.abs() > 1e-12 * sq.max(1).values, torch.sign(area2), torch.zeros_like(area2))
    iz = 1.0 / zt.clamp(min=1e-30)
    return torch.cat([v.reshape(-1, 6), e.reshape(-1, 6), inv, orient[:, None], iz], 1).T.contiguous()


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

    @property
    def npad(self) -> int:
        return self.B * (self.H + TILE) * (self.W + TILE)

    def crop(self, flat: torch.Tensor) -> torch.Tensor:
        """(npad,) padded pixel values -> (B, H, W)."""
        return flat.view(self.B, self.H + TILE, self.W + TILE)[:, :self.H, :self.W]


_BIG = 1e4   # -log(1 - p) of a deep-inside pair: exp(-1e4) == 0 in float32 and float64


def _chunk_terms(st: _Setup, a: int, b: int, with_grad: bool) -> dict:
    """Per-slot terms of tiles a..b, each a (T, TILE*TILE) tensor (a slot = a tile pixel).

    pix: padded pixel index (int32); lsig: log(1 - p_f) (-1e4 for deep-inside pairs, 0
    beyond the blur radius).  with_grad adds rx, ry (from the nearest point of the nearest
    edge to the pixel) and w0..w2 such that dI/d(uv of the face's vertex k) =
    -(1 - I) * w_k * (rx, ry) summed over the slots.  want_depth adds depth (of the face
    point nearest to the pixel) and cand (bool, p_f > 0).  Slots outside a face's
    blur-expanded box are farther than the blur radius, so they need no mask.

    Written for the CPU: float masks from comparisons with ``out=``, because bool masks,
    where() and masked_fill are several times slower there than plain arithmetic.
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
    # edge functions, scaled by the orientation so that >= 0 is the inner side; -1 for
    # degenerate faces (never inside)
    ef = []
    for i in range(3):
        a0 = o * (ex[i] * ay[i] - ey[i] * ax[i]) - (1.0 - o.abs())
        ef.append((dy * (o * ex[i])[:, None]).sub_(dx * (o * ey[i])[:, None]).add_(a0[:, None]))
    cmin = torch.minimum(torch.minimum(ef[0], ef[1]), ef[2])
    inside = torch.ge(cmin, 0.0, out=torch.empty_like(cmin))
    out = {"pix": pix}
    if st.sigma <= 0:                                       # hard coverage
        out["lsig"] = inside.mul_(-_BIG)
        return out
    ts, rxs, rys, ds = [], [], [], []
    for i in range(3):
        wx = ax[i][:, None] + dx
        wy = ay[i][:, None] + dy
        t = (wx * (inv[i] * ex[i])[:, None]).add_(wy * (inv[i] * ey[i])[:, None]).clamp_(0.0, 1.0)
        rx = wx.sub_(t * ex[i][:, None])
        ry = wy.sub_(t * ey[i][:, None])
        ts.append(t)
        rxs.append(rx)
        rys.append(ry)
        ds.append((rx * rx).addcmul_(ry, ry))
    dmin = torch.minimum(torch.minimum(ds[0], ds[1]), ds[2])
    band = torch.le(dmin, st.r, out=torch.empty_like(dmin))
    sgs = inside.mul(-2.0 / st.sigma).add_(1.0 / st.sigma)  # sign(s) / sigma
    zs = dmin * sgs                                         # s / sigma
    big = inside * _BIG
    out["lsig"] = torch.nn.functional.logsigmoid(zs).add_(big).mul_(band).sub_(big)
    if with_grad or st.want_depth:
        # one-hot of the nearest edge (ties -> lowest index)
        m0 = torch.ge(ds[1], ds[0], out=torch.empty_like(dmin)).mul_(
            torch.ge(ds[2], ds[0], out=torch.empty_like(dmin)))
        m1 = torch.gt(ds[0], ds[1], out=torch.empty_like(dmin)).mul_(
            torch.ge(ds[2], ds[1], out=torch.empty_like(dmin)))
        m = [m0, m1, (1.0 - m0).sub_(m1)]
    if with_grad:
        # dI/ds = -(1 - I) p / sigma, ds/da = -2 sgn (1 - t) r, ds/db = -2 sgn t r for the
        # nearest edge (a, b) (t optimal: envelope theorem); vertex k starts edge k and
        # ends edge k - 1.
        q = torch.sigmoid(-zs).mul_(band).mul_(sgs).mul_(2.0)
        out["rx"] = (m[0] * rxs[0]).addcmul_(m[1], rxs[1]).addcmul_(m[2], rxs[2])
        out["ry"] = (m[0] * rys[0]).addcmul_(m[1], rys[1]).addcmul_(m[2], rys[2])
        mq = [mk.mul(q) for mk in m]
        u = [mq[k] * ts[k] for k in range(3)]
        for k in range(3):
            out[f"w{k}"] = (mq[k] - u[k]).add_(u[k - 1])
    if st.want_depth:
        iz = [c[16 + k][:, None] for k in range(3)]
        area = (ef[0] + ef[1] + ef[2]).clamp_(min=1e-30)
        inv_in = (ef[1] * iz[0] + ef[2] * iz[1] + ef[0] * iz[2]) / area
        inv_out = sum(m[k] * ((1.0 - ts[k]) * iz[k] + ts[k] * iz[(k + 1) % 3]) for k in range(3))
        out["depth"] = 1.0 / (inside * inv_in + (1.0 - inside) * inv_out)
        out["cand"] = torch.maximum(band, inside) > 0
    return out


class _SoftSilhouette(torch.autograd.Function):
    """uv (N, 2) -> images (B, H, W), see ``silhouette``.  The backward pass reuses the
    per-slot terms saved by the forward pass or, above ``SAVE_SLOTS`` slots, recomputes them."""

    @staticmethod
    def forward(ctx, uv, st: _Setup, tri: torch.Tensor, K: int | None, need_grad: bool):
        L = uv.new_zeros(st.npad)
        n = len(st.fid)
        chunks = [(a, min(a + CHUNK_TILES, n)) for a in range(0, n, CHUNK_TILES)]
        save = st.sigma > 0 and (K is not None or (need_grad and n * TILE * TILE <= SAVE_SLOTS))
        saved = []
        for a, b in chunks:
            tm = _chunk_terms(st, a, b, with_grad=save)
            if K is None:
                L.index_add_(0, tm["pix"].reshape(-1), tm["lsig"].reshape(-1))
            saved.append(tm if save else None)
        if K is not None and st.sigma > 0:
            _keep_nearest(saved, K)
            for tm in saved:
                L.index_add_(0, tm["pix"].reshape(-1), tm["lsig"].reshape(-1))
        img = -torch.expm1(st.crop(L))
        ctx.st, ctx.tri, ctx.chunks, ctx.saved, ctx.nv = st, tri, chunks, saved, uv.shape[0]
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
                gx, gy = g * tm["rx"], g * tm["ry"]
                per_tile = torch.stack([(tm[f"w{k}"] * gg).sum(1) for k in range(3) for gg in (gx, gy)], 1)
                gface.index_add_(0, st.fid[a:b], per_tile)
        grad_uv = img.new_zeros(ctx.nv, 2)
        grad_uv.index_add_(0, tri.reshape(-1), gface.view(-1, 2))
        ctx.saved = None
        return grad_uv, None, None, None, None


def _keep_nearest(terms: list[dict], K: int) -> None:
    """Zero the terms of all but the K candidate faces nearest to the camera at each pixel."""
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
               znear: float = 1e-3) -> torch.Tensor:
    """Soft silhouette in [0, 1], differentiable w.r.t. ``verts`` (see the module docstring).

    verts (V, 3) or (B, V, 3) float32/float64; faces (F, 3) int64; camera unbatched or a
    batch of B; image_size: H or (H, W), default the camera's (intrinsics are rescaled).
    sigma: softness in squared NDC units (0 = hard coverage, no gradient); eps: probability
    cut-off defining the blur radius; faces_per_pixel: None = all faces within the blur
    radius, K = only the K nearest (pytorch3d semantics).  Returns (H, W) or (B, H, W).
    """
    sc = _screen(verts, faces, camera, image_size)
    scale = 2.0 / min(sc.H, sc.W)                 # NDC units per pixel
    sigma_px = float(sigma) / scale ** 2 if sigma > 0 else 0.0
    r_px = blur_radius(sigma_px, eps) if sigma > 0 else 0.0
    if len(sc.tri) == 0:
        img = sc.uv.new_zeros(sc.B, sc.H, sc.W)
    else:
        with torch.no_grad():
            uvt, zt = sc.uv[sc.tri], sc.z[sc.tri]
            fid, x0, y0 = _tiles(uvt, zt, sc.H, sc.W, math.sqrt(r_px), znear)
            fbatch = torch.div(torch.arange(len(sc.tri), device=fid.device), len(faces),
                               rounding_mode="floor")
            st = _Setup(_face_table(uvt.detach(), zt.detach()), fid, x0, y0, fbatch, sc.B, sc.H,
                        sc.W, sigma_px, r_px, faces_per_pixel is not None and sigma > 0)
        need_grad = torch.is_grad_enabled() and sc.uv.requires_grad
        img = _SoftSilhouette.apply(sc.uv, st, sc.tri, faces_per_pixel, need_grad)
    return img if sc.batched else img[0]
