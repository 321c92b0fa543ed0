"""Normals and shading of the visible surface: face and vertex normals, per-pixel normal
images, Lambertian RGBA renders, on the z-buffer's :class:`.zbuffer.Fragments`.

Conventions and input shapes: :mod:`.screen`.
"""
from __future__ import annotations

import torch

from .camera import Camera
from .sums import segment_sum
from .zbuffer import Fragments, rasterize

__all__ = ["face_normals", "vertex_normals", "normal_image", "shade"]


def face_normals(verts: torch.Tensor, faces: torch.Tensor) -> torch.Tensor:
    """Unit face normals, right-hand rule on the winding (outwards for marching-cubes meshes).

    Args:
        verts: (..., V, 3) float.
        faces: (F, 3) int64.

    Returns:
        (..., F, 3), differentiable; 0 for degenerate faces.
    """
    tri = verts[..., faces, :]
    n = torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)
    return torch.nn.functional.normalize(n, dim=-1, eps=1e-20)


def vertex_normals(verts: torch.Tensor, faces: torch.Tensor, reproducible: bool | None = None) -> torch.Tensor:
    """Area-weighted unit vertex normals, differentiable.

    Args:
        verts: (..., V, 3) float.
        faces: (F, 3) int64.
        reproducible: as :func:`.silhouette.silhouette`; default None = on CUDA (sorted sums
            instead of float atomics).

    Returns:
        (..., V, 3); 0 for vertices of no face.
    """
    tri = verts[..., faces, :]
    n = torch.cross(tri[..., 1, :] - tri[..., 0, :], tri[..., 2, :] - tri[..., 0, :], dim=-1)   # (..., F, 3)
    V, F = verts.shape[-2], faces.shape[0]
    per_face = n.movedim(-2, 0).reshape(F, -1)                      # (F, (...) * 3)
    acc = segment_sum(faces.T.reshape(-1), per_face.repeat(3, 1), V, reproducible=reproducible)
    acc = acc.reshape((V,) + n.shape[:-2] + (3,)).movedim(0, -2)
    return torch.nn.functional.normalize(acc, dim=-1, eps=1e-20)


def normal_image(verts: torch.Tensor, faces: torch.Tensor, camera: Camera, fragments: Fragments | None = None,
                 smooth: bool = True, frame: str = "world", image_size=None) -> torch.Tensor:
    """Unit normals of the visible surface per pixel, differentiable w.r.t. verts.

    Args:
        verts: (V, 3) or (B, V, 3) float.
        faces: (F, 3) int64.
        camera: unbatched or a batch of B.
        fragments: :func:`.zbuffer.rasterize` of these inputs if the caller has it; default
            None = rasterised here.
        smooth: interpolate area-weighted vertex normals with the perspective-correct
            barycentrics (default True), else face normals.
        frame: "world" (default) or "camera" (x right, y down, z forward; a surface facing
            the camera has n_z < 0).
        image_size: H or (H, W); default None, the camera's.

    Returns:
        (H, W, 3) or (B, H, W, 3), 0 on background.
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
    """Lambertian RGBA render; two-sided (|n . l|), so open meshes shade the same from both sides.

    Args:
        verts: (V, 3) or (B, V, 3) float.
        faces: (F, 3) int64.
        camera: unbatched or a batch of B.
        light_dir: (3,) world direction towards the light; default None = a head light
            (towards each camera).
        color: (3,) RGB albedo in [0, 1]; default (0.8, 0.8, 0.8).
        ambient, diffuse: light terms; default 0.35, 0.65.
        smooth: vertex normals (default True) or face normals, as :func:`normal_image`.
        fragments: :func:`.zbuffer.rasterize` of these inputs if known; default None.
        image_size: H or (H, W); default None, the camera's.

    Returns:
        (H, W, 4) or (B, H, W, 4) float in [0, 1]; alpha = coverage, rgb 0 outside.
    """
    faces = torch.as_tensor(faces, device=verts.device).long()
    fr = fragments if fragments is not None else rasterize(verts, faces, camera, image_size)
    n = normal_image(verts, faces, camera, fr, smooth=smooth, frame="world")
    cam = camera.to(device=verts.device, dtype=verts.dtype)
    if light_dir is None:
        light = -cam.R[:, 2]                                        # (Bc, 3) towards the camera
        light = light.reshape((-1,) + (1,) * (n.dim() - 2) + (3,)) if n.dim() == 4 else light[0]
    else:
        light = torch.nn.functional.normalize(torch.as_tensor(light_dir, dtype=verts.dtype,
                                                              device=verts.device), dim=-1)
    lam = (n * light).sum(-1).abs()
    mask = fr.mask.to(verts.dtype)
    rgb = torch.as_tensor(color, dtype=verts.dtype, device=verts.device) * (ambient + diffuse * lam)[..., None]
    rgb = rgb.clamp(0.0, 1.0) * mask[..., None]
    return torch.cat([rgb, mask[..., None]], -1)


