"""The LoCoRE network: stock ``transformers`` Longformer under the official module paths
(``ExtractiveLongformerForCache``), the descriptor-to-token embedding and the per-image score."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn
from transformers import LongformerConfig, LongformerModel

from locore_plugin.listwise import image_blocks

from .attention import FAST, IMPLEMENTATIONS
from .configuration import _PAD_ID, LocoreConfig

# Replacements for the self-attention of every layer, by name: factory(LongformerSelfAttention) -> module
# with the same parameters (names and shapes) and call signature. "transformers" is the reference;
# "blocked" (.attention) computes the same function faster and is the default.
ATTENTION_IMPLEMENTATIONS: dict[str, Callable[[nn.Module], nn.Module]] = IMPLEMENTATIONS


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
        backbone = self.language_model.longformer
        tokens, attend = image_blocks(self.local_to_lm, self.scale_encoder, backbone.sep_embedding,
                                      self.global_to_lm if self.config.use_global else None, query_local, query_scale,
                                      query_mask, gallery_local, gallery_scale, gallery_mask, query_global, gallery_global)
        attend = attend.long()
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


def parameter_count(variant: str, **overrides) -> int:
    """Parameters of a variant's model (random weights), e.g. for the Table A comparison in docs/methods.md."""
    return sum(p.numel() for p in LocoreModel(LocoreConfig.variant(variant, **overrides)).parameters())
