"""Sliding-window list-wise re-ranking, as LoCoRE's official evaluation does it (``eval_revisitop.py``).

A list-wise model sees one query and ``window`` candidates at a time. The first ``top_k``
candidates are re-ranked by sliding that window over them (end to start by default: starts
``S-K, S-K-stride, ..., 0``); each window is scored by the model, fused with the global
similarity, re-sorted and written back in place, so a strong candidate can climb from the last
window to the top. Candidates beyond the shortlist keep their global order.

The procedure is method-agnostic: it takes a callable that scores windows, and hands it the
windows of several queries at once (one per query and step) so that they share a forward pass.
"""
from __future__ import annotations

from typing import Callable, Sequence

import numpy as np

from locore_plugin.fusion import fuse_scores
from locore_plugin.interface import RerankResult, with_tail
from locore_plugin.progress import progress as progress_bar

ORDERS = ("end-to-start", "start-to-end")

#: ``score_windows([(query_index, candidate_positions), ...]) -> [logits, ...]``: one raw score per
#: candidate of each window, the candidates given as positions in that query's shortlist, in feed order.
WindowScorer = Callable[[list[tuple[int, np.ndarray]]], list[np.ndarray]]


def window_starts(length: int, window: int, stride: int, order: str = "end-to-start") -> list[int]:
    """Start positions of the windows over ``length`` candidates, in the order they are scored.

    The official ``range(S - K, -stride, -stride)``; a list shorter than the window is one window.
    Where ``S - K`` is not a multiple of ``stride`` the official range ends with a negative start
    (an empty or wrapped slice); here the starts stop above 0 and a final window at 0 is added so
    that the top candidates are scored too. ``start-to-end`` is the same windows in reverse order (the official
    ``range(0, S - stride, stride)`` whenever ``window = 2 * stride``, as in every official setting).
    """
    if window < 1 or stride < 1:
        raise ValueError(f"window and stride must be >= 1, got window={window}, stride={stride}")
    if order not in ORDERS:
        raise ValueError(f"unknown sliding order {order!r}; use one of {ORDERS}")
    if length < 1:
        raise ValueError("cannot slide a window over an empty list")
    starts = list(range(max(length - window, 0), -1, -stride))
    if starts[-1] != 0:
        starts.append(0)
    return starts if order == "end-to-start" else starts[::-1]


def sliding_rerank(
    global_scores: Sequence[np.ndarray],
    score_windows: WindowScorer,
    *,
    top_k: int = 400,
    window: int = 100,
    stride: int = 50,
    order: str = "end-to-start",
    fusion: tuple[float, float] = (0.5, 0.1),
    progress: bool = False,
) -> list[RerankResult]:
    """Re-rank every query's list by sliding windows; ``global_scores[q]`` is query q's list in initial order.

    Returns per query the final order (shortlist positions, best first) and, aligned with the
    list, the fused score ``alpha * g + (1 - alpha) * sigmoid(temperature * logit)``, ``fusion =
    (alpha, temperature)``, each candidate
    received in the last window that contained it; candidates beyond ``top_k`` keep their
    global score.
    """
    if top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    depths = [min(len(g), top_k) for g in global_scores]
    plans = [window_starts(d, window, stride, order) for d in depths]
    current = [np.arange(d) for d in depths]
    fused = [np.asarray(g, np.float32).copy() for g in global_scores]
    steps = max((len(p) for p in plans), default=0)
    for step in progress_bar(range(steps), desc="sliding windows", disable=not progress):
        active = [q for q, plan in enumerate(plans) if step < len(plan)]
        requests = [(q, current[q][plans[q][step] : plans[q][step] + window].copy()) for q in active]
        logits = score_windows(requests)
        if len(logits) != len(requests):
            raise RuntimeError(f"the window scorer returned {len(logits)} results for {len(requests)} windows")
        for (q, selected), raw in zip(requests, logits):
            raw = np.asarray(raw, np.float32)
            if raw.shape != selected.shape:
                raise RuntimeError(f"the window scorer returned shape {raw.shape} for a window of {len(selected)}")
            scores = fuse_scores(np.asarray(global_scores[q])[selected], raw, *fusion)
            start = plans[q][step]
            current[q][start : start + len(selected)] = selected[np.argsort(-scores, kind="stable")]
            fused[q][selected] = scores
    return [with_tail(RerankResult(order=c, scores=f[:d]), g, len(g)) for c, d, g, f in zip(current, depths, global_scores, fused)]
