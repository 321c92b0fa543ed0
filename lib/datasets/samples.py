"""The SDF-samples dataset: DeepSDF ``.npz`` sample files of a split, sampled in scene batches.

Sample file ``<DataSource>/<dataset>/<class>/<instance>.npz`` (see ``splits``): arrays ``pos``
and ``neg``, each (N, 4) rows ``x y z sdf`` (sdf > 0 outside).  Rows with a NaN or infinite
value are dropped on load.  A training batch takes half of each scene's samples from ``pos``
and half from ``neg``, uniformly at random with replacement.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from ..errors import MeshSDFError
from .shapes import BUILTIN_DATASETS
from .splits import Instance, near_names, read_split

__all__ = ["read_sdf_samples", "missing_samples_message", "SdfSamples", "PinnedStaging", "scene_batches"]


def missing_samples_message(path: Path, dataset: str) -> str:
    """Why ``DataSource/<dataset>/<class>/<instance>.npz`` is missing, and the fix: a misspelt
    instance in the split, a DataSource that points elsewhere, or data not created yet.

    Args:
        path: the missing sample file.
        dataset: its dataset's name (a built-in one gets the prepare_data.py command that makes it).
    Returns:
        the one-line message for MeshSDFError.
    """
    path = Path(path)
    if path.is_dir():
        return f"SDF samples {path} is a folder, not a file; move it away and rerun prepare_data.py"
    cls_dir, ds_dir = path.parent, path.parent.parent
    source = ds_dir.parent
    if cls_dir.is_dir() and any(cls_dir.glob("*.npz")):
        how = (f"{near_names(cls_dir, path.stem, '*.npz')} {cls_dir} lacks this instance of the split; fix its name "
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
    """The samples of one DeepSDF ``.npz`` file.

    Args:
        path: the ``.npz`` file (arrays ``pos`` and ``neg``, (N, 4) rows x y z sdf).
        dataset: its dataset's name, for the message when the file is missing (default "").
    Returns:
        pos (P, 4), neg (Q, 4): float32 CPU tensors without rows holding NaN or inf.  MeshSDFError
        when the file is missing, unreadable or holds other arrays.
    """
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
            raise MeshSDFError(f"{path}: '{key}' has shape {a.shape} ({a.dtype}); expected (N, 4) numeric rows "
                               "x y z sdf")
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

    Args:
        data_source: the data folder (DataSource in specs.json).
        instances: the split's instances, scene k = ``instances[k]``.
        device: where the rows are kept (default CPU).
    MeshSDFError when a sample file is missing or unreadable (all are checked before loading).
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
        """The samples of the instances of ``split_file`` (``read_split``), on ``device`` (default CPU)."""
        return cls(data_source, read_split(split_file), device=device)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.instances]

    def sample(self, scenes: torch.Tensor, samples_per_scene: int, generator: torch.Generator | None = None,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random samples of some scenes.

        The first S // 2 samples of each scene come from ``pos``, the other S - S // 2 from
        ``neg``, uniformly with replacement.  From CPU samples to a GPU the rows are gathered
        into pinned memory and copied asynchronously.

        Args:
            scenes: (B,) int64 scene indices.
            samples_per_scene: S.
            generator: on ``self.device``; makes the draw reproducible (default: torch's global one).
            device: where the result goes (default ``self.device``).
        Returns:
            xyz (B, S, 3) and sdf (B, S), float32 on ``device``.
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
        """A copy on ``device`` of data written into a pinned host buffer.

        Args:
            fill: ``fill(buf)`` writes the data into ``buf``, a pinned CPU tensor of ``shape``.
            shape, dtype: of the data.
            device: the CUDA device to copy to.
        Returns:
            the tensor (``shape``, ``dtype``) on ``device``; the copy may still be running on its stream.
        """
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

    Args:
        num_scenes: the number of scenes N.
        scenes_per_batch: B.
        generator: makes the permutation reproducible (default: torch's global one, CPU).
        drop_last: leave out a last batch shorter than B (default False).
    Returns:
        list of (B,) int64 tensors (the last (N mod B,) unless ``drop_last``).
    """
    perm = torch.randperm(num_scenes, generator=generator, device=generator.device if generator is not None else None)
    batches = list(perm.split(scenes_per_batch))
    return [b for b in batches if len(b) == scenes_per_batch] if drop_last else batches
