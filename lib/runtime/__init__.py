"""Run-time choices of a process: CPU cores and OpenMP's wait policy (:mod:`.cpus`, no
torch), the thread policy and side-by-side CPU work (:mod:`.threads`), the device and random
state (:mod:`.device`), size checks against the memory available (:mod:`.limits`).
``from lib import runtime; runtime.choose_device(...)`` and ``runtime.concurrently(...)``
reach them here.

The names of :mod:`.threads`, :mod:`.device` and :mod:`.limits` load on first use (PEP 562), not here:
``lib.cli.setup_process`` imports :mod:`.cpus` to set OpenMP's wait policy before torch
loads, which importing those modules (and torch) here would defeat.
"""
from importlib import import_module

from . import cpus

_LAZY = {
    "threads": ("FEW_ROWS", "SETTINGS", "ThreadSettings", "all_threads", "apply_thread_policy", "concurrently",
                "elementwise_section", "thread_policy_summary", "thread_settings"),
    "device": ("choose_device", "rng_state", "seed_everything", "set_rng_state"),
    "limits": (),
}
_WHERE = {name: module for module, names in _LAZY.items() for name in names}

__all__ = ["FEW_ROWS", "SETTINGS", "ThreadSettings", "all_threads", "apply_thread_policy", "choose_device",
           "concurrently", "cpus", "device", "elementwise_section", "limits", "rng_state", "seed_everything",
           "set_rng_state", "thread_policy_summary", "thread_settings", "threads"]


def __getattr__(name: str):
    if name in _LAZY:
        return import_module(f".{name}", __name__)
    if name in _WHERE:
        value = getattr(import_module(f".{_WHERE[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return __all__
