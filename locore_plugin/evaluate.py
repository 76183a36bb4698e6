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
import inspect
import json
import os
import sys
import tempfile
import tomllib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from tqdm.auto import tqdm

from .metrics import compute_map
from .protocols import JUNK_MODES, Protocol, check_junk_mode, parse_protocols, prepare_ranking

GLOBAL_ROW = "global"
KAPPAS = (1, 5, 10)
SHORT_NAMES = {"roxford5k": "ROxf", "rparis6k": "RPar", "roxford5k+1m": "ROxf+1M", "rparis6k+1m": "RPar+1M"}


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
    root = data_root or os.environ.get("LOCORE_DATA")
    if not root:
        raise EvaluationError(
            "LOCORE_DATA is not set and no --data-root was given: point it at the folder that holds one "
            "sub-folder per dataset (roxford5k/, rparis6k/, ...) with the official descriptor files. "
            + _official_data_hint()
        )
    path = Path(root).expanduser()
    if not path.is_dir():
        raise EvaluationError(f"the dataset root {path} (LOCORE_DATA / --data-root) is not a folder")
    return path


def _official_data_hint() -> str:
    from .pickles import OFFICIAL_DATA

    return f"Where the official data are published: {OFFICIAL_DATA}"


# --------------------------------------------------------------------------- data and rankings


@dataclass
class EvalData:
    """What the runner needs of one dataset.

    ``gnd``: the pickle's per-query list (``easy``/``hard``/``junk``); ``queries``: one
    ImageFeatures per query; ``gallery(ids)``: the ImageFeatures of gallery images ``ids``, read
    lazily; ``ranking`` [nq, n]: the global ranking (full gallery, or the top-K shortlist for the
    truncated metric) and ``scores`` [nq, n] the global similarities aligned with it, which the
    re-rankers receive; ``fingerprint`` changes when the files change (part of the cache key).
    """

    name: str
    gnd: list
    queries: list
    gallery: object
    ranking: np.ndarray
    scores: np.ndarray
    fingerprint: str = ""


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
    with tqdm(total=n, desc="global similarities", unit="img", leave=False, disable=n < 100_000) as bar:
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
    order = np.argsort(-sims, axis=1, kind="stable")
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
    files = sorted(p for p in (Path(data.root) / base).glob("*") if p.is_file())
    if plus1m:
        files += sorted(p for p in (Path(data.root) / "revisitop1m").glob(f"{desc}_*") if p.is_file())
    stamp = [(str(p), p.stat().st_size, p.stat().st_mtime_ns) for p in files if not p.name.startswith(".")]
    return EvalData(
        dataset, data.gnd, data.queries.features(np.arange(len(data.queries))), data.gallery.features,
        ranking, scores, fingerprint=hashlib.sha256(repr(stamp).encode()).hexdigest()[:16],
    )


def rerank_top(reranker, queries, gallery, ranking, scores, kept, top_k: int, batch_size: int = 8, desc: str = ""):
    """Let ``reranker`` re-order the first ``min(top_k, kept[q])`` images of each ranking row.

    ``gallery(ids)`` returns the ImageFeatures of gallery images ``ids``; ``scores`` (aligned
    with ``ranking``) are the global scores handed to the re-ranker. Returns a new ranking.
    """
    out = ranking.copy()
    nq = len(queries)
    with tqdm(total=nq, desc=desc or "re-ranking", unit="query", leave=False) as bar:
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
