"""Reading and writing LoCoRE weights through the shared checkpoint reader: a ``save_pretrained``
folder, an official ``model.safetensors`` (architecture from the ``config.json`` beside it, the
layout of the official releases, or else from the tensors), or a hub id."""
from __future__ import annotations

from dataclasses import replace

import torch

from locore_plugin.io.checkpoints import read_checkpoint as read_any_checkpoint
from locore_plugin.io.checkpoints import save_pretrained_folder

from .configuration import LocoreConfig
from .modeling import LocoreModel


def save_checkpoint(model: LocoreModel, directory, variant: str) -> None:
    """Write a model (float32) so that ``create_reranker(variant, checkpoint=directory)`` loads it;
    ``config.json`` is the official layout plus the registry name."""
    save_pretrained_folder(directory, model, variant, model.config.to_json(), dtype=torch.float32)


def read_checkpoint(checkpoint, variant: str) -> tuple[dict[str, torch.Tensor], LocoreConfig]:
    """State dict and architecture of a checkpoint folder, file or hub id."""
    read_back = read_any_checkpoint(checkpoint, config_beside=True)
    read_back.check_name(variant)
    if read_back.config is not None:
        return read_back.state, LocoreConfig.from_json(read_back.config, read_back.source)
    return read_back.state, _config_from_state(variant, read_back.state)


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
