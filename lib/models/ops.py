"""Deprecated import path: this module moved to :mod:`lib.models.kernels.elementwise`.

The shim re-exports its public names and warns on import; import from the new path instead.
Setting a module global here (e.g. a test's monkeypatch) does not reach the kernels.
"""
import warnings

from .kernels.elementwise import (ChunkDropout, PE_PI, dropout_bits, dropout_mask, dropout_threshold,
                                  effective_dropout_prob, new_seed, positional_encoding, positional_encoding_t_)

__all__ = ["ChunkDropout", "PE_PI", "dropout_bits", "dropout_mask", "dropout_threshold",
           "effective_dropout_prob", "new_seed", "positional_encoding", "positional_encoding_t_"]

warnings.warn(f"{__name__} moved to {__name__.rsplit('.', 1)[0]}.kernels.elementwise: import it from there",
              DeprecationWarning, stacklevel=2)
