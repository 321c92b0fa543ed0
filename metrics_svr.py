#!/usr/bin/env python
"""Raw vs refined metrics of reconstruct_svr.py's outputs: the original's seven lines, then our notes,
table, CSV and per-iteration curves."""
from __future__ import annotations

from lib import cli

cli.setup_process()  # first, before torch loads: OpenMP reads its wait policy once

import argparse
import sys



def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        prog="metrics_svr.py",
        description="Average the per-iteration logs of <experiment>/Reconstructions/<checkpoint>/ over the "
                    "TestSplit's instances (each at its protocol view) and print the original's seven lines: "
                    "Stats:, Raw CHD, Refined CHD, Improvement in CHD %, Raw NC %, Refined NC %, Improvement in "
                    "NC % (Chamfer x1000 from squared-distance means, image-space normal consistency x100; raw = "
                    "iteration 0, refined = the last). Then notes on instances left out (no surface) and "
                    "folders not counted, our per-instance table (with mesh-space normal consistency as a "
                    "labelled extra) and the fraction of instances whose Chamfer refinement lowered; writes "
                    "svr_metrics.txt, svr_metrics.csv and svr_curves.png beside the instance folders.")
    cli.add_experiment(ap)
    ap.add_argument("-c", "--continue", dest="checkpoint", type=cli.epoch_type("--continue"), default="latest",
                    metavar="latest|N", help="checkpoint whose reconstructions to read (default latest)")
    ap.add_argument("--out", default=None, metavar="DIR",
                    help="read the instance folders here instead of Reconstructions/<checkpoint>/ (as given to "
                         "reconstruct_svr.py --out)")
    return ap.parse_args(argv)


def main(argv=None) -> int:
    from lib.errors import MeshSDFError
    from lib.io import atomic_write
    from lib.log import info
    from lib.experiment.specs import SPECS_FILE, load_svr_specs
    from lib.svr import report
    from lib.svr.data import split_instances
    from lib.svr.reconstruct import output_root

    args = parse_args(argv)
    from pathlib import Path

    if not (Path(args.experiment) / SPECS_FILE).is_file():
        raise MeshSDFError(f"no {SPECS_FILE} in {args.experiment}; give -e the experiment folder that holds it")
    specs = load_svr_specs(args.experiment)
    test_names = [i.name for i in split_instances(specs, "TestSplit")]
    root = output_root(args.experiment, args.checkpoint, args.out)
    found = report.collect_results(root)
    results, others = report.test_split_results(found, test_names, specs["NumberOfViews"])
    if not results:
        raise MeshSDFError(f"none of the {len(found)} reconstructions in {root} is a TestSplit instance at its "
                           "protocol view; run reconstruct_svr.py -e on this experiment (its defaults)")
    report.check_same_settings(results)
    finite, missing = report.finite_results(results)
    if not finite:
        raise MeshSDFError(f"no TestSplit reconstruction in {root} has finite metrics (no surface in any); is the "
                           "network trained?")
    lines, _ = report.summary_lines(finite)
    if missing:
        lines.append(f"note: {len(missing)} of {len(results)} test instances have no surface (NaN metrics) and are "
                     f"left out of the averages above: {' '.join(missing)}")
    if others:
        lines.append(f"note: {len(others)} folders are not TestSplit instances at their protocol view and are not "
                     f"counted: {' '.join(others)}")
    rows, summary = report.metrics_rows(finite)
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
    cli.cli_main(main)
