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

# Datasets that prepare_data.py can build by itself: named in the missing-file message.
BUILTIN_DATASETS = ("bob_and_spot",)


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
        split = json.loads(path.read_text())
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


def missing_samples_message(path: Path, dataset: str) -> str:
    if dataset in BUILTIN_DATASETS:
        how = f"create it with `python prepare_data.py --builtin {dataset}`"
    else:
        how = "create SDF samples with prepare_data.py (see its --help) or fix DataSource in specs.json"
    return f"SDF samples not found: {path}; {how}"


def read_sdf_samples(path: str | os.PathLike, dataset: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """``pos`` and ``neg`` of a DeepSDF npz as (P, 4), (Q, 4) float32 CPU tensors without NaN rows."""
    path = Path(path)
    if not path.is_file():
        raise MeshSDFError(missing_samples_message(path, dataset))
    try:
        with np.load(path, allow_pickle=False) as npz:
            arrays = {k: npz[k] for k in ("pos", "neg") if k in npz.files}
    except Exception as err:  # zipfile / numpy raise several types for corrupt files
        raise MeshSDFError(f"cannot read SDF samples {path}: {type(err).__name__}: {err}") from None
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

    ``instances[k]`` is scene k (latent code k).  Rows of every scene are stored
    concatenated (pos and neg separately) so a batch is one vectorised gather.
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
        self.pos, self.pos_start, self.pos_count = self._pack(pos)
        self.neg, self.neg_start, self.neg_count = self._pack(neg)

    def _pack(self, parts):
        counts = torch.tensor([p.shape[0] for p in parts], dtype=torch.int64)
        starts = torch.cumsum(counts, 0) - counts
        return torch.cat(parts).to(self.device), starts.to(self.device), counts.to(self.device)

    @classmethod
    def from_split(cls, data_source: str | os.PathLike, split_file: str | os.PathLike, device=None) -> "SdfSamples":
        return cls(data_source, read_split(split_file), device=device)

    def __len__(self) -> int:
        return len(self.instances)

    @property
    def names(self) -> list[str]:
        return [i.name for i in self.instances]

    def sample(self, scenes: torch.Tensor, samples_per_scene: int,
               generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Random samples of ``scenes`` (B,) int64: xyz (B, S, 3) and sdf (B, S), on ``self.device``.

        The first S // 2 samples of each scene come from ``pos``, the other S - S // 2 from
        ``neg``, uniformly with replacement.  ``generator`` (on ``self.device``) makes it
        reproducible.
        """
        scenes = scenes.to(self.device, torch.int64)
        b, n = scenes.shape[0], int(samples_per_scene)
        half = n // 2
        # float64 so that floor(u * count) < count for any realistic count
        u = torch.rand(b, n, generator=generator, device=self.device, dtype=torch.float64)
        ip = (u[:, :half] * self.pos_count[scenes, None]).long()
        ip = torch.minimum(ip, self.pos_count[scenes, None] - 1) + self.pos_start[scenes, None]
        ineg = (u[:, half:] * self.neg_count[scenes, None]).long()
        ineg = torch.minimum(ineg, self.neg_count[scenes, None] - 1) + self.neg_start[scenes, None]
        rows = torch.cat((self.pos.index_select(0, ip.reshape(-1)).reshape(b, half, 4),
                          self.neg.index_select(0, ineg.reshape(-1)).reshape(b, n - half, 4)), dim=1)
        return rows[..., :3], rows[..., 3]


def scene_batches(num_scenes: int, scenes_per_batch: int, generator: torch.Generator | None = None) -> list[torch.Tensor]:
    """One epoch: a random permutation of scene indices split into batches (last may be short)."""
    perm = torch.randperm(num_scenes, generator=generator)
    return list(perm.split(scenes_per_batch))
