"""Deprecated import path: this module moved to :mod:`lib.layer.gradient_check`.

The shim re-exports its public names and warns on import; import from the new path instead.
"""
import warnings

from .layer.gradient_check import GroupCheck, check_gradients, format_report, surface_integral

__all__ = ["GroupCheck", "check_gradients", "format_report", "surface_integral"]

warnings.warn(f"{__name__} moved to {__name__.rsplit('.', 1)[0]}.layer.gradient_check: import it from there",
              DeprecationWarning, stacklevel=2)
