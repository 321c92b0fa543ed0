"""Marching cubes (torch vs scikit-image), extraction modes dense / fast / sparse."""
import importlib
import weakref

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree
from torch.utils._python_dispatch import TorchDispatchMode

from lib.errors import MeshSDFError
from lib.isosurface import (_BlockGrid, _sentinel_seeds, extract, grid_points, marching_cubes, marching_cubes_cells,
                            same_mesh)
from lib.isosurface import sparse as sparse_module
from lib.isosurface import tables
from lib.metrics import genus
from lib.ops import flat_nonzero

from fields import sphere, torus, union


def skimage_mc(vals, level=0.0):
    """The oracle: scikit-image's Lewiner marching cubes, mapped to world coordinates."""
    from skimage import measure

    vol = vals.numpy().astype(np.float32)
    n = vol.shape[0]
    v, f, _, _ = measure.marching_cubes(vol, level=level, spacing=(2 / (n - 1),) * 3)
    return torch.from_numpy(np.ascontiguousarray(v - 1, dtype=np.float32)), torch.from_numpy(f.astype(np.int64))


def scene(p):
    """A torus, a ball through it, and a separate small ball: 3 pieces, genus 1 overall."""
    return union(torus(0.5, 0.15), sphere(0.25, (0.0, 0.0, 0.35)), sphere(0.1, (-0.6, 0.6, -0.5)))(p)


def grid_of(fn, n):
    return fn(grid_points(n)).reshape(n, n, n)


def closed_manifold(faces) -> bool:
    """Every directed edge once, and its reverse once: closed, oriented 2-manifold edges."""
    f = faces.numpy()
    e = np.concatenate([f[:, [0, 1]], f[:, [1, 2]], f[:, [2, 0]]])
    key = e[:, 0] * (f.max() + 1) + e[:, 1]
    rev = e[:, 1] * (f.max() + 1) + e[:, 0]
    return len(np.unique(key)) == len(key) and np.array_equal(np.sort(key), np.sort(rev))


@pytest.mark.parametrize("fn,n", [(sphere(0.61), 41), (torus(), 50), (scene, 64)])
def test_torch_marching_cubes_matches_skimage_vertices(fn, n):
    vals = grid_of(fn, n)
    v, f = marching_cubes(vals)
    vs, fs = skimage_mc(vals)
    assert v.dtype == torch.float32 and f.dtype == torch.int64
    assert v.shape == vs.shape and f.shape == fs.shape
    d, j = cKDTree(vs.numpy()).query(v.numpy())
    assert d.max() < 1e-6 and len(np.unique(j)) == len(j)
    assert closed_manifold(f)
    assert genus(v, f) == genus(vs, fs)


def test_topology_and_orientation():
    left = lambda p: torus(0.35, 0.12)(p + torch.tensor([0.45, 0, 0]))  # noqa: E731
    right = lambda p: torus(0.35, 0.12)(p - torch.tensor([0.45, 0, 0]))  # noqa: E731
    for fn, g in [(sphere(0.6), 0), (torus(), 1), (union(left, right), 2)]:
        v, f = marching_cubes(grid_of(fn, 48))
        assert closed_manifold(f) and genus(v, f) == g
    v, f = marching_cubes(grid_of(sphere(0.6), 40))
    a, b, c = v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]
    assert ((torch.cross(b - a, c - a, dim=1) * (a + b + c)).sum(1) > 0).all()  # outward
    assert (v.norm(dim=1) - 0.6).abs().max() < 0.01


def test_ambiguous_noise_gives_closed_manifold():
    """Random values hit every ambiguous face and interior configuration (centre vertices)."""
    g = torch.Generator().manual_seed(0)
    vals = torch.rand(14, 14, 14, generator=g) - 0.5
    vals[[0, -1]] = 1.0
    vals[:, [0, -1]] = 1.0
    vals[:, :, [0, -1]] = 1.0
    v, f = marching_cubes(vals)
    assert closed_manifold(f)
    assert (f[:, 0] != f[:, 1]).all() and (f[:, 1] != f[:, 2]).all() and (f[:, 0] != f[:, 2]).all()
    assert v.shape[0] > f.max()  # every index valid
    # the centre vertices (loops through both segments of an ambiguous face) were exercised
    _, _, keys = marching_cubes_cells(*_all_cells(vals), 14)
    assert (keys >= 3 * 14 ** 3).any()
    # a copy with different cells order gives the same mesh (canonical order)
    cells, cv = _all_cells(vals)
    perm = torch.randperm(cells.shape[0], generator=g)
    v2, f2, _ = marching_cubes_cells(cells[perm], cv[perm], 14)
    assert torch.equal(v2, v) and same_mesh(v, f, v2, f2)[0]


def _all_cells(vals):
    n = vals.shape[0]
    ax = torch.arange(n - 1)
    cells = torch.cartesian_prod(ax, ax, ax)
    off = torch.tensor([(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)])
    ijk = cells.unsqueeze(1) + off
    return cells, vals[ijk[..., 0], ijk[..., 1], ijk[..., 2]]


@pytest.fixture(params=["cell", "block"])
def tracking(request, monkeypatch):
    """The sparse cold start's tracking, pinned: cells, or whole blocks (chosen by the field's
    measured cost otherwise, so that an analytic field would always get blocks)."""
    monkeypatch.setattr(sparse_module, "BLOCK_COST_RATIO", 0.0 if request.param == "cell" else float("inf"))
    return request.param


def test_an_expensive_field_is_tracked_by_cells():
    """The tracking follows the field's measured cost: a field doing heavy work per point
    (hundreds of passes over its points, far over BLOCK_COST_RATIO times a sort's cost per
    key) gets the cell tracking, and its mesh is the dense one."""

    def heavy(p):
        x = p[:, 0].clone()
        for _ in range(1000):  # work per point, in this thread's CPU time (a sleep would not count)
            x = torch.sin(x)
        return scene(p)

    vs, fs, ss = extract(heavy, 96, "sparse")
    vd, fd, _ = extract(scene, 96, "dense")
    assert ss.tracking == "cells" and torch.equal(vs, vd) and torch.equal(fs, fd)


def test_a_cheap_field_is_tracked_by_blocks_even_on_a_busy_machine():
    """An analytic sphere is tracked by blocks, and stays so while other threads of the
    process keep every core busy (the cost is timed in the calling thread's CPU time, which
    the time they take does not inflate); its mesh is the dense one."""
    import threading

    stop = threading.Event()

    def spin():
        x = torch.rand(2 ** 16)
        while not stop.is_set():
            x = torch.sin(x)

    hogs = [threading.Thread(target=spin, daemon=True) for _ in range(4)]
    for h in hogs:
        h.start()
    try:
        runs = [extract(sphere(0.6), 96, "sparse") for _ in range(3)]
    finally:
        stop.set()
        for h in hogs:
            h.join()
    vd, fd, _ = extract(sphere(0.6), 96, "dense")
    for vs, fs, ss in runs:
        assert ss.tracking == "blocks" and torch.equal(vs, vd) and torch.equal(fs, fd)


@pytest.mark.parametrize("slow_on", [1, 2])
def test_block_tracking_calls_the_field_on_the_faster_thread_count(monkeypatch, slow_on):
    """Inside the block tracking's one-thread section the field's calls go on one thread or on
    the process's two, whichever the first calls found faster in wall time: a field that waits
    2 ms a call on one of the counts (as a busy machine's threads do) gets the other after a
    call on each; the mesh is the same either way."""
    import time

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")  # sleeping OpenMP threads: the section applies
    monkeypatch.setattr(sparse_module, "BLOCK_COST_RATIO", float("inf"))
    saved = torch.get_num_threads()
    torch.set_num_threads(2)
    counts = []

    def fn(p):
        counts.append(torch.get_num_threads())
        if counts[-1] == slow_on and p.shape[0] >= 1024:
            time.sleep(0.002)
        return scene(p)

    try:
        vs, fs, ss = extract(fn, 96, "sparse", chunk=4096)
    finally:
        torch.set_num_threads(saved)
    vd, fd, _ = extract(scene, 96, "dense")
    assert ss.tracking == "blocks" and torch.equal(vs, vd) and torch.equal(fs, fd)
    tracked = counts[-40:]  # the block tracking's last calls, all after the choice
    assert len(counts) > 60 and tracked == [3 - slow_on] * 40


@pytest.mark.parametrize("n", [64, 128, pytest.param(256, marks=pytest.mark.slow)])
def test_sparse_equals_dense(n, tracking):
    calls = []

    def fn(p):
        calls.append(p.shape[0])
        return scene(p)

    vd, fd, sd = extract(fn, n, "dense", chunk=2 ** 20)
    vs, fs, ss = extract(fn, n, "sparse", chunk=2 ** 20)
    assert torch.equal(vd, vs) and torch.equal(fd, fs)  # canonical output: bitwise identical
    assert same_mesh(vd, fd, vs, fs) == (True, "")
    assert sd.evaluations == n ** 3 and ss.evaluations < n ** 3 / 4
    assert sum(calls) == sd.evaluations + ss.evaluations
    assert ss.tracking == ("blocks" if tracking == "block" and n > sparse_module.BLOCK_MIN_CELLS else "cells")
    if n >= 128:  # blocks: every point of the blocks the surface passes (cheap fields only)
        assert ss.evaluations < n ** 3 / (20 if tracking == "cell" else 5)
    assert genus(vs, fs) == 1 and not ss.empty


def test_cold_start_above_64_seeds_from_a_sparser_lattice(tracking):
    """Above N = 64 a cold start's coarse lattice has about 16 cells per axis, not 32: its points
    are evaluations the mesh does not need, so the call evaluates fewer points than with the
    32-cell stride, and its mesh (a torus, a ball through it and a small ball) is the dense one.
    The warm start's sentinel lattice keeps the 32-cell base; N = 64 keeps its stride."""
    n = 128
    dense32 = sparse_module.default_coarse_stride(n, warm=True)
    assert sparse_module.default_coarse_stride(n) == 2 * dense32
    assert sparse_module.default_coarse_stride(64) == sparse_module.default_coarse_stride(64, warm=True)
    vd, fd, _ = extract(scene, n, "dense")
    vs, fs, ss = extract(scene, n, "sparse")
    v32, f32, s32 = extract(scene, n, "sparse", coarse_stride=dense32)
    assert torch.equal(vs, vd) and torch.equal(fs, fd) and torch.equal(v32, vd) and torch.equal(f32, fd)
    if tracking == "cell":  # blocks evaluate the stride-8 block lattice whatever the coarse one
        assert ss.evaluations < s32.evaluations


def test_sparse_verify_detects_a_missed_piece():
    # a tiny ball next to a big one: hidden from a very coarse lattice, next to a crossing cell
    fn = union(sphere(0.5), sphere(0.04, (0.1, 0.07, -0.62)))
    vd, fd, _ = extract(fn, 64, "dense")
    vs, fs, ss = extract(fn, 64, "sparse", coarse_stride=16)
    assert not same_mesh(vd, fd, vs, fs)[0]
    vv, fv, sv = extract(fn, 64, "sparse", coarse_stride=16, verify=True)
    assert sv.verified is False and same_mesh(vd, fd, vv, fv)[0]
    _, _, ok = extract(fn, 64, "sparse", verify=True)  # default stride: found
    assert ok.verified is True


def test_sparse_finds_thin_and_hidden_parts(tracking):
    # a thin rod (thinner than a coarse cell) crossing the box, away from the main surface
    rod = lambda p: (p[:, :2] - torch.tensor([0.7, -0.6])).norm(dim=1) - 0.02  # noqa: E731
    fn = union(sphere(0.4), rod)
    vd, fd, _ = extract(fn, 96, "dense")
    vs, fs, _ = extract(fn, 96, "sparse")
    assert same_mesh(vd, fd, vs, fs)[0]


def test_fast_small_step_matches_dense_and_big_step_is_reported():
    _, _, st = extract(sphere(0.5), 64, "fast")  # no previous grid: dense
    assert st.evaluations == 64 ** 3 and st.full
    v, f, st = extract(sphere(0.505), 64, "fast", state=st)
    assert st.evaluations < 64 ** 3 / 10 and st.missed_vertices == 0 and st.message == ""
    vd, fd, _ = extract(sphere(0.505), 64, "dense")
    # same triangles; positions from stale values are off by a small part of a voxel
    assert same_mesh(v, f, vd, fd, atol=0.05 * 2 / 63)[0]
    v, f, st = extract(sphere(0.62), 64, "fast", state=st)  # ~4 voxels: out of the band
    assert st.missed_vertices > 0 and "lost the surface" in st.message
    vd, fd, _ = extract(sphere(0.62), 64, "dense")
    assert not same_mesh(v, f, vd, fd)[0]


def test_no_surface_is_an_empty_mesh_not_a_crash():
    for mode in ("dense", "fast", "sparse"):
        v, f, st = extract(lambda p: p.norm(dim=1) + 1.0, 32, mode)
        assert v.shape == (0, 3) and f.shape == (0, 3) and f.dtype == torch.int64
        assert st.empty and "no surface" in st.message
    v, f, st = extract(sphere(0.5), 32, "fast", state=st)  # empty previous mesh -> dense
    assert not st.empty and f.shape[0] > 0


def test_same_mesh_detects_differences():
    v, f = marching_cubes(grid_of(sphere(0.6), 24))
    perm = torch.randperm(v.shape[0])
    inv = torch.argsort(perm)
    assert same_mesh(v, f, v[perm], inv[f].roll(1, dims=1))[0]  # reordered, rotated faces
    assert not same_mesh(v, f, v, f[:, [0, 2, 1]])[0]  # flipped orientation
    w = v.clone()
    w[0, 0] += 1e-3
    assert not same_mesh(v, f, w, f)[0]
    # triangles=False (a peer's own case tables): the same vertices and face count suffice
    assert same_mesh(v, f, v, f[:, [0, 2, 1]], triangles=False)[0]
    assert not same_mesh(v, f, w, f, triangles=False)[0]
    assert not same_mesh(v, f, v, f[1:], triangles=False)[0]


def test_bad_arguments():
    with pytest.raises(MeshSDFError):
        extract(sphere(0.55), 16, "octree")
    with pytest.raises(MeshSDFError):
        extract(sphere(0.55), 16, "sparse", coarse_stride=3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    v, f, st = extract(scene, 64, "sparse", device="cuda")
    assert v.is_cuda and f.is_cuda
    vc, fc, _ = extract(scene, 64, "sparse")
    assert same_mesh(v, f, vc, fc)[0]


class LiveBytes(TorchDispatchMode):
    """Allocator statistics of the torch ops run while active: bytes of the tensor storages
    they created that are still alive (``now``), its maximum (``peak``) and the largest one."""

    def __init__(self):
        super().__init__()
        self.live, self.now, self.peak, self.largest = {}, 0, 0, 0

    def _free(self, key):
        self.now -= self.live.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in (out if isinstance(out, (tuple, list)) else (out,)):
            if isinstance(t, torch.Tensor):
                storage = t.untyped_storage()  # views share it: count each storage once
                if id(storage) not in self.live:
                    self.live[id(storage)] = size = storage.nbytes()
                    self.now += size
                    self.peak, self.largest = max(self.peak, self.now), max(self.largest, size)
                    weakref.finalize(storage, self._free, id(storage))
        return out


def test_sparse_memory_grows_with_the_surface_not_the_box(tracking):
    """Peak live tensor memory of a sparse extraction, 256 -> 512: a surface-proportional store
    grows at most ~4x (here less: bounded per-step transients), an N^3 array 8x."""
    extract(sphere(0.6), 16, "sparse")  # the cached case tables are not part of the measure
    peak, stored = {}, {}
    for n in (256, 512):
        with LiveBytes() as rec:
            _, f, st = extract(sphere(0.6), n, "sparse")
        peak[n], stored[n] = rec.peak, st.peak_points
        assert f.shape[0] > 0 and st.values is None
    assert peak[512] / peak[256] < 4.5 and stored[512] / stored[256] < 4.5
    assert peak[512] < 512 ** 3 * 4 / 3  # everything at once: under a third of one dense float grid
    with LiveBytes() as rec:
        extract(sphere(0.6), 128, "dense")
    assert rec.largest >= 128 ** 3 * 4 and rec.peak >= 128 ** 3 * 4  # the statistic does see a dense grid


def test_marching_cubes_cells_in_steps_is_bitwise_the_same():
    """The kernel's output does not depend on its step size, on values given as a tensor or a
    callable, or on the order of the cells (global vertex numbering across steps)."""
    g = torch.Generator().manual_seed(1)
    n = 16
    vals = torch.rand(n, n, n, generator=g) - 0.5  # every case, ambiguous faces, centres
    cells, cv = _all_cells(vals)
    ref = marching_cubes_cells(cells, cv, n, chunk=cells.shape[0])
    assert (ref[2] >= 3 * n ** 3).any() and ref[1].shape[0] > 5000
    lookup = {tuple(c): v for c, v in zip(cells.tolist(), cv)}
    by_cells = lambda c: torch.stack([lookup[tuple(x)] for x in c.tolist()])  # noqa: E731
    perm = torch.randperm(cells.shape[0], generator=g)
    for chunk in (97, 1000):
        for got in (marching_cubes_cells(cells, cv, n, chunk=chunk),
                    marching_cubes_cells(cells[perm], cv[perm], n, chunk=chunk),
                    marching_cubes_cells(cells[perm], by_cells, n, chunk=chunk)):
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), chunk
    crossing = cells[(cv > 0).any(1) & ~(cv > 0).all(1)]
    with pytest.raises(ValueError, match="owner"):  # the owner of earlier cells' edges left out
        marching_cubes_cells(crossing[:-1], by_cells, n, chunk=97)


def test_marching_cubes_case_index_and_runs_helpers_match_their_definitions():
    """The kernel's packed case index is sum(2^k over the corners k outside) for every sign
    pattern (and the decider bits on top as before); its run expansion is repeat_interleave,
    empty runs first, inside and last included."""
    mc = importlib.import_module("lib.ops.marching_cubes")  # the module (lib.ops exports a function of that name)
    tab = tables("cpu")
    patterns = ((torch.arange(256).unsqueeze(1) >> torch.arange(8)) & 1).bool()  # (256, 8) every case
    vals = torch.where(patterns, 0.5, -0.5) * (1 + torch.rand(256, 8, generator=torch.Generator().manual_seed(3)))
    got = mc._case_index(vals, tab)
    assert torch.equal(got >> 6, torch.arange(256))
    assert torch.equal(got >> 6, ((vals > 0).long() * tab["bits8"]).sum(1))
    amb = tab["ambiguous6"].index_select(0, got >> 6)
    assert torch.equal(got & 63 & ~amb, torch.zeros_like(got)) and bool(((got & 63) != 0).any())
    for counts in ([0, 0, 3, 0, 1, 2, 0, 0], [5], [0, 4], [2, 0], [0, 0, 0]):
        counts = torch.tensor(counts)
        for dtype in (torch.int32, torch.int64):
            want = torch.repeat_interleave(torch.arange(counts.shape[0]), counts).to(dtype)
            assert torch.equal(mc._runs(counts, int(counts.sum()), dtype), want)


def test_marching_cubes_cells_steps_side_by_side_are_bitwise_the_same():
    """Steps run side by side (threads writing disjoint slices of the outputs) give the
    in-order result, for equal steps cut to a multiple of ``ways``."""
    from lib.ops.marching_cubes import cell_corner_values
    from lib.runtime import concurrently
    from lib.runtime.threads import elementwise_section

    g = torch.Generator().manual_seed(2)
    n = 36
    vals = torch.rand(n, n, n, generator=g) - 0.5
    cells, cv = _all_cells(vals)
    ref = marching_cubes_cells(cells, cv, n)
    seen = []

    def side_by_side(tasks):
        seen.append(len(tasks))
        return concurrently(tasks)

    with elementwise_section():  # as the extraction runs it: one thread a step
        for ways, chunk in ((2, 2 ** 16), (3, 5000)):
            seen.clear()
            got = marching_cubes_cells(cells, cv, n, chunk=chunk, side_by_side=side_by_side, ways=ways)
            assert all(torch.equal(a, b) for a, b in zip(ref, got)), ways
            assert seen and set(seen) == {ways}, seen  # every round holds ``ways`` steps
        # a callable (it may evaluate and store) is called from this thread only
        seen.clear()
        got = marching_cubes_cells(cells, lambda c: cell_corner_values(vals, c), n, side_by_side=side_by_side,
                                   ways=2)
        assert all(torch.equal(a, b) for a, b in zip(ref, got)) and not seen


def test_marching_cubes_cells_numbers_vertices_canonically():
    """Vertex ids follow (owner cell in C order, owner's edge), centres last in cell order, and
    each edge vertex lies on the grid edge its key names: on a noisy grid of several 8^3 owner
    blocks whose surface crosses the grid's upper faces (owners moved down there), and with
    an owner missing across a block face reported rather than misread."""
    from lib.isosurface import tables

    g = torch.Generator().manual_seed(3)
    n = 21
    vals = torch.rand(n, n, n, generator=g) - 0.5
    cells, cv = _all_cells(vals)
    verts, faces, keys = marching_cubes_cells(cells, cv, n, chunk=500)
    edge = keys < 3 * n ** 3
    assert edge.sum() > 0 and (~edge).sum() > 0 and not edge[edge.sum():].any()  # centres after every edge vertex
    point, axis = keys[edge] // 3, keys[edge] % 3
    ijk = torch.stack((point // (n * n), point // n % n, point % n), 1)
    owner = ijk.clamp(max=n - 2)
    d = ijk - owner
    assert (d.sum(1) > 0).any()  # some owners moved down at the upper faces
    oedge = tables("cpu")["edge_by"][d[:, 0] + 2 * d[:, 1] + 4 * d[:, 2], axis]
    order = ((owner[:, 0] * n + owner[:, 1]) * n + owner[:, 2]) * 12 + oedge
    assert bool((order[1:] > order[:-1]).all())
    assert bool((keys[~edge][1:] > keys[~edge][:-1]).all())
    x = torch.linspace(-1, 1, n)
    on = torch.nn.functional.one_hot(axis, 3).bool()
    grid_xyz = x[ijk]
    assert torch.equal(verts[edge][~on], grid_xyz[~on])  # on the grid lines of its edge
    t = verts[edge][on] - grid_xyz[on]
    assert bool(((t >= 0) & (t <= 2 / (n - 1) + 1e-6)).all())
    # cells at i = 8 (a block's lower face) own edges of the crossing cells at i = 7 below them
    crossing = (cv > 0).any(1) & ~(cv > 0).all(1)
    assert (crossing & (cells[:, 0] == 7)).any()
    keep = crossing & (cells[:, 0] != 8)
    with pytest.raises(ValueError, match="owner"):
        marching_cubes_cells(cells[keep], cv[keep], n)


def test_warm_start_evaluates_little_more_than_the_mesh_needs():
    """A warm call evaluates each corner of the cells it visits once (this mesh's sign-changing
    cells and the previous ones) plus the sentinel lattice (and, where a sentinel edge's
    crossing is not among the stored values, a few points along it)."""
    _, _, st = extract(scene, 96, "sparse")
    s = 4 * 2  # the sentinel stride at N = 96: 4 x the default coarse stride 2
    sentinel = (-(-95 // s) + 1) ** 3
    v, f, st2 = extract(lambda p: scene(p * 1.01), 96, "sparse", state=st)
    vd, fd, _ = extract(lambda p: scene(p * 1.01), 96, "dense")
    assert st2.warm and torch.equal(v, vd) and torch.equal(f, fd)

    def corners(cells):
        c = (cells.unsqueeze(1) + torch.tensor(_CORNERS)).reshape(-1, 3)
        return torch.unique((c[:, 0] * 96 + c[:, 1]) * 96 + c[:, 2]).numel()

    visited = corners(torch.cat((st.cells, st2.cells)))
    assert visited + sentinel <= st2.evaluations <= visited + sentinel + 0.02 * corners(st2.cells)
    assert st2.evaluations < st.evaluations / 4  # the cold call's coarse pass is not repeated


_CORNERS = [(c & 1, (c >> 1) & 1, (c >> 2) & 1) for c in range(8)]


def test_warm_start_finds_a_new_blob_through_a_sentinel_edge_only():
    """A new piece far from the previous surface is found when it crosses a sentinel edge
    (here: it holds one sentinel point), and missed when it touches no sentinel edge: the
    sentinel lattice, not luck, is what finds it.  N = 64: sentinel stride 8 voxels."""
    n, h = 64, 2 / 63
    at = lambda i: -1 + i * h  # noqa: E731  world coordinate of grid index i
    old = sphere(0.3, (-0.4, 0.0, 0.0))
    _, _, st = extract(old, n, "sparse")
    cold = st.evaluations
    on = union(old, sphere(1.6 * h, (at(48), at(48), at(48))))  # around sentinel point (48, 48, 48)
    v, f, st2 = extract(on, n, "sparse", state=st)
    vd, fd, _ = extract(on, n, "dense")
    assert st2.warm and torch.equal(v, vd) and torch.equal(f, fd)
    assert (vd - at(48)).norm(dim=1).min() < 2 * h  # the blob is in the dense mesh
    assert st2.evaluations < cold / 2  # found by the warm call, not by a coarse pass
    # the same blob between sentinel lines (>= 5.6 voxels from any): no sentinel edge crosses it
    off = union(old, sphere(1.6 * h, (at(44), at(44), at(44))))
    v, f, st3 = extract(off, n, "sparse", state=st)
    vd, fd, _ = extract(off, n, "dense")
    assert st3.warm and v.shape[0] < vd.shape[0] and not same_mesh(v, f, vd, fd)[0]
    v, f, st4 = extract(off, n, "sparse", state=st, verify=True)  # verify catches it
    assert st4.verified is False and torch.equal(v, vd) and torch.equal(f, fd)


def test_corner_lookups_per_cell_match_the_lookups_of_every_corner():
    """The cell tracking's corner lookup (slots derived per cell, a step table for cells last
    in their block along some axes) gives the slots, values, evaluation batches and block
    allocation order of looking up each corner's key: cells at every position in a block
    (0..7 and across the next block) along every axis, in random order, on a stored subset."""
    n = 40
    calls = {"per cell": [], "per corner": []}

    def field(log):
        def f(p):
            log.append(p.clone())
            return p[:, 0] * 3 + p[:, 1] * 5 - p[:, 2] * 7 + 0.1
        return f

    grids = {k: _BlockGrid(field(calls[k]), n, n + 1, "cpu", 2 ** 14) for k in calls}
    r = torch.arange(3, 20)
    cells = torch.cartesian_prod(r, r, r)[torch.randperm(17 ** 3, generator=torch.Generator().manual_seed(0))]
    known = cells[:500] + 1  # some corners stored beforehand, in a few blocks
    for g in grids.values():
        g.store(known, g.field(known))
    corners = tables("cpu")["corner"]
    for part in cells.split(1000):
        got = grids["per cell"].corner_values_of(grids["per cell"].lin(part))
        want = grids["per corner"].values_of(grids["per corner"].lin(part.unsqueeze(1) + corners))
        assert torch.equal(got, want)
    a, b = grids["per cell"], grids["per corner"]
    key = a.lin(cells[:2000])
    assert torch.equal(a._corner_slots(key), b._slots((key.unsqueeze(1) + a.lin(corners)).view(-1), allocate=True))
    assert torch.equal(a.table, b.table) and a.rows == b.rows and a.evaluations == b.evaluations
    assert len(calls["per cell"]) == len(calls["per corner"])
    assert all(torch.equal(x, y) for x, y in zip(calls["per cell"], calls["per corner"]))


def test_sentinel_edges_are_completed_only_between_opposite_known_signs():
    """The warm start's sentinel check evaluates exactly the unknown runs between stored values
    of opposite signs and seeds every fine crossing: a plane x = x0 (between grid x = 18 and
    19) crosses the 81 sentinel edges x = 16 -> 24 (stride 8 at N = 64)."""
    n, s = 64, 8
    x0 = -1 + 18.5 * 2 / 63
    grid = _BlockGrid(lambda p: p[:, 0] - x0, n, n + 1, "cpu", 2 ** 14)
    ci = torch.arange(9) * s
    lattice = torch.cartesian_prod(ci, ci, ci)
    sv = grid.field(lattice).reshape(9, 9, 9)
    line = lambda j, k, xs: torch.tensor([[x, j, k] for x in xs])  # noqa: E731
    grid.store(line(0, 0, [17, 18, 19, 20]), grid.field(line(0, 0, [17, 18, 19, 20])))  # a tracked crossing
    grid.store(line(8, 0, [17]), grid.field(line(8, 0, [17])))  # inside, unknown beyond
    grid.evaluations = 0
    seeds = _sentinel_seeds(grid, sv, s)
    # 79 edges with all 7 inner points unknown, 6 (18..23) on the second edge, none on the first
    assert grid.evaluations == 79 * 7 + 6
    cells = {tuple(c) for c in seeds.tolist()}
    want = {(18, j - dj, k - dk) for j in range(0, 65, 8) for k in range(0, 65, 8) for dj in (0, 1) for dk in (0, 1)}
    assert cells == want  # the 4 cells around each fine crossing edge 18 -> 19, and nothing else


def test_warm_start_completes_a_sentinel_edge_between_stored_values():
    """The old surface crosses a sentinel edge twice (its crossings are stored values) and a
    new blob holds the edge's far end (a run of unknown points between a stored outside value
    and the inside end, completed; exact counts in the test above): the mesh equals dense."""
    n, h = 64, 2 / 63
    at = lambda i: -1 + i * h  # noqa: E731
    old = sphere(2.2 * h, (at(19), at(32), at(32)))  # on the edge (16, 32, 32) -> (24, 32, 32)
    _, _, st = extract(old, n, "sparse")
    new = union(sphere(2.2 * h, (at(19.2), at(32), at(32))), sphere(1.5 * h, (at(24), at(32), at(32.4))))
    v, f, st2 = extract(new, n, "sparse", state=st)
    vd, fd, _ = extract(new, n, "dense")
    assert st2.warm and torch.equal(v, vd) and torch.equal(f, fd)


@pytest.mark.slow
def test_sparse_equals_dense_at_512_on_an_analytic_field(tracking):
    vd, fd, _ = extract(scene, 512, "dense", chunk=2 ** 20)
    vs, fs, ss = extract(scene, 512, "sparse", chunk=2 ** 20)
    assert torch.equal(vd, vs) and torch.equal(fd, fs) and ss.tracking == tracking + "s"
    assert ss.evaluations < 512 ** 3 / (50 if tracking == "cell" else 15)


def test_marching_cubes_level_and_welded_closed_output():
    vals = grid_of(sphere(0.5), 40)
    v, f = marching_cubes(vals, level=0.1)  # the 0.6 sphere
    vs, fs = skimage_mc(vals, level=0.1)
    assert (v.norm(dim=1) - 0.6).abs().max() < 0.01 and v.shape == vs.shape and closed_manifold(f)
    assert torch.unique(v, dim=0).shape[0] == v.shape[0]  # welded: no duplicate vertices


def _fast_reference(fn, n, steps):
    """The fast heuristic by its definition, on a full grid: each call re-evaluates the voxel of
    every previous vertex and its 6 neighbours, then meshes the whole grid; stale vertices use a
    value not re-evaluated, missed ones no longer cross once their stale ends are re-evaluated.
    Yields (verts, faces, evaluations, stale, missed) per field of ``steps``."""
    from lib.ops.marching_cubes import cell_corner_values, crossing_cells

    pts = grid_points(n)
    values = fn(steps[0], pts).reshape(-1)
    cells = crossing_cells(values.reshape(n, n, n))
    v, f, keys = marching_cubes_cells(cells, cell_corner_values(values, cells), n)
    yield v, f, n ** 3, 0, 0
    for s in steps[1:]:
        lin = torch.where(keys < 3 * n ** 3, keys // 3, (keys - 3 * n ** 3) // 4)
        ijk = torch.stack((lin // (n * n), (lin // n) % n, lin % n), 1)
        offsets = torch.tensor([[0, 0, 0], [1, 0, 0], [-1, 0, 0], [0, 1, 0], [0, -1, 0], [0, 0, 1], [0, 0, -1]])
        nb = (ijk.unsqueeze(1) + offsets).reshape(-1, 3)
        nb = nb[((nb >= 0) & (nb < n)).all(1)]
        fresh = torch.zeros(n ** 3, dtype=torch.bool)
        fresh[(nb[:, 0] * n + nb[:, 1]) * n + nb[:, 2]] = True
        values[fresh] = fn(s, pts[fresh]).reshape(-1)
        cells = crossing_cells(values.reshape(n, n, n))
        v, f, keys = marching_cubes_cells(cells, cell_corner_values(values, cells), n)
        k = keys[keys < 3 * n ** 3]
        lo = k // 3
        hi = lo + torch.tensor([n * n, n, 1])[k % 3]
        stale = ~fresh[lo] | ~fresh[hi]
        true = fn(s, pts).reshape(-1)
        now = torch.where(fresh, values, true)
        missed = ((now[lo] > 0) == (now[hi] > 0)) & stale
        ends = torch.unique(torch.cat((lo[stale], hi[stale])))
        yield v, f, int(fresh.sum()) + int((~fresh[ends]).sum()), int(stale.sum()), int(missed.sum())


@pytest.mark.parametrize("size", [0, 5, 64, 40 ** 3, 41 ** 3])
def test_marked_finds_the_true_entries_in_order(size):
    """The fast refresh's scan of its mask (8 marks per word, then the nonzero words) finds
    exactly the True entries, sorted: clustered and scattered marks, a tail that is not a
    whole word, a mask that starts inside a word, all marks, none."""
    from lib.isosurface.dense import _marked
    g = torch.Generator().manual_seed(size)
    for marks in (torch.rand(size, generator=g) < 0.01, torch.rand(size, generator=g) < 0.7,
                  torch.ones(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)):
        marks[size // 3 : size // 3 + 17] = True  # a run across words
        for m in (marks, marks[3:]):
            assert torch.equal(_marked(m), m.nonzero().squeeze(1))


@pytest.mark.parametrize("size", [0, 1, 4096, 5000, 2 ** 15 - 1, 2 ** 15, 70000])
def test_tracking_sort_and_nonzero_helpers_are_torch_s(size):
    """The sparse tracking's CPU sort and nonzero (numpy's, by torch's definition): flat_nonzero
    (lib.ops, the renderers' too) is ``nonzero`` of a 1-D mask (sparse, half, all, none; a strided view), _distinct is
    ``torch.unique`` of repeated keys, _sort_distinct ``torch.sort`` of distinct keys (values
    and where each came from), int32 and int64, at sizes on both sides of torch's radix sort."""
    g = torch.Generator().manual_seed(size)
    for marks in (torch.rand(size, generator=g) < 0.05, torch.rand(size, generator=g) < 0.5,
                  torch.ones(size, dtype=torch.bool), torch.zeros(size, dtype=torch.bool)):
        for m in (marks, marks[1::2]):
            got = flat_nonzero(m)
            assert got.dtype == torch.int64 and torch.equal(got, m.nonzero().squeeze(1))
    for dtype in (torch.int32, torch.int64):
        keys = torch.randint(0, max(1, size // 3), (size,), generator=g, dtype=dtype)  # repeats
        assert torch.equal(sparse_module._distinct(keys), torch.unique(keys))
        distinct = torch.randperm(4 * size + 1, generator=g)[:size].to(dtype) * 7 - 3 * size
        values, order = sparse_module._sort_distinct(distinct)
        want = torch.sort(distinct)
        assert torch.equal(values, want.values) and torch.equal(order, want.indices) and order.dtype == torch.int64


@pytest.mark.parametrize("keep", [True, False])
def test_cell_tracking_frees_the_pool_when_it_keeps_the_corner_values(monkeypatch, keep):
    """The cell tracking hands the mesher the corner values of its cells and frees the block
    pool (nothing reads it any more), or, past KEEP_CORNERS cells, keeps the pool's used rows
    for the mesher's look-ups; the mesh is the dense one either way."""
    from lib.isosurface.sparse import _sparse

    monkeypatch.setattr(sparse_module, "BLOCK_COST_RATIO", 0.0)  # the cell tracking
    if not keep:
        monkeypatch.setattr(sparse_module, "KEEP_CORNERS", 100)
    grid, cells, corners = _sparse(scene, 96, torch.device("cpu"), 2 ** 14, 4, 1.5, None, 64)
    assert (corners is not None) == keep
    assert grid.pool.numel() == (0 if keep else grid.rows * grid.B3) and grid.rows > 0
    values = corners if keep else grid.corner_values(cells)
    dense = grid_of(scene, 96)
    idx = cells.unsqueeze(1) + tables(cells.device)["corner"]
    assert torch.equal(values, dense[idx[..., 0], idx[..., 1], idx[..., 2]])
    vs, fs, _ = extract(scene, 96, "sparse")
    vd, fd, _ = extract(scene, 96, "dense")
    assert torch.equal(vs, vd) and torch.equal(fs, fd)


def test_repeated_sparse_extractions_reuse_their_freed_memory():
    """Sparse extractions in a row on the CPU page-fault little: extract lets malloc keep the
    blocks it frees (lib.runtime.cpus.keep_freed_memory), so the tracking's and the marching
    cubes' MB-sized transients are reused, not faulted in and zeroed again every pass (without
    it: thousands of faults a call at N = 128).  In a fresh process, since the setting is the
    process's and other tests may have made it."""
    import os
    import platform
    import subprocess
    import sys
    import textwrap
    from pathlib import Path

    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    root = Path(__file__).resolve().parents[1]
    code = textwrap.dedent("""
        import torch
        from fields import torus
        from page_faults import least_page_faults
        from lib.isosurface import extract
        torch.set_num_threads(2)
        print(least_page_faults(lambda: extract(torus(0.5, 0.2), 128, "sparse"), rounds=3))
    """)
    env = {**os.environ, "PYTHONPATH": f"{root}:{root / 'tests'}", "MESHSDF_QUIET": "1"}
    out = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, check=True)
    assert int(out.stdout.split()[-1]) < 1000  # the fewest faults of three calls in a row


def test_fast_refresh_marks_each_vertex_voxel_and_its_neighbours_on_the_grid():
    """The fast refresh re-evaluates exactly each previous vertex's voxel (the lower end of its
    edge; a cell centre's lower corner) and its 6 neighbours that lie on the grid, at the
    grid's corners, edges and faces too, and reports the points whose sign changed."""
    from lib.isosurface.dense import _refresh_fast
    from lib.isosurface.state import ExtractionState
    n = 7
    g = torch.Generator().manual_seed(3)
    corners = torch.tensor([[i, j, k] for i in (0, n - 1) for j in (0, n - 1) for k in (0, n - 1)])
    voxels = torch.cat((corners, torch.randint(0, n, (12, 3), generator=g)))
    lin = (voxels[:, 0] * n + voxels[:, 1]) * n + voxels[:, 2]
    half = lin.numel() // 2
    keys = torch.cat((3 * lin[:half] + torch.randint(0, 3, (half,), generator=g),  # edge vertices
                      3 * n ** 3 + 4 * lin[half:] + torch.randint(0, 4, (lin.numel() - half,), generator=g)))
    want = set()
    for i, j, k in voxels.tolist():
        for di, dj, dk in ((0, 0, 0), (1, 0, 0), (-1, 0, 0), (0, 1, 0), (0, -1, 0), (0, 0, 1), (0, 0, -1)):
            a, b, c = i + di, j + dj, k + dk
            if 0 <= a < n and 0 <= b < n and 0 <= c < n:
                want.add((a * n + b) * n + c)
    values = torch.full((n ** 3,), -1.0)
    state = ExtractionState(resolution=n, mode="fast", grid_size=n, values=values, full=True,
                            verts=torch.zeros(0, 3), faces=torch.zeros(0, 3, dtype=torch.int64), keys=keys,
                            cells=torch.zeros(0, 3, dtype=torch.int64))
    marks = torch.zeros(n ** 3, dtype=torch.bool)
    field = lambda p: p[:, 0] + 0.5  # noqa: E731  (positive for x > -0.5)
    grid, fresh, flipped = _refresh_fast(field, state, 5, marks)
    assert fresh.tolist() == sorted(want)
    assert marks.nonzero().squeeze(1).tolist() == sorted(want)
    refreshed = torch.zeros(n ** 3, dtype=torch.bool)
    refreshed[fresh] = True
    pts = grid_points(n)
    assert torch.equal(grid.values[refreshed], field(pts[refreshed]))
    assert torch.equal(grid.values[~refreshed], torch.full(((~refreshed).sum(),), -1.0))
    assert flipped.tolist() == [p for p in sorted(want) if field(pts[p:p + 1])[0] > 0]


def test_fast_mode_is_its_definition_on_the_full_grid():
    """extract's fast mode (it touches only the refreshed band and the previous cells) gives,
    call after call, the mesh, evaluations and stale / missed counts of the heuristic computed
    on the whole grid: small moves, a move out of the band, a piece appearing and one vanishing."""
    def fn(s, p):
        kind, t = s
        if kind == "scene":
            return scene(p + torch.tensor([0.004 * t, -0.003 * t, 0.002 * t]))
        return union(torus(0.5, 0.15 + 0.01 * t), sphere(0.02 * t, (-0.6, 0.6, -0.5)))(p)

    n = 40
    steps = [("scene", 0), ("scene", 1), ("scene", 2), ("scene", 12), ("scene", 13),
             ("grow", 0), ("grow", 3), ("grow", 6), ("grow", 1)]
    st, seen = None, []
    for s, (rv, rf, evaluations, stale, missed) in zip(steps, _fast_reference(fn, n, steps)):
        v, f, st = extract(lambda p, s=s: fn(s, p), n, "fast", state=st)
        assert torch.equal(f, rf) and torch.equal(v, rv), s
        assert (st.evaluations, st.stale_vertices, st.missed_vertices) == (evaluations, stale, missed), s
        seen.append(missed)
    assert max(seen) > 0      # the surface left the band at least once: stale cells were meshed


def _moving(kind):
    """A field reading a parameter tensor that the caller changes in place (as an optimiser
    changes a latent code), and its ``freeze``: the same field on a copy of the parameter."""
    theta = torch.zeros(4)

    def at(th):
        def fn(p):
            if kind == "scene":
                return scene(p + th[:3])
            if kind == "cut":  # a tilted plane through the box's faces and edges, and a ball
                plane = lambda q: (q * torch.tensor([0.8, -0.5, 0.33])).sum(1) - 0.1 - th[0]  # noqa: E731
                return union(plane, sphere(0.3 + th[1], (0.5, 0.5, -0.4)))(p + th[:3])
            # a sphere, a rod thinner than 2 voxels beside it and a small ball appearing
            rod = (p[:, :2] - torch.tensor([0.7, -0.6]) - th[:2]).norm(dim=1) - 0.03
            return union(union(sphere(0.4 + th[2]), lambda q: rod), sphere(0.02 * th[3], (-0.6, 0.6, -0.5)))(p)
        return fn

    return theta, at(theta), lambda: at(theta.clone())


@pytest.mark.parametrize("kind", ["scene", "thin", "cut"])
def test_fast_mode_from_the_band_is_the_dense_start(kind):
    """The fast mode started from the band (freeze=) gives, call after call, the meshes and
    stale / missed counts of the dense start: small moves, moves past the refreshed band
    (unevaluated points read, evaluated with the first field), a piece appearing, a surface
    through the box's faces (the signs off the band counted from the box's corner)."""
    n = 48
    theta, fn, freeze = _moving(kind)
    moves = [(0.004, -0.003, 0.002, 0)] * 3 + [(0.03, 0.02, -0.02, 0)] + [(0.004, 0.003, 0.001, 3)] * 4 \
        + [(-0.05, 0.04, 0.03, 6)] + [(0.002, 0.0, -0.001, 1)] * 3
    vd, fd, sd = extract(fn, n, "fast")
    vb, fb, sb = extract(fn, n, "fast", freeze=freeze)
    assert sb.origin is not None and torch.isinf(sb.values).any()   # signs only, off the band
    assert torch.equal(vd, vb) and torch.equal(fd, fb)
    lazy, missed = 0, 0
    for i, (dx, dy, dz, grow) in enumerate(moves):
        theta[:3] += torch.tensor([dx, dy, dz])
        theta[3] = grow
        vd, fd, sd = extract(fn, n, "fast", state=sd)
        vb, fb, sb = extract(fn, n, "fast", state=sb, freeze=freeze)
        assert torch.equal(fd, fb) and torch.equal(vd, vb), i
        assert (sd.stale_vertices, sd.missed_vertices) == (sb.stale_vertices, sb.missed_vertices), i
        finite = torch.isfinite(sb.values)
        assert torch.equal(sb.values[finite], sd.values[finite])
        assert torch.equal(sb.values[~finite] > 0, sd.values[~finite] > 0)
        lazy += sb.evaluations - sd.evaluations
        missed += sd.missed_vertices
    assert lazy > 0 and missed > 0   # unevaluated points were read, and the surface left the band


def test_fast_refresh_stages_carry_their_profiler_labels():
    """A fast call's refresh, its field evaluations, the cell update and the stale check each appear
    once under their labels (the SVR step's profile reads them); the refresh holds the evaluations."""
    from torch.profiler import profile

    _, _, st = extract(sphere(0.5), 32, "fast")
    with profile() as prof:
        extract(sphere(0.52), 32, "fast", state=st)
    counts = {e.key: e.count for e in prof.key_averages() if e.key.startswith("isosurface.")}
    assert counts == {"isosurface.refresh": 1, "isosurface.field": 1, "isosurface.update_cells": 1,
                      "isosurface.check_fast": 1}
    events = {e.name: e for e in prof.events() if e.name.startswith("isosurface.")}
    refresh, field = events["isosurface.refresh"].time_range, events["isosurface.field"].time_range
    assert refresh.start <= field.start and field.end <= refresh.end


@pytest.mark.parametrize("mode", ["sparse", "dense"])
def test_extract_under_inference_mode_gives_the_same_mesh(mode):
    """A caller in ``torch.inference_mode`` (e.g. meshing a trained model for display) gets the
    mesh it gets outside it: the side-by-side passes run their tasks in the caller's mode."""
    torch.set_num_threads(2)
    v, f, _ = extract(scene, 128, mode)
    with torch.inference_mode():
        vi, fi, _ = extract(scene, 128, mode)
    assert torch.equal(v, vi) and torch.equal(f, fi)
