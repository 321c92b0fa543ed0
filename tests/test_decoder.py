import math

import pytest
import torch

import lib.models.decoder as decoder_mod
from lib.errors import MeshSDFError
from lib.models.decoder import (Decoder, WeightNormLinear, decoder_from_specs, dropout_mask,
                                effective_dropout_prob, positional_encoding, sdf)

SPEC_NET = dict(dims=[128] * 8, dropout=list(range(8)), dropout_prob=0.2, norm_layers=list(range(8)),
                latent_in=[4], xyz_in_all=False, use_tanh=False, latent_dropout=False, weight_norm=True,
                positional_encoding=True, fourier_degree=5)


def test_positional_encoding_is_the_originals_cos_then_sin_with_3_1415():
    xyz = torch.tensor([[0.25, -0.5, 0.125], [1.0, 0.0, -1.0]], dtype=torch.float64)
    enc = positional_encoding(xyz, 3)
    assert enc.shape == (2, 6 * 3)  # no raw xyz
    for n in range(2):
        cos = [math.cos(2.0 ** lvl * 3.1415 * v) for lvl in range(3) for v in xyz[n]]
        sin = [math.sin(2.0 ** lvl * 3.1415 * v) for lvl in range(3) for v in xyz[n]]
        assert torch.allclose(enc[n], torch.tensor(cos + sin, dtype=torch.float64), atol=1e-12)
    # 3.1415, not pi: at x = 1, sin(pi) would be 0 but sin(3.1415) is 9.27e-5
    assert abs(positional_encoding(torch.ones(1, 3, dtype=torch.float64), 1)[0, 3].item() - math.sin(3.1415)) < 1e-15
    assert torch.equal(positional_encoding(xyz, 0), xyz)
    assert positional_encoding(torch.zeros(4, 7, 3), 2).shape == (4, 7, 12)


def test_spec_network_shapes_and_state_dict_names():
    dec = Decoder(2, **SPEC_NET)
    assert dec.input_size == 2 + 30
    assert dec.lin0.weight_v.shape == (128, 32) and dec.lin0.weight_g.shape == (128, 1)
    assert dec.lin3.weight_v.shape == (128 - 32, 128)  # shrinks so that layer 4's input is 128 wide
    assert dec.lin4.weight_v.shape == (128, 128)
    assert dec.lin8.weight.shape == (1, 128) and isinstance(dec.lin8, torch.nn.Linear)
    keys = set(dec.state_dict())
    assert {"lin0.weight_g", "lin0.weight_v", "lin0.bias", "lin8.weight", "lin8.bias"} <= keys
    dec.eval()
    out = dec(torch.randn(1000, 5))
    assert out.shape == (1000, 1) and out.abs().max() < 1


def test_options_change_the_network():
    ln = Decoder(3, dims=[32, 32, 32], norm_layers=[0, 1, 2], weight_norm=False)
    assert isinstance(ln.bn0, torch.nn.LayerNorm) and isinstance(ln.lin0, torch.nn.Linear)
    xyz_all = Decoder(3, dims=[32, 32, 32], xyz_in_all=True)
    assert xyz_all.lin0.weight.shape == (29, 6) and xyz_all.lin1.weight.shape == (29, 32)
    assert xyz_all.lin3.weight.shape == (1, 32)
    assert xyz_all(torch.randn(10, 6)).shape == (10, 1)
    tanh2 = Decoder(3, dims=[16], use_tanh=True)
    plain = Decoder(3, dims=[16])
    plain.load_state_dict(tanh2.state_dict())
    x = torch.randn(20, 6)
    assert torch.allclose(tanh2(x), torch.tanh(torch.tanh(torch.atanh(plain(x).clamp(-0.999999, 0.999999)))), atol=1e-5)
    with pytest.raises(ValueError):
        Decoder(2, dims=[8, 8], latent_in=[1], positional_encoding=True, fourier_degree=2)
    with pytest.raises(MeshSDFError, match="NetworkSpecs"):
        decoder_from_specs({"CodeLength": 2, "NetworkSpecs": {"dims": [4, 4], "latent_in": [1]}})


def test_weight_norm_rows_have_norm_g():
    lin = WeightNormLinear(7, 5)
    with torch.no_grad():
        lin.weight_g.mul_(torch.arange(1, 6, dtype=torch.float32)[:, None])
    assert torch.allclose(lin.weight.norm(dim=1, keepdim=True), lin.weight_g, atol=1e-6)


def test_dropout_mask_probability_and_independence():
    torch.manual_seed(0)
    p = 0.2
    a = dropout_mask((1000, 1000), p)
    b = dropout_mask((1000, 1000), p)
    assert a.dtype == torch.float32 and set(a.unique().tolist()) <= {0.0, 1.0}
    dropped = 1 - a.mean().item()
    sigma = math.sqrt(p * (1 - p) / a.numel())
    assert abs(dropped - effective_dropout_prob(p)) < 5 * sigma
    assert abs(effective_dropout_prob(p) - p) < 1e-5
    # independent masks: P(both dropped) = p^2; every 16-bit lane of the draws is used
    both = ((1 - a) * (1 - b)).mean().item()
    assert abs(both - p * p) < 5 * math.sqrt(p * p / a.numel())
    for lane in range(4):
        frac = 1 - a.reshape(-1, 4)[:, lane].mean().item()
        assert abs(frac - p) < 5 * math.sqrt(p * (1 - p) / (a.numel() / 4))
    assert dropout_mask((3, 5), 0.0).min() == 1


def _reference_forward(dec, inputs, masks):
    """Plain relu + inverted dropout with given keep masks, same parameters."""
    x0 = torch.cat((inputs[:, :dec.latent_size],
                    positional_encoding(inputs[:, dec.latent_size:], dec.fourier_degree)), 1)
    x = x0
    scale = 1.0 / (1.0 - effective_dropout_prob(dec.dropout_prob))
    masks = iter(masks)
    for i in range(dec.num_layers):
        lin = getattr(dec, f"lin{i}")
        if i in dec.latent_in:
            x = torch.cat((x, x0), 1)
        x = torch.nn.functional.linear(x, lin.weight, lin.bias)
        if i == dec.num_layers - 1:
            break
        x = torch.relu(x)
        if i in dec.dropout:
            x = x * next(masks) * scale
    return torch.tanh(x)


def test_training_forward_is_inverted_dropout(monkeypatch):
    """The folded-scale, in-place relu+dropout equals relu then dropout(p), values and gradients."""
    torch.manual_seed(1)
    dec = Decoder(2, dims=[32] * 4, dropout=[0, 1, 2, 3], dropout_prob=0.3, norm_layers=[0, 1, 2, 3],
                  latent_in=[2], weight_norm=True, positional_encoding=True, fourier_degree=2).train()
    masks = []
    real = decoder_mod.dropout_mask

    def recording(*args, **kw):
        masks.append(real(*args, **kw))
        return masks[-1]

    monkeypatch.setattr(decoder_mod, "dropout_mask", recording)
    inputs = torch.randn(300, 5, requires_grad=True)
    out = dec(inputs)
    assert len(masks) == 4
    g_out = torch.randn_like(out)
    grads = torch.autograd.grad(out, [inputs] + list(dec.parameters()), g_out)
    inputs2 = inputs.detach().clone().requires_grad_(True)
    ref = _reference_forward(dec, inputs2, masks)
    ref_grads = torch.autograd.grad(ref, [inputs2] + list(dec.parameters()), g_out)
    assert torch.allclose(out, ref, atol=1e-6)
    for g, r in zip(grads, ref_grads):
        assert torch.allclose(g, r, atol=1e-5, rtol=1e-4)
    # eval: no dropout at all, deterministic
    dec.eval()
    with torch.no_grad():
        assert torch.equal(dec(inputs), dec(inputs))


def test_dropout_is_seeded():
    dec = Decoder(2, **SPEC_NET).train()
    x = torch.randn(50, 5)
    torch.manual_seed(3)
    a = dec(x)
    torch.manual_seed(3)
    b = dec(x)
    c = dec(x)
    assert torch.equal(a, b) and not torch.equal(b, c)


def test_sdf_helper_chunks_and_keeps_graph():
    torch.manual_seed(0)
    dec = Decoder(3, dims=[16, 16]).eval()
    z = torch.randn(3, requires_grad=True)
    xyz = torch.rand(1001, 3)
    full = dec(torch.cat((z.expand(1001, 3), xyz), 1)).reshape(-1)
    chunked = sdf(dec, z, xyz, chunk=100)
    assert chunked.shape == (1001,) and torch.allclose(full, chunked, atol=1e-6)
    chunked.sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()
    assert sdf(dec, z, torch.zeros(0, 3)).shape == (0,)
