"""Initialisation from pre-trained language models (supplementary: "Checkpoints and initialisation")."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from locore_plugin.io.checkpoints import CONFIG_FILE, load_strict, read_state_dict

from .configuration import _PAD_ID, _SEP_ID, CONFIGS, LocoreConfig
from .modeling import LocoreModel

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
        "hidden_act": hf.get("hidden_act", "gelu"), "attention_window": CONFIGS[variant]["attention_window"],
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
