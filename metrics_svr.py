#!/usr/bin/env python
"""Raw vs refined metrics of reconstruct_svr.py's outputs: table (text, CSV) and per-iteration curves."""
from __future__ import annotations

import argparse
import sys

from lib.errors import cli_main


def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="metrics_svr.py",
        description="Average the per-view logs of <experiment>/Reconstructions/: Chamfer distance (x1000, squared "
                    "L2 means, normalised frame) and normal consistency (percent) of the raw and the refined meshes, "
                    "improvement (percent), and the fraction of views where refinement lowered the Chamfer distance. "
                    "Prints the table and writes <experiment>/Results/svr_metrics.txt, svr_metrics.csv and "
                    "svr_curves.png (per-iteration silhouette loss, Chamfer, normal consistency, latent norm).")
    ap.add_argument("-e", "--experiment", required=True, help="experiment folder holding specs.json")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from pathlib import Path

    from lib import svr
    from lib.io import atomic_write
    from lib.log import info

    args = parse_args(argv)
    results = svr.collect_results(args.experiment)
    rows, summary = svr.metrics_rows(results)
    table = svr.metrics_table(rows, summary)
    out = Path(args.experiment) / "Results"
    with atomic_write(out / "svr_metrics.txt") as tmp:
        tmp.write_text(table)
    with atomic_write(out / "svr_metrics.csv") as tmp:
        tmp.write_text(svr.metrics_csv(rows, summary))
    svr.plot_curves(results, out / "svr_curves.png")
    sys.stdout.write(table)
    info(f"wrote {out / 'svr_metrics.txt'}, {out / 'svr_metrics.csv'} and {out / 'svr_curves.png'}")
    return 0


if __name__ == "__main__":
    cli_main(main)
