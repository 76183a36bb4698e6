"""The LoCoRE re-ranker: descriptors of a query and its shortlist in, sliding-window scores fused
with the global similarity out, and the token cross-entropy it trains with."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from locore_plugin.features import ImageFeatures, stack_globals, stack_locals
from locore_plugin.interface import RerankResult, TrainableReranker
from locore_plugin.io.checkpoints import load_strict
from locore_plugin.options import renamed_options
from locore_plugin.progress import progress
from locore_plugin.runtime import resolve_device, resolve_dtype
from locore_plugin.sliding_window import ORDERS, sliding_rerank

from .attention import FAST
from .configuration import LocoreConfig
from .modeling import REDUCTIONS, LocoreModel, reduce_scores, token_labels
from .weights import read_checkpoint, save_checkpoint

# The official ensemble: alpha * global + (1 - alpha) * sigmoid(T * logit) with alpha 0.5, T 0.1.
DEFAULT_FUSION = (0.5, 0.1)
# locore-plugin 0.1's option names, accepted for one release (locore_plugin.options.renamed_options).
DEPRECATED_OPTIONS = {"num_locals": ("query_length", "gallery_length"), "shortlist": "top_k",
                      "alpha": "fusion_weight", "temperature": "fusion_temperature"}


class LocoreReranker(TrainableReranker):
    """Sliding-window LoCoRE re-ranking of the first ``top_k`` candidates (see :mod:`locore_plugin.sliding_window`).

    ``checkpoint``: a folder with ``model.safetensors`` (+ ``config.json``), the weights file itself
    (a ``config.json`` beside it is used), or a Hugging Face hub id (tried only when the hub is
    reachable). Without ``config.json`` the architecture is the named variant's (Table A), with the
    descriptor dimensions read from the checkpoint. ``pretrained=False`` (and no checkpoint): random
    weights, which must be asked for (no checkpoint without it is an error, as for every learned
    method). ``config`` overrides architecture fields of :class:`LocoreConfig` (e.g. a small model
    on 32-d descriptors: ``config={"hidden_size": 64, "num_hidden_layers": 1, "local_dim": 32, ...}``).
    ``window`` images of ``query_length`` = ``gallery_length`` locals (default 48: every image has
    the same slot in the sequence) share one sequence; ``batch_size`` windows share one forward
    pass. An image with more valid locals keeps those with the largest detector weight (the official
    files are sorted by it), else its first ones. ``fusion``: (alpha, temperature) of
    ``alpha * global + (1 - alpha) * sigmoid(temperature * logit)``, ``"default"`` for the official
    (0.5, 0.1), None for the logit alone.
    """

    def __init__(self, variant: str, checkpoint=None, pretrained: bool = True, device=None, dtype="fp32",
                 batch_size: int = 4, verbose: int = 0, query_length: Optional[int] = None,
                 gallery_length: Optional[int] = None, window: int = 100, stride: int = 50, top_k: Optional[int] = None,
                 order: str = "end-to-start", fusion="default", reduction: str = "max-end",
                 attn_implementation: str = FAST, use_global: Optional[bool] = None, config: Optional[dict] = None,
                 **deprecated):
        given = renamed_options({"query_length": query_length, "gallery_length": gallery_length, "top_k": top_k},
                                deprecated, DEPRECATED_OPTIONS, variant)
        weight, temperature = given.pop("fusion_weight", None), given.pop("fusion_temperature", None)
        if weight is not None or temperature is not None:
            if fusion != "default":
                raise TypeError(f"{variant}: give fusion=(alpha, temperature) or the deprecated alpha/temperature, not both")
            fusion = (DEFAULT_FUSION[0] if weight is None else weight, DEFAULT_FUSION[1] if temperature is None else temperature)
        if fusion is None:  # the logit alone, as every method spells it: alpha 0 (sigmoid keeps the order)
            fusion = (0.0, 1.0)
        fusion = DEFAULT_FUSION if fusion == "default" else fusion
        if isinstance(fusion, str) or len(fusion) != 2:
            raise ValueError(f"fusion must be 'default', None (the logit alone) or (alpha, temperature), got {fusion!r}")
        query_length = 48 if given["query_length"] is None else int(given["query_length"])
        gallery_length = query_length if given["gallery_length"] is None else int(given["gallery_length"])
        top_k = 400 if given["top_k"] is None else int(given["top_k"])
        if not pretrained and checkpoint is not None:
            raise ValueError("pretrained=False builds random weights; do not also pass a checkpoint")
        if pretrained and checkpoint is None:
            raise ValueError(
                f"{variant} needs checkpoint= (the official weights are published by MrZilinXiao/LongContextReranker, "
                "e.g. vislang/locore_dinov2_base); pass pretrained=False for a randomly initialised model"
            )
        if query_length != gallery_length:
            raise ValueError(f"LoCoRE gives every image the same slot in its sequence: query_length ({query_length}) "
                             f"must equal gallery_length ({gallery_length})")
        if min(query_length, window, stride, top_k, batch_size) < 1:
            raise ValueError("query_length, window, stride, top_k and batch_size must all be >= 1")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
        if not 0.0 <= fusion[0] <= 1.0:
            raise ValueError(f"the fusion weight alpha must be in [0, 1], got {fusion[0]}")
        self.variant = variant
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size, self.verbose = int(batch_size), verbose
        self.query_length = self.gallery_length = query_length
        self.window, self.stride, self.top_k = int(window), int(stride), top_k
        self.order, self.fusion, self.reduction = order, (float(fusion[0]), float(fusion[1])), reduction
        overrides = dict(config or {})
        unknown = set(overrides) - {f.name for f in fields(LocoreConfig)}
        if unknown:
            raise ValueError(f"unknown LoCoRE config key(s) {sorted(unknown)}; known: {sorted(f.name for f in fields(LocoreConfig))}")
        if use_global is not None:
            overrides["use_global"] = bool(use_global)
        state, config = (None, None) if checkpoint is None else read_checkpoint(checkpoint, variant)
        config = replace(config or LocoreConfig.variant(variant), **overrides)
        self.config = config
        self.module = LocoreModel(config, attn_implementation)  # rejects an unknown attn_implementation
        if state is not None:
            load_strict(self.module, state, f"LoCoRE checkpoint {checkpoint}")
        config.check_context(self.window, self.gallery_length)
        self.module.to(self.device, self.dtype).eval()

    # ---- input -----------------------------------------------------------------------------------------
    def _tensors(self, images: Sequence[ImageFeatures]) -> dict[str, torch.Tensor]:
        """Padded, validated per-image tensors on the device: local, scale, mask (+ global)."""
        cfg = self.config
        for f in images:
            f.require("local", "scale", method="LoCoRE")
        stacked = stack_locals(images, self.gallery_length, columns=("scale",), method="LoCoRE")
        if stacked["local"].shape[2] != cfg.local_dim:
            raise ValueError(f"local descriptors have dimension {stacked['local'].shape[2]}, "
                             f"this LoCoRE model takes {cfg.local_dim}")
        scale = stacked["scale"]
        bad = stacked["mask"] & ((scale != np.round(scale)) | (scale < 0) | (scale >= cfg.num_scales))
        if bad.any():
            raise ValueError(f"local scale ids must be integers in [0, {cfg.num_scales}), got {np.unique(scale[bad])[:5]}")
        out = {"local": torch.from_numpy(stacked["local"]).to(self.device, self.dtype),
               "scale": torch.from_numpy(scale.astype(np.int64)).to(self.device),
               "mask": torch.from_numpy(stacked["mask"]).to(self.device)}
        if cfg.use_global:
            globals_ = stack_globals(images, "LoCoRE")
            if globals_.shape[1] != cfg.global_dim:
                raise ValueError(f"global descriptors have dimension {globals_.shape[1]}, "
                                 f"this LoCoRE model takes {cfg.global_dim}")
            out["global"] = torch.from_numpy(globals_).to(self.device, self.dtype)
        return out

    def _prepare(self, query: ImageFeatures, gallery: Sequence[ImageFeatures], index: int):
        if query.local is None or query.num_locals == 0:
            raise ValueError(f"query {index} has no valid local descriptors; LoCoRE needs them")
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
            raise ValueError(f"{self.name or 'LoCoRE'}: fusion tuning scores the head in one window of {self.window}; "
                             f"pass top_k <= {self.window} (got lists of {max(depths)})")
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
            raise ValueError("LoCoRE fuses its scores with the global similarities: pass global_scores or "
                             "global descriptors, or set fusion=(0, temperature)")
        scores = [np.zeros(len(s), np.float32) if g is None else g for g, s in zip(global_scores, shortlists)]
        results = []
        chunks = range(0, len(queries), self.batch_size)
        for start in progress(chunks, desc="LoCoRE", unit="chunk", disable=not self.verbose or len(chunks) < 2):
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

    def save_pretrained(self, directory) -> None:
        """``model.safetensors`` (official key names, float32) and ``config.json``."""
        save_checkpoint(self.module, directory, self.variant)
