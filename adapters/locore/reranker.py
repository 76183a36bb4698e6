"""The LoCoRE re-ranker: its options and weights; the sliding-window scoring, the fusion with the
global similarity and the token cross-entropy it trains with are the shared list-wise ones
(:mod:`locore_plugin.listwise`)."""
from __future__ import annotations

from dataclasses import fields, replace
from typing import Optional

from locore_plugin.io.checkpoints import load_strict
from locore_plugin.listwise import DEFAULT_FUSION, ListwiseSequenceReranker
from locore_plugin.options import renamed_options

from .attention import FAST
from .configuration import LocoreConfig
from .modeling import LocoreModel
from .weights import read_checkpoint, save_checkpoint

# locore-plugin 0.1's option names, accepted for one release (locore_plugin.options.renamed_options).
DEPRECATED_OPTIONS = {"num_locals": ("query_length", "gallery_length"), "shortlist": "top_k",
                      "alpha": "fusion_weight", "temperature": "fusion_temperature"}


class LocoreReranker(ListwiseSequenceReranker):
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

    method_label = "LoCoRE"

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
        self.configure(device=device, dtype=dtype, batch_size=batch_size, verbose=verbose, length=query_length,
                       window=window, stride=stride, top_k=top_k, order=order, fusion=fusion, reduction=reduction)
        self.variant = variant
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

    def save_pretrained(self, directory) -> None:
        """``model.safetensors`` (official key names, float32) and ``config.json``."""
        save_checkpoint(self.module, directory, self.variant)
