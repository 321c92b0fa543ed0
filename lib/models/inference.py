"""Deprecated import path: this module moved to :mod:`lib.models.kernels.inference`.

The shim re-exports its public names and warns on import; import from the new path instead.
Setting a module global here (e.g. a test's monkeypatch) does not reach the kernels.
"""
import warnings

from .kernels.inference import (FEW_ROWS, InferenceKernel, SIDE_BY_SIDE, default_rows, values,
                                values_and_input_grad)

__all__ = ["FEW_ROWS", "InferenceKernel", "SIDE_BY_SIDE", "default_rows", "values", "values_and_input_grad"]

warnings.warn(f"{__name__} moved to {__name__.rsplit('.', 1)[0]}.kernels.inference: import it from there",
              DeprecationWarning, stacklevel=2)
