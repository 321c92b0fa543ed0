"""Fused forward + backward of the DeepSDF decoder's clamped-L1 training loss.

Why: on a CPU a bob_and_spot training step (64k rows through eight 128-wide layers) was
dominated not by its matrix products but by everything around them: every activation,
mask and gradient is a (64k x 128) float32 tensor that falls out of the cache, and autograd allocates,
writes and re-reads each of them.  Here the batch is cut into row chunks of a few
thousand rows; each chunk goes forward *and* backward through the whole network while its
activations are still in the L2/L3 cache, and the parameter gradients are accumulated
chunk by chunk.  Since the clamped L1 loss is a mean over rows, the gradient of a row's
loss needs nothing from other rows, so this gives the same gradients as autograd over the
full batch (up to float summation order).  Peak memory follows the chunk, not the batch,
so far larger batches fit; on a CPU the batch's two halves (``chunk_halves``) each have
their own scratch (benchmarks/train_step.py reports time and memory).

Other savings over the plain autograd graph, none of which change the function:
  * the latent code is the same for all rows of a scene, so its columns of a layer's
    weight are applied once per scene, as a per-scene bias (no [latent | xyz] copy, and
    the code's gradient is a column sum instead of a GEMM);
  * no gradient is computed for the positional encoding of xyz (xyz is data);
  * ReLU and dropout share one mask in the backward pass (the kept, positive units);
  * scratch buffers are allocated once per step, not once per operation.

On a CPU the GEMMs are torch.mm's (MKL on x86), or oneDNN's where MKL would run narrower
kernels than the CPU has (``.gemm.cpu_gemm``: non-Intel AVX-512 CPUs); both give the same sums up to
float rounding, and the tests compare each with autograd.

On a GPU the whole batch is one chunk (``default_chunk``, ``plan_chunks``): there is no
cache to fit, and one kernel per layer and pass over all B x S rows beats one per scene.

The function is ``fused_clamped_l1`` below; ``Decoder.clamped_l1_loss`` calls it, and
training reaches that through ``lib.training.SdfLoss``, the module DistributedDataParallel wraps,
so DDP sees a normal forward.  Dropout masks come from
``lib.models.kernels.elementwise.ChunkDropout`` with per-layer streams, exactly the masks the unfused
``Decoder.forward`` would draw for the same seed, which the tests use to compare both.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

from ...runtime.cpus import keep_freed_memory
from ...runtime.threads import concurrently, elementwise_section
from .elementwise import ChunkDropout, positional_encoding, positional_encoding_t_
from .gemm import uses_onednn

__all__ = ["FusedPlan", "LayerPlan", "WeightBlocks", "chunk_halves", "default_chunk", "fused_clamped_l1",
           "plan_chunks"]


@dataclass(frozen=True)
class LayerPlan:
    """Where the columns of one layer's weight (out, in) read from.

    x: number of leading columns fed by the previous layer's activations (0 for layer 0);
    lat: (start, stop) of the latent-code columns or None; pe: (start, stop) of the
    encoded-xyz columns or None; dropout: whether this layer's output is dropped out.
    """

    x: int
    lat: tuple[int, int] | None
    pe: tuple[int, int] | None
    dropout: bool


@dataclass(frozen=True)
class FusedPlan:
    """Static description of a decoder for ``fused_clamped_l1``.

    layers: one LayerPlan per linear layer (the last one has 1 output, tanh after it);
    fourier_degree: positional-encoding degree (0 = raw xyz); use_tanh: DeepSDF's extra
    tanh before the final one; dropout_prob: drop probability of the layers with
    ``dropout`` (``lib.models.kernels.elementwise.dropout_mask``'s); chunk: rows per chunk.
    """

    layers: tuple[LayerPlan, ...]
    fourier_degree: int
    use_tanh: bool
    dropout_prob: float
    chunk: int


def default_chunk(device: torch.device) -> int:
    """Rows per chunk: on a CPU 4096 (a 128-wide layer's activations, 4096 x 128 float32, stay in
    cache); on a GPU whole batches of up to 2^18 rows (bob_and_spot's 2 x 32192, cars_svr's
    16 x 8192) in one chunk, larger ones in groups of whole scenes, so activations stay under
    2^18 x 512 float32 per 512-wide layer."""
    return 4096 if torch.device(device).type == "cpu" else 1 << 18


_PAD = 16  # hidden widths are padded to a multiple of this (see WeightBlocks)


def _loss_head(plan, h: torch.Tensor, target: torch.Tensor, clamp: float, part, scale: float) -> torch.Tensor:
    """The last layer's output h (n, 1) -> tanh (twice with ``use_tanh``), its clamped L1 loss
    against the clamped targets (n,) added to ``part.total``; returns dL/dh (n, 1) times ``scale``.

    The derivative is autograd's: sign of the difference where -clamp <= pred <= clamp, else 0,
    times the tanh derivatives.  Why the tanh derivatives and ``scale`` are multiplied first: the
    sign and the mask are -1, 0 or 1, so multiplying by them last is exact, the same bits as taking
    the factors in turn (sign, mask, derivatives, scale) with fewer passes over the rows.

    Args:
        plan: the ``FusedPlan`` (its ``use_tanh``).
        h: (n, 1) the last layer's output.
        target: (n,) the targets, already clamped to [-clamp, clamp].
        clamp: the clamping distance.
        part: the ``_Partial`` whose ``total`` gets the summed loss.
        scale: 1 / (rows of the whole batch).
    Returns:
        (n, 1) dL/dh.
    """
    out = h.view(-1)
    if plan.use_tanh:
        inner = torch.tanh(out)
        pred = torch.tanh(inner)
    else:
        pred = torch.tanh(out)
    diff = pred.clamp(-clamp, clamp).sub_(target)
    part.total += diff.abs().sum()
    slope = 1.0 - pred * pred
    if plan.use_tanh:
        slope.mul_(1.0 - inner * inner)
    slope.mul_(scale)
    g = torch.sign(diff)
    g.mul_(pred.abs() <= clamp)  # |pred| <= clamp: the same test as -clamp <= pred <= clamp, NaN included
    return g.mul_(slope).unsqueeze(1)


def _chunk_inputs(plan, sh, part, scene, k0: int, k1: int, r0: int, r1: int):
    """Rows r0..r1 of scenes k0..k1: (rows n, per-layer biases, per-layer bias-gradient sums,
    encoded xyz (n, E)).  One scene: its bias rows; several whole scenes: per-scene biases
    broadcast over each scene's rows."""
    n = (k1 - k0) * (r1 - r0)
    if k1 - k0 == 1:
        biases, sums = scene[k0]
    else:
        biases = [sb[k0:k1, None, :] for sb in sh.scene_bias]
        sums = [part.colsums[i, k0:k1, :w] for i, w in enumerate(sh.widths)]
    pts = sh.xyz[k0:k1, r0:r1].reshape(n, 3)
    pe = positional_encoding(pts, plan.fourier_degree) if plan.fourier_degree else pts.contiguous()
    return n, biases, sums, pe


class WeightBlocks:
    """A decoder's effective weights cut into the contiguous, padded blocks the chunk loops use.

    layers: one LayerPlan per linear layer; codes (B, L); weights[i] (out, in) and biases[i]
    (out,) as applied (``Decoder.effective_weights``).  Hidden widths are padded to a
    multiple of 16 with units that are always 0 (zero weights and bias): MKL's kernels run
    slower on odd widths such as latent_in's 93 than on 96; callers drop the extra
    columns of what they return.  Per layer i:
      widths[i]      padded output width (the last layer's 1 is not padded);
      wx[i]          (widths[i], widths[i-1]) the columns fed by the previous layer, or None
                     (layer 0), as is for backward GEMMs; wx_t[i] its transpose (contiguous);
      wpe_t[i]       (encoded-xyz width, widths[i]) the encoded-xyz columns transposed, or None;
      scene_bias[i]  (B, widths[i]) bias + the latent columns applied to each scene's code
                     (``scene_biases(codes)`` recomputes them for other codes).
    """

    def __init__(self, layers: Sequence[LayerPlan], codes: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor]):
        last = len(layers) - 1
        self.widths = [w.shape[0] if i == last else -(-w.shape[0] // _PAD) * _PAD for i, w in enumerate(weights)]
        self.wx, self.wx_t, self.wpe_t, self.bias_pad, self.lat_t = [], [], [], [], []
        for i, (w, bias, lp) in enumerate(zip(weights, biases, layers)):
            out = self.widths[i]
            if lp.x:
                wx = w.new_zeros(out, self.widths[i - 1])
                wx[: w.shape[0], : lp.x] = w[:, : lp.x]
                self.wx.append(wx)
                self.wx_t.append(wx.t().contiguous())
            else:
                self.wx.append(None)
                self.wx_t.append(None)
            if lp.pe:
                wpe_t = w.new_zeros(lp.pe[1] - lp.pe[0], out)
                wpe_t[:, : w.shape[0]] = w[:, lp.pe[0]: lp.pe[1]].t()
                self.wpe_t.append(wpe_t)
            else:
                self.wpe_t.append(None)
            bp = w.new_zeros(out)
            bp[: w.shape[0]] = bias
            self.bias_pad.append(bp)
            if lp.lat:
                lat_t = w.new_zeros(lp.lat[1] - lp.lat[0], out)
                lat_t[:, : w.shape[0]] = w[:, lp.lat[0]: lp.lat[1]].t()
                self.lat_t.append(lat_t)
            else:
                self.lat_t.append(None)
        self.scene_bias = self.scene_biases(codes)

    def scene_biases(self, codes: torch.Tensor) -> list[torch.Tensor]:
        """Per layer (B, widths[i]): the bias plus the latent columns applied to each code of (B, L)."""
        b = codes.shape[0]
        return [bp.expand(b, -1).clone() if lt is None else torch.addmm(bp, codes, lt)
                for bp, lt in zip(self.bias_pad, self.lat_t)]


class _Shared(WeightBlocks):
    """The plan, the data, the weight blocks and the chunks (``plan_chunks``), for ``_run_chunks``."""

    def __init__(self, plan: FusedPlan, clamp: float, seed: int, codes: torch.Tensor, xyz: torch.Tensor,
                 sdf: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor]):
        super().__init__(plan.layers, codes, weights, biases)
        self.plan, self.clamp, self.seed, self.xyz, self.sdf = plan, clamp, seed, xyz, sdf
        self.target = sdf.clamp(-clamp, clamp)  # (B, S) the clamped targets, once per step
        # oneDNN's linear takes weights as (out, in) and returns new tensors: no scratch views
        self.onednn = uses_onednn(xyz.device, xyz.dtype)
        self.wpe = [None if t is None else t.t().contiguous() for t in self.wpe_t] if self.onednn else None
        # each scene of a oneDNN chunk adds a row and a column to its GEMMs (``_folded_weights``)
        self.chunks = plan_chunks(*sdf.shape, plan.chunk, _PAD if self.onednn else None)
        self._folded: dict = {}

    def folded(self, k0: int, k1: int) -> list[torch.Tensor]:
        """``_folded_weights(k0, k1)``, made at the first call (by the half that needs them, so that the
        halves make theirs side by side; two threads asking at once make the same values twice)."""
        f = self._folded.get((k0, k1))
        if f is None:
            f = self._folded[k0, k1] = self._folded_weights(k0, k1)
        return f

    def _folded_weights(self, k0: int, k1: int) -> list[torch.Tensor]:
        """Per layer, the weight of ``_chunks_onednn`` for a chunk of scenes k0:k1 (nb = k1 - k0): the
        scenes' biases folded in as nb extra input columns, read against nb indicator rows (row j is 1
        on the rows of scene k0 + j) that every hidden layer passes on as nb extra output rows (an
        identity block; ReLU keeps them); a layer that also reads the encoded xyz has its columns last.

        Why: the bias then costs no pass over the activations, the ReLU runs inside the GEMM (oneDNN's
        bias runs along the other axis of this layout), and a layer reading both its predecessor and
        the encoded xyz is one GEMM over both (``_chunks_onednn``'s input rows), not two summed.

        Args:
            k0, k1: the chunk's scenes.
        Returns:
            per layer i, (out + nb, K) with out = widths[i] (no nb rows for the last layer): the
            columns [biases (nb) | encoded xyz (E)] for layer 0, else [previous activations
            (widths[i - 1]) | biases (nb)] followed by the encoded-xyz columns (E) where the layer
            reads them; the identity block below the bias columns.
        """
        nb, last = k1 - k0, len(self.widths) - 1
        out = []
        for i, w in enumerate(self.widths):
            parts = [self.scene_bias[i][k0:k1].t()]
            if self.wx[i] is None:
                parts.append(self.wpe[i])
                bias_col = 0
            else:
                parts.insert(0, self.wx[i])
                bias_col = self.wx[i].shape[1]
                if self.wpe[i] is not None:
                    parts.append(self.wpe[i])
            top = torch.cat(parts, 1)
            main = top.new_zeros(w + (nb if i != last else 0), top.shape[1])
            main[:w] = top
            if i != last:
                main[w:, bias_col: bias_col + nb] = torch.eye(nb, dtype=top.dtype, device=top.device)
            out.append(main)
        return out


class _Partial:
    """Scratch for a chunk of up to ``c`` rows (allocated once and reused by every chunk, so
    the hot loop allocates nothing) and the running sums of the loss and the gradients."""

    def __init__(self, sh: _Shared, c: int):
        b = sh.sdf.shape[0]
        dev, dtype = sh.xyz.device, sh.xyz.dtype
        width = max(sh.widths)
        # oneDNN's loop sums its weight gradients transposed, (in, out): gwx[i].t() is contiguous there
        self.gwx = [None if m is None else m.new_zeros(m.shape[1], m.shape[0]).t() if sh.onednn else torch.zeros_like(m)
                    for m in sh.wx]
        self.gwpe = [torch.zeros_like(m).t() if m is not None else None for m in sh.wpe_t]
        self.colsums = torch.zeros(len(sh.widths), b, width, dtype=dtype, device=dev)  # bias gradients per scene
        self.total = torch.zeros((), dtype=dtype, device=dev)
        # scratch of the torch.mm loop (oneDNN's returns new tensors)
        self._acts = [] if sh.onednn else [torch.empty(c * n, dtype=dtype, device=dev) for n in sh.widths]
        self._grads = [] if sh.onednn else [torch.empty(c * width, dtype=dtype, device=dev) for _ in range(2)]
        self.dropout = ChunkDropout(sh.seed, sh.plan.dropout_prob, c, width, dev, dtype,
                                    layers=[i for i, lp in enumerate(sh.plan.layers) if lp.dropout])
        self._views: dict = {}

    def views(self, sh: _Shared, n: int):
        """(activations, input gradients) of an n-row chunk; built once per n, since the per-operation
        overhead of even a view counts in this loop (benchmarks/train_step.py)."""
        v = self._views.get(n)
        if v is None:
            acts = [buf[: n * w].view(n, w) for buf, w in zip(self._acts, sh.widths)]
            gins = [self._grads[i % 2][: n * sh.widths[i - 1]].view(n, sh.widths[i - 1]) if lp.x else None
                    for i, lp in enumerate(sh.plan.layers)]
            v = self._views[n] = (acts, gins)
        return v

    def add_(self, other: "_Partial") -> None:
        """Add ``other``'s running sums (loss, weight and bias gradients) to this one's."""
        self.total += other.total
        self.colsums += other.colsums
        for mine, theirs in zip(self.gwx + self.gwpe, other.gwx + other.gwpe):
            if mine is not None:
                mine += theirs


def plan_chunks(b: int, s: int, chunk: int, max_scenes: int | None = None) -> list[tuple[int, int, int, int]]:
    """Chunks (k0, k1, r0, r1) = rows r0:r1 of scenes k0:k1 covering a (b, s) batch once.

    ``chunk`` >= s: whole scenes, as many per chunk as fit, at most ``max_scenes`` (a GPU: the
    whole batch in one chunk, one kernel per layer and pass instead of one per scene); else
    rows of one scene.
    """
    if chunk >= s:
        per = max(1, chunk // max(1, s))
        if max_scenes is not None:
            per = min(per, max_scenes)
        return [(k, min(b, k + per), 0, s) for k in range(0, b, per)]
    return [(k, k + 1, r0, min(s, r0 + chunk)) for k in range(b) for r0 in range(0, s, chunk)]


def chunk_halves(chunks: Sequence[tuple[int, int, int, int]], device) -> list[list[tuple[int, int, int, int]]]:
    """The chunks as the groups whose sums are kept apart: on a CPU with >= 2 chunks two
    halves (first and second), else one group.

    Why: each half has its own scratch and sums, so the two can run side by side on one
    intra-op thread each (``lib.runtime.concurrently``), which on 2 cores beats one team
    woken and joined at every operation of every chunk (benchmarks/train_step.py).  The
    halves are kept apart on a CPU whether or not they run side by side, so the gradients
    are the same bits either way (first half's sum + second half's).
    """
    if torch.device(device).type != "cpu" or len(chunks) < 2:
        return [list(chunks)]
    mid = (len(chunks) + 1) // 2
    return [list(chunks[:mid]), list(chunks[mid:])]


def _half(sh: _Shared, rows: int, chunks: Sequence[tuple[int, int, int, int]]) -> _Partial:
    """The sums of one group of ``chunk_halves``: its scratch (chunks of up to ``rows`` rows) made and
    its chunks run in the calling thread, so that the halves set up side by side too."""
    part = _Partial(sh, rows)
    span = _row_span(sh.sdf.shape[1], chunks)
    if span is not None and any(lp.dropout for lp in sh.plan.layers):
        part.dropout.draw_rows(*span)
    _run_chunks(sh, part, chunks)
    return part


def _row_span(s: int, chunks: Sequence[tuple[int, int, int, int]]) -> tuple[int, int] | None:
    """(first row, rows) of the batch's rows (scene k's row r is row k * s + r) that ``chunks`` cover, if
    they follow one another without a gap; else None.

    Args:
        s: rows per scene.
        chunks: (k0, k1, r0, r1) as ``plan_chunks`` makes them (rows of one scene, or whole scenes).
    Returns:
        (row0, rows) or None.
    """
    if not chunks:
        return None
    row0 = end = chunks[0][0] * s + chunks[0][2]
    for k0, k1, r0, r1 in chunks:
        if k0 * s + r0 != end:
            return None
        end += (k1 - k0) * (r1 - r0)
    return row0, end - row0


def _run_chunks(sh: _Shared, part: _Partial, chunks: Sequence[tuple[int, int, int, int]]) -> None:
    """Forward and backward of the chunks (scenes k0:k1, rows r0:r1), summed into ``part``, with the
    GEMM library of ``sh`` (``.gemm.cpu_gemm``)."""
    (_chunks_onednn if sh.onednn else _chunks_blas)(sh, part, chunks)


def _chunks_blas(sh: _Shared, part: _Partial, chunks: Sequence[tuple[int, int, int, int]]) -> None:
    """``_run_chunks`` with torch.mm (BLAS) into the scratch views of ``part``."""
    plan, layers = sh.plan, sh.plan.layers
    s = sh.sdf.shape[1]
    scale = 1.0 / sh.sdf.numel()
    last = len(layers) - 1
    fwd = [(i, lp.x, lp.pe is not None, lp.dropout, sh.wx_t[i] if lp.x else sh.wpe_t[i], sh.wpe_t[i])
           for i, lp in enumerate(layers)]
    bwd = [(i, lp.x, lp.pe is not None, part.gwx[i], part.gwpe[i], sh.wx[i])
           for i, lp in reversed(list(enumerate(layers)))]
    # per scene: its bias rows and its bias-gradient sums, (layer,) lists of views
    scene = [([sb[k] for sb in sh.scene_bias], [part.colsums[i, k, :w] for i, w in enumerate(sh.widths)])
             for k in range(sh.sdf.shape[0])]
    for k0, k1, r0, r1 in chunks:
        nb = k1 - k0
        n, biases, sums, pe = _chunk_inputs(plan, sh, part, scene, k0, k1, r0, r1)
        acts, gins = part.views(sh, n)
        x = pe
        for i, has_x, has_pe, drop, w_in, w_pe in fwd:
            h = acts[i]
            if nb == 1:
                torch.addmm(biases[i], x, w_in, out=h)
            else:
                torch.mm(x, w_in, out=h)
                h.view(nb, -1, h.shape[1]).add_(biases[i])
            if has_x and has_pe:
                h.addmm_(pe, w_pe)
            if i == last:
                break
            h.clamp_min_(0.0)
            if drop:
                part.dropout.apply_(h, i, k0 * s + r0)
            x = h
        g = _loss_head(plan, h, sh.target[k0:k1, r0:r1].reshape(n), sh.clamp, part, scale)
        for i, has_x, has_pe, g_wx, g_wpe, w_x in bwd:
            if nb == 1:
                sums[i].add_(g.sum(0))
            else:
                sums[i].add_(g.view(nb, -1, g.shape[1]).sum(1))
            gt = g.t()
            if has_x:
                g_wx.addmm_(gt, acts[i - 1])
            if has_pe:
                g_wpe.addmm_(gt, pe)
            if i == 0:
                break
            gin = torch.mm(g, w_x, out=gins[i])
            # relu and dropout backward at once: pass where the unit was kept and positive
            g = torch.ops.aten.threshold_backward.grad_input(gin, acts[i - 1], 0.0, grad_input=gin)


def _onednn_inputs(sh: _Shared, nb: int, rows: int) -> tuple[torch.Tensor, dict]:
    """Input-row scratch of ``_chunks_onednn`` for chunks of nb scenes x ``rows`` rows (n = nb * rows).

    Args:
        sh: the step's weights and data.
        nb: scenes per chunk.
        rows: rows per scene in a chunk.
    Returns:
        (head, both): head (nb + E, n) the indicator rows (row j is 1 on the rows of the chunk's
        scene j, set here), then the encoded xyz (written per chunk): layer 0's input rows; both
        {i: (widths[i - 1] + nb + E, n)} for each layer i reading its predecessor and the encoded
        xyz: the predecessor's activations (written per chunk), the indicator rows (set here), the
        encoded xyz.  The first such layer's buffer ends in ``head`` (a view), so that its encoded
        xyz is written once.
    """
    n, e = nb * rows, sh.wpe[0].shape[1]
    layers = sh.plan.layers
    dtype, dev = sh.xyz.dtype, sh.xyz.device
    both = {i: torch.empty(sh.widths[i - 1] + nb + e, n, dtype=dtype, device=dev)
            for i, lp in enumerate(layers) if lp.x and lp.pe is not None}
    first = min(both, default=None)
    head = both[first][sh.widths[first - 1]:] if first is not None else torch.empty(nb + e, n, dtype=dtype, device=dev)
    indicators = torch.eye(nb, dtype=dtype, device=dev).repeat_interleave(rows, 1)
    head[:nb] = indicators
    for i, buf in both.items():  # a dropped-out predecessor writes only its units (``_chunks_onednn``)
        buf[sh.widths[i - 1]: sh.widths[i - 1] + nb] = indicators
    return head, both


def _chunks_onednn(sh: _Shared, part: _Partial, chunks: Sequence[tuple[int, int, int, int]]) -> None:
    """``_run_chunks`` with oneDNN's GEMMs (``.gemm.cpu_gemm`` "onednn"): the same sums, other rounding.

    Activations and gradients are kept transposed, (features, rows).  oneDNN's linear computes
    P Q^T, reading Q with any strides but copying a non-contiguous P, and returns new tensors (no
    ``out=``).  In this layout every product has a contiguous P: forward W X^T, input gradient
    W^T G^T, and the weight gradient G^T A from two contiguous (features, rows) blocks, which in
    the row layout needed both converted to oneDNN's own tensors first.  The biases ride in the
    GEMMs (``_Shared._folded_weights``: each hidden layer's activations end in the chunk's scene
    indicator rows), with the ReLU as the GEMM's post-op.  A layer that reads the encoded xyz as
    well reads one block of input rows, its predecessor's activations then the encoded xyz
    (``_onednn_inputs``), so that its forward and its weight gradient are one GEMM each.
    """
    plan, layers = sh.plan, sh.plan.layers
    s = sh.sdf.shape[1]
    scale = 1.0 / sh.sdf.numel()
    last = len(layers) - 1
    linear = torch.ops.mkldnn._linear_pointwise
    fwd = [(i, lp.dropout, sh.widths[i]) for i, lp in enumerate(layers)]
    bwd = [(i, sh.wx_t[i]) for i in reversed(range(len(layers)))]
    scratch: dict = {}
    # per layer its weight-gradient block (the GEMM's layout, indicator rows included) summed over the
    # chunks of the same scenes, then split into ``part``'s sums: one addition per layer and chunk
    blocks: list = [None] * len(layers)
    scenes = None  # (k0, k1) of the chunks summed in ``blocks``
    for k0, k1, r0, r1 in chunks:
        if scenes != (k0, k1):
            if scenes is not None:
                _add_blocks(sh, part, blocks, *scenes)
            blocks, scenes = [None] * len(layers), (k0, k1)
        ins = h = g = gin = None  # the last chunk's go first, so that the allocator reuses their memory
        nb = k1 - k0
        n = nb * (r1 - r0)
        inputs = scratch.get((nb, r1 - r0))
        if inputs is None:
            inputs = scratch[nb, r1 - r0] = _onednn_inputs(sh, nb, r1 - r0)
        head, both = inputs
        pe = head[nb:]
        positional_encoding_t_(sh.xyz[k0:k1, r0:r1].reshape(n, 3).t(), plan.fourier_degree, pe)
        folded = sh.folded(k0, k1)
        ins = [head] + [None] * last  # per layer its input rows, (in + nb [+ E], rows)
        for i, drop, width in fwd:
            main = folded[i]
            if i and ins[i] is None:  # (a layer reading the encoded xyz has its block filled already)
                ins[i] = h
            if main.shape[0] == 1:  # one output unit: a vector-matrix product, which oneDNN runs as a one-row GEMM
                h = torch.mm(main, ins[i])
            else:
                h = linear(main, ins[i].t(), None, "none" if i == last else "relu", [], "")
            if i == last:
                break
            # the next layer's input block, if it reads the encoded xyz too: these activations, indicators, encoded xyz
            nxt = both.get(i + 1)
            if nxt is not None:
                ins[i + 1] = nxt
                if nxt[width + nb:].data_ptr() != pe.data_ptr():  # not the buffer that holds head
                    nxt[width + nb:].copy_(pe)
            if drop:  # written straight into the next layer's block, if it has one
                part.dropout.apply_t_(h[:width], i, k0 * s + r0, None if nxt is None else nxt[:width])
            elif nxt is not None:
                nxt[:width].copy_(h[:width])
        g = _loss_head(plan, h, sh.target[k0:k1, r0:r1].reshape(n), sh.clamp, part, scale).view(1, n)
        # the weight gradients of the inputs' indicator rows are the scenes' bias gradients: no pass of their own
        for i, w_x in bwd:
            # layer 0: (out, nb + E), else (in + nb [+ E], out): the GEMM of the two contiguous blocks
            grads = linear(g, head, None, "none", [], "") if i == 0 else linear(ins[i], g, None, "none", [], "")
            if blocks[i] is None:
                blocks[i] = grads
            else:
                blocks[i].add_(grads)
            if i == 0:
                break
            prev = ins[i][: w_x.shape[0]]
            # one output unit: an outer product (no sums, so the GEMM's exact products)
            gin = torch.mul(w_x, g) if g.shape[0] == 1 else linear(w_x, g.t(), None, "none", [], "")
            # relu and dropout backward at once: pass where the unit was kept and positive
            g = torch.ops.aten.threshold_backward.grad_input(gin, prev, 0.0, grad_input=gin)
    if scenes is not None:
        _add_blocks(sh, part, blocks, *scenes)


def _add_blocks(sh: _Shared, part: _Partial, blocks: Sequence[torch.Tensor | None], k0: int, k1: int) -> None:
    """Add ``_chunks_onednn``'s weight-gradient blocks of chunks of scenes k0:k1 to ``part``'s sums.

    Args:
        blocks: per layer i, None (no chunk) or layer 0's (out, nb + E) [biases | encoded xyz], else
            (widths[i - 1] + nb [+ E], out) [weights of the previous activations; biases; encoded xyz],
            nb = k1 - k0.
        k0, k1: the scenes.
    """
    nb = k1 - k0
    for i, blk in enumerate(blocks):
        if blk is None:
            continue
        if i == 0:
            part.colsums[0, k0:k1, : blk.shape[0]].add_(blk[:, :nb].t())
            part.gwpe[0].add_(blk[:, nb:])
            continue
        width = sh.wx_t[i].shape[0]
        part.gwx[i].t().add_(blk[:width])
        part.colsums[i, k0:k1, : blk.shape[1]].add_(blk[width: width + nb])
        if part.gwpe[i] is not None:
            part.gwpe[i].t().add_(blk[width + nb:])


def _gradients(plan: FusedPlan, codes: torch.Tensor, weights: Sequence[torch.Tensor], parts: Sequence[_Partial],
               rows: int) -> tuple[torch.Tensor, tuple]:
    """The loss and the gradients of codes and parameters from the groups' sums (``chunk_halves``).

    Args:
        plan: the decoder's plan.
        codes: (B, L) the batch's codes.
        weights: per layer its effective weight (out, in).
        parts: per group its ``_Partial`` sums; the first one gets the others added.
        rows: B * S, the rows of the batch.
    Returns:
        (loss, (gcode (B, L), [per layer (out, in)], [per layer (out,)])).
    """
    part = parts[0]
    for other in parts[1:]:
        part.add_(other)
    total = part.total / rows
    colsums = part.colsums
    gcode = torch.zeros_like(codes)
    gw, gb = [], []
    for i, (w, lp) in enumerate(zip(weights, plan.layers)):
        cs = colsums[i, :, : w.shape[0]]  # (B, out)
        gb.append(cs.sum(0))
        full = torch.zeros_like(w)
        if lp.x:
            full[:, : lp.x] = part.gwx[i][: w.shape[0], : lp.x]
        if lp.pe:
            full[:, lp.pe[0]: lp.pe[1]] = part.gwpe[i][: w.shape[0]]
        if lp.lat:
            full[:, lp.lat[0]: lp.lat[1]] = cs.t() @ codes
            gcode += cs @ w[:, lp.lat[0]: lp.lat[1]]
        gw.append(full)
    return total, (gcode, gw, gb)


class _FusedClampedL1(torch.autograd.Function):
    @staticmethod
    def forward(ctx, plan: FusedPlan, clamp: float, seed: int, codes: torch.Tensor, xyz: torch.Tensor,
                sdf: torch.Tensor, *params: torch.Tensor) -> torch.Tensor:
        weights, biases = params[0::2], params[1::2]
        if sdf.device.type == "cpu":
            keep_freed_memory()  # the step's scratch and oneDNN's outputs are reused, not page-faulted in again
        # the step's serial parts are small operations: on one intra-op thread, not waking and joining the
        # sleeping others for each (``elementwise_section``); the halves still run side by side on theirs
        with elementwise_section(sdf.device):
            sh = _Shared(plan, clamp, seed, codes, xyz, sdf, weights, biases)
        chunks = sh.chunks
        rows = max((k1 - k0) * (r1 - r0) for k0, k1, r0, r1 in chunks)
        groups = chunk_halves(chunks, sdf.device)
        parts = concurrently([lambda g=g: _half(sh, rows, g) for g in groups], sdf.device)
        with elementwise_section(sdf.device):
            total, ctx.grads = _gradients(plan, codes, weights, parts, sdf.numel())
        return total

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, grad_out: torch.Tensor):
        gcode, gw, gb = ctx.grads
        del ctx.grads
        params = [g for pair in zip(gw, gb) for g in pair]
        # the loss itself (grad_out 1, a CPU scalar read without a sync): x * 1 is x, so no pass over the gradients
        if not (grad_out.device.type == "cpu" and grad_out.numel() == 1 and float(grad_out) == 1.0):
            params = [g * grad_out for g in params]
            gcode = gcode * grad_out
        return (None, None, None, gcode, None, None, *params)


def fused_clamped_l1(plan: FusedPlan, clamp: float, seed: int, codes: torch.Tensor, xyz: torch.Tensor,
                     sdf: torch.Tensor, params: Sequence[torch.Tensor]) -> torch.Tensor:
    """mean over rows of |clamp(f(code_b, xyz_bs)) - clamp(sdf_bs)|, with gradients.

    codes (B, L); xyz (B, S, 3) and sdf (B, S) without gradients; params = [W0, b0, W1,
    b1, ...] the effective weights (out, in) and biases of the layers in ``plan``, dropout's
    1 / (1 - p) already folded into the columns fed by dropped-out activations.  ``seed``
    (int) selects the dropout masks.  Returns a scalar whose backward gives the gradients
    of ``codes`` and ``params``.
    """
    if xyz.requires_grad or sdf.requires_grad:
        raise ValueError("fused_clamped_l1: xyz and sdf must not require gradients")
    return _FusedClampedL1.apply(plan, float(clamp), int(seed), codes, xyz, sdf, *params)
