"""The page faults of repeated calls, for the tests that a loop reuses its freed memory
(``lib.runtime.cpus.keep_freed_memory``) instead of having it faulted in and zeroed again."""
import platform
import resource

import pytest

__all__ = ["least_page_faults"]


def least_page_faults(call, rounds: int, calls: int = 3, warmup: int = 2) -> int:
    """The fewest minor page faults of ``calls`` calls of ``call()`` in a row, over ``rounds`` rounds,
    after ``warmup`` calls; skips the test off glibc (the setting is glibc's ``mallopt``).

    Why the least of several rounds: on a busy machine a thread may once take a fresh malloc
    arena (its own being held), whose pages are faulted in however the thresholds are set.
    """
    if platform.libc_ver()[0] != "glibc":
        pytest.skip("glibc's mallopt only")
    for _ in range(warmup):
        call()

    def faults() -> int:
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        for _ in range(calls):
            call()
        return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before

    return min(faults() for _ in range(rounds))
