"""Blocked Longformer self-attention: the ``transformers`` ``LongformerSelfAttention`` function, faster.

The reference (``transformers.models.longformer``) builds the sliding window from overlapping
2w x 2w chunks and then re-diagonalises them with pads, strided views and copies of the full score
tensor; on a CPU most of a LoCoRE forward is spent there. Here the (window-padded) sequence is cut
into blocks of ``block`` queries; each block's keys, the G global tokens and the positions within
``block`` +- w, are gathered in one ``index_select``, and one ``scaled_dot_product_attention`` call
(a fused kernel that never stores the scores) runs every block with an additive band mask. The
largest intermediate is that mask, ``L x (G + block + 2w)``; a dense ``L x L`` matrix never exists.

Semantics are those of the reference, with ``attention_mask`` as ``LongformerModel`` passes it
(negative: masked, 0: local, positive: global):

* every non-global token attends to the tokens at most w = window/2 positions away that are
  neither masked nor global, plus every global token (with the *local* key/value projections);
* global tokens attend to every unmasked token with the separate ``*_global`` projections;
* masked tokens output zeros.

The module reuses the reference's six ``nn.Linear`` layers, so state dicts are unchanged.
"""
from __future__ import annotations

import math

import torch
from torch import nn
from transformers.models.longformer.modeling_longformer import LongformerSelfAttention

REFERENCE, FAST = "transformers", "blocked"  # the implementation names (a model's ``attn_implementation``)
DEFAULT_BLOCK = 256
_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")


class BlockedLongformerSelfAttention(LongformerSelfAttention):
    """Drop-in replacement for ``LongformerSelfAttention`` (same parameters and call signature).

    Two cases run the inherited reference code instead: ``output_attentions=True`` (the blocked
    path never forms the attention maps) and float64, the verification precision, where the
    reference rounds its probabilities to float32 (a fused kernel cannot repeat that rounding).
    """

    def __init__(self, reference: LongformerSelfAttention, block_size: int | None = None):
        nn.Module.__init__(self)  # the reference's own __init__ would allocate fresh projections
        for name in _PROJECTIONS:
            setattr(self, name, getattr(reference, name))
        self.num_heads = reference.num_heads
        self.head_dim = reference.head_dim
        self.embed_dim = reference.embed_dim
        self.dropout = reference.dropout
        self.layer_id = reference.layer_id
        self.config = reference.config
        self.one_sided_attn_window_size = reference.one_sided_attn_window_size
        # A block wastes block/(2w) of its keys (the band corners) and repeats the global keys once;
        # 256 queries balanced the two best on CPU for both LoCoRE windows (w = 256 and 512).
        self.block_size = int(block_size or min(self.one_sided_attn_window_size, DEFAULT_BLOCK))
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.train(reference.training)

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None, output_attentions=False):
        """``hidden_states`` (B, L, E), ``attention_mask`` (B, L) -> ``(attn_output (B, L, E),)``."""
        if output_attentions or hidden_states.dtype == torch.float64:
            return super().forward(hidden_states, attention_mask, is_index_masked, is_index_global_attn,
                                   is_global_attn, output_attentions)
        batch, length, _ = hidden_states.shape
        if attention_mask is None:
            attention_mask = hidden_states.new_zeros(batch, length)
        if is_index_masked is None:
            is_index_masked = attention_mask < 0
        if is_index_global_attn is None:
            is_index_global_attn = attention_mask > 0
        if is_global_attn is None:
            is_global_attn = bool(is_index_global_attn.any())
        index = present = None
        if is_global_attn:
            index, present = _global_index(is_index_global_attn)
        output = self._local(hidden_states, attention_mask == 0, index, present)
        if is_global_attn:
            output = self._global_rows(hidden_states, output, index, present, is_index_masked)
        return (output.masked_fill(is_index_masked[..., None], 0.0),)

    def _local(self, hidden_states, windowed, index, present):
        """Every row's attention over its window (keys neither masked nor global) and the global keys.

        Blocks of ``block`` queries, each with the keys [global tokens | positions block +- w]
        gathered in one ``index_select``, go through one ``scaled_dot_product_attention`` call (a
        fused kernel: the scores are never stored).
        """
        batch, length, embed = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        w, block = self.one_sided_attn_window_size, self.block_size
        blocks = -(-length // block)
        padded = blocks * block
        span = block + 2 * w
        device = hidden_states.device
        # block b sees the positions [b*block - w, b*block + block + w); out-of-range ones are clamped and masked
        rows = torch.arange(block, device=device)[:, None]
        slots = torch.arange(span, device=device)[None, :]
        positions = torch.arange(blocks, device=device)[:, None] * block - w + slots  # (blocks, span)
        in_range = (positions >= 0) & (positions < length)
        positions = positions.clamp(0, length - 1).expand(batch, -1, -1)
        if index is not None:
            positions = torch.cat([index[:, None, :].expand(-1, blocks, -1), positions], 2)
        flat = (positions + torch.arange(batch, device=device)[:, None, None] * length).flatten()
        keys_per_block = positions.shape[2]

        # query row r may use window slot t iff r <= t <= r + 2w (|i - j| <= w), t is in range and windowed
        band = (slots >= rows) & (slots <= rows + 2 * w)
        window_ok = windowed.flatten().index_select(0, flat).view(batch, blocks, keys_per_block)
        allowed = band & (window_ok[..., keys_per_block - span:] & in_range)[:, :, None, :]  # (B, blocks, block, span)
        if index is not None:
            allowed = torch.cat([present[:, None, None, :].expand(-1, blocks, block, -1), allowed], -1)
        bias = _additive_mask(allowed, hidden_states.dtype)

        def blocked(projection):  # (B, L, E) -> (B * blocks, heads, keys_per_block, dim)
            gathered = projection(hidden_states).view(batch * length, embed).index_select(0, flat)
            return gathered.view(batch * blocks, keys_per_block, heads, dim).transpose(1, 2)

        query = self.query(hidden_states)
        if padded != length:
            query = nn.functional.pad(query, (0, 0, 0, padded - length))
        query = query.view(batch * blocks, block, heads, dim).transpose(1, 2)
        output = nn.functional.scaled_dot_product_attention(  # 4-d inputs: SDPA's fused kernels, not its math path
            query, blocked(self.key), blocked(self.value), attn_mask=bias.view(batch * blocks, 1, block, keys_per_block),
            dropout_p=self.dropout if self.training else 0.0, scale=1.0 / math.sqrt(dim),
        )  # (B * blocks, heads, block, dim)
        return output.transpose(1, 2).reshape(batch, padded, embed)[:, :length]

    def _global_rows(self, hidden_states, output, index, present, is_index_masked):
        """Overwrite the global tokens' rows: they attend to every unmasked token with the global projections."""
        batch, length, embed = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        query = self.query_global(_gather_tokens(hidden_states, index)).view(batch, -1, heads, dim).transpose(1, 2)
        key = self.key_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
        value = self.value_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
        bias = _additive_mask(~is_index_masked[:, None, None, :], hidden_states.dtype)
        rows = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=1.0 / math.sqrt(dim)
        ).transpose(1, 2).reshape(batch, -1, embed)
        owner = torch.arange(batch, device=index.device)[:, None].expand_as(index)
        return output.index_put((owner[present], index[present]), rows[present])


def _global_index(is_global: torch.Tensor):
    """Positions of the global tokens per row, right-padded to the largest count: (index, present), (B, G)."""
    counts = is_global.sum(1)
    width = int(counts.max())
    order = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :width]
    present = torch.arange(width, device=is_global.device)[None, :] < counts[:, None]
    return order, present


def _additive_mask(allowed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """0 where allowed, the dtype's most negative finite value elsewhere (as the reference: no -inf, no NaN rows)."""
    zero = torch.zeros((), dtype=dtype, device=allowed.device)
    return torch.where(allowed, zero, torch.finfo(dtype).min)


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, G) of a (B, L, E) tensor: (B, G, E)."""
    batch, length, embed = x.shape
    flat = index + torch.arange(batch, device=index.device)[:, None] * length
    return x.reshape(batch * length, embed).index_select(0, flat.flatten()).view(batch, -1, embed)


def blocked_attention(module: nn.Module) -> nn.Module:
    """Factory: the blocked implementation sharing ``module``'s projections (either implementation in)."""
    return module if isinstance(module, BlockedLongformerSelfAttention) else BlockedLongformerSelfAttention(module)


def reference_attention(module: nn.Module) -> nn.Module:
    """Factory: ``transformers``' ``LongformerSelfAttention`` sharing ``module``'s projections."""
    if type(module) is LongformerSelfAttention:
        return module
    reference = LongformerSelfAttention(module.config, module.layer_id)
    for name in _PROJECTIONS:
        setattr(reference, name, getattr(module, name))
    return reference.train(module.training)


IMPLEMENTATIONS = {REFERENCE: reference_attention, FAST: blocked_attention}
