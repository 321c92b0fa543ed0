"""The soft silhouette (SoftRas / pytorch3d style) and its exact gradient, in pure torch.

For pixel x and face f let s_f(x) be the signed squared distance from the pixel centre to
the projected triangle, in squared NDC units (NDC spans [-1, 1] over the shorter image side,
so one pixel is 2 / min(H, W)), negative inside.  With r = sigma * log(1 / eps - 1) (the
"blur radius", :func:`blur_radius`)

    p_f = 1                   if s_f < -r      (deep inside; 1 - p_f < eps)
    p_f = sigmoid(-s_f/sigma)  if |s_f| <= r
    p_f = 0                   if s_f > r       (p_f < eps)
    I(x) = 1 - prod_f (1 - p_f)

so only faces within the blur radius of a pixel are ever looked at.  sigma -> 0 gives the
hard coverage.  The SVR refinement of the paper used sigma = 1e-5, eps = 1e-4 (blur
radius log(1/1e-4 - 1) * 1e-5) and 25 faces per pixel (``SVR_SIGMA``, ``SVR_EPS``,
``SVR_FACES_PER_PIXEL``): ``faces_per_pixel=K`` keeps, per pixel, only the K candidate faces
(p_f > 0) nearest to the camera, the depth of a face being that of its point closest to the
pixel.  The gradient (custom autograd Function) is the exact gradient of the function above
w.r.t. the projected vertices, chained by autograd to the 3D vertices (and the camera
tensors).  Conventions and input shapes: :mod:`.screen`.

Work is bounded by the face-pixel pairs near each face: faces' blur-expanded bounding
boxes are cut into 4 x 4 pixel tiles (:func:`.screen.face_tiles`), and the tiles are
evaluated in chunks of ``RenderSettings.chunk_tiles`` with broadcast arithmetic (no per-pair
gathers).  With all faces, the forward pass keeps 24 bytes per slot (float32) for the
backward pass, up to ``RenderSettings.save_slots`` slots; beyond that the backward pass
recomputes the chunks, so memory stays bounded.  ``faces_per_pixel`` keeps the depths of
the candidate slots only; it chooses each pixel's K nearest by depth buckets and an
integer sort of one bucket per pixel (:func:`_farthest_radix`; two halves of the pixels
side by side), and only then computes the log-terms and gradient terms of the kept slots
(:func:`_pair_terms`, the chunks' operations per slot, so the same bits), which the
backward pass sums per tile as the chunks' rows are summed.  Chunks are evaluated two at a
time side by side on the CPU (``lib.runtime.concurrently``), forward and backward; their
sums are added in chunk order, so the schedule changes no bit.

Profiler labels: "render.silhouette.forward", "render.silhouette.backward".
"""
from __future__ import annotations

import math
import threading

import torch

from .camera import Camera
from .screen import TILE, TileSetup, face_table, face_tiles, project_mesh
from .settings import DEFAULT, RenderSettings
from ..ops.indexing import flat_nonzero
from ..runtime import concurrently
from ..runtime.cpus import keep_freed_memory
from .sums import reproducible_on, segment_sum

__all__ = ["silhouette", "silhouette_pairs", "blur_radius", "SVR_SIGMA", "SVR_EPS", "SVR_FACES_PER_PIXEL"]

SVR_SIGMA = 1e-5               # the paper's SVR refinement (pytorch3d soft silhouette settings)
SVR_EPS = 1e-4
SVR_FACES_PER_PIXEL = 25


def blur_radius(sigma: float, eps: float = SVR_EPS) -> float:
    """Squared-NDC distance beyond which p_f < eps: sigma * log(1/eps - 1).

    Args:
        sigma: softness (squared NDC units, or squared pixels: the result has sigma's unit).
        eps: probability cut-off; default ``SVR_EPS``.
    """
    return sigma * math.log(1.0 / eps - 1.0)


CULL_MARGIN = 1e-3             # px: culled tiles are at least this much farther than the blur radius


def _cull_tiles(table: torch.Tensor, fid: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, r: float):
    """Indices (int64) of the TILE x TILE tiles that are not wholly beyond the blur radius.

    A tile is dropped when all its pixel centres lie outside one edge line of its face, more
    than sqrt(r) + CULL_MARGIN pixels from it: every point of the triangle is then farther
    than the blur radius from them, so each of its slots is outside the face and beyond the
    radius, and contributes exactly nothing in any mode (log-term 0, gradient weights 0, no
    depth candidate).  Dropping them leaves every other term, and the order in which terms
    meet at a pixel or a face, unchanged, so images and gradients are bitwise the same.
    The test runs in float64 so that its rounding is far below the margin, and only on the
    tiles of faces with several tiles: a face's only tile holds its whole blur-expanded box,
    so it is rarely beyond an edge line (sub-pixel faces of a fine mesh are all such faces).
    """
    T = len(fid)
    if T > 1:
        same = fid[1:] == fid[:-1]                 # a face's tiles are consecutive
        multi = torch.zeros(T, dtype=torch.bool, device=fid.device)
        multi[1:] |= same
        multi[:-1] |= same
        some = multi.nonzero().squeeze(1)
    else:
        some = fid.new_zeros(0)
    far = torch.zeros(T, dtype=torch.bool, device=fid.device)
    if len(some):
        far[some] = _far_tiles(table, fid[some], x0[some], y0[some], r)
    return (~far).nonzero().squeeze(1)


def _far_tiles(table: torch.Tensor, fid: torch.Tensor, x0: torch.Tensor, y0: torch.Tensor, r: float) -> torch.Tensor:
    """(T,) bool: the tiles all of whose pixel centres lie outside one edge line of their face,
    more than sqrt(r) + CULL_MARGIN pixels from it (see :func:`_cull_tiles`)."""
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
    return far



_BIG = 1e4   # -log(1 - p) of a deep-inside pair: exp(-1e4) == 0 in float32 and float64


_WORKSPACES = threading.local()


def _workspace(device: torch.device, dtype: torch.dtype, n: int, reuse: bool = True, keep: int = 1 << 14):
    """Named scratch buffers of n elements for one chunk, as (n // (TILE*TILE), TILE*TILE)
    views: get(name).  On the CPU the buffers are kept per thread and reused from call to
    call (at least ``keep`` tiles each), unless ``reuse`` is False
    (``RenderSettings.reuse_buffers``); elsewhere (the caching allocator already reuses
    memory) they are allocated per chunk."""
    P = TILE * TILE
    if device.type != "cpu" or not reuse:
        return lambda name: torch.empty(n // P, P, dtype=dtype, device=device)
    pool = getattr(_WORKSPACES, "pool", None)
    if pool is None:
        pool = _WORKSPACES.pool = {}

    def get(name: str) -> torch.Tensor:
        buf = pool.get((name, dtype))
        if buf is None or buf.numel() < n:
            buf = pool[(name, dtype)] = torch.empty(max(n, keep * P), dtype=dtype)
        return buf[:n].view(n // P, P)
    return get


_P_SHIFT = (TILE * TILE).bit_length() - 1     # slot -> tile by a shift (TILE * TILE is a power of two)
assert 1 << _P_SHIFT == TILE * TILE


def _chunk_terms(st: TileSetup, a: int, b: int, with_grad: bool, settings: RenderSettings = DEFAULT) -> dict:
    """Per-slot terms of tiles a..b, each a (T, TILE*TILE) tensor (a slot = a tile pixel).

    pix: padded pixel index (int32); lsig: log(1 - p_f) (-1e4 for deep-inside pairs, 0
    beyond the blur radius).  with_grad adds rx, ry (from the nearest point of the nearest
    edge to the pixel) and w0..w2 such that dI/d(uv of the face's vertex k) =
    -(1 - I) * w_k * (rx, ry) summed over the slots.  want_depth replaces pix and lsig
    by the chunk's slot count ``slots`` (T * TILE * TILE) and the candidate slots (p_f > 0)
    alone, flat and in slot order: their flat indices cidx, pixels cpix (int64) and the
    depths cdepth of the face points nearest to them (with_grad is then ignored: the
    selection's kept slots get their terms from :func:`_pair_terms`).  Slots outside a
    face's blur-expanded box are farther than the blur radius, so they need no mask.

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
    ws = _workspace(dev, dt, T * P, settings.reuse_buffers, settings.chunk_tiles)
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
    if st.want_depth:
        out = {"slots": T * P}
    else:
        out = {"pix": base[:, None] + (torch.div(d, TILE, rounding_mode="floor") * wp + d % TILE)}
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
    if st.want_depth:
        # only candidates (p_f > 0) are kept: their slots, pixels and depths (every other
        # slot's log-term is +-0); their log-terms and gradient terms wait for the K-nearest
        # selection (:func:`_pair_terms`, the same operations per slot, so the same bits)
        cand = torch.maximum(band, inside, out=band)
        cidx = flat_nonzero(torch.gt(cand, 0.0, out=_workspace(dev, torch.bool, T * P, settings.reuse_buffers,
                                                                 settings.chunk_tiles)("cand")).view(-1))
        dc = cidx & (P - 1)
        out["cidx"] = cidx
        out["cpix"] = base.index_select(0, cidx >> _P_SHIFT) + (dc >> (TILE.bit_length() - 1)) * wp + (dc & (TILE - 1))
        # the depths of the face points nearest to the slots, over the whole chunk (broadcast
        # arithmetic is cheaper per slot than gathering its inputs at the candidates), kept
        # at the candidates
        m = _nearest_edge(*ds, ws=ws)
        iz = [c[16 + k][:, None] for k in range(3)]
        area = torch.add(ef[0], ef[1], out=ws("area")).add_(ef[2]).clamp_(min=1e-30)
        inv_in = torch.mul(ef[1], iz[0], out=ws("inv_in")).add_(torch.mul(ef[2], iz[1], out=tmp)) \
            .add_(torch.mul(ef[0], iz[2], out=tmp)).div_(area)
        inv_out = ws("inv_out")
        for k in range(3):                          # sum over k of m_k ((1 - t_k) iz_k + t_k iz_k+1)
            term = torch.mul(ts[k], -1.0, out=tmp).add_(1.0).mul_(iz[k]).add_(ts[k].mul_(iz[(k + 1) % 3])).mul_(m[k])
            inv_out.copy_(term) if k == 0 else inv_out.add_(term)
        den = torch.mul(inside, inv_in, out=inv_in).add_(inside.mul_(-1.0).add_(1.0).mul_(inv_out))
        out["cdepth"] = torch.reciprocal(den.view(-1).index_select(0, cidx))
        return out
    sgs = torch.mul(inside, -2.0 / st.sigma, out=ws("sgs")).add_(1.0 / st.sigma)   # sign(s) / sigma
    zs = torch.mul(dmin, sgs, out=ws("zs"))                 # s / sigma
    if st.soft_inside:
        band = torch.maximum(band, inside, out=band)
        out["lsig"] = torch.nn.functional.logsigmoid(zs).mul_(band)
    else:
        big = torch.mul(inside, _BIG, out=ws("big"))
        out["lsig"] = torch.nn.functional.logsigmoid(zs).add_(big).mul_(band).sub_(big)
    if with_grad:
        m = _nearest_edge(*ds, ws=ws)
        # dI/ds = -(1 - I) p / sigma, ds/da = -2 sgn (1 - t) r, ds/db = -2 sgn t r for the
        # nearest edge (a, b) (t optimal: envelope theorem); vertex k starts edge k and
        # ends edge k - 1.
        q = torch.neg(zs, out=ws("q"))
        _sigmoid_(q).mul_(band).mul_(sgs).mul_(2.0)
        out["rx"] = (m[0] * rxs[0]).addcmul_(m[1], rxs[1]).addcmul_(m[2], rxs[2])
        out["ry"] = (m[0] * rys[0]).addcmul_(m[1], rys[1]).addcmul_(m[2], rys[2])
        mq = [mk.mul_(q) for mk in m]                       # m, ts are scratch from here on
        u = [torch.mul(mq[k], ts[k], out=ts[k]) for k in range(3)]
        for k in range(3):
            out[f"w{k}"] = (mq[k] - u[k]).add_(u[k - 1])
    return out


def _nearest_edge(d0: torch.Tensor, d1: torch.Tensor, d2: torch.Tensor, ws=None) -> list[torch.Tensor]:
    """One-hot (float 0/1) of the edge nearest to each slot, ties to the lowest index.

    Args:
        d0, d1, d2: squared distances to edges 0..2, all of one shape.
        ws: a chunk's ``_workspace`` (its buffers "m0".."m2", "tmp"), or None for fresh tensors.
    Returns:
        [m0, m1, m2], each of the distances' shape and dtype.
    """
    if ws is None:
        dt = d0.dtype
        m0 = torch.ge(d1, d0).to(dt).mul_(torch.ge(d2, d0).to(dt))
        m1 = torch.gt(d0, d1).to(dt).mul_(torch.ge(d2, d1).to(dt))
        m2 = torch.empty_like(m0)
    else:
        tmp = ws("tmp")
        m0 = torch.ge(d1, d0, out=ws("m0")).mul_(torch.ge(d2, d0, out=tmp))
        m1 = torch.gt(d0, d1, out=ws("m1")).mul_(torch.ge(d2, d1, out=tmp))
        m2 = ws("m2")
    return [m0, m1, torch.mul(m0, -1.0, out=m2).add_(1.0).sub_(m1)]     # (1 - m0) - m1, exact on 0/1


_VECTOR_BLOCK = 1 << 14    # elements per sigmoid call: a multiple of every SIMD width, below torch's grain size


def _sigmoid_(x: torch.Tensor) -> torch.Tensor:
    """x.sigmoid_() with every element on torch's vector path, returned.

    Why: torch's CPU sigmoid computes the last (n mod 2 x vector width) elements of a call,
    and of each thread's share, with a scalar exp whose last bit differs from the vector
    one; calls of a fixed block size (one thread each) and a padded tail make each
    element's bits independent of where it sits, so the chunk and pair layouts agree.

    Args:
        x: contiguous tensor, any shape.
    """
    flat = x.view(-1)
    n = flat.numel()
    m = n - n % _VECTOR_BLOCK if x.device.type == "cpu" else n
    for a in range(0, m, _VECTOR_BLOCK):
        part = flat[a:a + _VECTOR_BLOCK]
        torch.sigmoid(part, out=part)
    if m < n:
        k = n - m
        pad = flat.new_zeros(64 * ((k + 63) // 64))
        pad[:k] = flat[m:]
        flat[m:] = torch.sigmoid(pad)[:k]
    return x


def _pair_terms(st: TileSetup, slots: torch.Tensor, with_grad: bool = True) -> dict:
    """Log-terms and gradient terms of the given slots alone, flat: what
    ``_chunk_terms(with_grad=True)`` gives at those slots, bit for bit (the same elementwise
    operations on the same per-tile constants, gathered per slot instead of broadcast over
    a tile).

    Why: with ``faces_per_pixel`` only the K nearest candidates of a pixel enter the image
    and carry a gradient, a small part of all slots, so their terms are computed after the
    selection.

    Args:
        st: the call's tile setup.
        slots: (n,) int64 global flat slot indices (tile * TILE * TILE + slot in the tile).
        with_grad: add the gradient terms; default True.
    Returns:
        dict of (n,) tensors: pix (int64 padded pixel), lsig, and with_grad rx, ry, w0, w1,
        w2 (see ``_chunk_terms``).
    """
    tile = slots >> _P_SHIFT
    d = slots & (TILE * TILE - 1)
    f = st.fid.index_select(0, tile)
    c = [row.index_select(0, f) for row in st.table[:16]]     # per slot: v (0-5), e (6-11), 1/|e|^2, o
    dt = c[0].dtype
    dx = (d & (TILE - 1)).to(dt)
    dy = (d >> (TILE.bit_length() - 1)).to(dt)
    ox, oy = st.x0.index_select(0, tile), st.y0.index_select(0, tile)
    wp = st.W + TILE
    pix = (st.fbatch.index_select(0, f) * (st.H + TILE) + oy) * wp + ox + (d >> (TILE.bit_length() - 1)) * wp \
        + (d & (TILE - 1))
    oxp, oyp = ox.to(dt) + 0.5, oy.to(dt) + 0.5
    o = c[15]
    ef, ts, rxs, rys, ds = [], [], [], [], []
    for i in range(3):
        ax, ay = oxp - c[2 * i], oyp - c[2 * i + 1]
        ex, ey, inv = c[6 + 2 * i], c[7 + 2 * i], c[12 + i]
        a0 = o * (ex * ay - ey * ax) - (1.0 - o.abs())
        ef.append((dy * (o * ex)).sub_(dx * (o * ey)).add_(a0))
        wx, wy = ax + dx, ay + dy
        t = (wx * (inv * ex)).add_(wy * (inv * ey)).clamp_(0.0, 1.0)
        rx, ry = wx.sub_(t * ex), wy.sub_(t * ey)
        ts.append(t)
        rxs.append(rx)
        rys.append(ry)
        ds.append((rx * rx).addcmul_(ry, ry))
    inside = torch.ge(torch.minimum(torch.minimum(ef[0], ef[1]), ef[2]), 0.0).to(dt)
    dmin = torch.minimum(torch.minimum(ds[0], ds[1]), ds[2])
    band = torch.le(dmin, st.r).to(dt)
    sgs = (inside * (-2.0 / st.sigma)).add_(1.0 / st.sigma)
    zs = dmin * sgs
    if st.soft_inside:
        band = torch.maximum(band, inside)
        out = {"pix": pix, "lsig": torch.nn.functional.logsigmoid(zs)}        # band is 1 at every candidate
    else:
        big = inside * _BIG
        out = {"pix": pix, "lsig": torch.nn.functional.logsigmoid(zs).add_(big).mul_(band).sub_(big)}
    if not with_grad:
        return out
    m = _nearest_edge(*ds)
    q = _sigmoid_(torch.neg(zs)).mul_(band).mul_(sgs).mul_(2.0)
    out["rx"] = (m[0] * rxs[0]).addcmul_(m[1], rxs[1]).addcmul_(m[2], rxs[2])
    out["ry"] = (m[0] * rys[0]).addcmul_(m[1], rys[1]).addcmul_(m[2], rys[2])
    mq = [mk.mul_(q) for mk in m]
    u = [mq[k] * ts[k] for k in range(3)]
    for k in range(3):
        out[f"w{k}"] = (mq[k] - u[k]).add_(u[k - 1])
    return out


# pixel sums in fixed point where they must be reproducible (.sums explains why)
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


class _SoftSilhouette(torch.autograd.Function):
    """uv (N, 2) -> images (B, H, W), see ``silhouette``.  The backward pass reuses the
    per-slot terms saved by the forward pass or, above ``settings.save_slots`` slots, recomputes them."""

    @staticmethod
    def forward(ctx, uv, st: TileSetup, tri: torch.Tensor, K: int | None, need_grad: bool, fixed: bool | None,
                settings: RenderSettings):
        fixed = reproducible_on(uv.device, fixed)
        L = torch.zeros(st.npad, dtype=torch.int64 if fixed else uv.dtype, device=uv.device)
        n = len(st.fid)
        # an even number of equal chunks of at most chunk_tiles: the pairs run side by side
        # finish together (a last chunk alone would run on one core)
        count = 2 * -(-n // (2 * settings.chunk_tiles))
        step = max(1, -(-n // max(count, 1)))
        chunks = [(a, min(a + step, n)) for a in range(0, n, step)]
        nearest = K is not None and st.sigma > 0
        save = st.sigma > 0 and need_grad and not nearest and n * TILE * TILE <= settings.save_slots
        saved = []
        # two chunks at a time side by side (their terms are independent); the pixel sums
        # stay in chunk order, so the image does not depend on the schedule
        for i in range(0, len(chunks), 2):
            pair = concurrently([lambda a=a, b=b: _chunk_terms(st, a, b, with_grad=save, settings=settings)
                                 for a, b in chunks[i:i + 2]], uv.device)
            for tm in pair:
                if not nearest:                         # hard coverage: any K >= 1 covering faces give 1
                    _add_log_terms(L, tm["pix"].reshape(-1), tm.pop("lsig").reshape(-1))
                saved.append(tm if save or nearest else None)
        ctx.pairs = None
        if nearest:
            # the selection in two halves of the pixels side by side, split where about half
            # of the tiles start (settings.split_nearest)
            split = None
            if n and settings.split_nearest:
                rows = st.fbatch.index_select(0, st.fid) * (st.H + TILE) + st.y0
                cum = torch.bincount(rows, minlength=st.B * (st.H + TILE)).cumsum_(0)
                split = int(torch.searchsorted(cum, cum[-1:] // 2)) * (st.W + TILE)
            kept = _keep_nearest(saved, K, st.npad, settings.radix_nearest, split).to(L.device)
            saved = []
            # the kept slots' log-terms (and gradient terms), in two halves side by side,
            # split between tiles (a tile's slots are summed together in the backward pass);
            # added to the pixels in slot order
            tile = kept >> _P_SHIFT
            mid = int(torch.searchsorted(tile, tile[len(tile) // 2:len(tile) // 2 + 1])) if len(tile) else 0
            halves = [h for h in (kept[:mid], kept[mid:]) if len(h)]
            parts = concurrently([lambda h=h: dict(_pair_terms(st, h, need_grad), slots=h) for h in halves],
                                 uv.device)
            for tm in parts:
                _add_log_terms(L, tm["pix"], tm.pop("lsig"))
            if need_grad:
                ctx.pairs = parts
        if fixed:
            L = (L.to(torch.float64) / FIXED_SCALE).to(uv.dtype)
        img = -torch.expm1(st.crop(L))
        ctx.st, ctx.tri, ctx.chunks, ctx.saved, ctx.nv = st, tri, chunks, saved, uv.shape[0]
        ctx.fixed, ctx.settings = fixed, settings
        ctx.save_for_backward(img)
        return img

    @staticmethod
    def backward(ctx, grad_img):
        with torch.profiler.record_function("render.silhouette.backward"):
            return _SoftSilhouette._backward(ctx, grad_img)

    @staticmethod
    def _backward(ctx, grad_img):
        (img,) = ctx.saved_tensors
        st, tri = ctx.st, ctx.tri
        G = img.new_zeros(st.npad)
        st.crop(G).copy_(grad_img * (1.0 - img))    # 0 where covered: no gradient there
        gface = img.new_zeros(st.table.shape[1], 6)
        if ctx.pairs is not None:
            # the kept slots' terms, scattered into rows of TILE * TILE per tile (zeros at the
            # other slots) and summed as the full chunks' rows are, so the same bits
            P = TILE * TILE

            def pair_sums(tm: dict) -> tuple[torch.Tensor, torch.Tensor]:
                """The tiles (U,) holding tm's slots and their (6, U) gradient sums."""
                g = G.index_select(0, tm["pix"])
                gx, gy = tm.pop("rx").mul_(g), tm.pop("ry").mul_(g)
                slots = tm["slots"]
                tiles, row = torch.unique_consecutive(slots >> _P_SHIFT, return_inverse=True)
                at = row.mul_(P).add_(slots & (P - 1))
                # the six quantities fill the same slots in turn: one buffer, zeroed once
                rows = g.new_zeros(len(tiles), P)
                sums = g.new_empty(6, len(tiles))
                prod = torch.empty_like(g)
                for j, (k, gg) in enumerate((k, gg) for k in range(3) for gg in (gx, gy)):
                    rows.view(-1).index_copy_(0, at, torch.mul(tm[f"w{k}"], gg, out=prod))
                    torch.sum(rows, 1, out=sums[j])
                return tiles, sums

            for tiles, sm in concurrently([lambda tm=tm: pair_sums(tm) for tm in ctx.pairs], G.device):
                segment_sum(st.fid.index_select(0, tiles), sm.T, 0, out=gface, sorted_index=True,
                            reproducible=ctx.fixed)
        elif st.sigma > 0:
            settings = ctx.settings
            saved = ctx.saved or [None] * len(ctx.chunks)

            def face_sums(a: int, b: int, tm: dict | None) -> torch.Tensor:
                """(6, T) per-tile gradient sums of tiles a..b (x, y for each vertex)."""
                if tm is None:
                    tm = _chunk_terms(st, a, b, with_grad=True, settings=settings)
                g = G.index_select(0, tm["pix"].reshape(-1)).view_as(tm["rx"])
                gx, gy = tm.pop("rx").mul_(g), tm.pop("ry").mul_(g)        # the terms are spent here
                T = gx.shape[0]
                ws = _workspace(g.device, g.dtype, T * TILE * TILE, settings.reuse_buffers, settings.chunk_tiles)
                prod = ws("prod")
                sums = torch.empty(6, T, dtype=g.dtype, device=g.device)
                for j, (k, gg) in enumerate((k, gg) for k in range(3) for gg in (gx, gy)):
                    torch.sum(torch.mul(tm[f"w{k}"], gg, out=prod), 1, out=sums[j])
                return sums

            # two chunks side by side, their sums added to the faces in chunk order
            jobs = list(zip(ctx.chunks, saved))
            for i in range(0, len(jobs), 2):
                pair = jobs[i:i + 2]
                sums = concurrently([lambda a=a, b=b, tm=tm: face_sums(a, b, tm) for (a, b), tm in pair], G.device)
                for ((a, b), _), sm in zip(pair, sums):
                    segment_sum(st.fid[a:b], sm.T, 0, out=gface, sorted_index=True, reproducible=ctx.fixed)
                for j in range(i, i + len(pair)):
                    saved[j] = None
        grad_uv = segment_sum(tri.reshape(-1), gface.view(-1, 2), ctx.nv, reproducible=ctx.fixed)
        ctx.saved = ctx.pairs = None
        return grad_uv, None, None, None, None, None, None


def _keep_nearest(terms: list[dict], K: int, npad: int, radix: bool = True, split: int | None = None) -> torch.Tensor:
    """The slots of the K candidate faces nearest to the camera at each pixel.

    Ties in depth go to the earlier slot (tile order, then slot order within the tile).
    ``terms``: one dict per chunk of ``P = TILE * TILE`` slots per tile with "slots" (the
    chunk's T * P), "cidx", "cpix", "cdepth" (its candidate slots, their pixels and depths,
    in slot order), which are consumed.  ``split`` (a pixel index): the pixels below
    it and the others are two independent selections, run side by side
    (``lib.runtime.concurrently``); each pixel's candidates are the same either way.

    radix (``RenderSettings.radix_nearest``): depth buckets per pixel, then an integer sort
    of the one bucket per pixel that holds its K-th nearest (:func:`_farthest_radix`);
    False: the reference, two stable float sorts of every candidate.  Both keep the same
    slots.

    Args:
        npad: number of (padded) pixels.
    Returns:
        (k,) int64 global flat slots (tile * P + slot in the tile) of the kept candidates,
        ascending; empty when no face comes within the blur radius of any pixel.
    """
    starts, a = [], 0
    for tm in terms:
        starts.append(a)
        a += tm.pop("slots")
    if not terms:
        return torch.zeros(0, dtype=torch.int64)

    def select(side: int | None) -> torch.Tensor:
        """Kept slots (ascending) of the pixels below ``split`` (side 0), from it (1), or all (None)."""
        cols = []
        for tm, s0 in zip(terms, starts):
            cp, cd, ci = tm["cpix"], tm["cdepth"], tm["cidx"]
            if side is not None:
                take = flat_nonzero(cp < split if side == 0 else cp >= split)
                cp, cd, ci = (x.index_select(0, take) for x in (cp, cd, ci))
            cols.append((cp, cd, ci + s0))                                  # global flat slots
        pix, depth, slot = (torch.cat(c) for c in zip(*cols))
        drop = None
        if len(pix):
            drop = _farthest_radix(pix, depth, K, npad) if radix else _farthest_sorted(pix, depth, K)
        return slot if drop is None else slot.index_select(0, flat_nonzero(~drop))

    dev = terms[0]["cidx"].device
    if split is None:
        return select(None)
    low, high = concurrently([lambda: select(0), lambda: select(1)], dev)
    if not len(low) or not len(high):
        return torch.cat((low, high))
    # merged back into slot order
    mark = torch.zeros(a, dtype=torch.bool, device=dev)
    return flat_nonzero(mark.index_fill_(0, low, True).index_fill_(0, high, True))


def _farthest_sorted(pix: torch.Tensor, depth: torch.Tensor, K: int) -> torch.Tensor:
    """Reference selection: (n,) bool, the candidates beyond the K nearest of their pixel.

    Args:
        pix: (n,) int candidate pixels, in slot order.
        depth: (n,) float their depths.
        K: faces kept per pixel.
    """
    order = torch.argsort(depth, stable=True)
    order = order[torch.argsort(pix[order], stable=True)]
    ps = pix[order]
    pos = torch.arange(len(ps), device=ps.device)
    start = torch.ones_like(ps, dtype=torch.bool)
    start[1:] = ps[1:] != ps[:-1]
    first = torch.cummax(torch.where(start, pos, torch.zeros_like(pos)), 0).values
    drop = torch.zeros(len(pix), dtype=torch.bool, device=pix.device)
    drop[order[(pos - first) >= K]] = True
    return drop


def _ordered_bits(x: torch.Tensor) -> torch.Tensor:
    """Signed integers (int32 for float32, int64 for float64) ordered as the floats x are
    (-0 just below +0; positive NaNs above +inf), as a comparison sort orders them."""
    b = x.view(torch.int32 if x.dtype == torch.float32 else torch.int64)
    top = torch.iinfo(b.dtype).max
    return b ^ ((b >> (b.element_size() * 8 - 1)) & top)


_BUCKETS = 64    # depth buckets per over-full pixel in the first pass of the K-nearest selection


def _farthest_radix(pix: torch.Tensor, depth: torch.Tensor, K: int, npad: int) -> torch.Tensor | None:
    """The candidates beyond the K nearest of their pixel, as :func:`_farthest_sorted` finds
    them.

    Only pixels with more than K candidates are looked at.  First, per pixel, the depths'
    order-preserving integer keys are cut into ``_BUCKETS`` buckets above the pixel's
    nearest (a monotone map: a bucket's keys are all below the next bucket's); the K-th
    nearest falls in one bucket, the buckets below it are all kept, those above all
    dropped.  Only the candidates of that bucket are sorted, by (pixel, depth key) in one
    integer sort (which torch runs as a radix sort), stably so that equal depths stay in
    slot order.

    Args:
        pix: (n,) int candidate pixels (< npad), in slot order.
        depth: (n,) float32/float64 their depths.
        K: faces kept per pixel.
        npad: number of pixels.

    Returns:
        (n,) bool, or None when no pixel has more than K candidates.
    """
    dev = pix.device
    counts = torch.bincount(pix, minlength=npad)
    full = counts > K
    P = int(full.sum())
    if P == 0:
        return None
    idx = pix.long() if pix.dtype != torch.int32 else pix
    dk = _ordered_bits(depth)                                   # int32 (float32) or int64 (float64)
    top = torch.iinfo(dk.dtype).max
    lo = torch.full((npad,), top, dtype=dk.dtype, device=dev).scatter_reduce_(0, idx.long(), dk, "amin")
    hi = torch.full((npad,), -top, dtype=dk.dtype, device=dev).scatter_reduce_(0, idx.long(), dk, "amax")
    # shift each pixel's key range (hi - lo) down to about _BUCKETS values; frexp's exponent
    # is never below the bit length, and the clamp keeps the map monotone whatever it is
    span = torch.where(full, hi - lo, torch.zeros_like(lo))
    shift = (torch.frexp(span.double()).exponent - (_BUCKETS.bit_length() - 1)).clamp_(min=0).to(dk.dtype)
    # in place where it can: fresh n-sized temporaries cost page faults on every call
    bucket = dk.sub(lo.index_select(0, idx)).bitwise_right_shift_(shift.index_select(0, idx)) \
        .clamp_(max=_BUCKETS - 1).int()
    # row of each pixel's histogram: its rank among the over-full pixels, the others share row P
    row = torch.where(full, torch.cumsum(full, 0, dtype=torch.int32) - 1, P).int()
    pr = row.index_select(0, idx)
    cum = torch.bincount(pr.mul(_BUCKETS).add_(bucket), minlength=(P + 1) * _BUCKETS).view(P + 1, _BUCKETS)
    cum = cum.cumsum_(1)
    # the bucket of the K-th nearest: the first whose running count reaches K (rows ascend)
    tb = torch.searchsorted(cum, torch.full((P + 1, 1), K, dtype=cum.dtype, device=dev))[:, 0]
    tb[P] = _BUCKETS                                            # pixels with at most K keep all
    before = torch.where(tb > 0, cum.gather(1, (tb - 1).clamp(min=0)[:, None])[:, 0], 0)
    tbc = tb.int().index_select(0, pr)
    drop = bucket > tbc
    amb = flat_nonzero(bucket == tbc)                           # in slot order
    pa, da = pr.index_select(0, amb).long(), dk.index_select(0, amb).long()
    if depth.dtype == torch.float32:     # one key: pixel in the high half, depth bits below
        order = torch.argsort((pa << 32) | (da + 2 ** 31), stable=True)
    else:                                # by depth, then stably by pixel
        order = torch.argsort(da, stable=True)
        order = order.index_select(0, torch.argsort(pa.index_select(0, order), stable=True))
    na = torch.bincount(pa, minlength=P)
    start = torch.cumsum(na, 0) - na                            # first sorted position of each pixel
    pso = pa.index_select(0, order)
    rank = torch.arange(len(order), device=dev) - start.index_select(0, pso)
    far = flat_nonzero(rank >= K - before.index_select(0, pso))
    drop[amb.index_select(0, order.index_select(0, far))] = True
    return drop


def silhouette(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
               sigma: float = SVR_SIGMA, eps: float = SVR_EPS, faces_per_pixel: int | None = None,
               znear: float = 1e-3, reproducible: bool | None = None, radius: float | None = None,
               settings: RenderSettings = DEFAULT) -> torch.Tensor:
    """Soft silhouette in [0, 1], differentiable w.r.t. ``verts`` (see the module docstring).

    Args:
        verts: (V, 3) or (B, V, 3) float32/float64.
        faces: (F, 3) int64.
        camera: unbatched or a batch of B.
        image_size: H or (H, W); default None, the camera's (intrinsics are rescaled).
        sigma: softness in squared NDC units (0 = hard coverage, no gradient); default ``SVR_SIGMA``.
        eps: probability cut-off defining the blur radius; default ``SVR_EPS``.
        faces_per_pixel: None (default) = all faces within the blur radius, K = only the K
            nearest (pytorch3d semantics).
        znear: faces with a vertex at depth <= znear are skipped; default 1e-3.
        reproducible: sum in an order-independent way (fixed-point pixel sums, sorted
            gradient sums); None (default) = on CUDA, where plain atomics would change the
            last bits of the image and gradients from run to run.  On the CPU both ways are
            reproducible.
        radius: the blur radius in squared NDC units set apart from sigma, as pytorch3d's
            rasteriser allows (the original SVR refinement: sigma 1e-4, radius
            log(1/1e-4 - 1) * 1e-5): faces farther than it from an outside pixel are dropped
            and covering faces keep their sigmoid at any depth; None (default):
            sigma * log(1/eps - 1).
        settings: speed/memory knobs (:class:`RenderSettings`; they do not change the output).

    Returns:
        (H, W) or (B, H, W) image of verts' dtype.
    """
    with torch.profiler.record_function("render.silhouette.forward"):
        return _silhouette(verts, faces, camera, image_size, sigma, eps, faces_per_pixel, znear, reproducible, radius,
                           settings)


def _silhouette(verts, faces, camera, image_size, sigma, eps, faces_per_pixel, znear, reproducible, radius, settings):
    if verts.device.type == "cpu":
        keep_freed_memory()     # the flat per-candidate tensors (MBs each) are reused, not page-faulted in again
    sc = project_mesh(verts, faces, camera, image_size)
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
            uvt, zt = sc.corners()
            (fid, x0, y0), table = concurrently([lambda: face_tiles(uvt, zt, sc.H, sc.W, math.sqrt(r_px), znear),
                                                 lambda: face_table(uvt, zt)], uvt.device)
            if settings.cull_tiles:
                keep = _cull_tiles(table, fid, x0, y0, r_px)
                fid, x0, y0 = fid[keep], x0[keep], y0[keep]
            fbatch = torch.div(torch.arange(len(sc.tri), device=fid.device), len(faces),
                               rounding_mode="floor")
            st = TileSetup(table, fid, x0, y0, fbatch, sc.B, sc.H,
                           sc.W, sigma_px, r_px, faces_per_pixel is not None and sigma > 0,
                           soft_inside=radius is not None)
        need_grad = torch.is_grad_enabled() and sc.uv.requires_grad
        img = _SoftSilhouette.apply(sc.uv, st, sc.tri, faces_per_pixel, need_grad, reproducible, settings)
    return img if sc.batched else img[0]


@torch.no_grad()
def silhouette_pairs(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
                     sigma: float = SVR_SIGMA, eps: float = SVR_EPS, znear: float = 1e-3,
                     settings: RenderSettings = DEFAULT) -> dict:
    """Work counts of ``silhouette`` (diagnostics, benchmarks).

    Args: as :func:`silhouette` (verts (V, 3) or (B, V, 3), faces (F, 3), camera, ...).

    Returns:
        dict of ints: ``evaluated`` face-pixel slots (4 x 4 tiles of the blur-expanded face
        boxes), ``kept`` of them after dropping the tiles wholly beyond the blur radius
        (``RenderSettings.cull_tiles``), ``within_radius`` pairs with |s| <= blur radius
        (the soft terms) and ``deep`` pairs (pixel deeper inside than it).
    """
    sc = project_mesh(verts, faces, camera, image_size)
    scale = 2.0 / min(sc.H, sc.W)
    sigma_px = float(sigma) / scale ** 2 if sigma > 0 else 0.0
    r_px = blur_radius(sigma_px, eps) if sigma > 0 else 0.0
    uvt, zt = sc.corners()
    fid, x0, y0 = face_tiles(uvt, zt, sc.H, sc.W, math.sqrt(r_px), znear)
    fbatch = torch.div(torch.arange(len(sc.tri), device=fid.device), len(faces), rounding_mode="floor")
    st = TileSetup(face_table(uvt, zt), fid, x0, y0, fbatch, sc.B, sc.H, sc.W, max(sigma_px, 1e-30),
                   r_px, False)
    within = deep = 0
    step = settings.chunk_tiles
    for a in range(0, len(fid), step):
        tm = _chunk_terms(st, a, min(a + step, len(fid)), with_grad=False, settings=settings)
        lsig = tm["lsig"]
        deep += int((lsig <= -_BIG / 2).sum())
        within += int(((lsig < 0) & (lsig > -_BIG / 2)).sum())
    kept = len(_cull_tiles(st.table, fid, x0, y0, r_px)) * TILE * TILE
    return {"evaluated": len(fid) * TILE * TILE, "kept": kept, "within_radius": within, "deep": deep}

