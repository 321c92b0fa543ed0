"""Deprecated import path: the layer moved to :mod:`lib.layer` (:mod:`lib.layer.field`,
:mod:`lib.layer.sdf`, :mod:`lib.layer.gradient_check`).

The shim re-exports the package's public names and warns on import; import from the new path instead.
"""
import warnings

from .layer import *  # noqa: F401,F403  (exactly lib.layer's __all__)
from .layer import __all__  # noqa: F401

warnings.warn(f"{__name__} moved to {__name__.rsplit('.', 1)[0]}.layer: import it from there",
              DeprecationWarning, stacklevel=2)
