"""The single-view-reconstruction image encoder (specs ``NetworkEncoder: "encoder"``): RGBA -> code.

A CIFAR-style ResNet as the original MeshSDF trains it, so its ``encoder_<epoch>.pth``
checkpoints load here (DataParallel's ``module.`` prefix is stripped by lib.experiment):

    conv1   3x3, 4 -> w0 channels, stride 1, padding 1, no bias;  bn1 norm;  ReLU
    layer1 .. layer4   n blocks each, widths w0..w3 (64, 128, 256, 256), strides 1, 2, 2, 2
    avgpool            adaptive average pooling to 1x1
    fc                 linear (w3 x expansion) -> CodeLength

``Depth`` = 6n + 2, n blocks per stage: BasicBlocks (two 3x3 conv-norm, ReLU between and
after the sum) below 44, Bottleneck blocks (1x1, 3x3, 1x1 conv, expansion 4) from 44 on.
The first block of a stage whose stride is not 1 or whose input width differs gets a
``downsample`` shortcut (1x1 conv with the stride, no bias, then norm), so layer4 has one
although its width equals layer3's.  State-dict names follow that layout: ``conv1``, ``bn1``,
``layer1.0.conv1``, ``layer1.0.bn1``, ..., ``layer2.0.downsample.0`` (conv) / ``.1`` (norm), ``fc``.
With CodeLength 256, Depth 20, "in": 7,999,616 parameters.

Normalisation (specs ``NormType``): "in" instance norm with affine (no running stats), "bn"
batch norm, "bin" batch-instance norm (Nam & Kim 2018) in the original's form
(``BatchInstanceNorm2d``).  Initialisation: conv weights N(0, sqrt(2 / (k*k*out_channels))),
norm weights 1 and biases 0; fc as torch's default.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn


class BatchInstanceNorm2d(nn.Module):
    """Batch-instance norm as the original's "bin": per channel, with gate g (starts at 1),

        out = BN(x) * weight * g + bias + IN(x) * weight * (1 - g)

    BN with running statistics (used in eval mode), IN always from the image itself; the bias
    is added once and the gate is used as it is (no clamp).  Not a BatchNorm2d subclass, so
    SyncBatchNorm conversion leaves it alone.  State: weight, bias, gate (C,), running_mean,
    running_var (C,), num_batches_tracked (filled in when an older checkpoint lacks it).
    x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, channels: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(channels))
        self.bias = nn.Parameter(torch.zeros(channels))
        self.gate = nn.Parameter(torch.ones(channels))
        self.register_buffer("running_mean", torch.zeros(channels))
        self.register_buffer("running_var", torch.ones(channels))
        self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        state_dict.setdefault(prefix + "num_batches_tracked", torch.tensor(0, dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.num_batches_tracked.add_(1)
        bn = nn.functional.batch_norm(x, self.running_mean, self.running_var, self.weight * self.gate, self.bias,
                                      self.training, self.momentum, self.eps)
        inst = nn.functional.instance_norm(x, eps=self.eps)
        return bn + inst * (self.weight * (1 - self.gate))[None, :, None, None]


NORMALIZATIONS = ("in", "bn", "bin")
WIDTHS = (64, 128, 256, 256)
BOTTLENECK_DEPTH = 44   # from this depth on, Bottleneck blocks


def norm_layer(kind: str, channels: int) -> nn.Module:
    if kind == "in":
        return nn.InstanceNorm2d(channels, affine=True)
    if kind == "bn":
        return nn.BatchNorm2d(channels)
    if kind == "bin":
        return BatchInstanceNorm2d(channels)
    raise ValueError(f"unknown normalisation {kind!r}; use one of {', '.join(NORMALIZATIONS)}")


def _conv3x3(cin: int, cout: int, stride: int = 1) -> nn.Conv2d:
    return nn.Conv2d(cin, cout, 3, stride, 1, bias=False)


class BasicBlock(nn.Module):
    """conv1-bn1-ReLU-conv2-bn2, plus the (downsampled) input, then ReLU.  Output width: planes."""

    expansion = 1

    def __init__(self, cin: int, planes: int, stride: int, norm: str, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = _conv3x3(cin, planes, stride)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = _conv3x3(planes, planes)
        self.bn2 = norm_layer(norm, planes)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


class Bottleneck(nn.Module):
    """1x1 (planes) - 3x3 (planes, stride) - 1x1 (4 planes), norms and ReLUs, plus the shortcut."""

    expansion = 4

    def __init__(self, cin: int, planes: int, stride: int, norm: str, downsample: nn.Module | None = None):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, planes, 1, bias=False)
        self.bn1 = norm_layer(norm, planes)
        self.conv2 = _conv3x3(planes, planes, stride)
        self.bn2 = norm_layer(norm, planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, 1, bias=False)
        self.bn3 = norm_layer(norm, planes * 4)
        self.downsample = downsample

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = torch.relu(self.bn1(self.conv1(x)))
        y = torch.relu(self.bn2(self.conv2(y)))
        y = self.bn3(self.conv3(y))
        return torch.relu(y + (x if self.downsample is None else self.downsample(x)))


def block_layout(depth: int) -> tuple[type, int]:
    """(block class, blocks per stage) of a ResNet of ``depth`` = 6n + 2: n = (depth - 2) // 6
    blocks per stage, BasicBlocks below BOTTLENECK_DEPTH and Bottleneck from it on (the
    original's rule).  ValueError for other depths."""
    if depth < 8 or (depth - 2) % 6:
        raise ValueError(f"encoder Depth {depth} must be 6n + 2 with n >= 1 (e.g. 8, 14, 20, 32, 44, 56)")
    return (Bottleneck if depth >= BOTTLENECK_DEPTH else BasicBlock), (depth - 2) // 6


class Encoder(nn.Module):
    """RGBA images (B, 4, H, W) in [0, 1] -> latent codes (B, latent_size); see the module docstring.

    widths: the four stage widths (the original's are 64, 128, 256, 256; smaller ones are our
    option for CPU-sized toy experiments).
    """

    def __init__(self, latent_size: int, depth: int = 20, norm: str = "in", widths: Sequence[int] = WIDTHS,
                 in_channels: int = 4):
        super().__init__()
        if norm not in NORMALIZATIONS:
            raise ValueError(f"unknown normalisation {norm!r}; use one of {', '.join(NORMALIZATIONS)}")
        block, n = block_layout(int(depth))
        self.latent_size = int(latent_size)
        self.conv1 = _conv3x3(in_channels, widths[0])
        self.bn1 = norm_layer(norm, widths[0])
        self.relu = nn.ReLU(inplace=True)
        cin = widths[0]
        for i, (planes, stride) in enumerate(zip(widths, (1, 2, 2, 2))):
            layers = []
            for b in range(n):
                s = stride if b == 0 else 1
                down = None
                if s != 1 or cin != planes * block.expansion:
                    down = nn.Sequential(nn.Conv2d(cin, planes * block.expansion, 1, s, bias=False),
                                         norm_layer(norm, planes * block.expansion))
                layers.append(block(cin, planes, s, norm, down))
                cin = planes * block.expansion
            setattr(self, f"layer{i + 1}", nn.Sequential(*layers))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(cin, self.latent_size)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                k = m.kernel_size[0] * m.kernel_size[1] * m.out_channels
                nn.init.normal_(m.weight, 0.0, math.sqrt(2.0 / k))
            elif isinstance(m, (nn.BatchNorm2d, nn.InstanceNorm2d, BatchInstanceNorm2d)) and m.weight is not None:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The last stage's feature map (B, C, H / 8, W / 8)."""
        x = self.relu(self.bn1(self.conv1(images)))
        return self.layer4(self.layer3(self.layer2(self.layer1(x))))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(images)), 1))
