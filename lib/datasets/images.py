"""The RGBA + camera + SDF dataset (single-view reconstruction): renders of a split in DISN's
layout with their cameras, paired with the split's SDF samples.

Instance k's renders: ``<renders>/NN.png`` (RGBA, square; views 00, 01, ...) and
``<renders>/rendering_metadata.txt`` (one DISN line per view), where ``<renders>`` comes from
a path template (``splits.instance_path``; default the layout prepare_data.py writes).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..render.camera import Camera, from_disn_metadata, read_disn_metadata
from ..errors import MeshSDFError
from ..io import read_png, require_file
from .samples import PinnedStaging, SdfSamples
from .sampling import read_normalization
from .shapes import BUILTIN_DATASETS
from .splits import Instance, instance_path, near_names

__all__ = ["DEFAULT_RENDERS_PATH", "DEFAULT_MESHES_PATH", "METADATA_FILE", "view_image_name", "rgba_to_tensor",
           "RenderSet", "to_normalized_frame", "RgbaSdfSamples"]

# Where an instance's files live, relative to DataSource unless absolute; placeholders
# {dataset}, {cls} and {instance} come from the split file.  The defaults are the layout
# of the original's data folder, written by prepare_data.py.
DEFAULT_RENDERS_PATH = "{dataset}/renders/{instance}"
DEFAULT_MESHES_PATH = "{dataset}/meshes/{instance}.obj"
METADATA_FILE = "rendering_metadata.txt"


def view_image_name(view: int) -> str:
    """DISN / 3D-R2N2 file name of view ``view``: 00.png, 01.png, ..."""
    return f"{int(view):02d}.png"


def rgba_to_tensor(image: np.ndarray, path: Path, image_size: int | None = None) -> torch.Tensor:
    """A decoded PNG (H, W, 4) uint8 as a (4, S, S) uint8 tensor, at ``image_size`` S if given
    (else at its own size).

    Resizing uses area averaging when shrinking (like a camera's pixels) and bilinear when
    enlarging.

    Args:
        image: (H, W, 4) uint8, as ``lib.io.read_png`` returns it.
        path: the file it came from, named in errors.
        image_size: S, or None to keep the image's own size (default).
    Returns:
        (4, S, S) uint8.  MeshSDFError unless the image is square RGBA.
    """
    if image.ndim != 3 or image.shape[2] != 4:
        got = f"{image.shape[2]} channels" if image.ndim == 3 else "a grey image"
        raise MeshSDFError(f"{path}: expected an RGBA image (4 channels, alpha = object mask), got {got}; "
                           "render it with transparent background")
    h, w = image.shape[:2]
    if h != w:
        raise MeshSDFError(f"{path}: expected a square image, got {w}x{h}")
    t = torch.from_numpy(np.ascontiguousarray(image)).permute(2, 0, 1)
    if image_size is None or h == image_size:
        return t.contiguous()
    x = t[None].float()
    mode = "area" if h > image_size else "bilinear"
    x = torch.nn.functional.interpolate(x, size=(image_size, image_size), mode=mode,
                                        **({} if mode == "area" else {"align_corners": False}))
    return x[0].round().clamp(0, 255).to(torch.uint8)


def _missing_renders_hint(d: Path, inst: Instance) -> str:
    root = d.parent
    if root.is_dir() and any(p.is_dir() for p in root.iterdir()):
        return (f"{near_names(root, d.name, '*')} {root} lacks this instance of the split; fix its name in the split "
                "file or RendersPath in specs.json")
    views = "--views 24" if inst.dataset == "toy_cars" else "--views N"
    if inst.dataset in BUILTIN_DATASETS:
        return (f"this dataset has no renders yet: create them with `python prepare_data.py --builtin {inst.dataset} "
                f"{views}`, or fix RendersPath / DataSource in specs.json")
    return ("render the instances (prepare_data.py --mesh ... --views N writes DISN renders) or fix RendersPath / "
            "DataSource in specs.json")


class RenderSet:
    """RGBA renders and cameras of the instances of a split (DISN layout), at one image size.

    For instance k: ``<renders>/NN.png`` (RGBA, square) and ``<renders>/rendering_metadata.txt``
    (one DISN line per view, see ``lib.render.camera``).  Views 0 .. num_views - 1 are used.
    ``image_size`` None (the original's way): the renders are used at their own size, which
    must be the same for all (that of the first instance's first view; another size raises
    MeshSDFError); a number resizes every render to it.  ``self.image_size`` is the size
    used.  Cameras are built at that size and, when ``normalization_path`` is given, moved
    from the frame the renders were made in into the frame of the SDF samples: that file
    (``sampling.read_normalization``: ``offset`` (3,), ``scale``) maps DeepSDF's
    ``normalised = (original + offset) * scale``.

    Everything is checked when the set is built (files present, metadata parsable with
    enough views, normalisation readable), so a bad dataset fails before training starts;
    images are decoded and checked when first used, or all at once with ``cache=True``
    (kept as uint8 in memory; "auto" caches when they take less than ``cache_limit`` bytes).
    Every problem raises MeshSDFError naming the file.

    Args:
        data_source: the data folder (DataSource in specs.json).
        instances: the split's instances, scene k = ``instances[k]``.
        image_size: S, or None for the renders' own size.
        num_views: views per instance used (NumberOfViews), >= 1.
        renders_path: path template of an instance's render folder (default ``DEFAULT_RENDERS_PATH``).
        normalization_path: path template of an instance's normalisation file, or None (default):
            the renders are already in the frame of the samples.
        cache: True, False or "auto" (default): keep decoded images in memory.
        cache_limit: bytes below which "auto" caches (default 2 ** 30).
    """

    def __init__(self, data_source: str | os.PathLike, instances: Sequence[Instance], image_size: int | None,
                 num_views: int, renders_path: str = DEFAULT_RENDERS_PATH, normalization_path: str | None = None,
                 cache: bool | str = "auto", cache_limit: int = 2 ** 30):
        if not instances:
            raise MeshSDFError("no instances to load; the split is empty")
        if num_views < 1:
            raise MeshSDFError(f"NumberOfViews must be >= 1, got {num_views}")
        self.instances = list(instances)
        self.resize = image_size is not None
        self.num_views = int(num_views)
        self.dirs = [instance_path(renders_path, data_source, i) for i in self.instances]
        for inst, d in zip(self.instances, self.dirs):
            if not d.is_dir():
                raise MeshSDFError(f"renders not found: {d}; {_missing_renders_hint(d, inst)}")
            require_file(d / METADATA_FILE, "rendering metadata", "every render folder needs one (one line "
                         "'azimuth elevation in-plane distance-ratio fov' per view)")
            for v in range(self.num_views):
                require_file(d / view_image_name(v), "render", f"the experiment uses NumberOfViews = "
                             f"{self.num_views} views (00 .. {self.num_views - 1:02d}) per instance")
        if self.resize:
            self.image_size = int(image_size)
        else:
            self.image_size = int(rgba_to_tensor(read_png(self.image_path(0, 0)), self.image_path(0, 0)).shape[-1])
        cams = []
        for inst, d in zip(self.instances, self.dirs):
            meta = d / METADATA_FILE
            nviews = len(read_disn_metadata(meta))
            if nviews < self.num_views:
                raise MeshSDFError(f"{meta} describes {nviews} views but NumberOfViews is {self.num_views}; "
                                   "lower NumberOfViews or render more views")
            cam = _first_views(from_disn_metadata(meta, image_size=self.image_size), self.num_views)
            if normalization_path is not None:
                cam = to_normalized_frame(cam, read_normalization(
                    instance_path(normalization_path, data_source, inst)))
            cams.append(cam)
        self.cameras = cams
        self._staging = PinnedStaging()
        self._cache: dict[tuple[int, int], torch.Tensor] = {}
        nbytes = len(self.instances) * self.num_views * 4 * self.image_size ** 2
        self.cache = (nbytes <= cache_limit) if cache == "auto" else bool(cache)
        if self.cache:
            for k in range(len(self.instances)):
                for v in range(self.num_views):
                    self._load(k, v)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.instances]

    def image_path(self, scene: int, view: int) -> Path:
        return self.dirs[scene] / view_image_name(view)

    def _load(self, scene: int, view: int) -> torch.Tensor:
        key = (int(scene), int(view))
        img = self._cache.get(key)
        if img is None:
            path = self.image_path(*key)
            img = rgba_to_tensor(read_png(path), path, self.image_size if self.resize else None)
            if img.shape[-1] != self.image_size:
                raise MeshSDFError(f"{path} is {img.shape[-1]} px but {self.image_path(0, 0)} is {self.image_size} "
                                   "px; renders are used at their own size, so set ImageSize in specs.json to resize "
                                   "them all to one")
            if self.cache:
                self._cache[key] = img
        return img

    def images(self, scenes: torch.Tensor, views: torch.Tensor, device=None) -> torch.Tensor:
        """The images of some views.

        Args:
            scenes, views: (B,) int64 each, the scene/view pairs.
            device: where the batch goes (default CPU); to CUDA it is copied as uint8 through pinned memory.
        Returns:
            RGBA images (B, 4, S, S) float32 in [0, 1] on ``device``.
        """
        imgs = [self._load(int(s), int(v)) for s, v in zip(scenes.tolist(), views.tolist())]
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda":  # as uint8 (4x fewer bytes than float) through pinned memory
            batch = self._staging.upload(lambda buf: torch.stack(imgs, out=buf), (len(imgs),) + tuple(imgs[0].shape),
                                         torch.uint8, device)
        else:
            batch = torch.stack(imgs)
        return batch.float().div_(255.0)

    def camera(self, scene: int, view: int):
        """The unbatched ``lib.render.Camera`` of one view, in the SDF frame, at ``image_size``."""
        if not 0 <= view < self.num_views:
            raise MeshSDFError(f"view {view} of {self.instances[scene].name} does not exist: views are "
                               f"0 .. {self.num_views - 1}")
        return self.cameras[scene][view]

    def random_views(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """Random views.

        Args:
            count: how many.
            generator: may live on any device (e.g. the SDF sampler's); default torch's global one.
        Returns:
            (count,) int64 CPU view indices drawn uniformly from 0 .. num_views - 1.
        """
        dev = generator.device if generator is not None else None
        return torch.randint(self.num_views, (count,), generator=generator, device=dev).cpu()


def _first_views(cam, n: int):
    """The first ``n`` cameras of a batched camera, still batched."""
    return Camera(cam.R[:n], cam.t[:n], cam.focal[:n], cam.principal[:n], cam.image_size, batched=True)


def to_normalized_frame(camera, normalization):
    """The camera that sees normalised points as ``camera`` sees the original ones.

    With p_cam = R original + t, the camera (R, scale (t - R offset)) gives
    p_cam' = scale p_cam: the same pixels, depth times scale.

    Args:
        camera: a ``lib.render.Camera`` (batched or not) of the original frame.
        normalization: a ``sampling.Normalization`` (DeepSDF's normalised = (original + offset) * scale).
    Returns:
        the Camera of the normalised frame, batched like ``camera``.
    """
    off = torch.as_tensor(normalization.offset).to(camera.R)
    scale = float(normalization.scale)
    t = scale * (camera.t - (camera.R @ off))
    return Camera(camera.R, t, camera.focal, camera.principal, camera.image_size, batched=camera.batched)


class RgbaSdfSamples:
    """SVR training data: the SDF samples of each instance plus its renders and cameras.

    ``sdf`` is an :class:`SdfSamples`, ``renders`` a :class:`RenderSet` over the same
    instances (scene k is instance k of the split in both).
    """

    def __init__(self, sdf: SdfSamples, renders: RenderSet):
        if sdf.names != renders.names:
            raise ValueError("SDF samples and renders must cover the same instances in the same order")
        self.sdf, self.renders = sdf, renders

    def __len__(self) -> int:
        return len(self.sdf)

    @property
    def names(self) -> list[str]:
        return self.sdf.names

    @property
    def device(self) -> torch.device:
        return self.sdf.device

    def batch(self, scenes: torch.Tensor, samples_per_scene: int, generator: torch.Generator | None = None,
              device=None, views: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """One training batch: an image of each scene and its SDF samples.

        Args:
            scenes: (B,) int64 scene indices.
            samples_per_scene: N.
            generator: on the SDF samples' device; makes the views and samples reproducible.
            device: where the batch goes (None: xyz and sdf on the SDF samples' device, images on the CPU).
            views: (B,) int64 views of the scenes, or None (default) for a random view of each.
        Returns:
            images (B, 4, S, S) float32 in [0, 1], xyz (B, N, 3) and sdf (B, N) on ``device``.
        """
        if views is None:
            views = self.renders.random_views(len(scenes), generator)
        xyz, sdf = self.sdf.sample(scenes, samples_per_scene, generator, device=device)
        images = self.renders.images(scenes, views, device)
        return images, xyz, sdf
