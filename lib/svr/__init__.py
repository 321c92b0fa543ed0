"""Single-view reconstruction (train_svr.py, reconstruct_svr.py, metrics_svr.py), one concern per module:

- ``lib.svr.network``: the encoder + decoder of specs.json and their checkpoints;
- ``lib.svr.data``: splits, renders, samples, ground-truth meshes, the evaluation view of an item;
- ``lib.svr.train``: joint training on the SDF loss, as the original runs it;
- ``lib.svr.evaluate``: the original's per-iteration Chamfer and image-space normal consistency;
- ``lib.svr.reconstruct``: raw mesh + silhouette refinement of one view, and its output folder;
- ``lib.svr.report``: metrics_svr.py's seven lines, per-instance table, CSV and plot.

Dataset rendering (DISN-layout views) lives with data preparation, in ``lib.datasets.renders``;
the datasets an SVR experiment reads (``RenderSet``, ``RgbaSdfSamples``) in ``lib.datasets.images``.
The names below are re-exported for convenience.
"""
from .data import (evaluation_view, ground_truth_mesh, render_set_from_specs, sdf_render_set, split_instances,
                   training_set_from_specs)
from .evaluate import GroundTruth
from .network import EncoderDecoder, encoder_from_specs, load_network, network_from_specs
from .reconstruct import LOG_KEYS, RefineSettings, ViewResult, reconstruct_view, save_instance
from .train import make_optimizer, svr_schedules, test_losses, train_step, train_svr

__all__ = ["evaluation_view", "ground_truth_mesh", "render_set_from_specs", "sdf_render_set", "split_instances",
           "training_set_from_specs", "GroundTruth", "EncoderDecoder", "encoder_from_specs", "load_network",
           "network_from_specs", "LOG_KEYS", "RefineSettings", "ViewResult", "reconstruct_view", "save_instance",
           "make_optimizer", "svr_schedules", "test_losses", "train_step", "train_svr"]
