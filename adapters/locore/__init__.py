"""LoCoRE (CVPR 2025): list-wise long-context re-ranking on a Longformer.

One sequence holds the query and up to ``window`` gallery images, each as
``[global][L locals][SEP]`` (``[L locals][SEP]`` without global descriptors). A 2-class head scores
every token; an image's score is the class-1 logit of its last local slot (``max-end``, the
official evaluation), and sliding windows re-rank a longer shortlist
(:mod:`locore_plugin.sliding_window`).

The model is stock ``transformers`` Longformer with the official module paths, so the official
``model.safetensors`` (``ExtractiveLongformerForCache``) loads with its own key names. The package:
``configuration`` (Table A, ``config.json``), ``attention`` (the blocked self-attention kernel),
``modeling`` (the network), ``weights`` (checkpoint reading and writing), ``initialisation``
(from pre-trained language models), ``reranker`` (the method behind the shared interface).
"""
from __future__ import annotations

import functools

from locore_plugin.hookspecs import hookimpl

from .attention import FAST, REFERENCE
from .configuration import CONFIGS, MAX_POSITIONS, LocoreConfig
from .initialisation import INIT_RECIPES, POSITION_METHODS, extend_positions, init_from_language_model
from .modeling import ATTENTION_IMPLEMENTATIONS, LocoreModel, parameter_count
from .reranker import LocoreReranker
from .weights import save_checkpoint

__all__ = [
    "ATTENTION_IMPLEMENTATIONS", "INIT_RECIPES", "MAX_POSITIONS", "POSITION_METHODS", "CONFIGS",
    "LocoreConfig", "LocoreModel", "LocoreReranker", "extend_positions", "init_from_language_model",
    "parameter_count", "save_checkpoint",
]


@hookimpl
def register_rerankers(register):
    for name, arch in CONFIGS.items():
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
            sliding_window=True,
        )
