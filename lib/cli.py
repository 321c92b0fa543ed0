"""The scripts' command line: the process set-up, the shared flags, the one-line error exit.

Every script at the repository root starts with::

    from .cli import setup_process
    setup_process()          # before torch loads: OpenMP reads its wait policy once

then adds the shared flags to its parser with the ``add_*`` helpers (so that a flag means the
same in every script) and runs its ``main`` through :func:`cli_main`.  This module
imports no torch, so that ``setup_process`` can run first; importing ``lib`` or ``meshsdf``
never changes the process (no environment variable set, no thread started).
"""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from typing import Callable

from .errors import EXIT_USER_ERROR, MeshSDFError
from .runtime.cpus import prepare_openmp_env

__all__ = ["setup_process", "cli_main", "add_experiment", "add_device", "add_seed",
           "parse_epoch", "epoch_type"]


def setup_process() -> None:
    """Make idle OpenMP threads sleep (``MESHSDF_THREADS`` policy, see docs/threads.md).

    Call it before ``import torch``: GNU OpenMP reads its wait policy once, when torch loads it.
    Leaves whatever the user set (``OMP_WAIT_POLICY``, ``GOMP_SPINCOUNT``, ``MESHSDF_THREADS=off``).
    """
    prepare_openmp_env()


def cli_main(main: Callable[[], object], prog: str | None = None) -> None:
    """Run a script's ``main()`` and exit: its status (0 for None), 2 on ``MeshSDFError``, 130 on Ctrl-C."""
    name = prog or (sys.argv[0].rsplit("/", 1)[-1] if sys.argv else "meshsdf")
    try:
        rc = main()
        status = int(rc) if isinstance(rc, int) else 0
    except MeshSDFError as err:
        msg = " ".join(str(err).split())  # one line, whatever the message held
        print(f"{name}: error: {msg}", file=sys.stderr)
        status = EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"{name}: interrupted", file=sys.stderr)
        status = 130
    _exit(status)


def _exit(status: int) -> None:
    """``sys.exit(status)``; a torchrun worker (``WORLD_SIZE`` > 1) leaves without interpreter shutdown.

    Why: a collective backend's worker thread (gloo's, also inside DistributedDataParallel) may still
    drop its last reference to a Python-made tensor after the call returned; doing so takes the GIL, and
    during interpreter shutdown CPython ends such a thread inside a C++ destructor, which aborts the
    rank (SIGABRT, "terminate called without an active exception") after all its work is saved.  By
    now every file is written (atomically) and closed; only the standard streams need flushing.
    """
    try:
        workers = int(os.environ.get("WORLD_SIZE", "1"))
    except ValueError:  # reported by lib.training.distributed where it matters
        workers = 1
    if workers > 1:
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()
        os._exit(status)
    sys.exit(status)


def add_experiment(ap: argparse.ArgumentParser, help: str = "experiment folder holding specs.json") -> None:
    """``-e/--experiment`` (required): the folder whose specs.json the script reads and writes under."""
    ap.add_argument("-e", "--experiment", required=True, help=help)


def add_device(ap: argparse._ActionsContainer,
               help: str = "cpu, cuda, cuda:N or auto (default: cuda if available)") -> None:
    """``--device``: where tensors live (``lib.runtime.choose_device`` reads it)."""
    ap.add_argument("--device", default=None, help=help)


def parse_epoch(value: str | int, flag: str = "--continue") -> str | int:
    """The value of the checkpoint flag ``flag``: "latest" or a positive epoch number.

    Args:
        value: "latest" or an epoch number (int, or its text from the command line).
        flag: the flag named in the error (default "--continue").
    Returns:
        "latest" or the epoch (int >= 1); MeshSDFError otherwise.
    """
    if value == "latest":
        return "latest"
    try:
        epoch = int(value)
    except (TypeError, ValueError):
        raise MeshSDFError(f"{flag} takes 'latest' or an epoch number, got {value!r}") from None
    if epoch < 1:
        raise MeshSDFError(f"{flag} epoch must be >= 1, got {epoch}")
    return epoch


def epoch_type(flag: str) -> Callable[[str], str | int]:
    """argparse ``type=`` for the checkpoint flag ``flag`` (its errors name that flag)."""
    return lambda value: parse_epoch(value, flag)


def add_seed(ap: argparse._ActionsContainer, help: str = "random seed (default 0)") -> None:
    """``--seed`` (an integer; its range is checked by ``lib.runtime.limits.check_seed``)."""
    ap.add_argument("--seed", type=int, default=0, help=help)
