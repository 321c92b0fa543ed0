"""Reproducible accumulation: sums of many terms into few slots (pixels, faces, vertices).

On the CPU ``index_add_`` adds in index order, so it is reproducible; on CUDA it uses float
atomics whose order (and so the rounding) changes from run to run.  There the renderers add
pixel terms in fixed point (exact integer atomics: the order cannot matter) and gradients by
a sorted segment sum (:func:`segment_sum`).  Shared by the soft silhouette, the vertex
normals and the hard silhouette's backward pass.
"""
from __future__ import annotations

import torch

__all__ = ["reproducible_on", "segment_sum"]


def reproducible_on(device: torch.device, reproducible: bool | None) -> bool:
    """Whether to sum in an order-independent way: ``reproducible`` if given, else True
    exactly off the CPU (where float atomics would change the last bits from run to run).

    Args:
        device: where the sums run.
        reproducible: the caller's choice; None = chosen by device.
    """
    return device.type != "cpu" if reproducible is None else bool(reproducible)


def segment_sum(index: torch.Tensor, values: torch.Tensor, n: int, out: torch.Tensor | None = None,
                sorted_index: bool = False, reproducible: bool | None = None) -> torch.Tensor:
    """out[index[i]] += values[i].

    reproducible (default: on CUDA): one sequential sum per run of equal indices (a stable
    sort first unless ``sorted_index`` says index is already non-decreasing), then a plain
    indexed add of those sums, whose indices are unique (no two atomics meet).

    Args:
        index: (N,) int64 in [0, n).
        values: (N, C) float.
        n: number of slots (used when ``out`` is None).
        out: (n, C) accumulator, added to in place; default None = zeros.
        sorted_index: index is already non-decreasing (skips the sort); default False.
        reproducible: see :func:`reproducible_on`; default None.

    Returns:
        out (n, C).
    """
    if out is None:
        out = values.new_zeros(n, values.shape[1])
    if not reproducible_on(values.device, reproducible):
        return out.index_add_(0, index, values)
    if not sorted_index:
        order = torch.argsort(index, stable=True)
        index, values = index[order], values[order]
    uniq, counts = torch.unique_consecutive(index, return_counts=True)
    return out.index_add_(0, uniq, torch.segment_reduce(values, "sum", lengths=counts, axis=0))
