"""Split files: which instances a dataset split holds, and where each instance's files live.

Split file (JSON): ``{"<dataset>": {"<class>": ["<instance>", ...]}}``; instance k of the
split (in file order) is scene k and owns row k of the latent-code embedding.  An instance's
SDF samples live in ``<DataSource>/<dataset>/<class>/<instance>.npz``; its other files (renders,
meshes, normalisation) are found through path templates (``instance_path``).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass
from pathlib import Path

from ..errors import MeshSDFError
from ..io import require_file
from ..experiment.specs import read_json

__all__ = ["Instance", "read_split", "instance_path", "near_names"]


@dataclass(frozen=True)
class Instance:
    """One entry of a split file: ``<dataset>/<cls>/<name>``."""

    dataset: str
    cls: str
    name: str

    def samples_path(self, data_source: str | os.PathLike) -> Path:
        """``<data_source>/<dataset>/<cls>/<name>.npz``, the instance's SDF samples."""
        return Path(data_source) / self.dataset / self.cls / f"{self.name}.npz"


_SPLIT_SHAPE = ('it must map dataset -> class -> list of instance names, '
                'e.g. {"bob_and_spot": {"samples": ["bob", "spot"]}}')


def read_split(path: str | os.PathLike) -> list[Instance]:
    """The instances of a split file, in file order.

    Args:
        path: the split file (JSON, see the module docstring).
    Returns:
        list of ``Instance``, scene k first at index k.  MeshSDFError if the file is missing,
        malformed or lists no instance.
    """
    path = Path(path)
    require_file(path, "split file", "fix TrainSplit/TestSplit in specs.json")
    split = read_json(path)
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


def instance_path(template: str, data_source: str | os.PathLike, inst: Instance) -> Path:
    """An instance's file or folder from a path template.

    Args:
        template: a path with placeholders {dataset}, {cls} and {instance} (filled from ``inst``);
            relative to ``data_source`` unless absolute (``~`` expanded).
        data_source: the data folder (DataSource in specs.json).
        inst: the instance.
    Returns:
        the path; MeshSDFError for an unknown placeholder.
    """
    try:
        rel = template.format(dataset=inst.dataset, cls=inst.cls, instance=inst.name)
    except (KeyError, IndexError, ValueError) as err:
        raise MeshSDFError(f"path template {template!r}: bad placeholder ({err}); use {{dataset}}, {{cls}} "
                           "and {instance}") from None
    p = Path(rel).expanduser()
    return p if p.is_absolute() else Path(data_source) / p


def near_names(folder: Path, name: str, pattern: str) -> str:
    """What ``folder`` holds beside the missing ``name``, for an error message.

    Args:
        folder: an existing folder.
        name: the name that was looked for (a file stem, or a whole name when ``pattern`` is "*").
        pattern: the glob of the entries to compare with ("*.npz" compares stems).
    Returns:
        "did you mean 'x'?" for a close match, else "it holds N others (a, b, c, ...)".
    """
    names = sorted(p.stem if pattern != "*" else p.name for p in folder.glob(pattern))
    close = difflib.get_close_matches(name, names, 1)
    if close:
        return f"did you mean {close[0]!r}?"
    return f"it holds {len(names)} others ({', '.join(names[:3])}{', ...' if len(names) > 3 else ''})"
