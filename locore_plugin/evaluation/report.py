"""Outputs of a run: ``results.md`` / ``.csv`` / ``.json`` (rows = methods, columns = Medium /
Hard / Hard* per dataset, and each row's paired test against a baseline row), ``per_query_ap.csv``
and the per-query AP scatter plots of the supplementary's Figure A."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np

from locore_plugin.data.categories import CATEGORY_DATASETS
from locore_plugin.io.atomic import atomic_write

from .datasets import GLOBAL_ROW, SHORT_NAMES
from .protocols import DATASET_PROTOCOLS, get_protocol
from .significance import PERMUTATIONS, compare

# Per-query lists of a result that the summary JSON leaves to per_query_ap.csv.
PER_QUERY_KEYS = ("per_query", "shortlist_positives")


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def _columns(report: dict) -> list[tuple[str, str]]:
    """(dataset, protocol) per column: each dataset's own protocols (GLDv2 has public / private / combined)."""
    return [(d, p) for d in report["settings"]["datasets"] for p in _protocols(report, d)]


def _protocols(report: dict, dataset: str) -> list[str]:
    return report["settings"].get("columns", {}).get(dataset, report["settings"]["protocols"])


def _header(dataset: str, protocol: str) -> str:
    return f"{SHORT_NAMES.get(dataset, dataset)} {get_protocol(protocol).label}"


def compare_rows(report: dict, baseline: str) -> dict:
    """``{row: {dataset: {protocol: PairedComparison.as_dict()}}}``: every row but ``baseline``
    against it, on the per-query APs (see :mod:`locore_plugin.evaluation.significance`)."""
    base = report["results"][baseline]
    out = {}
    for row, per_dataset in report["results"].items():
        if row == baseline:
            continue
        for d, p in _columns(report):
            a, b = base.get(d, {}).get(p), per_dataset.get(d, {}).get(p)
            if a is not None and b is not None:
                out.setdefault(row, {}).setdefault(d, {})[p] = compare(a["per_query"], b["per_query"]).as_dict()
    return out


def _table(report: dict, cell) -> list[str]:
    columns = _columns(report)
    lines = ["| Method | " + " | ".join(_header(d, p) for d, p in columns) + " |", "|---|" + "---:|" * len(columns)]
    for row in report["results"]:
        lines.append(f"| {row} | " + " | ".join(cell(row, d, p) for d, p in columns) + " |")
    return lines


def _comparison_cell(comparison) -> str:
    if comparison is None or np.isnan(comparison["difference"]):
        return ""
    low, high = comparison["ci"]
    return f"{100 * comparison['difference']:+.1f} [{100 * low:+.1f}, {100 * high:+.1f}] p={comparison['p']:.2g}"


def format_table(report: dict) -> str:
    """Markdown: the supplementary Table B layout (rows = methods, columns = protocols per dataset,
    mAP x 100), then each row's paired difference to the baseline row."""
    def map_cell(row, d, p):
        value = report["results"][row].get(d, {}).get(p, {}).get("value")
        return "" if value is None or np.isnan(value) else f"{100 * value:.1f}"

    s = report["settings"]
    notes = [f"top-{s['top_k']} re-ranked"]
    if any(d not in DATASET_PROTOCOLS and d not in CATEGORY_DATASETS for d in s["datasets"]):
        notes.append(f"mAP (%), revisitop {'truncated top-K (AMES/LoCoRE code)' if s['metric'] == 'truncated' else 'standard'} "
                     f"metric; junk: {s['junk']}")
    if any(d in DATASET_PROTOCOLS for d in s["datasets"]):
        notes.append("GLDv2: mAP (%), rectangular AP on the first 100 (AMES / ELViS code)")
    if any(d in CATEGORY_DATASETS for d in s["datasets"]):
        notes.append("SOP / In-shop / CUB-200: Recall@K and mAP@R (%) of the final ranking (the query itself left out "
                     "where queries are gallery images)")
    note = "; ".join(notes)
    text = "\n".join(_table(report, map_cell)) + f"\n\n{note}\n"
    comparisons, baseline = report.get("comparisons"), s.get("baseline")
    if comparisons:
        def diff_cell(row, d, p):
            return "(baseline)" if row == baseline else _comparison_cell(comparisons.get(row, {}).get(d, {}).get(p))

        text += (f"\nDifference to {baseline} (points of each column's measure, paired over queries): 95% bootstrap interval and two-sided "
                 f"randomization p ({PERMUTATIONS:,} sign flips, or all of them when fewer; seed 0)\n\n"
                 + "\n".join(_table(report, diff_cell)) + "\n")
    return text


def write_outputs(report: dict, out: Path, plots: bool = True, fresh=None) -> None:
    """results.md / results.csv / results.json, per_query_ap.csv and (optionally) plots/*.png
    (see :func:`write_plots` for ``fresh``)."""
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "results.md", format_table(report))
    columns = _columns(report)
    comparisons = report.get("comparisons", {})
    baseline = report["settings"].get("baseline")
    header = ["method", *(_header(d, p) for d, p in columns)]
    if comparisons:
        header += [f"{_header(d, p)} {key} vs {baseline}" for d, p in columns for key in ("diff", "ci low", "ci high", "p")]
    rows = [header]
    for row, per_dataset in report["results"].items():
        cells = [row, *(_csv_number(per_dataset.get(d, {}).get(p, {}).get("value")) for d, p in columns)]
        if comparisons:
            for d, p in columns:
                c = comparisons.get(row, {}).get(d, {}).get(p)
                cells += [_csv_number(v) for v in ((c["difference"], *c["ci"], c["p"]) if c else (None,) * 4)]
        rows.append(cells)
    atomic_write(out / "results.csv", _csv(rows))
    summary = {
        "settings": report["settings"],
        "results": {
            row: {d: {p: {k: v for k, v in s.items() if k not in PER_QUERY_KEYS} for p, s in per.items()}
                  for d, per in datasets.items()}
            for row, datasets in report["results"].items()
        },
        "comparisons": comparisons,
        **({"peak_memory_mb": report["peak_memory_mb"]} if "peak_memory_mb" in report else {}),
    }
    atomic_write(out / "results.json", json.dumps(summary, indent=1))
    per_query = [["dataset", "protocol", "query", "positives_in_shortlist", *report["results"]]]
    for d, p in columns:
        per_row = [per.get(d, {}).get(p, {}) for per in report["results"].values()]
        aps = [r.get("per_query") for r in per_row]
        positives = shortlist_positives(per_row)
        n = max((len(a) for a in aps if a), default=0)
        for q in range(n):
            per_query.append([d, p, q, "" if positives is None else positives[q],
                              *(_csv_number(a[q] if a else None) for a in aps)])
    atomic_write(out / "per_query_ap.csv", _csv(per_query))
    if plots:
        write_plots(report, out / "plots", fresh)


def shortlist_positives(results) -> "list[int] | None":
    """Per-query positives in the re-ranked shortlist, from the first re-ranked result that has them.

    Every re-ranked row of a run re-orders the same heads (one ``top_k``, one shortlist rule per
    protocol), so they agree; the global row re-ranks nothing and has none."""
    return next((r["shortlist_positives"] for r in results if r and "shortlist_positives" in r), None)


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
    Each query is coloured by the number of positives in its re-ranked shortlist (colour bar),
    and the numbers of queries above, on and below the diagonal are printed on the panel.

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
                x = np.array([np.nan if v is None else v for v in ra[p]["per_query"]], float) * 100
                y = np.array([np.nan if v is None else v for v in rb[p]["per_query"]], float) * 100
                positives = shortlist_positives([rb[p], ra[p]])
                if positives is None:
                    ax.scatter(x, y, s=12, alpha=0.8)
                else:
                    points = ax.scatter(x, y, c=positives, cmap="viridis", s=12, alpha=0.8)
                    fig.colorbar(points, ax=ax, fraction=0.046, pad=0.04).set_label("positives in shortlist")
                ax.plot([0, 100], [0, 100], color="red", lw=0.8)
                above, on, below = diagonal_counts(x, y)
                ax.text(2, 98, f"above {above}", va="top", fontsize=8)
                ax.text(98, 2, f"below {below}" + (f", on {on}" if on else ""), ha="right", fontsize=8)
                ax.set(xlim=(-2, 102), ylim=(-2, 102), xlabel=f"{a} AP", ylabel=f"{b} AP",
                       title=f"{_header(dataset, p)}: {100 * ra[p]['value']:.1f} vs {100 * rb[p]['value']:.1f}")
                ax.set_aspect("equal")
            fig.tight_layout()
            fig.savefig(path, dpi=110)
            plt.close(fig)
            written.append(path)
    return written


def diagonal_counts(x, y) -> tuple[int, int, int]:
    """Queries above (y better), on and below the diagonal of a per-query AP scatter (AP x 100;
    equal to 1e-9 counts as on it); queries without an AP in either row are not counted."""
    x, y = np.asarray(x, float), np.asarray(y, float)
    kept = ~(np.isnan(x) | np.isnan(y))
    gap = y[kept] - x[kept]
    return int((gap > 1e-9).sum()), int((np.abs(gap) <= 1e-9).sum()), int((gap < -1e-9).sum())
