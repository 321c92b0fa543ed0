"""Deprecated path: neural_renderer's hard silhouette moved to ``lib.render.hard_silhouette``
(``from lib.render import nr_silhouette, nr_shade``)."""
import warnings

from .render.hard_silhouette import *  # noqa: F401,F403
from .render.hard_silhouette import __all__  # noqa: F401

warnings.warn("lib.nmr moved to lib.render.hard_silhouette; import from lib.render instead", DeprecationWarning,
              stacklevel=2)
