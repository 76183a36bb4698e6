"""The interface every image re-ranker implements, whatever its method."""
from __future__ import annotations

import abc
from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional, Sequence

import numpy as np

from locore_plugin.features import ImageFeatures, stack_globals

if TYPE_CHECKING:  # torch is imported lazily: the interface alone does not need it
    import torch


@dataclass(frozen=True, eq=False)
class RerankResult:
    """``order``: indices into the shortlist, best first (a permutation).
    ``scores``: one score per shortlist item, aligned with the shortlist, higher = more similar."""

    order: np.ndarray
    scores: np.ndarray


class ImageReranker(abc.ABC):
    """Re-ranks a shortlist of gallery images for a query image.

    Subclasses implement :meth:`_rerank_many`, which receives validated input: non-empty
    shortlists and, per query, the global similarities of its shortlist (given by the caller, or
    computed as dot products of the global descriptors; None where neither is available).
    """

    name: str = ""

    def rerank(
        self,
        query: ImageFeatures,
        shortlist: Sequence[ImageFeatures],
        global_scores: Optional[np.ndarray] = None,
    ) -> RerankResult:
        """Re-rank one query's shortlist (given in its initial order)."""
        return self.rerank_many([query], [shortlist], None if global_scores is None else [global_scores])[0]

    def rerank_many(
        self,
        queries: Sequence[ImageFeatures],
        shortlists: Sequence[Sequence[ImageFeatures]],
        global_scores: Optional[Sequence[Optional[np.ndarray]]] = None,
    ) -> list[RerankResult]:
        """Re-rank many queries at once; the same semantics as :meth:`rerank` per query."""
        if len(queries) != len(shortlists):
            raise ValueError(f"{len(queries)} queries but {len(shortlists)} shortlists")
        if global_scores is not None and len(global_scores) != len(queries):
            raise ValueError(f"{len(queries)} queries but {len(global_scores)} global score arrays")
        resolved = []
        for i, (query, shortlist) in enumerate(zip(queries, shortlists)):
            if not isinstance(query, ImageFeatures) or not all(isinstance(d, ImageFeatures) for d in shortlist):
                raise TypeError("queries and shortlist items must be ImageFeatures")
            if len(shortlist) == 0:
                raise ValueError(f"query {i}: the shortlist is empty")
            resolved.append(_global_scores(query, shortlist, None if global_scores is None else global_scores[i], i))
        return self._rerank_many(list(queries), [list(s) for s in shortlists], resolved)

    def head_logits(self, queries: Sequence[ImageFeatures], shortlists: Sequence[Sequence[ImageFeatures]]) -> list[np.ndarray]:
        """The raw logits of each shortlist's re-ranked head (its first ``top_k`` items, in
        shortlist order), before the ``fusion=(weight, temperature)`` step of
        :func:`~locore_plugin.fusion.fuse_scores`: ranking the head by ``fuse_scores(global, logits,
        *fusion)`` is what :meth:`rerank_many` does. ``locore-plugin tune`` searches the fusion on
        them, scoring each list once. Re-rankers without that step do not implement it."""
        raise NotImplementedError(f"{type(self).__name__} has no fusion step to tune")

    def extractor_options(self) -> dict:
        """Options that the extractor this re-ranker registers needs from it to produce what it
        reads (CVNet's dense maps come from the backbone of its own checkpoint); the rerankers
        bridge passes them when it builds that extractor for raw images. Empty for most methods."""
        return {}

    @abc.abstractmethod
    def _rerank_many(
        self,
        queries: list[ImageFeatures],
        shortlists: list[list[ImageFeatures]],
        global_scores: list[Optional[np.ndarray]],
    ) -> list[RerankResult]:
        """Re-rank validated input."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _global_scores(query, shortlist, given, index) -> Optional[np.ndarray]:
    if given is not None:
        scores = np.asarray(given, dtype=np.float32)
        if scores.shape != (len(shortlist),):
            raise ValueError(f"query {index}: global_scores must have shape ({len(shortlist)},), got {scores.shape}")
        if not np.isfinite(scores).all():
            raise ValueError(f"query {index}: global_scores contain NaN or Inf")
        return scores
    if query.global_desc is None or any(d.global_desc is None for d in shortlist):
        return None
    gallery = stack_globals(shortlist)
    if gallery.shape[1] != query.global_desc.shape[0]:
        raise ValueError(
            f"query {index}: query global descriptor has dimension {query.global_desc.shape[0]}, "
            f"shortlist global descriptors have {gallery.shape[1]}"
        )
    return gallery @ query.global_desc


def with_tail(head: RerankResult, incoming: Optional[np.ndarray], length: int) -> RerankResult:
    """The one rule for a re-ranker that re-orders only the first ``len(head.order)`` items of a
    shortlist of ``length`` (its ``top_k``): the head in its new order with its new scores, then the
    tail in its incoming order with its incoming scores (0 where there are none)."""
    depth = len(head.order)
    if len(head.scores) != depth or depth > length:
        raise ValueError(f"a head of {depth} items (with {len(head.scores)} scores) does not fit a shortlist of {length}")
    tail = np.zeros(length - depth, np.float32) if incoming is None else np.asarray(incoming, np.float32)[depth:length]
    return RerankResult(order=np.concatenate([head.order, np.arange(depth, length)]).astype(np.int64),
                        scores=np.concatenate([head.scores, tail]).astype(np.float32))


def ranked(scores: np.ndarray) -> RerankResult:
    """The result that orders a shortlist by descending score (stable for ties)."""
    scores = np.asarray(scores, dtype=np.float32)
    return RerankResult(order=np.argsort(-scores, kind="stable"), scores=scores)


class TrainableReranker(ImageReranker):
    """A re-ranker with learnable weights: what the shared training loop needs from a method.

    The loop feeds lists (a query, its global shortlist, 0/1 labels: same instance or not); the
    method decides how they become a loss (list-wise: every gallery token; pair-wise: sampled
    positive/negative pairs).
    """

    module: "torch.nn.Module"  # the parameters the trainer optimises (wrapped in DDP by the trainer)

    @abc.abstractmethod
    def training_loss(
        self,
        queries: list[ImageFeatures],
        shortlists: list[list[ImageFeatures]],
        labels: list[np.ndarray],
        module: Optional["torch.nn.Module"] = None,
    ) -> "torch.Tensor":
        """Mean loss of a batch of lists, computed through ``module`` (default ``self.module``;
        the trainer passes its DDP wrapper)."""

    # Whether :meth:`distillation_loss` is implemented (the trainer checks it before it builds a teacher).
    supports_distillation: bool = False

    def distillation_loss(
        self,
        queries: list[ImageFeatures],
        shortlists: list[list[ImageFeatures]],
        labels: list[np.ndarray],
        teacher: "TrainableReranker",
        weight: float,
        module: Optional["torch.nn.Module"] = None,
    ) -> "torch.Tensor":
        """The training loss plus ``weight`` times a term that pulls this model's outputs towards
        those of a frozen ``teacher`` (e.g. a binarised AMES from its full-precision model)."""
        raise NotImplementedError(f"{type(self).__name__} cannot be trained by distillation")

    @abc.abstractmethod
    def save_pretrained(self, directory) -> None:
        """Write the weights (safetensors, official key names) and config so that
        ``create_reranker(name, checkpoint=directory)`` loads them."""
