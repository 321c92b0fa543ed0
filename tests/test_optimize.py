"""lib.optimize on analytic SDFs: convergence, gradients vs finite differences, modes,
callbacks, the final evaluation, a vanishing surface, losses and topology."""
import pytest
import torch
from torch import nn

from lib.errors import MeshSDFError
from lib.isosurface import extract
from lib.metrics import topology
from lib.optimize import CodeAdam, LatentOptimizer, SilhouetteLoss, SurfaceLostError, demo_sigma, optimize
from lib.render import look_at, silhouette

from fields import LatentSphere, LatentTorus

SIZE = 64


class WithWeight(LatentSphere):
    """A decoder with a parameter, to check that it is frozen."""

    def __init__(self):
        super().__init__()
        self.w = nn.Parameter(torch.ones(()))

    def forward(self, inp):
        return self.w * super().forward(inp)


def camera():
    return look_at(45.0, 30.0, 2.5, image_size=SIZE)


def sphere_target(radius, resolution=24):
    v, f, _ = extract(lambda p: p.norm(dim=1) - radius, resolution, "dense")
    return silhouette(v, f, camera(), sigma=demo_sigma(SIZE))


def test_callbacks_run_in_the_steps_one_thread_section():
    """Per-step metrics (callbacks) are small elementwise work like the step's own: they run in
    its elementwise section (one intra-op thread where idle OpenMP threads sleep), not on a
    team that every pass must wake."""
    from lib.runtime import cpus

    if not cpus.openmp_threads_sleep():
        pytest.skip("OpenMP threads busy-wait here: the section changes nothing")
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        seen = []
        opt = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), SilhouetteLoss(camera(), sphere_target(0.5)),
                              lr=0.02, resolution=16)
        optimize(opt, 2, callbacks=[lambda it: seen.append(torch.get_num_threads())],
                 final_callbacks=[lambda it: seen.append(torch.get_num_threads())], show_progress=False)
        assert seen == [1, 1, 1] and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)


def test_converges_to_target_radius():
    loss_fn = SilhouetteLoss(camera(), sphere_target(0.5))
    opt = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), loss_fn, lr=0.02, resolution=24)
    run = optimize(opt, 30)
    assert run.stopped == "" and len(run.history) == 30
    losses = [r["loss"] for r in run.history]
    assert run.final.loss < 0.05 * losses[0]
    assert abs(float(run.latent[0]) - 0.5) < 0.02
    # the step counter and the record layout
    assert opt.iteration == 30 and [r["iteration"] for r in run.history] == list(range(30))
    assert {"loss", "genus", "euler", "components", "seconds", "vertices", "faces"} <= set(run.history[0])


def _loss_at(radius, loss_fn, resolution):
    opt = LatentOptimizer(LatentSphere(), torch.tensor([radius]), loss_fn, resolution=resolution, mode="dense")
    return opt.evaluate().loss


@pytest.mark.parametrize("gradient", ["paper", "exact"])
def test_code_gradient_matches_finite_difference(gradient):
    """For an exact distance field both rules equal d loss / d r of the re-extracted mesh."""
    loss_fn = SilhouetteLoss(camera(), sphere_target(0.55))
    opt = LatentOptimizer(LatentSphere(), torch.tensor([0.4]), loss_fn, lr=1e-9, resolution=32, gradient=gradient)
    opt.step()
    g = float(opt.latent.grad[0])
    h = 2e-3
    fd = (_loss_at(0.4 + h, loss_fn, 32) - _loss_at(0.4 - h, loss_fn, 32)) / (2 * h)
    assert g < 0 and fd < 0  # growing the sphere towards the target lowers the loss
    assert g == pytest.approx(fd, rel=0.1)


def test_modes_agree_along_an_optimisation_path():
    """Dense, sparse and fast optimisers in lockstep for 6 steps (each mode keeps its own
    state from step to step).  Sparse is exact: the same mesh, loss and code at every step.
    Fast reuses its previous grid after step 0 (fewer SDF evaluations than dense) and, with
    the surface moving well under a voxel per step, finds dense's cells with vertices
    within a tenth of a voxel (grid values outside its refreshed band are stale)."""
    loss_fn = SilhouetteLoss(camera(), sphere_target(0.5), loss="l1")
    opts = {m: LatentOptimizer(LatentSphere(), torch.tensor([0.35]), loss_fn, lr=0.01, resolution=24, mode=m)
            for m in ("dense", "sparse", "fast")}
    for step in range(6):
        its = {m: o.step() for m, o in opts.items()}
        d = its["dense"]
        s = its["sparse"]
        assert torch.equal(s.faces, d.faces) and torch.allclose(s.verts, d.verts, atol=1e-6), step
        assert s.loss == pytest.approx(d.loss, rel=1e-6)
        # fast: the same cells, vertices within a tenth of a voxel (its stale values elsewhere)
        f = its["fast"]
        assert torch.equal(f.faces, d.faces), step
        assert float((f.verts - d.verts).abs().max()) < 0.1 * 2 / 23
        assert f.loss == pytest.approx(d.loss, rel=2e-2)
        assert torch.equal(opts["sparse"].latent, opts["dense"].latent)
        if step > 0:
            assert its["fast"].state.evaluations < d.state.evaluations / 2
    assert float(opts["dense"].latent.detach()[0]) > 0.39                     # the path did move the surface


def test_fast_mode_starts_from_the_band_with_the_dense_start_results():
    """The fast optimiser starts from the band by default (the layer freezes the DeepSDF field:
    the code cloned, since Adam changes it in place): the same meshes, losses and codes as the
    dense start (``freeze=None``), step after step, with far fewer evaluations at step 0."""
    loss_fn = SilhouetteLoss(camera(), sphere_target(0.5), loss="l1")
    band = LatentOptimizer(LatentTorus(), torch.tensor([0.45, 0.12]), loss_fn, lr=0.01, resolution=64, mode="fast")
    dense = LatentOptimizer(LatentTorus(), torch.tensor([0.45, 0.12]), loss_fn, lr=0.01, resolution=64, mode="fast",
                            freeze=None)
    for step in range(8):
        b, d = band.step(), dense.step()
        assert torch.equal(b.faces, d.faces) and torch.equal(b.verts, d.verts), step
        assert b.loss == d.loss and torch.equal(band.latent, dense.latent), step
        assert band.state.stale_vertices == dense.state.stale_vertices, step
        if step == 0:
            assert band.state.origin is not None and dense.state.origin is None
            assert band.state.evaluations < dense.state.evaluations / 2
    assert not torch.equal(band.latent, torch.tensor([0.45, 0.12]))


def test_code_adam_is_torch_adam():
    """CodeAdam (no torch.optim, no compiler import) makes torch.optim.Adam's steps bit for bit."""
    g = torch.Generator().manual_seed(0)
    grads = [torch.randn(5, generator=g) * 10 ** float(k % 3 - 1) for k in range(25)]
    a = torch.randn(5, generator=g).requires_grad_(True)
    b = a.detach().clone().requires_grad_(True)
    ours, ref = CodeAdam(a, lr=5e-2), torch.optim.Adam([b], lr=5e-2)
    for gr in grads:
        a.grad, b.grad = gr.clone(), gr.clone()
        ours.step()
        ref.step()
        assert torch.equal(a, b)
    ours.zero_grad()
    assert a.grad is None


def test_callbacks_final_and_latent_bookkeeping():
    loss_fn = SilhouetteLoss(camera(), sphere_target(0.5))
    opt = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), loss_fn, lr=0.05, resolution=20)
    seen, finals = [], []

    def cb(it):
        seen.append((it.iteration, float(it.latent[0]), it.dl_ds.shape[0] == it.verts.shape[0]))
        return {"radius": float(it.latent[0])}

    run = optimize(opt, 3, callbacks=[cb], final_callbacks=[finals.append], show_progress=False)
    assert [s[0] for s in seen] == [0, 1, 2] and all(s[2] for s in seen)
    assert seen[0][1] == pytest.approx(0.3)            # iteration i sees the code before its update
    assert seen[1][1] == pytest.approx(0.35, abs=1e-4)  # Adam's first step is lr in size
    assert [r["radius"] for r in run.history] == [s[1] for s in seen]
    assert finals == [run.final] and run.final.iteration == -1 and run.final.dl_ds is None
    assert float(run.final.latent[0]) == pytest.approx(float(run.latent[0]))
    assert run.final.loss == pytest.approx(_loss_at(float(run.latent[0]), loss_fn, 20), rel=1e-5)


def test_nr_iterations_carry_the_visible_faces_of_their_own_mesh():
    """The demo draws each movie frame from ``Iteration.face_idx`` instead of a second
    z-buffer: it must be the face index of that iteration's mesh (not the previous one's), and
    a frame drawn from it must equal one rasterised afresh.  The soft renderer has none."""
    from lib.render import face_index
    from lib.visualize import movie_frame

    hard = SilhouetteLoss(camera(), sphere_target(0.5), renderer="nr")
    opt = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), hard, lr=0.05, resolution=20)
    for _ in range(3):
        it = opt.step()
        assert torch.equal(it.face_idx, face_index(it.verts, it.faces, camera()))
        assert torch.equal(it.image, (it.face_idx >= 0).float())
        colors = torch.rand(it.faces.shape[0], 3)
        assert torch.equal(movie_frame(it.verts, it.faces, colors, camera(), face_idx=it.face_idx),
                           movie_frame(it.verts, it.faces, colors, camera()))
    soft = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), SilhouetteLoss(camera(), sphere_target(0.5)),
                           resolution=20)
    assert soft.step().face_idx is None


def test_decoder_is_frozen_and_input_code_untouched():
    dec = WithWeight()
    code = torch.tensor([0.3])
    opt = LatentOptimizer(dec, code, SilhouetteLoss(camera(), sphere_target(0.5)), resolution=16)
    opt.step()
    assert not dec.w.requires_grad and dec.w.grad is None and not dec.training
    assert float(code[0]) == pytest.approx(0.3) and float(opt.latent.detach()[0]) != pytest.approx(0.3)


def test_vanishing_surface_stops_with_history():
    empty = torch.zeros(SIZE, SIZE)
    opt = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), SilhouetteLoss(camera(), empty), lr=0.2, resolution=16)
    run = optimize(opt, 20)
    assert run.stopped and "vanished" in run.stopped and run.final is None
    assert 1 <= len(run.history) < 20
    assert all(r["loss"] > 0 for r in run.history)
    with pytest.raises(SurfaceLostError, match="no surface"):
        opt.step()
    assert isinstance(SurfaceLostError("x"), MeshSDFError)


def test_silhouette_loss_values():
    cam = camera()
    target = torch.rand(SIZE, SIZE, generator=torch.Generator().manual_seed(0))
    v, f, _ = extract(lambda p: p.norm(dim=1) - 0.5, 16, "dense")
    mse, img = SilhouetteLoss(cam, target)(v, f)
    l1, _ = SilhouetteLoss(cam, target, loss="l1")(v, f)
    assert float(mse) == pytest.approx(float((img - target).square().mean()), rel=1e-6)
    assert float(l1) == pytest.approx(float((img - target).abs().mean()), rel=1e-6)
    assert SilhouetteLoss(cam, target).sigma == pytest.approx(1e-5 * (512 / SIZE) ** 2)
    with pytest.raises(MeshSDFError, match="mse, l1"):
        SilhouetteLoss(cam, target, loss="l2")
    with pytest.raises(ValueError, match="camera renders"):
        SilhouetteLoss(cam, torch.zeros(10, 10))


def test_bad_settings():
    loss_fn = SilhouetteLoss(camera(), torch.zeros(SIZE, SIZE))
    with pytest.raises(MeshSDFError, match="soft, nr"):
        SilhouetteLoss(camera(), torch.zeros(SIZE, SIZE), renderer="opengl")
    for kw, msg in (({"mode": "quick"}, "dense, fast, sparse"), ({"gradient": "x"}, "paper, exact"),
                    ({"lr": 0.0}, "learning rate")):
        with pytest.raises(MeshSDFError, match=msg):
            LatentOptimizer(LatentSphere(), torch.tensor([0.3]), loss_fn, **kw)


def test_topology_counts():
    v, f, _ = extract(lambda p: LatentTorus()(torch.cat([torch.tensor([[0.5, 0.2]]).expand(len(p), 2), p], 1))[:, 0],
                      32, "dense")
    assert topology(f) == (0, 1, 1)
    v, f, _ = extract(lambda p: torch.minimum((p - 0.5).norm(dim=1) - 0.2, (p + 0.5).norm(dim=1) - 0.2), 32, "dense")
    assert topology(f) == (4, 2, 0)
    assert topology(torch.zeros(0, 3, dtype=torch.int64)) == (0, 0, 0)


def test_topology_is_computed_in_the_step_when_tracked_and_only_on_read_otherwise():
    """track_topology=True (the demo): every record has the torus's genus 1, computed within the
    step; False (the SVR): no record holds it and no step computes it, yet a callback that
    reads ``it.genus`` gets the same values as the tracked run, the same meshes otherwise."""
    from torch.profiler import profile

    loss_fn = SilhouetteLoss(camera(), sphere_target(0.5))
    runs, labels, read = {}, {}, []
    for track in (True, False):
        opt = LatentOptimizer(LatentTorus(), torch.tensor([0.5, 0.2]), loss_fn, lr=0.01, resolution=24,
                              track_topology=track)
        with profile() as prof:
            runs[track] = optimize(opt, 3, show_progress=False)
        labels[track] = sum(e.count for e in prof.key_averages() if e.key == "optimize.topology")
        if not track:
            run = optimize(opt, 1, callbacks=[lambda it: read.append((it.euler, it.components, it.genus))],
                           final=False, show_progress=False)
            assert "genus" not in run.history[0]
    tracked, lazy = runs[True].history, runs[False].history
    assert [(r["euler"], r["components"], r["genus"]) for r in tracked] == [(0, 1, 1)] * 3
    assert labels[True] == 4                      # 3 steps and the final evaluation, each once
    assert labels[False] == 0 and not {"genus", "euler", "components"} & set(lazy[0])
    assert [r["faces"] for r in lazy] == [r["faces"] for r in tracked]
    assert read == [(0, 1, 1)] and runs[False].final.genus == 1
    assert {k: v for k, v in tracked[0].items() if k not in ("genus", "euler", "components", "seconds")} == \
        {k: v for k, v in lazy[0].items() if k != "seconds"}


def test_a_loss_or_surface_bad_before_any_update_does_not_blame_the_learning_rate():
    """At iteration 0 no update has happened: a non-finite loss names the loss's weights (e.g.
    --regularize), a missing surface the starting code; neither says to lower the learning rate."""
    target = sphere_target(0.5)

    def infinite(verts, faces):
        loss, image = SilhouetteLoss(camera(), target)(verts, faces)
        return loss * float("inf"), image

    opt = LatentOptimizer(LatentSphere(), torch.tensor([0.3]), infinite, lr=0.05, resolution=16)
    with pytest.raises(MeshSDFError, match="at the first iteration, before any update") as err:
        opt.step()
    assert "learning rate" not in str(err.value)
    opt = LatentOptimizer(LatentSphere(), torch.tensor([-0.3]), SilhouetteLoss(camera(), target), lr=0.05,
                          resolution=16)
    with pytest.raises(SurfaceLostError, match="the starting code has no surface") as err:
        opt.step()
    assert "learning rate" not in str(err.value)
