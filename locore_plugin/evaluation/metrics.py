"""Retrieval metrics: revisited Oxford/Paris mAP and mP@k, and the category-level Recall@K / mAP@R.

``compute_map`` follows revisitop's ``python/evaluate.py`` (filipradenovic/revisitop) exactly:
trapezoidal AP, junk deleted from the ranked list before scoring, queries without positives
NaN and left out of the means, and its mP@k quirk ``kq = min(max positive position, k)``.
``truncated=True`` switches to the variant of the AMES / LoCoRE evaluation code for top-K lists.
"""
from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np

# revisitop's E/M/H ground-truth splits: (ok keys, junk keys). The evaluation protocols built on
# them (Medium, Hard, Hard*: which images take part in re-ranking) are locore_plugin.evaluation.protocols.
GND_SPLITS = {
    "easy": (("easy",), ("junk", "hard")),
    "medium": (("easy", "hard"), ("junk",)),
    "hard": (("hard",), ("junk", "easy")),
}
_SHORT = {"e": "easy", "m": "medium", "h": "hard"}


def revisited_gnd(gnd: Sequence[Mapping], protocol: str) -> list[dict[str, np.ndarray]]:
    """Per-query ``{"ok", "junk"}`` index arrays of a revisited protocol.

    ``gnd`` is the ``"gnd"`` list of ``gnd_roxford5k.pkl`` / ``gnd_rparis6k.pkl`` (dicts with
    ``easy``, ``hard``, ``junk``). ``protocol``: ``easy`` (ok = easy, junk = junk + hard),
    ``medium`` (ok = easy + hard, junk = junk) or ``hard`` (ok = hard, junk = junk + easy), or
    their initials E/M/H, as revisitop's ``example_evaluate.py`` builds them.
    """
    if isinstance(gnd, Mapping):
        raise TypeError("revisited_gnd takes the per-query list (the pickle's 'gnd' entry), not the whole pickle")
    name = _SHORT.get(protocol.lower(), protocol.lower())
    if name not in GND_SPLITS:
        raise ValueError(f"unknown protocol {protocol!r}; expected one of {sorted(GND_SPLITS)} or E/M/H")
    ok_keys, junk_keys = GND_SPLITS[name]
    out = []
    for q, entry in enumerate(gnd):
        missing = [k for k in (*ok_keys, *junk_keys) if k not in entry]
        if missing:
            raise KeyError(f"gnd entry {q} lacks {missing} (has {sorted(entry)})")
        out.append({
            "ok": np.concatenate([np.asarray(entry[k], dtype=np.int64).ravel() for k in ok_keys]),
            "junk": np.concatenate([np.asarray(entry[k], dtype=np.int64).ravel() for k in junk_keys]),
        })
    return out


def compute_map(ranks, gnd: Sequence[Mapping], kappas: Sequence[int] = (1, 5, 10), *, truncated: bool = False,
                rectangular: bool = False):
    """revisitop's mAP and mean precision at ``kappas``: returns ``(map, aps, mpr, prs)``.

    ``ranks`` is [n, nq]: column q holds query q's 0-based database indices, best first (a full
    ranking, n = database size). ``gnd[q]`` has ``ok`` and optionally ``junk`` index lists.
    ``aps`` [nq] and ``prs`` [nq, len(kappas)] are per query; queries with an empty ``ok`` are NaN
    and excluded from ``map`` and ``mpr``.

    ``truncated=True`` is the AMES / LoCoRE variant for top-K lists (never the default): AP is
    normalised by ``min(len(ok), n)`` (n counted before junk removal), and a query with no positive
    in its list scores AP = 0 and P@k = 0 and still counts. Without it, such a query is an error,
    as in the official code; on full rankings both give identical numbers.

    ``rectangular=True`` scores AP as the mean precision at each positive (``compute_rectangular_ap``
    of the AMES / ELViS ``utils/revisited.py``, their GLDv2 metric) instead of by trapezoids.
    """
    ranks = _check_ranks(ranks, len(gnd), "compute_map")
    return compute_map_at(lambda q, ids: np.flatnonzero(np.isin(ranks[:, q], ids)), gnd, ranks.shape[0], kappas,
                          truncated=truncated, rectangular=rectangular)


def compute_map_at(locate, gnd: Sequence[Mapping], n: int, kappas: Sequence[int] = (1, 5, 10), *,
                   truncated: bool = False, rectangular: bool = False):
    """:func:`compute_map` of rankings known only through ``locate(q, ids)``: the 0-based
    positions in query q's ranked list (of ``n`` items) of those of gallery ``ids`` it lists
    (in any order). This scores a full ranking that is never held whole (see
    :class:`locore_plugin.evaluation.ranking.RankingTail`)."""
    kappas = np.asarray(kappas, dtype=np.int64).reshape(-1)
    if (kappas < 1).any():
        raise ValueError(f"kappas must be positive, got {kappas.tolist()}")
    nq = len(gnd)
    aps = np.zeros(nq)
    prs = np.zeros((nq, len(kappas)))
    empty = np.zeros(nq, bool)
    for q in range(nq):
        ok = np.asarray(gnd[q]["ok"], dtype=np.int64).ravel()
        if ok.size == 0:
            aps[q] = np.nan
            prs[q] = np.nan
            empty[q] = True
            continue
        junk = np.asarray(gnd[q].get("junk", ()), dtype=np.int64).ravel()
        pos = np.sort(locate(q, ok))
        if pos.size == 0:
            if not truncated:
                raise ValueError(
                    f"query {q} has no positive in its ranked list of {n} items: the standard revisitop "
                    "compute_map needs full rankings (pass truncated=True for the AMES/LoCoRE top-K variant)"
                )
            continue  # AP 0, P@k 0, counted in the mean
        # Junk is deleted from the list: shift each positive up by the junk ranked before it.
        pos = pos - np.searchsorted(np.sort(locate(q, junk)) if junk.size else junk, pos)
        nres = min(ok.size, n) if truncated else ok.size
        aps[q] = _rectangular_ap(pos, nres) if rectangular else _trapezoidal_ap(pos, nres)
        pos1 = pos + 1
        kq = np.minimum(pos1.max(), kappas)
        prs[q] = (pos1[None, :] <= kq[:, None]).sum(1) / kq
    counted = int((~empty).sum())
    if counted == 0:
        return float("nan"), aps, np.full(len(kappas), np.nan), prs
    mean_ap = float(aps[~empty].sum() / counted)
    mpr = prs[~empty].sum(0) / counted
    return mean_ap, aps, mpr, prs


def _rectangular_ap(pos: np.ndarray, nres: int) -> float:
    """Sum of the precision at each positive over ``nres``; ``pos`` are junk-free 0-based positions."""
    return float(((np.arange(pos.size) + 1.0) / (pos + 1.0)).sum() / nres)


def _trapezoidal_ap(pos: np.ndarray, nres: int) -> float:
    """Area under the PR curve by trapezoids; ``pos`` are junk-free 0-based positive positions."""
    j = np.arange(pos.size, dtype=np.float64)
    rank = pos.astype(np.float64)
    p0 = np.divide(j, rank, out=np.ones_like(j), where=rank != 0)
    p1 = (j + 1) / (rank + 1)
    return float(((p0 + p1) / 2 / nres).sum())


def recall_at_k(ranks, query_labels, gallery_labels, ks: Sequence[int] = (1, 10, 100)) -> np.ndarray:
    """Category-level Recall@K (SOP, In-shop, CUB-200): share of queries with a same-label item in the top K.

    ``ranks`` [n, nq] as in :func:`compute_map` (the query itself already left out where queries
    are gallery images). Returns one value per ``k``, as a fraction.
    """
    return recall_hits(ranks, query_labels, gallery_labels, ks).mean(1)


def recall_hits(ranks, query_labels, gallery_labels, ks: Sequence[int]) -> np.ndarray:
    """[len(ks), nq] bool: whether each query has a same-label item in its top k (the terms of Recall@k)."""
    ks = np.asarray(ks, dtype=np.int64).reshape(-1)
    n = np.asarray(ranks).shape[0] if np.ndim(ranks) == 2 else 0
    if (ks < 1).any() or (ks > n).any():
        raise ValueError(f"ks must lie in [1, {n}] (the ranked list length), got {ks.tolist()}")
    hits = _label_hits(np.asarray(ranks)[: int(ks.max())], query_labels, gallery_labels, "recall_at_k")
    first = np.where(hits.any(0), hits.argmax(0), hits.shape[0])  # 0-based position of the first hit
    return first[None, :] < ks[:, None]


def map_at_r(ranks, query_labels, gallery_labels, *, exclude_self: bool = False) -> float:
    """Category-level mAP@R (Musgrave et al., 2020): mean over queries of ``1/R Σ_{i≤R} P@i·rel(i)``.

    R is the number of gallery items sharing the query's label, minus one with ``exclude_self``
    (queries are gallery images and ``ranks`` omits each query itself). ``ranks`` [n, nq] must hold
    at least R rows for every query.
    """
    return float(ap_at_r(ranks, query_labels, gallery_labels, exclude_self=exclude_self).mean())


def relevant_counts(query_labels, gallery_labels, *, exclude_self: bool = False) -> np.ndarray:
    """R per query: the gallery items sharing its label (minus itself with ``exclude_self``)."""
    query_labels = np.asarray(query_labels).ravel()
    values, counts = np.unique(np.asarray(gallery_labels).ravel(), return_counts=True)
    where = np.searchsorted(values, query_labels).clip(0, len(values) - 1)
    return np.where(values[where] == query_labels, counts[where], 0) - int(exclude_self)


def ap_at_r(ranks, query_labels, gallery_labels, *, exclude_self: bool = False) -> np.ndarray:
    """[nq] the per-query terms of :func:`map_at_r` (AP within the first R)."""
    r = relevant_counts(query_labels, gallery_labels, exclude_self=exclude_self)
    if (r < 1).any():
        raise ValueError(f"queries {np.flatnonzero(r < 1)[:10].tolist()} have no relevant gallery item")
    n = np.asarray(ranks).shape[0] if np.ndim(ranks) == 2 else 0
    if r.max() > n:
        raise ValueError(f"mAP@R needs R = {int(r.max())} ranked items for some query, the lists hold {n}")
    hits = _label_hits(np.asarray(ranks)[: int(r.max())], query_labels, gallery_labels, "map_at_r")
    depth = np.arange(1, hits.shape[0] + 1)[:, None]
    relevant = hits & (depth <= r[None, :])
    precision = np.cumsum(relevant, 0) / depth
    return (precision * relevant).sum(0) / r


def _label_hits(ranks, query_labels, gallery_labels, caller: str) -> np.ndarray:
    """[n, nq] bool: whether the item at each rank shares its query's label."""
    query_labels = np.asarray(query_labels).ravel()
    gallery_labels = np.asarray(gallery_labels).ravel()
    ranks = _check_ranks(ranks, len(query_labels), caller)
    if ranks.size and ranks.max() >= len(gallery_labels):
        raise ValueError(f"{caller}: ranks index {int(ranks.max())} but there are {len(gallery_labels)} gallery labels")
    return gallery_labels[ranks] == query_labels[None, :]


def _check_ranks(ranks, nq: int, caller: str) -> np.ndarray:
    ranks = np.asarray(ranks)
    if ranks.ndim != 2:
        raise ValueError(f"{caller}: ranks must have shape [n, nq] (one column per query), got {ranks.shape}")
    if ranks.shape[1] != nq:
        raise ValueError(f"{caller}: ranks has {ranks.shape[1]} columns but there are {nq} queries (shape is [n, nq])")
    if ranks.shape[0] == 0:
        raise ValueError(f"{caller}: ranks is empty")
    if not np.issubdtype(ranks.dtype, np.integer):
        if not np.issubdtype(ranks.dtype, np.floating) or not np.all(ranks == np.round(ranks)):
            raise ValueError(f"{caller}: ranks must hold integer indices, got dtype {ranks.dtype}")
        ranks = ranks.astype(np.int64)
    if (ranks < 0).any():
        raise ValueError(f"{caller}: ranks holds negative indices")
    return ranks
