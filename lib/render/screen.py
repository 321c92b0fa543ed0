"""Projection to the screen and the per-face tables shared by the soft silhouette and the z-buffer.

Conventions are those of :mod:`.camera`: pixel (row i, column j) has its centre at image
coordinates (j + 0.5, i + 0.5), row 0 is the top of the image, depth is camera-space z.
Inputs: verts (V, 3) or (B, V, 3) float (one mesh, or B meshes with the same faces),
faces (F, 3) int64, and a ``Camera`` (unbatched or a batch of B).  A batched camera or
batched verts gives batched images (B, H, W[, C]); otherwise (H, W[, C]).  Faces with a
vertex at depth <= ``znear`` are skipped (no clipping).

Owns: :class:`Screen` and :func:`project_mesh` (the B meshes' vertices in pixels, faces as
global face instances), :func:`face_tiles` (faces' pixel boxes cut into tiles),
:func:`face_table` (per-face constants) and :class:`TileSetup` (what the tile chunks of one
call share).
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass

import torch

from ..ops import indexing
from .camera import Camera

__all__ = ["TILE", "Screen", "project_mesh", "face_tiles", "face_table", "TileSetup"]

TILE = 4                       # face bounding boxes are cut into TILE x TILE pixel tiles


@dataclass
class Screen:
    """B meshes projected to pixels: what every rasteriser starts from (:func:`project_mesh`)."""
    uv: torch.Tensor        # (B*V, 2) pixel coordinates (keeps autograd history)
    z: torch.Tensor         # (B*V,) camera depth (keeps autograd history)
    tri: torch.Tensor       # (B*F, 3) int64 indices into uv
    B: int
    batched: bool
    H: int
    W: int

    def corners(self) -> tuple[torch.Tensor, torch.Tensor]:
        """The faces' projected corners: uvt (B*F, 3, 2) pixels and zt (B*F, 3) depths.

        Gathered with 1-D ``index_select`` (2-D advanced indexing is several times slower on
        the CPU); autograd history is kept.
        """
        flat = self.tri.reshape(-1)
        return (self.uv.index_select(0, flat).view(-1, 3, 2), self.z.index_select(0, flat).view(-1, 3))


def project_mesh(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, image_size=None) -> Screen:
    """Project verts through the camera(s), pairing B meshes with B cameras.

    Args:
        verts: (V, 3) or (B, V, 3) float.
        faces: (F, 3) integer (any tensor-like), shared by the meshes.
        camera: unbatched or a batch of B (or 1) cameras.
        image_size: H or (H, W); default None, the camera's (intrinsics are rescaled).

    Returns:
        Screen: uv (B*V, 2) pixels and z (B*V,) depths with autograd history, tri (B*F, 3)
        int64 indices into uv (face instance g = b * F + f), B, batched (whether the
        inputs were), H, W.  Raises ValueError on bad shapes or unequal batch sizes.
    """
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
    return Screen(uv.reshape(-1, 2), z.reshape(-1), tri, B, batched, H, W)


def face_tiles(uvt: torch.Tensor, zt: torch.Tensor, H: int, W: int, margin: float, znear: float,
           size: int = TILE):
    """Cut each face's pixel bounding box (expanded by ``margin`` px) into size x size tiles
    (size <= TILE, so that tiles overhanging the image stay inside the padded layout).

    uvt (G, 3, 2), zt (G, 3).  Returns tile face ids (T,) and tile origins x0, y0 (T,)
    (int64).  Boxes are clipped to the image; faces with a vertex at depth <= znear or a
    non-finite projection get no tiles.
    """
    dev = uvt.device
    # one row per axis and vertex (rows u0 v0 u1 v1 u2 v2): elementwise on (G,) rows, as
    # reductions over small inner dimensions are slow on the CPU
    v = uvt.detach().permute(1, 2, 0).reshape(6, -1)
    z = zt.unbind(1)
    ok = torch.minimum(torch.minimum(z[0], z[1]), z[2]) > znear
    boxes = []
    for axis, size_px in ((0, W), (1, H)):
        c = v[axis::2]
        lo = torch.minimum(torch.minimum(c[0], c[1]), c[2])
        hi = torch.maximum(torch.maximum(c[0], c[1]), c[2])
        ok &= torch.isfinite(lo) & torch.isfinite(hi)
        boxes.append((lo, hi, size_px))
    axes = []
    for lo, hi, size_px in boxes:
        lo = torch.where(ok, lo - margin, torch.zeros_like(lo))
        hi = torch.where(ok, hi + margin, torch.full_like(hi, -1.0))
        # pixel j is in the box iff lo <= j + 0.5 <= hi
        first = torch.ceil(lo - 0.5).clamp_(min=0).clamp_(max=size_px).long()
        last = torch.floor(hi - 0.5).clamp_(max=size_px - 1).clamp_(min=-1).long()
        n = (last - first + 1).clamp_(min=0)
        # tiles ceil(n / size) in float64: exact for these small counts, and int64 division is slow on the CPU
        axes.append((first, n.add_(size - 1).double().div_(size).floor_().long()))    # first pixel, tiles
    (fx, ntx), (fy, nty) = axes
    count = ntx * nty
    if len(count) == 0 or int(count.max()) <= 1:
        # every face within one tile (a fine mesh): the faces with one, at their boxes' corners
        fid = indexing.flat_nonzero(count)
        return fid, fx.index_select(0, fid), fy.index_select(0, fid)
    total = int(count.sum())
    fid = torch.repeat_interleave(torch.arange(len(count), device=dev), count, output_size=total)
    # per-face columns gathered one by one with 1-D index_select (2-D advanced indexing is
    # several times slower on the CPU)
    start, ntx, fx, fy = (col.index_select(0, fid) for col in (torch.cumsum(count, 0) - count, ntx, fx, fy))
    local = torch.arange(total, device=dev).sub_(start)
    # row of each tile: floor(local / ntx) in float64, exact here (local < 2^31, and the
    # quotient's fraction is at least 1 / ntx, far above the rounding) and several times
    # faster than int64 division on the CPU
    ty = local.double().div_(ntx.double()).floor_().long()
    tx = local.sub_(ty * ntx)
    x0 = tx.mul_(size).add_(fx)
    y0 = ty.mul_(size).add_(fy)
    return fid, x0, y0


def face_table(uvt: torch.Tensor, zt: torch.Tensor) -> torch.Tensor:
    """Per-face constants, one row per quantity, (19, G): v0..v2 (rows 0-5), edges
    e_i = v_{i+1} - v_i (6-11), 1/|e_i|^2 (12-14), orientation (15: sign of the doubled
    signed area, 0 for degenerate faces), 1/z of the vertices (16-18)."""
    # built row by row (elementwise on (G,) rows; small inner dimensions are slow on the CPU),
    # each row written in place into the table (no concatenation pass over all of it)
    tab = uvt.new_empty(19, uvt.shape[0])
    v, e = tab[0:6], tab[6:12]
    v.view(3, 2, -1).copy_(uvt.permute(1, 2, 0))            # rows u0 v0 u1 v1 u2 v2
    torch.sub(v[2:6], v[0:4], out=e[0:4])                   # rows of e_i = v_{i+1} - v_i
    torch.sub(v[0:2], v[4:6], out=e[4:6])
    sq = e[0::2] * e[0::2] + e[1::2] * e[1::2]             # (3, G)
    # 1.0 / x is x.reciprocal() * 1.0 in torch: the same bits
    torch.where(sq > 0, sq.clamp(min=1e-30).reciprocal_(), torch.zeros_like(sq), out=tab[12:15])
    area2 = e[0] * (-e[5]) - e[1] * (-e[4])
    big = torch.maximum(torch.maximum(sq[0], sq[1]), sq[2])
    torch.where(area2.abs() > 1e-12 * big, torch.sign(area2), torch.zeros_like(area2), out=tab[15])
    torch.reciprocal(zt.T.clamp(min=1e-30), out=tab[16:19])
    return tab


@dataclass
class TileSetup:
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


def __getattr__(name: str):
    # moved names of this module: the old path warns and gives the new object
    if name == "flat_nonzero":
        warnings.warn("lib.render.screen.flat_nonzero moved to lib.ops.indexing; import it from lib.ops instead",
                      DeprecationWarning, stacklevel=2)
        return indexing.flat_nonzero
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
