"""Outputs of a run: ``results.md`` / ``.csv`` / ``.json`` (rows = methods, columns = Medium /
Hard / Hard* per dataset), ``per_query_ap.csv`` and per-query AP scatter plots."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from locore_plugin.io.atomic import atomic_write

from .datasets import GLOBAL_ROW, SHORT_NAMES
from .protocols import DATASET_PROTOCOLS, get_protocol


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _columns(report: dict) -> list[tuple[str, str]]:
    """(dataset, protocol) per column: each dataset's own protocols (GLDv2 has public / private / combined)."""
    return [(d, p) for d in report["settings"]["datasets"] for p in _protocols(report, d)]


def _protocols(report: dict, dataset: str) -> list[str]:
    return report["settings"].get("columns", {}).get(dataset, report["settings"]["protocols"])


def _header(dataset: str, protocol: str) -> str:
    return f"{SHORT_NAMES.get(dataset, dataset)} {get_protocol(protocol).label}"


def format_table(report: dict) -> str:
    """Markdown table, supplementary Table B layout: rows = methods, columns = protocols per dataset (mAP x 100)."""
    columns = _columns(report)
    lines = [
        "| Method | " + " | ".join(_header(d, p) for d, p in columns) + " |",
        "|---|" + "---:|" * len(columns),
    ]
    for row, per_dataset in report["results"].items():
        cells = []
        for d, p in columns:
            value = per_dataset.get(d, {}).get(p, {}).get("mAP")
            cells.append("" if value is None or np.isnan(value) else f"{100 * value:.1f}")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    s = report["settings"]
    note = (f"mAP (%), revisitop {'truncated top-K (AMES/LoCoRE code)' if s['metric'] == 'truncated' else 'standard'} "
            f"metric; top-{s['top_k']} re-ranked; junk: {s['junk']}")
    if any(d in DATASET_PROTOCOLS for d in s["datasets"]):
        note += "; GLDv2: rectangular AP on the first 100 (AMES / ELViS code)"
    return "\n".join(lines) + f"\n\n{note}\n"


def write_outputs(report: dict, out: Path, plots: bool = True, fresh=None) -> None:
    """results.md / results.csv / results.json, per_query_ap.csv and (optionally) plots/*.png
    (see :func:`write_plots` for ``fresh``)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.md", format_table(report))
    columns = _columns(report)
    rows = [["method", *(_header(d, p) for d, p in columns)]]
    for row, per_dataset in report["results"].items():
        rows.append([row, *(_csv_number(per_dataset.get(d, {}).get(p, {}).get("mAP")) for d, p in columns)])
    atomic_write(out / "results.csv", _csv(rows))
    summary = {
        "settings": report["settings"],
        "results": {
            row: {d: {p: {k: v for k, v in s.items() if k != "aps"} for p, s in per.items()} for d, per in datasets.items()}
            for row, datasets in report["results"].items()
        },
    }
    atomic_write(out / "results.json", json.dumps(summary, indent=1))
    per_query = [["dataset", "protocol", "query", *report["results"]]]
    for d, p in columns:
        aps = {row: per.get(d, {}).get(p, {}).get("aps") for row, per in report["results"].items()}
        n = max((len(a) for a in aps.values() if a), default=0)
        for q in range(n):
            per_query.append([d, p, q, *(_csv_number(a[q] if a else None) for a in aps.values())])
    atomic_write(out / "per_query_ap.csv", _csv(per_query))
    if plots:
        write_plots(report, out / "plots", fresh)


def _csv_number(value) -> str:
    return "" if value is None or (isinstance(value, float) and np.isnan(value)) else repr(float(value))


def _csv(rows) -> str:
    import io

    buffer = io.StringIO()
    csv.writer(buffer, lineterminator="\n").writerows(rows)
    return buffer.getvalue()


def write_plots(report: dict, folder: Path, fresh=None) -> list[Path]:
    """Per-query AP scatter plots (supplementary Figure A): every method against the global
    ranking, and every pair of re-rankers; one PNG per dataset and pair, one panel per protocol.

    With ``fresh`` (a set of (row, dataset) computed just now) an existing PNG whose rows all came
    from the cache is kept, so a finished run re-prints at once."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder.mkdir(parents=True, exist_ok=True)
    rows = list(report["results"])
    pairs = [(GLOBAL_ROW, r) for r in rows if r != GLOBAL_ROW]
    pairs += [(a, b) for i, a in enumerate(rows) for b in rows[i + 1 :] if GLOBAL_ROW not in (a, b)]
    written = []
    for dataset in report["settings"]["datasets"]:
        protocols = _protocols(report, dataset)
        for a, b in pairs:
            ra, rb = report["results"][a].get(dataset), report["results"][b].get(dataset)
            path = folder / f"{_slug(dataset)}__{_slug(a)}__vs__{_slug(b)}.png"
            if ra is None or rb is None or (
                fresh is not None and path.is_file() and not {(a, dataset), (b, dataset)} & fresh
            ):
                continue
            fig, axes = plt.subplots(1, len(protocols), figsize=(3.2 * len(protocols), 3.4), squeeze=False)
            for ax, p in zip(axes[0], protocols):
                x = np.array([np.nan if v is None else v for v in ra[p]["aps"]], float) * 100
                y = np.array([np.nan if v is None else v for v in rb[p]["aps"]], float) * 100
                ax.scatter(x, y, s=12, alpha=0.7)
                ax.plot([0, 100], [0, 100], color="grey", lw=0.8, ls="--")
                ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel=f"{a} AP", ylabel=f"{b} AP",
                       title=f"{_header(dataset, p)}: {100 * ra[p]['mAP']:.1f} vs {100 * rb[p]['mAP']:.1f}")
                ax.set_aspect("equal")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written
