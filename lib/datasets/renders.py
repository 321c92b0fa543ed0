"""DISN-layout RGBA renders of a mesh, for the datasets prepare_data.py writes.

``render_views`` writes ``NN.png`` (RGBA, straight alpha = pixel coverage) and
``rendering_metadata.txt`` (one bracketed DISN line per view) for random DISN cameras:
azimuth uniform in [0, 360), elevation in [10, 40] degrees, distance ratio uniform in a
range (x CAM_MAX_DIST = 1.75), looking at the origin.  The renders are made in the frame
of the vertices given, so rendering the normalised mesh makes renders, samples and meshes
share one frame, as the original's SVR data do (no normalisation file needed).
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from ..render.camera import Camera, disn_camera, write_disn_metadata
from ..io import save_png
from ..render import shade
from .images import METADATA_FILE, view_image_name

__all__ = ["DISN_AZIMUTH", "DISN_ELEVATION", "SHAPENET_DISTANCE_RATIO", "SHAPENET_RADIUS", "distance_ratio_for",
           "random_disn_cameras", "render_rgba", "render_views"]

DISN_AZIMUTH = (0.0, 360.0)        # degrees, uniform (DISN / 3D-R2N2 renders)
DISN_ELEVATION = (10.0, 40.0)      # degrees, uniform
# x CAM_MAX_DIST for an object of radius about 0.5 (ShapeNet units) to fill ~2/3 of the image
SHAPENET_DISTANCE_RATIO = (0.65, 0.8)
SHAPENET_RADIUS = 0.5


def distance_ratio_for(radius: float) -> tuple[float, float]:
    """The distance-ratio range at which an object of ``radius`` looks as big as a ShapeNet one
    at ``SHAPENET_DISTANCE_RATIO``.

    Args:
        radius: the object's radius (farthest vertex from the origin).
    Returns:
        (low, high) distance ratios.
    """
    k = float(radius) / SHAPENET_RADIUS
    return SHAPENET_DISTANCE_RATIO[0] * k, SHAPENET_DISTANCE_RATIO[1] * k


def random_disn_cameras(count: int, rng: np.random.Generator, image_size: int = 224,
                        distance_ratio: tuple[float, float] = SHAPENET_DISTANCE_RATIO):
    """DISN cameras at uniformly random azimuth / elevation / distance, looking at the origin.

    Args:
        count: how many.
        rng: numpy generator the angles and distances are drawn from.
        image_size: S of the cameras (default 224).
        distance_ratio: (low, high) range of the distance ratio (default ``SHAPENET_DISTANCE_RATIO``).
    Returns:
        a batched ``Camera`` of ``count`` views, float64.
    """
    az = rng.uniform(*DISN_AZIMUTH, size=count)
    el = rng.uniform(*DISN_ELEVATION, size=count)
    ratio = rng.uniform(*distance_ratio, size=count)
    return disn_camera(az.tolist(), el.tolist(), ratio.tolist(), image_size=image_size, dtype=torch.float64)


def render_rgba(verts: torch.Tensor, faces: torch.Tensor, camera, color=(0.8, 0.8, 0.8),
                supersample: int = 2) -> torch.Tensor:
    """Anti-aliased Lambertian RGBA renders, straight alpha.

    Rendered with ``lib.render.shade`` at ``supersample`` times the camera's size and
    box-filtered down, so alpha is the pixel's coverage (as Blender's) and rgb the mean
    colour of the covered part.

    Args:
        verts: (V, 3) float; faces: (F, 3) int64.
        camera: a ``lib.render.Camera`` of size S, batched (B views) or not (B = 1).
        color: the surface's RGB in [0, 1] (default light grey).
        supersample: the box filter's factor (default 2).
    Returns:
        (B, S, S, 4) float in [0, 1].
    """
    s = camera.image_size[0]
    big = shade(verts, faces, camera.resized(s * supersample), color=color)          # (B, sS, sS, 4)
    big = big if big.dim() == 4 else big[None]
    rgba = torch.nn.functional.avg_pool2d(big.permute(0, 3, 1, 2), supersample).permute(0, 2, 3, 1)
    alpha = rgba[..., 3:]
    rgb = torch.where(alpha > 0, rgba[..., :3] / alpha.clamp_min(1e-12), torch.zeros_like(rgba[..., :3]))
    return torch.cat([rgb.clamp(0, 1), alpha], -1)


def render_views(verts, faces, out_dir: str | os.PathLike, views: int, image_size: int = 224,
                 seed: int = 0, color=(0.8, 0.8, 0.8), chunk: int = 8, supersample: int = 2,
                 distance_ratio: tuple[float, float] | None = None) -> None:
    """Write ``out_dir/NN.png`` (RGBA) and ``out_dir/rendering_metadata.txt`` for ``views`` views.

    Views are random like DISN's (``random_disn_cameras`` with ``seed``), looking at the origin.

    Args:
        verts: (V, 3), faces: (F, 3) (arrays or tensors), in the frame the metadata describes.
        out_dir: the instance's render folder (files are written into it).
        views: how many views; image_size: S (default 224); seed: of the cameras (default 0).
        color: the surface's RGB (default light grey).
        chunk: views rendered at once (default 8); supersample: see ``render_rgba`` (default 2).
        distance_ratio: the range of the cameras' distance ratio (default: for the mesh's radius,
            ``distance_ratio_for``).
    """
    out_dir = Path(out_dir)
    v = torch.as_tensor(np.asarray(verts), dtype=torch.float32)
    f = torch.as_tensor(np.asarray(faces), dtype=torch.int64)
    if distance_ratio is None:
        distance_ratio = distance_ratio_for(float(v[f.unique()].norm(dim=1).max()))
    cams64 = random_disn_cameras(views, np.random.default_rng(seed), image_size, distance_ratio)
    cams = cams64.to(dtype=torch.float32)  # float32 for the rasteriser's speed; the metadata keeps float64
    for a in range(0, views, chunk):
        idx = range(a, min(a + chunk, views))
        sub = Camera(cams.R[a:idx.stop], cams.t[a:idx.stop], cams.focal[a:idx.stop], cams.principal[a:idx.stop],
                     cams.image_size, batched=True)
        rgba = render_rgba(v, f, sub, color=color, supersample=supersample)
        for k, img in zip(idx, rgba):
            save_png(out_dir / view_image_name(k), img.float().numpy())
    write_disn_metadata(out_dir / METADATA_FILE, cams64)
