"""Kernels without policy, depending on nothing above them in the package (torch and numpy only).

- :mod:`.marching_cubes`: the vectorised cell kernel and grid helpers;
- :mod:`.marching_cubes_tables`: its case tables;
- :mod:`.mesh`: mesh utilities (the one vertex weld);
- :mod:`.indexing`: the one compaction of a mask into its indices.
"""
from .marching_cubes import (CELL_CHUNK, cell_corner_values, crossing_cells, grid_axis, marching_cubes,
                             marching_cubes_cells, voxel_size)
from .indexing import flat_nonzero
from .marching_cubes_tables import CORNER_OFFSETS, tables
from .mesh import weld_vertices

__all__ = ["CELL_CHUNK", "CORNER_OFFSETS", "cell_corner_values", "crossing_cells", "flat_nonzero", "grid_axis",
           "marching_cubes", "marching_cubes_cells", "tables", "voxel_size", "weld_vertices"]
