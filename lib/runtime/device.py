"""The device a process computes on, and its random state: seeds, RNG states saved in
checkpoints and restored on resume."""
from __future__ import annotations

import random
from typing import Mapping

import numpy as np
import torch

from ..errors import MeshSDFError

__all__ = ["choose_device", "rng_state", "seed_everything", "set_rng_state"]


def choose_device(name: str | None = None) -> torch.device:
    """The device a name asks for.

    Args:
        name: ``None`` / ``"auto"`` (default: cuda if available, else cpu), ``"cpu"``,
            ``"cuda"`` or ``"cuda:N"``.
    Returns:
        the torch.device.  Raises MeshSDFError for an unknown name or an unavailable CUDA device.
    """
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise MeshSDFError(f"unknown device {name!r}; use cpu, cuda, cuda:N or auto") from None
    if dev.type == "cpu":
        return dev
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise MeshSDFError(f"device {name!r} requested but CUDA is not available; use --device cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise MeshSDFError(f"device {name!r} does not exist: this machine has "
                               f"{torch.cuda.device_count()} CUDA device(s)")
        return dev
    raise MeshSDFError(f"unsupported device {name!r}; use cpu, cuda, cuda:N or auto")


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's (all devices) random generators with ``seed`` (int)."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(*generators: torch.Generator) -> dict:
    """torch CPU (+ CUDA) default generator states and those of ``generators``.

    Returns:
        a dict of tensors and lists (safe to load with ``weights_only``) for :func:`set_rng_state`.
    """
    state = {"torch": torch.get_rng_state(), "generators": [g.get_state() for g in generators]}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping, *generators: torch.Generator) -> None:
    """Restore what ``rng_state`` saved (CUDA states only when CUDA is in use here too)."""
    torch.set_rng_state(state["torch"])
    for g, s in zip(generators, state.get("generators", [])):
        g.set_state(s)
    if "cuda" in state and torch.cuda.is_available():
        cuda_states = state["cuda"]
        if len(cuda_states) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda_states)
