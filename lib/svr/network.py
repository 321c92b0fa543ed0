"""The SVR network: the image encoder of specs.json and the DeepSDF decoder, and their checkpoints."""
from __future__ import annotations

import os
from typing import Mapping

import torch
from torch import nn

from .. import experiment
from ..models.decoder import decoder_from_specs
from ..models.encoder import Encoder

__all__ = ["EncoderDecoder", "encoder_from_specs", "network_from_specs", "load_network"]


class EncoderDecoder(nn.Module):
    """Image encoder + DeepSDF decoder in one module (one DDP wrapper, one ``.to``).

    ``encoder``: RGBA (B, 4, S, S) in [0, 1] -> codes (B, L); ``decoder``: DeepSDF calling
    convention.  ``forward(images)`` returns the codes.  On disk the two are separate files
    (``lib.experiment.save_svr_checkpoint``).
    """

    def __init__(self, encoder: nn.Module, decoder: nn.Module):
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(images)


def encoder_from_specs(specs: Mapping) -> nn.Module:
    """The ResNet of NormType / Depth / EncoderWidths with a CodeLength output (lib.models.encoder)."""
    return Encoder(int(specs["CodeLength"]), depth=int(specs["Depth"]), norm=specs["NormType"],
                   widths=tuple(specs["EncoderWidths"]))


def network_from_specs(specs: Mapping) -> EncoderDecoder:
    return EncoderDecoder(encoder_from_specs(specs), decoder_from_specs(specs))


def load_network(exp_dir: str | os.PathLike, specs: Mapping, epoch: str | int = "latest",
                 device=None) -> EncoderDecoder:
    """The trained encoder + decoder of an SVR experiment, in eval mode on ``device``.

    The stored epoch is ``net.checkpoint_epoch``.
    """
    net = network_from_specs(specs)
    net.checkpoint_epoch = experiment.load_svr_networks(exp_dir, net.encoder, net.decoder, epoch, map_location="cpu")
    return net.to(device).eval()
