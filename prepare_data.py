"""Make DeepSDF training data (SDF samples, normalised meshes, split file) from meshes.

    python prepare_data.py --builtin bob_and_spot              # the toy dataset, no download
    python prepare_data.py --mesh a.obj b.ply --dataset mine   # any triangle meshes

Writes, under <out>/<dataset>/ (SPEC section 2):
    samples/<inst>.npz                 pos, neg: (N, 4) float32 rows x y z sdf (sdf > 0 outside)
    samples/<inst>_normalization.npz   offset (3,), scale: normalised = (original - offset) * scale
    meshes/<inst>.obj                  the normalised mesh
    split.json                         {"<dataset>": {"samples": [<inst>, ...]}}
Every file is written atomically; all inputs are checked before anything is written.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import tempfile
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

from lib.errors import MeshSDFError, cli_main

_NAME = re.compile(r"^[A-Za-z0-9_.\-]+$")


def parse_args(argv=None) -> argparse.Namespace:
    from lib.shapes import BUILTIN_DATASETS

    ap = argparse.ArgumentParser(
        prog="prepare_data.py",
        description="Sample signed distances around meshes (DeepSDF format) for training.",
        epilog="Built-in datasets are procedural stand-ins made from analytic SDFs: "
               + ", ".join(f"{k} ({', '.join(v)})" for k, v in BUILTIN_DATASETS.items()) + ".")
    src = ap.add_mutually_exclusive_group(required=True)
    src.add_argument("--mesh", nargs="+", metavar="FILE",
                     help="triangle meshes (OBJ/PLY/OFF/STL...); instance name = file stem")
    src.add_argument("--builtin", choices=sorted(BUILTIN_DATASETS),
                     help="generate a built-in dataset (no download)")
    ap.add_argument("--dataset", help="dataset name (required with --mesh; default: the builtin's name)")
    ap.add_argument("--out", default="data", help="output root folder (default: data)")
    ap.add_argument("--samples", type=int, default=500_000, help="SDF samples per mesh (default 500000)")
    ap.add_argument("--workers", type=int, default=1, help="meshes processed in parallel (default 1)")
    ap.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    ap.add_argument("--resolution", type=int, default=192,
                    help="marching-cubes grid used to mesh built-in shapes (default 192)")
    return ap.parse_args(argv)


def _check_name(kind: str, name: str) -> None:
    if not _NAME.match(name):
        raise MeshSDFError(f"{kind} name {name!r} may only use letters, digits, '_', '-' and '.'; rename it")


def _check_writable(folder: Path) -> None:
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as err:
        raise MeshSDFError(f"cannot write to {folder}: {err.strerror or err}; choose another --out") from None


def _job(task: tuple) -> dict:
    """Worker: one instance from a mesh file or a built-in shape (picklable for spawn)."""
    from lib.sampling import prepare_mesh

    kind, source, out, dataset, instance, n, seed, resolution = task
    if kind == "mesh":
        from lib.io import read_mesh

        verts, faces = read_mesh(source)
    else:
        from lib.shapes import BUILTIN, mesh_shape

        v, f = mesh_shape(BUILTIN[source](), resolution)
        verts, faces = v.numpy(), f.numpy()
    return prepare_mesh(verts, faces, out, dataset, instance, n, seed=seed, name=str(source))


def main(argv=None) -> int:
    args = parse_args(argv)
    from lib.log import info, progress
    from lib.io import atomic_write

    if args.samples < 10:
        raise MeshSDFError(f"--samples must be at least 10 (got {args.samples})")
    if args.workers < 1:
        raise MeshSDFError(f"--workers must be at least 1 (got {args.workers})")
    if args.resolution < 32:
        raise MeshSDFError(f"--resolution must be at least 32 (got {args.resolution})")
    out = Path(args.out)

    if args.builtin:
        from lib.shapes import BUILTIN_DATASETS

        dataset = args.dataset or args.builtin
        sources = [("builtin", name, name) for name in BUILTIN_DATASETS[args.builtin]]
    else:
        from lib.io import read_mesh
        from lib.sampling import normalization, validate_mesh

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
            sources.append(("mesh", str(f), inst))
    _check_name("dataset", dataset)
    root = out / dataset
    for sub in ("samples", "meshes"):
        _check_writable(root / sub)

    tasks = [(kind, src, str(out), dataset, inst, args.samples, args.seed + i, args.resolution)
             for i, (kind, src, inst) in enumerate(sources)]
    bar = progress(total=len(tasks), desc=f"prepare {dataset}", unit="mesh")
    results = []
    if args.workers == 1 or len(tasks) == 1:
        for t in tasks:
            results.append(_job(t))
            bar.update()
    else:
        # spawn: torch and libigl thread pools do not survive fork safely
        with ProcessPoolExecutor(max_workers=min(args.workers, len(tasks)), mp_context=get_context("spawn")) as ex:
            for r in ex.map(_job, tasks):
                results.append(r)
                bar.update()
    bar.close()

    split = {dataset: {"samples": [r["instance"] for r in results]}}
    with atomic_write(root / "split.json") as tmp:
        tmp.write_text(json.dumps(split, indent=2) + "\n")
    for r in results:
        info(f"{dataset}/{r['instance']}: {r['pos']} pos + {r['neg']} neg samples, {r['faces']} faces")
    info(f"wrote {root}/samples, {root}/meshes and {root / 'split.json'}")
    return 0


if __name__ == "__main__":
    cli_main(main)
