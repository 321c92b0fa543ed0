"""The differentiable layer: analytic gradients, finite differences of re-extracted meshes,
decoder weights, topology change."""
import pytest
import torch
from torch import nn

from lib.errors import MeshSDFError
from lib.isosurface import extract, same_mesh
from lib.meshsdf import mesh_from_sdf
from lib.metrics import connected_components, genus
from lib.models.decoder import Decoder
from lib.models.decoder import sdf as decoder_sdf


class Sphere(nn.Module):
    """s = k (|x| - z): a sphere of radius z whose SDF is scaled by k."""

    def __init__(self, k=1.0):
        super().__init__()
        self.k = k

    def forward(self, inp):
        return self.k * (inp[:, 1:].norm(dim=1, keepdim=True) - inp[:, :1])


class Torus(nn.Module):
    """latent (R, r): an exact distance field."""

    def forward(self, inp):
        big, small, x = inp[:, :1], inp[:, 1:2], inp[:, 2:]
        q = torch.cat([x[:, :2].norm(dim=1, keepdim=True) - big, x[:, 2:]], 1)
        return q.norm(dim=1, keepdim=True) - small


class Bumpy(nn.Module):
    """latent (a, b): a displaced ball; |grad s| != 1, so 'paper' and 'exact' differ."""

    def forward(self, inp):
        a, b, x = inp[:, :1], inp[:, 1:2], inp[:, 2:]
        return (x.norm(dim=1, keepdim=True) - a + b * torch.sin(3 * x).prod(1, keepdim=True)
                + 0.3 * (x ** 2).sum(1, keepdim=True))


class Blend(nn.Module):
    """latent t: (1 - t) ball + t torus; the hole opens at t = 2/3."""

    def forward(self, inp):
        t, x = inp[:, :1], inp[:, 1:]
        ball = x.norm(dim=1, keepdim=True) - 0.6
        q = torch.cat([x[:, :2].norm(dim=1, keepdim=True) - 0.5, x[:, 2:]], 1)
        return (1 - t) * ball + t * (q.norm(dim=1, keepdim=True) - 0.2)


def _tri(v, f):
    return v[f[:, 0]], v[f[:, 1]], v[f[:, 2]]


def volume(v, f):
    a, b, c = _tri(v, f)
    return (a * torch.cross(b, c, dim=1)).sum() / 6


def area(v, f):
    a, b, c = _tri(v, f)
    return torch.cross(b - a, c - a, dim=1).norm(dim=1).sum() / 2


def moment(v, f):
    """Area-weighted integral of z^2 + x / 2 over the surface."""
    a, b, c = _tri(v, f)
    cen = (a + b + c) / 3
    return (torch.cross(b - a, c - a, dim=1).norm(dim=1) / 2 * (cen[:, 2] ** 2 + 0.5 * cen[:, 0])).sum()


def fd_gradient(decoder, z0, losses, n, eps=0.01):
    """Central differences of each loss(re-extracted mesh) in each latent coordinate: (losses, L)."""
    out = torch.zeros(len(losses), len(z0))
    for i in range(len(z0)):
        for sign in (1, -1):
            z = torch.tensor(z0)
            z[i] += sign * eps
            with torch.no_grad():
                v, f, _ = extract(lambda p: decoder_sdf(decoder, z, p), n)
                for j, loss in enumerate(losses):
                    out[j, i] += sign * float(loss(v, f)) / (2 * eps)
    return out


@pytest.mark.parametrize("k", [1.0, 2.0])
def test_sphere_radius_gradient(k):
    """d(mean vertex radius)/dz: exact 1 for any k; paper gives k (its unit normal ignores |grad s|)."""
    for gradient, expected in (("exact", 1.0), ("paper", k)):
        z = torch.tensor([0.5], requires_grad=True)
        mesh = mesh_from_sdf(Sphere(k), z, 40, gradient=gradient)
        mesh.verts.norm(dim=1).mean().backward()
        assert z.grad.item() == pytest.approx(expected, rel=1e-4)
        v = mesh.verts.shape[0]
        # dL/ds_i = -(g_i . n_i) (paper) with g_i = x_i / (|x_i| V)
        assert mesh.state.dl_ds.shape == (v,)
        assert torch.allclose(mesh.state.dl_ds, torch.full((v,), -1.0 / v / (k if gradient == "exact" else 1.0)),
                              rtol=1e-4)


@pytest.mark.parametrize("decoder,z0", [(Torus(), [0.5, 0.2]), (Bumpy(), [0.5, 0.3])], ids=["torus", "bumpy"])
def test_gradients_match_finite_differences(decoder, z0):
    losses = (volume, area, moment)
    fd = fd_gradient(decoder, z0, losses, 48)
    for gradient in ("exact", "paper"):
        z = torch.tensor(z0, requires_grad=True)
        mesh = mesh_from_sdf(decoder, z, 48, gradient=gradient)
        for j, loss in enumerate(losses):
            z.grad = None
            loss(mesh.verts, mesh.faces).backward(retain_graph=True)
            err = (z.grad - fd[j]).norm() / fd[j].norm()
            if gradient == "exact" or isinstance(decoder, Torus):  # |grad s| = 1: paper == exact
                assert err < 0.02, (gradient, loss.__name__, z.grad, fd[j])
            else:  # the paper's rule is off by |grad s| on the displaced ball
                assert err > 0.05, (gradient, loss.__name__, z.grad, fd[j])


class Warped(nn.Module):
    """A ball warped by a small MLP: gradients must reach its weights."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.hidden = nn.Linear(3, 8)
        self.out = nn.Linear(8, 1)

    def forward(self, inp):
        x = inp[:, 1:]
        return x.norm(dim=1, keepdim=True) - inp[:, :1] + 0.1 * torch.tanh(self.out(torch.tanh(3 * self.hidden(x))))


def test_gradient_reaches_decoder_weights():
    dec = Warped()
    z = torch.tensor([0.5])  # latent fixed: only the weights get gradients
    mesh = mesh_from_sdf(dec, z, 48, gradient="exact")
    volume(mesh.verts, mesh.faces).backward()
    grad = dec.hidden.weight.grad[2, 1].item()
    assert dec.out.weight.grad.abs().sum() > 0
    eps, vals = 0.02, []
    for sign in (1, -1):
        with torch.no_grad():
            dec.hidden.weight[2, 1] += sign * eps
            v, f, _ = extract(lambda p: decoder_sdf(dec, z, p), 48)
            dec.hidden.weight[2, 1] -= sign * eps
        vals.append(float(volume(v, f)))
    fd = (vals[0] - vals[1]) / (2 * eps)
    assert abs(fd) > 1e-3 and grad == pytest.approx(fd, rel=0.02)


def test_deepsdf_decoder_end_to_end():
    """The project's Decoder (quickly fitted to a ball): latent gradient matches FD, modes agree."""
    torch.manual_seed(0)
    dec = Decoder(2, [32, 32, 32], latent_in=[2])
    opt = torch.optim.Adam(dec.parameters(), lr=1e-2)
    z = torch.tensor([0.3, -0.2])
    for _ in range(60):
        p = torch.cat((torch.randn(384, 3) * 0.4, torch.rand(256, 3) * 2.4 - 1.2))
        target = (p.norm(dim=1) - 0.5).clamp(-0.2, 0.2)
        loss = (decoder_sdf(dec, z, p) - target).abs().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    dec.eval()
    for p in dec.parameters():
        p.requires_grad_(False)
    lat = z.clone().requires_grad_(True)
    mesh = mesh_from_sdf(dec, lat, 48, gradient="exact")
    assert connected_components(mesh.faces) == 1 and genus(mesh.verts.detach(), mesh.faces) == 0
    assert mesh.verts.abs().max() < 0.9  # closed, away from the box
    vd, fd_, _ = extract(lambda p: decoder_sdf(dec, z, p), 48, "dense")
    assert same_mesh(mesh.verts.detach(), mesh.faces, vd, fd_)[0]
    volume(mesh.verts, mesh.faces).backward()
    fd = fd_gradient(dec, z.tolist(), [volume], 48)[0]
    # a ReLU network is only piecewise smooth: kinks inside voxels separate the MC mesh's
    # finite differences from the implicit gradient a little more than for smooth fields
    assert (lat.grad - fd).norm() < 0.05 * fd.norm(), (lat.grad, fd)


def test_topology_change_genus_0_to_1():
    t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.1)
    dec, state, genera = Blend(), None, []
    for _ in range(12):
        mesh = mesh_from_sdf(dec, t, 24, state=state)
        state = mesh.state
        genera.append(genus(mesh.verts.detach(), mesh.faces))
        v = mesh.verts  # pull the vertices onto the core circle of the torus
        loss = ((v[:, :2].norm(dim=1) - 0.5) ** 2 + v[:, 2] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert genera[0] == 0 and genera[-1] == 1 and t.item() > 2 / 3


def test_empty_mesh_and_modes():
    z = torch.tensor([2.0], requires_grad=True)  # radius 2: the box is inside
    mesh = mesh_from_sdf(Sphere(), z, 16)
    assert mesh.state.empty and mesh.verts.shape == (0, 3)
    mesh.verts.sum().backward()
    assert z.grad is not None and z.grad.item() == 0.0
    z = torch.tensor([0.5], requires_grad=True)
    state = None
    for mode in ("dense", "fast", "sparse"):
        mesh = mesh_from_sdf(Sphere(), z, 32, mode=mode, state=state)
        state = mesh.state
        assert mesh.verts.requires_grad
    with torch.no_grad():
        assert not mesh_from_sdf(Sphere(), z, 16).verts.requires_grad
    with pytest.raises(MeshSDFError):
        mesh_from_sdf(Sphere(), z, 16, gradient="implicit")


def test_chunked_backward_and_latent_shape():
    z = torch.tensor([[0.5, 0.2]], requires_grad=True)  # (1, L) latent
    mesh = mesh_from_sdf(Torus(), z, 32, gradient="exact", chunk=100)  # many chunks, forward and backward
    volume(mesh.verts, mesh.faces).backward()
    whole = torch.tensor([[0.5, 0.2]], requires_grad=True)
    one = mesh_from_sdf(Torus(), whole, 32, gradient="exact")
    volume(one.verts, one.faces).backward()
    assert z.grad.shape == (1, 2) and torch.allclose(z.grad, whole.grad, rtol=1e-5)
    assert mesh.state.dl_ds.shape == (mesh.verts.shape[0],)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    z = torch.tensor([0.5, 0.2], device="cuda", requires_grad=True)
    mesh = mesh_from_sdf(Torus(), z, 48, gradient="exact")
    assert mesh.verts.is_cuda
    volume(mesh.verts, mesh.faces).backward()
    zc = torch.tensor([0.5, 0.2], requires_grad=True)
    cpu = mesh_from_sdf(Torus(), zc, 48, gradient="exact")
    volume(cpu.verts, cpu.faces).backward()
    assert torch.allclose(z.grad.cpu(), zc.grad, rtol=1e-3)
