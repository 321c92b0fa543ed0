"""SDF training samples from triangle meshes (DeepSDF's convention, docs/data.md).

Normalisation, in DeepSDF's convention: ``normalised = (original + offset) * scale`` with
``offset`` (3,) = -(the centre of the bounding box of the vertices used by faces) and
``scale`` chosen so that the farthest such vertex lies at radius 1 / 1.03 (DeepSDF's
buffer); ``original = normalised / scale - offset``.  Files (``write_normalization`` /
``read_normalization``) hold ``offset`` and ``scale`` as DeepSDF's NormalizationParameters
do, plus a ``convention`` marker; see ``read_normalization`` for files of earlier versions
of this project, which stored +centre.

Samples of a normalised mesh, ``n`` in all, by a ``SampleMix`` of ``SAMPLE_MIXES``:
  - "deepsdf" (default; DeepSDF's preprocessor, which made the original's data): 47/50 near
    the surface, area-uniform surface points each perturbed twice, once by N(0, 0.005 I)
    (std 0.0707) and once by N(0, 0.0005 I) (std 0.0224); 3/50 uniform in the box [-1, 1]^3,
  - "paper" (the DeepSDF paper's text): the same with variances 0.0025 / 0.00025 (std 0.05 /
    0.0158) and 5 % uniform.
Each point gets its exact unsigned distance to the triangles (libigl AABB closest-point
query) and a sign from the generalised winding number (libigl fast winding number, exact
winding number where the fast one is within 0.2 of the 0.5 threshold): negative where
|w| > 0.5.  The winding number works on triangle soups, so duplicated seam vertices, small
holes and a globally inverted orientation do not flip signs.

Libigl is CPU-only; this module works on float64 numpy arrays and returns float32.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import MeshSDFError
from ..io import atomic_write, require_file, write_obj
from ..log import warning

NORMALIZATION_BUFFER = 1.03


@dataclass(frozen=True)
class SampleMix:
    """Near-surface noise ``variances`` (coarse, fine) per coordinate and the ``uniform`` fraction in [-1, 1]^3."""

    variances: tuple[float, float]
    uniform: float


SAMPLE_MIXES = {"deepsdf": SampleMix((0.005, 0.0005), 3 / 50), "paper": SampleMix((0.0025, 0.00025), 0.05)}
DEFAULT_SAMPLE_MIX = "deepsdf"


@dataclass
class Normalization:
    """DeepSDF's ``normalised = (original + offset) * scale``; offset (3,) float64 (= -centre), scale > 0."""

    offset: np.ndarray
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) + self.offset) * self.scale

    def invert(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale - self.offset


def normalization(verts: np.ndarray, faces: np.ndarray, name: str = "mesh") -> Normalization:
    """Bounding-box centre and unit-sphere scale (with the 1.03 buffer) of the used vertices.

    verts (V, 3), faces (F, 3).  Raises MeshSDFError naming ``name`` if the mesh has no
    extent (all vertices used by faces coincide).
    """
    used = np.asarray(verts, dtype=np.float64)[np.unique(np.asarray(faces).reshape(-1))]
    centre = 0.5 * (used.min(axis=0) + used.max(axis=0))
    radius = float(np.linalg.norm(used - centre, axis=1).max())
    if not np.isfinite(radius) or radius <= 1e-12 * max(1.0, float(np.abs(centre).max())):
        raise MeshSDFError(f"mesh {name} has zero extent (all its vertices coincide); give a real mesh")
    return Normalization(offset=-centre, scale=1.0 / (NORMALIZATION_BUFFER * radius))


def rotate_about_y(verts: np.ndarray, degrees: float) -> np.ndarray:
    """``verts`` (V, 3) turned by ``degrees`` about +y (right hand rule): (V, 3) float64.

    +90 maps (x, y, z) to (z, y, -x), the turn of Keenan Crane's spot.obj in the original's
    bob_and_spot data (docs/data.md).  Multiples of 90 are exact.
    """
    v = np.asarray(verts, dtype=np.float64)
    quarter = degrees / 90.0
    if quarter == round(quarter):
        c, s = ((1, 0), (0, 1), (-1, 0), (0, -1))[int(round(quarter)) % 4]
    else:
        c, s = np.cos(np.radians(degrees)), np.sin(np.radians(degrees))
    return np.stack([c * v[:, 0] + s * v[:, 2], v[:, 1], -s * v[:, 0] + c * v[:, 2]], axis=1)


def validate_mesh(verts: np.ndarray, faces: np.ndarray, name: str = "mesh") -> None:
    """Raise MeshSDFError naming ``name`` for meshes that cannot be sampled."""
    if len(faces) == 0 or len(verts) == 0:
        raise MeshSDFError(f"mesh {name} has no faces; give a triangle mesh")
    if faces.ndim != 2 or faces.shape[1] != 3:
        raise MeshSDFError(f"mesh {name} is not a triangle mesh (faces of shape {faces.shape})")
    if faces.min() < 0 or faces.max() >= len(verts):
        raise MeshSDFError(f"mesh {name} has face indices outside its vertex list")
    if not np.isfinite(verts).all():
        raise MeshSDFError(f"mesh {name} has NaN or infinite vertex coordinates")
    area = 0.5 * np.linalg.norm(np.cross(verts[faces[:, 1]] - verts[faces[:, 0]],
                                         verts[faces[:, 2]] - verts[faces[:, 0]]), axis=1)
    if not area.sum() > 0:
        raise MeshSDFError(f"mesh {name} has zero surface area (all faces degenerate)")


def surface_points(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points uniform over the surface area: (n, 3) float64."""
    v = np.asarray(verts, dtype=np.float64)
    a, b, c = v[faces[:, 0]], v[faces[:, 1]], v[faces[:, 2]]
    area = np.linalg.norm(np.cross(b - a, c - a), axis=1)
    cdf = np.cumsum(area)
    idx = np.searchsorted(cdf, rng.random(n) * cdf[-1], side="right").clip(max=len(faces) - 1)
    # Square-root warp of two uniforms gives uniform barycentric coordinates.
    r1 = np.sqrt(rng.random(n))[:, None]
    r2 = rng.random(n)[:, None]
    return (1.0 - r1) * a[idx] + r1 * (1.0 - r2) * b[idx] + r1 * r2 * c[idx]


def sample_points(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator,
                  mix: str = DEFAULT_SAMPLE_MIX) -> np.ndarray:
    """Query points around a normalised mesh by ``SAMPLE_MIXES[mix]``: (n, 3) float64.

    Rows in blocks: ceil(near / 2) surface points + coarse noise, the first floor(near / 2)
    of the same surface points + fine noise, then round(uniform * n) uniform points.
    """
    if mix not in SAMPLE_MIXES:
        raise MeshSDFError(f"unknown sample mix {mix!r}; valid: {', '.join(SAMPLE_MIXES)}")
    m = SAMPLE_MIXES[mix]
    n_uniform = int(round(m.uniform * n))
    n_near = n - n_uniform
    coarse = (n_near + 1) // 2
    surf = surface_points(verts, faces, coarse, rng)
    # each surface point is perturbed twice, as DeepSDF's preprocessor does
    parts = [surf + rng.normal(0.0, m.variances[0] ** 0.5, size=surf.shape),
             surf[:n_near - coarse] + rng.normal(0.0, m.variances[1] ** 0.5, size=(n_near - coarse, 3)),
             rng.uniform(-1.0, 1.0, size=(n_uniform, 3))]
    return np.concatenate(parts, axis=0)


def signed_distance(verts: np.ndarray, faces: np.ndarray, points: np.ndarray) -> np.ndarray:
    """Exact distance from ``points`` (P, 3) to the triangles, negative inside: (P,) float64.

    Inside means |generalised winding number| > 0.5 (robust to seams, small holes and
    inverted orientation).
    """
    import igl

    v = np.ascontiguousarray(verts, dtype=np.float64)
    f = np.ascontiguousarray(faces, dtype=np.int64)
    p = np.ascontiguousarray(points, dtype=np.float64)
    sq, _, _ = igl.point_mesh_squared_distance(p, v, f)
    w = np.abs(igl.fast_winding_number(v, f, p))
    # The fast (Barnes-Hut) estimate is accurate to ~1e-2; recheck the doubtful points exactly.
    doubt = np.nonzero(np.abs(w - 0.5) < 0.2)[0]
    if len(doubt):
        w[doubt] = np.abs(igl.winding_number(v, f, np.ascontiguousarray(p[doubt])))
    d = np.sqrt(np.maximum(sq, 0.0))
    return np.where(w > 0.5, -d, d)


def sample_sdf(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0,
               mix: str = DEFAULT_SAMPLE_MIX) -> tuple[np.ndarray, np.ndarray]:
    """SDF samples of a (normalised) mesh split by sign, points by ``sample_points(..., mix)``.

    Returns ``pos`` (Np, 4) and ``neg`` (Nn, 4) float32 rows ``x y z sdf`` with sdf >= 0 in
    pos and sdf < 0 in neg, Np + Nn = n.
    """
    rng = np.random.default_rng(seed)
    pts = sample_points(verts, faces, n, rng, mix)
    sdf = signed_distance(verts, faces, pts)
    return split_by_sign(np.concatenate([pts, sdf[:, None]], axis=1))


def split_by_sign(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (N, 4) rows ``x y z sdf`` into float32 ``pos`` (sdf >= 0) and ``neg`` (sdf < 0)."""
    rows = np.asarray(rows, dtype=np.float32)
    inside = rows[:, 3] < 0
    return rows[~inside], rows[inside]


def write_sdf_samples(path: str | os.PathLike, pos: np.ndarray, neg: np.ndarray) -> None:
    """Write a DeepSDF samples file (``pos``, ``neg`` arrays) atomically, creating its folder."""
    with atomic_write(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, pos=pos, neg=neg)


def prepare_mesh(verts: np.ndarray, faces: np.ndarray, out_root: str | os.PathLike, dataset: str,
                 instance: str, n_samples: int, seed: int = 0, name: str | None = None,
                 mix: str = DEFAULT_SAMPLE_MIX) -> dict:
    """Normalise one mesh, sample it and write the files of docs/data.md atomically.

    Writes ``<out_root>/<dataset>/samples/<instance>.npz`` (pos, neg) by ``sample_sdf(..., mix)``,
    ``samples/<instance>_normalization.npz`` (``write_normalization``) and
    ``meshes/<instance>.obj`` (the normalised mesh, faces as given).  Returns a summary dict
    (instance, counts).  ``name`` is used in error messages (default: the instance).
    """
    name = name or instance
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    validate_mesh(verts, faces, name)
    norm = normalization(verts, faces, name)
    nverts = norm.apply(verts)
    pos, neg = sample_sdf(nverts, faces, n_samples, seed, mix)

    root = Path(out_root) / dataset
    write_sdf_samples(root / "samples" / f"{instance}.npz", pos, neg)
    write_normalization(root / "samples" / f"{instance}_normalization.npz", norm)
    write_obj(root / "meshes" / f"{instance}.obj", nverts, faces)
    return {"instance": instance, "pos": len(pos), "neg": len(neg), "faces": len(faces)}


# Written beside offset and scale; DeepSDF's readers ignore it.  Files of this project
# without it predate the switch to DeepSDF's sign (they stored offset = +centre).
NORMALIZATION_CONVENTION = "deepsdf"
_OLD_PROJECT_SUFFIX = "_normalization.npz"  # the only name this project ever wrote them under
_warned_old: set = set()


def write_normalization(path: str | os.PathLike, norm: Normalization) -> None:
    """Write ``offset`` (3,), ``scale`` () and the ``convention`` marker atomically (DeepSDF's keys)."""
    with atomic_write(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, offset=np.asarray(norm.offset, dtype=np.float64), scale=np.float64(norm.scale),
                 convention=np.array(NORMALIZATION_CONVENTION))


def read_normalization(path: str | os.PathLike) -> Normalization:
    """A normalisation file: DeepSDF's NormalizationParameters npz or one ``write_normalization`` wrote.

    A file with the ``convention`` marker, or without it and not named
    ``*_normalization.npz``, is DeepSDF's convention.  A file without the marker named
    ``*_normalization.npz`` was written by an earlier version of this project with the
    opposite sign (offset = +centre): it is converted (offset negated) with a one-line
    warning saying how to rewrite it, so that it is never applied with the wrong sign.
    Raises MeshSDFError naming the file when it is missing, unreadable or not finite.
    """
    path = require_file(path, "normalisation file", "fix NormalizationPath in specs.json (null when the renders "
                        "were made in the frame of the SDF samples)")
    try:
        with np.load(path, allow_pickle=False) as z:
            offset = np.asarray(z["offset"], dtype=np.float64).reshape(3)
            scale = float(np.asarray(z["scale"]).reshape(()))
            convention = str(z["convention"]) if "convention" in z.files else None
    except Exception as err:
        raise MeshSDFError(f"cannot read normalisation {path}: {type(err).__name__}: {err}; expected arrays "
                           "'offset' (3,) and 'scale' ()") from None
    if not (np.isfinite(offset).all() and np.isfinite(scale) and scale > 0):
        raise MeshSDFError(f"{path}: offset must be finite and scale > 0")
    if convention is not None and convention != NORMALIZATION_CONVENTION:
        raise MeshSDFError(f"{path}: unknown normalisation convention {convention!r}; expected "
                           f"{NORMALIZATION_CONVENTION!r} (normalised = (original + offset) * scale)")
    if convention is None and path.name.endswith(_OLD_PROJECT_SUFFIX):
        offset = -offset
        if path.parent not in _warned_old:
            _warned_old.add(path.parent)
            warning(f"{path} (and its neighbours) use this project's old sign, offset = +centre; converted to "
                    "DeepSDF's (offset = -centre); rerun prepare_data.py to rewrite them")
    return Normalization(offset=offset, scale=scale)
