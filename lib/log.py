"""Progress bars and messages: the only place in lib/ that writes to the terminal.

Set ``MESHSDF_QUIET=1`` to silence bars and messages (tests and batch jobs).
"""
from __future__ import annotations

import os
import sys

from tqdm import tqdm


def quiet() -> bool:
    return os.environ.get("MESHSDF_QUIET", "") not in ("", "0")


def progress(iterable=None, **kwargs) -> tqdm:
    """A tqdm bar on stderr; disabled when quiet or when stderr is not a terminal-like stream."""
    kwargs.setdefault("disable", quiet())
    kwargs.setdefault("dynamic_ncols", True)
    kwargs.setdefault("file", sys.stderr)
    return tqdm(iterable, **kwargs)


def info(msg: str) -> None:
    """Print a message without breaking an active progress bar."""
    if not quiet():
        tqdm.write(str(msg), file=sys.stderr)
