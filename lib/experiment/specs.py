"""specs.json: the schema of every key an experiment may hold, the original's defaults, validation.

One place answers "which keys exist and what do they default to": the DeepSDF / MeshSDF
auto-decoder keys (``DEEPSDF_KEYS``), the decoder's ``NetworkSpecs`` (``NETWORK_SPECS_KEYS``)
and the single-view-reconstruction additions (``SVR_KEYS``).  ``load_specs`` reads
``<exp>/specs.json`` and returns a copy with defaults filled in; a wrong type or range stops
with one line naming the file and key (MeshSDFError).  Absent keys take the original's
defaults, so the original's own specs files load unchanged.  A key nobody knows is not an
error (DeepSDF ignores unknown keys) but gets a one-line warning naming the closest known
key, so that a typo does not pass silently; it is then ignored.

Relative paths inside specs (``DataSource``, ``TrainSplit``, ``TestSplit``): ``load_specs``
takes one from the experiment folder when it exists there (a copied experiment with an
edited split uses its own); otherwise ``resolve_path`` resolves it against the current
working directory when it exists there, else against the repository root (the folder that
holds ``lib/``), where the original's ``splits/`` and ``data/`` live.
"""
from __future__ import annotations

import difflib
import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

from ..errors import MeshSDFError
from ..log import warning
from ..models.encoder import NORMALIZATIONS, block_layout
from ..models.kernels.elementwise import effective_dropout_prob

REPO_ROOT = Path(__file__).resolve().parents[2]

SPECS_FILE = "specs.json"

NETWORK_ARCHS = ("deep_sdf_decoder",)


@dataclass(frozen=True)
class Key:
    """One specs key: ``check(value) -> str | None`` returns what is wrong (None = fine)."""

    check: Callable[[Any], str | None]
    required: bool = False
    default: Any = None
    used: bool = True  # False: a known DeepSDF key this project accepts and ignores


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return (isinstance(v, (int, float)) and not isinstance(v, bool)) and math.isfinite(v)


def str_key(v):
    return None if isinstance(v, str) and v else "must be a non-empty string"


def int_key(minimum: int = 0):
    def check(v):
        return None if _is_int(v) and v >= minimum else f"must be an integer >= {minimum}"
    return check


def num_key(minimum: float = 0.0, strict: bool = False, maximum: float | None = None, nullable: bool = False):
    def check(v):
        if v is None and nullable:
            return None
        ok = _is_num(v) and (v > minimum if strict else v >= minimum) and (maximum is None or v < maximum)
        if ok:
            return None
        rng = f"{'>' if strict else '>='} {minimum}" + (f" and < {maximum}" if maximum is not None else "")
        return f"must be a number {rng}" + (" or null" if nullable else "")
    return check


def bool_key(v):
    return None if isinstance(v, bool) else "must be true or false"


def int_list_key(minimum: int = 0, nonempty: bool = False, nullable: bool = False):
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, list) and all(_is_int(i) and i >= minimum for i in v) and (v or not nonempty):
            return None
        return (f"must be a {'non-empty ' if nonempty else ''}list of integers >= {minimum}"
                + (" or null" if nullable else ""))
    return check


def _dropout_prob_key(v):
    if _is_num(v) and 0 <= v < 1 and effective_dropout_prob(v) < 1:
        return None
    return "must be a number >= 0 and <= 0.99998 (dropout masks resolve 1/65536 and cannot drop every unit)"


def _description_key(v):
    ok = isinstance(v, str) or (isinstance(v, list) and all(isinstance(s, str) for s in v))
    return None if ok else "must be a string or a list of strings"


def _arch_key(v):
    return None if v in NETWORK_ARCHS else f"must be one of {', '.join(NETWORK_ARCHS)}"


NETWORK_SPECS_KEYS: dict[str, Key] = {
    "dims": Key(int_list_key(1, nonempty=True), required=True),
    "dropout": Key(int_list_key(0, nullable=True), default=None),
    "dropout_prob": Key(_dropout_prob_key, default=0.0),
    "norm_layers": Key(int_list_key(0), default=[]),
    "latent_in": Key(int_list_key(0), default=[]),
    "xyz_in_all": Key(bool_key, default=False),
    "use_tanh": Key(bool_key, default=False),
    "latent_dropout": Key(bool_key, default=False),
    "weight_norm": Key(bool_key, default=False),
    "positional_encoding": Key(bool_key, default=False),
    "fourier_degree": Key(int_key(0), default=1),
}

SCHEDULE_TYPES = {
    "Step": ("Initial", "Interval", "Factor"),
    "Warmup": ("Initial", "Final", "Length"),
    "Constant": ("Value",),
}


def _schedule_problem(item) -> str | None:
    if not isinstance(item, dict) or item.get("Type") not in SCHEDULE_TYPES:
        return f"entries must be objects with \"Type\" one of {', '.join(SCHEDULE_TYPES)}"
    need = SCHEDULE_TYPES[item["Type"]]
    extra = sorted(set(item) - set(need) - {"Type"})
    if extra:
        return f"{item['Type']} schedule has unknown field {extra[0]!r} (fields: {', '.join(need)})"
    for f in need:
        if f not in item:
            return f"{item['Type']} schedule needs field {f!r}"
        if not _is_num(item[f]) or item[f] < 0:
            return f"{item['Type']} schedule field {f!r} must be a number >= 0"
    if item["Type"] == "Step" and item["Interval"] < 1:
        return "Step schedule field 'Interval' must be >= 1"
    return None


def schedule_list_key(count: int):
    def check(v):
        if not isinstance(v, list) or len(v) < count:
            return f"must be a list of {count} learning-rate schedules"
        for item in v:
            problem = _schedule_problem(item)
            if problem:
                return problem
        return None
    return check


def _network_specs_key(v):
    return None if isinstance(v, dict) else "must be an object of decoder options"


# Keys of DeepSDF / MeshSDF auto-decoder specs.  Scripts with more keys (train_svr.py)
# pass their own additions to load_specs(extra_keys=...).
DEEPSDF_KEYS: dict[str, Key] = {
    "Description": Key(_description_key, used=False),
    "DataSource": Key(str_key, required=True),
    "TrainSplit": Key(str_key, required=True),
    "TestSplit": Key(str_key, used=False),
    "NetworkArch": Key(_arch_key, default="deep_sdf_decoder"),
    "NetworkSpecs": Key(_network_specs_key, required=True),
    "CodeLength": Key(int_key(1), required=True),
    "NumEpochs": Key(int_key(1), required=True),
    # absent (the original bob_and_spot): no periodic snapshots, only ``latest`` and AdditionalSnapshots
    "SnapshotFrequency": Key(int_key(1), default=None),
    "AdditionalSnapshots": Key(int_list_key(1), default=[]),
    "LearningRateSchedule": Key(schedule_list_key(2), required=True),
    "SamplesPerScene": Key(int_key(2), required=True),
    "ScenesPerBatch": Key(int_key(1), required=True),
    "DataLoaderThreads": Key(int_key(0), default=1, used=False),
    "ClampingDistance": Key(num_key(0.0, strict=True), required=True),
    "CodeRegularization": Key(bool_key, default=True),
    "CodeRegularizationLambda": Key(num_key(0.0), default=1e-4),
    # read and ignored, as the original's trainers do, unless ApplyCodeBound (ours) asks for
    # DeepSDF's max-norm embedding
    "CodeBound": Key(num_key(0.0, strict=True, nullable=True), default=None),
    "ApplyCodeBound": Key(bool_key, default=False),
    "CodeInitStdDev": Key(num_key(0.0, strict=True), default=1.0),
    "GradientClipNorm": Key(num_key(0.0, strict=True, nullable=True), default=None),
    # epochs between writes of ``latest`` and Logs.pth (DeepSDF's default: every epoch)
    "LogFrequency": Key(int_key(1), default=1),
    "BatchSplit": Key(int_key(1), default=1, used=False),
}


def closest_key(name: str, known) -> str | None:
    """The known key most like ``name`` (difflib), or None when nothing is close."""
    close = difflib.get_close_matches(name, list(known), n=1, cutoff=0.6)
    if not close:  # case slips ("codelength") score low on the raw strings
        lower = {k.lower(): k for k in known}
        close = [lower[m] for m in difflib.get_close_matches(name.lower(), list(lower), n=1, cutoff=0.6)]
    return close[0] if close else None


def _validate(obj: Mapping, keys: Mapping[str, Key], where: str, prefix: str = "") -> dict:
    """Known keys checked and defaulted; unknown ones warned about (closest known key) and dropped."""
    out = {}
    for name in obj:
        if name not in keys:
            near = closest_key(str(name), keys)
            hint = f"did you mean \"{prefix}{near}\"?" if near else f"known: {', '.join(sorted(keys))}"
            warning(f"{where}: unknown key \"{prefix}{name}\" is ignored; {hint}")
    for name, key in keys.items():
        if name not in obj:
            if key.required:
                raise MeshSDFError(f"{where}: missing key \"{prefix}{name}\"; add it")
            out[name] = key.default
            continue
        problem = key.check(obj[name])
        if problem:
            raise MeshSDFError(f"{where}: key \"{prefix}{name}\" {problem}, got {json.dumps(obj[name])}")
        out[name] = obj[name]
    return out


def validate_specs(specs: Mapping, where: str = SPECS_FILE, extra_keys: Mapping[str, Key] | None = None) -> dict:
    """Check ``specs`` against the schema; return a copy with defaults filled in.

    Raises MeshSDFError naming ``where`` and the key for a missing or ill-typed key; an
    unknown key gets a warning naming the closest known one and is left out of the copy.
    """
    keys = dict(DEEPSDF_KEYS)
    keys.update(extra_keys or {})
    if not isinstance(specs, Mapping):
        raise MeshSDFError(f"{where}: must hold a JSON object of specs keys")
    if extra_keys is None:
        svr = [k for k in specs if k not in keys and k in {*SVR_KEYS, *ORIGINAL_SVR_KEYS}]
        if svr:
            raise MeshSDFError(f"{where}: key \"{svr[0]}\" belongs to a single-view reconstruction experiment; "
                               "run train_svr.py, reconstruct_svr.py or metrics_svr.py on it (train_deep_sdf.py "
                               "and demo_optimizer.py take DeepSDF experiments)")
    out = _validate(specs, keys, where)
    if "NetworkSpecs" in out and out["NetworkSpecs"] is not None:
        net = _validate(out["NetworkSpecs"], NETWORK_SPECS_KEYS, where, prefix="NetworkSpecs.")
        n_hidden = len(net["dims"])
        for k in ("dropout", "norm_layers", "latent_in"):
            bad = [i for i in (net[k] or []) if i > n_hidden]
            if bad:
                raise MeshSDFError(f"{where}: key \"NetworkSpecs.{k}\" lists layer {bad[0]} but dims has "
                                   f"only {n_hidden} hidden layers")
        out["NetworkSpecs"] = net
    return out


MAX_JSON_INTEGER = 2 ** 63  # larger integers fit no counter, size or seed of this project


class _JSONProblem(Exception):
    """Raised by read_json's hooks; the message becomes the MeshSDFError after the file name."""


def _unique_object(pairs: list) -> dict:
    seen = set()
    for key, _ in pairs:
        if key in seen:
            raise _JSONProblem(f"key \"{key}\" appears twice in one object; keep one")
        seen.add(key)
    return dict(pairs)


def _bounded_int(text: str) -> int:
    digits = text.lstrip("-")
    if len(digits) > 19 or abs(int(text)) >= MAX_JSON_INTEGER:
        shown = text if len(text) <= 24 else f"{text[:12]}...({len(digits)} digits)"
        raise _JSONProblem(f"integer {shown} is too large (at most {MAX_JSON_INTEGER - 1})")
    return int(text)


def read_json(path: str | os.PathLike):
    """The JSON value of a hand-edited file (specs, splits); MeshSDFError naming the file on any problem.

    UTF-8 (with or without a byte-order mark), UTF-16 and UTF-32 are read (as ``json.loads``
    detects them); a key repeated in one object, an integer beyond a signed 64-bit one and nesting
    deeper than Python's recursion limit are refused with one line.
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except IsADirectoryError:
        raise MeshSDFError(f"{path} is a folder, not a file; give the JSON file") from None
    except OSError as err:
        raise MeshSDFError(f"cannot read {path}: {err.strerror or err}") from None
    codec = json.detect_encoding(raw)  # UTF-8 (byte-order mark or not), UTF-16, UTF-32
    try:
        text = raw.decode(codec)
    except UnicodeDecodeError as err:
        raise MeshSDFError(f"{path} is not UTF-8 text (byte {err.start} is 0x{raw[err.start]:02x}); save it "
                           "as UTF-8") from None
    try:
        return json.loads(text, object_pairs_hook=_unique_object, parse_int=_bounded_int)
    except json.JSONDecodeError as err:
        raise MeshSDFError(f"{path}: invalid JSON at line {err.lineno} column {err.colno}: {err.msg}") from None
    except _JSONProblem as err:
        raise MeshSDFError(f"{path}: {err}") from None
    except RecursionError:
        raise MeshSDFError(f"{path}: nested too deeply (objects or lists inside each other thousands of "
                           "times); it is not a specs or split file") from None


PATH_KEYS = ("DataSource", "TrainSplit", "TestSplit")


def load_specs(exp_dir: str | os.PathLike, extra_keys: Mapping[str, Key] | None = None) -> dict:
    """Read and validate ``<exp_dir>/specs.json``; returns the specs with defaults filled in.

    A relative ``PATH_KEYS`` value that exists inside ``exp_dir`` is replaced by that path
    (the experiment's own file wins); other relative paths are left for ``resolve_path``.
    """
    exp_dir = Path(exp_dir)
    path = exp_dir / SPECS_FILE
    if not exp_dir.is_dir():
        raise MeshSDFError(f"experiment folder not found: {exp_dir}; give -e a folder that holds {SPECS_FILE}")
    if path.is_dir():
        raise MeshSDFError(f"{path} is a folder, not a file; {SPECS_FILE} must be the experiment's JSON file")
    if not path.is_file():
        raise MeshSDFError(f"no {SPECS_FILE} in {exp_dir}; give -e the experiment folder that holds it")
    specs = read_json(path)
    out = validate_specs(specs, where=str(path), extra_keys=extra_keys)
    for key in PATH_KEYS:
        value = out.get(key)
        if (isinstance(value, str) and value and not Path(value).expanduser().is_absolute()
                and (exp_dir / value).exists()):
            out[key] = str(exp_dir / value)
    return out


# --------------------------------------------------------------------------- single-view reconstruction

EXTRACTION_MODES = ("dense", "fast", "sparse")


def _depth_key(v):
    if not _is_int(v):
        return "must be an integer 6n + 2 (e.g. 20; Bottleneck blocks from 44 on)"
    try:
        block_layout(v)
    except ValueError as err:
        return str(err).replace(f"encoder Depth {v} ", "")
    return None


def _norm_type_key(v):
    return _choice_key(NORMALIZATIONS)(v)


def _widths_key(v):
    ok = isinstance(v, list) and len(v) == 4 and all(_is_int(w) and w >= 1 for w in v)
    return None if ok else "must be a list of 4 positive integers (channels of layer1 .. layer4)"


def _nullable_str_key(v):
    return None if v is None or (isinstance(v, str) and v) else "must be a non-empty string or null"


def _choice_key(choices):
    def check(v):
        return None if v in choices else f"must be one of {', '.join(json.dumps(c) for c in choices)}"
    return check


def _template_key(nullable: bool):
    def check(v):
        if v is None and nullable:
            return None
        if isinstance(v, str) and "{instance}" in v:
            return None
        return "must be a path template containing {instance}" + (" or null" if nullable else "")
    return check


# Keys that only the original's SVR specs hold (cars_svr / chairs_svr): they tell an SVR
# experiment given to a DeepSDF script.
ORIGINAL_SVR_KEYS = ("NetworkEncoder", "NetworkDecoder", "NormType", "Depth", "AugmentData", "NumberOfViews",
                     "TestSplit")

# Keys of an SVR experiment added to (or overriding) DEEPSDF_KEYS.  The first group are the
# original's cars_svr / chairs_svr keys, with its defaults; the rest are this project's options.
SVR_KEYS: dict[str, Key] = {
    "NetworkArch": Key(_arch_key, default="deep_sdf_decoder"),      # the original's SVR specs have none
    "NetworkEncoder": Key(_choice_key(("encoder",)), default="encoder"),
    "NetworkDecoder": Key(_choice_key(("decoder",)), default="decoder"),
    "NormType": Key(_norm_type_key, default="in"),
    "Depth": Key(_depth_key, default=20),
    "NumberOfViews": Key(int_key(1), default=16),
    # the original reads it but its cars/chairs specs keep it false; accepted, not used
    "AugmentData": Key(bool_key, default=False, used=False),
    "TestSplit": Key(str_key, default=None),
    # [decoder schedule, encoder schedule], as the original applies them every epoch; one
    # entry serves both groups
    "LearningRateSchedule": Key(schedule_list_key(1), required=True),
    # ours, opt-in: decoder rate = encoder schedule x this factor (the original's code builds
    # the decoder group at a tenth of the encoder's rate, then its schedule overwrites it)
    "DecoderLearningRateFactor": Key(num_key(0.0, strict=True, nullable=True), default=None),
    # ours: an experiment folder (e.g. a DeepSDF auto-decoder trained on the same shapes)
    # whose ModelParameters/latest.pth starts the decoder; null: from scratch
    "DecoderInit": Key(_nullable_str_key, default=None),
    "ValidationSplit": Key(str_key, default=None),
    # null (the original, which never resizes): the renders' own size; a number resizes them to it
    "ImageSize": Key(lambda v: None if v is None else int_key(16)(v), default=None),
    "EncoderWidths": Key(_widths_key, default=[64, 128, 256, 256]),
    "RendersPath": Key(_template_key(False), default="{dataset}/renders/{instance}"),
    "MeshesPath": Key(_template_key(False), default="{dataset}/meshes/{instance}.obj"),
    # null (the original): samples, meshes and renders share one frame
    "NormalizationPath": Key(_template_key(True), default=None),
    "ReconstructionResolution": Key(int_key(8), default=256),
    "ExtractionMode": Key(_choice_key(EXTRACTION_MODES), default="fast"),
    "RefinementIterations": Key(int_key(0), default=100),
    "RefinementLearningRate": Key(num_key(0.0, strict=True), default=5e-5),
    "SilhouetteSigma": Key(num_key(0.0), default=1e-4),
    # the soft rasteriser's blur radius is sigma x this factor: the original rasterises with
    # log(1/1e-4 - 1) x 1e-5, a tenth of its shader's sigma (1e-4) in blur terms
    "BlurSigmaRatio": Key(num_key(0.0, strict=True), default=0.1),
    "SilhouetteFacesPerPixel": Key(int_key(1), default=25),
    "ChamferSamples": Key(int_key(100), default=10000),
}


def load_svr_specs(exp_dir: str | os.PathLike) -> dict:
    """``<exp_dir>/specs.json`` validated with the SVR keys (``SVR_KEYS`` over ``DEEPSDF_KEYS``)."""
    specs = load_specs(exp_dir, extra_keys=SVR_KEYS)
    if len(specs["LearningRateSchedule"]) > 2:
        raise MeshSDFError(f"{Path(exp_dir) / SPECS_FILE}: key \"LearningRateSchedule\" holds "
                           f"{len(specs['LearningRateSchedule'])} schedules; an SVR experiment takes "
                           "[decoder, encoder] (or one for both)")
    return specs


def resolve_path(path: str | os.PathLike) -> Path:
    """A specs path: absolute as is; relative against the cwd if it exists there, else the repo root."""
    p = Path(path).expanduser()
    if p.is_absolute() or p.exists():
        return p
    return REPO_ROOT / p


