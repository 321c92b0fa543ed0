"""Make DeepSDF training data (SDF samples, normalised meshes, split file) from meshes.

    python prepare_data.py --builtin bob_and_spot              # the toy dataset, no download
    python prepare_data.py --builtin toy_cars --count 40       # toy cars with RGBA renders (SVR)
    python prepare_data.py --builtin toy_chairs --count 40     # toy chairs (genus 0 to 8) with renders
    python prepare_data.py --mesh a.obj b.ply --dataset mine   # any triangle meshes
    python prepare_data.py --mesh bob.obj spot.obj --dataset bob_and_spot --rotate-y spot=90
                                                               # Keenan Crane's meshes as the original's data

Writes, under <out>/<dataset>/ (docs/data.md):
    samples/<inst>.npz                 pos, neg: (N, 4) float32 rows x y z sdf (sdf > 0 outside)
    samples/<inst>_normalization.npz   offset (3,), scale: normalised = (original + offset) * scale (DeepSDF's)
    meshes/<inst>.obj                  the normalised mesh
    split.json                         {"<dataset>": {"samples": [<inst>, ...]}}
and with renders (--views N > 0; the default for the toy families), DISN's layout:
    renders/<inst>/NN.png              RGBA, anti-aliased, straight alpha = coverage
    renders/<inst>/rendering_metadata.txt   one bracketed DISN line per view
    split_train.json, split_val.json, split_test.json
                                       the last --test-count instances are the test split,
                                       the --val-count before them the validation split
Samples: by default DeepSDF's preprocessor mix (--sample-mix deepsdf: 47/50 near the surface,
each surface point perturbed by noise of variance 0.005 and 0.0005, 3/50 uniform in [-1, 1]^3);
--sample-mix paper takes the DeepSDF paper's variances 0.0025 / 0.00025 and 5 % uniform.
--rotate-y INSTANCE=DEGREES turns a mesh about +y before it is normalised; the built-in
bob_and_spot stand-ins are turned as the original turned Keenan Crane's (spot by +90 degrees).
Renders are made of the normalised mesh from random DISN cameras, so samples, meshes and
renders share one frame as in the original's SVR data (no normalisation file is needed).
Every file is written atomically; all inputs are checked before anything is written; an existing
<out>/<dataset>/ is never written into (experiments were trained on it): give a new name.
"""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse
import json
import re
import signal
import sys
import tempfile
import threading
from multiprocessing import active_children, get_context
from pathlib import Path

from lib.errors import MeshSDFError

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def _names(names) -> str:
    """Instance names for --help: all of a short list, the ends of a long one."""
    names = list(names)
    return ", ".join(names) if len(names) <= 4 else f"{names[0]}, {names[1]}, ..., {names[-1]}: {len(names)} shapes"


def parse_args(argv=None) -> argparse.Namespace:
    from lib.datasets.sampling import DEFAULT_SAMPLE_MIX, SAMPLE_MIXES
    from lib.datasets.shapes import BUILTIN_DATASETS, TOY_CARS_DEFAULT_COUNT

    ap = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Sample signed distances around meshes (DeepSDF format) for training.",
        epilog="Built-in datasets are procedural stand-ins made from analytic SDFs: "
               + ", ".join(f"{k} ({_names(v)})" for k, v in BUILTIN_DATASETS.items()) + ".")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--mesh", nargs="+", metavar="FILE",
                     help="triangle meshes (OBJ/PLY/OFF/STL...); instance name = file stem")
    src.add_argument("--builtin", choices=sorted(BUILTIN_DATASETS),
                     help="generate a built-in dataset (no download)")
    ap.add_argument("--dataset", help="dataset name, a new folder under --out (required with --mesh; default: the "
                                      "builtin's name)")
    ap.add_argument("--out", default="data", help="output root folder (default: data)")
    ap.add_argument("--samples", type=int, default=500_000, help="SDF samples per mesh (default 500000)")
    ap.add_argument("--sample-mix", choices=sorted(SAMPLE_MIXES), default=DEFAULT_SAMPLE_MIX,
                    help="near-surface noise and uniform share: deepsdf (default; DeepSDF's preprocessor, which "
                         "made the original's data: variances 0.005 / 0.0005, 3/50 uniform) or paper (the DeepSDF "
                         "paper's text: 0.0025 / 0.00025, 5 %% uniform)")
    ap.add_argument("--rotate-y", action="append", default=[], metavar="INSTANCE=DEGREES",
                    help="turn mesh INSTANCE (file stem) by DEGREES about +y before normalising it (repeatable); "
                         "the original's bob_and_spot data has spot turned: --rotate-y spot=90.  Its "
                         "normalisation file then maps to the turned mesh.  The built-in bob_and_spot is turned "
                         "so already")
    ap.add_argument("--workers", type=int, default=1, help="meshes processed in parallel (default 1)")
    cli.add_seed(ap)
    ap.add_argument("--resolution", type=int, default=192,
                    help="marching-cubes grid used to mesh built-in shapes (default 192)")
    ap.add_argument("--count", type=int, default=None,
                    help="number of instances of a procedural family (toy_cars, toy_chairs; default "
                         f"{TOY_CARS_DEFAULT_COUNT})")
    ap.add_argument("--views", type=int, default=None,
                    help="RGBA renders per instance in DISN's layout (default 24 for toy_cars / toy_chairs, "
                         "else 0)")
    ap.add_argument("--image-size", type=int, default=224, help="render size in pixels (default 224, DISN's)")
    ap.add_argument("--test-count", type=int, default=None,
                    help="with renders: instances in split_test.json (default: a fifth, at least 1)")
    ap.add_argument("--val-count", type=int, default=0,
                    help="with renders: instances in split_val.json, taken before the test ones (default 0: "
                         "no validation split)")
    return ap.parse_args(argv)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name) or name.startswith("."):  # no '/', no '..': every file stays below --out
        raise MeshSDFError(f"{kind} name {name!r} may only use letters, digits, '_', '-' and '.' (not first); "
                           "rename it")


def _check_new_dataset(root: Path) -> None:
    """MeshSDFError when ``root`` already holds a dataset: its samples and split files are what experiments were
    trained on, so a run never replaces them (nor adds to them: split.json would change)."""
    if not root.is_dir():
        return
    files = sorted(p for p in root.rglob("*") if p.is_file())
    if files:
        splits = [p.name for p in files if p.parent == root and p.suffix == ".json"]
        samples = [p.stem for p in files if p.parent.name == "samples" and p.suffix == ".npz"
                   and not p.stem.endswith("_normalization")]
        more = ", ..." if len(samples) > 3 else ""
        held = splits + ([f"samples of {', '.join(samples[:3])}{more}"] if samples else [])
        raise MeshSDFError(f"{root} already holds a dataset ({', '.join(held) or f'{len(files)} files'}); nothing was "
                           f"changed: give a new --dataset name, or move {root} aside to make it again")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise MeshSDFError(f"cannot write to {folder}: {err.strerror or err}; choose another --out") from None


def _countable() -> list[str]:
    from lib.datasets.shapes import COUNTABLE_DATASETS

    return sorted(COUNTABLE_DATASETS)


def _check_has_inside(verts, faces, name: str) -> None:
    """MeshSDFError when no point beside the surface of the mesh is inside it (an open or flat
    surface): its samples would all be outside, which DeepSDF training cannot use."""
    import numpy as np

    from lib.datasets.sampling import normalization, signed_distance

    v = normalization(verts, faces, name).apply(np.asarray(verts, np.float64))
    f = np.asarray(faces, np.int64)
    a, b, c = (v[f[:, k]] for k in range(3))
    normals = np.cross(b - a, c - a)
    normals /= np.maximum(np.linalg.norm(normals, axis=1, keepdims=True), 1e-30)
    # probes just off random points of the faces, on both sides (the orientation may be flipped)
    rng = np.random.default_rng(0)
    idx = rng.integers(0, len(f), 1000)
    u, w = rng.uniform(0, 0.5, (2, 1000, 1))
    on = a[idx] + u * (b[idx] - a[idx]) + w * (c[idx] - a[idx])
    probes = np.concatenate([on + 1e-3 * normals[idx], on - 1e-3 * normals[idx]])
    if not (signed_distance(v, f, probes) < 0).any():
        raise MeshSDFError(f"mesh {name} encloses no volume: no point beside its surface is inside it (an open "
                           "or flat surface); give a closed surface (watertight, or with small holes only)")


def _stop_worker(signum, frame):
    raise SystemExit(128 + signum)  # unwinds through atomic_write, which removes its temporary


def _worker_init() -> None:
    """In each worker: stop when the parent dies (even by SIGKILL) and on SIGTERM, leaving no temporary;
    Ctrl-C is the parent's to handle (it terminates the workers)."""
    signal.signal(signal.SIGTERM, _stop_worker)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if sys.platform.startswith("linux"):
        import ctypes

        PR_SET_PDEATHSIG = 1
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))


WORKER_GRACE = 10.0  # s a worker has to stop on SIGTERM before it is killed


def _terminate(pool) -> None:
    """``pool.terminate()`` (SIGTERM to the workers, which unwind and remove their temporaries),
    then SIGKILL to any worker still alive after ``WORKER_GRACE`` seconds.

    Why: a worker killed while it held the pool's task-queue lock leaves it held, and an idle
    sibling waits on that lock; a SIGTERM that one of the sibling's other threads takes does
    not wake the wait, so the sibling never stops and ``terminate()`` would wait for it forever.
    An idle worker holds no temporary, so killing it loses nothing.
    """
    stopping = threading.Thread(target=pool.terminate, daemon=True)
    stopping.start()
    stopping.join(WORKER_GRACE)
    if stopping.is_alive():
        for worker in active_children():
            worker.kill()
        stopping.join()


def _job(task: tuple) -> dict:
    """Worker: one instance from a mesh file or a built-in shape (picklable for spawn)."""
    from lib.datasets.sampling import prepare_mesh

    from lib.datasets.sampling import rotate_about_y

    kind, source, out, dataset, instance, n, seed, resolution, render, mix, turn = task
    color = (0.8, 0.8, 0.8)
    if kind == "mesh":
        from lib.io import read_mesh

        verts, faces = read_mesh(source)
    else:
        from lib.datasets.shapes import builtin_color, mesh_builtin

        v, f = mesh_builtin(source, resolution)
        verts, faces = v.numpy(), f.numpy()
        color = builtin_color(source)
    verts = rotate_about_y(verts, turn)
    result = prepare_mesh(verts, faces, out, dataset, instance, n, seed=seed, name=str(source), mix=mix)
    if render:
        from lib.datasets.renders import render_views
        from lib.datasets.sampling import normalization

        # the normalised mesh, as written to meshes/: renders in the frame of the samples
        normalised = normalization(verts, faces, str(source)).apply(verts)
        render_views(normalised, faces, Path(out) / dataset / "renders" / instance, render["views"],
                     render["image_size"], seed=render["seed"], color=color)
        result["views"] = render["views"]
    return result


def _turns(specs: list[str], instances: list[str]) -> dict[str, float]:
    """``--rotate-y`` values ``INSTANCE=DEGREES`` as {instance: degrees}; each must name a given instance."""
    turns = {}
    for spec in specs:
        name, sep, value = spec.partition("=")
        try:
            degrees = float(value)
        except ValueError:
            degrees = float("nan")
        if not sep or not degrees == degrees or abs(degrees) == float("inf"):
            raise MeshSDFError(f"--rotate-y {spec!r}: expected INSTANCE=DEGREES, e.g. --rotate-y spot=90")
        if name not in instances:
            raise MeshSDFError(f"--rotate-y {spec!r}: no instance {name!r} among {', '.join(instances)} "
                               "(the instance name is the mesh file's stem)")
        if name in turns:
            raise MeshSDFError(f"--rotate-y names {name!r} twice; give one angle per instance")
        turns[name] = degrees
    return turns


def main(argv=None) -> int:
    args = parse_args(argv)
    from lib import runtime

    runtime.apply_thread_policy()  # threads for the cores other processes leave free (MESHSDF_THREADS)
    from lib.log import info, progress
    from lib.io import atomic_write

    if args.samples < 10:
        raise MeshSDFError(f"--samples must be at least 10 (got {args.samples})")
    if args.workers < 1:
        raise MeshSDFError(f"--workers must be at least 1 (got {args.workers})")
    if args.resolution < 32:
        raise MeshSDFError(f"--resolution must be at least 32 (got {args.resolution})")
    from lib.runtime import limits

    limits.check_seed(args.seed)
    out = Path(args.out)

    if args.count is not None and args.builtin not in _countable():
        raise MeshSDFError(f"--count applies to procedural families ({', '.join(_countable())}) only")
    if args.count is not None and args.count < 2:
        raise MeshSDFError(f"--count must be at least 2 (got {args.count})")
    views = args.views if args.views is not None else (24 if args.builtin in _countable() else 0)
    if views < 0 or views > 100:
        raise MeshSDFError(f"--views must be between 0 and 100 (got {views})")
    if args.image_size < 16:
        raise MeshSDFError(f"--image-size must be at least 16 (got {args.image_size})")
    from lib.runtime import limits

    workers = args.workers  # each worker holds its own grid and samples
    limits.check_fits("--samples", args.samples, lambda n: workers * limits.SAMPLE_BYTES * float(n))
    if args.builtin:
        limits.check_fits("--resolution", args.resolution, lambda n: workers * limits.grid_bytes(n), low=32)
    if views:
        limits.check_image(args.image_size)
    if args.builtin:
        from lib.datasets.shapes import BUILTIN_DATASETS, COUNTABLE_DATASETS

        dataset = args.dataset or args.builtin
        names = (COUNTABLE_DATASETS[args.builtin](args.count) if args.count is not None
                 else BUILTIN_DATASETS[args.builtin])
        sources = [("builtin", name, name) for name in names]
        if args.rotate_y:
            raise MeshSDFError("--rotate-y applies to --mesh only (the built-in bob_and_spot is already turned "
                               "as the original's data)")
        from lib.datasets.shapes import ORIGINAL_TURN_Y

        turns = {name: ORIGINAL_TURN_Y.get(name, 0.0) for name in names} if args.builtin == "bob_and_spot" else {}
    else:
        from lib.io import read_mesh
        from lib.datasets.sampling import normalization, validate_mesh

        if not args.dataset:
            raise MeshSDFError("--dataset NAME is required with --mesh")
        dataset = args.dataset
        sources, seen = [], {}
        for f in args.mesh:
            inst = Path(f).stem
            _check_name("instance", inst)
            if inst in seen:
                raise MeshSDFError(f"{f} and {seen[inst]} would both be instance {inst!r}; rename one")
            seen[inst] = f
            verts, faces = read_mesh(f)  # fail on any bad file before writing anything
            validate_mesh(verts, faces, f)
            normalization(verts, faces, f)
            _check_has_inside(verts, faces, f)
            sources.append(("mesh", str(f), inst))
        turns = _turns(args.rotate_y, [inst for _, _, inst in sources])
    _check_name("dataset", dataset)
    root = out / dataset
    _check_new_dataset(root)
    n_test = n_val = 0
    if views and len(sources) > 1:
        n_test = args.test_count if args.test_count is not None else max(1, len(sources) // 5)
        if not 1 <= n_test < len(sources):
            raise MeshSDFError(f"--test-count must be between 1 and {len(sources) - 1} for {len(sources)} instances")
        n_val = args.val_count
        if not 0 <= n_val < len(sources) - n_test:
            raise MeshSDFError(f"--val-count must be between 0 and {len(sources) - n_test - 1} for {len(sources)} "
                               f"instances and {n_test} test instances")
    for sub in ("samples", "meshes") + (("renders",) if views else ()):
        _check_writable(root / sub)
    tasks = [(kind, src, str(out), dataset, inst, args.samples, args.seed + i, args.resolution,
              {"views": views, "image_size": args.image_size, "seed": 1_000_003 * (args.seed + 1) + i}
              if views else None,
              args.sample_mix, turns.get(inst, 0.0))
             for i, (kind, src, inst) in enumerate(sources)]
    bar = progress(total=len(tasks), desc=f"prepare {dataset}", unit="mesh")
    results = []
    # SIGTERM unwinds like Ctrl-C: atomic_write removes the temporary being written, the Pool its workers
    previous = signal.signal(signal.SIGTERM, _stop_worker)
    try:
        if args.workers == 1 or len(tasks) == 1:
            for t in tasks:
                results.append(_job(t))
                bar.update()
        else:
            # spawn: torch and libigl thread pools do not survive fork safely.  A Pool, not an executor:
            # leaving its block on an error or a signal terminates the workers instead of waiting for them
            with get_context("spawn").Pool(min(args.workers, len(tasks)), initializer=_worker_init) as pool:
                try:
                    for r in pool.imap(_job, tasks):
                        results.append(r)
                        bar.update()
                except BaseException:
                    _terminate(pool)
                    raise
    except SystemExit as stop:
        if stop.code == 128 + signal.SIGTERM:
            print(f"prepare_data.py: stopped by SIGTERM (no split file written); {len(results)} finished "
                  f"instances are in {root}", file=sys.stderr)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)
    bar.close()

    names = [r["instance"] for r in results]
    splits = {"split.json": names}
    if n_test:
        n_train = len(names) - n_test - n_val
        splits.update({"split_train.json": names[:n_train], "split_test.json": names[len(names) - n_test:]})
        if n_val:
            splits["split_val.json"] = names[n_train:n_train + n_val]
    for fname, part in splits.items():
        with atomic_write(root / fname) as tmp:
            tmp.write_text(json.dumps({dataset: {"samples": part}}, indent=2) + "\n")
    for r in results:
        info(f"{dataset}/{r['instance']}: {r['pos']} pos + {r['neg']} neg samples, {r['faces']} faces")
    if views:
        info(f"wrote {views} RGBA views of {args.image_size} px per instance to {root}/renders"
             + (f"; {len(names) - n_test - n_val} train / {n_val} validation / {n_test} test instances in "
               "split_train.json / split_val.json / split_test.json" if n_test else ""))
    info(f"wrote {root}/samples, {root}/meshes and {root / 'split.json'}")
    return 0


if __name__ == "__main__":
    cli.cli_main(main)
