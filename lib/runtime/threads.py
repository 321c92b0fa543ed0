"""CPU threads of a process: the thread policy (how many intra-op threads), independent CPU
work run side by side (:func:`concurrently`), and one-thread sections for elementwise work
(:func:`elementwise_section`, :func:`all_threads`).

Speed-only switches live in :data:`SETTINGS` (a :class:`ThreadSettings`), changed for a
block with :func:`thread_settings`: none changes a result, only speed.
"""
from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import Callable, Iterator, Sequence

import torch

from ..errors import MeshSDFError
from . import cpus

__all__ = ["FEW_ROWS", "SETTINGS", "ThreadSettings", "all_threads", "apply_thread_policy", "concurrently",
           "elementwise_section", "thread_policy_summary", "thread_settings"]


@dataclass
class ThreadSettings:
    """Speed-only switches of this module; the results are the same bits either way.

    concurrent: :func:`concurrently` runs its tasks side by side (default True); False runs
        them in order in the calling thread (e.g. to time or compare the two).
    one_thread: :func:`elementwise_section` drops to one intra-op thread (default True);
        False makes it change nothing.
    """

    concurrent: bool = True
    one_thread: bool = True


# the process's settings: read at every call, so a change applies to the next call
SETTINGS = ThreadSettings()


@contextmanager
def thread_settings(**changes: bool) -> Iterator[ThreadSettings]:
    """Change fields of :data:`SETTINGS` for the enclosed block, restored afterwards.

    Args:
        changes: field name -> value, e.g. ``thread_settings(concurrent=False)``.
    Returns:
        a context manager yielding :data:`SETTINGS`.  Raises MeshSDFError for an unknown field.
    """
    known = {f.name for f in fields(ThreadSettings)}
    unknown = sorted(set(changes) - known)
    if unknown:
        raise MeshSDFError(f"thread_settings: unknown setting(s) {', '.join(unknown)}; use {', '.join(sorted(known))}")
    saved = {k: getattr(SETTINGS, k) for k in changes}
    for k, v in changes.items():
        setattr(SETTINGS, k, bool(v))
    try:
        yield SETTINGS
    finally:
        for k, v in saved.items():
            setattr(SETTINGS, k, v)


# what apply_thread_policy chose, for the summary line
_POLICY: dict = {}


def apply_thread_policy(max_threads: int | None = None, environ=None) -> int:
    """Set torch's intra-op thread count by the policy of :mod:`.cpus`; returns the count in use.

    Call once at the top of a script's main, before heavy work.  ``MESHSDF_THREADS``: auto
    (default: one thread per core this process may use, i.e. its affinity mask capped by
    its cgroup CPU quota), a number N, or off (torch's defaults).  An explicit
    ``OMP_NUM_THREADS`` wins over auto (torch has applied it already).  ``max_threads`` caps
    auto for small work.  Raises MeshSDFError for a malformed ``MESHSDF_THREADS``.

    Args:
        max_threads: upper bound on the auto count (default None: none).
        environ: the environment to read (default ``os.environ``).
    Returns:
        the intra-op thread count in use.
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
_SECTION = threading.Lock()    # one concurrent section at a time in the process
_POOL: dict = {}               # pid -> [single-thread executors]; a forked child makes its own


def _workers(count: int) -> list[ThreadPoolExecutor]:
    """The first ``count`` of the process's single-thread workers, made as needed.

    Why one executor per worker: task i of :func:`concurrently` then always runs on the same
    thread, so that thread's scratch (thread-local workspaces) and malloc arena serve it again
    next time; a shared pool hands a task to whichever idle thread wakes first, and memory
    freed in one thread's arena is page-faulted in anew in another's.
    """
    held = _POOL.get(os.getpid())
    if held is None:
        _POOL.clear()
        held = _POOL[os.getpid()] = []
    while len(held) < count:
        held.append(ThreadPoolExecutor(1, thread_name_prefix=f"meshsdf{len(held)}"))
    return held[:count]


def _run_on_worker(task: Callable, grad: bool, inference: bool, threads: int):
    torch.set_num_threads(threads)   # this thread's OpenMP team (cheap); the caller restores the process's
    # the caller's inference mode too: its inference tensors may only be updated in place inside one
    with torch.inference_mode() if inference else torch.set_grad_enabled(grad):
        return task()


def concurrently(tasks: Sequence[Callable], device=None) -> list:
    """The results of the zero-argument callables ``tasks``, run side by side on the CPU.

    Args:
        tasks: zero-argument callables, independent of one another.
        device: where their tensors live (default None: the CPU); not a CPU: in order.
    Returns:
        their results, in the order of ``tasks``.

    Why: most of a demo step is elementwise passes and gathers over 10^4 - 10^6 values,
    which a second OpenMP thread barely speeds up (waking it costs about as much as the
    pass), while two independent such computations, each on one thread, overlap almost
    fully (torch releases the GIL inside its operations).  With k >= 2 intra-op threads
    (the thread policy's choice) and a CPU ``device``, tasks[0] runs in the calling thread
    and task i >= 1 on worker thread i (the same thread every call), each task on max(1, k // len(tasks))
    intra-op threads (one each on 2 cores; 8 each for two tasks on 16, so that a
    many-core machine keeps its cores); the caller's thread count is restored afterwards.
    Otherwise (one thread, a CUDA device, a section already running in this process, or
    ``SETTINGS.concurrent`` off) they run in order in the calling thread.  Each task sees the
    caller's grad mode and inference mode.  Inside an :func:`elementwise_section` k is the process's count
    outside it, so the tasks still run side by side.  Tasks must not depend on one
    another's side effects; a task's exception is raised once all tasks have finished.
    """
    now = torch.get_num_threads()
    threads = _section_threads() or now
    cpu = device is None or torch.device(device).type == "cpu"
    if len(tasks) < 2 or threads < 2 or not cpu or not SETTINGS.concurrent or not _SECTION.acquire(blocking=False):
        return [t() for t in tasks]
    try:
        workers = _workers(len(tasks) - 1)
        grad, inference = torch.is_grad_enabled(), torch.is_inference_mode_enabled()
        share = max(1, threads // len(tasks))
        torch.set_num_threads(share)
        try:
            futures = [w.submit(_run_on_worker, t, grad, inference, share) for w, t in zip(workers, tasks[1:])]
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
# Below this many rows a decoder call inside an ``elementwise_section`` (the demo step, with
# sleeping OpenMP threads) stays on the section's one thread; from it, it gets the process's
# threads (``all_threads``), kernel or autograd alike: below it a second thread costs more to
# wake than it saves.
FEW_ROWS = 1024
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
    decoder field of ``lib.layer.sdf`` enters for calls of at least :data:`FEW_ROWS` rows)
    and for independent work side by side (:func:`concurrently`, which still uses the
    process's count); benchmarks/contention.py measures it.  Changes nothing with
    busy-waiting threads (``MESHSDF_THREADS=off``: torch's defaults, untouched by design),
    one thread, a CUDA ``device``, inside a section already open, or with
    ``SETTINGS.one_thread`` off.

    Args:
        device: where the enclosed work's tensors live (default None: the CPU).
    """
    threads = torch.get_num_threads()
    cpu = device is None or torch.device(device).type == "cpu"
    if (not SETTINGS.one_thread or threads < 2 or not cpu or _section_threads() is not None
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
    :func:`elementwise_section`; elsewhere, or with ``enabled`` False, it changes nothing.

    Args:
        enabled: whether to give the work the process's threads (default True), e.g.
            ``rows >= FEW_ROWS`` for a decoder call of ``rows`` rows.
    """
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
