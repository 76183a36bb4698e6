"""The LoCoRE re-ranker: descriptors of a query and its shortlist in, sliding-window scores fused
with the global similarity out, and the token cross-entropy it trains with."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Optional, Sequence

import numpy as np
import torch
from torch import nn

from locore_plugin.checkpoints import load_strict
from locore_plugin.features import ImageFeatures, stack_globals, stack_locals
from locore_plugin.interface import RerankResult, TrainableReranker
from locore_plugin.progress import progress
from locore_plugin.runtime import resolve_device, resolve_dtype
from locore_plugin.sliding_window import ORDERS, sliding_rerank

from .attention import FAST
from .configuration import LocoreConfig
from .modeling import REDUCTIONS, LocoreModel, reduce_scores, token_labels
from .weights import read_checkpoint, save_checkpoint


class LocoreReranker(TrainableReranker):
    """Sliding-window LoCoRE re-ranking of the top ``shortlist`` candidates (see :mod:`locore_plugin.sliding_window`).

    ``checkpoint``: a folder with ``model.safetensors`` (+ ``config.json``), the weights file itself
    (a ``config.json`` beside it is used), or a Hugging Face hub id (tried only when the hub is
    reachable). Without ``config.json`` the architecture is the named variant's (Table A), with the
    descriptor dimensions read from the checkpoint. ``pretrained=False`` (and no checkpoint): random
    weights, which must be asked for (no checkpoint without it is an error, as for every learned
    method). ``config`` overrides architecture fields of :class:`LocoreConfig` (e.g. a small model
    on 32-d descriptors: ``config={"hidden_size": 64, "num_hidden_layers": 1, "local_dim": 32, ...}``).
    ``window`` images of ``num_locals`` locals share one sequence; ``batch_size`` windows
    share one forward pass. An image with more than ``num_locals`` valid locals keeps those with the
    largest detector weight (the official files are sorted by it), else its first ones.
    """

    def __init__(self, variant: str, checkpoint=None, pretrained: bool = True, device=None, dtype="fp32",
                 batch_size: int = 4, verbose: int = 0, num_locals: int = 48, window: int = 100, stride: int = 50,
                 shortlist: int = 400, order: str = "end-to-start", alpha: float = 0.5, temperature: float = 0.1,
                 reduction: str = "max-end", attn_implementation: str = FAST,
                 use_global: Optional[bool] = None, config: Optional[dict] = None):
        if not pretrained and checkpoint is not None:
            raise ValueError("pretrained=False builds random weights; do not also pass a checkpoint")
        if pretrained and checkpoint is None:
            raise ValueError(
                f"{variant} needs checkpoint= (the official weights are published by MrZilinXiao/LongContextReranker, "
                "e.g. vislang/locore_dinov2_base); pass pretrained=False for a randomly initialised model"
            )
        if min(num_locals, window, stride, shortlist, batch_size) < 1:
            raise ValueError("num_locals, window, stride, shortlist and batch_size must all be >= 1")
        if order not in ORDERS:
            raise ValueError(f"unknown order {order!r}; use one of {ORDERS}")
        if reduction not in REDUCTIONS:
            raise ValueError(f"unknown reduction {reduction!r}; use one of {REDUCTIONS}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha}")
        self.variant = variant
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.batch_size, self.verbose = int(batch_size), verbose
        self.num_locals, self.window, self.stride, self.shortlist = int(num_locals), int(window), int(stride), int(shortlist)
        self.order, self.alpha, self.temperature, self.reduction = order, float(alpha), float(temperature), reduction
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
        config.check_context(self.window, self.num_locals)
        self.module.to(self.device, self.dtype).eval()

    # ---- input -----------------------------------------------------------------------------------------
    def _tensors(self, images: Sequence[ImageFeatures]) -> dict[str, torch.Tensor]:
        """Padded, validated per-image tensors on the device: local, scale, mask (+ global)."""
        cfg = self.config
        for f in images:
            f.require("local", "scale", method="LoCoRE")
        stacked = stack_locals(images, self.num_locals, columns=("scale",), method="LoCoRE")
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
        per_image = self.config.tokens_per_image(self.num_locals)
        for members in by_length.values():
            for start in range(0, len(members), self.batch_size):
                chunk = members[start : start + self.batch_size]
                logits = self.module(**self._batch([items[i] for i in chunk]))
                scores = reduce_scores(logits.float(), per_image, self.reduction).cpu().numpy()
                for row, i in enumerate(chunk):
                    results[i] = scores[row]
        return results

    def _rerank_many(self, queries, shortlists, global_scores) -> list[RerankResult]:
        """Queries run ``batch_size`` at a time, so each sliding step of a chunk is one forward pass
        and only that chunk's descriptors sit on the device."""
        if any(g is None for g in global_scores) and self.alpha > 0:
            raise ValueError("LoCoRE fuses its scores with the global similarities: pass global_scores or "
                             "global descriptors, or set alpha=0")
        scores = [np.zeros(len(s), np.float32) if g is None else g for g, s in zip(global_scores, shortlists)]
        results = []
        chunks = range(0, len(queries), self.batch_size)
        for start in progress(chunks, desc="LoCoRE", unit="chunk", disable=not self.verbose or len(chunks) < 2):
            members = range(start, min(start + self.batch_size, len(queries)))
            prepared = [self._prepare(queries[i], shortlists[i][: self.shortlist], i) for i in members]

            def scorer(requests, prepared=prepared):
                return self.score_windows([(*prepared[q], torch.from_numpy(rows).to(self.device)) for q, rows in requests])

            results += sliding_rerank([scores[i] for i in members], scorer, shortlist=self.shortlist,
                                      window=self.window, stride=self.stride, order=self.order, alpha=self.alpha,
                                      temperature=self.temperature, progress=bool(self.verbose) and len(chunks) == 1)
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
        per_image = self.config.tokens_per_image(self.num_locals)
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
