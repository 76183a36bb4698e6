"""The evaluation runner: re-rankers x datasets x protocols, as in LoCoRE supplementary Table B.

``locore-plugin eval ...`` (or ``python -m locore_plugin.evaluate ...``) ranks each dataset's
gallery by global similarity (or takes the official ``nn_*.pkl`` shortlist), applies each
protocol's shortlist rule (:mod:`locore_plugin.protocols`), lets every re-ranker re-order the
top-K, and scores the result with revisitop's ``compute_map``. Re-rankers are reached only
through the registry, so a chain such as ``superglobal+locore-base`` is just a name.

Every (method, dataset) result is cached as one JSON file, written atomically, keyed by
everything that changes it: an interrupted run resumes where it stopped and a finished one
re-prints its table at once. Outputs: ``results.md``/``.csv``/``.json`` (rows = methods,
columns = Medium/Hard/Hard* per dataset), ``per_query_ap.csv`` and per-query AP scatter plots.
"""
from __future__ import annotations

import argparse
import csv
import hashlib
import json
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .atomic import atomic_write, set_aside
from .metrics import compute_map
from .options import SYNTAX, parse_assignment, read_recipe_file
from .progress import progress
from .protocols import JUNK_MODES, Protocol, check_junk_mode, get_protocol, parse_protocols, prepare_ranking

GLOBAL_ROW = "global"
KAPPAS = (1, 5, 10)
SHORT_NAMES = {"roxford5k": "ROxf", "rparis6k": "RPar", "roxford5k+1m": "ROxf+1M", "rparis6k+1m": "RPar+1M",
               "synthetic": "Synth"}


class EvaluationError(RuntimeError):
    """A problem the user must fix (missing data, bad option): printed without a traceback."""


# --------------------------------------------------------------------------- configuration


@dataclass
class MethodSpec:
    """One table row: a registered name (or chain) with its factory options.

    ``options`` go to every stage; ``stage_options`` ({stage: {...}}) to one stage of a chain.
    ``label`` names the row (default: ``name``), so one method can appear with two checkpoints.
    """

    name: str
    options: dict = field(default_factory=dict)
    stage_options: dict = field(default_factory=dict)
    label: str = ""

    @property
    def row(self) -> str:
        return self.label or self.name


@dataclass
class EvalConfig:
    datasets: list
    methods: list  # MethodSpec; the global-only row is always added first
    data_root: Optional[str] = None  # default: $LOCORE_DATA
    out: str = "eval_results"
    protocols: list = field(default_factory=lambda: ["medium", "hard", "hard*"])
    junk: str = "remove"
    top_k: int = 100
    metric: str = "standard"  # or "truncated" (AMES/LoCoRE top-K variant, on the first `depth` items)
    depth: Optional[int] = None  # list length for metric="truncated" (default: the nn file's K, else 1600)
    desc: str = "dinov2"
    nn: Optional[str] = None  # nn_{nn}.pkl shortlist; None: exact global ranking
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: Optional[int] = None
    plots: bool = True

    def validate(self) -> None:
        if not self.datasets:
            raise EvaluationError("no dataset given")
        check_junk_mode(self.junk)
        parse_protocols(self.protocols)
        if self.metric not in ("standard", "truncated"):
            raise EvaluationError(f"metric must be 'standard' or 'truncated', got {self.metric!r}")
        if self.top_k < 1:
            raise EvaluationError(f"top_k must be >= 1, got {self.top_k}")
        rows = [m.row for m in self.methods]
        if GLOBAL_ROW in rows or len(set(rows)) != len(rows):
            raise EvaluationError(f"method rows must be unique and not {GLOBAL_ROW!r}: {rows}")


def resolve_data_root(data_root: Optional[str]) -> Path:
    """The dataset root: the argument, else ``$LOCORE_DATA``; a clear error when neither is set."""
    from .descriptors import data_root as find_root

    try:
        return find_root(data_root or None)
    except FileNotFoundError as error:
        raise EvaluationError(f"{error} (set the LOCORE_DATA environment variable or pass --data-root)") from None


# --------------------------------------------------------------------------- data and rankings


@dataclass
class EvalData:
    """What the runner needs of one dataset.

    ``gnd``: the pickle's per-query list (``easy``/``hard``/``junk``); ``queries``: one
    ImageFeatures per query; ``gallery(ids)``: the ImageFeatures of gallery images ``ids``, read
    lazily; ``ranking`` [nq, n]: the global ranking (full gallery, or the top-K shortlist for the
    truncated metric) and ``scores`` [nq, n] the global similarities aligned with it, which the
    re-rankers receive.
    """

    name: str
    gnd: list
    queries: list
    gallery: object
    ranking: np.ndarray
    scores: np.ndarray


def global_similarities(query_global, gallery_global) -> np.ndarray:
    """Exact inner products [nq, N]; ``gallery_global`` is an [N, D] array or a DescriptorSet
    (read batch by batch, never whole)."""
    q = np.asarray(query_global, dtype=np.float32)
    if hasattr(gallery_global, "global_batches"):
        n, batches = len(gallery_global), gallery_global.global_batches()
    else:
        gallery_global = np.asarray(gallery_global, np.float32)
        n, batches = len(gallery_global), [(0, gallery_global)]
    sims = np.empty((len(q), n), np.float32)
    with progress(total=n, desc="global similarities", unit="img", leave=False, disable=n < 100_000) as bar:
        for start, block in batches:
            if block.shape[1] != q.shape[1]:
                raise EvaluationError(f"gallery global dimension {block.shape[1]} != query global dimension {q.shape[1]}")
            sims[:, start : start + len(block)] = q @ block.T
            bar.update(len(block))
    return sims


def full_ranking(sims: np.ndarray, nn: Optional[tuple[np.ndarray, np.ndarray]] = None):
    """Rankings of the whole gallery [nq, N] and the global scores aligned with them.

    Without ``nn`` the gallery is sorted by ``sims``. With a published shortlist ``nn = (scores
    [nq, K], indices [nq, K])`` its K images come first, in its order and with its scores (what
    the official code gives the re-rankers), and the rest follow by ``sims``.
    """
    order = np.argsort(-sims, axis=1, kind="stable").astype(np.int32 if sims.shape[1] < 2**31 else np.int64)
    if nn is None:
        return order, np.take_along_axis(sims, order, 1)
    nn_scores, nn_idx = np.asarray(nn[0], np.float32), np.asarray(nn[1], np.int64)
    ranking = np.empty_like(order)
    scores = np.empty_like(sims)
    k = nn_idx.shape[1]
    for q in range(len(order)):
        listed = np.zeros(sims.shape[1], bool)
        listed[nn_idx[q]] = True
        ranking[q, :k], scores[q, :k] = nn_idx[q], nn_scores[q]
        ranking[q, k:] = order[q][~listed[order[q]]]
        scores[q, k:] = sims[q, ranking[q, k:]]
    return ranking, scores


def load_dataset(root, dataset: str, desc: str, metric: str = "standard", nn: Optional[str] = None,
                 depth: Optional[int] = None, cache_dir=None, num_locals: Optional[int] = None) -> EvalData:
    """Open ``{root}/{dataset}`` (``name+1m`` adds the revisitop1m distractors) in the official layout.

    ``metric="standard"`` ranks the whole gallery (exact inner products; a published ``nn_{nn}.pkl``
    shortlist, if named, comes first); ``"truncated"`` uses the top-``depth`` shortlist itself
    (``nn_{nn}.pkl``, or exact faiss search, cached), as the AMES/LoCoRE code does.
    """
    from .descriptors import open_revisited

    base, plus1m = (dataset[: -len("+1m")], True) if dataset.endswith("+1m") else (dataset, False)
    try:
        data = open_revisited(base, desc, root, plus1m=plus1m, num_locals=num_locals)
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from None
    if metric == "truncated":
        nn_scores, nn_idx = data.shortlist(depth, nn, cache_dir=cache_dir)
        ranking, scores = nn_idx, nn_scores
    else:
        sims = global_similarities(data.queries.globals(np.arange(len(data.queries))), data.gallery)
        ranking, scores = full_ranking(sims, data.shortlist(nn=nn) if nn else None)
    return EvalData(
        dataset, data.gnd, data.queries.features(np.arange(len(data.queries))), data.gallery.features, ranking, scores
    )


def rerank_top(reranker, queries, gallery, ranking, scores, kept, top_k: int, batch_size: int = 8, desc: str = ""):
    """Let ``reranker`` re-order the first ``min(top_k, kept[q])`` images of each ranking row.

    ``gallery(ids)`` returns the ImageFeatures of gallery images ``ids``; ``scores`` (aligned
    with ``ranking``) are the global scores handed to the re-ranker. Returns a new ranking.
    """
    out = ranking.copy()
    nq = len(queries)
    with progress(total=nq, desc=desc or "re-ranking", unit="query", leave=False) as bar:
        for start in range(0, nq, batch_size):
            batch = range(start, min(start + batch_size, nq))
            depth = [min(top_k, int(kept[q])) for q in batch]
            ids = [ranking[q, :d] for q, d in zip(batch, depth)]
            results = reranker.rerank_many(
                [queries[q] for q in batch], [gallery(i) for i in ids], [scores[q, :d] for q, d in zip(batch, depth)]
            )
            for q, i, result in zip(batch, ids, results):
                order = np.asarray(result.order)
                if not np.array_equal(np.sort(order), np.arange(len(i))):
                    raise EvaluationError(f"{reranker!r} returned an order that is not a permutation of the shortlist")
                out[q, : len(i)] = i[order]
            bar.update(len(batch))
    return out


def score_ranking(ranking: np.ndarray, gnd, protocol: Protocol, metric: str = "standard", kappas=KAPPAS) -> dict:
    """mAP, mP@k and per-query AP of rankings [nq, n] under ``protocol`` (fractions, not x100)."""
    mean_ap, aps, mpr, _ = compute_map(ranking.T, protocol.scoring_gnd(gnd), kappas, truncated=metric == "truncated")
    return {"mAP": float(mean_ap), "mP@k": [float(v) for v in mpr], "aps": [None if np.isnan(a) else float(a) for a in aps]}


class DatasetEvaluation:
    """One dataset under a set of protocols: shortlists prepared once, any re-ranker scored on them.

    Protocols whose shortlist rule is the same (Medium and Hard always are) share one re-ranking.
    """

    def __init__(self, data: EvalData, protocols, junk: str, metric: str = "standard", kappas=KAPPAS):
        self.data, self.metric, self.kappas = data, metric, kappas
        self.groups = []  # (protocols, ranking, aligned scores, images per query that may be shortlisted)
        by_rule: dict[tuple, list[Protocol]] = {}
        for p in parse_protocols(protocols):
            by_rule.setdefault(p.removed_keys(junk), []).append(p)
        for members in by_rule.values():
            order, kept = prepare_ranking(data.ranking, data.gnd, members[0], junk)
            self.groups.append((
                members, np.take_along_axis(data.ranking, order, 1), np.take_along_axis(data.scores, order, 1), kept,
            ))

    def run(self, reranker=None, top_k: int = 100, batch_size: int = 8, label: str = "") -> dict:
        """``{protocol name: score_ranking(...)}`` for ``reranker`` (None = the global ranking)."""
        label = label or getattr(reranker, "name", "") or type(reranker).__name__
        out = {}
        for members, ranking, scores, kept in self.groups:
            final = ranking if reranker is None else rerank_top(
                reranker, self.data.queries, self.data.gallery, ranking, scores, kept, top_k, batch_size,
                desc=f"{label} on {self.data.name} ({'/'.join(p.label for p in members)})",
            )
            for p in members:
                out[p.name] = score_ranking(final, self.data.gnd, p, self.metric, self.kappas)
        return out


# --------------------------------------------------------------------------- the runner


def _jsonable(value):
    return json.loads(json.dumps(value, default=str))


def _path_stamp(value):
    """Options that name existing files or folders (checkpoints) enter the cache key with their
    sizes and modification times, so a retrained checkpoint is re-evaluated."""
    if isinstance(value, dict):
        return {k: _path_stamp(v) for k, v in sorted(value.items())}
    if isinstance(value, str) and value and os.path.exists(value):
        path = Path(value)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [value, [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    return value


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() or c in "-_." else "_" for c in text)


def dataset_fingerprint(root: Path, dataset: str, desc: str) -> str:
    """Sizes and modification times of the dataset's files: a changed file means a new cache entry."""
    base = dataset[: -len("+1m")] if dataset.endswith("+1m") else dataset
    files = [p for p in (root / base).glob("*") if p.is_file() and not p.name.startswith(".")]
    if dataset.endswith("+1m"):
        files += [p for p in (root / "revisitop1m").glob(f"{desc}_*") if p.is_file()]
        files += [p for p in (root / dataset).glob("nn_*.pkl") if p.is_file()]
    stamp = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files)]
    return hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]


class ResultCache:
    """One JSON file per (method, dataset, settings): written atomically, read back on resume."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / _slug(key["dataset"]) / f"{_slug(key['row'])}-{digest}.json"

    def get(self, key: dict) -> Optional[dict]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            return entry["scores"] if entry.get("key") == _jsonable(key) else None
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # truncated or foreign JSON
            set_aside(path, error)
            return None

    def put(self, key: dict, scores: dict) -> None:
        atomic_write(self.path(key), json.dumps({"key": key, "scores": scores}))


def _settings(config: EvalConfig) -> dict:
    return {
        "protocols": [p.name for p in parse_protocols(config.protocols)], "junk": config.junk,
        "top_k": config.top_k, "metric": config.metric, "depth": config.depth, "desc": config.desc,
        "nn": config.nn, "kappas": list(KAPPAS),
    }


def run(config: EvalConfig, log=print) -> dict:
    """Evaluate every method on every dataset (cached), write the tables and plots, return the results.

    Returns ``{"settings": ..., "results": {row: {dataset: {protocol: {mAP, mP@k, aps}}}}}``.
    """
    from .registry import create_reranker, is_reranker_name

    config.validate()
    for m in config.methods:
        if not is_reranker_name(m.name):
            _create(create_reranker, m, {})  # raises before any work, naming close matches
        reason = untrained_reason(m.name, _weights_chosen(m))
        if reason is not None:  # never report random weights as if they were a method's numbers
            raise EvaluationError(f"{m.row}: {reason}; pass --checkpoint NAME=PATH (or --option "
                                  "NAME.pretrained=false to measure random weights on purpose)")
    root = resolve_data_root(config.data_root)
    out = Path(config.out)
    cache = ResultCache(out / "cache")
    settings = _settings(config)
    rows = [MethodSpec(GLOBAL_ROW)] + list(config.methods)
    common = {k: v for k, v in (("device", config.device), ("dtype", config.dtype), ("batch_size", config.batch_size))
              if v is not None}
    built: dict[str, object] = {}
    results: dict[str, dict] = {m.row: {} for m in rows}
    fresh: set[tuple[str, str]] = set()  # (row, dataset) computed in this run
    for dataset in config.datasets:
        fingerprint = dataset_fingerprint(root, dataset, config.desc)
        keys = {
            m.row: _jsonable({
                "row": m.row, "method": m.name, "options": _path_stamp(m.options),
                "stage_options": _path_stamp(m.stage_options), "common": common if m.name != GLOBAL_ROW else {},
                "dataset": dataset, "fingerprint": fingerprint,
                **{k: v for k, v in settings.items() if m.name != GLOBAL_ROW or k != "top_k"},  # nothing re-ranked
            })
            for m in rows
        }
        todo = []
        for m in rows:
            cached = cache.get(keys[m.row])
            if cached is not None:
                results[m.row][dataset] = cached
            else:
                todo.append(m)
        if not todo:
            log(f"{dataset}: every row cached")
            continue
        log(f"{dataset}: loading (rows to compute: {', '.join(m.row for m in todo)})")
        data = load_dataset(root, dataset, config.desc, config.metric, config.nn, config.depth, cache_dir=out / "cache")
        evaluation = DatasetEvaluation(data, config.protocols, config.junk, config.metric)
        for m in progress(todo, desc=dataset, unit="method"):
            if m.name == GLOBAL_ROW:
                scores = evaluation.run(None)
            else:
                if m.row not in built:
                    built[m.row] = _create(create_reranker, m, common)
                scores = evaluation.run(built[m.row], config.top_k, config.batch_size or 8, m.row)
            cache.put(keys[m.row], scores)
            results[m.row][dataset] = scores
            fresh.add((m.row, dataset))
    report = {"settings": {**settings, "datasets": list(config.datasets)}, "results": results}
    write_outputs(report, out, plots=config.plots, fresh=fresh)
    return report


def _create(create_reranker, spec: MethodSpec, common: dict):
    try:
        if spec.stage_options:
            return create_reranker(spec.name, stage_options=spec.stage_options, **common, **spec.options)
        return create_reranker(spec.name, **common, **spec.options)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        raise EvaluationError(f"cannot build re-ranker {spec.row!r} ({spec.name}): {error}") from error


# --------------------------------------------------------------------------- outputs


def _columns(report: dict) -> list[tuple[str, str]]:
    return [(d, p) for d in report["settings"]["datasets"] for p in report["settings"]["protocols"]]


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
        protocols = report["settings"]["protocols"]
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


# --------------------------------------------------------------------------- command line

RECIPE_KEYS = {"datasets", "methods", "data_root", "out", "protocols", "junk", "top_k", "metric", "depth", "desc",
               "nn", "device", "dtype", "batch_size", "plots"}


def read_recipe(path) -> dict:
    """A TOML (or JSON) recipe with the keys of :class:`EvalConfig`; ``methods`` is a list of
    tables ``{name, label?, options?, stage_options?}``."""
    try:
        recipe = read_recipe_file(path)
    except (OSError, ValueError) as error:
        raise EvaluationError(str(error)) from None
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise EvaluationError(f"recipe {path}: unknown keys {sorted(unknown)}; known: {sorted(RECIPE_KEYS)}")
    methods = []
    for entry in recipe.get("methods", []):
        extra = set(entry) - {"name", "label", "options", "stage_options"}
        if "name" not in entry or extra:
            raise EvaluationError(f"recipe {path}: a method needs 'name' and only label/options/stage_options, got {entry}")
        methods.append(MethodSpec(entry["name"], dict(entry.get("options", {})),
                                  {k: dict(v) for k, v in entry.get("stage_options", {}).items()}, entry.get("label", "")))
    recipe["methods"] = methods
    return recipe


def apply_options(methods: list, options: Sequence[str]) -> None:
    """``NAME.KEY=VALUE``: KEY=VALUE for the row or registered name NAME, or for the stage NAME of
    every chain that contains it (``--option locore-base.checkpoint=/ckpt`` reaches
    ``superglobal+locore-base``). ``--checkpoint NAME=PATH`` is ``NAME.checkpoint=PATH``."""
    for text in options:
        try:
            target, value = parse_assignment(text, "--option")
        except ValueError as error:
            raise EvaluationError(f"{error} (with NAME. before KEY)") from None
        name, dot, key = target.rpartition(".")
        if not (dot and name and key):
            raise EvaluationError(f"--option expects NAME.KEY=VALUE, got {text!r}; VALUE: {SYNTAX}")
        hits = 0
        for m in methods:
            if name in (m.row, m.name):
                m.options[key] = value
                hits += 1
            elif name in m.name.split("+"):
                m.stage_options.setdefault(name, {})[key] = value
                hits += 1
        if not hits:
            raise EvaluationError(f"--option {text!r}: no method or chain stage is named {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``locore-plugin eval`` (and ``python -m locore_plugin.evaluate``)."""
    parser.add_argument("--recipe", help="TOML/JSON recipe (recipes/eval_*.toml); the options below override it")
    parser.add_argument("--dataset", action="append", dest="datasets", metavar="NAME",
                        help="roxford5k, rparis6k, roxford5k+1m, rparis6k+1m, or any folder name under the data root "
                             "(repeatable)")
    parser.add_argument("--reranker", action="append", dest="rerankers", metavar="NAME",
                        help="registered name or chain a+b (repeatable; replaces the recipe's methods); the global-only "
                             "row is always included")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="a factory option of one method or chain stage (repeatable); VALUE: a TOML or "
                        "Python literal (None, True, 0.5, [0.0, 1.0], (0.55, 0.3)) or plain text")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="shorthand for --option NAME.checkpoint=PATH")
    parser.add_argument("--data-root", help="dataset root (default: $LOCORE_DATA)")
    parser.add_argument("--out", help="output folder (tables, per-query APs, plots, cache); default eval_results")
    parser.add_argument("--protocols", help="comma-separated: medium,hard,hard* (default all three)")
    parser.add_argument("--junk", choices=JUNK_MODES, help="junk before re-ranking: keep (revisitop/SuperGlobal) or "
                                                           "remove (DELG/AMES/RRT/LoCoRE code; default)")
    parser.add_argument("--top-k", type=int, help="images re-ranked per query (default 100)")
    parser.add_argument("--metric", choices=("standard", "truncated"),
                        help="standard revisitop mAP on the full ranking (default), or the AMES/LoCoRE top-K variant")
    parser.add_argument("--depth", type=int, help="list length for --metric truncated (default: the nn file's, else 1600)")
    parser.add_argument("--desc", help="descriptor name of the files, {desc}_query_local.hdf5 ... (default dinov2)")
    parser.add_argument("--nn", help="use the published shortlist nn_NAME.pkl (default: exact global ranking)")
    parser.add_argument("--device", help="device for every re-ranker (cpu, cuda, auto)")
    parser.add_argument("--dtype", help="dtype for every re-ranker (fp32, bf16, fp16)")
    parser.add_argument("--batch-size", type=int, help="queries per re-ranking call and re-ranker batch size")
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG scatter plots")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    recipe = read_recipe(args.recipe) if args.recipe else {}
    if args.rerankers:
        recipe["methods"] = [MethodSpec(name) for name in args.rerankers]
    for key in ("datasets", "data_root", "out", "protocols", "junk", "top_k", "metric", "depth", "desc", "nn",
                "device", "dtype", "batch_size", "plots"):
        value = getattr(args, key)
        if value is not None:
            recipe[key] = value
    if isinstance(recipe.get("protocols"), str):
        recipe["protocols"] = recipe["protocols"].split(",")
    recipe.setdefault("methods", [])
    if "datasets" not in recipe:
        raise EvaluationError("no dataset: give --dataset NAME or a --recipe that lists datasets")
    apply_options(recipe["methods"], [*args.option, *(checkpoint_option(c) for c in args.checkpoint)])
    try:
        return EvalConfig(**recipe)
    except TypeError as error:
        raise EvaluationError(str(error)) from None


def checkpoint_option(text: str) -> str:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise EvaluationError(f"--checkpoint expects NAME=PATH, got {text!r}")
    return f"{name}.checkpoint={json.dumps(path)}"


def guarded(function, args) -> int:
    """Run a command; a user error is one line on stderr and exit status 2, not a traceback."""
    try:
        function(args)
    except (EvaluationError, ValueError, FileNotFoundError) as error:
        print(f"locore-plugin: error: {error}", file=sys.stderr)
        return 2
    return 0


def _run_eval(args) -> None:
    config = config_from_args(args)
    report = run(config)
    print(format_table(report))
    print(f"tables, per-query APs and plots in {Path(config.out).resolve()}")


def _weights_chosen(spec: MethodSpec) -> list[str]:
    """``NAME=`` for each stage whose weights the user chose: a checkpoint, or ``pretrained=False`` on purpose."""
    chosen = []
    for part in spec.name.split("+"):
        options = {**spec.options, **spec.stage_options.get(part, {})}
        if options.get("checkpoint") is not None or options.get("pretrained") is False:
            chosen.append(f"{part}=")
    return chosen


def untrained_reason(name: str, checkpoints: Sequence[str] = ()) -> Optional[str]:
    """Why a registered name (or chain) cannot be reported without trained weights, or None.

    A stage is learned when it registers ``learned=True`` (the registry metadata every learned
    adapter declares) or, for a plugin that does not say, when it builds a
    :class:`~locore_plugin.interface.TrainableReranker` (with ``pretrained=False``, which every
    factory accepts); it counts as trained only when ``checkpoints`` (``NAME=PATH``) names it.
    """
    from .interface import TrainableReranker
    from .registry import create_reranker, registered_rerankers

    entries = registered_rerankers()
    given = {c.partition("=")[0] for c in checkpoints}
    for part in name.split("+"):
        if part in given:
            continue
        learned = entries[part].metadata.learned
        if learned is None:
            learned = isinstance(create_reranker(part, pretrained=False), TrainableReranker)
        if learned:
            return f"{part} is a learned re-ranker and no trained checkpoint was given"
    return None


def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate re-rankers on revisited Oxford/Paris (Medium/Hard/Hard*)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=lambda args: guarded(_run_eval, args))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locore_plugin.evaluate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return guarded(_run_eval, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
