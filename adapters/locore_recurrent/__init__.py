"""LoCoRE-RWKV and LoCoRE-Mamba (supplementary B.2, Table D): the LoCoRE sequence through
bi-directional recurrent layers, which have no context limit, with query cross-attention blocks
between them. No official code exists; the design choices are listed in ``modeling`` and README.

The package: ``configuration`` (the variants, ``config.json``), ``modeling`` (the network, from
``transformers``' RWKV and Mamba blocks), ``reranker`` (the method behind the shared list-wise
interface, :mod:`locore_plugin.listwise`).
"""
from __future__ import annotations

import functools

from locore_plugin.hookspecs import hookimpl

from .configuration import BLOCK_NAMES, BLOCK_TYPES, CONFIGS, RecurrentConfig
from .modeling import LocoreRecurrentModel, parameter_count
from .reranker import ONE_PASS, RecurrentLocoreReranker

__all__ = ["BLOCK_TYPES", "CONFIGS", "ONE_PASS", "LocoreRecurrentModel", "RecurrentConfig", "RecurrentLocoreReranker",
           "parameter_count"]


@hookimpl
def register_rerankers(register):
    for name, arch in CONFIGS.items():
        register(
            name,
            functools.partial(RecurrentLocoreReranker, name),
            description=f"LoCoRE-{BLOCK_NAMES[arch['block_type']]} (supplementary B.2): {arch['num_layers']} bi-directional "
            f"layers, hidden {arch['hidden_size']}, query cross-attention; sliding windows or one pass",
            learned=True,
            inputs=("global", "local"),
            columns=("scale",),
            extractor="dinov2-ames",
            sliding_window=True,
            one_pass=True,
        )
