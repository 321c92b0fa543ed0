"""Datasets: split files, SDF samples, SVR renders and the data preparation behind them.

- ``splits``: split files (``Instance``, ``read_split``) and instance path templates;
- ``samples``: the SDF-samples dataset (``SdfSamples``) and epoch scene batches;
- ``images``: the RGBA + camera + SDF dataset of single-view reconstruction (``RenderSet``,
  ``RgbaSdfSamples``);
- ``renders``: DISN-layout RGBA renders of a mesh, as prepare_data.py writes them;
- ``sampling``: mesh normalisation (DeepSDF's convention) and SDF sample generation;
- ``shapes``: analytic SDF primitives and the built-in shapes (bob, spot, toy cars, toy chairs).

The names below are re-exported; the analytic primitives stay in ``shapes``.
"""
from . import shapes
from .images import (DEFAULT_MESHES_PATH, DEFAULT_RENDERS_PATH, METADATA_FILE, RenderSet, RgbaSdfSamples,
                     rgba_to_tensor, to_normalized_frame, view_image_name)
from .renders import distance_ratio_for, random_disn_cameras, render_rgba, render_views
from .samples import PinnedStaging, SdfSamples, missing_samples_message, read_sdf_samples, scene_batches
from .sampling import (NORMALIZATION_BUFFER, Normalization, normalization, prepare_mesh, read_normalization,
                       sample_points, sample_sdf, signed_distance, split_by_sign, validate_mesh, write_normalization,
                       write_sdf_samples)
from .shapes import BUILTIN_DATASETS, COUNTABLE_DATASETS, Shape, builtin_color, builtin_shape, mesh_builtin, mesh_shape
from .splits import Instance, instance_path, read_split

__all__ = [
    # splits
    "Instance", "read_split", "instance_path",
    # samples
    "SdfSamples", "read_sdf_samples", "missing_samples_message", "scene_batches", "PinnedStaging",
    # images
    "RenderSet", "RgbaSdfSamples", "rgba_to_tensor", "to_normalized_frame", "view_image_name", "METADATA_FILE",
    "DEFAULT_RENDERS_PATH", "DEFAULT_MESHES_PATH",
    # renders
    "render_views", "render_rgba", "random_disn_cameras", "distance_ratio_for",
    # sampling
    "Normalization", "normalization", "read_normalization", "write_normalization", "NORMALIZATION_BUFFER",
    "validate_mesh", "sample_points", "signed_distance", "sample_sdf", "split_by_sign", "write_sdf_samples",
    "prepare_mesh",
    # shapes
    "shapes", "Shape", "BUILTIN_DATASETS", "COUNTABLE_DATASETS", "builtin_shape", "builtin_color", "mesh_builtin",
    "mesh_shape",
]
