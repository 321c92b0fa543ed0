"""Deprecated import path: this module moved to :mod:`lib.models.kernels.fused`.

The shim re-exports its public names and warns on import; import from the new path instead.
Setting a module global here (e.g. a test's monkeypatch) does not reach the kernels.
"""
import warnings

from .kernels.fused import (FusedPlan, LayerPlan, WeightBlocks, chunk_halves, default_chunk, fused_clamped_l1,
                            plan_chunks)

__all__ = ["FusedPlan", "LayerPlan", "WeightBlocks", "chunk_halves", "default_chunk", "fused_clamped_l1",
           "plan_chunks"]

warnings.warn(f"{__name__} moved to {__name__.rsplit('.', 1)[0]}.kernels.fused: import it from there",
              DeprecationWarning, stacklevel=2)
