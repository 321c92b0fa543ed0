"""The gradient check: layer gradients vs finite differences of re-extracted meshes."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from lib.layer.gradient_check import check_gradients, format_report

REPO = Path(__file__).resolve().parents[1]
SHIPPED = REPO / "experiments" / "bob_and_spot"


class Blob(nn.Module):
    """A ball warped by a small tanh layer, scaled by ``k`` (|grad| = k: not a distance field)."""

    def __init__(self, k=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.k = k
        self.radius = nn.Parameter(torch.tensor(0.5))
        self.warp = nn.Linear(3, 4)
        self.out = nn.Linear(4, 1)

    def forward(self, p):
        bump = torch.tanh(self.out(torch.tanh(2 * self.warp(p)))).squeeze(1)
        return self.k * (p.norm(dim=1) - self.radius + 0.1 * bump)


def groups_of(net):
    return {"radius": [net.radius], "warp": list(net.warp.parameters()), "out": list(net.out.parameters())}


def test_exact_within_2_percent_and_paper_off_by_the_gradient_norm():
    net = Blob(k=2.0)
    before = [p.detach().clone() for p in net.parameters()]
    checks = check_gradients(net, groups_of(net), resolution=64)
    assert [c.name for c in checks] == ["radius", "warp", "out"]
    for c in checks:
        assert abs(c.fd) > 1e-4
        assert c.error["exact"] < 0.02, format_report(checks)
        # |grad s| = 2 on the surface: the paper's rule gives twice the exact gradient
        assert c.layer["paper"] == pytest.approx(2 * c.layer["exact"], rel=0.1)
        assert c.error["paper"] > 0.5
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))  # parameters restored
    assert all(p.grad is None and p.requires_grad for p in net.parameters())


def test_a_wrong_gradient_is_caught():
    """A parameter whose backward is deliberately scaled by 1.3: the check must report ~30 %."""
    net = Blob()

    class Scaled(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            return x.clone()

        @staticmethod
        def backward(ctx, g):
            return 1.3 * g

    def field(p):
        return p.norm(dim=1) - Scaled.apply(net.radius)

    (c,) = check_gradients(field, {"radius": [net.radius]}, resolution=40)
    assert c.error["exact"] == pytest.approx(0.3, abs=0.03)


@pytest.mark.slow
def test_shipped_model_within_2_percent():
    if not (SHIPPED / "ModelParameters" / "latest.pth").is_file():
        pytest.skip("no shipped checkpoint")
    from lib import experiment
    from lib.experiment.specs import load_specs

    specs = load_specs(SHIPPED)
    dec = experiment.load_decoder(SHIPPED, specs).eval()
    code = experiment.load_latent_codes(SHIPPED)[0].clone()
    for p in dec.parameters():
        p.requires_grad_(False)
    layers = [name for name, m in dec.named_children() if list(m.parameters())]
    groups = {"latent code": [code], layers[-1]: list(getattr(dec, layers[-1]).parameters())}
    field = lambda p: dec(torch.cat((code.expand(p.shape[0], -1), p), 1)).reshape(-1)  # noqa: E731
    checks = check_gradients(field, groups, resolution=256)
    assert all(c.error["exact"] < 0.02 for c in checks), format_report(checks)


def test_command_bad_code_is_one_line_exit_2(tmp_path):
    if not (SHIPPED / "ModelParameters" / "latest.pth").is_file():
        pytest.skip("no shipped checkpoint")
    r = subprocess.run([sys.executable, str(REPO / "check_gradients.py"), "-e", str(SHIPPED), "--code", "99"],
                       capture_output=True, text=True, cwd=tmp_path)
    assert r.returncode == 2 and "--code 99" in r.stderr and len(r.stderr.strip().splitlines()) == 1
