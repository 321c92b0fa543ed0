"""The training losses: clamped L1 on SDF values, the latent-code regulariser, the auto-decoder loss.

``SdfLoss`` is the module DistributedDataParallel wraps (its forward is the training
computation, so ``Decoder.forward`` stays the inference forward).
"""
from __future__ import annotations

import torch
from torch import nn

from ..models.decoder import Decoder
from .distributed import unwrap
from .schedules import TrainSettings, code_reg_weight

__all__ = ["clamped_l1", "code_regularization", "SdfLoss", "auto_decoder_loss"]


def clamped_l1(pred: torch.Tensor, gt: torch.Tensor, clamp: float) -> torch.Tensor:
    """mean |clamp(pred) - clamp(gt)| with clamp to [-clamp, clamp]; pred, gt of equal numel.

    Args:
        pred: predicted SDF values, any shape.
        gt: ground-truth SDF values, as many as ``pred``.
        clamp: the clamping distance (ClampingDistance).
    Returns:
        scalar tensor.
    """
    return (pred.reshape(-1).clamp(-clamp, clamp) - gt.reshape(-1).clamp(-clamp, clamp)).abs().mean()


def code_regularization(codes: torch.Tensor) -> torch.Tensor:
    """Mean L2 norm of the codes (B, L).

    Equals DeepSDF's sum of per-sample code norms divided by the number of samples, since
    every scene of a batch has the same number of samples.

    Args:
        codes: (B, L) latent codes of a batch.
    Returns:
        scalar tensor.
    """
    return codes.norm(dim=1).mean()


class SdfLoss(nn.Module):
    """The clamped-L1 SDF loss of a decoder, as the module DistributedDataParallel wraps.

    ``SdfLoss(decoder)(codes, xyz, sdf, clamp)``: codes (B, L), xyz (B, S, 3), sdf (B, S)
    -> scalar mean over the B * S rows of |clamp(f(code_b, xyz_bs)) - clamp(sdf_bs)|.
    With gradients enabled and a ``Decoder`` the fused path supports (every specs file of
    the project and of the original), the loss and its gradients come from
    ``Decoder.clamped_l1_loss`` (lib.models.kernels.fused: the same loss without the
    per-sample activations in memory; benchmarks/train_step.py times it); otherwise from the decoder's plain
    forward.  Wrapping this module, not the decoder, keeps ``Decoder.forward`` the
    inference forward while DDP still sees the training computation as its forward.
    """

    def __init__(self, decoder: nn.Module):
        super().__init__()
        self.decoder = decoder

    def forward(self, codes: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor, clamp: float) -> torch.Tensor:
        b, s = sdf.shape
        dec = self.decoder
        if b * s and torch.is_grad_enabled() and isinstance(dec, Decoder) and dec.fused_loss_supported:
            return dec.clamped_l1_loss(codes, xyz, sdf, clamp)
        inputs = torch.cat((codes[:, None, :].expand(b, s, codes.shape[1]), xyz), dim=2)
        inputs = inputs.reshape(b * s, codes.shape[1] + 3)
        pred = dec(inputs)
        if b * s == 0:  # a zero that still reaches every parameter, as DDP needs
            return pred.sum() * 0.0 + codes.sum() * 0.0
        return clamped_l1(pred, sdf, clamp)


def auto_decoder_loss(loss: nn.Module, codes: torch.Tensor, xyz: torch.Tensor, sdf: torch.Tensor,
                      epoch: int, settings: TrainSettings, weight: float = 1.0,
                      ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Loss of one batch: clamped L1 SDF loss + ramped code regularisation.

    ``loss``: an ``SdfLoss`` (possibly inside DDP) or a bare decoder (wrapped in one
    here).  codes (B, L), xyz (B, S, 3), sdf (B, S), all on the decoder's device.
    ``weight`` multiplies both terms: ``lib.training.distributed.loss_weight`` for a rank's shard of
    a global batch (B may then be 0: the loss is a zero that still reaches every
    parameter, as DDP needs).  Returns (total, sdf term, regularisation term) as scalar
    tensors.
    """
    if not isinstance(unwrap(loss), SdfLoss):
        loss = SdfLoss(loss)
    sdf_loss = loss(codes, xyz, sdf, settings.clamp_distance)
    if sdf.numel() == 0:
        return sdf_loss, sdf_loss, sdf_loss
    if settings.code_regularization and settings.code_reg_lambda > 0:
        reg = code_reg_weight(epoch, settings.code_reg_lambda) * code_regularization(codes)
    else:
        reg = sdf_loss.new_zeros(())
    if weight != 1.0:
        sdf_loss, reg = sdf_loss * weight, reg * weight
    return sdf_loss + reg, sdf_loss, reg
