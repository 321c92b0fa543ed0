#!/usr/bin/env python
"""The fast extraction's refinement step and the layer backward's kernel, this tree against a
baseline commit's implementation, in one process, alternating (a busy machine slows both alike).

The instance: the bob_and_spot network (experiments/bob_and_spot), spot's code; a dense start
at N = ``--resolution`` (default 256, the SVR defaults), then each round moves the code a little
and times, for each side in turn (the order alternating round by round):

  1. ``extract(..., "fast", state=)``: the paper's heuristic (re-evaluate each previous vertex's
     voxel and its 6 neighbours), the bookkeeping and marching cubes;
  2. ``values_and_input_grad`` at ``--vertices`` (default 42,000) of the start's vertices, the
     MeshSDF layer backward's decoder pass.

The baseline side loads the baseline's lib/isosurface/dense.py and lib/models/kernels/inference.py
(``git show``) as modules beside this tree's and runs the extraction driver of this tree with the
baseline's refresh (``_refresh_fast``, ``_check_fast``) and kernels.  Prints process CPU seconds
(all threads: the work, whatever share of the cores the load leaves) and wall seconds, median and
best over ``--rounds``, the load average, and whether both sides gave the same meshes (vertices,
faces, evaluation and stale counts) and the same kernel outputs, bit for bit.

Usage: python benchmarks/fast_refresh.py [--baseline dc86bc0] [--rounds 10] [--resolution 256] [--vertices 42000]
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from lib import cli  # noqa: E402

cli.setup_process()  # before torch loads, as the scripts: OpenMP reads its wait policy once
import torch  # noqa: E402

from lib import runtime  # noqa: E402
from lib.experiment import load_decoder_and_codes  # noqa: E402
from lib.experiment.specs import load_specs  # noqa: E402
from lib.isosurface import dense, driver  # noqa: E402
from lib.isosurface.driver import extract  # noqa: E402
from lib.models.kernels import inference  # noqa: E402

EXPERIMENT = REPO / "experiments" / "bob_and_spot"


def _baseline_module(commit: str, path: str, name: str, folder: Path):
    """The file ``path`` of ``commit`` loaded as module ``name`` (a sibling of this tree's, so that
    its relative imports resolve to this tree's modules)."""
    text = subprocess.run(["git", "show", f"{commit}:{path}"], cwd=REPO, capture_output=True, text=True,
                          check=True).stdout
    file = folder / (name.rsplit(".", 1)[1] + ".py")
    file.write_text(text)
    spec = importlib.util.spec_from_file_location(name, file)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--baseline", default="dc86bc0", help="commit to compare with (default dc86bc0)")
    ap.add_argument("--rounds", type=int, default=10, help="rounds, each side once per round (default 10)")
    ap.add_argument("--resolution", type=int, default=256, help="grid points per axis (default 256)")
    ap.add_argument("--vertices", type=int, default=42000, help="rows of the backward's kernel call (default 42000)")
    args = ap.parse_args()
    threads = runtime.apply_thread_policy()
    with tempfile.TemporaryDirectory() as tmp:
        base_dense = _baseline_module(args.baseline, "lib/isosurface/dense.py", "lib.isosurface._baseline_dense",
                                      Path(tmp))
        base_inf = _baseline_module(args.baseline, "lib/models/kernels/inference.py",
                                    "lib.models.kernels._baseline_inference", Path(tmp))
    sides = {"baseline": (base_dense, base_inf), "this": (dense, inference)}
    decoder, codes = load_decoder_and_codes(str(EXPERIMENT), load_specs(str(EXPERIMENT)), "latest")
    decoder.eval()
    code = codes[1:2].detach().clone()
    n = args.resolution
    kernel = inference.InferenceKernel(decoder)
    _, _, start = extract(lambda p: kernel.values(code, p), n, "fast")
    verts = start.verts[: args.vertices].clone()
    times: dict = {}
    same = True
    for r in range(args.rounds):
        moved = code + 1e-4 * (r + 1)
        out = {}
        for side in ("baseline", "this") if r % 2 == 0 else ("this", "baseline"):
            dense_mod, inf_mod = sides[side]
            prep = inf_mod.InferenceKernel(decoder).prepare(moved)
            driver._refresh_fast, driver._check_fast = dense_mod._refresh_fast, dense_mod._check_fast
            state = copy.copy(start)
            state.values, state.marks = start.values.clone(), None
            c0, w0 = time.process_time(), time.perf_counter()
            v, f, st = extract(lambda p, m=inf_mod, q=prep: m.values(q, p), n, "fast", state=state)
            c1, w1 = time.process_time(), time.perf_counter()
            grads = inf_mod.values_and_input_grad(prep, verts)
            c2, w2 = time.process_time(), time.perf_counter()
            for what, t in (("extract fast, CPU s", c1 - c0), ("extract fast, wall s", w1 - w0),
                            ("backward kernel, CPU s", c2 - c1), ("backward kernel, wall s", w2 - w1)):
                times.setdefault((what, side), []).append(t)
            out[side] = (v, f, (st.evaluations, st.stale_vertices, st.missed_vertices), grads)
        driver._refresh_fast, driver._check_fast = dense._refresh_fast, dense._check_fast
        a, b = out["baseline"], out["this"]
        same &= (torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and a[2] == b[2]
                 and all(torch.equal(x, y) for x, y in zip(a[3], b[3])))
    print(f"N = {n}, {start.faces.shape[0]} faces at the start, {args.vertices} backward rows, {threads} threads, "
          f"{args.rounds} rounds; load average {os.getloadavg()[0]:.1f}")
    for what in dict.fromkeys(k[0] for k in times):
        b, t = times[(what, "baseline")], times[(what, "this")]
        print(f"  {what:<24} {args.baseline}: median {statistics.median(b):.4f} best {min(b):.4f}   "
              f"this tree: median {statistics.median(t):.4f} best {min(t):.4f}   "
              f"({statistics.median(b) / statistics.median(t):.2f}x median)")
    print(f"  same meshes, counts and kernel outputs bit for bit: {same}")
    return 0 if same else 1


if __name__ == "__main__":
    sys.exit(main())
