"""The one-writer lock of an experiment folder: ``<exp>/.meshsdf.lock`` names the process that writes it.

Training scripts take it (``lib.experiment.writer.claim_experiment``); readers ask
``active_writer`` whether a run is between the renames of a save
(``lib.experiment.checkpoints.read_while_saved``).  It sits below both so that neither
imports the other's module.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import socket
import time
from pathlib import Path

from ..errors import MeshSDFError
from ..io import marked_tempfile
from ..log import info

__all__ = ["LOCK_FILE", "ExperimentLock", "active_writer", "process_alive", "process_start"]

LOCK_FILE = ".meshsdf.lock"


def process_start(pid: int) -> str | None:
    """The kernel's start time of ``pid`` (tells a live holder from a new process that reuses its PID).

    Returns:
        the start field of ``/proc/<pid>/stat``; None where it cannot be read (no such process, no /proc).
    """
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def process_alive(pid: int, start: str | None) -> bool:
    """Whether process ``pid`` of this host runs and, when ``start`` is given, is the one that started then.

    Args:
        pid: process id.
        start: its ``process_start`` when it was recorded, or None (do not check reuse of the PID).
    """
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's live process
        return True
    return start is None or process_start(pid) in (None, start)


class ExperimentLock:
    """``<exp>/.meshsdf.lock`` naming the PID and host of the one process that writes the experiment.

    Context manager.  Taking it when another live process holds it raises MeshSDFError
    naming the holder; a lock left by a dead process of this host (a SIGKILL, a crash) is
    taken over with a message.  A lock of another host cannot be checked: the message says
    which file to delete once that run is known to be gone.  The file is created complete
    (written aside, then hard-linked into place, which fails if it exists), so a reader
    never sees a half-written lock.

    Args:
        exp_dir: the experiment folder.
        what: the run, in words, for the messages of others (default "a training run").
    """

    def __init__(self, exp_dir: str | os.PathLike, what: str = "a training run"):
        self.path = Path(exp_dir) / LOCK_FILE
        self.what = what
        self.held = False

    def _record(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "start": process_start(os.getpid()),
                "what": self.what, "since": time.strftime("%Y-%m-%d %H:%M:%S")}

    def _holder(self) -> dict | None:
        try:
            data = json.loads(self.path.read_text())
            return data if isinstance(data, dict) and isinstance(data.get("pid"), int) else {}
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            return {}

    def acquire(self) -> "ExperimentLock":
        """Take the lock (taking over a dead holder's); returns self.  MeshSDFError when a live run holds it."""
        record = json.dumps(self._record())
        for _ in range(3):
            try:
                fd, tmp = marked_tempfile(self.path.parent, self.path.name)
            except OSError as err:
                raise MeshSDFError(f"cannot create the lock {self.path}: {err.strerror or err}; check that the "
                                   "experiment folder is writable") from None
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(record)
                os.link(tmp, self.path)  # atomic and exclusive: fails when a lock exists
                self.held = True
                return self
            except FileExistsError:
                pass
            finally:
                os.unlink(tmp)
            holder = self._holder()
            if holder is None:  # released meanwhile
                continue
            if not holder:
                raise MeshSDFError(f"{self.path} exists but cannot be read; if no other run uses {self.path.parent}, "
                                   "delete it")
            here = holder.get("host") == socket.gethostname()
            if here and not process_alive(holder["pid"], holder.get("start")):
                if self._remove_if_unchanged(holder):
                    info(f"taking over the lock of {holder.get('what', 'a run')} (PID {holder['pid']}, "
                         f"since {holder.get('since', '?')}), which is no longer running")
                continue
            where = f"PID {holder['pid']} on {holder.get('host', '?')}"
            fix = ("wait for it to finish or stop it" if here else
                   f"wait for it to finish; if it is gone, delete {self.path}")
            raise MeshSDFError(f"{self.path.parent} is in use by {holder.get('what', 'another run')} ({where}, "
                               f"since {holder.get('since', '?')}); {fix}")
        raise MeshSDFError(f"cannot take the lock {self.path}: other runs keep taking it")

    def _remove_if_unchanged(self, stale: dict) -> bool:
        """Delete the lock if it still holds ``stale``; two runs taking over one stale lock
        check and delete in turn (flock on the folder), so only one of them removes it."""
        fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            if self._holder() != stale:
                return False
            with contextlib.suppress(FileNotFoundError):
                self.path.unlink()
            return True
        finally:
            os.close(fd)  # releases the flock

    def release(self) -> None:
        """Delete the lock if this process holds it (never another run's)."""
        if self.held:
            holder = self._holder()
            if holder and holder.get("pid") == os.getpid():
                with contextlib.suppress(FileNotFoundError):
                    self.path.unlink()
            self.held = False

    def __enter__(self) -> "ExperimentLock":
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


def active_writer(exp_dir: str | os.PathLike) -> dict | None:
    """The lock record of the run writing ``exp_dir`` now (see ``ExperimentLock``), None when there is none
    (a lock of another host counts as live: it cannot be checked)."""
    holder = ExperimentLock(exp_dir)._holder()
    if not holder:
        return None
    if holder.get("host") == socket.gethostname() and not process_alive(holder["pid"], holder.get("start")):
        return None
    return holder
