"""The CPU cores this process may use and OpenMP's wait behaviour, without importing torch.

Why a module of its own: OpenMP reads its wait policy once, when torch's OpenMP runtime
is loaded (``import torch``), so it must be set by code that runs before torch is
imported.  ``lib/__init__.py`` calls :func:`prepare_openmp_env`; the thread count itself
is chosen later by ``lib.runtime.apply_thread_policy`` at the top of each script's main.

The knob (README "Threads and busy machines"):

    MESHSDF_THREADS=auto   (default) threads = the cores of this process that other
                           processes leave free (at least 1), OpenMP threads sleep when idle
    MESHSDF_THREADS=N      exactly N intra-op threads, OpenMP threads sleep when idle
    MESHSDF_THREADS=off    torch's own defaults (one thread per core, busy-waiting)

An explicit ``OMP_NUM_THREADS`` fixes the thread count (torch reads it) and an explicit
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the wait behaviour: the policy never overrides
what the user set.
"""
from __future__ import annotations

import math
import os
import time
from pathlib import Path

ENV = "MESHSDF_THREADS"
# per-CPU idle share below which a core counts as taken: a core a competitor keeps 75 %
# busy gives our thread a quarter of it and stalls every parallel region waiting for it
_FREE_ROUNDING = 0.3


class ThreadSetting:
    """The parsed ``MESHSDF_THREADS`` value: ``mode`` "auto" | "fixed" | "off", ``count`` for fixed."""

    def __init__(self, raw: str | None):
        value = (raw or "auto").strip().lower()
        self.raw = raw
        if value in ("", "auto"):
            self.mode, self.count = "auto", None
        elif value == "off":
            self.mode, self.count = "off", None
        else:
            try:
                count = int(value)
            except ValueError:
                count = 0
            if count < 1:
                raise ValueError(f"{ENV}={raw!r}: use auto, off or a number of threads >= 1")
            self.mode, self.count = "fixed", count


def thread_setting(environ=None) -> ThreadSetting:
    """``MESHSDF_THREADS`` of ``environ`` (default ``os.environ``); ValueError when malformed."""
    env = os.environ if environ is None else environ
    return ThreadSetting(env.get(ENV))


def prepare_openmp_env(environ=None) -> bool:
    """Make idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``) unless the user chose.

    Must run before torch is imported to take effect (OpenMP reads it when it loads).  By
    default GNU OpenMP spins ~300,000 pause instructions (milliseconds) after every parallel
    region before sleeping; next to another CPU-bound process those spins take the CPU from
    the very thread the team waits for (measured: a demo iteration 3x slower, training
    epochs 6x).  Leaves everything alone with ``MESHSDF_THREADS=off``, a malformed value
    (reported later by ``lib.runtime.apply_thread_policy``), or when ``OMP_WAIT_POLICY`` /
    ``GOMP_SPINCOUNT`` / ``KMP_BLOCKTIME`` is already set.  Returns whether it set it.
    """
    env = os.environ if environ is None else environ
    try:
        if thread_setting(env).mode == "off":
            return False
    except ValueError:
        return False
    if any(k in env for k in ("OMP_WAIT_POLICY", "GOMP_SPINCOUNT", "KMP_BLOCKTIME")):
        return False
    env["OMP_WAIT_POLICY"] = "PASSIVE"
    return True


def affinity_cores() -> list[int]:
    """The CPU ids this process may run on (``os.sched_getaffinity``; all CPUs where unsupported)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def _cgroup_dirs() -> list[Path]:
    """Candidate cgroup folders of this process holding its CPU limits (v2 first, then v1)."""
    root = Path("/sys/fs/cgroup")
    out = []
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        lines = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        rel = path.lstrip("/")
        if controllers == "":
            out.append(root / rel)
        elif "cpu" in controllers.split(","):
            out += [root / "cpu" / rel, root / "cpu,cpuacct" / rel]
    out += [root, root / "cpu", root / "cpu,cpuacct"]
    return out


def cgroup_cpu_limit() -> float | None:
    """CPUs the cgroup quota allows (cgroup v2 ``cpu.max`` or v1 ``cfs_quota_us``), or None if unlimited."""
    for d in _cgroup_dirs():
        try:
            quota, period = (d / "cpu.max").read_text().split()[:2]
            if quota == "max":
                return None
            return max(0.01, int(quota) / int(period))
        except (OSError, ValueError):
            pass
        try:
            quota = int((d / "cpu.cfs_quota_us").read_text())
            period = int((d / "cpu.cfs_period_us").read_text())
            if quota <= 0:
                return None
            return max(0.01, quota / period)
        except (OSError, ValueError):
            pass
    return None


def usable_cores() -> int:
    """Cores this process may use: its affinity mask, capped by the cgroup quota (rounded up)."""
    n = len(affinity_cores())
    limit = cgroup_cpu_limit()
    if limit is not None:
        n = min(n, max(1, math.ceil(limit - 1e-9)))
    return max(1, n)


def _cpu_times() -> dict[int, tuple[int, int]]:
    """Per CPU id: (busy, total) jiffies from /proc/stat (empty where unavailable)."""
    out = {}
    try:
        lines = Path("/proc/stat").read_text().splitlines()
    except OSError:
        return out
    for line in lines:
        if not line.startswith("cpu") or line.startswith("cpu "):
            continue
        name, *vals = line.split()
        try:
            cpu = int(name[3:])
            v = [int(x) for x in vals]
        except ValueError:
            continue
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        total = sum(v[:8])  # guest time is already counted in user
        out[cpu] = (total - idle, total)
    return out


def _own_cpu_seconds() -> float:
    t = os.times()
    return t.user + t.system


class Snapshot:
    """Per-CPU busy/total jiffies (/proc/stat) and this process's CPU seconds at one moment."""

    def __init__(self):
        self.cpus = _cpu_times()
        self.own = _own_cpu_seconds()


def busy_between(a: Snapshot, b: Snapshot, cpus: list[int]) -> float | None:
    """How many of ``cpus`` other processes kept busy between snapshots ``a`` and ``b``.

    The busy shares of the CPUs of ``cpus`` summed, minus this process's own CPU time over
    the interval; None where /proc/stat is unavailable or no time passed.
    """
    busy, ticks, seen = 0.0, 0, 0
    for cpu in cpus:
        if cpu in a.cpus and cpu in b.cpus:
            db, dt = b.cpus[cpu][0] - a.cpus[cpu][0], b.cpus[cpu][1] - a.cpus[cpu][1]
            if dt > 0:
                busy += db / dt
                ticks += dt
                seen += 1
    if not seen:
        return None
    # the interval in the counters' own clock (each CPU's total advances CLK_TCK per second)
    hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
    elapsed = ticks / seen / hz
    return max(0.0, busy - (b.own - a.own) / elapsed)


def busy_cores(cpus: list[int], window: float = 0.1) -> float | None:
    """How many of ``cpus`` other processes keep busy, measured over ``window`` seconds
    (``busy_between`` two snapshots); None where /proc/stat is unavailable."""
    a = Snapshot()
    if not a.cpus:
        return None
    time.sleep(window)
    return busy_between(a, Snapshot(), cpus)


def free_cores(cores: int, cpus: list[int] | None = None, window: float = 0.1) -> float:
    """Cores of the ``cores`` usable ones that other processes leave idle right now (>= 0)."""
    cpus = affinity_cores() if cpus is None else cpus
    busy = busy_cores(cpus, window)
    if busy is None:
        try:
            busy = os.getloadavg()[0]
        except (AttributeError, OSError):
            busy = 0.0
        busy *= len(cpus) / max(1, os.cpu_count() or 1)
    return max(0.0, min(float(cores), len(cpus) - busy))


def choose_threads(cores: int, free: float, max_threads: int | None = None) -> int:
    """Intra-op threads for ``cores`` usable cores of which ``free`` are idle: at least 1.

    A thread on a core shared with a busy process runs at a fraction of its speed, and a
    parallel region ends only when its slowest thread does; so only (almost) idle cores
    get a thread.  ``max_threads`` caps it for work too small to split well.
    """
    n = int(math.floor(min(float(cores), free) + _FREE_ROUNDING))
    if max_threads is not None:
        n = min(n, int(max_threads))
    return max(1, min(n, cores))
