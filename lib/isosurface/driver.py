"""The extraction driver: :func:`extract` runs one of the modes (dense, fast, sparse) on a field.

It chooses the mode's store (:mod:`.dense`'s full grid or :mod:`.sparse`'s block store),
meshes the sign-changing cells with the one marching cubes kernel of :mod:`lib.ops`, and
fills the :class:`ExtractionState` the next call reuses.
"""
from __future__ import annotations

from typing import Callable

import torch

from ..errors import MeshSDFError
from ..log import info
from ..ops.marching_cubes import crossing_cells, marching_cubes_cells
from ..runtime.cpus import keep_freed_memory
from ..runtime.threads import concurrently, elementwise_section
from .compare import same_mesh
from .dense import _cell_ijk, _check_fast, _DenseGrid, _fill_signs, _refresh_fast, _resolve, _update_cells
from .sparse import _BlockGrid, _sparse, default_coarse_stride
from .state import MODES, ExtractionState, SdfFn

__all__ = ["extract"]


@torch.no_grad()
def extract(sdf_fn: SdfFn, resolution: int = 64, mode: str = "sparse", state: ExtractionState | None = None,
            device=None, chunk: int = 2 ** 14, verify: bool = False, coarse_stride: int | None = None,
            band: float = 1.5, level: float = 0.0, warm: bool = True,
            freeze: Callable[[], SdfFn] | None = None) -> tuple[torch.Tensor, torch.Tensor, ExtractionState]:
    """Mesh of the level set ``sdf_fn = level`` on the N^3 grid over [-1, 1]^3.

    All modes triangulate with :func:`lib.ops.marching_cubes.marching_cubes_cells`, so they
    agree exactly when they see the same values on the sign-changing cells.

    Modes:
      ``dense``  every grid point (N^3 evaluations, an N^3 float grid).
      ``fast``   the original's heuristic: keep ``state``'s full grid, re-evaluate only the
                 voxel of each previous vertex and its 6 neighbours, stale values elsewhere;
                 ``state.missed_vertices > 0`` (with a message) reports a surface that
                 left the refreshed band (the mesh is then wrong), found by re-evaluating
                 the stale ends of crossing edges (counted in ``evaluations``).  A call
                 touches only the refreshed points and the cells around those whose sign
                 changed (the other cells keep their status).  Without a full grid and a
                 non-empty mesh in ``state`` it starts anew: with ``freeze``, from the band
                 (the ``sparse`` mode's cold extraction; the rest of the grid holds only
                 signs, which the band determines, and a later call evaluates with the
                 frozen first field the points the heuristic reads there: the meshes of the
                 dense start, given the sparse mode's seeding caveat below and a field whose
                 value at a point does not depend on the batch it is evaluated in; a network
                 can differ in rounding), else ``dense``.
      ``sparse`` exact narrow band, memory proportional to the surface (values and visited
                 cells in 8^3-point blocks allocated where the band passes, a (G/8)^3 int32
                 block table, the mesh's cells in a list; no N^3 array).  Cold
                 start: a coarse grid (stride ``coarse_stride``), a bisection on every
                 coarse edge with a sign change to find fine sign-changing cells, recursive
                 refinement of coarse cells that show no sign change but have a corner with
                 |s| < band * half their diagonal (a hidden component, e.g. a thin part,
                 unless they touch a sign-changing cell), then surface tracking: every
                 neighbour across a cell face with mixed signs is evaluated until the set of
                 sign-changing cells is closed.  A field cheap per point (timed on the coarse
                 lattice, see ``sparse.BLOCK_COST_RATIO``; N > 64) is tracked a block of 8^3
                 cells at a time instead (every point of the blocks the surface passes: more
                 evaluations, far less bookkeeping; the same mesh; ``state.tracking``).  Warm
                 start (``state`` from a non-empty sparse call at the same resolution,
                 ``warm=True``): instead of the coarse pass,
                 the tracking starts from the previous call's cells, with a sentinel
                 lattice of ``SENTINEL_FACTOR`` (4) times the coarse stride (N = 64: stride
                 8, 729 points) evaluated in the same first batch; once the tracking has
                 closed, every sentinel edge whose ends differ in sign is completed from
                 the stored values (evaluating only runs of unknown points between
                 opposite signs) and its fine crossings seed more tracking.  The mesh is
                 identical to ``dense`` whenever every connected piece of the surface is
                 seeded (cold: ``band`` is a Lipschitz safety factor; warm: a piece touches
                 the previous surface's cells or crosses a sentinel edge whose ends differ
                 in sign (of the pieces crossing one such edge, at least one is found), as
                 a piece does that holds a ball of sqrt(3) sentinel strides apart from the
                 rest of the surface; a piece that does neither, e.g. a small new blob far
                 from the old surface and from the sentinel lines, is missed until the
                 next cold call).

    Args:
        sdf_fn: the field, points (P, 3) float32 -> values (P,); "outside" is ``> level``.
            Called under ``torch.no_grad()``, in batches of at most ``chunk`` points.
        resolution: N, grid points per axis (>= 2; default 64).
        mode: one of :data:`MODES` (default ``"sparse"``).
        state: the :class:`ExtractionState` of the previous call, or None.  It is consumed:
            its grid buffer is reused (overwritten) by this call.  A state of another level
            is ignored.
        device: where the grid and mesh live (default: ``state``'s, else CPU).
        chunk: points per call of ``sdf_fn`` (default 2^14): it keeps a 128-wide network's
            activations (chunk x 128 x 4 bytes) under glibc's 32 MB mmap threshold, above
            which every layer gets fresh pages from the kernel (see
            benchmarks/extraction.py).
        verify: also run ``dense``, compare with :func:`same_mesh`, record
            ``state.verified`` and return the dense mesh if they differ (default False).
        coarse_stride: sparse cold start's coarse stride, a power of two (default
            :func:`default_coarse_stride`; a warm start's sentinel lattice: ``SENTINEL_FACTOR``
            x it, default x ``default_coarse_stride(N, warm=True)``).
        band: sparse cold start's Lipschitz safety factor (default 1.5).
        level: the level set (default 0).
        warm: let a sparse call start from ``state``'s cells (default True).
        freeze: fast mode: returns a copy of ``sdf_fn`` that keeps computing the field of the
            moment it is called when the tensors ``sdf_fn`` reads change in place (e.g. the
            decoder with the latent code cloned); given, a fast start evaluates the band only
            (see ``fast``).  Called once per start; None (default): the dense start.

    Returns:
        verts (V, 3) float32 world coordinates, faces (F, 3) int64 (normals towards
        ``sdf_fn > level``), both on ``device``, and the :class:`ExtractionState` to pass to
        the next call.  No surface in the box gives an empty mesh, ``state.empty`` and
        ``state.message``.

    Raises:
        MeshSDFError: an unknown mode, a resolution below 2, or a coarse stride that is not
        a power of two.
    """
    if mode not in MODES:
        raise MeshSDFError(f"extraction mode {mode!r} is unknown: use one of {', '.join(MODES)}")
    n = int(resolution)
    if n < 2:
        raise MeshSDFError(f"resolution {n} is too small: use at least 2 grid points per axis")
    if device is None:
        device = state.cells.device if state is not None else torch.device("cpu")
    device = torch.device(device)
    if device.type == "cpu":
        keep_freed_memory()  # the passes' MB-sized transients are reused, not page-faulted in again each pass
    fn = sdf_fn if not level else (lambda p: sdf_fn(p) - level)
    if state is not None and state.level != level:
        state = None  # another level set: nothing to reuse
    reuse = state.values if (state is not None and state.values is not None and state.values.device == device) else None
    marks, warm_cells, rows, corners, origin = None, None, 64, None, None
    if (mode == "fast" and state is not None and state.full and state.resolution == n and reuse is not None
            and state.keys.numel()):
        marks = state.marks if state.marks is not None and state.marks.device == device else None
        state.marks = None  # the state is consumed: a call that fails half-way leaves no dirty marks behind
        if marks is None:
            marks = torch.zeros(n ** 3, dtype=torch.bool, device=device)
        grid, fresh, flipped = _refresh_fast(fn, state, chunk, marks)
        origin = state.origin
        if state.verified is not False:  # state.cells are then the grid's sign-changing cells
            cells, added = _update_cells(grid, state.cells, flipped)
            if origin is not None:  # only a cell new to the mesh can have an unevaluated corner
                _resolve(grid, _cell_ijk(added, n), origin)
        else:
            cells = crossing_cells(grid.values.reshape(n, n, n))
            if origin is not None:
                _resolve(grid, cells, origin)
    elif mode == "fast" and freeze is not None:
        # the band start: the sparse mode's cells and corner values, the rest of the grid as
        # signs; the points a later call reads are evaluated then with the first field
        frozen = freeze()
        origin = frozen if not level else (lambda p: frozen(p) - level)
        band_grid, cells, corners = _sparse(fn, n, device, chunk, coarse_stride or default_coarse_stride(n), band,
                                            None, 64)
        if cells.shape[0]:
            if corners is None:
                corners = band_grid.corner_values(cells)  # all stored: nothing evaluated
            grid = _DenseGrid(fn, n, n, device, chunk, reuse)
            grid.evaluations = band_grid.evaluations
            _fill_signs(grid, cells, corners)
            del band_grid
        else:
            grid, origin = band_grid, None
    elif mode == "sparse":
        if (warm and state is not None and state.mode == "sparse" and state.resolution == n and not state.empty
                and state.cells.device == device):
            warm_cells = state.cells
            rows = state.peak_points // _BlockGrid.B3  # about the pool the last call needed
        grid, cells, corners = _sparse(fn, n, device, chunk,
                                       coarse_stride or default_coarse_stride(n, warm=warm_cells is not None), band,
                                       warm_cells, rows)
    else:
        grid = _DenseGrid(fn, n, n, device, chunk, reuse)
        grid.evaluate(torch.arange(n ** 3, device=grid.ax.device))
        cells = crossing_cells(grid.values.reshape(n, n, n))
    if corners is None and isinstance(grid, _DenseGrid):
        corners = grid.corner_values(cells)  # one gather, small beside the N^3 grid (marching cubes reads them twice)
    # passes over the surface's cells: cheaper on one thread than waking a sleeping team for
    # each, with the steps of each pass side by side, one a thread
    ways = torch.get_num_threads() if device.type == "cpu" else 1
    with elementwise_section(device):
        verts, faces, keys = marching_cubes_cells(cells, grid.corner_values if corners is None else corners, n,
                                                  grid.ax, side_by_side=lambda tasks: concurrently(tasks, device),
                                                  ways=ways)
    stale, missed = (0, 0)
    if marks is not None:
        stale, missed = _check_fast(grid, keys, marks)
        marks.index_fill_(0, fresh, False)
    dense_values = grid.values if isinstance(grid, _DenseGrid) else None
    st = ExtractionState(resolution=n, mode=mode, grid_size=grid.g, values=dense_values, full=dense_values is not None,
                         verts=verts, faces=faces, keys=keys, cells=cells, evaluations=grid.evaluations,
                         warm=warm_cells is not None, stale_vertices=stale, missed_vertices=missed,
                         peak_points=grid.stored, level=level, tracking=getattr(grid, "tracking", ""), marks=marks,
                         origin=origin)
    del grid
    if verify and mode != "dense":
        dv, df, dst = extract(sdf_fn, n, "dense", None, device, chunk, level=level)
        ok, why = same_mesh(verts, faces, dv, df)
        st.verified = ok
        if not ok:
            info(f"extract: {mode} mesh differs from dense ({why}); returning the dense mesh")
            verts, faces, st.keys, st.cells = dv, df, dst.keys, dst.cells
            st.verts, st.faces = dv, df
        st.evaluations += dst.evaluations
    if faces.shape[0] == 0:
        st.empty = True
        st.message = (f"no surface in the box at resolution {n}: the field is on one side of the level "
                      f"{level:g} at every {'evaluated ' if mode == 'sparse' else ''}grid point")
    elif missed:
        st.message = (f"fast extraction lost the surface: {missed} of {verts.shape[0]} vertices lie on edges "
                      "that no longer cross it (it moved more than the refreshed band); use mode 'sparse'")
    if st.message:
        info(f"extract: {st.message}")
    return verts, faces, st
