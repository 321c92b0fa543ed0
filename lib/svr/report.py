"""metrics_svr.py's report: the original's seven lines, then our notes, per-instance table, CSV and plot.

``Stats:`` and six lines average the per-iteration curves (log_chd.npy, log_nc.npy) over the
TestSplit's instances, each seen from its protocol view (``test_split_results``), and read
raw = iteration 0, refined = the last entry:
Chamfer x1000 (squared-distance means summed, frame of the samples), image-space normal
consistency x100, and the improvements in percent: 100 (raw - refined) / raw for Chamfer,
100 (refined - raw) / raw for normal consistency (positive = better for both).  A curve that
ended early (the surface vanished) is extended with its last value; an instance whose raw or
refined metrics are NaN (no surface) is left out of the averages, and a line after the seven
says so.  Folders made with different settings are refused.  Our table adds, per
instance, the same figures, the mesh-space normal consistency (an extra, labelled so; not
the original's metric), and the fraction of instances whose Chamfer refinement lowered.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np

from ..errors import MeshSDFError
from ..io import atomic_write
from .data import evaluation_view
from .reconstruct import LOG_FILES, LOG_KEYS, META_FILE

__all__ = ["collect_results", "test_split_results", "check_same_settings", "finite_results", "mean_curves",
           "summary_lines", "TABLE_COLUMNS", "metrics_rows", "metrics_table", "metrics_csv", "plot_curves"]


def collect_results(root: str | os.PathLike) -> list[dict]:
    """Every finished instance folder under ``root`` (``Reconstructions/<checkpoint>/``), sorted by name.

    Each entry: name, instance, view, mesh_nc ([raw, refined] or NaNs) and the LOG_KEYS
    curves (T + 1,) float64.  Raises MeshSDFError if there are none or one cannot be read.
    """
    root = Path(root)
    folders = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")) if root.is_dir() else []
    folders = [p for p in folders if (p / LOG_FILES["chamfer"]).is_file()]
    if not folders:
        raise MeshSDFError(f"no reconstructions in {root}; run reconstruct_svr.py first")
    out = []
    for p in folders:
        entry = {"name": p.name, "instance": p.name, "view": None, "mesh_nc": [math.nan, math.nan],
                 "settings": None}
        try:
            for key, fname in LOG_FILES.items():
                path = p / fname
                entry[key] = (np.asarray(np.load(path, allow_pickle=False), dtype=np.float64).reshape(-1)
                              if path.is_file() else np.full(1, np.nan))
            if (p / META_FILE).is_file():
                meta = json.loads((p / META_FILE).read_text())
                entry["instance"] = meta.get("instance", p.name)
                entry["view"] = meta.get("view")
                if "settings" in meta:
                    entry["settings"] = {**meta["settings"], "checkpoint_epoch": meta.get("checkpoint_epoch")}
                entry["mesh_nc"] = [math.nan if x is None else float(x) for x in meta.get("mesh_nc", entry["mesh_nc"])]
        except Exception as err:
            raise MeshSDFError(f"cannot read the logs in {p}: {type(err).__name__}: {err}; remove the folder and "
                               "rerun reconstruct_svr.py") from None
        out.append(entry)
    seen = {}
    for e in out:  # a copied folder (e.g. "<instance>_backup") would count its view twice
        key = (e["instance"], e["view"])
        if e["view"] is not None and key in seen:
            raise MeshSDFError(f"{root / seen[key]} and {root / e['name']} hold the same reconstruction (instance "
                               f"{e['instance']!r}, view {e['view']}); move the copy out of {root}")
        seen[key] = e["name"]
    return out


def test_split_results(results: Sequence[Mapping], test_names: Sequence[str], num_views: int
                       ) -> tuple[list[dict], list[str]]:
    """(the results of the TestSplit's instances at their protocol view ``evaluation_view(i)``, in
    split order; the names of the other folders)."""
    index = {name: i for i, name in enumerate(test_names)}

    def protocol(r):
        i = index.get(r["instance"])
        return i is not None and r["name"] == r["instance"] and (
            r["view"] is None or int(r["view"]) == evaluation_view(i, num_views))

    kept = sorted((r for r in results if protocol(r)), key=lambda r: index[r["instance"]])
    return kept, [r["name"] for r in results if not protocol(r)]


def check_same_settings(results: Sequence[Mapping]) -> None:
    """MeshSDFError naming two folders whose reconstruction settings or checkpoint differ (meta.json)."""
    first = None
    for r in results:
        if r.get("settings") is None:
            continue
        if first is None:
            first = r
            continue
        a, b = first["settings"], r["settings"]
        diff = sorted(k for k in set(a) | set(b) if a.get(k) != b.get(k))
        if diff:
            raise MeshSDFError(f"{first['name']} and {r['name']} were reconstructed with different settings "
                               f"({', '.join(f'{k} {a.get(k)} vs {b.get(k)}' for k in diff)}); their averages would "
                               "mix them: redo one with the other's settings, or give each its own --out folder")


def finite_results(results: Sequence[Mapping]) -> tuple[list[dict], list[str]]:
    """(the results whose raw and refined Chamfer and normal consistency are all finite; the names of the rest)."""
    def ok(r):
        return all(math.isfinite(float(r[k][i])) for k in ("chamfer", "normal_consistency") for i in (0, -1))

    return [r for r in results if ok(r)], [r["name"] for r in results if not ok(r)]


def _padded(curves: Sequence[np.ndarray]) -> np.ndarray:
    """(N, T) array of curves of varying lengths, each extended with its last value."""
    n = max(len(c) for c in curves)
    return np.stack([np.concatenate([c, np.full(n - len(c), c[-1])]) for c in curves])


def _improvement(raw: float, refined: float, lower_is_better: bool) -> float:
    if not (math.isfinite(raw) and math.isfinite(refined)) or raw == 0:
        return math.nan
    return 100.0 * ((raw - refined) if lower_is_better else (refined - raw)) / abs(raw)


def mean_curves(results: Sequence[Mapping]) -> dict:
    """The mean per-iteration curve of each LOG_KEYS entry over the results (NaN entries skipped)."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # an all-NaN column (no instance had a surface)
        return {k: np.nanmean(_padded([r[k] for r in results]), axis=0) for k in LOG_KEYS}


def summary_lines(results: Sequence[Mapping]) -> tuple[list[str], dict]:
    """The original's seven lines (strings: ``Stats:`` and six figures) and their values."""
    curves = mean_curves(results)
    chd, nc = curves["chamfer"] * 1000, curves["normal_consistency"] * 100
    values = {"raw_chd": float(chd[0]), "refined_chd": float(chd[-1]),
              "chd_improvement": _improvement(float(chd[0]), float(chd[-1]), True),
              "raw_nc": float(nc[0]), "refined_nc": float(nc[-1]),
              "nc_improvement": _improvement(float(nc[0]), float(nc[-1]), False)}
    lines = ["Stats:", f"Raw CHD {values['raw_chd']:.2f}", f"Refined CHD {values['refined_chd']:.2f}",
             f"Improvement in CHD {values['chd_improvement']:.2f} %",
             f"Raw NC {values['raw_nc']:.2f} %", f"Refined NC {values['refined_nc']:.2f} %",
             f"Improvement in NC {values['nc_improvement']:.2f} %"]
    return lines, values


TABLE_COLUMNS = ("instance", "view", "chamfer_raw_x1000", "chamfer_refined_x1000", "chamfer_improvement_pct",
                 "nc_raw_pct", "nc_refined_pct", "nc_improvement_pct", "extra_mesh_nc_raw_pct",
                 "extra_mesh_nc_refined_pct")


def metrics_rows(results: Sequence[Mapping]) -> tuple[list[dict], dict]:
    """Per-instance rows (TABLE_COLUMNS) and the mean row.

    The mean row holds the means of the per-instance values (NaN skipped), the improvements
    of those means, ``fraction_improved`` (instances whose Chamfer went down) and ``count``.
    """
    rows = []
    for r in results:
        c0, c1 = float(r["chamfer"][0]) * 1000, float(r["chamfer"][-1]) * 1000
        n0, n1 = float(r["normal_consistency"][0]) * 100, float(r["normal_consistency"][-1]) * 100
        rows.append({"instance": r["instance"], "view": "" if r["view"] is None else r["view"],
                     "chamfer_raw_x1000": c0, "chamfer_refined_x1000": c1,
                     "chamfer_improvement_pct": _improvement(c0, c1, True),
                     "nc_raw_pct": n0, "nc_refined_pct": n1, "nc_improvement_pct": _improvement(n0, n1, False),
                     "extra_mesh_nc_raw_pct": 100 * r["mesh_nc"][0],
                     "extra_mesh_nc_refined_pct": 100 * r["mesh_nc"][1]})

    def mean(key):
        vals = [row[key] for row in rows if math.isfinite(row[key])]
        return float(np.mean(vals)) if vals else math.nan

    both = [row for row in rows
            if math.isfinite(row["chamfer_raw_x1000"]) and math.isfinite(row["chamfer_refined_x1000"])]
    summary = {"instance": "mean", "view": "", **{key: mean(key) for key in TABLE_COLUMNS[2:]}}
    summary["chamfer_improvement_pct"] = _improvement(summary["chamfer_raw_x1000"],
                                                      summary["chamfer_refined_x1000"], True)
    summary["nc_improvement_pct"] = _improvement(summary["nc_raw_pct"], summary["nc_refined_pct"], False)
    summary["fraction_improved"] = (sum(r["chamfer_refined_x1000"] < r["chamfer_raw_x1000"] for r in both) / len(both)
                                    if both else math.nan)
    summary["count"] = len(rows)
    return rows, summary


def metrics_table(rows: Sequence[Mapping], summary: Mapping) -> str:
    """A fixed-width text table of ``metrics_rows`` (per instance, then the mean line)."""
    head = ("instance", "view", "CD raw x1e3", "CD refined x1e3", "CD impr %", "NC raw %", "NC refined %",
            "NC impr %", "extra: mesh NC raw %", "extra: mesh NC refined %")
    lines = [head]
    for r in list(rows) + [summary]:
        lines.append((str(r["instance"]), str(r["view"])) + tuple(
            f"{r[k]:.3f}" if k.startswith("chamfer") and not k.endswith("pct") else f"{r[k]:.2f}"
            for k in TABLE_COLUMNS[2:]))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    fmt = lambda line: "  ".join(c.rjust(w) if i > 0 else c.ljust(w) for i, (c, w) in enumerate(zip(line, widths)))  # noqa: E731
    out = [fmt(lines[0]), "-" * len(fmt(lines[0]))] + [fmt(line) for line in lines[1:-1]]
    out += ["-" * len(fmt(lines[0])), fmt(lines[-1])]
    out.append(f"refinement lowered the Chamfer distance of {summary['fraction_improved'] * 100:.1f} % of "
               f"{summary['count']} instances")
    return "\n".join(out) + "\n"


def metrics_csv(rows: Sequence[Mapping], summary: Mapping) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(TABLE_COLUMNS), extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in list(rows) + [summary]:
        w.writerow({k: (f"{r[k]:.6g}" if isinstance(r[k], float) else r[k]) for k in TABLE_COLUMNS})
    return buf.getvalue()


def plot_curves(results: Sequence[Mapping], path: str | os.PathLike) -> None:
    """PNG of the per-iteration curves: one thin line per instance and the mean, for the
    silhouette loss, Chamfer x1000, normal consistency % and mean z^2."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [("silhouette_loss", "silhouette L1 loss", 1.0), ("chamfer", "Chamfer x1000", 1000.0),
              ("normal_consistency", "normal consistency % (image)", 100.0), ("latent", "mean z^2", 1.0)]
    means = mean_curves(results)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.4))
    for ax, (key, title, scale) in zip(axes, panels):
        for r in results:
            ax.plot(r[key] * scale, color="0.7", lw=0.7)
        ax.plot(means[key] * scale, color="C3", lw=2, label="mean")
        ax.set_title(title)
        ax.set_xlabel("iteration")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.tight_layout()
    with atomic_write(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)
