"""Progress and messages: the only place in lib/ that writes to the terminal.

On a terminal, ``progress`` draws a tqdm bar.  Anywhere else (a batch job's log file, a
pipe) a bar's carriage-return redraws would fill the log with megabytes of half lines,
so progress is instead one plain line: after the first step, then at most one every
``PLAIN_LINE_SECONDS``, and after the last step, each with the step count, the
postfix values the caller set (loss, learning rate, seconds per step) and the elapsed
time.  ``MESHSDF_QUIET=1`` silences bars, progress lines and messages (tests, scripted
runs); errors are not messages: scripts print them through ``lib.errors.cli_main``,
quiet or not.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

PLAIN_LINE_SECONDS = 10.0


def quiet() -> bool:
    return os.environ.get("MESHSDF_QUIET", "") not in ("", "0")


def on_terminal(stream=None) -> bool:
    stream = sys.stderr if stream is None else stream
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # closed or file-like without isatty
        return False


class PlainProgress:
    """tqdm's interface (iterate, ``update``, ``set_postfix``, ``close``) writing plain lines.

    A line: ``<desc>: <unit> <n>/<total>  key=value ...  <elapsed> s``; see the module
    docstring for when lines are written.
    """

    def __init__(self, iterable=None, total=None, initial=0, desc="", unit="it", file=None,
                 min_seconds: float = PLAIN_LINE_SECONDS, disable=False, **_tqdm_only):
        self.iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n, self.desc, self.unit = total, int(initial), desc, unit
        self.file = file if file is not None else sys.stderr
        self.min_seconds = min_seconds
        self.disable = disable
        self.postfix: dict = {}
        self.t0 = time.perf_counter()
        self._last_time: float | None = None
        self._last_n = self.n

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)

    def __len__(self):
        return self.total or 0

    def set_postfix(self, ordered_dict=None, refresh=True, **kwargs) -> None:
        self.postfix = {**(ordered_dict or {}), **kwargs}

    def line(self) -> str:
        count = f"{self.unit} {self.n}" + (f"/{self.total}" if self.total is not None else "")
        values = "".join(f"  {k} {v}" for k, v in self.postfix.items())
        return f"{self.desc}: {count}{values}  {time.perf_counter() - self.t0:.1f} s"

    def _write(self) -> None:
        self._last_time, self._last_n = time.perf_counter(), self.n
        if not self.disable:
            print(self.line(), file=self.file, flush=True)

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.perf_counter()
        if (self._last_time is None or now - self._last_time >= self.min_seconds
                or (self.total is not None and self.n >= self.total)):
            self._write()

    def close(self) -> None:
        if self.n != self._last_n:
            self._write()
        self._last_n = self.n

    @staticmethod
    def write(msg: str, file=None) -> None:
        print(msg, file=file if file is not None else sys.stderr, flush=True)


def progress(iterable=None, **kwargs):
    """A tqdm bar on a terminal, ``PlainProgress`` lines elsewhere, nothing when quiet.

    ``kwargs``: tqdm's (total, initial, desc, unit, disable, ...).
    """
    kwargs.setdefault("file", sys.stderr)
    if quiet():
        kwargs["disable"] = True
    if on_terminal(kwargs["file"]):
        kwargs.setdefault("dynamic_ncols", True)
        return tqdm(iterable, **kwargs)
    return PlainProgress(iterable, **kwargs)


def info(msg: str) -> None:
    """Print a message (without breaking an active progress bar); silent when quiet."""
    if quiet():
        return
    if on_terminal():
        tqdm.write(str(msg), file=sys.stderr)
    else:
        print(str(msg), file=sys.stderr, flush=True)


def warning(msg: str) -> None:
    """A one-line warning ("WARNING: ..."), shown like ``info``."""
    info(f"WARNING: {msg}")
