"""SDF training samples from triangle meshes (DeepSDF convention, SPEC section 2).

Normalisation: ``normalised = (original - offset) * scale`` with ``offset`` (3,) the centre
of the bounding box of the vertices used by faces and ``scale`` chosen so that the farthest
such vertex lies at radius 1 / 1.03 (DeepSDF's buffer); ``original = normalised / scale +
offset``.

Samples of a normalised mesh, ``n`` in all (fractions of ``SAMPLE_MIX``):
  - 47.5 %: area-uniform surface points + N(0, 0.0025 I) noise (std 0.05),
  - 47.5 %: area-uniform surface points + N(0, 0.00025 I) noise (std 0.0158),
  - 5 %:    uniform in the box [-1, 1]^3.
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

from lib.errors import MeshSDFError

NORMALIZATION_BUFFER = 1.03
# (fraction, noise std or None for uniform in [-1, 1]^3)
SAMPLE_MIX = ((0.475, 0.0025 ** 0.5), (0.475, 0.00025 ** 0.5), (0.05, None))


@dataclass
class Normalization:
    """``normalised = (original - offset) * scale``; offset (3,) float64, scale > 0."""

    offset: np.ndarray
    scale: float

    def apply(self, points: np.ndarray) -> np.ndarray:
        return (np.asarray(points, dtype=np.float64) - self.offset) * self.scale

    def invert(self, points: np.ndarray) -> np.ndarray:
        return np.asarray(points, dtype=np.float64) / self.scale + self.offset


def normalization(verts: np.ndarray, faces: np.ndarray, name: str = "mesh") -> Normalization:
    """Bounding-box centre and unit-sphere scale (with the 1.03 buffer) of the used vertices.

    verts (V, 3), faces (F, 3).  Raises MeshSDFError naming ``name`` if the mesh has no
    extent (all vertices used by faces coincide).
    """
    used = np.asarray(verts, dtype=np.float64)[np.unique(np.asarray(faces).reshape(-1))]
    offset = 0.5 * (used.min(axis=0) + used.max(axis=0))
    radius = float(np.linalg.norm(used - offset, axis=1).max())
    if not np.isfinite(radius) or radius <= 1e-12 * max(1.0, float(np.abs(offset).max())):
        raise MeshSDFError(f"mesh {name} has zero extent (all its vertices coincide); give a real mesh")
    return Normalization(offset=offset, scale=1.0 / (NORMALIZATION_BUFFER * radius))


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


def sample_points(verts: np.ndarray, faces: np.ndarray, n: int, rng: np.random.Generator) -> np.ndarray:
    """The ``SAMPLE_MIX`` query points around a normalised mesh: (n, 3) float64."""
    counts = [int(round(frac * n)) for frac, _ in SAMPLE_MIX]
    counts[0] += n - sum(counts)
    parts = []
    n_surface = sum(c for c, (_, std) in zip(counts, SAMPLE_MIX) if std is not None)
    surf = surface_points(verts, faces, n_surface, rng)
    start = 0
    for count, (_, std) in zip(counts, SAMPLE_MIX):
        if std is None:
            parts.append(rng.uniform(-1.0, 1.0, size=(count, 3)))
        else:
            parts.append(surf[start:start + count] + rng.normal(0.0, std, size=(count, 3)))
            start += count
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


def sample_sdf(verts: np.ndarray, faces: np.ndarray, n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """SDF samples of a (normalised) mesh split by sign.

    Returns ``pos`` (Np, 4) and ``neg`` (Nn, 4) float32 rows ``x y z sdf`` with sdf >= 0 in
    pos and sdf < 0 in neg, Np + Nn = n.
    """
    rng = np.random.default_rng(seed)
    pts = sample_points(verts, faces, n, rng)
    sdf = signed_distance(verts, faces, pts)
    return split_by_sign(np.concatenate([pts, sdf[:, None]], axis=1))


def split_by_sign(rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Split (N, 4) rows ``x y z sdf`` into float32 ``pos`` (sdf >= 0) and ``neg`` (sdf < 0)."""
    rows = np.asarray(rows, dtype=np.float32)
    inside = rows[:, 3] < 0
    return rows[~inside], rows[inside]


def write_sdf_samples(path: str | os.PathLike, pos: np.ndarray, neg: np.ndarray) -> None:
    """Write a DeepSDF samples file (``pos``, ``neg`` arrays) atomically, creating its folder."""
    from lib.io import atomic_write

    with atomic_write(path, suffix=".tmp.npz") as tmp:
        np.savez(tmp, pos=pos, neg=neg)


def prepare_mesh(verts: np.ndarray, faces: np.ndarray, out_root: str | os.PathLike, dataset: str,
                 instance: str, n_samples: int, seed: int = 0, name: str | None = None) -> dict:
    """Normalise one mesh, sample it and write the SPEC section 2 files atomically.

    Writes ``<out_root>/<dataset>/samples/<instance>.npz`` (pos, neg),
    ``samples/<instance>_normalization.npz`` (offset (3,), scale ()) and
    ``meshes/<instance>.obj`` (the normalised mesh, faces as given).  Returns a summary dict
    (instance, counts).  ``name`` is used in error messages (default: the instance).
    """
    from lib.io import atomic_write, write_obj

    name = name or instance
    verts = np.asarray(verts, dtype=np.float64)
    faces = np.asarray(faces, dtype=np.int64)
    validate_mesh(verts, faces, name)
    norm = normalization(verts, faces, name)
    nverts = norm.apply(verts)
    pos, neg = sample_sdf(nverts, faces, n_samples, seed)

    root = Path(out_root) / dataset
    write_sdf_samples(root / "samples" / f"{instance}.npz", pos, neg)
    with atomic_write(root / "samples" / f"{instance}_normalization.npz", suffix=".tmp.npz") as tmp:
        np.savez(tmp, offset=norm.offset, scale=np.float64(norm.scale))
    write_obj(root / "meshes" / f"{instance}.obj", nverts, faces)
    return {"instance": instance, "pos": len(pos), "neg": len(neg), "faces": len(faces)}


def read_normalization(path: str | os.PathLike) -> Normalization:
    """Load a ``<instance>_normalization.npz`` written by ``prepare_mesh``."""
    path = Path(path)
    try:
        with np.load(path) as z:
            return Normalization(offset=np.asarray(z["offset"], dtype=np.float64), scale=float(z["scale"]))
    except (OSError, KeyError, ValueError) as err:
        raise MeshSDFError(f"cannot read normalisation {path}: {err}") from None
