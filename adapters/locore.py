"""LoCoRE (CVPR 2025): list-wise long-context re-ranking on a Longformer.

One sequence holds the query and up to ``window`` gallery images, each as
``[global][L locals][SEP]`` (``[L locals][SEP]`` without global descriptors). A 2-class head scores
every token; an image's score is the class-1 logit of its last local slot (``max-end``, the
official evaluation), and sliding windows re-rank a longer shortlist
(:mod:`locore_plugin.sliding_window`).

The model is stock ``transformers`` Longformer with the official module paths, so the official
``model.safetensors`` (``ExtractiveLongformerForCache``) loads with its own key names.
"""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch import nn
from transformers import LongformerConfig, LongformerModel

from locore_plugin.attention import FAST, IMPLEMENTATIONS, REFERENCE
from locore_plugin.checkpoints import CONFIG_FILE, WEIGHTS_FILE, load_strict, read_state_dict, save_directory
from locore_plugin.features import ImageFeatures, stack_globals, stack_locals
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import RerankResult, TrainableReranker
from locore_plugin.progress import progress
from locore_plugin.runtime import resolve_device, resolve_dtype
from locore_plugin.sliding_window import ORDERS, sliding_rerank

# Supplementary Table A. Every variant has a 5,120-token context: RoBERTa-style position ids start
# at padding_idx + 1 = 2, so the table has 5,122 rows.
VARIANTS = {
    "locore-tiny": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=2048, num_attention_heads=8, attention_window=1024),
    "locore-small": dict(num_hidden_layers=6, hidden_size=768, intermediate_size=3072, num_attention_heads=12, attention_window=512),
    "locore-base": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12, attention_window=512),
}
MAX_POSITIONS = 5122
REDUCTIONS = ("max-end", "max-sum", "max-start", "max-prod")

# Replacements for the self-attention of every layer, by name: factory(LongformerSelfAttention) -> module
# with the same parameters (names and shapes) and call signature. "transformers" is the reference;
# "blocked" (locore_plugin.attention) computes the same function faster and is the default.
ATTENTION_IMPLEMENTATIONS: dict[str, Callable[[nn.Module], nn.Module]] = IMPLEMENTATIONS


@dataclass(frozen=True)
class LocoreConfig:
    """Architecture of one LoCoRE model: the Longformer plus the descriptor side."""

    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    intermediate_size: int
    attention_window: tuple[int, ...]  # one-sided width x 2, per layer
    max_position_embeddings: int = MAX_POSITIONS
    local_dim: int = 768
    global_dim: int = 768
    use_global: bool = True  # False: images are [L locals][SEP] (the official "noglobal" models)
    num_scales: int = 3
    layer_norm_eps: float = 1e-5
    hidden_act: str = "gelu"
    hidden_dropout_prob: float = 0.1
    attention_probs_dropout_prob: float = 0.1

    def __post_init__(self):
        window = self.attention_window
        window = (int(window),) * self.num_hidden_layers if np.isscalar(window) else tuple(int(w) for w in window)
        if len(window) != self.num_hidden_layers:
            raise ValueError(f"attention_window has {len(window)} entries for {self.num_hidden_layers} layers")
        if any(w < 2 or w % 2 for w in window):
            raise ValueError(f"attention windows must be positive and even, got {window}")
        object.__setattr__(self, "attention_window", window)

    @classmethod
    def variant(cls, name: str, **overrides) -> "LocoreConfig":
        if name not in VARIANTS:
            raise ValueError(f"unknown LoCoRE variant {name!r}; use one of {sorted(VARIANTS)}")
        return cls(**{**VARIANTS[name], **overrides})

    @property
    def context(self) -> int:
        """Longest (window-padded) sequence the position table covers."""
        return self.max_position_embeddings - _PAD_ID - 1

    def tokens_per_image(self, num_locals: int) -> int:
        return num_locals + 1 + int(self.use_global)

    def padded_length(self, num_images: int, num_locals: int) -> int:
        """Sequence length after right-padding to a multiple of the largest attention window."""
        window = max(self.attention_window)
        return -(-num_images * self.tokens_per_image(num_locals) // window) * window

    def check_context(self, num_gallery: int, num_locals: int) -> None:
        """The (1 + K) * (L + 2) tokens, window-padded, must fit the position table."""
        padded = self.padded_length(1 + num_gallery, num_locals)
        if padded > self.context:
            per_image = self.tokens_per_image(num_locals)
            raise ValueError(
                f"context budget exceeded: (1 + {num_gallery} images) x {per_image} tokens = {(1 + num_gallery) * per_image}, "
                f"padded to {padded} (a multiple of the attention window {max(self.attention_window)}), but the model has "
                f"{self.context} positions; lower the window or num_locals"
            )

    def longformer_config(self) -> LongformerConfig:
        # vocab_size 3: the word embeddings only exist long enough to seed sep/pad_embedding.
        return LongformerConfig(
            **{"vocab_size": 3, "type_vocab_size": 1, "pad_token_id": _PAD_ID, "sep_token_id": _SEP_ID,
               "bos_token_id": 0, "eos_token_id": _SEP_ID, "num_labels": 2, "hidden_size": self.hidden_size,
               "num_hidden_layers": self.num_hidden_layers, "num_attention_heads": self.num_attention_heads,
               "intermediate_size": self.intermediate_size, "attention_window": list(self.attention_window),
               "max_position_embeddings": self.max_position_embeddings, "layer_norm_eps": self.layer_norm_eps,
               "hidden_act": self.hidden_act, "hidden_dropout_prob": self.hidden_dropout_prob,
               "attention_probs_dropout_prob": self.attention_probs_dropout_prob}
        )

    def to_json(self) -> dict:
        """The ``config.json`` layout (also that of the golden fixtures): the HF Longformer config plus the descriptor side."""
        hf = self.longformer_config().to_dict()
        hf.pop("vocab_size")
        return {"model_type": "locore", "hf_longformer_config": hf, "local_dim": self.local_dim,
                "global_dim": self.global_dim, "use_global": self.use_global, "num_scales": self.num_scales}

    @classmethod
    def from_json(cls, data: dict, source: str = "config.json") -> "LocoreConfig":
        if "hf_longformer_config" not in data or "local_dim" not in data:
            raise ValueError(f"{source} is not a LoCoRE config (needs 'hf_longformer_config' and 'local_dim')")
        hf = data["hf_longformer_config"]  # its token ids, vocabulary and label entries are fixed by the model
        own = {k: hf[k] for k in ("hidden_size", "num_hidden_layers", "num_attention_heads", "intermediate_size",
                                  "attention_window", "max_position_embeddings", "layer_norm_eps", "hidden_act",
                                  "hidden_dropout_prob", "attention_probs_dropout_prob") if k in hf}
        return cls(**own, local_dim=int(data["local_dim"]), global_dim=int(data.get("global_dim", data["local_dim"])),
                   use_global=bool(data.get("use_global", True)), num_scales=int(data.get("num_scales", 3)))


_PAD_ID, _SEP_ID = 1, 2


class _Backbone(LongformerModel):
    """HF ``LongformerModel`` without word embeddings, plus the learnable SEP and window-padding vectors
    (``LongformerModelWithoutEmbedding`` in the official code, seeded from the word embeddings likewise)."""

    def __init__(self, config: LongformerConfig):
        super().__init__(config, add_pooling_layer=False)
        words = self.embeddings.word_embeddings.weight
        self.sep_embedding = nn.Parameter(words[config.sep_token_id].detach().clone())
        self.pad_embedding = nn.Parameter(words[config.pad_token_id].detach().clone())
        self.embeddings.word_embeddings = None


class _LanguageModel(nn.Module):
    """Backbone + token classifier at the official paths (``language_model.longformer``, ``.classifier``)."""

    def __init__(self, config: LongformerConfig):
        super().__init__()
        self.longformer = _Backbone(config)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(config.hidden_size, 2)


class LocoreModel(nn.Module):
    """Descriptors in, one 2-class logit pair per token out (the official ``ExtractiveLongformerForCache``)."""

    def __init__(self, config: LocoreConfig, attn_implementation: str = FAST):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.language_model = _LanguageModel(config.longformer_config())
        self.scale_encoder = nn.Embedding(config.num_scales, hidden)
        self.local_to_lm = _projection(config.local_dim, hidden)
        # Models without global tokens have no global projection (the official "noglobal" models set global_dim = hidden).
        self.global_to_lm = _projection(config.global_dim if config.use_global else hidden, hidden)
        self.set_attention(attn_implementation)

    def set_attention(self, name: str) -> None:
        """Swap every layer's self-attention for a registered implementation (same weights)."""
        if name not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"unknown attn_implementation {name!r}; use one of {sorted(ATTENTION_IMPLEMENTATIONS)}")
        for layer in self.language_model.longformer.encoder.layer:
            layer.attention.self = ATTENTION_IMPLEMENTATIONS[name](layer.attention.self)
        self.attn_implementation = name

    def attention_layers(self) -> list[nn.Module]:
        """Each layer's self-attention (what ``locore-plugin bench`` times on its own)."""
        return [layer.attention.self for layer in self.language_model.longformer.encoder.layer]

    def build_inputs(self, query_local, query_scale, query_mask, gallery_local, gallery_scale, gallery_mask,
                     query_global=None, gallery_global=None):
        """The Longformer's input: embeddings, attention mask (0 masked / 1 local / 2 global) and position ids.

        Shapes: query_local (B, L, Dl), query_scale/query_mask (B, L), gallery_local (B, K, L, Dl),
        gallery_scale/gallery_mask (B, K, L), query_global (B, Dg), gallery_global (B, K, Dg);
        masks are True for valid descriptors. Padded descriptors stay in the sequence (they take
        positions and window slots, as in the official model) but are never attended to.
        """
        batch, num_gallery, num_locals, _ = gallery_local.shape
        self.config.check_context(num_gallery, num_locals)
        local = self.local_to_lm(torch.cat([query_local[:, None], gallery_local], 1))
        local = local + self.scale_encoder(torch.cat([query_scale[:, None], gallery_scale], 1))
        backbone = self.language_model.longformer
        sep = backbone.sep_embedding.expand(batch, 1 + num_gallery, 1, -1)
        parts, valid = [local, sep], [torch.cat([query_mask[:, None], gallery_mask], 1).bool()]
        ones = valid[0].new_ones(batch, 1 + num_gallery, 1)
        if self.config.use_global:
            if query_global is None or gallery_global is None:
                raise ValueError("this LoCoRE model uses global descriptors; pass query_global and gallery_global")
            parts.insert(0, self.global_to_lm(torch.cat([query_global[:, None], gallery_global], 1))[:, :, None])
            valid.insert(0, ones)
        tokens = torch.cat(parts, 2)
        attend = torch.cat([*valid, ones], 2).long()
        is_global = torch.zeros_like(attend)
        is_global[:, :, -1] = 1  # every SEP
        is_global[:, 0] = 1  # the whole query block (query_global_attention)
        mask = (attend * (is_global + 1)).flatten(1)  # padded query descriptors are neither attended nor global
        embeds = tokens.flatten(1, 2)
        length = embeds.shape[1]
        padded = self.config.padded_length(1 + num_gallery, num_locals)
        embeds = torch.cat([embeds, backbone.pad_embedding.expand(batch, padded - length, -1)], 1)
        mask = nn.functional.pad(mask, (0, padded - length))
        positions = torch.arange(_PAD_ID + 1, _PAD_ID + 1 + padded, device=embeds.device).expand(batch, -1)
        return embeds, mask, positions

    def forward(self, query_local, query_scale, query_mask, gallery_local, gallery_scale, gallery_mask,
                query_global=None, gallery_global=None) -> torch.Tensor:
        """Token logits (B, (1 + K) * T, 2); arguments as :meth:`build_inputs`."""
        embeds, mask, positions = self.build_inputs(query_local, query_scale, query_mask, gallery_local,
                                                    gallery_scale, gallery_mask, query_global, gallery_global)
        length = (1 + gallery_local.shape[1]) * self.config.tokens_per_image(gallery_local.shape[2])
        # The sequence is already window-padded, so the backbone adds no padding of its own.
        hidden = self.language_model.longformer(
            inputs_embeds=embeds, attention_mask=mask, position_ids=positions, return_dict=True
        ).last_hidden_state[:, :length]
        return self.language_model.classifier(self.language_model.dropout(hidden))


def _projection(dim: int, hidden: int) -> nn.Module:
    """Identity when the descriptor already has the hidden size, else a Linear with zero bias (official init)."""
    if dim == hidden:
        return nn.Identity()
    linear = nn.Linear(dim, hidden)
    nn.init.zeros_(linear.bias)
    return linear


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


def token_labels(labels: torch.Tensor, tokens_per_image: int) -> torch.Tensor:
    """Every gallery token carries its image's 0/1 label; query tokens are ignored (-100), as in the official loss."""
    ignored = labels.new_full((labels.shape[0], 1), -100)
    return torch.cat([ignored, labels.long()], 1).repeat_interleave(tokens_per_image, 1)


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
        state, config = (None, None) if checkpoint is None else _read_checkpoint(checkpoint, variant)
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


def save_checkpoint(model: LocoreModel, directory, variant: str) -> None:
    """Write a model (float32) so that ``create_reranker(variant, checkpoint=directory)`` loads it."""
    save_directory(directory, model, {**model.config.to_json(), "variant": variant}, dtype=torch.float32)


def _read_checkpoint(checkpoint, variant: str) -> tuple[dict[str, torch.Tensor], LocoreConfig]:
    """State dict and architecture of a checkpoint folder, file or hub id."""
    path = Path(checkpoint)
    if not path.exists():
        if _looks_like_hub_id(str(checkpoint)):
            path = _download(str(checkpoint))
        else:
            raise FileNotFoundError(f"LoCoRE checkpoint not found: {checkpoint}")
    weights = path / WEIGHTS_FILE if path.is_dir() else path
    if not weights.is_file():
        raise FileNotFoundError(f"{path} holds no {WEIGHTS_FILE}")
    state = read_state_dict(weights)
    config_file = weights.parent / CONFIG_FILE
    if config_file.is_file():
        return state, LocoreConfig.from_json(json.loads(config_file.read_text()), str(config_file))
    return state, _config_from_state(variant, state)


def _config_from_state(variant: str, state: dict[str, torch.Tensor]) -> LocoreConfig:
    """The variant's architecture with the descriptor dimensions and position count the weights imply."""
    config = LocoreConfig.variant(variant)
    dims = {}
    for side in ("local", "global"):
        weight = state.get(f"{side}_to_lm.weight")
        dims[f"{side}_dim"] = config.hidden_size if weight is None else int(weight.shape[1])
    positions = state.get("language_model.longformer.embeddings.position_embeddings.weight")
    if positions is not None:
        dims["max_position_embeddings"] = int(positions.shape[0])
    return replace(config, **dims)


def _looks_like_hub_id(text: str) -> bool:
    return re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", text) is not None


def _download(repo_id: str) -> Path:
    """Fetch ``model.safetensors`` (+ ``config.json``) of a hub model; a clear error when the hub is unreachable."""
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(repo_id, allow_patterns=[WEIGHTS_FILE, CONFIG_FILE]))
    except Exception as error:  # offline, unknown repo, no huggingface_hub: all mean "not available here"
        raise FileNotFoundError(
            f"LoCoRE checkpoint {repo_id!r} is not a local path and could not be fetched from the Hugging Face hub "
            f"({type(error).__name__}: {error}). Download it elsewhere and pass its folder."
        ) from error


# ---- initialisation from pre-trained language models (supplementary: "Checkpoints and initialisation") --------

# How each variant is initialised: from which kind of checkpoint, how positions grow to 5,120, how many layers.
INIT_RECIPES = {
    "locore-base": dict(source="longformer-base-4096", positions="interpolate", num_layers=None),
    "locore-small": dict(source="longformer-base-4096", positions="interpolate", num_layers=6),
    "locore-tiny": dict(source="roberta-tiny-cased", positions="tile", num_layers=None),
}
POSITION_METHODS = ("interpolate", "tile")


def extend_positions(table: torch.Tensor, rows: int, method: str = "interpolate") -> torch.Tensor:
    """Grow a RoBERTa-style position table (2 reserved rows, then one row per position) to ``rows`` rows.

    ``interpolate``: the learned rows resampled linearly onto the longer range (first and last kept);
    ``tile``: the learned rows repeated from the start (allenai's RoBERTa -> Longformer conversion).
    """
    if method not in POSITION_METHODS:
        raise ValueError(f"unknown position extension {method!r}; use one of {POSITION_METHODS}")
    reserved, learned = table[:2], table[2:]
    wanted = rows - 2
    if wanted <= learned.shape[0]:
        return table[:rows].clone()
    if method == "tile":
        grown = learned.repeat(-(-wanted // learned.shape[0]), 1)[:wanted]
    else:
        grown = nn.functional.interpolate(learned.T[None].float(), size=wanted, mode="linear", align_corners=True)[0].T
    return torch.cat([reserved, grown.to(table.dtype)])


def init_from_language_model(source, variant: str, positions: Optional[str] = None, num_layers: Optional[int] = None,
                             seed: int = 0, **overrides) -> LocoreModel:
    """A LoCoRE model whose Longformer starts from a local HF RoBERTa or Longformer checkpoint folder.

    The architecture is the source's (hidden size, heads, FFN), its first ``num_layers`` layers
    (default: the variant's recipe, else all), the variant's attention window and a 5,122-row
    position table extended by ``positions`` (default: the recipe's). SEP and window-padding
    vectors start from the word embeddings of ids 2 and 1 (as the official constructor does); a
    RoBERTa has no global attention, so its local q/k/v are copied into the global q/k/v. The
    scale embedding, projections and classifier start random (``seed``).
    """
    if variant not in INIT_RECIPES:
        raise ValueError(f"unknown LoCoRE variant {variant!r}; use one of {sorted(INIT_RECIPES)}")
    recipe = INIT_RECIPES[variant]
    folder = Path(source)
    hf_config_file = folder / CONFIG_FILE
    if not hf_config_file.is_file():
        raise FileNotFoundError(f"{folder} holds no {CONFIG_FILE} (expected a Hugging Face model folder)")
    hf = json.loads(hf_config_file.read_text())
    weights = next((folder / n for n in ("model.safetensors", "pytorch_model.bin") if (folder / n).is_file()), None)
    if weights is None:
        raise FileNotFoundError(f"{folder} holds neither model.safetensors nor pytorch_model.bin")
    state = {}
    for key, value in read_state_dict(weights).items():
        for prefix in ("longformer.", "roberta."):
            key = key[len(prefix):] if key.startswith(prefix) else key
        if key.startswith(("embeddings.", "encoder.")):
            state[key] = value
    layers = num_layers if num_layers is not None else recipe["num_layers"] or hf["num_hidden_layers"]
    if layers > hf["num_hidden_layers"]:
        raise ValueError(f"{folder} has {hf['num_hidden_layers']} layers, {layers} were asked for")
    config = LocoreConfig(**{
        "hidden_size": hf["hidden_size"], "num_hidden_layers": layers, "num_attention_heads": hf["num_attention_heads"],
        "intermediate_size": hf["intermediate_size"], "layer_norm_eps": hf.get("layer_norm_eps", 1e-5),
        "hidden_act": hf.get("hidden_act", "gelu"), "attention_window": VARIANTS[variant]["attention_window"],
        **overrides,
    })
    torch.manual_seed(seed)
    model = LocoreModel(config)
    backbone = model.language_model.longformer
    words = state.get("embeddings.word_embeddings.weight")
    if words is None:
        raise KeyError(f"{weights} has no embeddings.word_embeddings.weight to seed the SEP/padding vectors from")
    method = positions or recipe["positions"]
    target = {}
    for key in backbone.state_dict():
        if key in ("sep_embedding", "pad_embedding"):
            target[key] = words[_SEP_ID if key == "sep_embedding" else _PAD_ID].clone()
        elif key == "embeddings.position_embeddings.weight" and key in state:
            target[key] = extend_positions(state[key], config.max_position_embeddings, method)
        elif "_global." in key and key not in state:  # RoBERTa: global attention starts as the local one
            local = key.replace("_global.", ".")
            if local in state:
                target[key] = state[local].clone()
        elif key in state:
            target[key] = state[key]
    load_strict(backbone, target, f"{weights} (converted)")
    return model


def parameter_count(variant: str, **overrides) -> int:
    """Parameters of a variant's model (random weights), e.g. for the Table A comparison in docs/methods.md."""
    return sum(p.numel() for p in LocoreModel(LocoreConfig.variant(variant, **overrides)).parameters())


@hookimpl
def register_rerankers(register):
    for name, arch in VARIANTS.items():
        register(
            name,
            functools.partial(LocoreReranker, name),
            description=f"LoCoRE (CVPR 2025) list-wise long-context re-ranker, {arch['num_hidden_layers']} layers, "
            f"hidden {arch['hidden_size']}, sliding windows",
            learned=True,
            inputs=("global", "local"),
            columns=("scale",),
            extractor="dinov2-ames",
            attn_implementations=(REFERENCE, FAST),
        )
