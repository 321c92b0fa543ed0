"""Index kernels without policy: the one compaction of a 1-D mask into its indices.

Shared by the renderers (their tile and slot masks) and the sparse extraction (its
tracking's masks).
"""
from __future__ import annotations

import numpy as np
import torch

__all__ = ["flat_nonzero"]


def flat_nonzero(mask: torch.Tensor) -> torch.Tensor:
    """Ascending indices (int64) of the nonzero (True) entries of a 1-D mask, as
    ``mask.nonzero().squeeze(1)``.

    Why: on the CPU numpy's flatnonzero does it several times faster than torch's
    ``nonzero`` (which counts and writes through a 2-D result); a view, no copy of the mask.

    Args:
        mask: (n,) bool, or numbers (the nonzero ones count).
    Returns:
        (k,) int64 on the mask's device.
    """
    if mask.device.type != "cpu":
        return mask.nonzero().squeeze(1)
    return torch.from_numpy(np.flatnonzero(mask.detach().contiguous().numpy()))
