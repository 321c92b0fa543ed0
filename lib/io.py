"""File formats and safe writes: every file the project writes goes through ``atomic_write``.

Meshes: vertices (V, 3) float32 and faces (F, 3) int64 numpy arrays (torch tensors are
accepted and moved to the CPU).  Images: (H, W) grey or (H, W, 3|4) colour, float in
[0, 1] or uint8.
"""
from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np

from .errors import MeshSDFError
from .log import info


def require_file(path: str | os.PathLike, what: str, fix: str = "") -> Path:
    """``path`` as a Path; MeshSDFError naming it when it is missing or is a folder (``fix``: how to fix)."""
    path = Path(path)
    if path.is_dir():
        raise MeshSDFError(f"{what} {path} is a folder, not a file" + (f"; {fix}" if fix else ""))
    if not path.is_file():
        raise MeshSDFError(f"{what} not found: {path}" + (f"; {fix}" if fix else ""))
    return path


def write_error(path: str | os.PathLike, err: OSError) -> MeshSDFError:
    """The one-line MeshSDFError for an OSError while writing ``path`` (full disk, read-only, ...)."""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return MeshSDFError(f"cannot write {path}: no space left on the device (or over quota); free some space "
                            "and run again (nothing was half-written)")
    return MeshSDFError(f"cannot write {path}: {err.strerror or err}; check that the folder is writable")


def cannot_write(folder: str | os.PathLike) -> str | None:
    """Why a file cannot be created in the existing ``folder`` (the OS's reason), or None when one
    can; tried with a temporary file that is gone at once."""
    try:
        with tempfile.TemporaryFile(dir=folder):
            return None
    except OSError as err:
        return str(err.strerror or err)


def check_writable_folder(folder: str | os.PathLike, flag: str = "--out") -> Path:
    """MeshSDFError unless ``folder`` is, or can be created as, a writable folder; creates nothing
    that stays.  ``flag``: the option that chooses another folder, named in the message."""
    folder = Path(os.path.abspath(folder))
    for p in (folder, *folder.parents):
        if not p.exists():
            continue
        if not p.is_dir():
            raise MeshSDFError(f"output folder {folder} cannot be made: {p} is a file; move it away or give "
                               f"{flag} a folder")
        reason = cannot_write(p)
        if reason is not None:
            raise MeshSDFError(f"cannot write to {p}: {reason}; make it writable or give {flag} a writable folder")
        break
    return folder


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


# in the name of every temporary this project writes: ``.<name>.meshsdf-tmp-<pid>-<random>...``
TEMP_MARK = "meshsdf-tmp"
_TEMP_NAME = re.compile(r"\..+\." + TEMP_MARK + r"-(\d+)-[a-z0-9_]{8}(\.[A-Za-z0-9.]*)?")


def marked_tempfile(folder: str | os.PathLike, name: str, suffix: str = ".tmp") -> tuple[int, str]:
    """``tempfile.mkstemp`` in ``folder`` named ``.<name>.meshsdf-tmp-<pid>-<8 random chars><suffix>``: the
    mark and the writer's PID tell a leftover of this project from a user's file (see ``temporary_writer``)."""
    return tempfile.mkstemp(prefix=f".{name.lstrip('.')}.{TEMP_MARK}-{os.getpid()}-", suffix=suffix, dir=folder)


def temporary_writer(name: str) -> int | None:
    """The PID that wrote the temporary ``name`` of ``marked_tempfile``; None for any other name."""
    m = _TEMP_NAME.fullmatch(name)
    return int(m.group(1)) if m else None


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike, suffix: str | None = None) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success rename it over ``path``.

    A crash, an exception or a kill while writing leaves the old file (or nothing), never a
    truncated one; a killed writer's temporary carries the project's mark (``marked_tempfile``),
    so that only such leftovers are ever cleaned up.  The temporary name keeps ``path``'s
    suffix so that writers which pick a format from the extension still work.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = marked_tempfile(path.parent, path.name, suffix if suffix is not None else ".tmp" + path.suffix)
    except OSError as err:
        raise MeshSDFError(f"cannot write {path}: {err.strerror or err}; check that the folder is writable") from None
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file the usual mode
    try:
        yield tmp_path
        os.replace(tmp_path, path)
    except BaseException as err:
        with contextlib.suppress(OSError):
            tmp_path.unlink()
        if isinstance(err, OSError):  # a full disk, a folder in the way, ...: one line, no traceback
            raise write_error(path, err) from None
        raise


def torch_save(obj, path: str | os.PathLike) -> None:
    """torch.save through a Python file object, so a full disk raises OSError (ENOSPC), not torch's
    RuntimeError without a reason; use inside ``atomic_write``."""
    import torch

    with open(path, "wb") as fh:
        torch.save(obj, fh)


def _np(a, dtype=None) -> np.ndarray:
    if hasattr(a, "detach"):
        a = a.detach().cpu().numpy()
    a = np.asarray(a)
    return a.astype(dtype, copy=False) if dtype is not None else a


def write_ply(path: str | os.PathLike, verts, faces, vertex_colors=None, face_colors=None) -> None:
    """Write a binary PLY mesh (plyfile), atomically.

    verts (V, 3) float; faces (F, 3) int; optional vertex_colors / face_colors (V|F, 3) uint8
    or float in [0, 1].
    """
    from plyfile import PlyData, PlyElement

    v = _np(verts, np.float32).reshape(-1, 3)
    f = _np(faces, np.int64).reshape(-1, 3)
    vfields = [("x", "f4"), ("y", "f4"), ("z", "f4")]
    vcols = None
    if vertex_colors is not None:
        vcols = _to_uint8(_np(vertex_colors)).reshape(-1, 3)
        vfields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    vert_el = np.empty(len(v), dtype=vfields)
    vert_el["x"], vert_el["y"], vert_el["z"] = v[:, 0], v[:, 1], v[:, 2]
    if vcols is not None:
        vert_el["red"], vert_el["green"], vert_el["blue"] = vcols[:, 0], vcols[:, 1], vcols[:, 2]
    ffields = [("vertex_indices", "i4", (3,))]
    fcols = None
    if face_colors is not None:
        fcols = _to_uint8(_np(face_colors)).reshape(-1, 3)
        ffields += [("red", "u1"), ("green", "u1"), ("blue", "u1")]
    face_el = np.empty(len(f), dtype=ffields)
    face_el["vertex_indices"] = f.astype(np.int32)
    if fcols is not None:
        face_el["red"], face_el["green"], face_el["blue"] = fcols[:, 0], fcols[:, 1], fcols[:, 2]
    ply = PlyData([PlyElement.describe(vert_el, "vertex"), PlyElement.describe(face_el, "face")])
    with atomic_write(path) as tmp:
        ply.write(str(tmp))


TEXT_MESH_FORMATS = (".obj", ".off")  # formats that are plain text only (PLY and STL have binary forms)


def read_mesh(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a triangle mesh (OBJ/PLY/OFF/STL/...) with trimesh, without merging or repair.

    Returns verts (V, 3) float32 and faces (F, 3) int64.  Raises MeshSDFError naming the file
    if it is missing, unreadable, not a mesh, has no faces or has non-finite vertices.
    """
    import trimesh

    path = require_file(path, "mesh file")
    if path.suffix.lower() in TEXT_MESH_FORMATS:
        with open(path, "rb") as fh:
            head = fh.read(1 << 16)
        if b"\0" in head:  # trimesh would guess an encoding (and may need a module that is not installed)
            raise MeshSDFError(f"{path} holds binary data, not a text {path.suffix[1:].upper()} mesh; export it "
                               "as a text file or another format (PLY, STL)")
    try:
        mesh = trimesh.load(str(path), force="mesh", process=False)
    except Exception as err:  # trimesh raises many types for bad files
        raise MeshSDFError(f"cannot read mesh {path}: {type(err).__name__}: {err}") from None
    if not isinstance(mesh, trimesh.Trimesh):
        raise MeshSDFError(f"{path} is not a triangle mesh")
    verts = np.asarray(mesh.vertices, dtype=np.float32)
    faces = np.asarray(mesh.faces, dtype=np.int64)
    if len(faces) == 0 or len(verts) == 0:
        raise MeshSDFError(f"mesh {path} has no faces; give a triangle mesh")
    if not np.isfinite(verts).all():
        raise MeshSDFError(f"mesh {path} has NaN or infinite vertex coordinates")
    return verts, faces


def write_obj(path: str | os.PathLike, verts, faces) -> None:
    """Write a plain-text OBJ mesh (1-based face indices), atomically."""
    v = _np(verts, np.float64).reshape(-1, 3)
    f = _np(faces, np.int64).reshape(-1, 3) + 1
    with atomic_write(path) as tmp:
        with open(tmp, "w") as fh:
            np.savetxt(fh, v, fmt="v %.7g %.7g %.7g")
            np.savetxt(fh, f, fmt="f %d %d %d")


def _to_uint8(img: np.ndarray) -> np.ndarray:
    if img.dtype == np.uint8:
        return img
    return (np.clip(img.astype(np.float64), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def save_png(path: str | os.PathLike, image) -> None:
    """Save an (H, W) or (H, W, 3|4) image, float in [0, 1] or uint8, as PNG, atomically."""
    from PIL import Image

    img = _to_uint8(_np(image))
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[..., 0]
    with atomic_write(path) as tmp:
        # our own file object: a failed write raises once, here (imageio's plugin would raise again when collected)
        with open(tmp, "wb") as fh:
            Image.fromarray(np.ascontiguousarray(img)).save(fh, format="PNG")


def read_png(path: str | os.PathLike) -> np.ndarray:
    """Read a PNG as uint8 (H, W[, C]); MeshSDFError naming the file if missing or corrupt.

    A palette or grey image with a transparency chunk (tRNS) comes back as RGBA (palette)
    or grey + alpha, so its transparency is the alpha channel as in an RGBA PNG.
    """
    import imageio.v3 as iio
    from PIL import Image

    path = require_file(path, "image")
    try:
        with Image.open(path) as im:
            if "transparency" in im.info and im.mode in ("P", "L", "RGB"):
                return np.array(im.convert("LA" if im.mode == "L" else "RGBA"))  # writable, as imageio gives
        return np.asarray(iio.imread(path))
    except Exception as err:
        raise MeshSDFError(f"cannot read image {path}: {type(err).__name__}: {err}") from None


# a GIF frame lasts a whole number of centiseconds, at most 65535 of them
GIF_MAX_FPS = 100.0
GIF_MIN_FPS = 0.002


def save_gif(path: str | os.PathLike, frames: Sequence, fps: float = 10.0) -> None:
    """Save frames (each (H, W[, 3]) float in [0, 1] or uint8) as a looping GIF, atomically.

    Each RGB frame gets its own 256-colour palette by Pillow's fast octree, without
    dithering: several times cheaper than the median cut of imageio's default, which made
    writing movie.gif a visible part of the demo (benchmarks/demo.py).  Flat-shaded renders
    have few colours, so the palette loses little.
    """
    from PIL import Image

    if len(frames) == 0:
        raise ValueError("save_gif needs at least one frame")
    if not GIF_MIN_FPS <= fps <= GIF_MAX_FPS:
        raise ValueError(f"save_gif: fps must be in [{GIF_MIN_FPS}, {GIF_MAX_FPS}], got {fps}")
    images = []
    for f in frames:
        a = _to_uint8(_np(f))
        if a.ndim == 3 and a.shape[2] == 1:
            a = a[..., 0]
        im = Image.fromarray(np.ascontiguousarray(a))
        images.append(im.convert("L") if a.ndim == 2 else
                      im.convert("RGB").quantize(256, method=Image.Quantize.FASTOCTREE, dither=Image.Dither.NONE))
    with atomic_write(path) as tmp:
        images[0].save(tmp, format="GIF", save_all=True, append_images=images[1:],
                       duration=int(round(1000.0 / fps)), loop=0)


class StagedDir:
    """Where ``staged_dir`` writes: ``path`` (the temporary folder), ``final`` (the output folder),
    ``partial`` (where the files go if the run fails) and, after success, ``previous`` (where
    an earlier output of ``final`` was moved, or None)."""

    def __init__(self, final: Path, path: Path, partial: Path):
        self.final, self.path, self.partial = final, path, partial
        self.previous: Path | None = None


def _utc_stamp() -> str:
    import time

    return time.strftime("%Y%m%d-%H%M%S", time.gmtime())


def _free_name(path: Path) -> Path:
    k, candidate = 1, path
    while candidate.exists():
        k += 1
        candidate = path.with_name(f"{path.name}-{k}")
    return candidate


def _staging_root(out: Path) -> Path:
    """The deepest existing folder at or above ``out.parent``: where the staging folder goes (so that a
    run which fails early creates no folders); MeshSDFError when a file is in the way."""
    for p in (out, *out.parents):
        if p.exists() and not p.is_dir():
            if p == out:
                raise MeshSDFError(f"output folder {out} is a file; give --out a folder (new or existing)")
            raise MeshSDFError(f"output folder {out} is below {p}, which is a file; give --out a folder")
        if p.exists() and p != out:
            return p
    return Path(".")


def _adopt_orphans(out: Path, root: Path) -> list[Path]:
    """Staging folders of ``out`` (in ``root``) left by killed runs (their PID is gone): renamed to
    incomplete ones."""
    found = []
    for p in root.glob(f".{out.name}.staging-*"):
        try:
            pid = int(p.name.rsplit("staging-", 1)[1].split("-")[0])
        except (IndexError, ValueError):
            continue
        try:
            os.kill(pid, 0)
            continue  # its run is still going
        except ProcessLookupError:
            pass
        except PermissionError:
            continue
        target = _free_name(root / f"{out.name}.incomplete-{_utc_stamp()}")
        with contextlib.suppress(OSError):
            os.rename(p, target)
            found.append(target)
    return found


OUTPUT_MARK = ".meshsdf-output"  # in every folder staged_dir wrote: tells its outputs from a user's folder


def _foreign_entries(out: Path) -> list[str]:
    """Entries of an existing ``out`` that forbid moving it aside: none when it is empty or an
    earlier output of ``staged_dir``."""
    entries = sorted(p.name for p in out.iterdir())
    return [] if not entries or OUTPUT_MARK in entries else entries


@contextlib.contextmanager
def staged_dir(out: str | os.PathLike, owned: bool = False) -> Iterator[StagedDir]:
    """Write an output folder whole or not at all.

    Yields a ``StagedDir`` whose ``path`` is a fresh hidden sibling of ``out``
    (``.<name>.staging-<pid>-<random>``, in the deepest folder above ``out`` that exists, so
    a run that fails early creates no folders); everything is written there.  On success the
    folder is renamed to ``out``; an earlier ``out`` is first renamed to
    ``<out>.previous-<UTC time>`` (kept, never deleted).  On an exception (a user error,
    Ctrl-C) the files written so far are renamed to ``<out>.incomplete-<UTC time>``
    (``partial``; an empty staging folder is just removed) and ``out`` is left as it was,
    so old and new files never mix.  Staging folders of killed runs are renamed to
    incomplete ones on the next call.

    MeshSDFError, before anything is written, when ``out`` or a folder above it is a file,
    or when ``out`` is a non-empty folder that no earlier run wrote (no ``.meshsdf-output``
    mark), unless ``owned`` (the command's default output folder, e.g.
    ``<experiment>/Optimizations``, whose earlier contents are its own by definition): a
    mistyped ``--out .`` never moves the user's folder aside.
    """
    out = Path(os.path.abspath(out))
    root = _staging_root(out)
    if out.is_dir() and not owned:
        foreign = _foreign_entries(out)
        if foreign:
            raise MeshSDFError(f"output folder {out} already holds files that no earlier run of this command wrote "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}); give --out a new "
                               "or empty folder")
    try:
        for orphan in _adopt_orphans(out, root):
            info(f"a killed run left its files of {out} in {orphan}")
        tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.staging-{os.getpid()}-", dir=root))
        (tmp / OUTPUT_MARK).write_text("written by MeshSDF; the folder was renamed into place when complete\n")
    except OSError as err:
        raise MeshSDFError(f"cannot create the output folder {out}: {err.strerror or err}; check that "
                           f"{root} is writable") from None
    os.chmod(tmp, 0o777 & ~_UMASK)
    stage = StagedDir(out, tmp, _free_name(root / f"{out.name}.incomplete-{_utc_stamp()}"))
    try:
        yield stage
    except BaseException:
        if any(p.name != OUTPUT_MARK for p in tmp.iterdir()):
            stage.partial = _free_name(stage.partial)
            os.rename(tmp, stage.partial)
        else:
            shutil.rmtree(tmp, ignore_errors=True)
        raise
    try:
        out.parent.mkdir(parents=True, exist_ok=True)
        if out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # an empty folder given as --out: nothing to keep
        if out.exists():
            stage.previous = _free_name(out.with_name(f"{out.name}.previous-{_utc_stamp()}"))
            os.rename(out, stage.previous)
        os.rename(tmp, out)
        if stage.previous is not None:
            info(f"the earlier contents of {out} were moved to {stage.previous}")
    except OSError as err:
        raise MeshSDFError(f"cannot move the finished output {tmp} to {out}: {err.strerror or err}; the files "
                           f"are in {tmp}") from None
