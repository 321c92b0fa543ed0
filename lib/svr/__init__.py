"""Single-view reconstruction (train_svr.py, reconstruct_svr.py, metrics_svr.py), one concern per module:

- ``lib.svr.network``: the encoder + decoder of specs.json and their checkpoints;
- ``lib.svr.data``: splits, renders, samples, ground-truth meshes, the evaluation view of an item;
- ``lib.svr.train``: joint training on the SDF loss, as the original runs it;
- ``lib.svr.evaluate``: the original's per-iteration Chamfer and image-space normal consistency;
- ``lib.svr.reconstruct``: raw mesh + silhouette refinement of one view, and its output folder;
- ``lib.svr.report``: metrics_svr.py's seven lines, per-instance table, CSV and plot.

Dataset rendering (DISN-layout views) lives with data preparation, in ``lib.datasets``.
The names below are re-exported for convenience.
"""
from lib.svr.data import (evaluation_view, ground_truth_mesh, render_set_from_specs, sdf_render_set,  # noqa: F401
                          split_instances, training_set_from_specs)
from lib.svr.evaluate import GroundTruth  # noqa: F401
from lib.svr.network import EncoderDecoder, encoder_from_specs, load_network, network_from_specs  # noqa: F401
from lib.svr.reconstruct import LOG_KEYS, RefineSettings, ViewResult, reconstruct_view, save_instance  # noqa: F401
from lib.svr.train import make_optimizer, svr_schedules, test_losses, train_step, train_svr  # noqa: F401
