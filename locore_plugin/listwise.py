"""What list-wise sequence re-rankers share: LoCoRE and any model that reads the query and a
window of gallery images as one token sequence and scores every token.

Each image is ``[global][L locals][SEP]`` (``[L locals][SEP]`` without global descriptors); the
query's block comes first. A model (``module``) takes the padded descriptors of a batch of windows
(see :meth:`ListwiseSequenceReranker._batch`) and returns 2-class logits for every token, in that
layout; an image's score is one reduction of its tokens' class-1 logits (``max-end``: the last
local slot, the official LoCoRE evaluation), windows slide over longer shortlists
(:mod:`locore_plugin.sliding_window`), and the score is fused with the global similarity. Training
is the 2-class cross-entropy on every gallery token, each labelled with its image's label.

A subclass sets ``self.module`` and ``self.config`` (``local_dim``, ``global_dim``, ``use_global``,
``num_scales``, ``tokens_per_image(L)``) and calls :meth:`configure` with the shared options.
"""
from __future__ import annotations

from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from .features import ImageFeatures, stack_globals, stack_locals
from .interface import RerankResult, TrainableReranker
from .progress import progress
from .runtime import resolve_device, resolve_dtype
from .sliding_window import ORDERS, sliding_rerank

REDUCTIONS = ("max-end", "max-sum", "max-start", "max-prod")
# The official LoCoRE ensemble: alpha * global + (1 - alpha) * sigmoid(T * logit) with alpha 0.5, T 0.1.
DEFAULT_FUSION = (0.5, 0.1)


def reduce_scores(token_logits: torch.Tensor, tokens_per_image: int, reduction: str = "max-end") -> torch.Tensor:
    """Per-gallery-image score (B, K) from token logits (B, (1 + K) * T, 2), as the official ``batch_predict``.

    The class-1 logits of each gallery image's tokens except SEP: ``max-end`` takes the last local
    slot (padded or not), ``max-start`` the first token (the global one), ``max-sum`` / ``max-prod``
    sum / multiply all of them, padded slots included.
    """
    inside = token_logits[..., 1].unflatten(1, (-1, tokens_per_image))[:, 1:, :-1]
    if reduction == "max-end":
        return inside[..., -1]
    if reduction == "max-start":
        return inside[..., 0]
    if reduction == "max-sum":
        return inside.sum(-1)
    if reduction == "max-prod":
        return inside.prod(-1)
    raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")


def image_blocks(local_projection: nn.Module, scale_embedding: nn.Module, sep: torch.Tensor,
                 global_projection: Optional[nn.Module], query_local, query_scale, query_mask, gallery_local,
                 gallery_scale, gallery_mask, query_global=None, gallery_global=None) -> tuple[torch.Tensor, torch.Tensor]:
    """The embedded images of a sequence as token blocks ``[global][L locals][SEP]``, the query's first.

    Locals are projected and get their scale's embedding; globals are projected (no global token
    when ``global_projection`` is None); ``sep`` (H,) closes every block. Inputs as a list-wise
    model's forward: query_local (B, L, Dl), query_scale / query_mask (B, L), gallery_local
    (B, K, L, Dl), gallery_scale / gallery_mask (B, K, L), query_global (B, Dg), gallery_global
    (B, K, Dg); masks True for valid descriptors. Returns tokens (B, 1 + K, T, H) and valid
    (B, 1 + K, T) (global and SEP tokens are always valid).
    """
    local = local_projection(torch.cat([query_local[:, None], gallery_local], 1))
    local = local + scale_embedding(torch.cat([query_scale[:, None], gallery_scale], 1))
    batch, images = local.shape[:2]
    parts = [local, sep.expand(batch, images, 1, -1)]
    ones = query_mask.new_ones(batch, images, 1, dtype=torch.bool)
    valid = [torch.cat([query_mask[:, None], gallery_mask], 1).bool(), ones]
    if global_projection is not None:
        if query_global is None or gallery_global is None:
            raise ValueError("this model uses global descriptors; pass query_global and gallery_global")
        parts.insert(0, global_projection(torch.cat([query_global[:, None], gallery_global], 1))[:, :, None])
        valid.insert(0, ones)
    return torch.cat(parts, 2), torch.cat(valid, 2)


def token_labels(labels: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Every gallery token carries its image's 0/1 label; query tokens are ignored (-100), as in the official loss."""
    ignored = labels.new_full((labels.shape[0], 1), -100)
    return torch.cat([ignored, labels.long()], 1).repeat_interleave(tokens_per_image, 1)


def resolve_fusion(fusion) -> tuple[float, float]:
    """``"default"`` (the official (0.5, 0.1)), None (the logit alone: alpha 0, as every method
    spells it; the sigmoid keeps the order) or (alpha, temperature) with alpha in [0, 1]."""
    if fusion is None:
        fusion = (0.0, 1.0)
    fusion = DEFAULT_FUSION if isinstance(fusion, str) and fusion == "default" else fusion
    if isinstance(fusion, str) or len(fusion) != 2:
        raise ValueError(f"fusion must be 'default', None (the logit alone) or (alpha, temperature), got {fusion!r}")
    if not 0.0 <= fusion[0] <= 1.0:
        raise ValueError(f"the fusion weight alpha must be in [0, 1], got {fusion[0]}")
    return float(fusion[0]), float(fusion[1])


class ListwiseSequenceReranker(TrainableReranker):
    """Sliding-window re-ranking of the first ``top_k`` candidates by a token-scoring sequence model."""

    method_label = "list-wise re-ranker"  # how messages name the method

    def configure(self, *, device, dtype, batch_size: int, verbose: int, length: int, window: int, stride: int,
                  top_k: int, order: str, fusion, reduction: str) -> None:
        """Validate and set the options every list-wise method shares: ``length`` locals per image
        (the query's too: every image has the same slot in the sequence), ``window`` gallery images
        per sequence moved by ``stride``, the first ``top_k`` re-ranked, windows visited in
        ``order``, ``batch_size`` windows per forward pass, ``fusion`` (see :func:`resolve_fusion`)
        and the per-image ``reduction`` of token logits."""
        if min(length, window, stride, top_k, batch_size) < 1:
            raise ValueError("query_length, window, stride, top_k and batch_size must all be >= 1")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size, self.verbose = int(batch_size), verbose
        self.query_length = self.gallery_length = int(length)
        self.window, self.stride, self.top_k = int(window), int(stride), int(top_k)
        self.order, self.fusion, self.reduction = order, resolve_fusion(fusion), reduction

    # ---- input -----------------------------------------------------------------------------------------
    def _tensors(self, images: Sequence[ImageFeatures]) -> dict[str, torch.Tensor]:
        """Padded, validated per-image tensors on the device: local, scale, mask (+ global)."""
        cfg, label = self.config, self.method_label
        for f in images:
            f.require("local", "scale", method=label)
        stacked = stack_locals(images, self.gallery_length, columns=("scale",), method=label)
        if stacked["local"].shape[2] != cfg.local_dim:
            raise ValueError(f"local descriptors have dimension {stacked['local'].shape[2]}, "
                             f"this {label} model takes {cfg.local_dim}")
        scale = stacked["scale"]
        bad = stacked["mask"] & ((scale != np.round(scale)) | (scale < 0) | (scale >= cfg.num_scales))
        if bad.any():
            raise ValueError(f"local scale ids must be integers in [0, {cfg.num_scales}), got {np.unique(scale[bad])[:5]}")
        out = {"local": torch.from_numpy(stacked["local"]).to(self.device, self.dtype),
               "scale": torch.from_numpy(scale.astype(np.int64)).to(self.device),
               "mask": torch.from_numpy(stacked["mask"]).to(self.device)}
        if cfg.use_global:
            globals_ = stack_globals(images, label)
            if globals_.shape[1] != cfg.global_dim:
                raise ValueError(f"global descriptors have dimension {globals_.shape[1]}, "
                                 f"this {label} model takes {cfg.global_dim}")
            out["global"] = torch.from_numpy(globals_).to(self.device, self.dtype)
        return out

    def _prepare(self, query: ImageFeatures, gallery: Sequence[ImageFeatures], index: int):
        if query.local is None or query.num_locals == 0:
            raise ValueError(f"query {index} has no valid local descriptors; {self.method_label} needs them")
        return self._tensors([query]), self._tensors(gallery)

    @staticmethod
    def _batch(items) -> dict[str, torch.Tensor]:
        """Model kwargs for windows given as (query tensors, gallery tensors, gallery rows)."""
        q = {k: torch.cat([query[k] for query, _, _ in items]) for k in items[0][0]}
        g = {k: torch.stack([gallery[k][rows] for _, gallery, rows in items]) for k in items[0][1]}
        return dict(query_local=q["local"], query_scale=q["scale"], query_mask=q["mask"], gallery_local=g["local"],
                    gallery_scale=g["scale"], gallery_mask=g["mask"], query_global=q.get("global"),
                    gallery_global=g.get("global"))

    # ---- inference -------------------------------------------------------------------------------------
    @torch.inference_mode()
    def score_windows(self, items) -> list[np.ndarray]:
        """Raw per-image scores (the chosen reduction) of windows (query tensors, gallery tensors, rows);
        windows of the same length run ``batch_size`` at a time."""
        results: list[Optional[np.ndarray]] = [None] * len(items)
        by_length: dict[int, list[int]] = {}
        for i, (_, _, rows) in enumerate(items):
            by_length.setdefault(len(rows), []).append(i)
        per_image = self.config.tokens_per_image(self.gallery_length)
        for members in by_length.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                logits = self.module(**self._batch([items[i] for i in chunk]))
                scores = reduce_scores(logits.float(), per_image, self.reduction).cpu().numpy()
                for row, i in enumerate(chunk):
                    results[i] = scores[row]
        return results

    def head_logits(self, queries, shortlists):
        """One window over each shortlist's first ``top_k`` items, which must fit in it: the official
        tuning scores the top 100 in one pass (a grid over the sliding window would re-run the model
        at every grid point, since each window's input depends on the fused order before it)."""
        depths = [min(len(s), self.top_k) for s in shortlists]
        if max(depths) > self.window:
            raise ValueError(f"{self.name or self.method_label}: fusion tuning scores the head in one window of "
                             f"{self.window}; pass top_k <= {self.window} (got lists of {max(depths)})")
        logits = []
        for start in range(0, len(queries), self.batch_size):
            members = range(start, min(start + self.batch_size, len(queries)))
            prepared = [self._prepare(queries[i], shortlists[i][: depths[i]], i) for i in members]
            logits += self.score_windows([(*p, torch.arange(depths[i], device=self.device)) for p, i in zip(prepared, members)])
        return [np.asarray(l, np.float32) for l in logits]

    def _rerank_many(self, queries, shortlists, global_scores) -> list[RerankResult]:
        """Queries run ``batch_size`` at a time, so each sliding step of a chunk is one forward pass
        and only that chunk's descriptors sit on the device."""
        if any(g is None for g in global_scores) and self.fusion[0] > 0:
            raise ValueError(f"{self.method_label} fuses its scores with the global similarities: pass global_scores "
                             "or global descriptors, or set fusion=(0, temperature)")
        scores = [np.zeros(len(s), np.float32) if g is None else g for g, s in zip(global_scores, shortlists)]
        results = []
        chunks = range(0, len(queries), self.batch_size)
        for start in progress(chunks, desc=self.method_label, unit="chunk", disable=not self.verbose or len(chunks) < 2):
            members = range(start, min(start + self.batch_size, len(queries)))
            prepared = [self._prepare(queries[i], shortlists[i][: self.top_k], i) for i in members]

            def scorer(requests, prepared=prepared):
                return self.score_windows([(*prepared[q], torch.from_numpy(rows).to(self.device)) for q, rows in requests])

            results += sliding_rerank([scores[i] for i in members], scorer, top_k=self.top_k, window=self.window,
                                      stride=self.stride, order=self.order, fusion=self.fusion,
                                      progress=bool(self.verbose) and len(chunks) == 1)
        return results

    # ---- training --------------------------------------------------------------------------------------
    def training_loss(self, queries, shortlists, labels, module=None) -> torch.Tensor:
        """Cross-entropy of the 2-class head on every gallery token (padded slots and SEP included),
        each labelled with its image's 0/1 label; query tokens are ignored. Lists are used in the
        order given (the data feeder shuffles them). Lists of different lengths run separately and
        the loss is the mean over all their gallery tokens, as one official batch would give."""
        module = self.module if module is None else module
        if not (len(queries) == len(shortlists) == len(labels)) or not queries:
            raise ValueError("training_loss needs as many (non-empty) queries, shortlists and label arrays")
        per_image = self.config.tokens_per_image(self.gallery_length)
        groups: dict[int, list[int]] = {}
        for i, (shortlist, label) in enumerate(zip(shortlists, labels)):
            label = np.asarray(label)
            if len(shortlist) == 0 or label.shape != (len(shortlist),) or not np.isin(label, (0, 1)).all():
                raise ValueError(f"list {i}: labels must be 0/1 with one per shortlist image ({len(shortlist)}), got {label}")
            groups.setdefault(len(shortlist), []).append(i)
        total, count = None, 0
        for members in groups.values():
            items = []
            for i in members:
                query, gallery = self._prepare(queries[i], shortlists[i], i)
                items.append((query, gallery, torch.arange(len(shortlists[i]), device=self.device)))
            logits = module(**self._batch(items))
            target = token_labels(torch.as_tensor(np.stack([labels[i] for i in members]), device=self.device), per_image)
            wide = logits.to(torch.promote_types(logits.dtype, torch.float32))
            loss = nn.functional.cross_entropy(wide.flatten(0, 1), target.flatten(), reduction="sum")
            total = loss if total is None else total + loss
            count += int((target != -100).sum())
        return total / count
