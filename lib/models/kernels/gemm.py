"""Which library runs the CPU GEMMs of the decoder kernels: torch.mm (BLAS) or oneDNN.

One place decides it for every kernel (the fused training loss of :mod:`.fused`, the
inference kernels of :mod:`.inference`): ``cpu_gemm()`` from what the CPU reports
(``lib.runtime.cpus.cpu_info``), or the library forced through ``GEMM`` / ``forced_gemm`` or,
for a whole process, the environment variable ``MESHSDF_GEMM=blas|onednn``.
Both libraries compute the same products; only the float rounding differs (a grid value
within rounding of the level can change sign, so a mesh can gain or lose a sliver:
``MESHSDF_GEMM=blas`` reproduces an earlier run made with torch.mm bit for bit).
"""
from __future__ import annotations

import contextlib
import os

import torch

from ...runtime.cpus import CpuInfo, cpu_info

__all__ = ["GEMM", "cpu_gemm", "forced_gemm", "gemm_for", "onednn_available", "uses_onednn"]

# None = chosen from the CPU (``cpu_gemm``), or "blas" / "onednn" to force one in this process
GEMM: str | None = None
ENV = "MESHSDF_GEMM"   # the same for a whole process, read when GEMM is None
_CPU_GEMM: list = []


def onednn_available() -> bool:
    """Whether this torch build has the oneDNN op the kernels use (linear with fused bias,
    ReLU or addition; the fused loss's weight gradients are linear calls too)."""
    try:
        return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    except (AttributeError, RuntimeError):
        return False


def gemm_for(info: CpuInfo, mkl_blas: bool, onednn: bool) -> str:
    """The GEMM library for a CPU: "onednn" on an x86 CPU with AVX-512 that is not Intel's, when
    torch's BLAS is MKL and oneDNN is there; else "blas".

    Why: MKL runs its AVX-512 kernels only on Intel CPUs (elsewhere its AVX2 ones, half the
    vector width), while oneDNN picks its kernels from the CPU's feature flags.  Everywhere else
    (Intel, AVX2-only CPUs, other BLAS libraries) torch.mm stays, as it was tuned.

    Args:
        info: the CPU (``lib.runtime.cpus.cpu_info()``).
        mkl_blas: whether torch's BLAS is MKL (``torch.backends.mkl.is_available()``).
        onednn: whether this torch has the oneDNN ops (``onednn_available()``).
    Returns:
        "onednn" or "blas".
    """
    other_vendor_avx512 = info.vector_bits >= 512 and info.vendor not in ("", "GenuineIntel")
    return "onednn" if mkl_blas and onednn and other_vendor_avx512 else "blas"


def cpu_gemm() -> str:
    """The CPU GEMM library of the kernels in this process: ``GEMM`` when set, else ``MESHSDF_GEMM``
    when set, else ``gemm_for`` this CPU (read once).  Raises ValueError for a bad or unavailable
    library."""
    forced, name = (GEMM, "gemm.GEMM") if GEMM is not None else (os.environ.get(ENV) or None, ENV)
    if forced is not None:
        if forced not in ("blas", "onednn"):
            raise ValueError(f"{name}={forced!r}: use 'blas' or 'onednn' (or leave it unset: the CPU's choice)")
        if forced == "onednn" and not onednn_available():
            raise ValueError(f"{name}='onednn': this torch build has no oneDNN linear op")
        return forced
    if not _CPU_GEMM:
        _CPU_GEMM.append(gemm_for(cpu_info(), torch.backends.mkl.is_available(), onednn_available()))
    return _CPU_GEMM[0]


def uses_onednn(device, dtype: torch.dtype) -> bool:
    """Whether a kernel's GEMMs on ``device`` in ``dtype`` go to oneDNN: CPU float32 only (its
    kernels used here take no float64; CUDA keeps cuBLAS), and ``cpu_gemm()`` is "onednn"."""
    return torch.device(device).type == "cpu" and dtype == torch.float32 and cpu_gemm() == "onednn"


@contextlib.contextmanager
def forced_gemm(library: str | None):
    """Run the enclosed kernels with ``library`` ("blas", "onednn", or None: the CPU's choice),
    restoring ``GEMM`` afterwards (benchmarks comparing both; tests use monkeypatch)."""
    global GEMM
    saved = GEMM
    GEMM = library
    try:
        cpu_gemm()  # a bad or unavailable library is refused before any work
        yield
    finally:
        GEMM = saved
