"""The frozen-decoder inference kernels (lib.models.kernels.inference) and their use by lib.layer.sdf.

The kernels must compute Decoder.forward's function in eval mode (values) and the
gradient of sum_p s_p w.r.t. each input row (codes and xyz): checked against the decoder
and autograd for several architectures, against finite differences in float64, and
through the mesh layer against the autograd path it replaces (``mesh_from_sdf(..., kernel=False)``).
"""
from pathlib import Path

import pytest
import torch

from lib.layer.sdf import _CodeField, mesh_from_sdf
from lib.models.decoder import Decoder
from lib.models.kernels.inference import InferenceKernel, values, values_and_input_grad
from page_faults import least_page_faults

REPO = Path(__file__).resolve().parents[1]
EXP = REPO / "experiments" / "bob_and_spot"

CONFIGS = {
    # bob_and_spot's form, narrower: weight norm everywhere, latent_in, Fourier features
    "deepsdf_pe": dict(dims=[40] * 6, norm_layers=list(range(6)), latent_in=[3], weight_norm=True,
                       positional_encoding=True, fourier_degree=3, dropout=list(range(6)), dropout_prob=0.2),
    "xyz_in_all_tanh": dict(dims=[24] * 4, latent_in=[2], xyz_in_all=True, use_tanh=True),
    "two_latent_in_pe_xyz_in_all": dict(dims=[40] * 3, latent_in=[1, 2], xyz_in_all=True, positional_encoding=True,
                                        fourier_degree=2, norm_layers=[0, 2], weight_norm=True),
    "plain": dict(dims=[16, 16]),
}


def _decoder(name, latent=3, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    dec = Decoder(latent, **CONFIGS[name]).to(dtype).eval()
    with torch.no_grad():  # larger weights than the init, so that ReLUs switch and tanh bends
        for p in dec.parameters():
            p.mul_(1.5)
    return dec


def _reference(dec, codes, xyz, index):
    """Decoder.forward on [codes[index] | xyz] and the autograd gradient of the sum w.r.t. the rows."""
    rows = torch.cat((codes[index], xyz), 1).requires_grad_(True)
    out = dec(rows).reshape(-1)
    (g,) = torch.autograd.grad(out.sum(), rows)
    L = codes.shape[1]
    return out.detach(), g[:, :L], g[:, L:]


@pytest.mark.parametrize("name", list(CONFIGS))
def test_values_and_input_grads_equal_the_decoder_and_autograd(name, gemm):
    dec = _decoder(name)
    kernel = InferenceKernel(dec)
    gen = torch.Generator().manual_seed(1)
    codes = torch.randn(3, 3, generator=gen)
    xyz = torch.rand(151, 3, generator=gen) * 2 - 1
    index = torch.randint(0, 3, (151,), generator=gen)
    want, want_code, want_xyz = _reference(dec, codes, xyz, index)
    assert want_code.abs().max() > 1e-2 and want_xyz.abs().max() > 1e-2  # a function that depends on both
    prep = kernel.prepare(codes)
    for rows in (64, 4096):  # 151 rows: chunks of 51, 51 and 49 (a shorter last one), and one chunk
        got = values(prep, xyz, index, rows=rows)
        torch.testing.assert_close(got, want, rtol=0, atol=2e-6)
        v, g_code, g_xyz = values_and_input_grad(prep, xyz, index, rows=rows)
        torch.testing.assert_close(v, want, rtol=0, atol=2e-6)
        torch.testing.assert_close(g_code, want_code, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g_xyz, want_xyz, rtol=1e-5, atol=1e-6)
    # one code: index None means code 0 for every row
    one = codes[:1]
    want1, want1_code, want1_xyz = _reference(dec, one, xyz, torch.zeros(151, dtype=torch.int64))
    torch.testing.assert_close(kernel.values(one, xyz), want1, rtol=0, atol=2e-6)
    _, g1_code, g1_xyz = kernel.values_and_input_grad(one, xyz)
    torch.testing.assert_close(g1_code, want1_code, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(g1_xyz, want1_xyz, rtol=1e-5, atol=1e-6)


def test_halves_side_by_side_give_the_same_bits_and_the_reference(monkeypatch, gemm):
    """From ``side_by_side`` rows (here 100) the chunks run as two halves side by
    side (2 threads, sleeping OpenMP threads): the values and input gradients are bit for bit
    those of the same chunks in order, and the decoder's; with busy-waiting threads the
    rows are not split."""
    import threading

    import lib.models.kernels.inference as inference
    from lib import runtime
    dec = _decoder(next(iter(CONFIGS)))
    gen = torch.Generator().manual_seed(2)
    codes = torch.randn(2, 3, generator=gen)
    xyz = torch.rand(451, 3, generator=gen) * 2 - 1
    index = torch.randint(0, 2, (451,), generator=gen)
    prep = InferenceKernel(dec).prepare(codes)
    want = _reference(dec, codes, xyz, index)
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    assert inference._plan(451, 64, "cpu", 100) == (57, [(0, 228), (228, 451)])  # 8 chunks, 4 + 4
    assert inference._plan(451, 64, "cpu") == (57, [(0, 451)])                 # below the default: not split
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert inference._plan(451, 64, "cpu", 100) == (57, [(0, 451)])            # busy-waiting threads: not split
    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    seen = set()
    real = inference._chunks

    def spy(*a, **k):
        seen.add(threading.get_ident())
        return real(*a, **k)
    monkeypatch.setattr(inference, "_chunks", spy)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        out = {}
        for side_by_side in (True, False):
            with runtime.thread_settings(concurrent=side_by_side):
                out[side_by_side] = (values(prep, xyz, index, rows=64, side_by_side=100),
                                     *values_and_input_grad(prep, xyz, index, rows=64, side_by_side=100))
    finally:
        torch.set_num_threads(old)
    # the halves ran on two threads at once (the pool may hold more workers, left by other tests)
    assert len(seen) >= 2 and threading.get_ident() in seen
    for a, b in zip(out[True], out[False]):
        assert torch.equal(a, b)
    torch.testing.assert_close(out[True][0], want[0], rtol=0, atol=2e-6)
    torch.testing.assert_close(out[True][2], want[1], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(out[True][3], want[2], rtol=1e-5, atol=1e-6)


def test_no_points(gemm):
    dec = _decoder("deepsdf_pe")
    kernel = InferenceKernel(dec)
    codes = torch.randn(2, 3)
    none = torch.zeros(0, 3)
    idx = torch.zeros(0, dtype=torch.int64)
    assert kernel.values(codes, none, idx).shape == (0,)
    v, gc, gx = kernel.values_and_input_grad(codes, none, idx)
    assert v.shape == (0,) and gc.shape == (0, 3) and gx.shape == (0, 3)


@pytest.mark.parametrize("degree", [1, 3, 5])
def test_kernel_encoding_is_the_decoders_bit_for_bit(degree):
    """The kernels' frequency-major Fourier features (``_encode``) are, bit for bit, the
    decoder's ``positional_encoding`` (what Decoder.forward feeds layer 0), for chunks of
    every size, points far outside the box included."""
    from lib.models.kernels.elementwise import positional_encoding
    from lib.models.kernels.inference import _encode, _encode_views

    dec = Decoder(2, dims=[16, 16], positional_encoding=True, fourier_degree=degree).eval()
    prep = InferenceKernel(dec).prepare(torch.randn(1, 2))
    torch.manual_seed(degree)
    for n in (1, 7, 1000):
        pts = (torch.rand(n, 3) * 2 - 1) * torch.tensor([1.0, 10.0, 300.0])
        got = _encode(prep, pts, *_encode_views(prep, 1000, n, pts.device, pts.dtype))
        want = positional_encoding(pts, degree)
        assert got.shape == want.shape == (n, 6 * degree)
        assert torch.equal(got, want)


def test_input_grads_match_finite_differences_in_float64(gemm):
    # oneDNN's float32 kernels do not take float64: these calls stay on torch.mm
    dec = _decoder("deepsdf_pe", dtype=torch.float64)
    kernel = InferenceKernel(dec)
    gen = torch.Generator().manual_seed(2)
    codes = torch.randn(2, 3, generator=gen, dtype=torch.float64)
    xyz = torch.rand(20, 3, generator=gen, dtype=torch.float64) * 2 - 1
    index = torch.arange(20) % 2
    _, g_code, g_xyz = kernel.values_and_input_grad(codes, xyz, index)
    h = 1e-6
    for j in range(3):
        e = torch.zeros(3, dtype=torch.float64)
        e[j] = h
        fd_x = (kernel.values(codes, xyz + e, index) - kernel.values(codes, xyz - e, index)) / (2 * h)
        torch.testing.assert_close(g_xyz[:, j], fd_x, rtol=1e-6, atol=1e-8)
        fd_c = (kernel.values(codes + e, xyz, index) - kernel.values(codes - e, xyz, index)) / (2 * h)
        torch.testing.assert_close(g_code[:, j], fd_c, rtol=1e-6, atol=1e-8)


def test_prepared_weights_follow_in_place_parameter_and_code_updates(gemm):
    """The prepared blocks are cached per parameter version: training in between is seen."""
    dec = _decoder("deepsdf_pe")
    kernel = InferenceKernel(dec)
    codes = torch.randn(1, 3)
    xyz = torch.rand(50, 3) * 2 - 1
    before = kernel.values(codes, xyz)
    with torch.no_grad():
        dec.lin2.weight_v.mul_(-1.0)  # in place, as an optimizer step does
    assert not torch.allclose(kernel.values(codes, xyz), before)
    torch.testing.assert_close(kernel.values(codes, xyz),
                               _reference(dec, codes, xyz, torch.zeros(50, dtype=torch.int64))[0], rtol=0, atol=2e-6)
    codes.add_(0.5)
    torch.testing.assert_close(kernel.values(codes, xyz),
                               _reference(dec, codes, xyz, torch.zeros(50, dtype=torch.int64))[0], rtol=0, atol=2e-6)


def _gemm_ops(fn) -> set:
    """The GEMM operators (torch.mm family, oneDNN's linear) that fn() runs, from the profiler."""
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    names = {e.key for e in prof.key_averages()}
    return {n for n in names if n in ("aten::mm", "aten::addmm", "aten::addmm_") or "linear_pointwise" in n}


def test_the_gemm_library_chosen_is_the_one_that_runs(gemm):
    """With oneDNN chosen, every layer's product goes to oneDNN's linear and none to torch.mm,
    except the chain through the Fourier features (3d x 3) and a float64 decoder's; with BLAS none to oneDNN."""
    dec = _decoder("deepsdf_pe")
    kernel = InferenceKernel(dec)
    codes = torch.randn(2, 3)
    xyz = torch.rand(300, 3) * 2 - 1
    index = torch.arange(300) % 2
    kernel.prepare(codes)  # the per-code biases (addmm), once per code version, outside the calls profiled
    values_ops = _gemm_ops(lambda: kernel.values(codes, xyz, index))
    grad_ops = _gemm_ops(lambda: kernel.values_and_input_grad(codes, xyz, index))
    if gemm == "onednn":
        assert values_ops and all("linear_pointwise" in n for n in values_ops)
        assert "aten::addmm_" not in grad_ops and "aten::addmm" not in grad_ops
        assert any("linear_pointwise" in n for n in grad_ops)
    else:
        assert values_ops and not any("linear_pointwise" in n for n in values_ops | grad_ops)
    dec64 = _decoder("deepsdf_pe", dtype=torch.float64)
    ops64 = _gemm_ops(lambda: InferenceKernel(dec64).values(codes.double(), xyz.double(), index))
    assert ops64 and not any("linear_pointwise" in n for n in ops64)


def test_repeated_extraction_calls_reuse_their_memory_instead_of_page_faulting_it_in_again(gemm):
    # oneDNN returns new outputs per layer and chunk: with glibc's default thresholds much of
    # that memory goes back to the kernel on free and is faulted in and zeroed again next call
    torch.manual_seed(0)
    dec = Decoder(2, dims=[128] * 4, latent_in=[2], weight_norm=True, positional_encoding=True,
                  fourier_degree=3).eval()
    kernel = InferenceKernel(dec)
    codes = torch.randn(2, 2)
    xyz = torch.rand(1 << 14, 3) * 2 - 1
    index = torch.arange(1 << 14) % 2

    def call():
        kernel.values(codes, xyz, index)
        kernel.values_and_input_grad(codes, xyz, index)

    # three calls allocate > 40 MiB (10000 pages) of outputs and, with oneDNN, activations
    assert least_page_faults(call, rounds=3) < 1024


def test_kernels_refuse_what_they_do_not_compute():
    """LayerNorm, latent dropout and active dropout keep the autograd path (the plan is None)."""
    assert Decoder(2, dims=[16, 16], norm_layers=[0]).inference_plan("cpu") is None  # LayerNorm
    assert Decoder(2, dims=[16, 16], latent_dropout=True).eval().inference_plan("cpu") is None
    dropping = Decoder(2, dims=[16, 16], dropout=[0, 1], dropout_prob=0.2)
    assert dropping.train().inference_plan("cpu") is None
    assert dropping.eval().inference_plan("cpu") is not None
    assert Decoder(2, dims=[16, 16], dropout=[0, 1], dropout_prob=0.0).train().inference_plan("cpu") is not None


class _ForwardCounter:
    def __init__(self, module):
        self.calls = 0
        self.hook = module.register_forward_hook(lambda *a: setattr(self, "calls", self.calls + 1))


@pytest.fixture(scope="module")
def ring():
    """The shipped bob_and_spot network (frozen) and its two codes: bob (a ring) and spot."""
    if not (EXP / "ModelParameters" / "latest.pth").is_file():
        pytest.skip("shipped checkpoint absent")
    from lib import experiment
    from lib.experiment.specs import load_specs

    dec, codes = experiment.load_decoder_and_codes(EXP, load_specs(EXP), "latest", device="cpu")
    dec.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    return dec, codes.detach()


@pytest.mark.parametrize("gradient", ["paper", "exact"])
def test_mesh_layer_gradients_through_the_kernels_equal_the_autograd_path(ring, gradient):
    dec, codes = ring
    w1 = torch.randn(3, generator=torch.Generator().manual_seed(3))
    out = {}
    for use in (True, False):
        counter = _ForwardCounter(dec)
        z = codes.clone().requires_grad_(True)
        meshes = mesh_from_sdf(dec, z, 32, "sparse", gradient=gradient, kernel=use)  # B = 2: the indexed path
        w = torch.randn(3, generator=torch.Generator().manual_seed(4))
        loss = sum((m.verts * w).sum() + m.verts.pow(2).sum() for m in meshes)
        loss.backward()
        out[use] = ([m.faces for m in meshes], [m.verts.detach() for m in meshes],
                    [m.state.dl_ds for m in meshes], z.grad.clone())
        # extraction and backward went through the kernels, not forward; or through forward
        assert (counter.calls == 0) == use
        counter.hook.remove()
        single = codes[1].clone().requires_grad_(True)
        m1 = mesh_from_sdf(dec, single, 32, "sparse", gradient=gradient, kernel=use)
        (m1.verts * w1).sum().backward()
        out[use] += (m1.faces, single.grad.clone())
    new, old = out[True], out[False]
    assert all(f.shape[0] > 100 for f in new[0])
    for a, b in zip(new[0], old[0]):
        assert torch.equal(a, b)
    for a, b in zip(new[1], old[1]):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-5)
    for a, b in zip(new[2], old[2]):
        # a vertex within float rounding of a ReLU kink has two one-sided normals, and the two
        # paths' rounding may pick either (one such vertex of 3611 on the shipped checkpoint)
        off = ~torch.isclose(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())
        assert int(off.sum()) <= max(1, a.numel() // 1000), (int(off.sum()), a.numel())
        assert torch.allclose(a[off], b[off], rtol=0.1)
    torch.testing.assert_close(new[3], old[3], rtol=1e-3, atol=1e-4 * old[3].abs().max().item())
    assert torch.equal(new[4], old[4])
    torch.testing.assert_close(new[5], old[5], rtol=1e-3, atol=1e-4 * old[5].abs().max().item())


def test_autograd_path_when_the_field_needs_a_graph(ring):
    """With grad enabled and a code requiring grad the field is evaluated by the decoder, so
    the values carry a graph; under no_grad the kernel gives the same values without one."""
    dec, codes = ring
    z = codes[:1].clone().requires_grad_(True)
    field = _CodeField(dec, z)
    pts = torch.rand(40, 3) * 2 - 1
    with_graph = field.single(pts)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        plain = field.single(pts)
    torch.testing.assert_close(plain, with_graph.detach(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("renderer", ["nr", "soft"])
def test_demo_step_is_unchanged_by_the_kernels(ring, renderer):
    """One demo step (bob_and_spot network, silhouette loss) from the same start: the same faces,
    vertices and per-vertex dL/ds within rounding, the same code update."""
    from lib.optimize import LatentOptimizer, SilhouetteLoss
    from lib.render import demo_camera, silhouette

    dec, codes = ring
    cam = demo_camera(image_size=96, device="cpu")
    with torch.no_grad():
        t = mesh_from_sdf(dec, codes[0], 40, "sparse")
    target = silhouette(t.verts, t.faces, cam, sigma=0)
    steps = {}
    for use in (True, False):
        opt = LatentOptimizer(dec, codes[1], SilhouetteLoss(cam, target, loss="mse", renderer=renderer), lr=5e-2,
                              resolution=40, kernel=use)
        steps[use] = (opt.step(), opt.latent.detach().clone())
    (a, za), (b, zb) = steps[True], steps[False]
    assert torch.equal(a.faces, b.faces) and a.faces.shape[0] > 1000
    torch.testing.assert_close(a.verts, b.verts, rtol=0, atol=1e-5)
    torch.testing.assert_close(a.dl_ds, b.dl_ds, rtol=0, atol=1e-4 * b.dl_ds.abs().max().item())
    torch.testing.assert_close(za, zb, rtol=0, atol=1e-6)


@pytest.mark.cuda
def test_kernels_on_cuda_equal_the_cpu():
    dec = _decoder("deepsdf_pe")
    codes = torch.randn(3, 3)
    xyz = torch.rand(70000, 3) * 2 - 1  # more than one GPU chunk
    index = torch.randint(0, 3, (70000,))
    cpu = InferenceKernel(dec).values_and_input_grad(codes, xyz, index)
    cuda = InferenceKernel(dec.cuda()).values_and_input_grad(codes.cuda(), xyz.cuda(), index.cuda())
    for a, b in zip(cpu, cuda):
        torch.testing.assert_close(b.cpu(), a, rtol=1e-4, atol=1e-5)


def test_consecutive_meshes_see_parameter_changes_even_through_data(ring):
    """A parameter written between two meshes is seen by the next one, also when written
    through ``p.data`` (old-style SGD), which bumps no ``_version``: each mesh prepares its
    own weights."""
    dec, codes = ring
    dec = __import__("copy").deepcopy(dec)
    with torch.no_grad():
        first = mesh_from_sdf(dec, codes[0], 32, "sparse")
        dec.lin8.bias.data.add_(0.05)  # every value up: the surface shrinks
        new = mesh_from_sdf(dec, codes[0], 32, "sparse")
        old = mesh_from_sdf(dec, codes[0], 32, "sparse", kernel=False)
    assert first.faces.shape != new.faces.shape or not torch.equal(first.faces, new.faces)
    assert torch.equal(new.faces, old.faces)
    torch.testing.assert_close(new.verts, old.verts, rtol=0, atol=1e-5)


@pytest.mark.parametrize("path", ["kernel", "autograd", "generic", "weights"])
@pytest.mark.parametrize("gradient", ["paper", "exact"])
def test_backward_of_a_loss_that_moves_some_vertices_equals_the_full_rule(ring, gradient, path):
    """A loss that moves only some vertices (dL/dx = 0 at the others): dL/ds (V,) and the
    gradients of the code and, for "weights", of the decoder's parameters equal the rule
    evaluated by hand at EVERY vertex (autograd normals, dl_ds_rule, autograd through
    sum_i dL/ds_i s(x_i)), through the decoder's kernels, its autograd forward, a field that
    is not recognised as a DeepSDF code field, and a decoder whose parameters require grad
    (the generic two-pass rule).  Under the paper's rule the backward evaluates the decoder
    at the moved vertices only; under the exact rule (median floor) at all of them."""
    import copy

    from lib.layer import DELTA, dl_ds_rule, mesh_from_field

    dec, codes = ring
    if path == "weights":
        dec = copy.deepcopy(dec)
        for p in dec.parameters():
            p.requires_grad_(True)
    z = codes[1].clone().requires_grad_(True)
    if path == "generic":
        mesh = mesh_from_field(lambda p: dec(torch.cat((z.expand(p.shape[0], -1), p), 1)), 32, gradient=gradient)
    else:
        mesh = mesh_from_sdf(dec, z, 32, gradient=gradient, kernel=path == "kernel")
    verts = mesh.verts.detach()
    keep = (verts[:, 0] > 0.1).float().unsqueeze(1)  # dL/dx = 0 for the others
    assert 0.2 < keep.mean() < 0.8
    leaves = [z] + [p for p in dec.parameters() if p.requires_grad]
    rows = []
    hook = dec.register_forward_hook(lambda m, inp, out: rows.append(inp[0].shape[0]))
    try:
        ((mesh.verts * keep) ** 2).sum().backward()
    finally:
        hook.remove()
    got = [t.grad.clone() for t in leaves]
    moved = int(keep.sum()) if gradient == "paper" else verts.shape[0]
    assert sum(rows) == (0 if path == "kernel" else moved)
    # the rule by hand, at every vertex
    with torch.enable_grad():
        x = verts.clone().requires_grad_(True)
        value = dec(torch.cat((z.detach().expand(x.shape[0], -1), x), 1)).reshape(-1)
        (normal,) = torch.autograd.grad(value.sum(), x)
        dl_ds = dl_ds_rule(normal, 2 * verts * keep, gradient, DELTA)
        ref = torch.autograd.grad((dec(torch.cat((z.expand(x.shape[0], -1), verts), 1)).reshape(-1)
                                   * dl_ds).sum(), leaves)
    da = mesh.state.dl_ds
    assert da.shape == dl_ds.shape
    if gradient == "paper":
        assert torch.equal(da[keep[:, 0] == 0], torch.zeros_like(da[keep[:, 0] == 0]))
    assert da[keep[:, 0] == 1].abs().min() > 0
    # a vertex within float rounding of a ReLU kink has two one-sided normals (test above)
    off = ~torch.isclose(da, dl_ds, rtol=1e-3, atol=1e-4 * dl_ds.abs().max().item())
    assert int(off.sum()) <= max(1, da.numel() // 1000), (int(off.sum()), da.numel())
    for a, b in zip(got, ref):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-4 * b.abs().max().item())


@pytest.mark.parametrize("kernels", [True, False])
def test_demo_step_runs_elementwise_work_on_one_thread_and_large_decoder_calls_on_all(ring, monkeypatch, kernels):
    """With sleeping OpenMP threads and 2 intra-op threads, a demo step runs inside
    lib.runtime.threads.elementwise_section: its loss on one thread, decoder calls of fewer than
    FEW_ROWS rows on that one thread too, larger ones on both, through the inference
    kernels or through the decoder's autograd forward alike."""
    import lib.models.kernels.inference as inference
    from lib.optimize import LatentOptimizer, SilhouetteLoss
    from lib.render import demo_camera, silhouette

    monkeypatch.setenv("OMP_WAIT_POLICY", "PASSIVE")
    dec, codes = ring
    cam = demo_camera(image_size=96, device="cpu")
    with torch.no_grad():
        t = mesh_from_sdf(dec, codes[0], 40, "sparse")
    target = silhouette(t.verts, t.faces, cam, sigma=0)
    seen = {"loss": [], "calls": []}
    if kernels:
        real_values = inference.values
        monkeypatch.setattr(inference, "values", lambda prep, xyz, index=None: seen["calls"].append(
            (xyz.shape[0], torch.get_num_threads())) or real_values(prep, xyz, index))
    else:
        real_forward = dec.forward
        monkeypatch.setattr(dec, "forward", lambda rows: seen["calls"].append(
            (rows.shape[0], torch.get_num_threads())) or real_forward(rows))
    loss = SilhouetteLoss(cam, target, loss="mse", renderer="nr")
    real_loss = loss.__call__

    class Spy:
        def __call__(self, verts, faces):
            seen["loss"].append(torch.get_num_threads())
            return real_loss(verts, faces)

        def __getattr__(self, name):
            return getattr(loss, name)
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        opt = LatentOptimizer(dec, codes[1], Spy(), lr=5e-2, resolution=40, kernel=kernels)
        for _ in range(3):  # the warm steps make small calls
            opt.step()
            assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(old)
    assert seen["loss"] == [1, 1, 1]
    small = [th for rows, th in seen["calls"] if rows < inference.FEW_ROWS]
    large = [th for rows, th in seen["calls"] if rows >= inference.FEW_ROWS]
    assert small and large and set(small) == {1} and set(large) == {2}


def test_the_environment_forces_the_gemm_library(monkeypatch):
    """MESHSDF_GEMM=blas|onednn forces the library for the process (GEMM, when set, wins); a bad
    value is refused with its name."""
    import lib.models.kernels.gemm as gemm

    monkeypatch.setattr(gemm, "GEMM", None)
    monkeypatch.setenv("MESHSDF_GEMM", "blas")
    assert gemm.cpu_gemm() == "blas"
    dec = _decoder("deepsdf_pe")
    xyz = torch.rand(300, 3) * 2 - 1
    ops = _gemm_ops(lambda: InferenceKernel(dec).values(torch.randn(1, 3), xyz))
    assert ops and not any("linear_pointwise" in n for n in ops)
    if gemm.onednn_available():
        monkeypatch.setenv("MESHSDF_GEMM", "onednn")
        assert gemm.cpu_gemm() == "onednn"
        monkeypatch.setattr(gemm, "GEMM", "blas")
        assert gemm.cpu_gemm() == "blas"
        monkeypatch.setattr(gemm, "GEMM", None)
    monkeypatch.setenv("MESHSDF_GEMM", "mkl")
    with pytest.raises(ValueError, match="MESHSDF_GEMM='mkl'"):
        gemm.cpu_gemm()
