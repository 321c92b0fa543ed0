"""Inference kernels of a frozen DeepSDF decoder: SDF values, and values with input gradients.

Why: meshing a code evaluates the decoder at ~10^4 - 10^5 points per extraction, and the
MeshSDF backward needs ds/dcode and ds/dxyz at every vertex.  Through ``Decoder.forward``
and autograd, a CPU spends more time allocating, page-faulting and re-reading the
(points x 128) activations than multiplying them (a GEMM that allocates its output runs
well below one writing into a preallocated buffer).  Here the points are cut into row chunks
whose activations live in scratch buffers allocated once per thread and reused by every
chunk and call, so the hot loop allocates nothing; and, as in the fused training loss
(:mod:`.fused`, whose ``WeightBlocks`` these kernels share):

  * the latent code's columns of a layer are applied once per code, as a per-code bias
    row (no [code | xyz] rows are built); rows of several codes gather their bias rows;
  * the input gradient is a hand-written backward with output gradient 1 per row: tanh',
    the ReLU masks (``threshold_backward`` on the kept activations), one ``g @ W`` per
    layer and NO weight gradients; the code and encoded-xyz gradients are collected from
    the columns that read them (layer 0, the latent_in layers, xyz_in_all), and the xyz
    gradient is chained through the Fourier features by one small GEMM.

On a CPU the GEMMs are torch.mm's (MKL on x86) into the scratch, or oneDNN's where MKL would
run narrower kernels than the CPU has (``.gemm.cpu_gemm``, the fused loss's choice too:
non-Intel AVX-512 CPUs; float32 only).  oneDNN's linear has no ``out=``: it returns each
layer's activations as a new tensor, with the bias and the ReLU applied inside the GEMM;
``lib.runtime.cpus.keep_freed_memory`` lets malloc hand the previous chunk's freed blocks
back to it, so those outputs are not page-faulted and zeroed again every chunk.

The functions compute the same function as ``Decoder.forward`` in eval mode (same values
and input gradients up to float rounding: the code's contribution is summed in another
order, and each GEMM library rounds its own way).  They never build an autograd graph; the
caller puts autograd around them where gradients must flow on (``lib.layer.sdf``).

Entry points: ``InferenceKernel(decoder)`` (weights prepared once per parameter version),
``values`` and ``values_and_input_grad``.  A decoder qualifies when
``decoder.inference_plan(device)`` is not None (a ``lib.models.decoder.Decoder`` without
LayerNorm, latent dropout or active dropout).
"""
from __future__ import annotations

import copy
import threading
from typing import Sequence

import torch

from ...runtime.cpus import keep_freed_memory, openmp_threads_sleep
from ...runtime.threads import FEW_ROWS, concurrently
from .elementwise import PE_PI
from .fused import FusedPlan, WeightBlocks
from .gemm import uses_onednn

__all__ = ["FEW_ROWS", "InferenceKernel", "SIDE_BY_SIDE", "default_rows", "values", "values_and_input_grad"]


def default_rows(device) -> int:
    """Rows per chunk: on a CPU 4096 (a 128-wide layer's activations are 2 MB, in cache, and a
    4096-row GEMM runs near the library's peak); on a GPU 2^14, the
    extraction's call size, so one kernel per layer and call (a 512-wide network's saved
    activations are then 170 MB of scratch)."""
    return 4096 if torch.device(device).type == "cpu" else 1 << 14


_SCRATCH = threading.local()  # per thread: two concurrent calls must not share activations


def _scratch(key: tuple, numel: int, device, dtype) -> torch.Tensor:
    """A flat scratch buffer of at least ``numel`` elements for ``key`` (grown, never shrunk;
    bounded by the chunk size: on a CPU 16 MB for bob_and_spot's input gradients, 42 MB for
    a 512-wide network, per thread and device)."""
    cache = getattr(_SCRATCH, "buffers", None)
    if cache is None:
        cache = _SCRATCH.buffers = {}
    key = (torch.device(device), dtype) + key
    buf = cache.get(key)
    if buf is None or buf.numel() < numel:
        if len(cache) > 64:  # many devices/dtypes/shapes: start over rather than grow without bound
            cache.clear()
        buf = cache[key] = torch.empty(numel, dtype=dtype, device=device)
    return buf


class _Prepared(WeightBlocks):
    """Weight blocks of one parameter/code version plus what the input-gradient pass needs.

    ext[i]: (widths[i], L + E) the columns of layer i that read the code (first L) and the
    encoded xyz (last E), zero where the layer does not read them, or None; with it one
    GEMM per layer gives that layer's share of d s / d[code | encoded xyz].
    For oneDNN's linear, which multiplies by W^T of a weight W (out, in): wpe[i] (widths[i], E)
    the transpose of wpe_t[i] and ext_t[i] (L + E, widths[i]) that of ext[i] (contiguous, or None).
    """

    def __init__(self, plan: FusedPlan, codes: torch.Tensor, weights: Sequence[torch.Tensor],
                 biases: Sequence[torch.Tensor]):
        super().__init__(plan.layers, codes, weights, biases)
        self.plan = plan
        self.latent = codes.shape[1]
        first = plan.layers[0]
        self.encoded = first.pe[1] - first.pe[0]
        lat, enc = self.latent, self.encoded
        self.ext = []
        for i, (w, lp) in enumerate(zip(weights, plan.layers)):
            if not lp.lat and not lp.pe:
                self.ext.append(None)
                continue
            e = w.new_zeros(self.widths[i], lat + enc)
            if lp.lat:
                e[: w.shape[0], :lat] = w[:, lp.lat[0]: lp.lat[1]]
            if lp.pe:
                e[: w.shape[0], lat:] = w[:, lp.pe[0]: lp.pe[1]]
            self.ext.append(e)
        self.wpe = [None if t is None else t.t().contiguous() for t in self.wpe_t]
        self.ext_t = [None if e is None else e.t().contiguous() for e in self.ext]
        self._bind(codes)
        d = plan.fourier_degree
        self.freq = None
        if d:
            dev, dt = codes.device, weights[0].dtype
            self.freq = (PE_PI * 2.0 ** torch.arange(d, dtype=dt, device=dev)).view(d, 1)  # (d, 1)
            # (3d, 3): d(sum_l f_l t_lj)/dt: the chain matrix from angle derivatives to xyz
            self.chain = torch.kron(self.freq, torch.eye(3, dtype=dt, device=dev))

    def _bind(self, codes: torch.Tensor) -> None:
        self.latent = codes.shape[1]
        # rows of one code: the bias rows of code 0; several codes differ only on layers with lat columns
        self.bias_row = [sb[0] for sb in self.scene_bias]
        self.per_code = [bool(lp.lat) and codes.shape[0] > 1 for lp in self.plan.layers]

    def with_codes(self, codes: torch.Tensor) -> "_Prepared":
        """The same weight blocks bound to other codes (B, L): only the per-code biases are new."""
        other = copy.copy(self)
        other.scene_bias = self.scene_biases(codes)
        other._bind(codes)
        return other


class InferenceKernel:
    """The inference kernels of one decoder, its weights prepared at most once per version.

    decoder: a module with ``inference_plan(device)`` (FusedPlan or None) and
    ``effective_weights(False)`` (``lib.models.decoder.Decoder``).  The weight blocks are
    keyed on every parameter's identity, ``_version`` and storage (the tensors are held while
    keyed, so no key can be reused), the per-code biases on the codes' identity and
    ``_version``: an optimizer step or a moved code between calls is seen.  Writes through
    ``p.data`` bump no version, which is why the mesh layer makes one kernel per mesh (one
    weight preparation per extraction and its backward) rather than one per decoder.
    """

    def __init__(self, decoder):
        self.decoder = decoder
        self._plans: dict = {}
        # each replaced as a whole (one assignment), so a reader never pairs a key with another's blocks
        self._weights: tuple | None = None  # (weights key, held tensors, _Prepared)
        self._coded: tuple | None = None    # ((weights key, codes key), held codes, _Prepared bound to them)

    def plan(self, device):
        """``decoder.inference_plan(device)``, cached per train/eval mode and device type."""
        dec = self.decoder
        key = (dec.training, torch.device(device).type)
        if key not in self._plans:
            self._plans[key] = dec.inference_plan(device)
        return self._plans[key]

    def supported(self, device) -> bool:
        """Whether the kernels compute this decoder's function in its current mode."""
        return self.plan(device) is not None

    def prepare(self, codes: torch.Tensor) -> _Prepared:
        """The weight blocks bound to codes (B, L) (detached), rebuilt only when a tensor changed."""
        dec = self.decoder
        params = list(dec.parameters())
        wkey = tuple((id(p), p._version, p.data_ptr()) for p in params) + (codes.device, codes.dtype)
        ckey = (id(codes), codes._version, codes.data_ptr(), tuple(codes.shape))
        held = self._weights
        if held is None or held[0] != wkey:
            with torch.no_grad():
                ws = dec.effective_weights(False)
                prep = _Prepared(self.plan(codes.device), codes.detach(), ws[0::2], ws[1::2])
            held = self._weights = (wkey, (params, [p.data for p in params]), prep)
            self._coded = ((wkey, ckey), codes, prep)
        coded = self._coded
        if coded is None or coded[0] != (wkey, ckey):
            with torch.no_grad():
                coded = self._coded = ((wkey, ckey), codes, held[2].with_codes(codes.detach()))
        return coded[2]

    def values(self, codes: torch.Tensor, xyz: torch.Tensor, index: torch.Tensor | None = None) -> torch.Tensor:
        """SDF values (P,) at xyz (P, 3) of codes (B, L): row p uses code ``index[p]`` (P,) int64,
        or code 0 when index is None.  No autograd graph."""
        return values(self.prepare(codes), xyz, index)

    def values_and_input_grad(self, codes: torch.Tensor, xyz: torch.Tensor, index: torch.Tensor | None = None):
        """(values (P,), ds/dcode rows (P, L), ds/dxyz (P, 3)); see :func:`values_and_input_grad`."""
        return values_and_input_grad(self.prepare(codes), xyz, index)


def _encode(prep: _Prepared, pts: torch.Tensor, ang: torch.Tensor | None, pe: torch.Tensor | None,
            waves: torch.Tensor | None) -> torch.Tensor:
    """The encoded xyz (n, E) of pts (n, 3), into ``pe`` (n, 6d) with ``ang`` (n, 3d) and ``waves``
    (2, d, n, 3) scratch; the layout of ``lib.models.kernels.elementwise.positional_encoding`` (cos
    terms, then sin terms; term l, coordinate j at 3l + j).

    The angles, cosines and sines are computed frequency-major, (d, n, 3): over long contiguous rows
    torch's cos/sin run vectorised, while written straight into pe's (n, 3d) halves each row is an
    inner loop of 3d elements, too short for the vectorised step (the same bits either way: a test
    compares with ``positional_encoding``).  One transposing copy then lays them out as pe.
    """
    if prep.freq is None:
        return pts
    n, d = pts.shape[0], prep.plan.fourier_degree
    flat = ang.view(d, n * 3)  # the frequency-major angles: (d, n * 3) = freq (d, 1) * xyz (1, n * 3)
    torch.mul(pts.reshape(1, n * 3), prep.freq, out=flat)
    torch.cos(flat, out=waves[0].view(d, n * 3))
    torch.sin(flat, out=waves[1].view(d, n * 3))
    pe.view(n, 2 * d, 3).copy_(waves.view(2 * d, n, 3).transpose(0, 1))
    return pe


def _forward(prep: _Prepared, acts: Sequence[torch.Tensor], x: torch.Tensor, idx: torch.Tensor | None) -> torch.Tensor:
    """Pre-activation of the last layer (n, 1) for encoded rows x (n, E); hidden activations
    (after ReLU) written into ``acts[i]`` (n, widths[i]) (the same buffer may repeat)."""
    pe = x
    layers = prep.plan.layers
    last = len(layers) - 1
    for i, lp in enumerate(layers):
        h = acts[i]
        w_in = prep.wx_t[i] if lp.x else prep.wpe_t[i]
        if idx is not None and prep.per_code[i]:
            torch.index_select(prep.scene_bias[i], 0, idx, out=h)
            h.addmm_(x, w_in)
        else:
            torch.addmm(prep.bias_row[i], x, w_in, out=h)
        if lp.x and lp.pe:
            h.addmm_(pe, prep.wpe_t[i])
        if i == last:
            return h
        h.clamp_min_(0.0)
        x = h


def _forward_onednn(prep: _Prepared, x: torch.Tensor, idx: torch.Tensor | None, gather: torch.Tensor | None,
                    acts: list | None = None) -> torch.Tensor:
    """``_forward`` with oneDNN's linear, which returns new tensors (no ``out=``) and applies
    the bias and the ReLU inside the GEMM: pre-activation of the last layer (n, 1) for encoded
    rows x (n, E); the hidden activations (n, widths[i]) appended to ``acts`` when given.

    gather: flat scratch of at least n * max(widths) elements for the rows' per-code bias
    rows (several codes), or None when ``idx`` is None.
    """
    linear = torch.ops.mkldnn._linear_pointwise
    pe = x
    n = x.shape[0]
    layers = prep.plan.layers
    last = len(layers) - 1
    for i, lp in enumerate(layers):
        w = prep.wx[i] if lp.x else prep.wpe[i]
        rows = None
        if idx is not None and prep.per_code[i]:
            w_out = prep.widths[i]
            rows = torch.index_select(prep.scene_bias[i], 0, idx, out=gather[: n * w_out].view(n, w_out))
        relu = False
        if lp.x and lp.pe:  # the encoded-xyz part, with the bias, added inside the x GEMM
            other = linear(pe, prep.wpe[i], None if rows is not None else prep.bias_row[i], "none", [], "")
            if rows is not None:
                other.add_(rows)
            h = linear.binary(x, other, w, None, "add")
        elif rows is not None:
            h = linear.binary(x, rows, w, None, "add")
        else:
            relu = i != last
            h = linear(x, w, prep.bias_row[i], "relu" if relu else "none", [], "")
        if i == last:
            return h
        if not relu:
            h.clamp_min_(0.0)
        if acts is not None:
            acts.append(h)
        x = h


def _tanh_out(prep: _Prepared, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
    """The output tanh (and DeepSDF's extra inner tanh with use_tanh) of h (n, 1) into out (n,);
    returns the inner tanh (n,) or None (needed for the derivative)."""
    h = h.view(-1)
    if prep.plan.use_tanh:
        inner = torch.tanh(h)
        torch.tanh(inner, out=out)
        return inner
    torch.tanh(h, out=out)
    return None


def _tanh_out_and_grad(prep: _Prepared, h: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
    """``_tanh_out`` of h (n, 1) into out (n,), and d out / d h written over h: returns h (n, 1)."""
    inner = _tanh_out(prep, h, out)
    # d tanh(u)/du = 1 - tanh(u)^2, written into the last layer's activation
    g = torch.mul(out, out, out=h.view(-1)).neg_().add_(1.0)
    if inner is not None:
        g.mul_(inner.mul_(inner).neg_().add_(1.0))
    return h


def _setup(prep: _Prepared, xyz: torch.Tensor, index, rows: int | None):
    """(P, rows per chunk, the per-row code index or None when all rows use code 0, device, dtype)."""
    rows = int(rows or default_rows(xyz.device))
    idx = index if (index is not None and prep.scene_bias[0].shape[0] > 1) else None
    return xyz.shape[0], rows, idx, xyz.device, prep.bias_row[0].dtype


SIDE_BY_SIDE = 2048    # default ``side_by_side``: from this many rows the chunks run as two halves side by side
# FEW_ROWS (re-exported): the thread policy's bound for decoder calls, :mod:`lib.runtime.threads`


def _plan(p: int, rows: int, device, side_by_side: int = SIDE_BY_SIDE) -> tuple[int, list]:
    """(rows per chunk, row ranges [(lo, hi)] of whole chunks) for p rows on ``device``.

    Rows per chunk: at most ``rows``, the p rows split evenly (no short last chunk, whose
    small GEMMs would run below the others' rate).  On a CPU whose idle OpenMP threads sleep
    (the thread policy's default) and from ``side_by_side`` rows, the chunks are an even
    number and come as two ranges, which ``lib.runtime.threads.concurrently`` runs side by side,
    each on half the intra-op threads: on 2 cores one, so no OpenMP team to wake and join at
    every layer.  Not with busy-waiting threads, whose spinning competes with the second
    thread (benchmarks/contention.py runs the demo under both policies).  The chunks are the same
    either way, so the same values.
    """
    split = torch.device(device).type == "cpu" and p >= side_by_side and openmp_threads_sleep()
    n = -(-p // rows)
    n += n % 2 if split else 0
    c = -(-p // n)
    starts = list(range(0, p, c))
    if not split or len(starts) < 2:
        return c, [(0, p)]
    mid = starts[len(starts) // 2]
    return c, [(0, mid), (mid, p)]


def _encode_views(prep: _Prepared, c: int, n: int, dev, dt):
    """(angle scratch (n, 3d), encoded-xyz scratch (n, 6d), cos/sin scratch (2, d, n, 3)) for a
    chunk of n <= c rows (see :func:`_encode`), or (None, None, None) without positional encoding."""
    if prep.freq is None:
        return None, None, None
    enc = prep.encoded
    ang = _scratch(("ang",), c * enc // 2, dev, dt)[: n * enc // 2].view(n, enc // 2)
    pe = _scratch(("pe",), c * enc, dev, dt)[: n * enc].view(n, enc)
    waves = _scratch(("waves",), c * enc, dev, dt)[: n * enc].view(2, enc // 6, n, 3)
    return ang, pe, waves


def _chunks(lo: int, hi: int, c: int, build):
    """(start, rows, build(rows)) over rows lo..hi in chunks of c; the scratch views of a chunk
    size are built once (per-operation overhead, even of views, counts in this loop)."""
    views: dict = {}
    for s in range(lo, hi, c):
        n = min(c, hi - s)
        v = views.get(n)
        if v is None:
            v = views[n] = build(n)
        yield s, n, v


@torch.no_grad()
def values(prep: _Prepared, xyz: torch.Tensor, index: torch.Tensor | None = None, rows: int | None = None,
           side_by_side: int = SIDE_BY_SIDE) -> torch.Tensor:
    """SDF (P,) of the prepared decoder at xyz (P, 3), code ``index`` (P,) int64 per row (None:
    code 0); ``rows`` per chunk (default :func:`default_rows`).  Same function as
    ``Decoder.forward`` in eval mode on [codes[index] | xyz].

    side_by_side: from this many rows (default ``SIDE_BY_SIDE``), on a CPU whose idle OpenMP
    threads sleep, the chunks run as two halves on two threads (see :func:`_plan`); a speed
    setting only: the result is the same bits either way."""
    p, rows, idx, dev, dt = _setup(prep, xyz, index, rows)
    out = torch.empty(p, dtype=dt, device=dev)
    if p == 0:
        return out
    c, ranges = _plan(p, rows, dev, side_by_side)
    half = c * max(prep.widths)
    pts_all = xyz.to(dt)
    if uses_onednn(dev, dt):
        keep_freed_memory()  # oneDNN's outputs are allocated per layer: reused, not page-faulted in again

        def run_onednn(lo: int, hi: int) -> None:
            gather = None if idx is None else _scratch(("gather",), half, dev, dt)
            for s, n, enc in _chunks(lo, hi, c, lambda n: _encode_views(prep, c, n, dev, dt)):
                x = _encode(prep, pts_all[s: s + n], *enc)
                h = _forward_onednn(prep, x, None if idx is None else idx[s: s + n], gather)
                _tanh_out(prep, h, out[s: s + n])

        concurrently([lambda lo=lo, hi=hi: run_onednn(lo, hi) for lo, hi in ranges], dev)
        return out

    def run(lo: int, hi: int) -> None:
        buf = _scratch(("values",), 2 * half, dev, dt)  # two activations, ping-pong (per thread)

        def build(n):
            acts = [buf[(i % 2) * half: (i % 2) * half + n * w].view(n, w) for i, w in enumerate(prep.widths)]
            return (acts, *_encode_views(prep, c, n, dev, dt))

        for s, n, (acts, *enc) in _chunks(lo, hi, c, build):
            x = _encode(prep, pts_all[s: s + n], *enc)
            h = _forward(prep, acts, x, None if idx is None else idx[s: s + n])
            _tanh_out(prep, h, out[s: s + n])

    concurrently([lambda lo=lo, hi=hi: run(lo, hi) for lo, hi in ranges], dev)
    return out


@torch.no_grad()
def values_and_input_grad(prep: _Prepared, xyz: torch.Tensor, index: torch.Tensor | None = None,
                          rows: int | None = None, side_by_side: int = SIDE_BY_SIDE
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Values (P,), d s_p / d code (P, L) and d s_p / d xyz_p (P, 3) of every row.

    xyz (P, 3); index (P,) int64 code per row (None: code 0).  Row p's derivatives are
    those of s_p = decoder([codes[index[p]] | xyz_p]) w.r.t. its own input row, i.e. the
    gradient of sum_p s_p w.r.t. the (P, L + 3) input rows; no weight gradients.
    rows, side_by_side: as for :func:`values`.
    """
    p, rows, idx, dev, dt = _setup(prep, xyz, index, rows)
    lat, enc = prep.latent, prep.encoded
    out = torch.empty(p, dtype=dt, device=dev)
    g_code = torch.empty(p, lat, dtype=dt, device=dev)
    g_xyz = torch.empty(p, 3, dtype=dt, device=dev)
    if p == 0:
        return out, g_code, g_xyz
    c, ranges = _plan(p, rows, dev, side_by_side)
    widths = prep.widths
    width = max(widths)
    total = sum(widths)
    layers = prep.plan.layers
    offs = [0]
    for w in widths:
        offs.append(offs[-1] + c * w)
    pts_all = xyz.to(dt)
    if uses_onednn(dev, dt):
        keep_freed_memory()  # oneDNN's outputs are allocated per layer: reused, not page-faulted in again

        def run_onednn(lo: int, hi: int) -> None:
            gather = None if idx is None else _scratch(("gather",), c * width, dev, dt)
            for s, n, enc in _chunks(lo, hi, c, lambda n: _encode_views(prep, c, n, dev, dt)):
                _grad_chunk_onednn(prep, pts_all, idx, s, n, (*enc, gather), out, g_code, g_xyz)

        concurrently([lambda lo=lo, hi=hi: run_onednn(lo, hi) for lo, hi in ranges], dev)
        return out, g_code, g_xyz

    def run(lo: int, hi: int) -> None:
        buf = _scratch(("acts",), c * total, dev, dt)           # per thread
        gbuf = _scratch(("grads",), 2 * c * width, dev, dt)
        ebuf = _scratch(("ext",), c * (lat + enc), dev, dt)

        def build(n):
            acts = [buf[o: o + n * w].view(n, w) for o, w in zip(offs, widths)]
            gins = [gbuf[(i % 2) * c * width: (i % 2) * c * width + n * widths[i - 1]].view(n, widths[i - 1])
                    if lp.x else None for i, lp in enumerate(layers)]
            return (acts, gins, ebuf[: n * (lat + enc)].view(n, lat + enc), *_encode_views(prep, c, n, dev, dt))

        for s, n, views in _chunks(lo, hi, c, build):
            _grad_chunk(prep, pts_all, idx, s, n, views, out, g_code, g_xyz)

    concurrently([lambda lo=lo, hi=hi: run(lo, hi) for lo, hi in ranges], dev)
    return out, g_code, g_xyz


def _grad_chunk(prep: _Prepared, pts_all, idx, s: int, n: int, views, out, g_code, g_xyz) -> None:
    """Rows s..s+n of :func:`values_and_input_grad` into out, g_code and g_xyz, with the
    chunk's scratch views (acts, gins, ext, ang, pe, waves)."""
    acts, gins, ext, ang, pe, waves = views
    last = len(prep.plan.layers) - 1
    x = _encode(prep, pts_all[s: s + n], ang, pe, waves)
    h = _forward(prep, acts, x, None if idx is None else idx[s: s + n])
    g = _tanh_out_and_grad(prep, h, out[s: s + n])
    ext.zero_()
    for i in range(last, -1, -1):
        if prep.ext[i] is not None:
            ext.addmm_(g, prep.ext[i])
        if i == 0:
            break
        gin = torch.mm(g, prep.wx[i], out=gins[i])
        # relu backward: pass where the unit was positive (its kept activation > 0)
        g = torch.ops.aten.threshold_backward.grad_input(gin, acts[i - 1], 0.0, grad_input=gin)
    _input_grads(prep, ext, pe, ang, s, n, g_code, g_xyz)


def _grad_chunk_onednn(prep: _Prepared, pts_all, idx, s: int, n: int, views, out, g_code, g_xyz) -> None:
    """``_grad_chunk`` with oneDNN's linear (``_forward_onednn``), views (ang, pe, waves, gather): the
    activations and gradients are its new tensors rather than scratch."""
    ang, pe, waves, gather = views
    linear = torch.ops.mkldnn._linear_pointwise
    last = len(prep.plan.layers) - 1
    x = _encode(prep, pts_all[s: s + n], ang, pe, waves)
    acts: list = []
    h = _forward_onednn(prep, x, None if idx is None else idx[s: s + n], gather, acts)
    g = _tanh_out_and_grad(prep, h, out[s: s + n])
    ext = None
    for i in range(last, -1, -1):
        e_t = prep.ext_t[i]
        if e_t is not None:
            ext = linear(g, e_t, None, "none", [], "") if ext is None else linear.binary(g, ext, e_t, None, "add")
        if i == 0:
            break
        gin = linear(g, prep.wx_t[i], None, "none", [], "")
        g = torch.ops.aten.threshold_backward.grad_input(gin, acts[i - 1], 0.0, grad_input=gin)
    _input_grads(prep, ext, pe, ang, s, n, g_code, g_xyz)


def _input_grads(prep: _Prepared, ext: torch.Tensor, pe, ang, s: int, n: int, g_code, g_xyz) -> None:
    """Rows s..s+n of g_code (P, L) and g_xyz (P, 3) from ext (n, L + E) = d s / d[code | encoded
    xyz], chained through the Fourier features (pe (n, E) the chunk's encoding, ang (n, E/2) scratch)."""
    lat, enc = prep.latent, prep.encoded
    g_code[s: s + n].copy_(ext[:, :lat])
    g_enc = ext[:, lat:]
    if prep.freq is None:
        g_xyz[s: s + n].copy_(g_enc)
    else:
        # d cos(a)/dx = -sin(a) f, d sin(a)/dx = cos(a) f: t = g_sin cos(a) - g_cos sin(a), then sum_l f_l t_l
        half = enc // 2
        cos, sin = pe[:, :half], pe[:, half:]
        t = torch.mul(ext[:, lat + half:], cos, out=ang)
        t.addcmul_(ext[:, lat: lat + half], sin, value=-1.0)
        torch.mm(t, prep.chain, out=g_xyz[s: s + n])
