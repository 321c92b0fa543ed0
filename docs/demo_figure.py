#!/usr/bin/env python
"""Make docs/demo_bob_and_spot.png from a demo's output folder.

Panels: target.png, initialization.png, and movie.gif at iteration 0, at the iteration from
which the mesh keeps the target's genus (the hole has opened for good) and at the last iteration.

Usage: python docs/demo_figure.py [<Optimizations folder>] [-o docs/demo_bob_and_spot.png]
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("folder", nargs="?", default=str(REPO / "experiments" / "bob_and_spot" / "Optimizations"))
    ap.add_argument("-o", "--out", default=str(REPO / "docs" / "demo_bob_and_spot.png"))
    args = ap.parse_args()
    import imageio.v3 as iio
    import numpy as np
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    from lib.io import atomic_write

    folder = Path(args.folder)
    log = json.loads((folder / "log.json").read_text())
    frames = iio.imread(folder / "movie.gif", index=None)
    hist = log["iterations"]
    opening = len(hist) - 1                     # the start of the last run of the target's genus
    while opening > 0 and hist[opening - 1]["genus"] == log["target_genus"]:
        opening -= 1
    grey = np.array([1.0, 1.0, 1.0])

    def on_white(rgba):
        a = rgba[..., 3:4] / 255.0
        return rgba[..., :3] / 255.0 * a + grey * (1 - a)

    panels = [(on_white(iio.imread(folder / "target.png")), f"target.png ({log['target']})"),
              (on_white(iio.imread(folder / "initialization.png")), f"initialization.png ({log['init']})"),
              (frames[0], "movie.gif, iteration 0"),
              (frames[opening], f"iteration {opening} (genus {log['target_genus']} from here on)"),
              (frames[-1], f"iteration {len(frames) - 1} (final IoU {log['final']['iou']:.3f})")]
    fig = Figure(figsize=(12, 2.75))
    FigureCanvasAgg(fig)
    for i, (img, title) in enumerate(panels):
        ax = fig.add_subplot(1, len(panels), i + 1)
        ax.imshow(img)
        ax.set_title(title, fontsize=8)
        ax.axis("off")
    fig.tight_layout()
    with atomic_write(args.out) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
