"""What an SVR experiment reads: its splits, renders, SDF samples and ground-truth meshes, and
the view each evaluation instance is seen from."""
from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from ..datasets import RenderSet, RgbaSdfSamples, SdfSamples, instance_path, read_split
from ..errors import MeshSDFError
from ..io import read_mesh, require_file
from ..experiment.specs import resolve_path

__all__ = ["SPLIT_KEYS", "split_instances", "render_set_from_specs", "sdf_render_set", "training_set_from_specs",
           "ground_truth_mesh", "evaluation_view"]

SPLIT_KEYS = {"train": "TrainSplit", "test": "TestSplit", "validation": "ValidationSplit"}


def split_instances(specs: Mapping, key: str):
    """The instances of ``specs[key]`` (a split-file key); MeshSDFError when the key is unset."""
    if not specs.get(key):
        raise MeshSDFError(f"specs.json has no {key}; add the split file of the instances to use")
    return read_split(resolve_path(specs[key]))


def render_set_from_specs(specs: Mapping, split_key: str = "TestSplit", instances=None, cache="auto"):
    """The ``lib.datasets.RenderSet`` of ``specs[split_key]`` (or of ``instances``) as specs.json describes it."""
    insts = instances if instances is not None else split_instances(specs, split_key)
    return RenderSet(resolve_path(specs["DataSource"]), insts, specs["ImageSize"], specs["NumberOfViews"],
                     specs["RendersPath"], specs["NormalizationPath"], cache=cache)


def sdf_render_set(specs: Mapping, split_key: str = "TrainSplit", device=None):
    """SDF samples + renders of a split (``lib.datasets.RgbaSdfSamples``): training and test-loss data."""
    insts = split_instances(specs, split_key)
    sdf = SdfSamples(resolve_path(specs["DataSource"]), insts, device=device)
    return RgbaSdfSamples(sdf, render_set_from_specs(specs, instances=insts))


def training_set_from_specs(specs: Mapping, device=None):
    """SDF samples + renders of the TrainSplit."""
    return sdf_render_set(specs, "TrainSplit", device)


def ground_truth_mesh(specs: Mapping, inst) -> tuple[torch.Tensor, torch.Tensor]:
    """The ground-truth mesh of ``inst`` (MeshesPath), in the frame of the samples: verts (V, 3)
    float32, faces (F, 3) int64 (CPU)."""
    path = instance_path(specs["MeshesPath"], resolve_path(specs["DataSource"]), inst)
    v, f = read_mesh(require_file(path, "ground-truth mesh", "fix MeshesPath in specs.json or run prepare_data.py"))
    return torch.from_numpy(np.asarray(v, dtype=np.float32)), torch.from_numpy(np.asarray(f, dtype=np.int64))


def evaluation_view(index: int, num_views: int) -> int:
    """The view the original evaluates item ``index`` of the test split on:
    ``np.random.seed(index); np.random.randint(0, num_views)``.

    numpy's global generator is saved and restored, so the caller's draws are unaffected.
    """
    state = np.random.get_state()
    try:
        np.random.seed(int(index))
        return int(np.random.randint(0, int(num_views)))
    finally:
        np.random.set_state(state)
