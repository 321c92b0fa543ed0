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
    from lib import checkpoint

    torch.manual_seed(0)
    src = Encoder(16, depth=8, norm="bn", widths=(8, 16, 16, 16))
    state = {"module." + k: v for k, v in src.state_dict().items()}
    (tmp_path / "ModelParameters").mkdir()
    torch.save({"epoch": 3, "model_state_dict": state}, tmp_path / "ModelParameters" / "encoder_latest.pth")
    dst = Encoder(16, depth=8, norm="bn", widths=(8, 16, 16, 16))
    assert checkpoint.load_model_state(tmp_path, dst, "encoder_latest") == 3
    x = torch.rand(2, 4, 16, 16)
    assert torch.equal(src.eval()(x), dst.eval()(x))


def test_block_layout_and_bottleneck():
    assert block_layout(20)[1] == 3 and block_layout(8)[1] == 1 and block_layout(56)[1] == 6
    assert block_layout(56)[0].expansion == 4
    for bad in (7, 10, 21, 45):
        with pytest.raises(ValueError):
            block_layout(bad)
    enc = Encoder(8, depth=47, norm="in", widths=(4, 8, 8, 8))
    assert enc.fc.in_features == 32 and len(enc.layer1) == 5
    assert "layer1.0.downsample.0.weight" in enc.state_dict()   # 4 -> 16 channels
    assert enc(torch.rand(1, 4, 16, 16)).shape == (1, 8)


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


def test_batch_instance_norm_limits():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 6, 6) * 3 + 2
    m = BatchInstanceNorm2d(5).train()
    with torch.no_grad():
        m.rho.fill_(0.0)
    torch.testing.assert_close(m(x), torch.nn.functional.instance_norm(x, eps=1e-5))
    with torch.no_grad():
        m.rho.fill_(1.0)
    torch.testing.assert_close(m(x), torch.nn.functional.batch_norm(x, None, None, training=True, eps=1e-5))
