"""Reading and writing LoCoRE weights: a ``save_pretrained`` folder, an official
``model.safetensors`` (architecture from a ``config.json`` beside it or from the tensors), or a hub id."""
from __future__ import annotations

import json
import re
from dataclasses import replace
from pathlib import Path

import torch

from locore_plugin.checkpoints import CONFIG_FILE, WEIGHTS_FILE, read_state_dict, save_directory

from .configuration import LocoreConfig
from .modeling import LocoreModel


def save_checkpoint(model: LocoreModel, directory, variant: str) -> None:
    """Write a model (float32) so that ``create_reranker(variant, checkpoint=directory)`` loads it."""
    save_directory(directory, model, {**model.config.to_json(), "variant": variant}, dtype=torch.float32)


def read_checkpoint(checkpoint, variant: str) -> tuple[dict[str, torch.Tensor], LocoreConfig]:
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
