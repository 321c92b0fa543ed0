"""Elementwise building blocks of the DeepSDF decoder: positional encoding and dropout masks.

Shared by the autograd forward (``lib.models.decoder``) and the fused training loss
(:mod:`.fused`), which must draw identical dropout masks.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

__all__ = ["ChunkDropout", "PE_PI", "dropout_bits", "dropout_mask", "dropout_threshold",
           "effective_dropout_prob", "new_seed", "positional_encoding", "positional_encoding_t_"]


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
    # (..., 3d): term l, coordinate j at 3l + j
    ang = (xyz.unsqueeze(-2) * _frequencies(degree, xyz).unsqueeze(-1)).flatten(-2)
    return torch.cat((torch.cos(ang), torch.sin(ang)), dim=-1)


def _frequencies(degree: int, like: torch.Tensor) -> torch.Tensor:
    """(degree,) the encoding's angular frequencies ``PE_PI`` * 2^l in ``like``'s dtype and device."""
    return PE_PI * (2.0 ** torch.arange(degree, dtype=like.dtype, device=like.device))


def positional_encoding_t_(pts_t: torch.Tensor, degree: int, out: torch.Tensor) -> torch.Tensor:
    """``positional_encoding`` transposed, written into ``out``: feature f of point r at out[f, r].

    Why: the fused training loss keeps activations as (features, rows); computing the features in that
    layout needs no transposing copy, and every elementwise pass runs over long contiguous rows
    (vectorised), where the row layout's inner loop is 3 * degree elements.  The same products,
    cosines and sines, so the same bits as ``positional_encoding``.

    Args:
        pts_t: (3, n) the points as columns (any strides).
        degree: the encoding degree; 0 writes the raw coordinates.
        out: (6 * degree, n) (or (3, n) for degree 0), contiguous rows; its sine half holds the angles
            meanwhile (no scratch).
    Returns:
        out.
    """
    if degree <= 0:
        return out.copy_(pts_t)
    n, terms = pts_t.shape[1], 3 * degree
    ang = out[terms:]
    # row 3l + j = frequency l times coordinate j: (d, 1, 1) x (1, 3, n)
    torch.mul(_frequencies(degree, pts_t).view(degree, 1, 1), pts_t.unsqueeze(0), out=ang.view(degree, 3, n))
    torch.cos(ang, out=out[:terms])
    torch.sin(ang, out=ang)
    return out


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
# odd 32-bit multipliers of the per-unit mixer (C. Wellons' "lowbias32"), as signed int32
_MUL1 = 0x7FEB352D
_MUL2 = 0x846CA68B - (1 << 32)
# the int32 constants of the per-unit passes as 0-dim CPU tensors: a Python int is wrapped in a new
# tensor at every call, which the hot loop can notice
_I32 = {v: torch.tensor(v, dtype=torch.int32) for v in (15, 16, (1 << 17) - 1, _MUL2)}
_ROW_BITS = 32    # counter stride of a layer: up to 2^32 rows
_MAX_WORDS = 1 << 16
_COLUMN_KEYS: dict = {}


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


def _keys(counters: torch.Tensor, seed: int) -> torch.Tensor:
    """int32 keys ``_MUL1`` * (high half of SplitMix64(seed + (k + 1) * gamma)) of int64 counters k (any shape)."""
    z = counters.add(1).mul_(_GAMMA).add_(seed)
    return (_splitmix64_(z) >> 32).to(torch.int32).mul_(_MUL1)


def _column_keys(words: int, device: torch.device) -> torch.Tensor:
    """(words,) int32 key of each 32-bit word of a row, the same for every seed, layer and row (cached)."""
    key = (words, device)
    keys = _COLUMN_KEYS.get(key)
    if keys is None:
        keys = _keys(torch.arange(words, dtype=torch.int64, device=device), 0)
        if len(_COLUMN_KEYS) > 64:
            _COLUMN_KEYS.clear()
        _COLUMN_KEYS[key] = keys
    return keys


def _row_keys(seed: int, layers: torch.Tensor, row0: int, rows: int) -> torch.Tensor:
    """(len(layers), rows) int32 keys of rows row0 .. row0 + rows of each layer (an int64 tensor) for ``seed``."""
    r = torch.arange(row0, row0 + rows, dtype=torch.int64, device=layers.device)
    return _keys((layers[:, None] << _ROW_BITS) + r, seed)


def _check_range(rows_end: int, cols: int, layer: int = 0) -> int:
    words = (int(cols) + 1) // 2
    if words > _MAX_WORDS or rows_end > 1 << _ROW_BITS or not 0 <= layer < 1 << 30:
        raise ValueError(f"dropout bits: layer {layer}, width {cols} or row {rows_end} out of range")
    return words


def _mix_(row_keys: torch.Tensor, col_keys: torch.Tensor, z: torch.Tensor, tmp: torch.Tensor) -> torch.Tensor:
    """Random int32 words z = mix(row_keys + col_keys) in place (``tmp``: scratch like z), the keys
    broadcast to z's shape: row_keys (rows, 1) and col_keys (words,) for z (rows, words), or
    col_keys (words, 1) and row_keys (rows,) for z (words, rows) (the transposed layout).

    mix is a multiply-xorshift-multiply hash of 32-bit words; the first multiply is already in
    both keys (``_keys``), so it costs no pass over z.  Why so few passes: this runs over
    every unit of every dropped-out layer of a training step; each row's key already carries a
    full 64-bit hash, so the per-unit part only has to decorrelate the words of a row.
    """
    torch.add(row_keys, col_keys, out=z)
    torch.bitwise_right_shift(z, _I32[15], out=tmp)
    tmp.bitwise_and_(_I32[(1 << 17) - 1])  # logical shift: clear the sign fill
    return z.bitwise_xor_(tmp).mul_(_I32[_MUL2])


def dropout_bits(seed: int, layer: int, row0: int, rows: int, cols: int, device=None) -> torch.Tensor:
    """Random 16-bit lanes of units (row, col) of ``layer``: (rows, 2 * ceil(cols / 2)) int16.

    Unit (l, r, c) gets lane c % 2 (the low half first) of the 32-bit word
    mix(K(l, r) + C(c // 2)): K(l, r) = ``_MUL1`` x the high half of
    SplitMix64(seed + (l * 2^32 + r + 1) * gamma), C(w) the same with seed 0 and counter w,
    mix(x) = ``_MUL2`` x (x ^ (x >>> 15)), all mod 2^32.  Counter-based, so a chunk of rows
    gives exactly the bits of the full draw, whatever the width other layers have.  Why not
    torch's generator: its CPU Mersenne twister is serial, a visible part of a training step;
    this is a few vectorised int32 passes over the words.
    """
    words = _check_range(row0 + rows, cols, layer)
    device = torch.device(device) if device is not None else torch.device("cpu")
    layers = torch.tensor([layer], dtype=torch.int64, device=device)
    z = torch.empty(rows, words, dtype=torch.int32, device=device)
    _mix_(_row_keys(seed, layers, row0, rows)[0][:, None], _column_keys(words, device), z, torch.empty_like(z))
    return z.view(torch.int16)


class ChunkDropout:
    """Dropout of row chunks in place, into scratch allocated once: the hot-loop form of
    ``dropout_bits`` + ``dropout_mask`` (same bits, so the same masks).

    ``apply_(h, layer, row0)`` zeroes the dropped units of h (n, cols), rows row0 .. row0 + n
    of ``layer``, for ``seed``; n <= max_rows, cols <= max_cols.  ``layers``: the layers that
    will be dropped out, whose row keys are drawn together at the first call for a chunk.
    """

    def __init__(self, seed: int, p: float, max_rows: int, max_cols: int, device, dtype=torch.float32,
                 layers: Sequence[int] = ()):
        self.seed, self.threshold = int(seed), dropout_threshold(p)
        self.device = torch.device(device)
        words = (int(max_cols) + 1) // 2
        # words and scratch: apply_ uses the two halves, apply_t_ the whole as lanes (see there)
        self._zt = torch.empty(2 * max_rows * words, dtype=torch.int32, device=self.device)
        self._z, self._t = self._zt[: max_rows * words], self._zt[max_rows * words:]
        self._layers = list(layers)
        self._layer_index = {lay: j for j, lay in enumerate(self._layers)}
        self._layer_ids = torch.tensor(self._layers, dtype=torch.int64, device=self.device)
        self._chunk = None  # (row0, n, row keys (len(layers), n)) of the last chunk or ``draw_rows``
        self._views: dict = {}

    def draw_rows(self, row0: int, rows: int) -> None:
        """Draw the row keys of rows row0 .. row0 + rows of all ``layers`` now, for the chunks inside them.

        Why: a group of consecutive chunks (``lib.models.kernels.fused``'s halves) then draws its keys in
        one set of passes instead of one set of small operations per chunk; the keys are the same.

        Args:
            row0: the first row.
            rows: the number of rows.
        """
        _check_range(row0 + rows, 0)
        self._chunk = (row0, rows, _row_keys(self.seed, self._layer_ids, row0, rows))

    def _keys_of(self, layer: int, row0: int, n: int) -> torch.Tensor:
        """(n,) int32 row keys of ``layer``, drawn for all ``layers`` once per chunk (or ``draw_rows``)."""
        j = self._layer_index.get(layer)
        if j is None:
            return _row_keys(self.seed, torch.tensor([layer], device=self.device), row0, n)[0]
        if self._chunk is None or not self._chunk[0] <= row0 <= row0 + n <= self._chunk[0] + self._chunk[1]:
            self._chunk = (row0, n, _row_keys(self.seed, self._layer_ids, row0, n))
        start = row0 - self._chunk[0]
        return self._chunk[2][j, start: start + n]

    def apply_(self, h: torch.Tensor, layer: int, row0: int) -> torch.Tensor:
        n, cols = h.shape
        views = self._views.get((n, cols))
        if views is None:
            words = _check_range(0, cols)
            z = self._z[: n * words].view(n, words)
            views = (_column_keys(words, self.device), z, self._t[: n * words].view(n, words),
                     z.view(torch.int16)[:, :cols])
            self._views[(n, cols)] = views
        cols_keys, z, t, bits = views
        _check_range(row0 + n, cols, layer)
        _mix_(self._keys_of(layer, row0, n)[:, None], cols_keys, z, t)
        # h where bits >= threshold, else 0, in one pass (the int16 bits compared as h's dtype)
        return torch.ops.aten.threshold_backward.grad_input(h, bits, self.threshold - 1, grad_input=h)

    def apply_t_(self, h_t: torch.Tensor, layer: int, row0: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """``apply_`` in the transposed layout: h_t (cols, n) holds rows row0 .. row0 + n of ``layer``
        as columns; the same units are dropped.

        Why no transposed copy of the bits and no mask in h's dtype: the words are drawn as (words, n)
        into the odd rows of a (2 * words, n) int32 block, each shifted left by 16 into the even row
        above it.  Lane 1 (column 2w + 1) is kept when its word is >= threshold x 2^16 (its low lane
        only adds 0 .. 2^16 - 1), lane 0 (column 2w) when the shifted word is: row c of the block
        decides unit c of h.  One integer comparison of the block with h's bits read as integers of
        its width (``_INT_OF``) then copies the kept units bit for bit and gives the dropped ones the
        bits of 0.0: the float masking of ``apply_``, with no pass converting lanes to h's dtype.

        Args:
            h_t: (cols, n) activations, zeroed in place where dropped; cols <= max_cols, n <= max_rows.
            layer: the layer index (its stream).
            row0: the first row of the chunk.
            out: (cols, n) where the result goes instead (h_t then unchanged), e.g. a block of the
                next layer's input rows, so that no copy follows; default None: h_t itself.
        Returns:
            out, or h_t.
        """
        cols, n = h_t.shape
        out = h_t if out is None else out
        if self.threshold <= -32768:  # a probability that rounds to 0 (``effective_dropout_prob``): all kept
            return out if out is h_t else out.copy_(h_t)
        key = ("t", n, cols)
        views = self._views.get(key)
        if views is None:
            words = _check_range(0, cols)
            lanes = self._zt[: 2 * words * n].view(words, 2, n)
            views = (_column_keys(words, self.device)[:, None], lanes[:, 1], lanes[:, 0],
                     lanes.view(2 * words, n)[:cols])
            self._views[key] = views
        cols_keys, z, shifted, block = views
        _check_range(row0 + n, cols, layer)
        _mix_(cols_keys, self._keys_of(layer, row0, n), z, shifted)  # (the lane 0 rows as its scratch)
        torch.bitwise_left_shift(z, _I32[16], out=shifted)
        bits = _INT_OF[h_t.dtype]
        # lane >= threshold as a comparison of its word, lane at the top: > threshold x 2^16 - 1
        torch.ops.aten.threshold_backward.grad_input(h_t.view(bits), block, self.threshold * 65536 - 1,
                                                     grad_input=out.view(bits))
        return out


# the integer dtype of each float dtype's width: ``ChunkDropout.apply_t_`` copies or zeroes h's bits through it
_INT_OF = {torch.float64: torch.int64, torch.float32: torch.int32, torch.float16: torch.int16,
           torch.bfloat16: torch.int16}


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
