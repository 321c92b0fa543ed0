"""The CPU cores this process may use and OpenMP's wait behaviour, without importing torch.

Why a module of its own: OpenMP reads its wait policy once, when torch's OpenMP runtime
is loaded (``import torch``), so it must be set by code that runs before torch is imported:
``lib.cli.setup_process`` calls :func:`prepare_openmp_env` at the top of every script.  The
thread count is chosen later by :func:`lib.runtime.threads.apply_thread_policy` in each
script's main.

The knob (docs/threads.md):

    MESHSDF_THREADS=auto   (default) one thread per core this process may use (affinity
                           mask, cgroup CPU quota), OpenMP threads sleep when idle
    MESHSDF_THREADS=N      exactly N intra-op threads, OpenMP threads sleep when idle
    MESHSDF_THREADS=off    torch's own defaults (one thread per core, busy-waiting)

An explicit ``OMP_NUM_THREADS`` fixes the thread count (torch reads it) and an explicit
``OMP_WAIT_POLICY`` or ``GOMP_SPINCOUNT`` the wait behaviour: the policy never overrides
what the user set.
"""
from __future__ import annotations

import math
import os
from pathlib import Path

__all__ = ["ENV", "CpuInfo", "ThreadSetting", "affinity_cores", "cgroup_cpu_limit", "choose_threads", "cpu_info",
           "keep_freed_memory", "openmp_threads_sleep", "prepare_openmp_env", "thread_setting", "usable_cores"]

ENV = "MESHSDF_THREADS"


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
    the very thread the team waits for (benchmarks/contention.py measures it).  Leaves
    everything alone with ``MESHSDF_THREADS=off``, a malformed value (reported later by
    :func:`lib.runtime.threads.apply_thread_policy`), or when ``OMP_WAIT_POLICY`` /
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


def openmp_threads_sleep(environ=None) -> bool:
    """Whether idle OpenMP threads sleep at once (``OMP_WAIT_POLICY=PASSIVE``, the policy's
    default, or the user's), rather than busy-wait (torch's default)."""
    env = os.environ if environ is None else environ
    return env.get("OMP_WAIT_POLICY", "").strip().upper() == "PASSIVE"


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


def choose_threads(cores: int, max_threads: int | None = None) -> int:
    """Intra-op threads for ``cores`` usable cores: one per core, at most ``max_threads``
    (for work too small to split well), at least 1.

    Not fewer for cores that other processes keep busy: runs that gave those up were slower
    than torch's defaults on a crowded machine (benchmarks/contention.py), since the
    scheduler shares cores among threads, not processes; with idle threads sleeping
    (``prepare_openmp_env``) a competitor costs about its fair share anyway.
    """
    n = int(cores)
    if max_threads is not None:
        n = min(n, int(max_threads))
    return max(1, n)


class CpuInfo:
    """What the CPU reports about itself (Linux: /proc/cpuinfo and /sys cache descriptions).

    vendor: e.g. "GenuineIntel", "AuthenticAMD" ("" where unknown); model: the model name;
    flags: the feature flags (e.g. "avx2", "avx512f"); caches: level -> bytes of one
    data/unified cache at that level as seen by one core (e.g. {1: 49152, 2: 1048576, 3: ...}),
    empty where unknown.
    """

    def __init__(self, vendor: str = "", model: str = "", flags=(), caches: dict | None = None):
        self.vendor, self.model, self.flags, self.caches = vendor, model, frozenset(flags), dict(caches or {})

    @property
    def vector_bits(self) -> int:
        """Widest SIMD float vector of the flags: 512 (avx512f), 256 (avx2 / avx), 128 otherwise."""
        if "avx512f" in self.flags:
            return 512
        return 256 if ("avx2" in self.flags or "avx" in self.flags) else 128

    def summary(self) -> str:
        """One line: model, vendor, vector width and cache sizes."""
        caches = ", ".join(f"L{k} {v // 1024} KiB" for k, v in sorted(self.caches.items()))
        return f"{self.model or 'unknown CPU'} ({self.vendor or 'unknown vendor'}, {self.vector_bits}-bit vectors" \
               f"{', ' + caches if caches else ''})"


def _parse_size(text: str) -> int | None:
    text = text.strip().upper()
    mult = {"K": 1024, "M": 1024 ** 2, "G": 1024 ** 3}.get(text[-1:], 1)
    try:
        return int(text.rstrip("KMGB") or "x") * mult
    except ValueError:
        return None


def cpu_info(cpuinfo: str | os.PathLike = "/proc/cpuinfo",
             cache_dir: str | os.PathLike = "/sys/devices/system/cpu/cpu0/cache") -> CpuInfo:
    """The first CPU's vendor, model, flags and per-core cache sizes; fields stay empty where
    the files are missing (non-Linux) or unreadable.

    Args:
        cpuinfo: the /proc/cpuinfo text file.
        cache_dir: the sysfs folder of cpu0's caches (index*/level, type, size).
    Returns:
        a :class:`CpuInfo`.
    """
    fields: dict[str, str] = {}
    try:
        for line in Path(cpuinfo).read_text(errors="replace").splitlines():
            if not line.strip():
                if fields:
                    break  # the first processor's block is enough
                continue
            key, _, value = line.partition(":")
            fields.setdefault(key.strip(), value.strip())
    except OSError:
        pass
    caches: dict[int, int] = {}
    try:
        entries = sorted(Path(cache_dir).glob("index*"))
    except OSError:
        entries = []
    for d in entries:
        try:
            if (d / "type").read_text().strip() == "Instruction":
                continue
            level = int((d / "level").read_text())
            size = _parse_size((d / "size").read_text())
        except (OSError, ValueError):
            continue
        if size:
            caches[level] = size
    return CpuInfo(fields.get("vendor_id", ""), fields.get("model name", ""),
                   fields.get("flags", fields.get("Features", "")).split(), caches)


# glibc's upper bound for its own sliding mmap threshold (DEFAULT_MMAP_THRESHOLD_MAX on 64-bit)
_MMAP_THRESHOLD = 32 << 20
_KEPT: list = []


def keep_freed_memory() -> bool:
    """Let glibc's malloc keep freed blocks of up to 32 MiB for reuse instead of handing them back
    to the kernel (fixed ``M_MMAP_THRESHOLD`` 32 MiB, ``M_TRIM_THRESHOLD`` twice that); once per process.

    Why: by default a freed block above a sliding threshold, or the freed top of a heap, goes back
    to the kernel, so a loop that allocates and frees MB-sized tensors (oneDNN's outputs in the
    fused training step and the inference kernels, the step's scratch) page-faults and
    zero-fills the same memory every time.  Blocks above 32 MiB still come from and go back to the kernel.  Does nothing
    off glibc.  Returns whether the setting is in effect.
    """
    if _KEPT:
        return _KEPT[0]
    ok = False
    try:
        import ctypes
        import platform

        if platform.libc_ver()[0] == "glibc":
            libc = ctypes.CDLL(None)
            m_trim_threshold, m_mmap_threshold = -1, -3  # <malloc.h>
            ok = bool(libc.mallopt(m_mmap_threshold, _MMAP_THRESHOLD)) and \
                bool(libc.mallopt(m_trim_threshold, 2 * _MMAP_THRESHOLD))
    except (OSError, AttributeError):
        ok = False
    _KEPT.append(ok)
    return ok
