"""SDF training samples: split files and the DeepSDF ``.npz`` sample format.

Split file (JSON): ``{"<dataset>": {"<class>": ["<instance>", ...]}}``; instance k of the
split (in file order) is scene k and owns row k of the latent-code embedding.  Its samples
live in ``<DataSource>/<dataset>/<class>/<instance>.npz`` with arrays ``pos`` and ``neg``,
each (N, 4) rows ``x y z sdf`` (sdf > 0 outside).  Rows with a NaN or infinite value are
dropped on load.  A training batch takes half of each scene's samples from ``pos`` and half
from ``neg``, uniformly at random with replacement.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from lib.errors import MeshSDFError
from lib.sampling import read_normalization

# Datasets that prepare_data.py can build by itself: named in the missing-file message.
BUILTIN_DATASETS = ("bob_and_spot", "toy_cars", "toy_chairs")


@dataclass(frozen=True)
class Instance:
    dataset: str
    cls: str
    name: str

    def samples_path(self, data_source: str | os.PathLike) -> Path:
        return Path(data_source) / self.dataset / self.cls / f"{self.name}.npz"


_SPLIT_SHAPE = 'it must map dataset -> class -> list of instance names, e.g. {"bob_and_spot": {"samples": ["bob", "spot"]}}'


def read_split(path: str | os.PathLike) -> list[Instance]:
    """The instances of a split file, in file order; MeshSDFError if missing, malformed or empty."""
    path = Path(path)
    if not path.is_file():
        raise MeshSDFError(f"split file not found: {path}; fix TrainSplit/TestSplit in specs.json")
    try:
        split = json.loads(path.read_text(encoding="utf-8-sig"))
    except json.JSONDecodeError as err:
        raise MeshSDFError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    if not isinstance(split, dict):
        raise MeshSDFError(f"{path}: {_SPLIT_SHAPE}")
    out = []
    for dataset, classes in split.items():
        if not isinstance(classes, dict):
            raise MeshSDFError(f"{path}: entry {dataset!r}: {_SPLIT_SHAPE}")
        for cls, names in classes.items():
            if not isinstance(names, list) or not all(isinstance(n, str) and n for n in names):
                raise MeshSDFError(f"{path}: entry {dataset!r}/{cls!r}: {_SPLIT_SHAPE}")
            out.extend(Instance(dataset, cls, n) for n in names)
    if not out:
        raise MeshSDFError(f"{path}: the split lists no instances; add at least one")
    return out


def _others(folder: Path, name: str, pattern: str) -> str:
    """", did you mean 'x'?" / ", e.g. a, b" for the entries of ``folder`` beside the missing ``name``."""
    import difflib

    names = sorted(p.stem if pattern != "*" else p.name for p in folder.glob(pattern))
    close = difflib.get_close_matches(name, names, 1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"it holds {len(names)} others ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"


def missing_samples_message(path: Path, dataset: str) -> str:
    """Why ``DataSource/<dataset>/<class>/<instance>.npz`` is missing, and the fix: a misspelt
    instance in the split, a DataSource that points elsewhere, or data not created yet."""
    path = Path(path)
    cls_dir, ds_dir = path.parent, path.parent.parent
    source = ds_dir.parent
    if cls_dir.is_dir() and any(cls_dir.glob("*.npz")):
        how = (f"{_others(cls_dir, path.stem, '*.npz')} {cls_dir} lacks this instance of the split; fix its name "
               "in the split file (TrainSplit / TestSplit in specs.json)")
    elif dataset in BUILTIN_DATASETS and not ds_dir.is_dir():
        out = "" if source.resolve() == (Path.cwd() / "data").resolve() else f" --out {source}"
        how = (f"create it with `python prepare_data.py --builtin {dataset}{out}` (or fix DataSource in specs.json "
               "if the data is elsewhere)")
    elif not source.is_dir():
        how = f"DataSource {source} does not exist; fix DataSource in specs.json"
    elif ds_dir.is_dir() and not cls_dir.is_dir():
        how = f"{ds_dir} has no class folder {cls_dir.name!r}; fix the split file or DataSource"
    elif not ds_dir.is_dir():
        how = (f"{source} has no dataset folder {dataset!r}; fix DataSource in specs.json (the folder holding "
               f"{dataset}/) or create the samples with prepare_data.py")
    else:
        how = "create SDF samples with prepare_data.py (see its --help) or fix DataSource in specs.json"
    return f"SDF samples not found: {path}; {how}"


def _unreadable_npz(path: Path) -> str:
    try:
        head = path.read_bytes()[:6]
    except OSError:
        head = b""
    if head.startswith(b"\x93NUMPY"):
        what = "a single .npy array renamed .npz, not an .npz archive of 'pos' and 'neg' arrays"
    elif not head.startswith(b"PK"):
        what = "not an .npz archive (it does not start like one)"
    else:
        what = "a damaged .npz archive (truncated or corrupt)"
    return f"cannot read SDF samples {path}: the file is {what}; regenerate it with prepare_data.py"


def read_sdf_samples(path: str | os.PathLike, dataset: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``pos`` and ``neg`` of a DeepSDF npz as (P, 4), (Q, 4) float32 CPU tensors without NaN rows."""
    path = Path(path)
    if not path.is_file():
        raise MeshSDFError(missing_samples_message(path, dataset))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("pos", "neg") if k in npz.files}
    except Exception:  # zipfile / numpy raise several types for corrupt files
        raise MeshSDFError(_unreadable_npz(path)) from None
    out = []
    for key in ("pos", "neg"):
        if key not in arrays:
            raise MeshSDFError(f"{path} has no '{key}' array; SDF sample files need 'pos' and 'neg' (N, 4) arrays")
        a = arrays[key]
        if a.ndim != 2 or a.shape[1] != 4 or not np.issubdtype(a.dtype, np.number):
            raise MeshSDFError(f"{path}: '{key}' has shape {a.shape} ({a.dtype}); expected (N, 4) numeric rows x y z sdf")
        t = torch.from_numpy(np.ascontiguousarray(a, dtype=np.float32))
        t = t[torch.isfinite(t).all(dim=1)]
        if t.shape[0] == 0:
            raise MeshSDFError(f"{path}: '{key}' has no finite rows; regenerate the samples")
        out.append(t)
    return out[0], out[1]


class SdfSamples:
    """All scenes of a split held in memory, sampled in batches.

    ``instances[k]`` is scene k (latent code k).  Rows of every scene are stored in one
    (P + Q, 4) table ``rows``: all pos rows, then all neg rows; scene k's pos rows are
    ``rows[pos_start[k]:pos_start[k] + pos_count[k]]`` and likewise for neg, so a batch is
    one vectorised gather.
    """

    def __init__(self, data_source: str | os.PathLike, instances: Sequence[Instance], device=None):
        if not instances:
            raise MeshSDFError("no instances to load; the split is empty")
        self.instances = list(instances)
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.paths = [inst.samples_path(data_source) for inst in self.instances]
        missing = [(p, i) for p, i in zip(self.paths, self.instances) if not p.is_file()]
        if missing:
            p, inst = missing[0]
            more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
            raise MeshSDFError(missing_samples_message(p, inst.dataset) + more)
        pos, neg = zip(*(read_sdf_samples(p, i.dataset) for p, i in zip(self.paths, self.instances)))
        # one (P + Q, 4) table, pos rows first: a batch is then one gather (into pinned
        # memory when it goes to a GPU, see ``sample``); ``pos`` and ``neg`` are views of it
        self.rows = torch.cat(pos + neg).to(self.device)
        self.pos_start, self.pos_count = self._index(pos, 0)
        self.neg_start, self.neg_count = self._index(neg, sum(p.shape[0] for p in pos))
        npos = int(self.pos_count.sum())
        self.pos, self.neg = self.rows[:npos], self.rows[npos:]
        self._staging = PinnedStaging()

    def _index(self, parts, offset: int) -> tuple[torch.Tensor, torch.Tensor]:
        counts = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts + offset
        return starts.to(self.device), counts.to(self.device)

    @classmethod
    def from_split(cls, data_source: str | os.PathLike, split_file: str | os.PathLike, device=None) -> "SdfSamples":
        return cls(data_source, read_split(split_file), device=device)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.instances]

    def sample(self, scenes: torch.Tensor, samples_per_scene: int, generator: torch.Generator | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random samples of ``scenes`` (B,) int64: xyz (B, S, 3) and sdf (B, S).

        The first S // 2 samples of each scene come from ``pos``, the other S - S // 2 from
        ``neg``, uniformly with replacement.  ``generator`` (on ``self.device``) makes it
        reproducible.  The result is on ``device`` (default ``self.device``): from CPU
        samples to a GPU the rows are gathered into pinned memory and copied asynchronously.
        """
        scenes = scenes.to(self.device, torch.int64)
        b, n = scenes.shape[0], int(samples_per_scene)
        half = n // 2
        # float64 so that floor(u * count) < count for any realistic count
        u = torch.rand(b, n, generator=generator, device=self.device, dtype=torch.float64)
        cp, cn = self.pos_count[scenes, None], self.neg_count[scenes, None]
        ip = torch.minimum((u[:, :half] * cp).long(), cp - 1) + self.pos_start[scenes, None]
        ineg = torch.minimum((u[:, half:] * cn).long(), cn - 1) + self.neg_start[scenes, None]
        idx = torch.cat((ip, ineg), dim=1)
        device = self.device if device is None else torch.device(device)
        if device.type == "cuda" and self.rows.device.type == "cpu":
            rows = self._staging.upload(lambda buf: torch.index_select(self.rows, 0, idx.view(-1), out=buf),
                                        (b * n, 4), self.rows.dtype, device).view(b, n, 4)
        else:
            rows = self.rows.index_select(0, idx.view(-1)).view(b, n, 4).to(device)
        return rows[..., :3], rows[..., 3]


class PinnedStaging:
    """CPU -> CUDA copies through reused pinned host buffers, so that they are asynchronous.

    ``.to(cuda, non_blocking=True)`` from ordinary (pageable) memory is a synchronous
    staged copy; from pinned memory it overlaps with the GPU's work.  Two buffers are used
    in turn; before one is refilled, the copy that last read it is waited for (CUDA event),
    so a refill never races an unfinished copy.
    """

    def __init__(self, slots: int = 2):
        self._bufs: list[torch.Tensor | None] = [None] * slots
        self._events: list = [None] * slots
        self._turn = 0

    def upload(self, fill, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """``fill(buf)`` writes the data into a pinned ``shape`` buffer; returns its copy on ``device``."""
        slot = self._turn
        self._turn = (slot + 1) % len(self._bufs)
        if self._events[slot] is not None:
            self._events[slot].synchronize()
        numel = 1
        for d in shape:
            numel *= int(d)
        buf = self._bufs[slot]
        if buf is None or buf.numel() < numel or buf.dtype != dtype:
            buf = self._bufs[slot] = torch.empty(numel, dtype=dtype, pin_memory=True)
        host = buf[:numel].view(shape)
        fill(host)
        out = host.to(device, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(device))
        self._events[slot] = event
        return out


def scene_batches(num_scenes: int, scenes_per_batch: int, generator: torch.Generator | None = None,
                  drop_last: bool = False) -> list[torch.Tensor]:
    """One epoch: a random permutation of scene indices split into batches (the last may be
    short; with ``drop_last`` a short last batch is left out, as the original's SVR loaders do).

    The permutation is drawn on ``generator``'s device (torch refuses a CUDA generator for a
    CPU randperm), so the batches live there too.
    """
    perm = torch.randperm(num_scenes, generator=generator, device=generator.device if generator is not None else None)
    batches = list(perm.split(scenes_per_batch))
    return [b for b in batches if len(b) == scenes_per_batch] if drop_last else batches


# --------------------------------------------------------------------------- RGBA renders

# Where an instance's files live, relative to DataSource unless absolute; placeholders
# {dataset}, {cls} and {instance} come from the split file.  The defaults are the layout
# of the original's data folder, written by prepare_data.py.
DEFAULT_RENDERS_PATH = "{dataset}/renders/{instance}"
DEFAULT_MESHES_PATH = "{dataset}/meshes/{instance}.obj"
METADATA_FILE = "rendering_metadata.txt"


def instance_path(template: str, data_source: str | os.PathLike, inst: Instance) -> Path:
    """``template`` with {dataset}, {cls}, {instance} filled in; relative to ``data_source``."""
    try:
        rel = template.format(dataset=inst.dataset, cls=inst.cls, instance=inst.name)
    except (KeyError, IndexError, ValueError) as err:
        raise MeshSDFError(f"path template {template!r}: bad placeholder ({err}); use {{dataset}}, {{cls}} "
                           "and {instance}") from None
    p = Path(rel).expanduser()
    return p if p.is_absolute() else Path(data_source) / p


def view_image_name(view: int) -> str:
    """DISN / 3D-R2N2 file name of view ``view``: 00.png, 01.png, ..."""
    return f"{int(view):02d}.png"


def rgba_to_tensor(image: np.ndarray, path: Path, image_size: int | None = None) -> torch.Tensor:
    """A decoded PNG (H, W, 4) uint8 as a (4, S, S) uint8 tensor, at ``image_size`` S if given
    (else at its own size).

    Raises MeshSDFError naming ``path`` unless the image is square RGBA.  Resizing uses
    area averaging when shrinking (like a camera's pixels) and bilinear when enlarging.
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
        return (f"{_others(root, d.name, '*')} {root} lacks this instance of the split; fix its name in the split "
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
    (one DISN line per view, see lib.camera).  Views 0 .. num_views - 1 are used.
    ``image_size`` None (the original's way): the renders are used at their own size, which
    must be the same for all (that of the first instance's first view; another size raises
    MeshSDFError); a number resizes every render to it.  ``self.image_size`` is the size
    used.  Cameras are built at that size and, when
    ``normalization_path`` is given, moved from the frame the renders were made in into the
    frame of the SDF samples: that file (``lib.sampling.read_normalization``: ``offset`` (3,),
    ``scale``) maps DeepSDF's ``normalised = (original + offset) * scale``.

    Everything is checked when the set is built (files present, metadata parsable with
    enough views, normalisation readable), so a bad dataset fails before training starts;
    images are decoded and checked when first used, or all at once with ``cache=True``
    (kept as uint8 in memory; "auto" caches when they take less than ``cache_limit`` bytes).
    Every problem raises MeshSDFError naming the file.
    """

    def __init__(self, data_source: str | os.PathLike, instances: Sequence[Instance], image_size: int | None,
                 num_views: int, renders_path: str = DEFAULT_RENDERS_PATH, normalization_path: str | None = None,
                 cache: bool | str = "auto", cache_limit: int = 2 ** 30):
        from lib.camera import from_disn_metadata, read_disn_metadata

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
            meta = d / METADATA_FILE
            if not meta.is_file():
                raise MeshSDFError(f"rendering metadata not found: {meta}; every render folder needs one "
                                   "(one line 'azimuth elevation in-plane distance-ratio fov' per view)")
            for v in range(self.num_views):
                png = d / view_image_name(v)
                if not png.is_file():
                    raise MeshSDFError(f"render not found: {png}; the experiment uses NumberOfViews = "
                                       f"{self.num_views} views (00 .. {self.num_views - 1:02d}) per instance")
        if self.resize:
            self.image_size = int(image_size)
        else:
            from lib.io import read_png

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
            from lib.io import read_png

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
        """RGBA images (B, 4, S, S) float32 in [0, 1] on ``device`` for scene/view pairs (B,) each."""
        imgs = [self._load(int(s), int(v)) for s, v in zip(scenes.tolist(), views.tolist())]
        device = torch.device("cpu") if device is None else torch.device(device)
        if device.type == "cuda":  # as uint8 (4x fewer bytes than float) through pinned memory
            batch = self._staging.upload(lambda buf: torch.stack(imgs, out=buf), (len(imgs),) + tuple(imgs[0].shape),
                                         torch.uint8, device)
        else:
            batch = torch.stack(imgs)
        return batch.float().div_(255.0)

    def camera(self, scene: int, view: int):
        """The unbatched ``lib.camera.Camera`` of one view, in the SDF frame, at ``image_size``."""
        if not 0 <= view < self.num_views:
            raise MeshSDFError(f"view {view} of {self.instances[scene].name} does not exist: views are "
                               f"0 .. {self.num_views - 1}")
        return self.cameras[scene][view]

    def random_views(self, count: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """``count`` view indices drawn uniformly from 0 .. num_views - 1, (count,) int64 (CPU).

        ``generator`` may live on any device (e.g. the SDF sampler's).
        """
        dev = generator.device if generator is not None else None
        return torch.randint(self.num_views, (count,), generator=generator, device=dev).cpu()


def _first_views(cam, n: int):
    """The first ``n`` cameras of a batched camera, still batched."""
    from lib.camera import Camera

    return Camera(cam.R[:n], cam.t[:n], cam.focal[:n], cam.principal[:n], cam.image_size, batched=True)


def to_normalized_frame(camera, normalization):
    """The camera that sees normalised points as ``camera`` sees the original ones.

    ``normalization``: a ``lib.sampling.Normalization`` (DeepSDF's normalised = (original +
    offset) * scale).  With p_cam = R original + t, the camera (R, scale (t - R offset))
    gives p_cam' = scale p_cam: the same pixels, depth times scale.
    """
    from lib.camera import Camera

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
        """One training batch for ``scenes`` (B,): the given ``views`` (B,) of them, or a random view of each.

        Returns images (B, 4, S, S) float32 in [0, 1], xyz (B, N, 3) and sdf (B, N) on
        ``device``.  ``generator`` (on the SDF samples' device) makes the views and samples
        reproducible.
        """
        if views is None:
            views = self.renders.random_views(len(scenes), generator)
        xyz, sdf = self.sdf.sample(scenes, samples_per_scene, generator, device=device)
        images = self.renders.images(scenes, views, device)
        return images, xyz, sdf
