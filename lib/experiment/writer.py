"""Who writes an experiment folder, and that nothing trained is lost: what a training run checks before writing.

``claim_experiment`` (the scripts' entry): the one-writer lock (``lib.experiment.lock``), the
stale temporaries of killed saves, the refusal to overwrite a trained model unless asked, and
``--overwrite``'s backups (``move_aside``: renames into ``<exp>/Backups/<time>/``, never a
deletion).  The files themselves are ``lib.experiment.checkpoints``'.
"""
from __future__ import annotations

import contextlib
import os
import re
import time
from pathlib import Path

from ..errors import MeshSDFError
from ..io import cannot_write, temporary_writer
from ..log import info
from .checkpoints import (BACKUPS_DIR, LATENT_CODES_DIR, LOGS_FILE, MODEL_PARAMS_DIR, OPTIMIZATIONS_DIR,
                          OPTIMIZER_PARAMS_DIR, RECONSTRUCTIONS_DIR, SVR_PARTS, logs_path, record_epoch, saved_epochs)
from .lock import ExperimentLock, process_alive

__all__ = ["TRAINING_OUTPUTS", "Claim", "claim_experiment", "check_writable", "remove_stale_temporaries",
           "trained_files", "model_outputs", "move_aside"]

# every output of a model (training files and what the other commands made of them): moved aside by --overwrite,
# with the earlier outputs that lib.io.staged_dir kept beside them (<name>.previous-<time>, <name>.incomplete-<time>)
TRAINING_OUTPUTS = (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR, LOGS_FILE, RECONSTRUCTIONS_DIR,
                    OPTIMIZATIONS_DIR, "Results")


def check_writable(exp_dir: str | os.PathLike) -> None:
    """MeshSDFError unless checkpoints can be written in ``exp_dir`` (checked before training,
    not after the first epochs); creates nothing that stays."""
    exp_dir = Path(exp_dir)
    for d in (exp_dir, *(exp_dir / k for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR))):
        if d.exists() and not d.is_dir():
            raise MeshSDFError(f"{d} is a file but must be a folder for checkpoints; move it away")
        # a folder where a checkpoint file goes would fail its save after the epochs of work
        blocked = [p for p in ((*d.glob("*.pth"),) if d != exp_dir else (logs_path(exp_dir),)) if p.is_dir()]
        if blocked:
            raise MeshSDFError(f"{blocked[0]} is a folder where a checkpoint file is written; move it away")
        reason = cannot_write(d) if d.is_dir() else None
        if reason is not None:
            raise MeshSDFError(f"cannot write to {d}: {reason}; make the experiment folder writable or copy it "
                               "somewhere writable")


def remove_stale_temporaries(exp_dir: str | os.PathLike) -> list[Path]:
    """Delete the temporaries of interrupted writes (``.latest.pth.meshsdf-tmp-<pid>-<random>.tmp.pth``, left
    by a SIGKILL mid-save) in the experiment folder and its checkpoint folders; returns them.

    Only files with this project's mark (``lib.io.marked_tempfile``) whose writer is no longer
    running are removed: a user's ``.notes.tmp.txt`` never is, nor the lock temporary of a
    run starting right now.  Call it holding the ``ExperimentLock``.
    """
    exp_dir = Path(exp_dir)
    removed = []
    for d in (exp_dir, *(exp_dir / k for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR))):
        if not d.is_dir():
            continue
        for p in d.iterdir():
            pid = temporary_writer(p.name)
            if pid is not None and not process_alive(pid, None) and p.is_file():
                with contextlib.suppress(FileNotFoundError):
                    p.unlink()
                    removed.append(p)
    return removed


def trained_files(exp_dir: str | os.PathLike) -> list[Path]:
    """What a training run left in ``exp_dir`` (checkpoints, Logs.pth), temporaries excluded."""
    exp_dir = Path(exp_dir)
    found = []
    for kind in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR):
        d = exp_dir / kind
        if d.is_dir():
            found += sorted(p for p in d.iterdir() if p.suffix == ".pth" and not p.name.startswith("."))
    if logs_path(exp_dir).is_file():
        found.append(logs_path(exp_dir))
    return found


def model_outputs(exp_dir: str | os.PathLike) -> list[str]:
    """Names of the entries of ``exp_dir`` that belong to its model: ``TRAINING_OUTPUTS`` and the
    ``<output>.previous-<time>`` / ``<output>.incomplete-<time>`` folders kept beside them."""
    exp_dir = Path(exp_dir)
    if not exp_dir.is_dir():
        return []
    kept = re.compile("(" + "|".join(map(re.escape, TRAINING_OUTPUTS)) + r")\.(previous|incomplete)-.+")
    return sorted(p.name for p in exp_dir.iterdir() if p.name in TRAINING_OUTPUTS or kept.fullmatch(p.name))


def move_aside(exp_dir: str | os.PathLike, names: tuple[str, ...] | None = None) -> Path | None:
    """Move ``names`` (files or folders of ``exp_dir``; default: every ``model_outputs``) into a new
    ``<exp>/Backups/<UTC time>/``.

    Renames only (nothing is copied or deleted); returns the backup folder, None when there
    was nothing to move.

    Args:
        exp_dir: the experiment folder.
        names: entries of ``exp_dir`` to move (default None: every ``model_outputs``).
    Returns:
        the backup folder, or None.
    """
    exp_dir = Path(exp_dir)
    names = model_outputs(exp_dir) if names is None else names
    present = [n for n in names if (exp_dir / n).exists()]
    if not present:
        return None
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime())
    backup = exp_dir / BACKUPS_DIR / stamp
    k = 1
    while backup.exists():
        k += 1
        backup = exp_dir / BACKUPS_DIR / f"{stamp}-{k}"
    try:
        backup.mkdir(parents=True)
        for n in present:
            os.rename(exp_dir / n, backup / n)
    except OSError as err:
        raise MeshSDFError(f"cannot move the old files of {exp_dir} into {backup}: {err.strerror or err}; "
                           "nothing was deleted") from None
    return backup


def _check_resume(exp_dir: Path, resume: str | int | None, last_epoch: int | None, epochs_flag: bool) -> int:
    """The epoch a run resuming from ``resume`` starts after (0: a fresh start); MeshSDFError when the run
    would rewrite a newer ``latest`` or snapshot, or when ``--epochs`` leaves nothing to train."""
    latest = record_epoch(exp_dir, "latest") if resume is not None else None
    start = latest or 0 if resume == "latest" else resume or 0
    if isinstance(resume, int):
        newest = max([latest or 0, *saved_epochs(exp_dir)])
        names = (f"{resume}.pth", *(f"{part}_{resume}.pth" for part in SVR_PARTS))
        files = ", ".join(f"{k}/{n}" for k in (MODEL_PARAMS_DIR, OPTIMIZER_PARAMS_DIR, LATENT_CODES_DIR) for n in names
                          if (exp_dir / k / n).is_file())
        if resume < newest and files:  # (a snapshot that does not exist: the loader's message lists those that do)
            raise MeshSDFError(f"--continue {resume} in {exp_dir} would overwrite the newer epoch {newest} (latest, "
                               f"its snapshots and {LOGS_FILE}); nothing was changed: go on from there with "
                               f"--continue latest, or to branch from epoch {resume} copy specs.json, {LOGS_FILE} "
                               f"and {files} into a new experiment folder and run --continue {resume} there")
    if epochs_flag and last_epoch is not None and start >= last_epoch:
        raise MeshSDFError(f"nothing to train: {exp_dir} is at epoch {start} and --epochs {last_epoch} ends at or "
                           f"before it; "
                           f"pass --epochs {start + 1} or more to train further (nothing was changed)")
    return start


def _deepsdf_model(exp_dir: Path) -> bool:
    """Whether ``exp_dir`` holds an auto-decoder's files (latent codes: SVR training writes none)."""
    d = exp_dir / LATENT_CODES_DIR
    return d.is_dir() and any(p.suffix == ".pth" and not p.name.startswith(".") for p in d.iterdir())


class Claim:
    """What ``claim_experiment`` yields: ``start_epoch``, the epoch the run starts after (main process
    only, else None), and ``clear()``, which moves the old model's outputs aside for ``--overwrite``."""

    def __init__(self, exp_dir: Path, overwrite: bool, start_epoch: int | None):
        self.exp_dir, self.overwrite, self.start_epoch = exp_dir, overwrite, start_epoch
        self.backup: Path | None = None

    def clear(self) -> None:
        """With ``--overwrite`` on the main process: move every output of the old model into
        ``<exp>/Backups/<time>/``.  Call it once every input is validated, right before training."""
        if self.overwrite and self.start_epoch is not None and self.backup is None:
            self.backup = move_aside(self.exp_dir)
            if self.backup is not None:
                info(f"--overwrite: moved the previous training files into {self.backup}")


@contextlib.contextmanager
def claim_experiment(exp_dir: str | os.PathLike, resume: str | int | None, overwrite: bool = False,
                     what: str = "a training run", main: bool = True, *, svr: bool = False,
                     last_epoch: int | None = None, epochs_flag: bool = False):
    """Everything a training script checks before writing into ``exp_dir``; a context manager yielding a ``Claim``.

    On the main process: take the ``ExperimentLock`` (held until the block ends), delete the
    stale temporaries of killed saves, and guard the trained files: without ``resume``
    they stop the run (MeshSDFError: resume with ``--continue latest`` or start afresh with
    ``--overwrite``); with ``overwrite`` they are moved into ``<exp>/Backups/<time>/`` by
    ``Claim.clear``, which the script calls once all its inputs are validated.  A numbered
    ``resume`` older than the newest checkpoint is refused (training from it would rewrite
    ``latest``); so is ``epochs_flag`` (``--epochs`` given) with ``last_epoch`` at or below the
    epoch resumed.  ``svr``: the run is train_svr.py, which refuses an auto-decoder's experiment.
    Other processes of a torchrun job only pass through (rank 0 alone writes).

    Args:
        exp_dir: the experiment folder.
        resume: the ``--continue`` value ("latest" or an epoch), or None: a fresh start.
        overwrite: ``--overwrite`` (default False).
        what: the run, in words, for the lock (default "a training run").
        main: whether this process writes (rank 0; default True).
        svr: the run is train_svr.py (default False).
        last_epoch: the epoch the run ends at (default None: not checked).
        epochs_flag: whether ``--epochs`` was given (default False).
    """
    if resume is not None and overwrite:
        raise MeshSDFError("--overwrite starts afresh and --continue resumes: give one of them")
    exp_dir = Path(exp_dir)
    if not main:
        yield Claim(exp_dir, overwrite, None)
        return
    with ExperimentLock(exp_dir, what):
        stale = remove_stale_temporaries(exp_dir)
        if stale:
            info(f"removed {len(stale)} temporary file(s) left by an interrupted save ({stale[0].name}, ...)")
        if svr and _deepsdf_model(exp_dir):
            raise MeshSDFError(f"{exp_dir} holds a DeepSDF auto-decoder model ({LATENT_CODES_DIR}/, "
                               f"{MODEL_PARAMS_DIR}/), not a single-view reconstruction one; train_svr.py needs an "
                               "experiment folder of its own: put the SVR specs.json into a new folder and run "
                               "train_svr.py -e on it (to start from that decoder, set DecoderInit to this folder)")
        existing = trained_files(exp_dir)
        if existing and resume is None and not overwrite:
            shown = ", ".join(str(p.relative_to(exp_dir)) for p in existing[:2])
            more = f" and {len(existing) - 2} more" if len(existing) > 2 else ""
            raise MeshSDFError(f"{exp_dir} already holds a trained model ({shown}{more}); resume it with "
                               "--continue latest, or pass --overwrite to start afresh (the old files are "
                               f"moved into {exp_dir / BACKUPS_DIR}/, not deleted)")
        start = _check_resume(exp_dir, resume, last_epoch, epochs_flag)
        yield Claim(exp_dir, overwrite and bool(existing or model_outputs(exp_dir)), start)
