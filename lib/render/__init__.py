"""Rendering in pure torch (CPU and CUDA): the camera model, soft and hard silhouettes, the
z-buffer, normals and shading.

Modules, each owning one concern:

- :mod:`.camera`: the one camera model (look-at, the demo's and DISN's cameras, metadata files).
- :mod:`.settings`: :class:`RenderSettings`, the speed/memory knobs (they never change an output).
- :mod:`.screen`: projection to pixels and the per-face tables the rasterisers share.
- :mod:`.sums`: reproducible sums (fixed order on CUDA).
- :mod:`.silhouette`: the soft silhouette and its exact gradient; the SVR refinement's constants.
- :mod:`.zbuffer`: hard z-buffer (``rasterize``, ``face_index``, ``Fragments``).
- :mod:`.shading`: face / vertex normals, normal images, Lambertian shading.
- :mod:`.hard_silhouette`: neural_renderer's hard silhouette with Kato et al.'s gradient, and
  its lighting (the original demo's renderer).

The package re-exports the public names, so ``from lib.render import silhouette`` gives the
function; the module of the same name is ``sys.modules["lib.render.silhouette"]`` or
``from lib.render.silhouette import ...``.
"""
from __future__ import annotations

from .camera import (CAM_MAX_DIST, DEMO_AZIMUTH, DEMO_DISTANCE, DEMO_ELEVATION, DEMO_FOCAL_MM, DEMO_IMAGE_SIZE,
                     DEMO_SENSOR_MM, DISN_FOCAL_MM, DISN_IMAGE_SIZE, DISN_SENSOR_MM, Camera, DisnView, demo_camera,
                     disn_camera, disn_view, focal_pixels, format_disn_line, from_disn_metadata, look_at, look_at_eye,
                     parse_disn_line, read_disn_metadata, write_disn_metadata)
from .hard_silhouette import (NR_AMBIENT, NR_DIRECTIONAL, NR_EPS, NR_LIGHT_DIRECTION, nr_face_rgb, nr_shade,
                              nr_silhouette)
from .settings import DEFAULT, RenderSettings
from .shading import face_normals, normal_image, shade, vertex_normals
from .silhouette import SVR_EPS, SVR_FACES_PER_PIXEL, SVR_SIGMA, blur_radius, silhouette, silhouette_pairs
from .zbuffer import Fragments, face_index, rasterize

__all__ = [
    # camera
    "Camera", "DisnView", "look_at", "look_at_eye", "demo_camera", "focal_pixels", "disn_camera", "disn_view",
    "from_disn_metadata", "read_disn_metadata", "parse_disn_line", "format_disn_line", "write_disn_metadata",
    "CAM_MAX_DIST", "DISN_FOCAL_MM", "DISN_SENSOR_MM", "DISN_IMAGE_SIZE", "DEMO_FOCAL_MM", "DEMO_SENSOR_MM",
    "DEMO_IMAGE_SIZE", "DEMO_AZIMUTH", "DEMO_ELEVATION", "DEMO_DISTANCE",
    # settings
    "RenderSettings", "DEFAULT",
    # soft silhouette
    "silhouette", "silhouette_pairs", "blur_radius", "SVR_SIGMA", "SVR_EPS", "SVR_FACES_PER_PIXEL",
    # z-buffer
    "Fragments", "rasterize", "face_index",
    # shading
    "face_normals", "vertex_normals", "normal_image", "shade",
    # neural_renderer's hard silhouette
    "nr_silhouette", "nr_shade", "nr_face_rgb", "NR_EPS", "NR_AMBIENT", "NR_DIRECTIONAL", "NR_LIGHT_DIRECTION",
]
