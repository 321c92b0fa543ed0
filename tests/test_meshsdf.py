"""The differentiable layer: analytic gradients, finite differences of re-extracted meshes,
decoder weights, topology change."""
import math

import pytest
import torch
from torch import nn

from lib.errors import MeshSDFError
from lib.isosurface import extract, same_mesh
from lib.layer import field_device, mesh_from_field, mesh_from_sdf
from lib.metrics import connected_components, genus
from lib.models.decoder import Decoder
from lib.models.decoder import sdf as decoder_sdf

from fields import LatentSphere, LatentTorus, sphere, torus


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
        return (1 - t) * sphere(0.6)(x)[:, None] + t * torus(0.5, 0.2)(x)[:, None]


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
        mesh = mesh_from_sdf(LatentSphere(k), z, 40, gradient=gradient)
        mesh.verts.norm(dim=1).mean().backward()
        assert z.grad.item() == pytest.approx(expected, rel=1e-4)
        v = mesh.verts.shape[0]
        # dL/ds_i = -(g_i . n_i) (paper) with g_i = x_i / (|x_i| V)
        assert mesh.state.dl_ds.shape == (v,)
        assert torch.allclose(mesh.state.dl_ds, torch.full((v,), -1.0 / v / (k if gradient == "exact" else 1.0)),
                              rtol=1e-4)


@pytest.mark.parametrize("decoder,z0", [(LatentTorus(), [0.5, 0.2]), (Bumpy(), [0.5, 0.3])], ids=["torus", "bumpy"])
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
            if gradient == "exact" or isinstance(decoder, LatentTorus):  # |grad s| = 1: paper == exact
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


@pytest.mark.parametrize("gradient", ["paper", "exact"])
def test_one_pass_code_backward_equals_the_two_pass_rule(gradient):
    """A frozen DeepSDF decoder takes the one-backward path (normals and code derivatives
    from one pass); unfreezing a weight forces the generic two-pass path.  Both must give the
    same dL/ds and code gradients, for one code (level set at 0.01) and for a batch of two."""
    torch.manual_seed(1)
    dec = Decoder(2, [32, 32, 32], latent_in=[2], positional_encoding=True, fourier_degree=2).eval()
    base = torch.tensor([[0.3, -0.2], [-0.1, 0.4]])

    def run(frozen, codes):
        for p in dec.parameters():
            p.requires_grad_(not frozen)
        lat = codes.clone().requires_grad_(True)
        meshes = mesh_from_sdf(dec, lat if lat.shape[0] > 1 else lat[0], 32, gradient=gradient, level=0.01)
        meshes = meshes if isinstance(meshes, list) else [meshes]
        w = torch.linspace(-1, 1, 3)
        sum((m.verts * w).sum() + m.verts.square().sum() for m in meshes).backward()
        return lat.grad, torch.cat([m.state.dl_ds for m in meshes])

    for codes in (base[:1], base):
        g1, d1 = run(True, codes)
        g2, d2 = run(False, codes)
        assert d1.numel() > 100 and g1.abs().max() > 1e-4
        torch.testing.assert_close(d1, d2, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(g1, g2, rtol=1e-4, atol=1e-6)


def test_code_from_an_encoder_passes_the_gradient_on():
    """A code that is not a leaf (an encoder's output) gets dL/dcode and autograd carries it
    into the encoder: its weight gradient is dL/dcode (outer) features, dL/dcode taken from
    the same mesh meshed from a detached leaf copy of the code."""
    torch.manual_seed(2)
    dec = LatentTorus()
    enc = nn.Linear(4, 2)
    feat = torch.randn(4)
    with torch.no_grad():
        enc.weight.mul_(0.02)
        enc.bias.copy_(torch.tensor([0.5, 0.2]))

    def loss(mesh):
        return (mesh.verts.square() * torch.tensor([1.0, 0.5, 2.0])).sum()

    loss(mesh_from_sdf(dec, enc(feat), 32, level=0.01)).backward()
    leaf = enc(feat).detach().requires_grad_(True)
    loss(mesh_from_sdf(dec, leaf, 32, level=0.01)).backward()
    assert leaf.grad.abs().max() > 1e-4
    torch.testing.assert_close(enc.weight.grad, torch.outer(leaf.grad, feat))
    torch.testing.assert_close(enc.bias.grad, leaf.grad)


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
    mesh = mesh_from_sdf(LatentSphere(), z, 16)
    assert mesh.state.empty and mesh.verts.shape == (0, 3)
    mesh.verts.sum().backward()
    assert z.grad is not None and z.grad.item() == 0.0
    z = torch.tensor([0.5], requires_grad=True)
    state = None
    for mode in ("dense", "fast", "sparse"):
        mesh = mesh_from_sdf(LatentSphere(), z, 32, mode=mode, state=state)
        state = mesh.state
        assert mesh.verts.requires_grad
    with torch.no_grad():
        assert not mesh_from_sdf(LatentSphere(), z, 16).verts.requires_grad
    with pytest.raises(MeshSDFError):
        mesh_from_sdf(LatentSphere(), z, 16, gradient="implicit")


def test_chunked_backward_and_latent_shape():
    z = torch.tensor([[0.5, 0.2]], requires_grad=True)  # (1, L) latent
    mesh = mesh_from_sdf(LatentTorus(), z, 32, gradient="exact", chunk=100)  # many chunks, forward and backward
    volume(mesh.verts, mesh.faces).backward()
    whole = torch.tensor([[0.5, 0.2]], requires_grad=True)
    one = mesh_from_sdf(LatentTorus(), whole, 32, gradient="exact")
    volume(one.verts, one.faces).backward()
    assert z.grad.shape == (1, 2) and torch.allclose(z.grad, whole.grad, rtol=1e-5)
    assert mesh.state.dl_ds.shape == (mesh.verts.shape[0],)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda():
    z = torch.tensor([0.5, 0.2], device="cuda", requires_grad=True)
    mesh = mesh_from_sdf(LatentTorus(), z, 48, gradient="exact")
    assert mesh.verts.is_cuda
    volume(mesh.verts, mesh.faces).backward()
    zc = torch.tensor([0.5, 0.2], requires_grad=True)
    cpu = mesh_from_sdf(LatentTorus(), zc, 48, gradient="exact")
    volume(cpu.verts, cpu.faces).backward()
    assert torch.allclose(z.grad.cpu(), zc.grad, rtol=1e-3)


def test_the_device_of_a_field_is_that_of_what_it_holds():
    """A field written as a closure over a decoder and a code (check_gradients.py) is probed and
    meshed where they are: on CUDA its probe points went to the CPU and torch.cat mixed devices.
    The meta device stands in for a GPU here (tests/test_cuda.py meshes such a closure on CUDA)."""
    import functools

    meta = torch.device("meta")
    dec = nn.Linear(5, 1).to(meta)
    code = torch.zeros(2, device=meta)

    def closure(points):
        return dec(torch.cat((code.expand(points.shape[0], -1), points), 1)).reshape(-1)

    def scaled(points, k=torch.ones((), device=meta)):
        return points.norm(dim=1) * k

    assert field_device(closure) == meta
    assert field_device(scaled) == meta                                      # a default argument
    assert field_device(functools.partial(lambda p, c: p.norm(dim=1) - c, c=code)) == meta
    assert field_device(dec) == meta and field_device(dec.forward) == meta  # a module, a bound method
    buffers_only = nn.Module().to(meta)
    buffers_only.register_buffer("radius", torch.ones((), device=meta))
    assert field_device(buffers_only) == meta
    assert field_device(lambda p: p.norm(dim=1) - 0.5) is None              # holds nothing: the CPU
    # the probe evaluates a closure on the CPU tensors it holds, so the device found is used
    radius = torch.tensor(0.5, requires_grad=True)
    mesh = mesh_from_field(lambda p: p.norm(dim=1) - radius, 24)
    mesh.verts.sum().backward()
    assert mesh.verts.device.type == "cpu" and radius.grad is not None and float(radius.grad) != 0


# --- any field: xyz-only networks, occupancy, batches, critical points, refusals ------------

class SphereNet(nn.Module):
    """xyz-only SDF with a learnable parameter: radius = 0.35 + 0.25 sigmoid(theta)."""

    def __init__(self, theta=0.4):
        super().__init__()
        self.theta = nn.Parameter(torch.tensor(theta))

    def radius(self):
        return 0.35 + 0.25 * torch.sigmoid(self.theta)

    def forward(self, p):
        return p.norm(dim=1) - self.radius()


class TorusNet(nn.Module):
    """xyz-only exact torus SDF with learnable radii (R, r)."""

    def __init__(self, big=0.5, small=0.2):
        super().__init__()
        self.big = nn.Parameter(torch.tensor(big))
        self.small = nn.Parameter(torch.tensor(small))

    def forward(self, p):
        return torus(self.big, self.small)(p)


class Occupancy(nn.Module):
    """sigmoid(k (radius - |x|)): inside > 0.5, |grad| = k / 4 on the surface."""

    def __init__(self, k=8.0):
        super().__init__()
        self.sphere, self.k = SphereNet(), k

    def forward(self, p):
        return torch.sigmoid(self.k * (self.sphere.radius() - p.norm(dim=1)))


def mean_radius(v, f):
    return v.norm(dim=1).mean()


def fd_param(field, param, loss, n, eps=0.01, **kw):
    """Central difference of loss(re-extracted mesh) in one scalar parameter."""
    vals = []
    for sign in (1, -1):
        with torch.no_grad():
            param += sign * eps
            mesh = mesh_from_field(field, n, **kw)
            param -= sign * eps
            vals.append(float(loss(mesh.verts, mesh.faces)))
    return (vals[0] - vals[1]) / (2 * eps)


def test_xyz_sphere_network_exact_radius_gradient():
    net = SphereNet()
    mesh = mesh_from_field(net, 48, gradient="exact")
    mean_radius(mesh.verts, mesh.faces).backward()
    s = torch.sigmoid(net.theta.detach())
    truth = float(0.25 * s * (1 - s))
    fd = fd_param(net, net.theta, mean_radius, 48)
    assert net.theta.grad.item() == pytest.approx(truth, rel=0.02)
    assert net.theta.grad.item() == pytest.approx(fd, rel=0.02)


def test_xyz_torus_network_volume_gradient():
    net = TorusNet()
    mesh = mesh_from_field(net, 64, gradient="exact")
    volume(mesh.verts, mesh.faces).backward()
    big, small = 0.5, 0.2
    truth = {"big": 2 * math.pi ** 2 * small ** 2, "small": 4 * math.pi ** 2 * big * small}  # V = 2 pi^2 R r^2
    for name in ("big", "small"):
        param = getattr(net, name)
        fd = fd_param(net, param, volume, 64)
        assert param.grad.item() == pytest.approx(truth[name], rel=0.02), name
        assert param.grad.item() == pytest.approx(fd, rel=0.02), name


def test_occupancy_field_at_tau():
    occ = Occupancy(k=8.0)
    theta = occ.sphere.theta
    s = torch.sigmoid(theta.detach())
    truth = float(0.25 * s * (1 - s))
    grads = {}
    for gradient in ("exact", "paper"):
        theta.grad = None
        mesh = mesh_from_field(occ, 48, level=0.5, inside="above", gradient=gradient)
        assert (mesh.verts.detach().norm(dim=1) - occ.sphere.radius().item()).abs().max() < 0.01
        a, b, c = _tri(mesh.verts.detach(), mesh.faces)
        assert ((torch.cross(b - a, c - a, dim=1) * (a + b + c)).sum(1) > 0).all()  # outward
        mean_radius(mesh.verts, mesh.faces).backward()
        grads[gradient] = theta.grad.item()
    fd = fd_param(occ, theta, mean_radius, 48, level=0.5, inside="above")
    assert grads["exact"] == pytest.approx(truth, rel=0.02) and grads["exact"] == pytest.approx(fd, rel=0.02)
    # the paper's unit-normal rule is off by |grad occ| = k / 4 = 2 on a non-distance field
    assert grads["paper"] == pytest.approx(2 * truth, rel=0.03)
    # the same surface passed negated with the SDF convention: same mesh, same gradient
    theta.grad = None
    neg = mesh_from_field(lambda p: -occ(p), 48, level=-0.5, gradient="exact")
    mean_radius(neg.verts, neg.faces).backward()
    assert theta.grad.item() == pytest.approx(grads["exact"], rel=1e-5)


def test_batched_codes_one_backward_equal_per_code():
    codes = torch.tensor([[0.5, 0.2], [0.45, 0.15], [0.55, 0.25]], requires_grad=True)
    meshes = mesh_from_sdf(LatentTorus(), codes, 32, gradient="exact")
    assert isinstance(meshes, list) and len(meshes) == 3
    sum(volume(m.verts, m.faces) * (i + 1) for i, m in enumerate(meshes)).backward()
    for i in range(3):
        z = codes[i].detach().clone().requires_grad_(True)
        one = mesh_from_sdf(LatentTorus(), z, 32, gradient="exact")
        assert torch.equal(one.verts.detach(), meshes[i].verts.detach())
        (volume(one.verts, one.faces) * (i + 1)).backward()
        assert torch.allclose(codes.grad[i], z.grad, rtol=1e-5, atol=1e-7)
        assert meshes[i].state.dl_ds.shape == (meshes[i].verts.shape[0],)
    # one backward pass over the vertices of all three surfaces together
    seen = []

    def field(points, index):
        if torch.is_grad_enabled() and points.requires_grad:
            seen.append(int(index.unique().numel()))
        return LatentTorus()(torch.cat((codes[index], points), 1)).reshape(-1)

    meshes = mesh_from_field(field, 32, batch=3, gradient="exact")
    seen.clear()
    sum(volume(m.verts, m.faces) for m in meshes).backward()
    assert seen == [3]


class Saddle(nn.Module):
    """x^2 + y^2 - z^2 - c: a hyperboloid whose neck (radius sqrt(c)) pinches at a critical point."""

    def __init__(self, c=1e-5):
        super().__init__()
        self.c = nn.Parameter(torch.tensor(c))

    def forward(self, p):
        return p[:, 0] ** 2 + p[:, 1] ** 2 - p[:, 2] ** 2 - self.c


def test_exact_gradient_is_bounded_near_critical_points():
    field = Saddle()
    mesh = mesh_from_field(field, 33, gradient="exact")  # the origin is a grid point
    mesh.verts.sum().backward()  # g_i = (1, 1, 1)
    x = mesh.verts.detach()
    normal = torch.stack((2 * x[:, 0], 2 * x[:, 1], -2 * x[:, 2]), 1)
    norm = normal.norm(dim=1)
    floor = 0.05 * norm.median()
    dl_ds = mesh.state.dl_ds
    assert torch.isfinite(dl_ds).all() and torch.isfinite(field.c.grad)
    # the bound: |dL/ds_i| <= |g_i| / floor (a vertex moves at most 1 / floor per unit of s)
    assert (dl_ds.abs() <= 3 ** 0.5 / floor * (1 + 1e-4)).all()
    # it is active here: the unregularised rule would exceed it at the pinched vertices
    raw = -normal.sum(1) / norm.clamp_min(1e-12) ** 2
    assert (norm < floor).any() and raw.abs().max() > 10 * 3 ** 0.5 / floor
    # and it is the exact rule wherever |grad s| >= the floor
    ok = norm >= floor
    assert torch.allclose(dl_ds[ok], raw[ok], rtol=1e-4, atol=1e-6)


def test_train_mode_dropout_and_random_fields_are_refused():
    dec = Decoder(2, [16, 16], dropout=[0, 1], dropout_prob=0.2)  # train mode by default
    z = torch.zeros(2, requires_grad=True)
    with pytest.raises(MeshSDFError, match=r"\.eval\(\)"):
        mesh_from_sdf(dec, z, 16)
    with pytest.raises(MeshSDFError, match="differ"):
        mesh_from_field(lambda p: p.norm(dim=1) - 0.5 + 1e-3 * torch.rand(p.shape[0]), 16)
    dec.eval()
    mesh_from_sdf(dec, z, 16)  # eval mode: accepted (the surface may be empty)


def test_warm_start_equals_dense_along_an_optimisation_path_with_topology_change():
    """Sparse mode fed its previous state (tracking from last iteration's cells) == dense at every step."""
    t = torch.zeros(1, requires_grad=True)
    opt = torch.optim.Adam([t], lr=0.1)
    dec, state, genera, warm = Blend(), None, [], []
    for _ in range(12):
        mesh = mesh_from_sdf(dec, t, 32, state=state)
        state = mesh.state
        warm.append(state.warm)
        vd, fd_, _ = extract(lambda p: decoder_sdf(dec, t.detach(), p), 32, "dense")
        assert torch.equal(mesh.verts.detach(), vd) and torch.equal(mesh.faces, fd_)
        genera.append(genus(vd, fd_))
        v = mesh.verts
        loss = ((v[:, :2].norm(dim=1) - 0.5) ** 2 + v[:, 2] ** 2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert genera[0] == 0 and genera[-1] == 1  # the hole opened on the way
    assert warm == [False] + [True] * 11


def test_warm_start_follows_a_surface_that_jumps_and_a_new_piece():
    ball = lambda c, r=0.3: (lambda p: (p - torch.tensor(c)).norm(dim=1) - r)  # noqa: E731
    _, _, st = extract(ball((0.0, 0.0, 0.0)), 48, "sparse")
    cold = st.evaluations
    steps = [ball((0.03, 0.0, 0.0)),  # a fraction of a voxel
             ball((0.2, 0.0, 0.0)),  # ~4 voxels: no previous cell crosses any more
             lambda p: torch.minimum(ball((0.2, 0.0, 0.0))(p), ball((-0.6, 0.5, 0.5), 0.2)(p))]  # a new piece far away
    for fn in steps:
        v, f, st = extract(fn, 48, "sparse", state=st)
        vd, fd_, _ = extract(fn, 48, "dense")
        assert st.warm and torch.equal(v, vd) and torch.equal(f, fd_)
    _, _, st = extract(ball((0.21, 0.0, 0.0)), 48, "sparse", state=extract(ball((0.2, 0, 0)), 48, "sparse")[2])
    assert st.evaluations < cold
