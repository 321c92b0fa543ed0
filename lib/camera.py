"""Deprecated path: the camera model moved to ``lib.render.camera`` (``from lib.render import Camera``)."""
import warnings

from .render.camera import *  # noqa: F401,F403
from .render.camera import __all__  # noqa: F401

warnings.warn("lib.camera moved to lib.render.camera; import from lib.render instead", DeprecationWarning,
              stacklevel=2)
