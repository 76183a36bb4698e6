"""The recurrent LoCoRE network: the LoCoRE token sequence through bi-directional RWKV or Mamba
layers (``transformers``' own blocks) with query cross-attention blocks between them.

Choices the paper leaves open (README, "LoCoRE-RWKV and LoCoRE-Mamba"):

- **Bi-directional as Vision Mamba (Vim) does it**: one normalisation, a forward and a backward
  mixer (separate weights) on the same normalised input, their outputs summed into the residual.
  For RWKV the mixer is the time mixing (Vision-RWKV sums both directions inside its own Bi-WKV
  kernel, which ``transformers`` does not have), followed by one channel mixing as in an RWKV block.
- **Padding is removed, not masked**: a recurrence has no attention mask, so the valid tokens of
  each sequence are packed to its front before the first layer; the backward pass reverses only
  the valid part, so the right padding comes after every valid token in both directions and never
  changes one. A padded local slot's output is the preceding valid token's (so ``max-end``, the
  last local slot, reads the image's last valid local, as the Longformer's padded slot sums up
  its image).
- **Query cross-attention** before every ``cross_attention_every`` recurrent layers (the first
  before layer 1): every token attends to the query's valid tokens (pre-norm multi-head attention
  and an MLP, each residual), so every gallery image reaches the query in one step wherever it
  sits in the sequence, and the recurrent layers after it gather each local's evidence over its image.
- No position embeddings: the recurrence orders the tokens itself.
"""
from __future__ import annotations

import torch
from torch import nn
from transformers import MambaModel, RwkvModel

from locore_plugin.listwise import image_blocks

from .configuration import RecurrentConfig


class BidirectionalRwkvLayer(nn.Module):
    """Pre-norm RWKV layer: forward + backward time mixing, then channel mixing, each residual."""

    def __init__(self, forward_block: nn.Module, backward_block: nn.Module):
        super().__init__()
        self.norm = forward_block.ln1
        self.forward_mixer = forward_block.attention
        self.backward_mixer = backward_block.attention
        self.ffn_norm = forward_block.ln2
        self.ffn = forward_block.feed_forward

    def forward(self, hidden: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden)
        backward = _gather(self.backward_mixer(_gather(normed, reverse))[0], reverse)
        hidden = hidden + self.forward_mixer(normed)[0] + backward
        return hidden + self.ffn(self.ffn_norm(hidden))[0]


class BidirectionalMambaLayer(nn.Module):
    """Pre-norm Mamba layer: forward + backward selective-scan mixers on one RMS-normalised input, residual."""

    def __init__(self, forward_block: nn.Module, backward_block: nn.Module):
        super().__init__()
        self.norm = forward_block.norm
        self.forward_mixer = forward_block.mixer
        self.backward_mixer = backward_block.mixer

    def forward(self, hidden: torch.Tensor, reverse: torch.Tensor) -> torch.Tensor:
        normed = self.norm(hidden)
        backward = _gather(self.backward_mixer(_gather(normed, reverse)), reverse)
        return hidden + self.forward_mixer(normed) + backward


class QueryCrossAttention(nn.Module):
    """Every token attends to the query image's valid tokens (uni-directional: nothing attends to a gallery token)."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        hidden, self.heads = config.hidden_size, config.num_attention_heads
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.query = nn.Linear(hidden, hidden)
        self.key = nn.Linear(hidden, hidden)
        self.value = nn.Linear(hidden, hidden)
        self.output = nn.Linear(hidden, hidden)
        self.ffn_norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.ffn = nn.Sequential(nn.Linear(hidden, config.intermediate_size), nn.GELU(),
                                 nn.Linear(config.intermediate_size, hidden))
        self.dropout = nn.Dropout(config.hidden_dropout_prob)

    def forward(self, hidden: torch.Tensor, query_valid: torch.Tensor) -> torch.Tensor:
        """hidden (B, S, H) packed (the query's tokens first); query_valid (B, Q): which of the first Q are the query's."""
        normed = self.norm(hidden)
        keys = normed[:, : query_valid.shape[1]]
        heads = lambda x: x.unflatten(-1, (self.heads, -1)).transpose(1, 2)  # noqa: E731
        attended = nn.functional.scaled_dot_product_attention(
            heads(self.query(normed)), heads(self.key(keys)), heads(self.value(keys)), attn_mask=query_valid[:, None, None]
        )
        hidden = hidden + self.dropout(self.output(attended.transpose(1, 2).flatten(2)))
        return hidden + self.dropout(self.ffn(self.ffn_norm(hidden)))


class LocoreRecurrentModel(nn.Module):
    """Descriptors in, one 2-class logit pair per token out: the LoCoRE model's interface and layout."""

    def __init__(self, config: RecurrentConfig):
        super().__init__()
        self.config = config
        hidden = config.hidden_size
        self.local_to_hidden = nn.Linear(config.local_dim, hidden)
        self.global_to_hidden = nn.Linear(config.global_dim, hidden) if config.use_global else None
        self.scale_encoder = nn.Embedding(config.num_scales, hidden)
        self.sep_embedding = nn.Parameter(torch.randn(hidden) * 0.02)
        self.layers = nn.ModuleList(_recurrent_layers(config))
        self.cross_attention = nn.ModuleList(QueryCrossAttention(config) for _ in range(config.cross_attention_layers))
        self.norm = nn.LayerNorm(hidden, eps=config.layer_norm_eps)
        self.dropout = nn.Dropout(config.hidden_dropout_prob)
        self.classifier = nn.Linear(hidden, 2)

    def forward(self, query_local, query_scale, query_mask, gallery_local, gallery_scale, gallery_mask,
                query_global=None, gallery_global=None) -> torch.Tensor:
        """Token logits (B, (1 + K) * T, 2), T = L + 1 (+ 1 with global tokens); shapes as
        :meth:`LocoreModel.build_inputs <locore_plugin.adapters.locore.LocoreModel.build_inputs>`."""
        tokens, valid = image_blocks(self.local_to_hidden, self.scale_encoder, self.sep_embedding, self.global_to_hidden,
                                     query_local, query_scale, query_mask, gallery_local, gallery_scale, gallery_mask,
                                     query_global, gallery_global)
        query_valid_count = valid[:, 0].sum(1)
        tokens, valid = tokens.flatten(1, 2), valid.flatten(1, 2)

        # Pack: the valid tokens of each sequence in order, then the padding (zeroed).
        counts = valid.sum(1)
        packed_order = torch.sort((~valid).to(torch.uint8), dim=1, stable=True).indices[:, : int(counts.max())]
        positions = torch.arange(packed_order.shape[1], device=tokens.device)
        packed_valid = positions < counts[:, None]
        hidden = _gather(tokens, packed_order) * packed_valid[..., None]
        # Reversal of each sequence's valid part only (an involution: the same index undoes it).
        reverse = torch.where(packed_valid, counts[:, None] - 1 - positions, positions)
        query_valid = positions[: int(query_valid_count.max())] < query_valid_count[:, None]

        every = self.config.cross_attention_every
        for i, layer in enumerate(self.layers):
            if i % every == 0:
                hidden = self.cross_attention[i // every](hidden, query_valid)
            hidden = layer(hidden, reverse)

        # Unpack: each slot reads its own token, a padded slot the last valid token before it.
        source = (valid.cumsum(1) - 1).clamp(min=0)
        hidden = _gather(self.norm(hidden), source)
        return self.classifier(self.dropout(hidden))


def _gather(values: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """values (B, S, H) at index (B, S') along the sequence -> (B, S', H)."""
    return values.gather(1, index[..., None].expand(-1, -1, values.shape[-1]))


def _recurrent_layers(config: RecurrentConfig) -> list[nn.Module]:
    """Bi-directional layers from two stock ``transformers`` stacks (forward, backward), so every
    block has that library's initialisation (RWKV's per-layer time-decay ramps, Mamba's S4D ``A``)."""
    block_config = config.block_config()
    if config.block_type == "rwkv":
        forward_stack, backward_stack = RwkvModel(block_config).blocks, RwkvModel(block_config).blocks
        return [BidirectionalRwkvLayer(f, b) for f, b in zip(forward_stack, backward_stack)]
    forward_stack, backward_stack = MambaModel(block_config).layers, MambaModel(block_config).layers
    return [BidirectionalMambaLayer(f, b) for f, b in zip(forward_stack, backward_stack)]


def parameter_count(variant: str, **overrides) -> int:
    """Parameters of a variant's model (random weights), for README's table."""
    return sum(p.numel() for p in LocoreRecurrentModel(RecurrentConfig.variant(variant, **overrides)).parameters())
