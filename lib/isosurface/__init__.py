"""Iso-surface extraction of any field over the box [-1, 1]^3: the dense, fast and sparse modes.

Grid convention: resolution N, origin (-1, -1, -1), voxel size 2 / (N - 1); grid value
[i, j, k] is the field at (-1 + i*h, -1 + j*h, -1 + k*h).  Meshes come back in world
coordinates as verts (V, 3) float32 and faces (F, 3) int64 torch tensors.

``sdf_fn`` everywhere is a callable mapping points (P, 3) to values (P,); the surface is
``sdf_fn = level`` and "outside" is where ``sdf_fn > level`` (as for an SDF).  It is called
under ``torch.no_grad()``.  Every mode triangulates with the one torch marching cubes of
:mod:`lib.ops.marching_cubes`.

Modules:
    state    ExtractionState (what a call leaves for the next), MODES, the field type SdfFn
    dense    the full grid: grid_points, dense_grid, extract_dense; the fast mode's refresh
    sparse   the block store, seeding (coarse pass, warm start) and surface tracking
    driver   the driver, extract(sdf_fn, resolution, mode, state, ...) (not named extract.py: a
             submodule of that name would be shadowed by the function in this namespace)
    compare  same_mesh (canonical comparison of two meshes)

The marching cubes names (marching_cubes, marching_cubes_cells, tables, voxel_size) are
re-exported from :mod:`lib.ops` for the callers that import them from here.
"""
from ..ops.marching_cubes import marching_cubes, marching_cubes_cells, voxel_size
from ..ops.marching_cubes_tables import tables
from .compare import same_mesh
from .dense import dense_grid, extract_dense, grid_points
from .driver import extract
from .sparse import _BlockGrid, _sentinel_seeds  # noqa: F401  (internals the tests drive directly)
from .state import MODES, ExtractionState

__all__ = ["MODES", "ExtractionState", "dense_grid", "extract", "extract_dense", "grid_points", "marching_cubes",
           "marching_cubes_cells", "same_mesh", "tables", "voxel_size"]
