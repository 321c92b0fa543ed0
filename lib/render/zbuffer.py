"""Hard z-buffer rasterisation at pixel centres: :func:`rasterize` (face, barycentrics,
depth per pixel as :class:`Fragments`) and :func:`face_index` (the face only).

Conventions and input shapes: :mod:`.screen`.  Each candidate face-pixel slot gets the
face's perspective-correct depth at the pixel centre if the centre is inside the face (both
windings, no back-face culling), inf elsewhere; the nearest face wins, ties go to the
higher face index.  The candidate slots are each face's pixel row spans or, with
``RenderSettings.row_spans`` False, its bounding box cut into tiles; both give the same
bits, since each slot's depth is computed by the same operations (:func:`_edge_depth`).

Profiler labels: "render.rasterize", "render.face_index".
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ..runtime import concurrently
from .camera import Camera
from .screen import TILE, Screen, TileSetup, face_table, face_tiles, project_mesh
from .settings import DEFAULT, RenderSettings

__all__ = ["Fragments", "rasterize", "face_index"]


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
        """(..., H, W) bool: pixels covered by a face."""
        return self.face_idx >= 0


def rasterize(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None,
              znear: float = 1e-3, settings: RenderSettings = DEFAULT) -> Fragments:
    """Hard z-buffer rasterisation at pixel centres (see ``Fragments``).

    A pixel centre on an edge shared by two faces belongs to both; the nearer wins, ties go
    to the higher face index.  Both windings are rasterised (no back-face culling).  Callers
    that need only the face at each pixel use ``face_index`` (no barycentrics).

    Args:
        verts: (V, 3) or (B, V, 3) float; bary and depth are differentiable w.r.t. them.
        faces: (F, 3) int64.
        camera: unbatched or a batch of B.
        image_size: H or (H, W); default None, the camera's.
        znear: faces with a vertex at depth <= znear are skipped; default 1e-3.
        settings: speed/memory knobs (:class:`RenderSettings`; they do not change the output).

    Returns:
        Fragments with (H, W[, 3]) or (B, H, W[, 3]) tensors.
    """
    with torch.profiler.record_function("render.rasterize"):
        return _rasterize(verts, faces, camera, image_size, znear, settings)


def _rasterize(verts, faces, camera, image_size, znear, settings) -> Fragments:
    sc = project_mesh(verts, faces, camera, image_size)
    B, H, W = sc.B, sc.H, sc.W
    F = faces.shape[0]
    dev, dt = sc.uv.device, sc.uv.dtype
    face_idx = _face_ids(sc, F, znear, settings)                       # global face instances
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
               znear: float = 1e-3, settings: RenderSettings = DEFAULT) -> torch.Tensor:
    """``rasterize(...).face_idx`` without barycentrics and depth.

    Args: as :func:`rasterize` (verts (V, 3) or (B, V, 3), faces (F, 3) int64, camera, ...).

    Returns:
        (H, W) or (B, H, W) int64: the index into ``faces`` of the visible face at each
        pixel centre, -1 for background.
    """
    with torch.profiler.record_function("render.face_index"):
        sc = project_mesh(verts.detach(), faces, camera, image_size)
        F = faces.shape[0]
        face_idx = _face_ids(sc, F, znear, settings)
        if sc.B > 1:                 # face instances of image b are b * F + face
            face_idx = torch.where(face_idx >= 0, face_idx % max(F, 1), face_idx)
        return face_idx if sc.batched else face_idx[0]


def _face_ids(sc: Screen, F: int, znear: float, settings: RenderSettings = DEFAULT) -> torch.Tensor:
    """Visible face instance (index into sc.tri) per pixel, (B, H, W) int64, -1 = background.

    float32 depths: one amin over int64 keys (depth bits << 32) | (2^31 - 1 - face), since
    the bits of positive floats order like the floats, so the smallest key is the nearest
    face and, among equal depths, the highest index.  Other dtypes: amin of the depth, then
    amax of the face index among the slots at that depth (the same rule in two passes).
    The candidate slots are the pixels of each face's row spans (:func:`_spans`), or, with
    ``settings.row_spans`` False, of its bounding box cut into ``settings.raster_tile`` tiles;
    both give the same bits, since each slot's depth is computed by the same operations.
    """
    B, H, W = sc.B, sc.H, sc.W
    dev, dt = sc.uv.device, sc.uv.dtype
    if F == 0:
        return torch.full((B, H, W), -1, dtype=torch.int64, device=dev)
    with torch.no_grad():
        uvt, zt = sc.corners()
        table = face_table(uvt, zt)
        fbatch = torch.div(torch.arange(len(sc.tri), device=dev), F, rounding_mode="floor")
        spans, tile = settings.row_spans, settings.raster_tile
        if spans:
            npad = B * H * W

            def crop(flat):
                return flat.view(B, H, W)
        else:
            npad = B * (H + TILE) * (W + TILE)

            def crop(flat):
                return flat.view(B, H + TILE, W + TILE)[:, :H, :W]

        def slots(lo: int, hi: int):
            """(faces (S,), [(a, b, depth)]) of the face instances lo..hi."""
            if spans:
                fid, chunks = _spans(uvt[lo:hi], zt[lo:hi], table[:, lo:hi], fbatch[lo:hi], H, W, znear,
                                     settings.span_slots)
                return fid + lo, chunks
            fid, x0, y0 = face_tiles(uvt[lo:hi], zt[lo:hi], H, W, 0.0, znear, tile)
            st = TileSetup(table[:, lo:hi], fid, x0, y0, fbatch[lo:hi], B, H, W, 0.0, 0.0, True)
            return fid + lo, [(a, min(a + 65536, len(fid)), lambda a, b: _chunk_depth(st, a, b, tile))
                              for a in range(0, len(fid), 65536)]

        G = len(sc.tri)
        if settings.packed_zbuffer and dt == torch.float32 and G < 2 ** 31:
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
            cut = [0, G // 2, G] if G >= settings.split_faces else [0, G]
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


def _spans(uvt: torch.Tensor, zt: torch.Tensor, table: torch.Tensor, fbatch: torch.Tensor, H: int, W: int,
           znear: float, span_slots: int = DEFAULT.span_slots):
    """The z-buffer's candidate slots as row spans: for each face and pixel row, the pixel
    centres between the face's left and right boundary on that row, widened by a margin.

    uvt (G, 3, 2) pixel coordinates, zt (G, 3) depths, table: ``face_table`` (19, G),
    fbatch (G,) image of each face instance; chunks of ``span_slots`` slots.  Returns the
    slot faces fid (S,) int64 and the chunks [(a, b, depth)] with depth(a, b) -> (pix
    (1, b - a) int32 flat pixel index into the unpadded (B, H, W) layout, z (1, b - a) depth,
    inf where the centre is outside).

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
    x, y = table[0:6:2], table[1:6:2]                                # (3, G): vertex, face (contiguous rows)
    z = zt.unbind(1)
    # finite corners: over the table's contiguous coordinate rows (reductions over the small
    # dimensions of uvt are slow on the CPU)
    ok = (table[15] != 0) & (torch.minimum(torch.minimum(z[0], z[1]), z[2]) > znear)
    for r in range(6):
        ok &= torch.isfinite(table[r])
    # the vertices by row, top to bottom: three compare-and-swaps row by row (a sort along
    # the dimension of 3 is slow on the CPU; any order of equal rows bounds the same spans)
    zero = torch.zeros_like(y[0])
    ys = [torch.where(ok, y[i], zero) for i in range(3)]
    xs = list(x.unbind(0))
    for i, j in ((0, 1), (1, 2), (0, 1)):
        swap = ys[j] < ys[i]
        ys[i], ys[j] = torch.where(swap, ys[j], ys[i]), torch.where(swap, ys[i], ys[j])
        xs[i], xs[j] = torch.where(swap, xs[j], xs[i]), torch.where(swap, xs[i], xs[j])
    big = torch.full_like(zero, float(max(H, W)))
    for c in (*xs, *ys):
        big = torch.maximum(big, c.abs())
    margin = 1.0 / 64 + big * 2.0 ** -16
    y_top, y_mid, y_bot = ys
    x_top, x_mid, x_bot = xs

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

    chunks = [(a, min(a + span_slots, S), depth) for a in range(0, S, span_slots)]
    return fid, chunks


def _chunk_depth(st: TileSetup, a: int, b: int, size: int = TILE):
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


def _bary_depth(sc: Screen, g: torch.Tensor, hit: torch.Tensor):
    """Differentiable perspective-correct barycentrics (N, 3) and depth (N,) of face
    instances g at the hit pixel centres."""
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

