"""The DeepSDF auto-decoder network and a chunked SDF evaluator.

Calling convention (shared by every decoder in the project, analytic test decoders too):
``decoder(inputs)`` with inputs (N, L + 3) = [latent (L) | xyz (3)] returns (N, 1) signed
distances, > 0 outside, in the units of the unit-sphere normalisation.
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from ..errors import MeshSDFError
from ..models.kernels.fused import FusedPlan, LayerPlan, default_chunk, fused_clamped_l1
from ..models.kernels.inference import InferenceKernel, default_rows
from ..models.kernels.elementwise import (dropout_mask, effective_dropout_prob, new_seed,  # noqa: F401
                                            positional_encoding)
from ..runtime import limits


class WeightNormLinear(nn.Module):
    """Linear layer with weight normalisation, w = g * v / |v| per output row.

    Parameters are named ``weight_g`` (out, 1), ``weight_v`` (out, in) and ``bias`` like
    torch's classic ``weight_norm``, so DeepSDF-style state dicts load unchanged.  They are
    registered in the order ``weight_norm(nn.Linear)`` leaves them (bias, weight_g,
    weight_v): an optimizer state dict maps its entries to parameters by position, so this
    order is what lets the original's OptimizerParameters resume here.
    """

    def __init__(self, in_features: int, out_features: int):
        super().__init__()
        lin = nn.Linear(in_features, out_features)
        self.bias = nn.Parameter(lin.bias.detach().clone())
        self.weight_g = nn.Parameter(lin.weight.detach().norm(dim=1, keepdim=True))
        self.weight_v = nn.Parameter(lin.weight.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        return self.weight_v * (self.weight_g / self.weight_v.norm(dim=1, keepdim=True))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.linear(x, self.weight, self.bias)


class _ReluDrop(torch.autograd.Function):
    """relu(x) times the 0/1 ``keep`` mask, in place and without the 1/(1-p) scale.

    The backward pass needs only the output: y > 0 exactly where x > 0 and the unit was
    kept, so one threshold pass gives the gradient (vs. two passes for relu then dropout).
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
        ctx.mark_dirty(x)
        x.clamp_min_(0.0).mul_(keep)
        ctx.save_for_backward(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (y,) = ctx.saved_tensors
        return torch.ops.aten.threshold_backward(grad, y, 0.0), None


def relu_dropout_unscaled(x: torch.Tensor, p: float, seed: int, layer: int) -> torch.Tensor:
    """relu then dropout of a fresh pre-activation ``x`` (N, C), overwritten in place.

    The mask is ``dropout_mask(..., seed=seed, layer=layer)``.  The survivors are NOT
    multiplied by 1 / (1 - p_eff): the caller folds that factor into the next layer's
    weight (a 128x128 multiply instead of an N x C pass).
    """
    return _ReluDrop.apply(x, dropout_mask(x.shape, p, x.device, x.dtype, seed=seed, layer=layer))


MAX_DROPOUT_PROB = 1.0 - 1.0 / 65536.0  # largest drop probability the 16-bit masks of dropout_mask represent


class Decoder(nn.Module):
    """DeepSDF MLP: [latent | encoded xyz] -> hidden layers -> 1, tanh on the output.

    Args mirror the ``NetworkSpecs`` keys of specs.json (plus ``latent_size`` =
    ``CodeLength``): ``dims`` hidden widths; ``latent_in`` indices of hidden layers whose
    input gets the network input re-concatenated (the previous layer shrinks so widths stay
    ``dims``); ``norm_layers`` layers with weight norm (``weight_norm``) or LayerNorm;
    ``dropout`` layers with dropout ``dropout_prob`` in training; ``xyz_in_all`` appends xyz
    to every hidden layer input; ``latent_dropout`` drops the latent (p = 0.2) in training;
    ``use_tanh`` adds a tanh before the output tanh (DeepSDF's option);
    ``positional_encoding``/``fourier_degree`` replace xyz by the original MeshSDF's Fourier
    features (``lib.models.kernels.elementwise.positional_encoding``: 6 * fourier_degree values, no raw xyz),
    so the input is CodeLength + 6 * fourier_degree wide (bob_and_spot: 32), else
    CodeLength + 3.  The output always goes through tanh.

    Dropout is ordinary inverted dropout (drop with p, scale survivors by 1/(1-p)); for
    speed the mask is drawn by ``dropout_mask`` (p quantised to 1/65536) and the scale is
    applied to the next layer's weight columns rather than to the activations, which is
    the same function and the same gradients.
    """

    def __init__(
        self,
        latent_size: int,
        dims: Sequence[int],
        dropout: Sequence[int] | None = None,
        dropout_prob: float = 0.0,
        norm_layers: Sequence[int] = (),
        latent_in: Sequence[int] = (),
        weight_norm: bool = False,
        xyz_in_all: bool = False,
        use_tanh: bool = False,
        latent_dropout: bool = False,
        positional_encoding: bool = False,
        fourier_degree: int = 1,
    ):
        super().__init__()
        if not 0.0 <= float(dropout_prob) < 1.0 or effective_dropout_prob(dropout_prob) >= 1.0:
            # the masks resolve 1/65536: a p within half of that below 1 would drop every unit
            raise ValueError(f"dropout_prob must be in [0, {MAX_DROPOUT_PROB}], got {dropout_prob}")
        self.latent_size = int(latent_size)
        self.fourier_degree = int(fourier_degree) if positional_encoding else 0
        self.xyz_size = 6 * self.fourier_degree if self.fourier_degree else 3
        self.input_size = self.latent_size + self.xyz_size
        self.latent_in = tuple(int(i) for i in latent_in)
        self.norm_layers = tuple(int(i) for i in norm_layers)
        self.dropout = tuple(int(i) for i in (dropout or ()))
        self.dropout_prob = float(dropout_prob)
        self.weight_norm = bool(weight_norm)
        self.xyz_in_all = bool(xyz_in_all)
        self.use_tanh = bool(use_tanh)
        self.latent_dropout = nn.Dropout(0.2) if latent_dropout else None

        widths = [self.input_size] + [int(d) for d in dims] + [1]
        self.num_layers = len(widths) - 1
        for i in range(self.num_layers):
            nxt = i + 1
            out = widths[nxt]
            if nxt in self.latent_in:
                out -= self.input_size
            elif self.xyz_in_all and nxt < self.num_layers:
                out -= self.xyz_size
            if out <= 0:
                raise ValueError(f"layer {i} would have width {out}: dims too small for latent_in/xyz_in_all")
            inp = widths[i]
            if i == 0:
                inp = self.input_size
            lin = WeightNormLinear(inp, out) if (self.weight_norm and i in self.norm_layers) else nn.Linear(inp, out)
            setattr(self, f"lin{i}", lin)
            if not self.weight_norm and i in self.norm_layers and nxt < self.num_layers:
                setattr(self, f"bn{i}", nn.LayerNorm(out))

        self.fused_chunk: int | None = None  # rows per chunk of the fused loss; None = fused.default_chunk
        self.layer_plans = self._layer_plans()

    def _layer_plans(self) -> tuple[LayerPlan, ...]:
        """Column layout of every layer's weight: which columns read the previous layer, the
        latent code and the encoded xyz (see ``lib.models.kernels.fused.LayerPlan``)."""
        plans, lat, pe = [], self.latent_size, self.xyz_size
        for i in range(self.num_layers):
            lin = getattr(self, f"lin{i}")
            width = (lin.weight_v if isinstance(lin, WeightNormLinear) else lin.weight).shape[1]
            drop = i in self.dropout and i < self.num_layers - 1
            if i == 0:
                plans.append(LayerPlan(0, (0, lat), (lat, lat + pe), drop))
            elif i in self.latent_in:
                x = width - lat - pe
                plans.append(LayerPlan(x, (x, x + lat), (x + lat, width), drop))
            elif self.xyz_in_all:
                plans.append(LayerPlan(width - pe, None, (width - pe, width), drop))
            else:
                plans.append(LayerPlan(width, None, None, drop))
        return tuple(plans)

    def effective_weights(self, dropping: bool) -> list[torch.Tensor]:
        """[W0, b0, W1, b1, ...]: each layer's weight (out, in) and bias as applied.

        With ``dropping`` the inverted-dropout scale 1 / (1 - p_eff) of a dropped-out layer
        is folded into the columns of the next weight that read its activations (not the
        re-concatenated inputs): a 128x128 multiply instead of an N x C pass.
        """
        keep_scale = 1.0 / (1.0 - effective_dropout_prob(self.dropout_prob))
        out = []
        for i, plan in enumerate(self.layer_plans):
            lin = getattr(self, f"lin{i}")
            weight = lin.weight
            if dropping and i > 0 and (i - 1) in self.dropout:
                weight = torch.cat((weight[:, : plan.x] * keep_scale, weight[:, plan.x:]), dim=1) \
                    if plan.x < weight.shape[1] else weight * keep_scale
            out += [weight, lin.bias]
        return out

    @property
    def fused_loss_supported(self) -> bool:
        """Whether ``lib.models.kernels.fused`` implements this decoder (not: LayerNorm layers, latent dropout)."""
        return self.latent_dropout is None and not any(hasattr(self, f"bn{i}") for i in range(self.num_layers))

    def fused_plan(self, device) -> FusedPlan:
        """The plan of ``lib.models.kernels.fused`` for this decoder in its current mode (``fused_loss_supported``)."""
        dropping = self.training and self.dropout_prob > 0
        plans = tuple(LayerPlan(p.x, p.lat, p.pe, p.dropout and dropping) for p in self.layer_plans)
        return FusedPlan(plans, self.fourier_degree, self.use_tanh, self.dropout_prob,
                         self.fused_chunk or default_chunk(device))

    def inference_plan(self, device) -> FusedPlan | None:
        """The plan of ``lib.models.kernels.inference``'s kernels, or None where they do not compute
        this decoder's current function (LayerNorm, latent dropout, dropout active in train mode)."""
        if not self.fused_loss_supported or (self.training and self.dropout_prob > 0 and self.dropout):
            return None
        plans = tuple(LayerPlan(p.x, p.lat, p.pe, False) for p in self.layer_plans)
        return FusedPlan(plans, self.fourier_degree, self.use_tanh, 0.0, default_rows(device))

    def field_kernel(self) -> InferenceKernel:
        """The fast path the mesh layer asks a decoder for (``lib.layer.sdf``): a new
        ``InferenceKernel`` of this decoder (values and input gradients without autograd), whose
        ``supported(device)`` says where it computes the decoder's current function."""
        return InferenceKernel(self)

    def clamped_l1_loss(self, codes: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor, clamp: float) -> torch.Tensor:
        """The training loss by the fused forward + backward of ``lib.models.kernels.fused``.

        mean over rows of |clamp(f(code_b, xyz_bs)) - clamp(sdf_bs)|, values clamped to
        [-clamp, clamp]; codes (B, L), xyz (B, S, 3), sdf (B, S) -> scalar.  Same value and
        gradients as ``forward`` followed by that mean, same dropout masks for the same RNG
        state.  Needs ``fused_loss_supported`` and xyz/sdf without gradients.  Training code
        calls it through ``lib.training.SdfLoss`` (the module DistributedDataParallel wraps).
        """
        if not self.fused_loss_supported:
            raise ValueError("Decoder: the fused training loss does not support LayerNorm or latent dropout")
        plan = self.fused_plan(xyz.device)
        dropping = any(p.dropout for p in plan.layers)
        return fused_clamped_l1(plan, clamp, new_seed() if dropping else 0, codes, xyz, sdf,
                                self.effective_weights(dropping))

    def forward(self, inputs: torch.Tensor) -> torch.Tensor:
        """inputs (N, L + 3) = [latent | xyz] -> (N, 1) SDF (the inference forward; in
        training mode with dropout)."""
        latent = inputs[:, : self.latent_size]
        xyz = inputs[:, self.latent_size :]
        if self.fourier_degree:
            xyz = positional_encoding(xyz, self.fourier_degree)
        x0 = torch.cat((latent, xyz), dim=1)  # what latent_in layers re-read (without latent dropout, as DeepSDF)
        if self.latent_dropout is not None and self.training:
            x = torch.cat((self.latent_dropout(latent), xyz), dim=1)
        else:
            x = x0
        last = self.num_layers - 1
        dropping = self.training and self.dropout_prob > 0
        seed = new_seed() if dropping else 0
        params = self.effective_weights(dropping)
        for i in range(self.num_layers):
            if i in self.latent_in:
                x = torch.cat((x, x0), dim=1)
            elif i != 0 and self.xyz_in_all:
                x = torch.cat((x, xyz), dim=1)
            x = torch.nn.functional.linear(x, params[2 * i], params[2 * i + 1])
            if i == last:
                if self.use_tanh:
                    x = torch.tanh(x)
                break
            bn = getattr(self, f"bn{i}", None)
            if bn is not None:
                x = bn(x)
            if dropping and i in self.dropout:
                x = relu_dropout_unscaled(x, self.dropout_prob, seed, i)
            else:
                x = torch.relu_(x)  # in place on the fresh pre-activation (linear's backward does not read it)
        return torch.tanh(x)


def decoder_from_specs(specs) -> Decoder:
    """The ``deep_sdf_decoder`` of validated specs (lib.load_specs): CodeLength + NetworkSpecs."""
    limits.check_decoder(specs["CodeLength"], specs["NetworkSpecs"]["dims"])  # before allocating the weights
    try:
        return Decoder(specs["CodeLength"], **specs["NetworkSpecs"])
    except ValueError as err:
        raise MeshSDFError(f"specs.json: NetworkSpecs do not make a valid decoder: {err}") from None


def sdf(decoder: nn.Module, latent: torch.Tensor, xyz: torch.Tensor, chunk: int = 2 ** 18) -> torch.Tensor:
    """Evaluate the SDF of one shape at many points, in chunks to bound memory.

    decoder: DeepSDF calling convention; latent (L,); xyz (P, 3) on the decoder's device.
    Returns (P,) SDF values.  Keeps the autograd graph if grad is enabled (the caller
    chooses ``torch.no_grad()`` for plain evaluation).
    """
    out = []
    lat = latent.reshape(1, -1)
    for start in range(0, xyz.shape[0], chunk):
        pts = xyz[start : start + chunk]
        inp = torch.cat((lat.expand(pts.shape[0], -1), pts), dim=1)
        out.append(decoder(inp).reshape(-1))
    if not out:
        return xyz.new_zeros(0)
    return torch.cat(out)
