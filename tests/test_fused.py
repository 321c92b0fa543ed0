"""The fused training loss (lib.models.kernels.fused) and the counter-based dropout bits
(lib.models.kernels.elementwise)."""
import math

import pytest
import torch

from lib.models.decoder import Decoder
from lib.models.kernels.elementwise import dropout_bits, dropout_mask, new_seed
from lib.training import TrainSettings, auto_decoder_loss, clamped_l1
from page_faults import least_page_faults

M64 = (1 << 64) - 1
M32 = (1 << 32) - 1


def _splitmix64(state: int) -> int:
    """Reference SplitMix64 output for an already-advanced state (plain Python integers)."""
    z = state & M64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & M64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def _key(seed: int, counter: int) -> int:
    """Reference 32-bit key: 0x7FEB352D x the high half of SplitMix64 of the counter's state."""
    return (_splitmix64(seed + (counter + 1) * 0x9E3779B97F4A7C15) >> 32) * 0x7FEB352D & M32


def test_dropout_bits_are_the_documented_hash_of_the_counters():
    seed = -1234567890123456789
    bits = torch.stack([dropout_bits(seed, layer, row0=3, rows=2, cols=9) for layer in (0, 5)])  # (2, 2, 10) int16
    assert bits.shape == (2, 2, 10) and bits.dtype == torch.int16
    words = bits.view(torch.int32)  # (2, 2, 5): lanes c % 2 of word c // 2
    for li, layer in enumerate((0, 5)):
        for r in range(2):
            for w in range(5):
                x = (_key(seed, (layer << 32) + 3 + r) + _key(0, w)) & M32
                want = ((x ^ (x >> 15)) * 0x846CA68B) & M32
                assert words[li, r, w].item() & M32 == want


def test_dropout_bits_have_no_visible_structure():
    """Each of a lane's 16 bits is a fair coin, and neighbouring units (in a row, in a column,
    diagonally), layers and seeds are uncorrelated, within 5 sigma."""
    seed = new_seed()
    rows, cols = 4096, 128
    lanes = dropout_bits(seed, 2, 0, rows, cols).to(torch.int32) & 0xFFFF
    for lane in range(2):
        v = lanes[:, lane::2]
        for k in range(16):
            frac = ((v >> k) & 1).double().mean().item()
            assert abs(frac - 0.5) < 5 * math.sqrt(0.25 / v.numel()), (lane, k)

    def corr(a, b):
        a, b = a.double() - a.double().mean(), b.double() - b.double().mean()
        return ((a * b).mean() / (a.std() * b.std())).item()

    bound = 5 / math.sqrt(rows * cols)
    others = {"next unit": (lanes[:, :-1], lanes[:, 1:]), "unit after next": (lanes[:, :-2], lanes[:, 2:]),
              "next row": (lanes[:-1], lanes[1:]), "diagonal": (lanes[:-1, :-1], lanes[1:, 1:]),
              "next layer": (lanes, dropout_bits(seed, 3, 0, rows, cols).to(torch.int32) & 0xFFFF),
              "next seed": (lanes, dropout_bits(seed + 1, 2, 0, rows, cols).to(torch.int32) & 0xFFFF)}
    for name, (a, b) in others.items():
        assert abs(corr(a, b)) < bound, name


def test_dropout_bits_of_a_chunk_are_a_slice_of_the_full_draw():
    seed = new_seed()
    full = torch.stack([dropout_bits(seed, layer, 0, 40, 93) for layer in (1, 2, 7)])
    part = torch.stack([dropout_bits(seed, layer, 11, 17, 128) for layer in (2, 7)])[:, :, :93]
    assert torch.equal(part, full[1:, 11:28, :93])
    other = dropout_bits(seed + 1, 1, 0, 40, 93)[None]
    assert not torch.equal(other[0], full[0])


def test_dropout_masks_of_different_layers_are_independent():
    seed, p = new_seed(), 0.2
    a = dropout_mask((500, 128), p, seed=seed, layer=0)
    b = dropout_mask((500, 128), p, seed=seed, layer=1)
    both = ((1 - a) * (1 - b)).mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / a.numel())
    assert torch.equal(a, dropout_mask((500, 128), p, seed=seed, layer=0))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("cols,rows,row0,p", [(128, 300, 7, 0.2), (93, 37, 11, 0.3), (1, 5, 0, 0.5), (7, 9, 2, 0.9),
                                              (6, 40, 3, 0.999), (5, 40, 1, 1e-6)])
def test_chunk_dropout_in_the_transposed_layout_drops_the_same_units(cols, rows, row0, p, dtype):
    """apply_t_ on (cols, rows) zeroes exactly the units apply_ zeroes on (rows, cols): both lanes of
    each word, odd widths, odd first rows, in float32 and float64 (the lanes compared as h's dtype);
    and those are dropout_mask's units of the full draw."""
    from lib.models.kernels.elementwise import ChunkDropout

    seed, layer = new_seed(), 3
    h = torch.rand(rows, cols, dtype=dtype) + 0.5  # no zeros of its own
    rowwise = ChunkDropout(seed, p, 400, 130, "cpu", layers=[0, layer]).apply_(h.clone(), layer, row0)
    transposed = ChunkDropout(seed, p, 400, 130, "cpu", layers=[0, layer]).apply_t_(h.t().contiguous(), layer, row0)
    assert torch.equal(transposed.t(), rowwise)
    keep = dropout_mask((row0 + rows, cols), p, seed=seed, layer=layer)[row0:]
    assert torch.equal(transposed.t() != 0, keep != 0)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("degree", [0, 1, 5])
@pytest.mark.parametrize("n", [1, 7, 4099])
def test_transposed_positional_encoding_has_the_same_bits(degree, n, dtype):
    """positional_encoding_t_ (the fused loss's (features, rows) layout) writes exactly the features of
    positional_encoding, from points with any strides, for odd counts that leave a vector tail."""
    from lib.models.kernels.elementwise import positional_encoding, positional_encoding_t_

    torch.manual_seed(n + degree)
    rows = (torch.rand(n, 4, dtype=dtype) * 8 - 4)[:, :3]  # strided, like a sample batch's xyz
    want = positional_encoding(rows, degree)
    out = torch.full((max(3, 6 * degree), n), float("nan"), dtype=dtype)
    got = positional_encoding_t_(rows.t(), degree, out)
    assert got is out and torch.equal(out.t(), want)


def test_chunk_dropout_in_the_transposed_layout_can_write_elsewhere():
    """apply_t_ with out= writes the kept units where told (both lanes, an odd width) and leaves h as it was."""
    from lib.models.kernels.elementwise import ChunkDropout

    seed, cols, rows = new_seed(), 93, 50
    h = torch.rand(cols, rows) + 0.5
    inplace = ChunkDropout(seed, 0.3, 64, 96, "cpu", layers=[2]).apply_t_(h.clone(), 2, 13)
    block = torch.full((cols + 4, rows), -1.0)
    got = ChunkDropout(seed, 0.3, 64, 96, "cpu", layers=[2]).apply_t_(h.clone(), 2, 13, out=block[:cols])
    assert torch.equal(block[:cols], inplace) and (inplace == 0).any() and (block[cols:] == -1).all()
    assert got.data_ptr() == block.data_ptr()
    kept = h.clone()
    ChunkDropout(seed, 0.3, 64, 96, "cpu", layers=[2]).apply_t_(kept, 2, 13, out=torch.empty(cols, rows))
    assert torch.equal(kept, h)



def test_chunk_dropout_keys_drawn_for_a_span_give_each_chunk_its_own_masks():
    """draw_rows draws the keys of many rows at once: chunks inside the span (and one after it) drop
    exactly the units a fresh ChunkDropout drops for them; _row_span finds the span of consecutive chunks."""
    from lib.models.kernels.elementwise import ChunkDropout
    from lib.models.kernels.fused import _row_span, plan_chunks

    seed, cols, n = new_seed(), 10, 30
    spanned = ChunkDropout(seed, 0.4, n, cols, "cpu", layers=[1, 4])
    spanned.draw_rows(40, 95)
    for layer, row0 in [(4, 40), (1, 70), (4, 105), (1, 135), (4, 41)]:
        h = torch.rand(cols, n) + 0.5
        want = ChunkDropout(seed, 0.4, n, cols, "cpu", layers=[1, 4]).apply_t_(h.clone(), layer, row0)
        assert torch.equal(spanned.apply_t_(h, layer, row0), want) and (want == 0).any()
    assert _row_span(101, plan_chunks(3, 101, 37)[2:7]) == (74, 165)
    assert _row_span(101, plan_chunks(3, 101, 202)) == (0, 303)
    assert _row_span(101, [(0, 1, 0, 37), (1, 2, 0, 37)]) is None

CONFIGS = {
    "deepsdf": dict(dims=[32] * 6, dropout=list(range(6)), dropout_prob=0.2, norm_layers=list(range(6)),
                    latent_in=[3], weight_norm=True, positional_encoding=True, fourier_degree=3),
    "xyz_in_all_tanh": dict(dims=[24] * 4, dropout=[0, 2], dropout_prob=0.3, latent_in=[2], xyz_in_all=True,
                            use_tanh=True),
    "two_latent_in": dict(dims=[40] * 3, dropout=[0, 1, 2], dropout_prob=0.2, latent_in=[1, 2], norm_layers=[0, 2],
                          weight_norm=True),
    "plain": dict(dims=[16, 16]),
}


def test_gemm_library_follows_the_cpu_vendor_and_vector_width():
    from lib.models.kernels.gemm import gemm_for
    from lib.runtime.cpus import CpuInfo

    amd512 = CpuInfo("AuthenticAMD", "EPYC", ["avx2", "avx512f"])
    assert gemm_for(amd512, mkl_blas=True, onednn=True) == "onednn"  # MKL would run its AVX2 kernels here
    assert gemm_for(CpuInfo("GenuineIntel", "Xeon", ["avx2", "avx512f"]), True, True) == "blas"
    assert gemm_for(CpuInfo("AuthenticAMD", "EPYC", ["avx2"]), True, True) == "blas"  # same width either way
    assert gemm_for(amd512, mkl_blas=False, onednn=True) == "blas"   # another BLAS: its own dispatch
    assert gemm_for(amd512, mkl_blas=True, onednn=False) == "blas"
    assert gemm_for(CpuInfo(flags=["avx512f"]), True, True) == "blas"  # vendor unknown: as before


def test_forcing_an_unknown_gemm_library_is_refused(monkeypatch):
    import lib.models.kernels.gemm as gemm

    monkeypatch.setattr(gemm, "GEMM", "cublas")
    with pytest.raises(ValueError, match="gemm.GEMM='cublas': use 'blas' or 'onednn'"):
        gemm.cpu_gemm()
    with pytest.raises(ValueError, match="gemm.GEMM='mkl': use 'blas' or 'onednn'"), gemm.forced_gemm("mkl"):
        pass
    assert gemm.GEMM == "cublas"  # restored


def test_a_float64_decoder_trains_with_blas_whatever_the_gemm_library(gemm):
    # oneDNN's float32 kernels do not take float64: that step stays on torch.mm
    torch.manual_seed(0)
    dec = Decoder(3, **CONFIGS["deepsdf"]).double().train()
    dec.fused_chunk = 37
    codes = torch.randn(3, 3, dtype=torch.float64, requires_grad=True)
    xyz = torch.rand(3, 101, 3, dtype=torch.float64) * 2 - 1
    sdf = torch.rand(3, 101, dtype=torch.float64) * 0.3 - 0.15
    (fused, g_fused), (plain, g_plain) = _both_losses(dec, codes, xyz, sdf, 0.1)
    assert fused.dtype == torch.float64 and fused.item() == pytest.approx(plain.item(), rel=1e-12)
    for got, want in zip(g_fused, g_plain):
        assert torch.allclose(got, want, rtol=1e-9, atol=1e-12 * float(want.abs().max()))


def _both_losses(dec, codes, xyz, sdf, clamp):
    """(fused loss, grads) and (autograd loss, grads) for the same RNG state."""
    params = [codes] + list(dec.parameters())
    torch.manual_seed(5)
    fused = dec.clamped_l1_loss(codes, xyz, sdf, clamp)
    g_fused = torch.autograd.grad(fused * 2.5, params)
    torch.manual_seed(5)
    b, s = sdf.shape
    inputs = torch.cat((codes[:, None].expand(b, s, codes.shape[1]), xyz), 2).reshape(b * s, -1)
    plain = clamped_l1(dec(inputs), sdf, clamp)
    g_plain = torch.autograd.grad(plain * 2.5, params)
    return (fused, g_fused), (plain, g_plain)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("train", [True, False])
def test_fused_loss_equals_autograd_loss_with_the_same_dropout(name, train, gemm):
    torch.manual_seed(0)
    dec = Decoder(3, **CONFIGS[name]).train(train)
    dec.fused_chunk = 37  # several chunks per scene, the last one short
    b, s = 3, 101
    codes = torch.randn(b, 3, requires_grad=True)
    xyz = torch.rand(b, s, 3) * 2 - 1
    sdf = torch.rand(b, s) * 0.3 - 0.15
    (fused, g_fused), (plain, g_plain) = _both_losses(dec, codes, xyz, sdf, 0.1)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(g_fused, g_plain):
        assert want.abs().max() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


def test_fused_loss_clamp_boundary_and_chunk_size_do_not_matter(gemm):
    torch.manual_seed(1)
    dec = Decoder(2, **CONFIGS["deepsdf"]).train()
    codes = torch.randn(2, 2, requires_grad=True)
    xyz = torch.rand(2, 64, 3) * 2 - 1
    sdf = torch.rand(2, 64) * 0.4 - 0.2  # many targets beyond the clamp
    grads = []
    for chunk in (7, 64, 1000):
        dec.fused_chunk = chunk
        torch.manual_seed(9)
        loss = dec.clamped_l1_loss(codes, xyz, sdf, 0.05)
        grads.append(torch.autograd.grad(loss, [codes] + list(dec.parameters())))
    for other in grads[1:]:
        for a, b in zip(grads[0], other):
            assert torch.allclose(a, b, rtol=1e-4, atol=1e-7)


@pytest.mark.parametrize("use_tanh", [False, True])
def test_loss_head_gradient_has_the_bits_of_its_factors_taken_in_turn(use_tanh):
    """The fused loss head multiplies the tanh derivatives and the 1/N scale first and the sign and
    clamp mask last: the same bits as sign, mask, derivatives, scale in turn, inside and outside the
    clamp, with signed zeros."""
    from lib.models.kernels.fused import FusedPlan, _loss_head

    class Sums:
        total = torch.zeros(())

    torch.manual_seed(3)
    h_in = torch.cat((torch.randn(4092) * 0.3, torch.tensor([0.0, -0.0, 5.0, -5.0]))).unsqueeze(1)
    clamp, scale = 0.1, 1.0 / 64384
    target = (torch.rand(4096) * 0.4 - 0.2).clamp(-clamp, clamp)
    target[4092:] = torch.tensor([0.0, 0.0, -clamp, clamp])
    plan = FusedPlan((), 0, use_tanh, 0.0, 4096)
    inner = torch.tanh(h_in.view(-1))
    pred = torch.tanh(inner) if use_tanh else inner
    diff = pred.clamp(-clamp, clamp) - target
    want = torch.sign(diff) * ((pred >= -clamp) & (pred <= clamp))
    want = want * (1.0 - pred * pred)
    if use_tanh:
        want = want * (1.0 - inner * inner)
    want = want * scale
    sums = Sums()
    got = _loss_head(plan, h_in, target, clamp, sums, scale)
    assert got.shape == (4096, 1)
    inside = (pred.abs() <= clamp).sum()
    assert 0 < inside < 4096
    assert torch.equal(got.view(-1), want) and torch.equal(torch.signbit(got.view(-1)), torch.signbit(want))
    assert torch.equal(sums.total, diff.abs().sum())


def test_fused_gradients_scale_with_the_output_gradient_bit_for_bit(gemm):
    """The loss's own gradient (1) passes the fused gradients on as they are; any other is multiplied in:
    the gradients of 2 x loss are exactly twice those of the loss."""
    torch.manual_seed(2)
    dec = Decoder(2, **CONFIGS["deepsdf"]).train()
    dec.fused_chunk = 37
    codes = torch.randn(2, 2, requires_grad=True)
    xyz, sdf = torch.rand(2, 80, 3) * 2 - 1, torch.rand(2, 80) * 0.3 - 0.15
    params = [codes] + list(dec.parameters())
    grads = []
    for factor in (1.0, 2.0):
        torch.manual_seed(4)
        grads.append(torch.autograd.grad(dec.clamped_l1_loss(codes, xyz, sdf, 0.1) * factor, params))
    for one, two in zip(*grads):
        assert one.abs().max() > 0 and torch.equal(one * 2.0, two)


def test_auto_decoder_loss_fuses_supported_decoders_and_falls_back_for_layer_norm(monkeypatch):
    settings = TrainSettings(num_epochs=10, snapshot_frequency=10, additional_snapshots=(), log_frequency=1,
                             samples_per_scene=50, scenes_per_batch=2, clamp_distance=0.1, code_regularization=True,
                             code_reg_lambda=1e-4, code_bound=None, code_init_std=0.01, grad_clip_norm=None)
    torch.manual_seed(0)
    codes = torch.randn(2, 3, requires_grad=True)
    xyz, sdf = torch.rand(2, 50, 3) * 2 - 1, torch.rand(2, 50) * 0.2 - 0.1
    calls = []
    import lib.models.decoder as decoder_mod
    real = decoder_mod.fused_clamped_l1
    monkeypatch.setattr(decoder_mod, "fused_clamped_l1", lambda *a: calls.append(1) or real(*a))
    fused_dec = Decoder(3, **CONFIGS["deepsdf"])
    auto_decoder_loss(fused_dec, codes, xyz, sdf, 10, settings)[0].backward()
    assert calls == [1]
    ln_dec = Decoder(3, dims=[16, 16, 16], norm_layers=[0, 1], dropout=[0], dropout_prob=0.2)  # LayerNorm
    assert not ln_dec.fused_loss_supported
    total, sdf_loss, _ = auto_decoder_loss(ln_dec, codes, xyz, sdf, 10, settings)
    total.backward()
    assert calls == [1] and torch.isfinite(sdf_loss) and ln_dec.lin0.weight.grad is not None
    with torch.no_grad():  # evaluation: plain forward, no gradients computed
        auto_decoder_loss(fused_dec, codes, xyz, sdf, 10, settings)
    assert calls == [1]
    with pytest.raises(ValueError, match="must not require gradients"):
        fused_dec.clamped_l1_loss(codes, xyz.requires_grad_(True), sdf, 0.1)


@pytest.mark.parametrize("chunk", [101, 202, 1 << 30])
def test_fused_loss_on_whole_scene_chunks_equals_autograd(chunk, gemm):
    # chunk >= samples per scene groups whole scenes (a GPU's default: the batch in one chunk)
    from lib.models.kernels.fused import default_chunk, plan_chunks

    assert plan_chunks(3, 101, chunk) == {101: [(0, 1, 0, 101), (1, 2, 0, 101), (2, 3, 0, 101)],
                                          202: [(0, 2, 0, 101), (2, 3, 0, 101)],
                                          1 << 30: [(0, 3, 0, 101)]}[chunk]
    assert plan_chunks(3, 101, default_chunk(torch.device("cuda"))) == [(0, 3, 0, 101)]
    assert plan_chunks(16, 8192, default_chunk(torch.device("cuda"))) == [(0, 16, 0, 8192)]  # cars_svr
    _check_scenes_against_autograd(3, 101, chunk)


def _check_scenes_against_autograd(b: int, s: int, chunk: int) -> None:
    """b random scenes of s samples: the fused loss and gradients equal autograd's to rounding."""
    torch.manual_seed(0)
    dec = Decoder(3, **CONFIGS["deepsdf"]).train()
    dec.fused_chunk = chunk
    codes = torch.randn(b, 3, requires_grad=True)
    xyz = torch.rand(b, s, 3) * 2 - 1
    sdf = torch.rand(b, s) * 0.3 - 0.15
    (fused, g_fused), (plain, g_plain) = _both_losses(dec, codes, xyz, sdf, 0.1)
    assert fused.item() == pytest.approx(plain.item(), rel=1e-6)
    for got, want in zip(g_fused, g_plain):
        assert want.abs().max() > 0
        assert torch.allclose(got, want, rtol=1e-4, atol=1e-6 * float(want.abs().max()))


@pytest.mark.parametrize("chunk", [4, 1 << 30])
def test_fused_loss_on_many_small_scenes_equals_autograd(chunk, gemm, monkeypatch):
    # with oneDNN each scene of a chunk is one more row and column of its GEMMs (its bias and
    # indicator): at most 16 scenes share a chunk there, so 20 scenes of 5 rows take two chunks
    import lib.models.kernels.fused as fused
    from lib.models.kernels.fused import plan_chunks

    assert plan_chunks(20, 5, 1 << 30, max_scenes=16) == [(0, 16, 0, 5), (16, 20, 0, 5)]
    assert plan_chunks(20, 5, 1 << 30) == [(0, 20, 0, 5)]
    seen = []
    real = fused._run_chunks
    monkeypatch.setattr(fused, "_run_chunks", lambda sh, part, chunks: seen.extend(chunks) or real(sh, part, chunks))
    _check_scenes_against_autograd(20, 5, chunk)
    assert sorted(seen) == plan_chunks(20, 5, chunk, max_scenes=16 if gemm == "onednn" else None)


def test_chunk_halves_cover_the_chunks_once_in_order_on_a_cpu_only():
    from lib.models.kernels.fused import chunk_halves, plan_chunks

    chunks = plan_chunks(3, 101, 37)  # 9 chunks
    halves = chunk_halves(chunks, "cpu")
    assert len(halves) == 2 and halves[0] + halves[1] == chunks and len(halves[0]) == 5
    assert chunk_halves(chunks[:1], "cpu") == [chunks[:1]]
    assert chunk_halves(chunks, torch.device("cuda")) == [chunks]  # a GPU: the batch in one go


def test_fused_halves_run_side_by_side_with_the_same_bits_as_in_order(monkeypatch, gemm):
    # the two halves of a CPU batch each keep their own sums, so running them side by side
    # (two threads) or one after the other (any thread count) gives the same bits
    import threading

    import lib.models.kernels.fused as fused
    from lib import runtime

    torch.manual_seed(0)
    dec = Decoder(3, **CONFIGS["deepsdf"]).train()
    dec.fused_chunk = 37
    codes = torch.randn(3, 3, requires_grad=True)
    xyz = torch.rand(3, 101, 3) * 2 - 1
    sdf = torch.rand(3, 101) * 0.3 - 0.15
    params = [codes] + list(dec.parameters())
    seen = []
    real = fused._run_chunks
    monkeypatch.setattr(fused, "_run_chunks", lambda sh, part, chunks: seen.append(threading.get_ident())
                        or real(sh, part, chunks))

    def grads(side_by_side, threads):
        monkeypatch.setattr(runtime.SETTINGS, "concurrent", side_by_side)
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            torch.manual_seed(5)
            loss = dec.clamped_l1_loss(codes, xyz, sdf, 0.1)
            return [loss.detach()] + list(torch.autograd.grad(loss, params))
        finally:
            torch.set_num_threads(before)

    side = grads(True, 2)
    assert len(seen) == 2 and seen[0] != seen[1]  # the halves ran on two threads
    seen.clear()
    for config in ((False, 2), (False, 1), (True, 1)):
        other = grads(*config)
        assert len(seen) == 2 and seen[0] == seen[1]  # one after the other
        seen.clear()
        for a, b in zip(side, other):
            assert torch.equal(a, b)


def test_a_cpu_training_step_reuses_its_memory_instead_of_page_faulting_it_in_again(gemm):
    # each step allocates and frees MBs of scratch (and oneDNN's outputs); glibc's default
    # thresholds hand much of it back to the kernel, to be faulted in and zeroed next step
    torch.manual_seed(0)
    dec = Decoder(2, dims=[128] * 4, dropout=[0, 1, 2, 3], dropout_prob=0.2, latent_in=[2], weight_norm=True,
                  norm_layers=[0, 1, 2, 3], positional_encoding=True, fourier_degree=3).train()
    dec.fused_chunk = 2048
    codes = torch.randn(2, 2, requires_grad=True)
    xyz, sdf = torch.rand(2, 8192, 3) * 2 - 1, torch.rand(2, 8192) * 0.2 - 0.1

    def step():
        dec.clamped_l1_loss(codes, xyz, sdf, 0.1).backward()

    # three steps allocate > 24 MiB (6144 pages) of activations alone, so under 4096 faults most
    # of it is reused (without the setting: 8k-22k); the least of five rounds, since a thread may
    # take a fresh malloc arena when another holds its own (seen in full-suite runs: 3587 once)
    assert least_page_faults(step, rounds=5) < 4096
