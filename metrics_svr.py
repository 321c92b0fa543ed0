#!/usr/bin/env python
"""Raw vs refined metrics of reconstruct_svr.py's outputs: the original's six lines, then our table,
CSV and per-iteration curves."""
from __future__ import annotations

import argparse
import sys

from lib import checkpoint
from lib.errors import cli_main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="metrics_svr.py",
        description="Average the per-iteration logs of <experiment>/Reconstructions/<checkpoint>/ over the "
                    "instances and print the original's six lines: Raw CHD, Refined CHD, Improvement in CHD %, "
                    "Raw NC %, Refined NC %, Improvement in NC % (Chamfer x1000 from squared-distance means, "
                    "image-space normal consistency x100; raw = iteration 0, refined = the last). Then our "
                    "per-instance table (with mesh-space normal consistency as a labelled extra) and the "
                    "fraction of instances whose Chamfer refinement lowered; writes svr_metrics.txt, "
                    "svr_metrics.csv and svr_curves.png beside the instance folders.")
    ap.add_argument("-e", "--experiment", required=True, help="experiment folder holding specs.json")
    ap.add_argument("-c", "--continue", dest="checkpoint", type=checkpoint.parse_epoch, default="latest",
                    metavar="latest|N", help="checkpoint whose reconstructions to read (default latest)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="read the instance folders here instead of Reconstructions/<checkpoint>/ (as given to "
                         "reconstruct_svr.py --out)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from lib.errors import MeshSDFError
    from lib.io import atomic_write
    from lib.log import info
    from lib.specs import SPECS_FILE
    from lib.svr import report
    from lib.svr.reconstruct import output_root

    args = parse_args(argv)
    from pathlib import Path

    if not (Path(args.experiment) / SPECS_FILE).is_file():
        raise MeshSDFError(f"no {SPECS_FILE} in {args.experiment}; give -e the experiment folder that holds it")
    root = output_root(args.experiment, args.checkpoint, args.out)
    results = report.collect_results(root)
    lines, _ = report.summary_lines(results)
    rows, summary = report.metrics_rows(results)
    text = "\n".join(lines) + "\n\n" + report.metrics_table(rows, summary)
    with atomic_write(root / "svr_metrics.txt") as tmp:
        tmp.write_text(text)
    with atomic_write(root / "svr_metrics.csv") as tmp:
        tmp.write_text(report.metrics_csv(rows, summary))
    report.plot_curves(results, root / "svr_curves.png")
    sys.stdout.write(text)
    info(f"wrote {root / 'svr_metrics.txt'}, {root / 'svr_metrics.csv'} and {root / 'svr_curves.png'}")
    return 0


if __name__ == "__main__":
    cli_main(main)
