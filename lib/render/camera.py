"""The one camera model: a pinhole camera with a world-to-camera rigid transform.

Conventions (all cameras of the project, whichever constructor made them)
- World: right-handed, y up (ShapeNet / DeepSDF frame), objects near the origin.
- Camera frame (OpenCV): x to the right of the image, y down the image, z forward along the
  optical axis.  ``p_cam = R @ p_world + t``; the camera centre is ``eye = -R^T t``.
- Pixels: continuous image coordinates (u, v) with u along the columns (to the right) and v
  along the rows (downwards); row 0 is the TOP row of the image.  Pixel (row i, column j)
  covers [j, j+1) x [i, i+1), so its centre is at (j + 0.5, i + 0.5).  ``u = fx*x/z + cx``,
  ``v = fy*y/z + cy``; the default principal point (W/2, H/2) is the image centre.
  A look-at camera with up = +y therefore shows world +y pointing up in the saved PNG, and
  it is a physical (non-mirrored) view: a point moved along the camera's right vector moves
  right in the image.  (neural_renderer's own look-at is left-handed, so its images are the
  left-right mirror of ours; the angles of its convention are kept, see ``look_at``.)
- Depth: camera-space z (distance along the optical axis, > 0 in front of the camera).
- neural_renderer in projection mode (the original demo's renderer) uses these very
  conventions: it maps p_cam = R p + t through K, flips v (``v = W - v``) into its NDC
  (y up) and flips the rasterised rows back at the end, so its output row i / column j
  is centred at our (u, v) = (j + 0.5, i + 0.5).  A camera built from the original's K,
  R, t (``demo_camera``) therefore gives the original's images pixel for pixel, with no
  flip.
- Angles are in degrees; distances in world units.

Shapes: a camera holds R (B, 3, 3), t (B, 3), focal (B, 2) = (fx, fy) and principal
(B, 2) = (cx, cy) in pixels, and one image size (H, W).  ``batched`` is False for a camera
built from scalars: its methods then drop the leading B axis.

DISN / 3D-R2N2 renders: ``rendering_metadata.txt`` has one line per view, ``azimuth
elevation in-plane-rotation distance-ratio field-of-view`` (degrees).  The Blender camera
sits at distance ``ratio * CAM_MAX_DIST`` looking at the origin with Blender's z up, focal
35 mm on a 32 mm sensor, 224 x 224 pixels; the ShapeNet object is turned from y-up to
Blender's z-up ((x, y, z) -> (x, -z, y)) before that.  Expressed in our (ShapeNet) world
frame this is a look-at camera from ``eye = d (cos el cos az, sin el, cos el sin az)`` with
up = +y, i.e. DISN azimuth = neural_renderer azimuth - 90 deg.  Like DISN we ignore the
in-plane rotation and the field-of-view column (the focal length is fixed).
"""
from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import torch

from ..errors import MeshSDFError
from ..io import atomic_write, require_file

__all__ = ["Camera", "DisnView", "look_at", "look_at_eye", "demo_camera", "focal_pixels", "disn_camera",
           "disn_view", "from_disn_metadata", "read_disn_metadata", "parse_disn_line", "format_disn_line",
           "write_disn_metadata", "CAM_MAX_DIST", "DISN_FOCAL_MM", "DISN_SENSOR_MM", "DISN_IMAGE_SIZE",
           "DEMO_FOCAL_MM", "DEMO_SENSOR_MM", "DEMO_IMAGE_SIZE", "DEMO_AZIMUTH", "DEMO_ELEVATION",
           "DEMO_DISTANCE"]

CAM_MAX_DIST = 1.75          # DISN / 3D-R2N2: distance = ratio * CAM_MAX_DIST
DISN_FOCAL_MM = 35.0
DISN_SENSOR_MM = 32.0
DISN_IMAGE_SIZE = 224
DEMO_FOCAL_MM = 35.0         # demo_optimizer camera: 35 mm lens, 32 mm sensor
DEMO_SENSOR_MM = 32.0
DEMO_IMAGE_SIZE = 512
DEMO_AZIMUTH, DEMO_ELEVATION, DEMO_DISTANCE = 45.0, 30.0, 2.5   # the original demo's view


def _hw(image_size) -> tuple[int, int]:
    if isinstance(image_size, int):
        return int(image_size), int(image_size)
    h, w = image_size
    return int(h), int(w)


class Camera:
    """A batch of B pinhole cameras sharing one image size.  See the module docstring.

    Args:
        R: (B, 3, 3) or (3, 3) world-to-camera rotation.
        t: (B, 3) or (3,) translation (``p_cam = R p + t``).
        focal: (B, 2) or (2,) focal lengths (fx, fy) in pixels.
        principal: (B, 2) or (2,) principal point (cx, cy) in pixels.
        image_size: H or (H, W) in pixels.
    """

    def __init__(self, R, t, focal, principal, image_size, batched: bool | None = None):
        R = torch.as_tensor(R)
        dtype = R.dtype if R.is_floating_point() else torch.get_default_dtype()
        dev = R.device
        as_t = lambda a: torch.as_tensor(a, dtype=dtype, device=dev)  # noqa: E731
        self.batched = R.dim() == 3 if batched is None else batched
        self.R = as_t(R).reshape(-1, 3, 3)
        b = self.R.shape[0]
        self.t = as_t(t).reshape(-1, 3).expand(b, 3).contiguous()
        self.focal = as_t(focal).reshape(-1, 2).expand(b, 2).contiguous()
        self.principal = as_t(principal).reshape(-1, 2).expand(b, 2).contiguous()
        self.image_size = _hw(image_size)

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return self.R.shape[0]

    def __repr__(self) -> str:
        return (f"Camera(B={len(self)}, batched={self.batched}, image_size={self.image_size}, "
                f"eye={self.eye.tolist()})")

    @property
    def device(self) -> torch.device:
        return self.R.device

    @property
    def dtype(self) -> torch.dtype:
        return self.R.dtype

    def to(self, device=None, dtype=None) -> "Camera":
        """A copy on ``device`` with floating tensors cast to ``dtype``."""
        mv = lambda a: a.to(device=device if device is not None else a.device,  # noqa: E731
                            dtype=dtype if dtype is not None else a.dtype)
        return Camera(mv(self.R), mv(self.t), mv(self.focal), mv(self.principal),
                      self.image_size, batched=self.batched)

    def __getitem__(self, i: int) -> "Camera":
        """Camera i of the batch, unbatched."""
        return Camera(self.R[i], self.t[i], self.focal[i], self.principal[i], self.image_size,
                      batched=False)

    @staticmethod
    def stack(cameras: Sequence["Camera"]) -> "Camera":
        """One batched camera from several (all with the same image size)."""
        sizes = {c.image_size for c in cameras}
        if len(sizes) != 1:
            raise ValueError(f"cameras to stack have different image sizes {sorted(sizes)}")
        return Camera(torch.cat([c.R for c in cameras]), torch.cat([c.t for c in cameras]),
                      torch.cat([c.focal for c in cameras]), torch.cat([c.principal for c in cameras]),
                      cameras[0].image_size, batched=True)

    def _out(self, x: torch.Tensor) -> torch.Tensor:
        return x if self.batched else x[0]

    @property
    def eye(self) -> torch.Tensor:
        """Camera centres in world coordinates, (B, 3) (or (3,))."""
        return self._out(-(self.R.transpose(1, 2) @ self.t[:, :, None])[..., 0])

    @property
    def K(self) -> torch.Tensor:
        """Intrinsic matrices (B, 3, 3) (or (3, 3)) mapping camera coords to homogeneous pixels."""
        K = torch.zeros(len(self), 3, 3, dtype=self.dtype, device=self.device)
        K[:, 0, 0], K[:, 1, 1] = self.focal[:, 0], self.focal[:, 1]
        K[:, 0, 2], K[:, 1, 2] = self.principal[:, 0], self.principal[:, 1]
        K[:, 2, 2] = 1.0
        return self._out(K)

    def resized(self, image_size) -> "Camera":
        """The same view at another image size (intrinsics scaled per axis)."""
        h, w = _hw(image_size)
        h0, w0 = self.image_size
        s = torch.tensor([w / w0, h / h0], dtype=self.dtype, device=self.device)
        return Camera(self.R, self.t, self.focal * s, self.principal * s, (h, w), batched=self.batched)

    def pixel_scale_ndc(self) -> float:
        """NDC units per pixel: NDC spans [-1, 1] over the shorter image side (as pytorch3d)."""
        return 2.0 / min(self.image_size)

    # -------------------------------------------------------------- projection
    def world_to_camera(self, points: torch.Tensor) -> torch.Tensor:
        """Camera-frame coordinates of world points.

        points: (..., 3).  Unbatched camera -> (..., 3).  Batched camera of B -> (B, ..., 3);
        when points have a leading axis of length B, point set b goes with camera b,
        otherwise every camera sees all the points.  Differentiable w.r.t. points and the
        camera tensors.
        """
        points = torch.as_tensor(points, dtype=self.dtype, device=self.device)
        if points.shape[-1] != 3:
            raise ValueError(f"points must have shape (..., 3), got {tuple(points.shape)}")
        if not self.batched:
            return points @ self.R[0].T + self.t[0]
        b = len(self)
        if points.dim() >= 2 and points.shape[0] == b:
            cam = torch.einsum("bij,b...j->b...i", self.R, points)
        else:
            cam = torch.einsum("bij,...j->b...i", self.R, points)
        return cam + self.t.reshape((b,) + (1,) * (cam.dim() - 2) + (3,))

    def project(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Project world points to pixels.

        points: as in ``world_to_camera``.  Returns ``(uv, depth)``: uv (..., 2) continuous
        pixel coordinates (u = column direction, v = row direction, pixel centres at
        integer + 0.5) and depth (...) = camera-space z.  Points behind the camera get
        negative depth and meaningless uv.
        """
        cam = self.world_to_camera(points)
        z = cam[..., 2]
        if self.batched:
            shape = (len(self),) + (1,) * (cam.dim() - 2) + (2,)
            f, c = self.focal.reshape(shape), self.principal.reshape(shape)
        else:
            f, c = self.focal[0], self.principal[0]
        uv = cam[..., :2] / z[..., None] * f + c
        return uv, z


# ------------------------------------------------------------------ constructors
def _as_batch(x, dtype, device) -> tuple[torch.Tensor, bool]:
    t = torch.as_tensor(x, dtype=dtype, device=device)
    return t.reshape(-1), t.dim() > 0


def focal_pixels(image_size, focal_mm: float, sensor_mm: float) -> float:
    """Focal length in pixels for a sensor fitted to the longer image side (Blender's AUTO fit)."""
    h, w = _hw(image_size)
    return focal_mm / sensor_mm * max(h, w)


def look_at_eye(eye, target=(0.0, 0.0, 0.0), up=(0.0, 1.0, 0.0), image_size=DEMO_IMAGE_SIZE,
                focal_mm: float = DEMO_FOCAL_MM, sensor_mm: float = DEMO_SENSOR_MM,
                focal_px: float | None = None, device=None, dtype=torch.float32) -> Camera:
    """Cameras at ``eye`` (3,) or (B, 3) looking at ``target`` with ``up`` pointing up in the image.

    The image x axis is forward x up (right-handed world, physical view); the focal length
    is ``focal_px`` pixels, or ``focal_mm / sensor_mm * max(H, W)``.  The principal point is
    the image centre.  Raises ValueError if eye == target or up is parallel to the view.
    """
    eye_t = torch.as_tensor(eye, dtype=dtype, device=device)
    batched = eye_t.dim() == 2
    eye_t = eye_t.reshape(-1, 3)
    tgt = torch.as_tensor(target, dtype=dtype, device=device).reshape(-1, 3).expand_as(eye_t)
    upv = torch.as_tensor(up, dtype=dtype, device=device).reshape(-1, 3).expand_as(eye_t)
    fwd = tgt - eye_t
    n = fwd.norm(dim=1, keepdim=True)
    if bool((n <= 1e-12).any()):
        raise ValueError("look_at: eye and target coincide")
    fwd = fwd / n
    right = torch.cross(fwd, upv, dim=1)
    rn = right.norm(dim=1, keepdim=True)
    if bool((rn <= 1e-9).any()):
        raise ValueError("look_at: the up vector is parallel to the viewing direction")
    right = right / rn
    down = torch.cross(fwd, right, dim=1)           # completes the right-handed (x, y, z) frame
    R = torch.stack([right, down, fwd], dim=1)      # rows = camera axes in world coordinates
    t = -(R @ eye_t[:, :, None])[..., 0]
    h, w = _hw(image_size)
    f = focal_px if focal_px is not None else focal_pixels((h, w), focal_mm, sensor_mm)
    focal = torch.tensor([f, f], dtype=dtype, device=device)
    principal = torch.tensor([w / 2.0, h / 2.0], dtype=dtype, device=device)
    return Camera(R, t, focal, principal, (h, w), batched=batched)


def look_at(azimuth_deg, elevation_deg, distance, image_size=DEMO_IMAGE_SIZE,
            focal_mm: float = DEMO_FOCAL_MM, sensor_mm: float = DEMO_SENSOR_MM,
            device=None, dtype=torch.float32) -> Camera:
    """Cameras on a sphere around the origin, angle convention of neural_renderer.

    eye = distance * (cos(el) sin(az), sin(el), -cos(el) cos(az)), looking at the origin,
    up = +y: azimuth 0 looks from -z, azimuth 90 from +x, elevation 90 from above.
    Scalars give an unbatched camera; 1-D sequences/tensors (broadcast together) a batch.
    Defaults: 35 mm / 32 mm, 512 x 512.  (The demo itself uses ``demo_camera``.)
    """
    az, b1 = _as_batch(azimuth_deg, dtype, device)
    el, b2 = _as_batch(elevation_deg, dtype, device)
    d, b3 = _as_batch(distance, dtype, device)
    az, el, d = torch.broadcast_tensors(torch.deg2rad(az), torch.deg2rad(el), d)
    eye = torch.stack([d * torch.cos(el) * torch.sin(az), d * torch.sin(el),
                       -d * torch.cos(el) * torch.cos(az)], dim=1)
    horiz = torch.stack([torch.sin(az), torch.zeros_like(az), -torch.cos(az)], dim=1)
    up = _image_up(horiz, el)
    cam = look_at_eye(eye, up=up, image_size=image_size, focal_mm=focal_mm, sensor_mm=sensor_mm,
                      device=device, dtype=dtype)
    cam.batched = b1 or b2 or b3
    return cam


def demo_camera(azimuth_deg: float = DEMO_AZIMUTH, elevation_deg: float = DEMO_ELEVATION,
                distance: float = DEMO_DISTANCE, image_size=DEMO_IMAGE_SIZE, device=None,
                dtype=torch.float32) -> Camera:
    """The original demo's projection camera (not a look-at construction).

    Intrinsics: f = 35 * W / 32 pixels (35 mm lens on a 32 mm sensor), principal point
    (W/2, H/2).  Extrinsics: R = R_roll(180 deg) @ R_el @ R_az, t = (0, 0, distance), with
    R_az = [[cos a, 0, sin a], [0, 1, 0], [-sin a, 0, cos a]]^T,
    R_el = [[1, 0, 0], [0, cos e, -sin e], [0, sin e, cos e]]^T and R_roll(180 deg) the
    transposed z-rotation by 180 deg.  For the defaults (45, 30, 2.5) the camera centre
    is (-1.531, 1.25, -1.531): the view of ``look_at(-azimuth, elevation, distance)``,
    world +y up in the image, not mirrored.  Returns an unbatched Camera.
    """
    a, e = math.radians(float(azimuth_deg)), math.radians(float(elevation_deg))
    ca, sa, ce, se = math.cos(a), math.sin(a), math.cos(e), math.sin(e)
    r_az = torch.tensor([[ca, 0.0, sa], [0.0, 1.0, 0.0], [-sa, 0.0, ca]], dtype=torch.float64).T
    r_el = torch.tensor([[1.0, 0.0, 0.0], [0.0, ce, -se], [0.0, se, ce]], dtype=torch.float64).T
    r_roll = torch.tensor([[-1.0, 0.0, 0.0], [0.0, -1.0, 0.0], [0.0, 0.0, 1.0]], dtype=torch.float64).T
    R = (r_roll @ r_el @ r_az).to(dtype=dtype, device=device)
    t = torch.tensor([0.0, 0.0, float(distance)], dtype=dtype, device=device)
    h, w = _hw(image_size)
    f = DEMO_FOCAL_MM * w / DEMO_SENSOR_MM
    return Camera(R, t, torch.tensor([f, f], dtype=dtype, device=device),
                  torch.tensor([w / 2.0, h / 2.0], dtype=dtype, device=device), (h, w), batched=False)


def _image_up(horiz: torch.Tensor, el_rad: torch.Tensor) -> torch.Tensor:
    """+y projected on the image plane of a camera at elevation el above the unit horizontal
    direction ``horiz`` (B, 3), looking at the origin.  Equivalent to up = +y, and still
    defined straight above or below the object, where it is the limit el -> +-90."""
    y = torch.zeros_like(horiz)
    y[:, 1] = 1.0
    return torch.cos(el_rad)[:, None] * y - torch.sin(el_rad)[:, None] * horiz


# ------------------------------------------------------------------------- DISN
@dataclass(frozen=True)
class DisnView:
    """One line of a DISN / 3D-R2N2 ``rendering_metadata.txt`` (angles in degrees)."""
    azimuth: float
    elevation: float
    inplane: float
    distance_ratio: float
    fov: float

    @property
    def distance(self) -> float:
        return self.distance_ratio * CAM_MAX_DIST


_SEP = re.compile(r"[\s,\[\]]+")


def parse_disn_line(line: str, source: str = "<string>", lineno: int = 1) -> DisnView:
    """Parse DISN's ``[az, el, inplane, ratio, fov]`` or this project's older ``az el inplane
    ratio fov`` (spaces or commas, optional brackets, extra columns ignored).  Raises
    MeshSDFError naming ``source`` and ``lineno`` when malformed."""
    fields = [f for f in _SEP.split(line.strip()) if f]
    where = f"{source}, line {lineno}"
    if len(fields) < 5:
        raise MeshSDFError(f"{where}: expected 5 numbers 'azimuth elevation in-plane distance-ratio fov', "
                           f"got {line.strip()!r}")
    try:
        vals = [float(f) for f in fields[:5]]
    except ValueError:
        raise MeshSDFError(f"{where}: not a number in {line.strip()!r}; expected "
                           f"'azimuth elevation in-plane distance-ratio fov'") from None
    if not all(math.isfinite(v) for v in vals):
        raise MeshSDFError(f"{where}: non-finite value in {line.strip()!r}")
    if vals[3] <= 0:
        raise MeshSDFError(f"{where}: distance ratio must be > 0, got {vals[3]}")
    return DisnView(*vals)


def read_disn_metadata(path: str | os.PathLike) -> list[DisnView]:
    """All views of a ``rendering_metadata.txt`` (blank lines skipped, line numbers kept)."""
    path = require_file(path, "rendering metadata")
    views = []
    for i, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            views.append(parse_disn_line(line, str(path), i))
    if not views:
        raise MeshSDFError(f"{path}: no views; expected one line per rendered image")
    return views


def disn_camera(azimuth_deg, elevation_deg, distance_ratio, image_size=DISN_IMAGE_SIZE,
                device=None, dtype=torch.float32) -> Camera:
    """The Blender camera of DISN's renders, in our (ShapeNet, y-up) world frame.

    eye = ratio * 1.75 * (cos el cos az, sin el, cos el sin az), looking at the origin with
    up = +y, focal 35 mm / sensor 32 mm (245 px at 224 px).  Scalars -> unbatched camera.
    """
    az, b1 = _as_batch(azimuth_deg, dtype, device)
    el, b2 = _as_batch(elevation_deg, dtype, device)
    r, b3 = _as_batch(distance_ratio, dtype, device)
    az, el, r = torch.broadcast_tensors(torch.deg2rad(az), torch.deg2rad(el), r)
    d = r * CAM_MAX_DIST
    eye = torch.stack([d * torch.cos(el) * torch.cos(az), d * torch.sin(el),
                       d * torch.cos(el) * torch.sin(az)], dim=1)
    horiz = torch.stack([torch.cos(az), torch.zeros_like(az), torch.sin(az)], dim=1)
    cam = look_at_eye(eye, up=_image_up(horiz, el), image_size=image_size, focal_mm=DISN_FOCAL_MM,
                      sensor_mm=DISN_SENSOR_MM, device=device, dtype=dtype)
    cam.batched = b1 or b2 or b3
    return cam


def from_disn_metadata(source, index: int | None = None, image_size=DISN_IMAGE_SIZE,
                       device=None, dtype=torch.float32) -> Camera:
    """Camera(s) from DISN metadata.

    source: a path to ``rendering_metadata.txt`` (a ``Path``, or a string naming an existing
    file) or one metadata line.  index: the view (0-based line among non-blank lines) of a
    file; None gives a batched camera of all views.  Raises MeshSDFError for a bad index or
    a malformed line (naming the file and line).
    """
    if isinstance(source, Path) or (isinstance(source, str) and "\n" not in source
                                    and Path(source).is_file()):
        views = read_disn_metadata(source)
        if index is not None:
            if not -len(views) <= index < len(views):
                raise MeshSDFError(f"{source}: view {index} requested but the file has {len(views)} views")
            views = [views[index]]
            batched = False
        else:
            batched = True
    else:
        views = [parse_disn_line(str(source))]
        batched = False
    cam = disn_camera([v.azimuth for v in views], [v.elevation for v in views],
                      [v.distance_ratio for v in views], image_size=image_size, device=device, dtype=dtype)
    cam.batched = batched
    return cam


def disn_view(camera: Camera, tol: float = 1e-4) -> DisnView | list[DisnView]:
    """The metadata of a camera that DISN's Blender setup can express (inverse of ``disn_camera``).

    Checks that the camera looks at the origin with no roll, square pixels, a 35/32 focal
    and a centred principal point; raises ValueError naming the mismatch otherwise.
    Azimuth comes back in [0, 360).  fov = the camera's horizontal field of view (degrees),
    written for information only (DISN ignores it).
    """
    h, w = camera.image_size
    out = []
    for i in range(len(camera)):
        c = camera[i].to(dtype=torch.float64)
        eye = c.eye
        d = float(eye.norm())
        fwd, right = c.R[0, 2], c.R[0, 0]
        if float(torch.dot(fwd, -eye / d)) < 1 - tol:
            raise ValueError("camera does not look at the origin; DISN metadata cannot describe it")
        if abs(float(right[1])) > tol:
            raise ValueError("camera has an in-plane rotation (roll); DISN metadata cannot describe it")
        f_expect = focal_pixels((h, w), DISN_FOCAL_MM, DISN_SENSOR_MM)
        fx, fy = (float(v) for v in c.focal[0])
        cx, cy = (float(v) for v in c.principal[0])
        if abs(fx - f_expect) > tol * f_expect or abs(fy - f_expect) > tol * f_expect:
            raise ValueError(f"camera focal ({fx:g}, {fy:g}) px is not DISN's 35/32 mm ({f_expect:g} px)")
        if abs(cx - w / 2) > tol * w or abs(cy - h / 2) > tol * h:
            raise ValueError("camera principal point is not the image centre, unlike DISN")
        el = math.degrees(math.asin(max(-1.0, min(1.0, float(eye[1]) / d))))
        az = math.degrees(math.atan2(float(eye[2]), float(eye[0]))) % 360.0
        fov = math.degrees(2 * math.atan(w / 2 / fx))
        out.append(DisnView(az, el, 0.0, d / CAM_MAX_DIST, fov))
    return out if camera.batched else out[0]


def format_disn_line(view: DisnView) -> str:
    """One metadata line in DISN's form ``[az, el, inplane, ratio, fov]`` (no newline), with
    enough digits to round-trip.

    The form matters beyond looks: the original MeshSDF reads a line by dropping its first
    character and its last two (the bracket, and the bracket plus newline) and parsing the
    rest as comma-separated floats, so every line written must be exactly this followed by
    a newline (``write_disn_metadata`` ends the last line too).
    """
    return "[" + ", ".join(f"{v:.10g}" for v in (view.azimuth, view.elevation, view.inplane,
                                                 view.distance_ratio, view.fov)) + "]"


def write_disn_metadata(path: str | os.PathLike, camera: Camera) -> None:
    """Write ``rendering_metadata.txt`` (one line per camera of the batch), atomically."""
    views = disn_view(camera)
    views = views if isinstance(views, list) else [views]
    with atomic_write(path) as tmp:
        Path(tmp).write_text("".join(format_disn_line(v) + "\n" for v in views))
