"""The MeshSDF layer on any torch field: differentiable iso-surface extraction (the paper's layer).

Owns :func:`mesh_from_field`, :class:`SurfaceMesh`, the autograd layer and its backward
(:func:`field_backward`: the paper's and the exact rule), and the checks on a field
(:func:`refuse_dropout`, :func:`field_device`).  The DeepSDF form (a decoder and latent
codes) is :func:`lib.layer.sdf.mesh_from_sdf`.

Forward: marching cubes on the field (:func:`lib.isosurface.extract`, no graph).  The
surface is ``field = level``; with ``inside="below"`` (an SDF) the outside is where
``field > level``, with ``inside="above"`` (an occupancy network, inside > tau) it is where
``field < level``.  Write s(x) for the field signed that way (s > 0 outside).

Backward: for a loss L on the vertices, with g_i = dL/dx_i and n_i = ds(x_i)/dx at each
vertex (autograd through the field),

    paper:  dL/ds_i = -(g_i . n_i) / |n_i|                 (the original's formula)
    exact:  dL/ds_i = -(g_i . n_i) / max(|n_i|, delta_0)^2  (implicit function theorem)

and sum_i dL/ds_i * ds(x_i) flows, by ordinary autograd, into every tensor requiring grad
that the field's value depends on: its parameters, a latent code, a batch of codes, a
feature grid (through a non-leaf input such as an encoder's output, into its leaves).

Critical points: where |n| -> 0 (e.g. where a hole opens) the implicit-function gradient
-n / |n|^2 diverges.  The exact rule therefore divides by max(|n|, delta_0)^2 with
delta_0 = ``delta`` (default 0.05) x the median |n| over the mesh's vertices: it is the exact
rule wherever |n| >= delta_0, and a vertex moves at most 1 / delta_0 world units per unit
of s (20 / median|n|) everywhere.  The paper's rule moves a vertex by at most one world unit
per unit of s anyway (unit normal).

Typical use (every optimisation iteration; passing ``state`` back makes the sparse mode
start from the previous surface)::

    mesh = mesh_from_field(lambda p: net(p).squeeze(1), 128, state=mesh.state if it else None)
    loss = my_loss(mesh.verts, mesh.faces)
    loss.backward()               # net's parameters get gradients; mesh.state.dl_ds (V,)

The field must be deterministic: a module left in train mode with dropout is refused
(MeshSDFError).

A field object (or the object a bound-method field belongs to) may offer two methods that
replace generic steps, both optional (the DeepSDF field of :mod:`lib.layer.sdf` offers them):

- ``layer_leaves() -> (tensors, device)``: the tensors requiring grad its values depend on
  and their device, instead of probing the field (:func:`_probe`);
- ``layer_backward(sign, verts, grad_verts, index, leaves, gradient, delta, chunk)`` ->
  ``(dl_ds (V,), grads)`` or None: its own backward pass (arguments as :func:`field_backward`,
  ``sign`` +1 or -1 as the field enters s; the vertices :func:`field_backward` evaluates,
  possibly only those the loss moves), None where the generic pass must run;
- ``layer_freeze() -> object``: a copy of the object that keeps computing today's field after
  the tensors it reads change in place (the field being one of its bound methods, the copy's
  method of that name is used); the fast mode then starts from the band instead of the dense
  grid (``freeze`` of :func:`lib.isosurface.extract`; pass ``freeze=None`` for the dense start).

The stages carry ``torch.profiler.record_function`` labels ``meshsdf.extract`` (the
forward's extraction) and ``meshsdf.backward`` (the layer's backward), which benchmarks time.
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple, Sequence

import torch
from torch import nn
from torch.profiler import record_function

from ..errors import MeshSDFError
from ..isosurface import ExtractionState, extract

__all__ = ["DELTA", "GRADIENTS", "INSIDE", "Field", "SurfaceMesh", "dl_ds_rule", "field_backward", "field_device",
           "mesh_from_field", "refuse_dropout"]

GRADIENTS = ("paper", "exact")
INSIDE = ("below", "above")
DELTA = 0.05
Field = Callable[..., torch.Tensor]


class SurfaceMesh(NamedTuple):
    """verts (V, 3) float32 carrying gradients, faces (F, 3) int64, state for the next call.

    ``state.dl_ds`` holds the per-vertex dL/ds (V,) after a backward pass (e.g. to colour
    faces); ``state.empty`` / ``state.message`` say when no surface was found.
    """

    verts: torch.Tensor
    faces: torch.Tensor
    state: ExtractionState


def mesh_from_field(field: Field, resolution: int, level: float = 0.0, mode: str = "sparse",
                    gradient: str = "paper", state: ExtractionState | Sequence[ExtractionState] | None = None,
                    inside: str = "below", batch: int | None = None, delta: float = DELTA, chunk: int = 2 ** 14,
                    device=None, **extract_kwargs) -> SurfaceMesh | list[SurfaceMesh]:
    """Mesh the level set ``field = level`` over [-1, 1]^3 as a differentiable mesh.

    Args:
        field: ``field(points (P, 3)) -> (P,)`` (or (P, 1)); with ``batch=B``,
            ``field(points (P, 3), index (P,) int64) -> (P,)`` gives B surfaces (index b
            selects surface b, e.g. a row of a (B, L) code matrix) and the call returns a list
            of B meshes whose backward is one pass over all their vertices.
        resolution: N, grid points per axis.
        level: the iso-value (default 0.0).
        mode: one of :data:`lib.isosurface.MODES` (default ``"sparse"``); see :func:`lib.isosurface.extract`.
        gradient: ``"paper"`` (default) or ``"exact"``.
        state: the previous call's state (a list of B states when batched), or None.
        inside: ``"below"`` (default; SDF: inside where field < level) or ``"above"``
            (occupancy: inside where field > level).
        batch: B surfaces, or None (default) for one.
        delta: the critical-point regularisation of the exact rule (default ``DELTA``; module
            docstring).
        chunk: points per field call, forward and backward (default 2^14).
        device: where the grid lives (default: the device of the tensors the field depends
            on, else the state's, else CPU).
        extract_kwargs: verify, coarse_stride, band, warm, freeze: see :func:`lib.isosurface.extract`
            (``freeze`` defaults to the field object's ``layer_freeze``, module docstring).

    Returns:
        :class:`SurfaceMesh` (or a list of B of them): verts (V, 3) float32 whose gradients
        reach every tensor requiring grad that the field depends on, faces (F, 3) int64, state.
    """
    if gradient not in GRADIENTS:
        raise MeshSDFError(f"gradient {gradient!r} is unknown: use one of {', '.join(GRADIENTS)}")
    if inside not in INSIDE:
        raise MeshSDFError(f"inside {inside!r} is unknown: use 'below' (an SDF) or 'above' (an occupancy field)")
    refuse_dropout(field)
    sign = 1.0 if inside == "below" else -1.0
    count = 1 if batch is None else int(batch)
    states = list(state) if isinstance(state, (list, tuple)) else [state] * count
    if len(states) != count:
        raise MeshSDFError(f"state: {len(states)} states for {count} surfaces; pass the list the last call returned")
    if device is None:   # a state was extracted on the grid's device: probe the field there too
        device = next((s.cells.device for s in states if s is not None), None)
    leaves, probe_device = _leaves(field, batch, device)
    if device is None:
        device = probe_device or torch.device("cpu")
    signed = _Signed(field, sign, level, batch)
    meshes = []
    for b in range(count):
        kwargs = dict(extract_kwargs)
        if mode == "fast" and "freeze" not in kwargs:
            kwargs["freeze"] = _freezer(field, sign, level, batch, b)
        with record_function("meshsdf.extract"):
            verts, faces, st = extract(signed.surface(b), resolution, mode, states[b], device=device, chunk=chunk,
                                       **kwargs)
        st.dl_ds = None
        meshes.append((verts, faces, st))
    if torch.is_grad_enabled() and leaves:
        spec = _Spec(signed, gradient, delta, chunk, [m[2] for m in meshes])
        attached = _FieldLayer.apply(spec, count, *[m[0] for m in meshes], *leaves)
        meshes = [(v, f, st) for v, (_, f, st) in zip(attached, meshes)]
    out = [SurfaceMesh(*m) for m in meshes]
    return out if batch is not None else out[0]


def refuse_dropout(field) -> None:
    """MeshSDFError when ``field`` is (or is a bound method of) a module with dropout in train mode.

    Args:
        field: a callable; only a module (or a module's bound method) is checked.
    """
    module = field if isinstance(field, nn.Module) else getattr(field, "__self__", None)
    if not isinstance(module, nn.Module):
        return
    for m in module.modules():
        drop = (isinstance(m, nn.modules.dropout._DropoutNd) and m.p > 0) or (
            float(getattr(m, "dropout_prob", 0) or 0) > 0 and bool(getattr(m, "dropout", None)))
        if m.training and drop:
            raise MeshSDFError(f"{type(module).__name__} is in train mode with dropout on, which makes the surface "
                               "and its gradients random: call .eval() on it before meshing")


class _Signed:
    """s(x) = sign * (field(x) - level) for surface b: > 0 outside, flat (P,) values."""

    def __init__(self, field, sign, level, batch):
        self.field, self.sign, self.level, self.batch = field, sign, level, batch

    def __call__(self, points, index=None):
        v = self.field(points) if self.batch is None else self.field(points, index)
        v = v.reshape(-1) - self.level
        return v if self.sign > 0 else -v

    def surface(self, b):
        if self.batch is None:
            return self
        return lambda p: self(p, torch.full((p.shape[0],), b, dtype=torch.int64, device=p.device))


def _freezer(field, sign, level, batch, b):
    """``freeze`` for :func:`lib.isosurface.extract` of surface b (the frozen s), or None when
    the field's object offers no ``layer_freeze`` (module docstring)."""
    owner = _owner(field)
    freeze = getattr(owner, "layer_freeze", None)
    if not callable(freeze):
        return None

    def frozen():
        copy = freeze()
        fn = copy if owner is field else getattr(copy, field.__name__)
        return _Signed(fn, sign, level, batch).surface(b)

    return frozen


def _owner(field):
    """The object ``field`` is, or the one a bound-method field belongs to."""
    return getattr(field, "__self__", field)


def _leaves(field, batch, device) -> tuple[list[torch.Tensor], torch.device | None]:
    """The tensors the field's gradients go to, and their device (see :func:`_probe`).

    A field offering ``layer_leaves()`` (module docstring) names them without a probe, e.g.
    a DeepSDF field its codes tensor and the decoder's parameters that require grad.
    """
    known = getattr(_owner(field), "layer_leaves", None)
    if callable(known):
        return known()
    return _probe(field, batch, device)


def _probe(field, batch, device) -> tuple[list[torch.Tensor], torch.device | None]:
    """The tensors requiring grad that ``field`` depends on, and their device.

    Evaluates the field twice at 64 fixed points with autograd on: differing values mean a
    random field (dropout in train mode, noise) and are refused; the autograd graph of the
    first evaluation is walked back to its leaves (parameters, codes, feature grids).
    """
    gen = torch.Generator().manual_seed(0)
    pts = torch.rand(64, 3, generator=gen) * 1.8 - 0.9
    dev = torch.device(device) if device is not None else field_device(field)
    pts = pts.to(dev) if dev is not None else pts
    index = None if batch is None else torch.arange(64, device=pts.device) % int(batch)
    call = (lambda: field(pts)) if batch is None else (lambda: field(pts, index))  # noqa: E731
    with torch.enable_grad():
        a = call()
        b = call()
    if not isinstance(a, torch.Tensor) or a.numel() != 64:
        raise MeshSDFError("field: must map points (P, 3) to a tensor of P values (P,) or (P, 1)")
    if not torch.equal(a.detach(), b.detach()):
        raise MeshSDFError("field: two evaluations at the same points differ (a module in train mode with dropout, "
                           "or noise): call .eval() on it, or make it deterministic, before meshing")
    leaves, seen, stack = {}, set(), [a.grad_fn]
    while stack:
        fn = stack.pop()
        if fn is None or id(fn) in seen:
            continue
        seen.add(id(fn))
        var = getattr(fn, "variable", None)  # AccumulateGrad: a leaf tensor
        if var is not None:
            leaves.setdefault(id(var), var)
        stack.extend(nxt for nxt, _ in fn.next_functions)
    if a.requires_grad and a.grad_fn is None:  # the field returned a leaf itself
        leaves.setdefault(id(a), a)
    found = list(leaves.values())
    return found, (found[0].device if found else dev)


def field_device(field) -> torch.device | None:
    """The device ``field`` computes on, as far as what it holds tells: a module's first
    parameter or buffer, else the first tensor or module among what a function holds (its
    bound object, closure variables, defaults; a functools.partial's arguments), one level
    deep.  None when it holds no tensor (the caller then assumes the CPU).

    Why: a field written as a closure over a decoder and a code (check_gradients.py) must
    be probed and meshed where its tensors are, or it mixes CUDA and CPU tensors.

    Args:
        field: a callable (function, bound method, module, functools.partial).
    Returns:
        a torch.device, or None.
    """
    for obj in _held(field):
        if isinstance(obj, torch.Tensor):
            return obj.device
        if isinstance(obj, nn.Module):
            dev = next((t.device for t in (*obj.parameters(), *obj.buffers())), None)
            if dev is not None:
                return dev
    return None


def _held(field):
    """``field`` itself, then what it holds (see :func:`field_device`)."""
    yield field
    if isinstance(field, functools.partial):
        yield from (field.func, *field.args, *field.keywords.values())
        field = field.func
    yield getattr(field, "__self__", None)
    for cell in getattr(field, "__closure__", None) or ():
        try:
            yield cell.cell_contents
        except ValueError:  # a closure variable not assigned yet
            continue
    yield from getattr(field, "__defaults__", None) or ()


class _Spec:
    def __init__(self, signed, gradient, delta, chunk, states):
        self.signed, self.gradient, self.delta, self.chunk, self.states = signed, gradient, delta, chunk, states


class _FieldLayer(torch.autograd.Function):
    """Outputs: the B vertex tensors unchanged; backward: the MeshSDF rule into the leaves."""

    @staticmethod
    def forward(ctx, spec, count, *tensors):
        verts, leaves = tensors[:count], tensors[count:]
        ctx.spec, ctx.count = spec, count
        ctx.save_for_backward(*verts, *leaves)
        return tuple(v.clone() for v in verts)

    @staticmethod
    def backward(ctx, *grads):
        saved = ctx.saved_tensors
        verts, leaves = saved[: ctx.count], saved[ctx.count:]
        spec = ctx.spec
        sizes = [v.shape[0] for v in verts]
        x_all = torch.cat(verts)
        g_all = torch.cat([torch.zeros_like(v) if g is None else g for v, g in zip(verts, grads)])
        index = torch.repeat_interleave(torch.arange(ctx.count, device=x_all.device),
                                        torch.tensor(sizes, device=x_all.device))
        with record_function("meshsdf.backward"):
            dl_ds, leaf_grads = field_backward(spec.signed, x_all, g_all, index, leaves, spec.gradient, spec.delta,
                                               spec.chunk)
        for st, d in zip(spec.states, torch.split(dl_ds, sizes)):
            st.dl_ds = d
        return (None, None, *([None] * ctx.count), *leaf_grads)


def field_backward(signed: Callable, verts: torch.Tensor, grad_verts: torch.Tensor, index: torch.Tensor,
                   leaves: Sequence[torch.Tensor], gradient: str = "paper", delta: float = DELTA,
                   chunk: int = 2 ** 14) -> tuple[torch.Tensor, list]:
    """The MeshSDF backward pass over vertices (V, 3) with dL/dverts (V, 3), in chunks.

    Args:
        signed: ``signed(points (P, 3), index (P,)) -> s (P,)`` (> 0 outside), a :class:`_Signed`.
        verts: (V, 3) the vertices; grad_verts: (V, 3) dL/dverts; index: (V,) int64 the
            surface of each vertex; leaves: the tensors to return gradients for.
        gradient: ``"paper"`` or ``"exact"`` (default "paper"); delta: the exact rule's
            floor (default ``DELTA``); chunk: vertices per field call (default 2^14).
    Returns:
        dl_ds (V,) (detached) and one gradient per tensor of ``leaves`` (zeros where unused).

    Under the paper's rule a vertex with dL/dx_i = 0 has dL/ds_i = 0 whatever its normal and
    adds nothing to any leaf's gradient, so on a CPU only the other vertices are evaluated (a
    silhouette loss moves only the vertices whose faces it sees), by a field's own backward
    or the generic one alike.  Not under the exact rule (its floor is the median |n| over
    every vertex), nor on a GPU (counting them would cost a host sync, and its FLOPs are cheap).

    A field offering ``layer_backward`` (module docstring) computes both itself where it can.
    """
    full = verts.shape[0]
    moving = None
    if gradient == "paper" and verts.device.type == "cpu":
        nonzero = grad_verts.ne(0).any(1)
        if not bool(nonzero.all()):
            moving = nonzero.nonzero().squeeze(1)
            verts, grad_verts, index = verts[moving], grad_verts[moving], index[moving]
    dl_ds, grads = _backward(signed, verts, grad_verts, index, leaves, gradient, delta, chunk)
    if moving is not None:  # dL/ds is 0 at the vertices the loss does not move
        dl_ds = verts.new_zeros(full).index_copy_(0, moving, dl_ds)
    return dl_ds, grads


def _backward(signed, verts, grad_verts, index, leaves, gradient, delta, chunk) -> tuple[torch.Tensor, list]:
    """:func:`field_backward` at the given vertices: the field's own backward, else the generic two passes."""
    own = getattr(_owner(getattr(signed, "field", None)), "layer_backward", None)
    if callable(own):
        done = own(signed.sign, verts, grad_verts, index, leaves, gradient, delta, chunk)
        if done is not None:
            return done
    with torch.enable_grad():
        normals, kept = [], []
        for s in range(0, verts.shape[0], chunk):
            x = verts[s : s + chunk].detach().requires_grad_(True)
            value = signed(x, index[s : s + chunk])
            (n,) = torch.autograd.grad(value.sum(), x, retain_graph=True)
            normals.append(n.detach())
            kept.append(value if verts.shape[0] <= chunk else None)  # one chunk: reuse its graph
        normal = torch.cat(normals) if normals else verts.new_zeros(0, 3)
        dl_ds = dl_ds_rule(normal, grad_verts, gradient, delta)
        grads = [None] * len(leaves)
        for i, s in enumerate(range(0, verts.shape[0], chunk)):
            value = kept[i]
            if value is None:
                value = signed(verts[s : s + chunk].detach(), index[s : s + chunk])
            # a scalar output: an explicit grad_outputs tensor makes torch import sympy (slow, once)
            part = torch.autograd.grad((value * dl_ds[s : s + chunk]).sum(), leaves, allow_unused=True,
                                       retain_graph=True)
            grads = [a if b is None else (b if a is None else a + b) for a, b in zip(grads, part)]
    grads = [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]
    return dl_ds.detach(), grads


def dl_ds_rule(normal: torch.Tensor, grad_verts: torch.Tensor, gradient: str, delta: float) -> torch.Tensor:
    """dL/ds (V,) from the field gradients (V, 3) and dL/dverts (V, 3): the paper's or the exact rule.

    Args:
        normal: (V, 3) ds/dx at each vertex; grad_verts: (V, 3) dL/dx; gradient: ``"paper"``
            or ``"exact"``; delta: the exact rule's floor as a fraction of the median |n|.
    Returns:
        (V,) dL/ds.
    """
    norm = normal.norm(dim=1)
    dot = -(grad_verts * normal).sum(1)
    if gradient == "exact":
        floor = (delta * norm.median()).clamp_min(1e-12) if norm.numel() else 1e-12
        return dot / torch.maximum(norm, floor) ** 2
    return dot / norm.clamp_min(1e-12)


