"""Analytic signed distance functions in torch, composable into shapes, and built-in stand-ins.

A ``Shape`` is a callable mapping points (P, 3) float tensor -> SDF values (P,) of the same
dtype and device (SDF > 0 outside, < 0 inside, in the units of the points).  Primitives are
built by functions (``sphere``, ``box``, ...), combined by boolean operators (``|`` union,
``&`` intersection, ``-`` subtraction, and the ``smooth_*`` variants with a blend radius k)
and moved with transforms (``translate``, ``rotate``, ``scale``, ``mirror``, ``elongate``,
``round``); every operation returns a new ``Shape``, so shape families (toy cars, ...) are
plain Python functions of their parameters.

Exactness: sphere, box, rounded box, capsule, cylinder, torus, half-space and the rigid
transforms / uniform scale / mirror / elongate / round are exact distances.  Boolean and
smooth operators give the right sign and zero level set but only a bound on the distance
away from it; ``ellipsoid`` is a first-order approximation.  The data pipeline therefore
never samples these functions directly: ``mesh_shape`` meshes the zero level set and
``lib.datasets.sampling`` computes exact distances to that mesh.

Built-in stand-ins for the paper's toy dataset (``BUILTIN``): ``bob`` (a rubber-duck ring,
genus 1, ring in the x-z plane with its hole along +y, head and beak towards -x) and ``spot``
(a cow, genus 0, y up, head towards -z as in Keenan Crane's spot.obj).  Both fit inside
[-1, 1]^3 with a margin.  ``ORIGINAL_TURN_Y`` says how the original turned them for its data.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
from ..isosurface import extract_dense

Vec3 = Sequence[float]


def _t(x, like: torch.Tensor) -> torch.Tensor:
    """Parameter ``x`` as a tensor with the dtype and device of ``like``."""
    return torch.as_tensor(x, dtype=like.dtype, device=like.device)


class Shape:
    """An SDF: ``shape(points (P, 3)) -> (P,)``, with composition and transform methods."""

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], name: str = "shape"):
        self.fn = fn
        self.name = name

    def __call__(self, p: torch.Tensor) -> torch.Tensor:
        return self.fn(p)

    def __repr__(self) -> str:
        return f"Shape({self.name})"

    # booleans -------------------------------------------------------------------------
    def __or__(self, other: "Shape") -> "Shape":
        return union(self, other)

    def __and__(self, other: "Shape") -> "Shape":
        return intersection(self, other)

    def __sub__(self, other: "Shape") -> "Shape":
        return subtraction(self, other)

    # transforms -----------------------------------------------------------------------
    def translate(self, offset: Vec3) -> "Shape":
        """The shape moved by ``offset`` (3,)."""
        return Shape(lambda p: self.fn(p - _t(offset, p)), f"{self.name}+t")

    def rotate(self, matrix) -> "Shape":
        """The shape rotated by the 3x3 rotation ``matrix`` (about the origin): x -> R x."""
        def fn(p):
            return self.fn(p @ _t(matrix, p))  # R^T p for row vectors is p @ R
        return Shape(fn, f"{self.name}*R")

    def scale(self, factor: float) -> "Shape":
        """The shape scaled uniformly by ``factor`` (> 0) about the origin; stays exact."""
        return Shape(lambda p: self.fn(p / factor) * factor, f"{self.name}*s")

    def mirror(self, axis: int) -> "Shape":
        """The shape's half with coordinate ``axis`` >= 0, reflected onto the other side.

        Build one side (e.g. a wheel or a leg at +x) and mirror it to get a symmetric pair.
        """
        def fn(p):
            q = p.clone()
            q[:, axis] = q[:, axis].abs()
            return self.fn(q)
        return Shape(fn, f"{self.name}|m{axis}")

    def elongate(self, half: Vec3) -> "Shape":
        """Stretch the shape by inserting a slab of half-extents ``half`` (3,) at the origin."""
        def fn(p):
            h = _t(half, p)
            return self.fn(p - p.clamp(-h, h))
        return Shape(fn, f"{self.name}~e")

    def round(self, radius: float) -> "Shape":
        """The shape offset outwards by ``radius`` (rounds edges, grows by ``radius``)."""
        return Shape(lambda p: self.fn(p) - radius, f"{self.name}~r")


# --- primitives (all centred at the origin unless a centre is given) ------------------

def sphere(radius: float, center: Vec3 = (0.0, 0.0, 0.0)) -> Shape:
    def fn(p):
        return (p - _t(center, p)).norm(dim=-1) - radius
    return Shape(fn, "sphere")


def box(half: Vec3) -> Shape:
    """Axis-aligned box with half-extents ``half`` (3,); exact distance."""
    def fn(p):
        q = p.abs() - _t(half, p)
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    return Shape(fn, "box")


def rounded_box(half: Vec3, radius: float) -> Shape:
    """Box with outer half-extents ``half`` and edges/corners rounded by ``radius``."""
    if radius > min(half):
        raise ValueError("rounded_box radius must not exceed the smallest half-extent")
    inner = [h - radius for h in half]
    return box(inner).round(radius)


def capsule(a: Vec3, b: Vec3, radius: float) -> Shape:
    """Points within ``radius`` of the segment from ``a`` to ``b``; exact distance."""
    def fn(p):
        at, bt = _t(a, p), _t(b, p)
        ab = bt - at
        ap = p - at
        h = ((ap @ ab) / (ab @ ab).clamp(min=1e-12)).clamp(0.0, 1.0)
        return (ap - h[:, None] * ab).norm(dim=-1) - radius
    return Shape(fn, "capsule")


def cylinder(radius: float, half_height: float, axis: int = 1) -> Shape:
    """Capped cylinder around coordinate ``axis`` (0 x, 1 y, 2 z), flat ends; exact distance."""
    others = [i for i in range(3) if i != axis]

    def fn(p):
        r = p[:, others].norm(dim=-1) - radius
        h = p[:, axis].abs() - half_height
        q = torch.stack([r, h], dim=-1)
        return q.clamp(min=0).norm(dim=-1) + q.max(dim=-1).values.clamp(max=0)
    return Shape(fn, "cylinder")


def torus(major: float, minor: float) -> Shape:
    """Ring in the x-z plane (hole along y): tube radius ``minor`` at distance ``major``."""
    def fn(p):
        ring = p[:, [0, 2]].norm(dim=-1) - major
        return torch.stack([ring, p[:, 1]], dim=-1).norm(dim=-1) - minor
    return Shape(fn, "torus")


def ellipsoid(radii: Vec3) -> Shape:
    """Axis-aligned ellipsoid with semi-axes ``radii`` (3,).

    Not an exact distance (none in closed form): k0 (k0 - 1) / k1 with k0 = |p / r| and
    k1 = |p / r^2|, exact on the surface to first order, right sign everywhere.
    """
    def fn(p):
        r = _t(radii, p)
        k0 = (p / r).norm(dim=-1)
        k1 = (p / (r * r)).norm(dim=-1).clamp(min=1e-12)
        return k0 * (k0 - 1.0) / k1
    return Shape(fn, "ellipsoid")


def halfspace(normal: Vec3, offset: float = 0.0) -> Shape:
    """Points with n . p <= offset (``normal`` is normalised); exact distance to the plane."""
    n = torch.as_tensor(normal, dtype=torch.float64)
    n = (n / n.norm()).tolist()
    return Shape(lambda p: p @ _t(n, p) - offset, "halfspace")


# --- booleans --------------------------------------------------------------------------

def union(*shapes: Shape) -> Shape:
    def fn(p):
        return torch.stack([s(p) for s in shapes], dim=0).min(dim=0).values
    return Shape(fn, "union")


def intersection(*shapes: Shape) -> Shape:
    def fn(p):
        return torch.stack([s(p) for s in shapes], dim=0).max(dim=0).values
    return Shape(fn, "intersection")


def subtraction(a: Shape, b: Shape) -> Shape:
    """``a`` with ``b`` carved out."""
    return Shape(lambda p: torch.maximum(a(p), -b(p)), "subtraction")


def _smin(d1: torch.Tensor, d2: torch.Tensor, k: float) -> torch.Tensor:
    """Polynomial smooth minimum: equals min(d1, d2) where |d1 - d2| >= k."""
    if k <= 0:
        return torch.minimum(d1, d2)
    h = (0.5 + 0.5 * (d2 - d1) / k).clamp(0.0, 1.0)
    return torch.lerp(d2, d1, h) - k * h * (1.0 - h)


def smooth_union(a: Shape, b: Shape, k: float) -> Shape:
    """Union of ``a`` and ``b`` with a fillet of size about ``k`` where they meet."""
    return Shape(lambda p: _smin(a(p), b(p), k), "smooth_union")


def smooth_intersection(a: Shape, b: Shape, k: float) -> Shape:
    return Shape(lambda p: -_smin(-a(p), -b(p), k), "smooth_intersection")


def smooth_subtraction(a: Shape, b: Shape, k: float) -> Shape:
    """``a`` with ``b`` carved out, the cut edge rounded by about ``k``."""
    return Shape(lambda p: -_smin(-a(p), b(p), k), "smooth_subtraction")


def smooth_union_all(shapes: Sequence[Shape], k: float) -> Shape:
    """Left fold of ``smooth_union`` over ``shapes`` with one blend size ``k``."""
    out = shapes[0]
    for s in shapes[1:]:
        out = smooth_union(out, s, k)
    return out


def rotation(axis: Vec3, degrees: float) -> torch.Tensor:
    """3x3 float64 rotation matrix about ``axis`` by ``degrees`` (right hand rule)."""
    a = torch.as_tensor(axis, dtype=torch.float64)
    x, y, z = (a / a.norm()).tolist()
    t = math.radians(degrees)
    c, s, C = math.cos(t), math.sin(t), 1.0 - math.cos(t)
    return torch.tensor([[c + x * x * C, x * y * C - z * s, x * z * C + y * s],
                         [y * x * C + z * s, c + y * y * C, y * z * C - x * s],
                         [z * x * C - y * s, z * y * C + x * s, c + z * z * C]], dtype=torch.float64)


# --- built-in stand-ins for the toy dataset --------------------------------------------

def bob() -> Shape:
    """Rubber-duck ring of genus 1 (stand-in for Keenan Crane's "bob").

    An oval inner tube in the x-z plane (hole along +y, wide enough to be seen through from
    the demo camera at elevation 30 degrees), a head with a beak on a neck at -x and a
    raised tail at +x.  Every part is at least 0.1 thick.
    """
    body = torus(0.47, 0.21).elongate((0.06, 0.0, 0.0)).translate((0.02, -0.26, 0.0))
    neck = capsule((-0.50, -0.20, 0.0), (-0.56, 0.12, 0.0), 0.15)
    head = sphere(0.2, (-0.57, 0.22, 0.0))
    beak = ellipsoid((0.13, 0.055, 0.1)).translate((-0.78, 0.18, 0.0))
    tail = capsule((0.60, -0.22, 0.0), (0.80, 0.04, 0.0), 0.08)
    duck = smooth_union(body, neck, 0.08)
    duck = smooth_union(duck, head, 0.06)
    duck = smooth_union(duck, beak, 0.03)
    duck = smooth_union(duck, tail, 0.08)
    return Shape(duck.fn, "bob")


def spot() -> Shape:
    """Cow of genus 0 (stand-in for Keenan Crane's "spot"): y up, head towards -z as in spot.obj.

    Rounded-box body on four capsule legs, a neck, a head with a muzzle, two ears and two
    horns; every part is at least 0.1 thick and the legs stay apart.
    """
    body = rounded_box((0.30, 0.27, 0.44), 0.18).translate((0.0, -0.04, -0.14))
    leg = capsule((0.17, -0.20, 0.0), (0.17, -0.62, 0.0), 0.1)
    legs = union(leg.translate((0.0, 0.0, 0.12)), leg.translate((0.0, 0.0, -0.40))).mirror(0)
    neck = capsule((0.0, 0.02, 0.16), (0.0, 0.30, 0.42), 0.18)
    head = ellipsoid((0.23, 0.23, 0.25)).translate((0.0, 0.40, 0.50))
    muzzle = ellipsoid((0.19, 0.15, 0.13)).translate((0.0, 0.30, 0.72))
    ear = capsule((0.16, 0.50, 0.46), (0.36, 0.52, 0.44), 0.055).mirror(0)
    horn = capsule((0.10, 0.56, 0.48), (0.15, 0.72, 0.49), 0.05).mirror(0)
    cow = smooth_union(body, legs, 0.06)
    cow = smooth_union(cow, neck, 0.08)
    cow = smooth_union(cow, head, 0.06)
    cow = smooth_union(cow, muzzle, 0.05)
    cow = smooth_union(cow, ear, 0.03)
    cow = smooth_union(cow, horn, 0.03)
    # modelled head towards +z; turned to face -z like spot.obj
    return Shape(cow.rotate(rotation((0, 1, 0), 180)).fn, "spot")


BUILTIN: dict[str, Callable[[], Shape]] = {"bob": bob, "spot": spot}
BUILTIN_DATASETS: dict[str, list[str]] = {"bob_and_spot": ["bob", "spot"]}
# Degrees about +y by which the original turned Keenan Crane's meshes before normalising them
# for its bob_and_spot data (docs/data.md): spot's head then points to -x.  prepare_data.py applies
# it to the stand-ins, and to real meshes with --rotate-y spot=90.
ORIGINAL_TURN_Y: dict[str, float] = {"spot": 90.0}


def mesh_shape(shape: Shape, resolution: int = 192, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesh the zero level set of ``shape`` over [-1, 1]^3 (``lib.isosurface`` grid).

    Returns verts (V, 3) float32 and faces (F, 3) int64 CPU tensors, closed and outward
    wound when the shape lies strictly inside the box.
    """
    return extract_dense(shape, resolution, device=device)


# --- toy cars: a procedural family for single-view reconstruction ----------------------

TOY_CARS_DEFAULT_COUNT = 40
TOY_CAR_PREFIX = "car_"


def toy_car_params(index: int, family_seed: int = 0) -> dict:
    """The proportions of toy car ``index`` (deterministic in ``index`` and ``family_seed``).

    Units are those of a ShapeNet car (bounding-box diagonal about 1, y up, length along
    z, ground below): half-length, half-width, body half-height, ground clearance, cabin
    half-length / half-height / width fraction / offset along z, wheel radius and half
    width, corner rounding, and an RGB paint colour (for renders only).
    """
    import numpy as np

    rng = np.random.default_rng([int(family_seed), int(index), 0x5CA5])
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    length = u(0.36, 0.47)
    body_h = u(0.06, 0.10)
    return {
        "length": length,
        "width": u(0.16, 0.22),
        "body_height": body_h,
        "clearance": u(0.035, 0.07),
        "cabin_length": length * u(0.35, 0.6),
        "cabin_height": u(0.05, 0.10),
        "cabin_width": u(0.72, 0.92),
        "cabin_offset": length * u(-0.25, 0.15),
        "wheel_radius": u(0.065, 0.095),
        "wheel_width": u(0.025, 0.04),
        "rounding": body_h * u(0.3, 0.6),
        "color": [u(0.2, 0.95), u(0.2, 0.95), u(0.2, 0.95)],
    }


def toy_car(index: int = 0, family_seed: int = 0, params: dict | None = None) -> Shape:
    """A toy car: a rounded body, a rounded cabin blended on top, four wheels.

    ``params`` (see ``toy_car_params``) overrides the proportions drawn for ``index``.
    The car stands on the plane y = -(body_height + clearance), is centred in x and z,
    and fits in the ball of radius 0.6 (wheels are cylinders along x, mirrored to the four
    corners).  Genus 0 and one connected piece: the wheels cut into the body.
    """
    p = dict(params) if params is not None else toy_car_params(index, family_seed)
    L, W, hb, c = p["length"], p["width"], p["body_height"], p["clearance"]
    r, ww = p["wheel_radius"], p["wheel_width"]
    body = rounded_box((W, hb, L), min(p["rounding"], hb * 0.9, W * 0.9))
    hc, lc = p["cabin_height"], p["cabin_length"]
    wc = W * p["cabin_width"]
    cabin = rounded_box((wc, hc, lc), min(0.6 * hc, 0.5 * wc, 0.5 * lc))
    cabin = cabin.translate((0.0, hb + hc * 0.8, p["cabin_offset"]))
    ground = -(hb + c)
    # wheel centres: touching the ground, inset at the corners so they overlap the body
    wheel = cylinder(r, ww, axis=0).translate((W - 0.6 * ww, ground + r, L - r - 0.04))
    car = union(smooth_union(body, cabin, 0.03), wheel.mirror(0).mirror(2))
    return Shape(car.fn, f"toy_car_{index}")


def toy_car_names(count: int = TOY_CARS_DEFAULT_COUNT) -> list[str]:
    """Instance names of the first ``count`` toy cars: car_000, car_001, ..."""
    return [f"{TOY_CAR_PREFIX}{i:03d}" for i in range(int(count))]


BUILTIN_DATASETS["toy_cars"] = toy_car_names()


# --- toy chairs: a procedural family whose genus varies ------------------------------

TOY_CHAIRS_DEFAULT_COUNT = 40
TOY_CHAIR_PREFIX = "chair_"
CHAIR_BACKS = ("solid", "hollow", "slats")


def toy_chair_params(index: int, family_seed: int = 0) -> dict:
    """The design of toy chair ``index`` (deterministic in ``index`` and ``family_seed``).

    ShapeNet-like units (y up, the back towards -z, radius under 0.55): seat half-width /
    half-depth / half-thickness, leg height and half-size, back height and half-thickness,
    back style ("solid" panel, "hollow" frame, or "slats": ``slats`` vertical bars between
    two posts under a top rail), ``arms`` (armrests on posts), ``stretchers`` (a bar between
    the front and back leg of each side), and an RGB colour (renders only).
    """
    import numpy as np

    rng = np.random.default_rng([int(family_seed), int(index), 0xC4A1])
    u = lambda lo, hi: float(rng.uniform(lo, hi))  # noqa: E731
    back = CHAIR_BACKS[int(rng.integers(len(CHAIR_BACKS)))]
    return {
        "seat_width": u(0.19, 0.26),
        "seat_depth": u(0.17, 0.23),
        "seat_thickness": u(0.025, 0.04),
        "leg_height": u(0.22, 0.30),
        "leg_size": u(0.02, 0.03),
        "back_height": u(0.24, 0.34),
        "back_thickness": u(0.02, 0.03),
        "back": back,
        "slats": int(rng.integers(1, 4)) if back == "slats" else 0,
        "arms": bool(rng.random() < 0.35),
        "stretchers": bool(rng.random() < 0.35),
        "color": [u(0.2, 0.95), u(0.2, 0.95), u(0.2, 0.95)],
    }


def toy_chair_genus(params: dict) -> int:
    """The genus a chair of ``params`` has: one hole per opening of the back (hollow: 1, slats:
    slats + 1), one per armrest loop (2 with arms) and one per side stretcher (2)."""
    back = {"solid": 0, "hollow": 1, "slats": params["slats"] + 1}[params["back"]]
    return back + 2 * int(params["arms"]) + 2 * int(params["stretchers"])


def toy_chair(index: int = 0, family_seed: int = 0, params: dict | None = None) -> Shape:
    """A toy chair: a seat on four legs, a back, optional armrests and side stretchers (boxes).

    ``params`` (see ``toy_chair_params``) overrides the design drawn for ``index``.  One
    connected piece, centred vertically at the origin; its genus is ``toy_chair_genus``.
    """
    p = dict(params) if params is not None else toy_chair_params(index, family_seed)
    W, D, T = p["seat_width"], p["seat_depth"], p["seat_thickness"]
    H, ls, hb, bt = p["leg_height"], p["leg_size"], p["back_height"], p["back_thickness"]
    parts = [box((W, T, D))]                                              # seat: y in [-T, T]
    leg = box((ls, H / 2, ls)).translate((W - ls, -T - H / 2, D - ls))
    parts.append(leg.mirror(0).mirror(2))
    zb = -D + bt                                                         # the back's plane
    top = T + hb                                                         # top of the back
    post = bt * 1.2
    if p["back"] == "solid":
        parts.append(box((W, hb / 2, bt)).translate((0.0, T + hb / 2, zb)))
    else:
        # two side posts and a top rail; openings reach down to the seat
        parts.append(box((post, hb / 2, bt)).translate((W - post, T + hb / 2, zb)).mirror(0))
        rail = 0.035
        parts.append(box((W, rail, bt)).translate((0.0, top - rail, zb)))
        k = p["slats"]
        if k:
            inner = W - 2 * post                        # half-width of the space between the posts
            sw = min(0.018, 0.3 * inner / k)             # slat half-width
            for i in range(k):
                x = -inner + (2 * i + 1) * inner / k
                parts.append(box((sw, hb / 2, bt * 0.8)).translate((x, T + hb / 2, zb)))
    if p["arms"]:
        ha, a = 0.55 * hb, 0.018
        bar = box((a, a, D - bt)).translate((W - post, T + ha, 0.0))
        front = box((a, ha / 2, a)).translate((W - post, T + ha / 2, D - 2 * a))
        parts.append((bar | front).mirror(0))
    if p["stretchers"]:
        ys = -T - 0.55 * H
        parts.append(box((ls * 0.7, ls * 0.7, D - ls)).translate((W - ls, ys, 0.0)).mirror(0))
    chair = union(*parts).translate((0.0, -(top - T - H) / 2, 0.0))
    return Shape(chair.fn, f"toy_chair_{index}")


def toy_chair_names(count: int = TOY_CHAIRS_DEFAULT_COUNT) -> list[str]:
    """Instance names of the first ``count`` toy chairs: chair_000, chair_001, ..."""
    return [f"{TOY_CHAIR_PREFIX}{i:03d}" for i in range(int(count))]


BUILTIN_DATASETS["toy_chairs"] = toy_chair_names()
# Built-in datasets whose instance count is a choice (prepare_data.py --count).
COUNTABLE_DATASETS: dict[str, Callable[[int], list[str]]] = {"toy_cars": toy_car_names, "toy_chairs": toy_chair_names}
# procedural families: name prefix -> (shape of index, parameters of index)
_FAMILIES = {TOY_CAR_PREFIX: (toy_car, toy_car_params), TOY_CHAIR_PREFIX: (toy_chair, toy_chair_params)}


def _family_member(name: str):
    for prefix, fns in _FAMILIES.items():
        if name.startswith(prefix) and name[len(prefix):].isdigit():
            return fns, int(name[len(prefix):])
    return None, None


def builtin_shape(name: str) -> Shape:
    """The built-in shape called ``name``: an entry of ``BUILTIN``, a toy car ``car_NNN`` or a toy
    chair ``chair_NNN``."""
    if name in BUILTIN:
        return BUILTIN[name]()
    fns, index = _family_member(name)
    if fns is not None:
        return fns[0](index)
    raise KeyError(f"unknown built-in shape {name!r}")


def builtin_color(name: str) -> tuple[float, float, float]:
    """Paint colour (RGB in [0, 1]) used to render built-in shape ``name``."""
    fns, index = _family_member(name)
    if fns is not None:
        return tuple(fns[1](index)["color"])
    return (0.8, 0.8, 0.8)


# toy cars are modelled at ShapeNet scale (radius about 0.5); they are meshed enlarged by
# this factor so that the [-1, 1]^3 grid is used fully, then scaled back
_TOY_CAR_MESH_ZOOM = 1.8


def mesh_builtin(name: str, resolution: int = 192, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Mesh of built-in shape ``name`` in its own frame: verts (V, 3) float32, faces (F, 3) int64 (CPU).

    bob and spot: ``mesh_shape``; toy cars and chairs: enlarged to fill the grid, meshed,
    scaled back (ShapeNet-like units).
    """
    shape = builtin_shape(name)
    if name in BUILTIN:
        return mesh_shape(shape, resolution, device)
    v, f = mesh_shape(shape.scale(_TOY_CAR_MESH_ZOOM), resolution, device)
    return v / _TOY_CAR_MESH_ZOOM, f
