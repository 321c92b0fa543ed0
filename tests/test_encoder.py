import pytest
import torch

from lib.models.encoder import BatchInstanceNorm2d, Encoder, block_layout


def _expected_layout(code: int, depth: int, widths=(64, 128, 256, 256), norm_params=lambda c: 2 * c):
    """{state-dict parameter name: shape} of the original's CIFAR ResNet, written out from its
    description: stem conv1 3x3 4->w0 + bn1; n BasicBlocks per stage (conv1/bn1/conv2/bn2),
    strides 1, 2, 2, 2, a 1x1 downsample conv + norm where the stride or the width changes; fc."""
    n = (depth - 2) // 6
    out = {"conv1.weight": (widths[0], 4, 3, 3), "bn1.weight": (widths[0],), "bn1.bias": (widths[0],)}
    cin = widths[0]
    for s, (w, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            out[p + "conv1.weight"] = (w, cin, 3, 3)
            out[p + "conv2.weight"] = (w, w, 3, 3)
            for k in ("bn1", "bn2"):
                out[p + k + ".weight"] = (w,)
                out[p + k + ".bias"] = (w,)
            if b == 0 and (stride != 1 or cin != w):
                out[p + "downsample.0.weight"] = (w, cin, 1, 1)
                out[p + "downsample.1.weight"] = (w,)
                out[p + "downsample.1.bias"] = (w,)
            cin = w
    out["fc.weight"] = (code, cin)
    out["fc.bias"] = (code,)
    return out


def test_original_encoder_layout_and_parameter_count():
    enc = Encoder(256, depth=20, norm="in")
    expected = _expected_layout(256, 20)
    got = {k: tuple(v.shape) for k, v in enc.state_dict().items()}
    assert got == expected           # "in" keeps no running statistics: parameters only
    count = sum(p.numel() for p in enc.parameters())
    assert count == sum(torch.Size(s).numel() for s in expected.values()) == 7_999_616
    # 12 BasicBlocks, layer4's first one with a shortcut although 256 -> 256
    assert sum(1 for k in got if k.endswith("conv2.weight")) == 12
    assert "layer4.0.downsample.0.weight" in got and "layer1.0.downsample.0.weight" not in got


def test_original_checkpoint_with_module_prefix_loads(tmp_path):
    from lib import experiment

    torch.manual_seed(0)
    src = Encoder(16, depth=8, norm="bn", widths=(8, 16, 16, 16))
    state = {"module." + k: v for k, v in src.state_dict().items()}
    (tmp_path / "ModelParameters").mkdir()
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "ModelParameters" / "encoder_latest.pth")
    dst = Encoder(16, depth=8, norm="bn", widths=(8, 16, 16, 16))
    assert experiment.load_model_state(tmp_path, dst, "encoder_latest") == 3
    x = torch.rand(2, 4, 16, 16)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_block_layout_and_bottleneck():
    # n = (Depth - 2) // 6 blocks per stage for every depth; Bottleneck from 44 on
    assert block_layout(20) == (block_layout(8)[0], 3) and block_layout(8)[1] == 1
    assert block_layout(44)[1] == 7 and block_layout(44)[0].expansion == 4
    assert block_layout(56)[1] == 9 and block_layout(38)[0].expansion == 1
    for bad in (2, 7, 10, 21, 45, 47):
        with pytest.raises(ValueError):
            block_layout(bad)
    enc = Encoder(8, depth=50, norm="in", widths=(4, 8, 8, 8))
    assert enc.fc.in_features == 32 and len(enc.layer1) == 8
    assert "layer1.0.downsample.0.weight" in enc.state_dict()   # 4 -> 16 channels
    assert enc(torch.rand(1, 4, 16, 16)).shape == (1, 8)


def _original_bin_state(code, depth, widths, seed=0):
    """A state dict in the original's key layout for NormType "bin", Depth >= 44 (Bottleneck),
    written out from its description: each norm holds weight, bias, gate (C,), running_mean,
    running_var; blocks conv1 1x1, conv2 3x3 (stride), conv3 1x1 to 4 x planes; downsample
    where the stride or the width changes; random values."""
    g = torch.Generator().manual_seed(seed)
    n = (depth - 2) // 6
    out = {}

    def norm(name, c):
        out[name + ".weight"] = 1 + 0.1 * torch.randn(c, generator=g)
        out[name + ".bias"] = 0.1 * torch.randn(c, generator=g)
        out[name + ".gate"] = torch.rand(c, generator=g)
        out[name + ".running_mean"] = 0.1 * torch.randn(c, generator=g)
        out[name + ".running_var"] = 1 + torch.rand(c, generator=g)

    out["conv1.weight"] = 0.1 * torch.randn(widths[0], 4, 3, 3, generator=g)
    norm("bn1", widths[0])
    cin = widths[0]
    for s, (w, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
        for b in range(n):
            p = f"layer{s + 1}.{b}."
            out[p + "conv1.weight"] = 0.1 * torch.randn(w, cin, 1, 1, generator=g)
            norm(p + "bn1", w)
            out[p + "conv2.weight"] = 0.1 * torch.randn(w, w, 3, 3, generator=g)
            norm(p + "bn2", w)
            out[p + "conv3.weight"] = 0.1 * torch.randn(4 * w, w, 1, 1, generator=g)
            norm(p + "bn3", 4 * w)
            if b == 0 and (stride != 1 or cin != 4 * w):
                out[p + "downsample.0.weight"] = 0.1 * torch.randn(4 * w, cin, 1, 1, generator=g)
                norm(p + "downsample.1", 4 * w)
            cin = 4 * w
    out["fc.weight"] = 0.1 * torch.randn(code, cin, generator=g)
    out["fc.bias"] = torch.zeros(code)
    return out


def test_original_bin_bottleneck_checkpoint_loads(tmp_path):
    from lib import experiment

    state = _original_bin_state(8, 44, (4, 8, 8, 8))
    (tmp_path / "ModelParameters").mkdir()
    torch.save({"epoch": 7, "model_state_dict": {"module." + k: v for k, v in state.items()}},
               tmp_path / "ModelParameters" / "encoder_latest.pth")
    enc = Encoder(8, depth=44, norm="bin", widths=(4, 8, 8, 8))
    assert experiment.load_model_state(tmp_path, enc, "encoder_latest") == 7
    got = enc.state_dict()
    for k, v in state.items():
        assert torch.equal(got[k], v), k
    assert enc.eval()(torch.rand(2, 4, 16, 16)).shape == (2, 8)


def test_batch_instance_norm_is_the_originals():
    """gate g (C,) starting at 1; out = BN(x) (weight * g, bias) + IN(x) * weight * (1 - g): the bias
    once, the gate used as it is (no clamp); eval mode uses the running statistics for the BN part."""
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 6) * 3 + 2
    m = BatchInstanceNorm2d(5)
    assert torch.equal(m.gate, torch.ones(5))
    assert {k for k in m.state_dict()} >= {"weight", "bias", "gate", "running_mean", "running_var"}
    with torch.no_grad():
        m.weight.copy_(torch.rand(5) + 0.5)
        m.bias.copy_(torch.randn(5))
        m.gate.copy_(torch.tensor([1.3, 1.0, 0.5, 0.0, -0.2]))   # outside [0, 1] too: not clamped
    w, b, g = m.weight[:, None, None], m.bias[:, None, None], m.gate[:, None, None]
    bn = (x - x.mean((0, 2, 3), keepdim=True)) / torch.sqrt(x.var((0, 2, 3), unbiased=False, keepdim=True) + 1e-5)
    inn = (x - x.mean((2, 3), keepdim=True)) / torch.sqrt(x.var((2, 3), unbiased=False, keepdim=True) + 1e-5)
    torch.testing.assert_close(m.train()(x), bn * w * g + b + inn * w * (1 - g))
    rm, rv = m.running_mean[:, None, None], m.running_var[:, None, None]
    torch.testing.assert_close(m.eval()(x), (x - rm) / torch.sqrt(rv + 1e-5) * w * g + b + inn * w * (1 - g))


@pytest.mark.parametrize("norm", ["in", "bn", "bin"])
def test_encoder_shapes_and_gradients(norm):
    enc = Encoder(latent_size=16, depth=8, norm=norm, widths=(8, 16, 16, 16))
    x = torch.rand(2, 4, 32, 32, requires_grad=True)
    z = enc(x)
    assert z.shape == (2, 16)
    z.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # strides 1, 2, 2, 2: 32 -> 4
    assert enc.features(x).shape[-2:] == (4, 4)


def test_initialisation():
    torch.manual_seed(0)
    enc = Encoder(8, depth=20, norm="bn")
    w = enc.layer3[1].conv1.weight       # 3x3, 256 out: std sqrt(2 / (9 * 256))
    assert w.std().item() == pytest.approx((2 / (9 * 256)) ** 0.5, rel=0.02)
    assert abs(w.mean().item()) < 1e-3
    assert torch.equal(enc.layer2[0].bn1.weight, torch.ones(128))
    assert torch.equal(enc.layer2[0].downsample[1].bias, torch.zeros(128))
