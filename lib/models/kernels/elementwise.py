"""Elementwise building blocks of the DeepSDF decoder: positional encoding and dropout masks.

Shared by the autograd forward (``lib.models.decoder``) and the fused training loss
(:mod:`.fused`), which must draw identical dropout masks.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ChunkDropout", "PE_PI", "dropout_bits", "dropout_mask", "dropout_threshold",
           "effective_dropout_prob", "new_seed", "positional_encoding"]


# The original MeshSDF multiplies by this rounded constant, not math.pi; its checkpoints were
# trained with it, so using math.pi would shift every feature of a loaded network.
PE_PI = 3.1415


def positional_encoding(xyz: torch.Tensor, degree: int) -> torch.Tensor:
    """Fourier features of points, in the original MeshSDF's layout.

    xyz (..., 3) -> (..., 6 * degree) = [cos(2^0 c xyz), ..., cos(2^(d-1) c xyz),
    sin(2^0 c xyz), ..., sin(2^(d-1) c xyz)] with c = ``PE_PI`` = 3.1415, each term the
    three coordinates in x, y, z order.  The raw xyz is not part of it.  ``degree`` 0
    returns xyz unchanged (no encoding).
    """
    if degree <= 0:
        return xyz
    freqs = PE_PI * (2.0 ** torch.arange(degree, dtype=xyz.dtype, device=xyz.device))
    ang = (xyz.unsqueeze(-2) * freqs.unsqueeze(-1)).flatten(-2)  # (..., 3d): term l, coordinate j at 3l + j
    return torch.cat((torch.cos(ang), torch.sin(ang)), dim=-1)


def effective_dropout_prob(p: float) -> float:
    """The drop probability actually used for a requested ``p``: ``p`` rounded to k / 65536.

    Masks come from 16 random bits per unit (see ``dropout_mask``), so the probability is
    quantised; for p = 0.2 it is 0.19999695.  Kept units are scaled by 1 / (1 - that), so
    dropout stays unbiased in expectation.
    """
    return round(float(p) * 65536.0) / 65536.0


# SplitMix64 (Steele, Lea & Flood 2014) constants, as signed int64 (torch has no uint64 shift)
_GAMMA = 0x9E3779B97F4A7C15 - (1 << 64)
_MIX1 = 0xBF58476D1CE4E5B9 - (1 << 64)
_MIX2 = 0x94D049BB133111EB - (1 << 64)
_ROW_BITS = 12    # counter stride of a row: up to 4 * 2^12 units per row
_LAYER_BITS = 44  # counter stride of a layer: up to 2^32 rows
_STEPS: dict = {}


def _signed64(v: int) -> int:
    v &= (1 << 64) - 1
    return v - (1 << 64) if v >> 63 else v


def new_seed() -> int:
    """A 64-bit seed for one batch's dropout masks, from torch's default CPU generator.

    So ``torch.manual_seed`` and the RNG state saved in checkpoints make dropout
    reproducible, and a seed gives the same masks on every device.
    """
    return int(torch.randint(-(2 ** 63), 2 ** 63 - 1, (), dtype=torch.int64))


def _splitmix64_(z: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """SplitMix64's output function applied in place to int64 states ``z`` (``tmp``: scratch like z)."""
    t = torch.empty_like(z) if tmp is None else tmp
    for shift, mult in ((30, _MIX1), (27, _MIX2), (31, None)):
        # z ^= z >>> shift (logical shift = arithmetic shift, then clear the sign fill)
        torch.bitwise_right_shift(z, shift, out=t)
        t.bitwise_and_((1 << (64 - shift)) - 1)
        z.bitwise_xor_(t)
        if mult is not None:
            z.mul_(mult)
    return z


def _steps(rows: int, words: int, device: torch.device) -> torch.Tensor:
    """(rows, words) int64: (r * 2^12 + q) * gamma, the per-unit part of the SplitMix64 state (cached)."""
    key = (rows, words, device)
    steps = _STEPS.get(key)
    if steps is None:
        r = torch.arange(rows, dtype=torch.int64, device=device)[:, None] << _ROW_BITS
        steps = (r + torch.arange(words, dtype=torch.int64, device=device)).mul_(_GAMMA)
        if len(_STEPS) > 64:
            _STEPS.clear()
        _STEPS[key] = steps
    return steps


def _offset(seed: int, layer: int, row0: int) -> int:
    """The scalar part of the SplitMix64 state of (layer, row0, word 0), as a signed int64."""
    return _signed64(seed + ((layer << _LAYER_BITS) + (row0 << _ROW_BITS) + 1) * _GAMMA)


def _check_range(rows_end: int, cols: int) -> int:
    words = (int(cols) + 3) // 4
    if words > 1 << _ROW_BITS or rows_end > 1 << (_LAYER_BITS - _ROW_BITS):
        raise ValueError(f"dropout bits: layer width {cols} or row {rows_end} out of range")
    return words


def _draw_(steps: torch.Tensor, offset: int, z: torch.Tensor, tmp: torch.Tensor | None = None) -> torch.Tensor:
    """SplitMix64 outputs of the states ``steps + offset``, written into ``z`` (same shape)."""
    torch.add(steps, offset, out=z)
    return _splitmix64_(z, tmp)


def dropout_bits(seed: int, layer: int, row0: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """Random 16-bit lanes of units (row, col) of ``layer``: (rows, 4 * ceil(cols / 4)) int16.

    Unit (l, r, c) gets lane c % 4 of the SplitMix64 output for counter
    k = l * 2^44 + r * 2^12 + c // 4 (state seed + (k + 1) * gamma).  Counter-based, so a
    chunk of rows gives exactly the bits of the full draw, whatever the width other layers
    have.  Why not torch's generator: its CPU Mersenne twister is serial, a visible part of a
    training step; this is a few vectorised integer passes over the words.
    """
    words = _check_range(row0 + rows, cols)
    device = torch.device(device) if device is not None else torch.device("cpu")
    steps = _steps(rows, words, device)
    return _draw_(steps, _offset(seed, layer, row0), torch.empty_like(steps)).view(torch.int16)


class ChunkDropout:
    """Dropout of row chunks in place, into scratch allocated once: the hot-loop form of
    ``dropout_bits`` + ``dropout_mask`` (same bits, so the same masks).

    ``apply_(h, layer, row0)`` multiplies h (n, cols), rows row0 .. row0 + n of ``layer``,
    by its keep mask for ``seed``; n <= max_rows, cols <= max_cols.  All views of the
    scratch are built once per (n, cols), so a call is 12 tensor operations.
    """

    def __init__(self, seed: int, p: float, max_rows: int, max_cols: int, device, dtype=torch.float32):
        self.seed, self.threshold = int(seed), dropout_threshold(p)
        self.device = torch.device(device)
        words = (int(max_cols) + 3) // 4
        self._z = torch.empty(max_rows * words, dtype=torch.int64, device=self.device)
        self._t = torch.empty_like(self._z)
        self._keep = torch.empty(max_rows * max_cols, dtype=dtype, device=self.device)
        self._views: dict = {}

    def apply_(self, h: torch.Tensor, layer: int, row0: int) -> torch.Tensor:
        n, cols = h.shape
        views = self._views.get((n, cols))
        if views is None:
            words = _check_range(0, cols)
            z = self._z[: n * words].view(n, words)
            views = (_steps(n, words, self.device), z, self._t[: n * words].view(n, words),
                     z.view(torch.int16)[:, :cols], self._keep[: n * cols].view(n, cols))
            self._views[(n, cols)] = views
        steps, z, t, bits, keep = views
        _check_range(row0 + n, cols)
        _draw_(steps, _offset(self.seed, layer, row0), z, t)
        return h.mul_(torch.ge(bits, self.threshold, out=keep))


def dropout_threshold(p: float) -> int:
    """int16 threshold: a unit is kept when its 16 random bits, read as int16, are >= it."""
    return -32768 + round(float(p) * 65536.0)


def dropout_mask(shape: Sequence[int], p: float, device=None, dtype=torch.float32, *,
                 seed: int | None = None, layer: int = 0) -> torch.Tensor:
    """Keep mask of ``shape`` (rows, cols) in ``dtype``: 1 = keep, 0 = drop, each unit dropped
    independently with probability ``effective_dropout_prob(p)``.

    The bits are ``dropout_bits(seed, layer, 0, rows, cols)``; ``seed`` defaults to a
    fresh ``new_seed()``.  A single compare writes the mask straight in ``dtype`` (a bool
    mask would cost a conversion pass when applied).
    """
    rows, cols = (int(shape[0]), math.prod(shape[1:])) if len(shape) else (1, 1)
    seed = new_seed() if seed is None else seed
    bits = dropout_bits(seed, layer, 0, rows, cols, device)[:, :cols]
    keep = torch.empty((rows, cols), dtype=dtype, device=device)
    return torch.ge(bits, dropout_threshold(p), out=keep).view(tuple(shape))
