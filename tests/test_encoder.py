import pytest
import torch

from lib.models.encoder import BatchInstanceNorm2d, Encoder, blocks_per_stage


def test_blocks_per_stage():
    assert blocks_per_stage(20, 4) == [3, 2, 2, 2]
    assert blocks_per_stage(18, 4) == [2, 2, 2, 2]
    with pytest.raises(ValueError):
        blocks_per_stage(7, 4)


@pytest.mark.parametrize("norm", ["in", "bn", "bin"])
def test_encoder_shapes_and_gradients(norm):
    enc = Encoder(latent_size=16, depth=10, norm=norm, widths=(8, 16, 16, 16))
    x = torch.rand(2, 4, 32, 32, requires_grad=True)
    z = enc(x)
    assert z.shape == (2, 16)
    z.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    # 4 stages, stride 2 in the last three: 32 -> 4
    assert enc.stages(enc.stem(x)).shape[-2:] == (4, 4)


def test_encoder_depth_counts_weighted_layers():
    enc = Encoder(latent_size=8, depth=20, norm="in")
    convs3 = [m for m in enc.modules() if isinstance(m, torch.nn.Conv2d) and m.kernel_size == (3, 3)]
    linears = [m for m in enc.modules() if isinstance(m, torch.nn.Linear)]
    assert len(convs3) + len(linears) == 20


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
