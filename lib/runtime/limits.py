"""Size checks before allocation: a value that cannot fit in memory is refused with one line.

Each check compares a lower bound of the bytes a setting needs with the memory available on
the device it will use (free GPU memory, or the host's available memory within the
container's limit), and raises MeshSDFError naming the setting, the memory it needs, the
memory available and the largest value that fits.  The bounds count only the buffers that
scale with the setting and that the code certainly allocates, so a value that is refused
could not have run; values just below a bound may still run short of memory on a busy
machine, but a mistyped 100000 never reaches the kernel's OOM killer.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import torch

from ..errors import MeshSDFError

# bytes per unit of each setting (lower bounds, see the module docstring)
GRID_BYTES_PER_VOXEL = 16        # SDF values (float32) + the extraction's per-voxel marks / case codes
SAMPLE_BYTES = 40                # per SDF sample of a batch: drawn indices (int64), rows (4 float32), xyz + sdf
PIXEL_BUFFERS = 8                # float32 per-pixel buffers of one rendered, compared and back-propagated image
ENCODER_STEM_CHANNELS = 64       # full-resolution channels of the SVR encoder's stem and first stage
ENCODER_SAVED_MAPS = 8           # full-resolution feature maps autograd keeps per image in training


def available_bytes(device: torch.device | str | None = None) -> int:
    """Free memory of a CUDA device, else the host's available memory (min with the cgroup limit)."""
    device = torch.device(device) if device is not None else torch.device("cpu")
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    avail = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                avail = int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    if avail is None:
        try:
            avail = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return 1 << 62  # unknown: do not refuse
    try:
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            avail = min(avail, int(limit) - used)
    except (OSError, ValueError):
        pass
    return max(0, int(avail))


def _gib(n: float) -> str:
    return f"{n / 2 ** 30:.1f} GiB" if n >= 2 ** 27 else f"{n / 2 ** 20:.0f} MiB"


def check_fits(name: str, value: int, need: Callable[[int], float], device=None, low: int = 1,
               available: int | None = None, note: str = "") -> None:
    """MeshSDFError when ``need(value)`` bytes exceed the memory available on ``device``.

    ``need`` must grow with the value; the message gives the largest value >= ``low`` that
    fits (found by bisection), or says that none does.  ``available`` overrides the measured
    memory (tests); ``note`` follows the value in the message.
    """
    avail = available_bytes(device) if available is None else available
    if need(value) <= avail:
        return
    lo, hi = low - 1, value  # need(lo) fits (or lo < low), need(hi) does not
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if need(mid) <= avail else (lo, mid)
    where = "the GPU" if torch.device(device or "cpu").type == "cuda" else "this machine"
    fits = f"the largest {name} that fits is {lo}" if lo >= low else f"no {name} fits; free some memory"
    raise MeshSDFError(f"{name} {value}{note} needs at least {_gib(need(value))} of memory but {where} has "
                       f"{_gib(avail)} available; {fits}")


def grid_bytes(resolution: int) -> float:
    """Lower bound of a marching-cubes extraction on an N^3 grid."""
    return GRID_BYTES_PER_VOXEL * float(resolution) ** 3


def check_grid(resolution: int, device=None, name: str = "--resolution", **kw) -> None:
    """A marching-cubes grid of ``resolution``^3 points fits: the dense grid's bound, applied to every
    extraction mode (sparse mode stores only the cells near the surface, so it needs less)."""
    check_fits(name, int(resolution), grid_bytes, device, low=2, **kw)


def check_image(size: int, device=None, name: str = "--image-size", frames: int = 0, **kw) -> None:
    """A ``size`` x ``size`` image optimisation fits: the per-pixel float buffers of rendering, the
    loss and its gradient, plus ``frames`` RGB movie frames kept until the GIF is written."""
    check_fits(name, int(size), lambda s: float(s) ** 2 * (4 * PIXEL_BUFFERS + 3 * frames), device, low=1, **kw)


def check_encoder_images(size: int, batch: int, device=None, name: str = "ImageSize", training: bool = True,
                         **kw) -> None:
    """``batch`` RGBA images of ``size`` px through the SVR encoder fit: the input and the
    full-resolution feature maps of its first stage (kept for the backward pass in training)."""
    maps = ENCODER_SAVED_MAPS if training else 2

    def need(s):
        return float(batch) * float(s) ** 2 * 4 * (4 + ENCODER_STEM_CHANNELS * maps)

    check_fits(name, int(size), need, device, low=1, **kw)


def check_sample_batch(samples_per_scene: int, scenes: int, device=None, **kw) -> None:
    """One training batch of ``scenes`` (ScenesPerBatch, at most the number of training scenes) x
    SamplesPerScene SDF samples fits, on the host where it is drawn and on ``device``."""
    def need(s):
        return float(SAMPLE_BYTES) * s * scenes

    note = f" (x {scenes} scenes per batch)" if scenes > 1 else ""
    for d in dict.fromkeys((torch.device("cpu"), torch.device(device or "cpu"))):
        check_fits("SamplesPerScene", int(samples_per_scene), need, d, low=1, note=note, **kw)


CHAMFER_BYTES_PER_SAMPLE = 72    # per Chamfer sample: float32 points of both meshes + their float64 KD-tree copies
PARAMETER_BYTES = 4              # float32 per decoder parameter, allocated when the network is built
SEED_LIMIT = 2 ** 63             # seeds must fit a signed 64-bit integer (torch and numpy generators)


def check_chamfer_samples(samples: int, device=None, name: str = "--chamfer-samples", **kw) -> None:
    """Surface samples of the ground-truth and the predicted mesh for the Chamfer distance fit."""
    check_fits(name, int(samples), lambda n: CHAMFER_BYTES_PER_SAMPLE * float(n), device, low=1, **kw)


def decoder_parameters(code_length: int, dims, xyz: int = 3) -> float:
    """Parameters of a DeepSDF decoder of hidden widths ``dims`` (a lower bound: skip inputs not counted)."""
    widths = [code_length + xyz, *dims, 1]
    return float(sum((a + 1) * b for a, b in zip(widths[:-1], widths[1:])))


def check_decoder(code_length: int, dims, **kw) -> None:
    """The decoder of ``CodeLength`` and ``NetworkSpecs.dims`` fits in host memory (it is built there).

    The message names CodeLength when the network of these dims fits with a CodeLength of 1,
    else NetworkSpecs.dims with the largest width (of its widest layers) that fits.
    """
    dims = [int(d) for d in dims]

    def by_code(c):
        return PARAMETER_BYTES * decoder_parameters(c, dims)

    def by_width(w):
        return PARAMETER_BYTES * decoder_parameters(min(code_length, 1), [min(d, w) for d in dims])

    avail = kw.pop("available", None)
    avail = available_bytes("cpu") if avail is None else avail
    if by_code(code_length) <= avail:
        return
    if by_width(max(dims)) > avail:
        check_fits("NetworkSpecs.dims", max(dims), by_width, low=1, available=avail, note=" (widest layer)", **kw)
    check_fits("CodeLength", int(code_length), by_code, low=1, available=avail, **kw)


def check_seed(value: int, name: str = "--seed") -> None:
    """A random seed: an integer in [0, 2^63)."""
    if not 0 <= value < SEED_LIMIT:
        raise MeshSDFError(f"{name} must be between 0 and {SEED_LIMIT - 1}, got {value}")


def check_number(name: str, value: float, low: float = 0.0, strict: bool = True, high: float | None = None) -> None:
    """A finite number above ``low`` (``strict``: > low, else >= low) and, with ``high``, at most ``high``."""
    import math

    ok = math.isfinite(value) and (value > low if strict else value >= low) and (high is None or value <= high)
    if not ok:
        rng = f"{'>' if strict else '>='} {low:g}" + (f" and <= {high:g}" if high is not None else "")
        raise MeshSDFError(f"{name} must be a finite number {rng}, got {value}")


def check_latent_codes(scenes: int, code_length: int, device=None, **kw) -> None:
    """The training codes, ``scenes`` x CodeLength float32 values, fit on ``device`` (they are made there)."""
    note = f" (x {scenes} training shapes)" if scenes > 1 else ""
    check_fits("CodeLength", int(code_length), lambda c: PARAMETER_BYTES * float(c) * scenes, device, low=1,
               note=note, **kw)
