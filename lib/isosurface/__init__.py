"""Iso-surface extraction (being split into modules; see sparse.py for now)."""
from .sparse import (MODES, ExtractionState, _BlockGrid, _sentinel_seeds, dense_grid, extract, extract_dense,  # noqa: F401
                     grid_points, marching_cubes, marching_cubes_cells, same_mesh, tables, voxel_size)
