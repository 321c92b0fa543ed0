"""ResNet image encoder for single-view reconstruction: RGBA image -> latent code.

A CIFAR-style ResNet of basic blocks: a 3x3 stem convolution, four stages of widths
``widths`` (default 64/128/256/256, the first at stride 1, the others at stride 2), global
average pooling and one linear layer to ``latent_size``.  ``depth`` counts the weighted
layers: stem + 2 per block + fc, so depth 20 gives 9 blocks, spread over the stages as
evenly as possible with the earlier stages taking the remainder ([3, 2, 2, 2]).

Normalisation (specs ``Normalization``): "in" instance norm (affine), "bn" batch norm, "bin"
batch-instance norm (Nam & Kim 2018: a learnt per-channel mix rho*BN + (1-rho)*IN, rho in
[0, 1], then one affine).
"""
from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


class BatchInstanceNorm2d(nn.Module):
    """rho * BatchNorm(x) + (1 - rho) * InstanceNorm(x), then a per-channel affine; rho in [0, 1]."""

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels, eps=eps, momentum=momentum, affine=False)
        self.eps = eps
        self.rho = nn.Parameter(torch.full((1, channels, 1, 1), 0.5))
        self.weight = nn.Parameter(torch.ones(1, channels, 1, 1))
        self.bias = nn.Parameter(torch.zeros(1, channels, 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rho = self.rho.clamp(0.0, 1.0)
        x_in = nn.functional.instance_norm(x, eps=self.eps)
        return (rho * self.bn(x) + (1 - rho) * x_in) * self.weight + self.bias


NORMALIZATIONS = ("in", "bn", "bin")


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "bin":
        return BatchInstanceNorm2d(channels)
    raise ValueError(f"unknown normalisation {kind!r}; use one of {', '.join(NORMALIZATIONS)}")


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with normalisation and a (projected when needed) skip connection."""

    def __init__(self, cin: int, cout: int, stride: int, norm: str):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = norm_layer(norm, cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = norm_layer(norm, cout)
        self.skip = None
        if stride != 1 or cin != cout:
            self.skip = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), norm_layer(norm, cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.norm1(self.conv1(x)))
        y = self.norm2(self.conv2(y))
        return torch.relu(y + (x if self.skip is None else self.skip(x)))


def blocks_per_stage(depth: int, stages: int) -> list[int]:
    """Split the (depth - 2) / 2 basic blocks of a ResNet over ``stages`` stages, earlier first."""
    if depth < 2 + 2 * stages or (depth - 2) % 2:
        raise ValueError(f"encoder depth {depth} must be even and >= {2 + 2 * stages} for {stages} stages")
    total = (depth - 2) // 2
    return [total // stages + (1 if i < total % stages else 0) for i in range(stages)]


class Encoder(nn.Module):
    """RGBA image (B, 4, H, W) in [0, 1] -> latent codes (B, latent_size)."""

    def __init__(self, latent_size: int, depth: int = 20, norm: str = "in",
                 widths: Sequence[int] = (64, 128, 256, 256), in_channels: int = 4):
        super().__init__()
        self.latent_size = int(latent_size)
        self.stem = nn.Sequential(nn.Conv2d(in_channels, widths[0], 3, 1, 1, bias=False),
                                  norm_layer(norm, widths[0]), nn.ReLU(inplace=True))
        layers = []
        cin = widths[0]
        for s, (w, n) in enumerate(zip(widths, blocks_per_stage(depth, len(widths)))):
            for b in range(n):
                layers.append(BasicBlock(cin, w, 2 if (b == 0 and s > 0) else 1, norm))
                cin = w
        self.stages = nn.Sequential(*layers)
        self.fc = nn.Linear(cin, self.latent_size)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = self.stages(self.stem(images))
        return self.fc(x.mean(dim=(2, 3)))
