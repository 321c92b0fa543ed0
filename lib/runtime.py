"""Run-time choices of a process: the device, CPU threads, random seeds and RNG states."""
from __future__ import annotations

import os
import random
import time
from typing import Mapping

import numpy as np
import torch

from lib import cpus
from lib.errors import MeshSDFError


def choose_device(name: str | None = None) -> torch.device:
    """``None``/``"auto"`` -> cuda if available else cpu; ``"cpu"``, ``"cuda"``, ``"cuda:N"``.

    Raises MeshSDFError for an unknown name or an unavailable CUDA device.
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
    """Seed Python's, NumPy's and torch's (all devices) random generators."""
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def rng_state(*generators: torch.Generator) -> dict:
    """torch CPU (+ CUDA) default generator states and those of ``generators``: weights_only-safe."""
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




# what apply_thread_policy chose, for refresh_thread_policy and the summary line
_POLICY: dict = {}


def apply_thread_policy(max_threads: int | None = None, environ=None) -> int:
    """Set torch's intra-op thread count by the policy of ``lib.cpus``; returns the count in use.

    Call once at the top of a script's main, before heavy work.  ``MESHSDF_THREADS``: auto
    (default: one thread per usable core that other processes leave idle, measured over
    0.1 s; at least 1; re-measured by ``refresh_thread_policy``), a number N, or off
    (torch's defaults).  An explicit ``OMP_NUM_THREADS`` wins over auto (torch has applied
    it already).  ``max_threads`` caps auto for small work.  Raises MeshSDFError for a
    malformed ``MESHSDF_THREADS``.
    """
    env = os.environ if environ is None else environ
    try:
        setting = cpus.thread_setting(env)
    except ValueError as err:
        raise MeshSDFError(str(err)) from None
    _POLICY.clear()
    adaptive = setting.mode == "auto" and not env.get("OMP_NUM_THREADS")
    if setting.mode == "fixed":
        n = setting.count
    elif not adaptive:
        n = torch.get_num_threads()
    else:
        cores = cpus.usable_cores()
        n = cpus.choose_threads(cores, cpus.free_cores(cores) if cores > 1 else 1.0, max_threads)
        if cores > 1:
            _POLICY.update(cores=cores, cpus=cpus.affinity_cores(), max_threads=max_threads,
                           snapshot=cpus.Snapshot(), time=time.perf_counter())
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _POLICY.update(mode=setting.mode if adaptive or setting.mode != "auto" else "auto, OMP_NUM_THREADS set",
                   wait=env.get("OMP_WAIT_POLICY", "default"))
    return n


def refresh_thread_policy(min_interval: float = 2.0) -> int:
    """Under the auto policy, re-choose the thread count from how busy the cores were since
    the last look (at most every ``min_interval`` seconds; a /proc/stat read, no waiting).

    Long loops call it once per step or epoch, so a competitor that starts or stops during
    a run changes the thread count within seconds.  A no-op (returns the current count)
    for the other settings or before ``apply_thread_policy``.
    """
    n = torch.get_num_threads()
    if "snapshot" not in _POLICY:
        return n
    now = time.perf_counter()
    if now - _POLICY["time"] < min_interval:
        return n
    snap = cpus.Snapshot()
    busy = cpus.busy_between(_POLICY["snapshot"], snap, _POLICY["cpus"])
    _POLICY.update(snapshot=snap, time=now)
    if busy is None:
        return n
    cores = _POLICY["cores"]
    want = cpus.choose_threads(cores, max(0.0, min(cores, len(_POLICY["cpus"]) - busy)), _POLICY["max_threads"])
    if want != n:
        torch.set_num_threads(want)
    return want


def thread_policy_summary() -> str:
    """One line for logs: threads in use and why (after ``apply_thread_policy``)."""
    if "mode" not in _POLICY:
        return f"{torch.get_num_threads()} CPU threads (torch default)"
    return (f"{torch.get_num_threads()} CPU threads ({cpus.ENV}={_POLICY['mode']}, "
            f"OpenMP wait {_POLICY['wait'].lower()})")
