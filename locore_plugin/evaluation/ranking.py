"""The global ranking of a revisited dataset without holding it whole.

revisitop's standard mAP reads the position of every positive in the *full* ranking of the
gallery (ROxford+1M: 1,001,001 images per query), but a re-ranker only ever changes its head.
So the ranking is kept as its head (the first ``depth`` images, what the re-rankers re-order)
and, for the images the ground truth names (easy, hard, junk), their positions in the full
ranking: the count of gallery images ranked before them, accumulated over blocks of the
gallery. Neither a queries x gallery matrix nor a full argsort is ever formed, and the result
equals ``np.argsort(-sims, kind="stable")`` exactly, ties included: each score is turned into a
unique integer key (descending score, then ascending index), so top-k and counts are exact.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np
import torch

from locore_plugin.progress import progress

_INDEX_BITS = 31  # gallery indices below 2**31 share an int64 key with a 32-bit score
_INDEX_MASK = (1 << _INDEX_BITS) - 1
_NO_KEY = np.iinfo(np.int64).max  # ranks behind every real key (padding, images taken out)


class RankingError(ValueError):
    """Global descriptors that cannot be ranked (NaN, mismatched dimensions, too large a gallery)."""


@dataclass(frozen=True)
class RankingTail:
    """Where the images each query's ground truth names stand in its full global ranking.

    ``named[q]`` (sorted gallery ids) and ``ranks[q]`` (their 0-based positions in the full
    ranking of ``size`` images)."""

    named: list
    ranks: list
    size: int

    def positions(self, q: int, row: np.ndarray, ids) -> np.ndarray:
        """0-based positions of gallery ``ids`` (named by query q's ground truth) in the full
        ranking whose first ``len(row)`` images are ``row`` and whose rest is the global order.

        ``row`` must hold the same images as the global head of that length, in any order (a
        re-ranked or protocol-reordered head): then every image behind it keeps its global position."""
        ids = np.asarray(ids, np.int64).ravel()
        named = self.named[q]
        where = np.searchsorted(named, ids)
        if ids.size and ((where >= named.size) | (named[np.minimum(where, named.size - 1)] != ids)).any():
            raise ValueError(f"query {q}: ids {ids[:5].tolist()}... are not all among the images its ground truth names")
        pos = self.ranks[q][where].copy()
        in_head = pos < len(row)
        if in_head.any():
            order = np.argsort(row, kind="stable")
            pos[in_head] = order[np.searchsorted(row[order], ids[in_head])]
        return pos


def ranking_keys(sims: np.ndarray, first_index: int) -> np.ndarray:
    """Unique int64 keys [nq, B] of gallery images ``first_index ..`` that sort as the global
    ranking does: a higher score first, equal scores by ascending index (a stable argsort of
    ``-sims``; -0.0 equals +0.0 there, so it does here)."""
    bits = (np.asarray(sims, np.float32) + np.float32(0)).view(np.int32).astype(np.int64)
    ascending = np.where(bits < 0, bits ^ 0x7FFFFFFF, bits)  # monotone in the float value
    descending = (1 << 31) - 1 - ascending  # in [0, 2**32)
    index = np.arange(first_index, first_index + sims.shape[1], dtype=np.int64)
    return (descending << _INDEX_BITS) | index


def _decode(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(gallery ids, float32 scores) of ``ranking_keys``."""
    ascending = (1 << 31) - 1 - (keys >> _INDEX_BITS)
    bits = np.where(ascending < 0, ascending ^ 0x7FFFFFFF, ascending).astype(np.int32)
    return keys & _INDEX_MASK, bits.view(np.float32)


def _gallery_blocks(gallery_global):
    """(size, iterator of (first index, [b, D] float32 block)) of an array or a DescriptorSet."""
    if hasattr(gallery_global, "global_batches"):
        return len(gallery_global), gallery_global.global_batches
    array = np.asarray(gallery_global, np.float32)
    return len(array), lambda: iter([(0, array)])


def _pad(lists: Sequence[np.ndarray], fill) -> np.ndarray:
    width = max((len(v) for v in lists), default=0)
    out = np.full((len(lists), width), fill, np.int64)
    for q, v in enumerate(lists):
        out[q, : len(v)] = v
    return out


def global_ranking(query_global, gallery_global, depth: int, named: Optional[Sequence] = None,
                   nn: Optional[tuple[np.ndarray, np.ndarray]] = None):
    """The head of each query's global ranking and the full-ranking positions of ``named`` images.

    ``gallery_global``: an [N, D] array or a DescriptorSet (read block by block, twice: the
    first pass finds the head and the keys of the named images, the second counts what ranks
    before them). Scores are the inner products of each block, as an exact search gives them.
    With a published shortlist ``nn = (scores [nq, K], indices [nq, K])`` its K images come
    first, in its order and with its scores (what the official code hands the re-rankers), and
    the rest follow by score.

    Returns ``(ranking [nq, min(depth, N)], scores aligned with it, RankingTail)``.
    """
    queries = np.asarray(query_global, np.float32)
    size, blocks = _gallery_blocks(gallery_global)
    if size >= 1 << _INDEX_BITS:
        raise RankingError(f"a gallery of {size} images is too large to rank (at most {(1 << _INDEX_BITS) - 1})")
    nq, depth = len(queries), min(int(depth), size)
    if depth < 1:
        raise RankingError(f"a ranking head of depth {depth} asked (gallery of {size} images)")
    named = [np.unique(np.asarray(v, np.int64)) for v in (named if named is not None else [()] * nq)]
    if len(named) != nq:
        raise RankingError(f"{len(named)} named-image lists for {nq} queries")
    outside = [q for q, v in enumerate(named) if v.size and (v[0] < 0 or v[-1] >= size)]
    if outside:
        raise RankingError(f"the ground truth of queries {outside[:10]} names images outside the gallery of {size}")
    nn_ids = np.zeros((nq, 0), np.int64) if nn is None else np.asarray(nn[1], np.int64)
    if nn_ids.shape[0] != nq:
        raise RankingError(f"the shortlist has {nn_ids.shape[0]} rows for {nq} queries")
    listed = nn_ids.shape[1]
    named_ids = _pad(named, -1)
    shortlisted = np.concatenate([nn_ids, named_ids], 1)  # keys gathered in the first pass
    gathered = np.full(shortlisted.shape, _NO_KEY, np.int64)
    best = np.zeros((nq, 0), np.int64)  # the running head of the images the shortlist does not list
    rows = np.arange(nq)[:, None]

    def keys_of(start, block):
        if block.shape[1] != queries.shape[1]:
            raise RankingError(f"gallery global dimension {block.shape[1]} != query global dimension {queries.shape[1]}")
        sims = queries @ block.T
        if np.isnan(sims).any():
            raise RankingError(f"NaN global similarities for gallery images {start}..{start + len(block) - 1}")
        keys = ranking_keys(sims, start)
        inside = (nn_ids >= start) & (nn_ids < start + len(block))
        keys[rows.repeat(listed, 1)[inside], nn_ids[inside] - start] = _NO_KEY  # ranked by the shortlist instead
        return keys

    with progress(total=2 * size, desc="global ranking", unit="img", leave=False, disable=size < 100_000) as bar:
        for start, block in blocks():
            keys = keys_of(start, block)
            inside = (shortlisted >= start) & (shortlisted < start + len(block))
            local = np.clip(shortlisted - start, 0, len(block) - 1)
            gathered = np.where(inside, np.take_along_axis(keys, local, 1), gathered)
            best = np.concatenate([best, keys], 1)
            if best.shape[1] > depth:
                best = np.partition(best, depth - 1, axis=1)[:, :depth]
            bar.update(len(block))
        named_keys = gathered[:, listed:]
        sorted_keys = torch.from_numpy(np.sort(named_keys, 1))
        before = torch.zeros((nq, named_keys.shape[1] + 1), dtype=torch.int64)
        for start, block in blocks():
            keys = torch.from_numpy(keys_of(start, block))
            # an image ranks before named key j when its key is smaller: j >= #named keys <= it
            slot = torch.searchsorted(sorted_keys, keys, right=True)
            before.scatter_add_(1, slot, torch.ones_like(slot))
            bar.update(len(block))
    before = before.cumsum(1)[:, :-1].numpy()  # per sorted named key: the images ranked before it

    ranks = []
    for q in range(nq):
        order = np.argsort(named_keys[q, : len(named[q])], kind="stable")
        rank = np.empty(len(named[q]), np.int64)
        rank[order] = before[q, : len(named[q])]
        if listed:  # the shortlist's images first; the others count only the unlisted before them
            in_list = np.isin(named[q], nn_ids[q])
            sorter = np.argsort(nn_ids[q], kind="stable")
            rank += listed
            rank[in_list] = sorter[np.searchsorted(nn_ids[q][sorter], named[q][in_list])]
        ranks.append(rank)

    best = np.sort(best, 1)
    ids, sims = _decode(best)
    index_dtype = np.int32  # every gallery index fits (checked above)
    if listed:
        nn_scores = np.asarray(nn[0], np.float32)
        ids = np.concatenate([nn_ids, ids], 1)[:, :depth]
        sims = np.concatenate([nn_scores, sims], 1)[:, :depth]
    return ids.astype(index_dtype), sims.astype(np.float32), RankingTail(named, ranks, size)
