"""Re-ranking the head of each global ranking and scoring it per protocol (the Medium / Hard /
Hard* rules of :mod:`locore_plugin.evaluation.protocols`, revisitop's ``compute_map``; GLDv2's
rectangular AP; Recall@K and mAP@R of the category benchmarks)."""
from __future__ import annotations

from typing import Optional

import numpy as np

from locore_plugin.progress import progress

from .datasets import KAPPAS, EvalData, EvaluationError
from .metrics import ap_at_r, compute_map, compute_map_at, recall_hits
from .protocols import CATEGORY, GLDV2, GLDV2_MAP_DEPTH, Protocol, dataset_protocols, prepare_ranking, query_rows
from .ranking import RankingTail
from .sharding import FinishedQueries, Shard

CATEGORY_BLOCK = 4096  # queries scored at once on a category benchmark (SOP: 60,502 queries x 1,000 ranks)


def rerank_top(reranker, queries, gallery, ranking, scores, kept, top_k: int, batch_size: int = 8, desc: str = "",
               shard: Optional[Shard] = None, finished: Optional[FinishedQueries] = None):
    """Let ``reranker`` re-order the first ``min(top_k, kept[q])`` images of each ranking row.

    ``gallery(ids)`` returns the ImageFeatures of gallery images ``ids``; ``scores`` (aligned
    with ``ranking``) are the global scores handed to the re-ranker. Returns a new ranking.

    ``shard``: this process's share of the query batches (torchrun); every rank returns the whole
    ranking, the heads gathered from all. ``finished``: heads of queries re-ranked before (read
    first, never re-ranked) and kept as they finish, so a killed run resumes. One progress bar
    (queries/s, ETA) counts the queries of every rank.
    """
    shard = shard or Shard()
    out = ranking.copy()
    nq = len(queries)
    done = finished.load() if finished is not None else {}
    for q, head in done.items():
        out[q, : len(head)] = head
    batches = [range(start, min(start + batch_size, nq)) for start in range(0, nq, batch_size)]
    todo = [batch for batch in batches if any(q not in done for q in batch)]
    mine = todo[shard.rank :: shard.world_size]
    steps = -(-len(todo) // shard.world_size)  # the same number of collective steps on every rank
    computed = {}
    with progress(total=nq, initial=sum(len(b) for b in batches) - sum(len(b) for b in todo), desc=desc or "re-ranking",
                  unit="query", leave=False, disable=not shard.is_main) as bar:
        for step in range(steps):
            batch = mine[step] if step < len(mine) else range(0)
            if len(batch):
                depth = [min(top_k, int(kept[q])) for q in batch]
                ids = [ranking[q, :d] for q, d in zip(batch, depth)]
                results = reranker.rerank_many(
                    [queries[q] for q in batch], [gallery(i) for i in ids], [scores[q, :d] for q, d in zip(batch, depth)]
                )
                for q, i, result in zip(batch, ids, results):
                    order = np.asarray(result.order)
                    if not np.array_equal(np.sort(order), np.arange(len(i))):
                        raise EvaluationError(f"{reranker!r} returned an order that is not a permutation of the shortlist")
                    computed[q] = i[order]
                    if finished is not None:
                        finished.add(q, computed[q])
            bar.update(shard.total(len(batch)))
    if finished is not None:
        finished.flush()
    for part in shard.gather(computed):
        for q, head in part.items():
            out[q, : len(head)] = head
    return out


def score_ranking(ranking: np.ndarray, gnd, protocol: Protocol, metric: str = "standard", kappas=KAPPAS,
                  dataset: str = "", head=None, tail: Optional[RankingTail] = None) -> dict:
    """mAP, mP@k and per-query AP of rankings [nq, n] under ``protocol`` (fractions, not x100).

    GLDv2 protocols score, as the AMES / ELViS ``compute_metrics``, the first 100 of each ranking by
    rectangular AP (normalised by min(positives, 100); no positive there: AP 0), over their queries.

    ``head`` (images re-ranked per query) adds ``shortlist_positives``: the protocol's positives
    among them, per scored query, the colouring of the supplementary's Figure A.

    Category protocols (``gnd`` a :class:`~locore_plugin.evaluation.datasets.CategoryTruth`)
    score Recall@k (per query: a same-label image in the top k) or mAP@R (per query: AP@R) of
    the ranked lists, queries in blocks so that memory stays bounded.

    ``tail`` (a :class:`~locore_plugin.evaluation.ranking.RankingTail`): ``ranking`` is the head
    of each full global ranking (re-ranked or not), scored at the positions the full ranking gives."""
    if protocol.scoring == CATEGORY:
        return _score_categories(ranking, gnd, protocol, head)
    rows = query_rows(protocol, len(gnd), dataset) if protocol.scoring == GLDV2 else np.arange(len(gnd))
    scoring = protocol.scoring_gnd([gnd[q] for q in rows])
    if protocol.scoring == GLDV2:
        mean_ap, aps, mpr, _ = compute_map(ranking[rows, :GLDV2_MAP_DEPTH].T, scoring, kappas, truncated=True, rectangular=True)
    elif tail is not None:
        mean_ap, aps, mpr, _ = compute_map_at(lambda q, ids: tail.positions(q, ranking[q], np.unique(ids)), scoring,
                                              tail.size, kappas, truncated=metric == "truncated")
    else:
        mean_ap, aps, mpr, _ = compute_map(ranking.T, scoring, kappas, truncated=metric == "truncated")
    out = {"value": float(mean_ap), "mP@k": [float(v) for v in mpr],
           "per_query": [None if np.isnan(a) else float(a) for a in aps]}
    if head is not None:
        out["shortlist_positives"] = [
            int(np.isin(ranking[q, : int(head[q])], entry["ok"]).sum()) for q, entry in zip(rows, scoring)
        ]
    return out


def _score_categories(ranking: np.ndarray, truth, protocol: Protocol, head=None) -> dict:
    per_query, positives = np.empty(len(truth)), np.empty(len(truth), np.int64)
    for start in range(0, len(truth), CATEGORY_BLOCK):
        rows = slice(start, start + CATEGORY_BLOCK)
        ranks, labels = ranking[rows].T, truth.query_labels[rows]
        if protocol.k:
            per_query[rows] = recall_hits(ranks, labels, truth.gallery_labels, [protocol.k])[0]
        else:
            per_query[rows] = ap_at_r(ranks, labels, truth.gallery_labels, exclude_self=truth.exclude_self)
        if head is not None:
            depth = int(np.max(head[rows]))
            hits = truth.gallery_labels[ranking[rows, :depth]] == labels[:, None]
            positives[rows] = (hits & (np.arange(depth) < np.asarray(head[rows])[:, None])).sum(1)
    out = {"value": float(per_query.mean()), "per_query": per_query.tolist()}
    if head is not None:
        out["shortlist_positives"] = positives.tolist()
    return out


class DatasetEvaluation:
    """One dataset under a set of protocols: shortlists prepared once, any re-ranker scored on them.

    Protocols whose shortlist rule is the same (Medium and Hard always are) share one re-ranking.
    """

    def __init__(self, data: EvalData, protocols, junk: str, metric: str = "standard", kappas=KAPPAS):
        self.data, self.metric, self.kappas = data, metric, kappas
        self.groups = []  # (protocols, ranking, aligned scores, images per query that may be shortlisted)
        by_rule: dict[tuple, list[Protocol]] = {}
        for p in dataset_protocols(data.name, protocols):
            by_rule.setdefault(p.removed_keys(junk), []).append(p)
        for members in by_rule.values():
            order, kept = prepare_ranking(data.ranking, data.gnd, members[0], junk)
            self.groups.append((
                members, np.take_along_axis(data.ranking, order, 1), np.take_along_axis(data.scores, order, 1), kept,
            ))

    def run(self, reranker=None, top_k: int = 100, batch_size: int = 8, label: str = "", features=None,
            shard: Optional[Shard] = None, finished_stem=None) -> dict:
        """``{protocol name: score_ranking(...)}`` for ``reranker`` (None = the global ranking).

        ``features``: where the re-ranker's inputs come from, an object with ``queries`` and
        ``gallery(ids)`` (default: the descriptor files; e.g. an ``ImageFeatureSource``);
        ``shard`` and ``finished_stem`` (the finished queries' files, one per shortlist rule) as
        in :func:`rerank_top`."""
        label = label or getattr(reranker, "name", "") or type(reranker).__name__
        if reranker is not None:
            self.check_depth(top_k)
        source = features or self.data
        shard = shard or Shard()
        out = {}
        for rule, (members, ranking, scores, kept) in enumerate(self.groups):
            finished = None if finished_stem is None else FinishedQueries(f"{finished_stem}-{rule}", shard.rank)
            final = ranking if reranker is None else rerank_top(
                reranker, source.queries, source.gallery, ranking, scores, kept, top_k, batch_size,
                desc=f"{label} on {self.data.name} ({'/'.join(p.label for p in members)})", shard=shard, finished=finished,
            )
            head = None if reranker is None else np.minimum(top_k, kept)
            for p in members:
                out[p.name] = self.score(final, p, head)
        return out

    def check_depth(self, top_k: int) -> None:
        """Refuse to re-rank fewer than ``top_k`` images where the full ranking has them: the held
        head of a full ranking (``EvalData.tail``) is as deep as the ``top_k`` it was loaded for."""
        if self.data.tail is None:
            return
        for _, ranking, _, kept in self.groups:
            if ranking.shape[1] < self.data.tail.size and (kept < top_k).any():
                raise EvaluationError(f"{self.data.name}: the global ranking was loaded with a head of {ranking.shape[1]} "
                                      f"images, too short to re-rank the top {top_k} after the protocol's removals; "
                                      f"load the dataset with top_k >= {top_k}")

    def score(self, ranking: np.ndarray, protocol: Protocol, head=None) -> dict:
        """:func:`score_ranking` of final rankings of this dataset (its global head, re-ordered)."""
        return score_ranking(ranking, self.data.gnd, protocol, self.metric, self.kappas, self.data.name, head,
                             self.data.tail)
