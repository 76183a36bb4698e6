"""The architecture of a LoCoRE model (kept apart from the modeling code, as ``transformers`` does):
supplementary Table A's variants and the ``config.json`` layout of the official checkpoints."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from transformers import LongformerConfig

# Supplementary Table A. Every variant has a 5,120-token context: RoBERTa-style position ids start
# at padding_idx + 1 = 2, so the table has 5,122 rows.
CONFIGS = {
    "locore-tiny": dict(num_hidden_layers=4, hidden_size=512, intermediate_size=2048, num_attention_heads=8, attention_window=1024),
    "locore-small": dict(num_hidden_layers=6, hidden_size=768, intermediate_size=3072, num_attention_heads=12, attention_window=512),
    "locore-base": dict(num_hidden_layers=12, hidden_size=768, intermediate_size=3072, num_attention_heads=12, attention_window=512),
}
MAX_POSITIONS = 5122


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
        if name not in CONFIGS:
            raise ValueError(f"unknown LoCoRE variant {name!r}; use one of {sorted(CONFIGS)}")
        return cls(**{**CONFIGS[name], **overrides})

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
