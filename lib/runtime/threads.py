"""Run-time choices of a process: the device, CPU threads, random seeds and RNG states, and
independent CPU work run side by side (:func:`concurrently`)."""
from __future__ import annotations

import os
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from typing import Callable, Mapping, Sequence

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




# what apply_thread_policy chose, for the summary line
_POLICY: dict = {}


def apply_thread_policy(max_threads: int | None = None, environ=None) -> int:
    """Set torch's intra-op thread count by the policy of ``lib.cpus``; returns the count in use.

    Call once at the top of a script's main, before heavy work.  ``MESHSDF_THREADS``: auto
    (default: one thread per core this process may use, i.e. its affinity mask capped by
    its cgroup CPU quota), a number N, or off (torch's defaults).  An explicit
    ``OMP_NUM_THREADS`` wins over auto (torch has applied it already).  ``max_threads`` caps
    auto for small work.  Raises MeshSDFError for a malformed ``MESHSDF_THREADS``.
    """
    env = os.environ if environ is None else environ
    try:
        setting = cpus.thread_setting(env)
    except ValueError as err:
        raise MeshSDFError(str(err)) from None
    mode = setting.mode
    if mode == "fixed":
        n = setting.count
    elif mode == "auto" and not env.get("OMP_NUM_THREADS"):
        n = cpus.choose_threads(cpus.usable_cores(), max_threads)
    else:
        n = torch.get_num_threads()
        mode = "auto, OMP_NUM_THREADS set" if mode == "auto" else mode
    if n != torch.get_num_threads():
        torch.set_num_threads(n)
    _POLICY.update(mode=mode, wait=env.get("OMP_WAIT_POLICY", "default"))
    return n


def thread_policy_summary() -> str:
    """One line for logs: threads in use and why (after ``apply_thread_policy``)."""
    if "mode" not in _POLICY:
        return f"{torch.get_num_threads()} CPU threads (torch default)"
    return (f"{torch.get_num_threads()} CPU threads ({cpus.ENV}={_POLICY['mode']}, "
            f"OpenMP wait {_POLICY['wait'].lower()})")


# ------------------------------------------------------------- side-by-side CPU work
_CONCURRENT = True             # private switch: False = concurrently() runs its tasks in order (tests, benchmarks)
_SECTION = threading.Lock()    # one concurrent section at a time in the process
_POOL: dict = {}               # pid -> (workers, ThreadPoolExecutor); a forked child makes its own


def _pool(workers: int) -> ThreadPoolExecutor:
    held = _POOL.get(os.getpid())
    if held is None or held[0] < workers:
        if held is not None:
            held[1].shutdown(wait=False)
        _POOL.clear()
        held = _POOL[os.getpid()] = (workers, ThreadPoolExecutor(workers, thread_name_prefix="meshsdf"))
    return held[1]


def _run_on_worker(task: Callable, grad: bool, threads: int):
    torch.set_num_threads(threads)   # this thread's OpenMP team (about 0.4 us); the caller restores the process's
    with torch.set_grad_enabled(grad):
        return task()


def concurrently(tasks: Sequence[Callable], device=None) -> list:
    """The results of the zero-argument callables ``tasks``, run side by side on the CPU.

    Why: most of a demo step is elementwise passes and gathers over 10^4 - 10^6 values,
    which a second OpenMP thread barely speeds up (waking it costs about as much as the
    pass), while two independent such computations, each on one thread, overlap almost
    fully (torch releases the GIL inside its operations).  With k >= 2 intra-op threads
    (the thread policy's choice) and a CPU ``device``, tasks[0] runs in the calling thread
    and the others on a pool of worker threads, each task on max(1, k // len(tasks))
    intra-op threads (one each on 2 cores; 8 each for two tasks on 16, so that a
    many-core machine keeps its cores); the caller's thread count is restored afterwards.
    Otherwise (one thread, a
    CUDA device, a section already running in this process, or the private switch
    ``_CONCURRENT`` off) they run in order in the calling thread.  Each task sees the
    caller's grad mode.  Inside an :func:`elementwise_section` k is the process's count
    outside it, so the tasks still run side by side.  Tasks must not depend on one
    another's side effects; a task's exception is raised once all tasks have finished.
    """
    now = torch.get_num_threads()
    threads = _section_threads() or now
    cpu = device is None or torch.device(device).type == "cpu"
    if len(tasks) < 2 or threads < 2 or not cpu or not _CONCURRENT or not _SECTION.acquire(blocking=False):
        return [t() for t in tasks]
    try:
        pool = _pool(len(tasks) - 1)
        grad = torch.is_grad_enabled()
        share = max(1, threads // len(tasks))
        torch.set_num_threads(share)
        try:
            futures = [pool.submit(_run_on_worker, t, grad, share) for t in tasks[1:]]
            try:
                first = tasks[0]()
            finally:
                for f in futures:     # every task finished before anything is raised or returned
                    f.exception()
            return [first] + [f.result() for f in futures]
        finally:
            torch.set_num_threads(now)
    finally:
        _SECTION.release()


# ------------------------------------------------------------- one-thread sections
_ONE_THREAD = True            # private switch: False = elementwise_section() changes nothing (tests, benchmarks)
_LOCAL = threading.local()    # .threads: the count outside the calling thread's open section


def _section_threads() -> int | None:
    """The intra-op threads outside the calling thread's open one-thread section, or None."""
    return getattr(_LOCAL, "threads", None)


@contextmanager
def elementwise_section(device=None):
    """Run the enclosed CPU work on one intra-op thread while idle OpenMP threads sleep.

    Why: with sleeping idle threads (the thread policy's default, so that a competing
    process costs its fair share) every operation that torch splits across threads wakes
    and joins the team, which on 2 cores costs about what splitting a pass over 10^4 - 10^6
    values saves.  A demo step is mostly such passes (the sparse grid's bookkeeping,
    marching cubes, the rasterizer, the topology count), so it runs them on one thread and
    keeps the process's threads for the decoder's GEMMs (:func:`all_threads`, which the
    decoder field of ``lib.meshsdf`` enters) and for independent work side by side
    (:func:`concurrently`, which still uses the process's count).  Measured on 2 cores, sleeping threads, one
    thread / two: a multiply of 4e4 - 3e5 floats 0.35 - 0.75 x, of 1e6 1.06 x; a demo step
    0.95 x next to one competitor, 0.99 x quiet.  Changes nothing with busy-waiting threads
    (``MESHSDF_THREADS=off``: torch's defaults, untouched by design), one thread, a CUDA
    ``device``, inside a section already open, or with the private switch ``_ONE_THREAD`` off.
    """
    threads = torch.get_num_threads()
    cpu = device is None or torch.device(device).type == "cpu"
    if (not _ONE_THREAD or threads < 2 or not cpu or _section_threads() is not None
            or not cpus.openmp_threads_sleep()):
        yield
        return
    _LOCAL.threads = threads
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)
        _LOCAL.threads = None


@contextmanager
def all_threads(enabled: bool = True):
    """The process's intra-op threads for the enclosed work (large GEMMs) inside an
    :func:`elementwise_section`; elsewhere, or with ``enabled`` False, it changes nothing."""
    threads = _section_threads()
    if threads is None or not enabled:
        yield
        return
    _LOCAL.threads = None
    torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(1)
        _LOCAL.threads = threads
