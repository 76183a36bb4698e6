"""Blocked Longformer self-attention: the ``transformers`` ``LongformerSelfAttention`` function, faster.

The reference (``transformers.models.longformer``) builds the sliding window from overlapping
2w x 2w chunks and then re-diagonalises them with several pads, strided views and copies; on a CPU
most of a LoCoRE forward is spent there. Here the (window-padded) sequence is cut into blocks of
``block`` queries; each block is multiplied once with the ``block + 2w`` keys around it (one batched
matmul, the keys are a strided view of the padded key tensor, never copied), so the largest score
tensor is ``L x (block + 2w)`` per head, never ``L x L``.

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

_PROJECTIONS = ("query", "key", "value", "query_global", "key_global", "value_global")


class BlockedLongformerSelfAttention(nn.Module):
    """Drop-in replacement for ``LongformerSelfAttention`` (same parameters and call signature)."""

    def __init__(self, reference: nn.Module, block_size: int | None = None):
        super().__init__()
        for name in _PROJECTIONS:
            setattr(self, name, getattr(reference, name))
        self.num_heads = reference.num_heads
        self.head_dim = reference.head_dim
        self.embed_dim = reference.embed_dim
        self.dropout = reference.dropout
        self.layer_id = reference.layer_id
        self.config = reference.config
        self.one_sided_attn_window_size = reference.one_sided_attn_window_size
        window = self.one_sided_attn_window_size
        self.block_size = int(block_size or window)
        if self.block_size < 1:
            raise ValueError(f"block_size must be positive, got {block_size}")
        self.train(reference.training)

    def forward(self, hidden_states, attention_mask=None, is_index_masked=None, is_index_global_attn=None,
                is_global_attn=None, output_attentions=False):
        """``hidden_states`` (B, L, E), ``attention_mask`` (B, L) -> ``(attn_output (B, L, E),)``."""
        if output_attentions:
            raise ValueError("the blocked attention does not return attention maps; use the 'transformers' implementation")
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

        Blocks of ``block`` queries, each with the keys [global tokens | the block +- w], go through
        one ``scaled_dot_product_attention`` call (a fused kernel: no score tensor is stored).
        """
        batch, length, embed = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        w, block = self.one_sided_attn_window_size, self.block_size
        blocks = -(-length // block)
        padded = blocks * block
        span = block + 2 * w
        num_global = 0 if index is None else index.shape[1]

        query = self.query(hidden_states) * (1.0 / math.sqrt(dim))
        query = _pad_tokens(query, 0, padded - length).view(batch, blocks, block, heads, dim).transpose(2, 3)
        keys = hidden_states.new_empty(batch, blocks, num_global + span, embed)
        values = torch.empty_like(keys)
        for projection, out in ((self.key, keys), (self.value, values)):
            projected = projection(hidden_states)
            if num_global:
                out[:, :, :num_global] = _gather_tokens(projected, index)[:, None]
            # block b sees positions [b*block - w, b*block + block + w): an overlapping strided view
            out[:, :, num_global:] = _windows(_pad_tokens(projected, w, padded - length + w), blocks, block, span)
        keys = keys.view(batch, blocks, num_global + span, heads, dim).transpose(2, 3)
        values = values.view(batch, blocks, num_global + span, heads, dim).transpose(2, 3)

        # row r of a block may use window slot t iff r <= t <= r + 2w (|i - j| <= w) and key t is windowed
        rows = torch.arange(block, device=windowed.device)[:, None]
        slots = torch.arange(span, device=windowed.device)[None, :]
        band = (slots >= rows) & (slots <= rows + 2 * w)
        key_ok = _windows(_pad_tokens(windowed[..., None], w, padded - length + w), blocks, block, span)[..., 0]
        allowed = band & key_ok[:, :, None, :]  # (B, blocks, block, span)
        if num_global:
            allowed = torch.cat([present[:, None, None, :].expand(-1, blocks, block, -1), allowed], -1)
        bias = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        bias.masked_fill_(~allowed, torch.finfo(query.dtype).min)

        # 4-d inputs (blocks as batch) so that SDPA takes its fused CPU/GPU kernels, not the math path
        output = nn.functional.scaled_dot_product_attention(
            query.flatten(0, 1), keys.flatten(0, 1), values.flatten(0, 1), attn_mask=bias.flatten(0, 1)[:, None],
            dropout_p=self.dropout if self.training else 0.0, scale=1.0,
        )  # (B * blocks, heads, block, dim)
        return output.view(batch, blocks, heads, block, dim).transpose(2, 3).reshape(batch, padded, embed)[:, :length]

    def _global_rows(self, hidden_states, output, index, present, is_index_masked):
        """Overwrite the global tokens' rows: they attend to every unmasked token with the global projections."""
        batch, length, embed = hidden_states.shape
        heads, dim = self.num_heads, self.head_dim
        query = self.query_global(_gather_tokens(hidden_states, index)) * (1.0 / math.sqrt(dim))
        query = query.view(batch, -1, heads, dim).transpose(1, 2)
        key = self.key_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
        value = self.value_global(hidden_states).view(batch, length, heads, dim).transpose(1, 2)
        bias = torch.zeros(batch, 1, 1, length, dtype=query.dtype, device=query.device)
        bias.masked_fill_(is_index_masked[:, None, None, :], torch.finfo(query.dtype).min)
        rows = nn.functional.scaled_dot_product_attention(
            query, key, value, attn_mask=bias, dropout_p=self.dropout if self.training else 0.0, scale=1.0
        ).transpose(1, 2).reshape(batch, -1, embed)
        target = torch.where(present, index, length)  # absent slots land in an extra row that is dropped
        output = torch.cat([output, output.new_zeros(batch, 1, embed)], 1)
        output = output.scatter(1, target[..., None].expand(-1, -1, embed), rows)
        return output[:, :length]


def _global_index(is_global: torch.Tensor):
    """Positions of the global tokens per row, right-padded to the largest count: (index, present), (B, G)."""
    counts = is_global.sum(1)
    width = int(counts.max())
    order = torch.argsort((~is_global).to(torch.int8), dim=1, stable=True)[:, :width]
    present = torch.arange(width, device=is_global.device)[None, :] < counts[:, None]
    return order, present


def _pad_tokens(x: torch.Tensor, front: int, back: int) -> torch.Tensor:
    """Zero-pad the token dimension (1) of a (B, L, ...) tensor into a new contiguous one."""
    out = x.new_zeros(x.shape[0], front + x.shape[1] + back, *x.shape[2:])
    out[:, front:front + x.shape[1]] = x
    return out


def _gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows ``index`` (B, G) of a (B, L, E) tensor: (B, G, E)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _windows(x: torch.Tensor, blocks: int, block: int, span: int) -> torch.Tensor:
    """(B, blocks*block + span - block, E) -> overlapping view (B, blocks, span, E) with stride ``block``."""
    s = x.stride()
    return x.as_strided((x.shape[0], blocks, span, x.shape[2]), (s[0], block * s[1], s[1], s[2]))


def blocked_attention(module: nn.Module) -> nn.Module:
    """Factory: the blocked implementation sharing ``module``'s projections (either implementation in)."""
    return module if isinstance(module, BlockedLongformerSelfAttention) else BlockedLongformerSelfAttention(module)


def reference_attention(module: nn.Module) -> nn.Module:
    """Factory: ``transformers``' ``LongformerSelfAttention`` sharing ``module``'s projections."""
    if isinstance(module, LongformerSelfAttention):
        return module
    reference = LongformerSelfAttention(module.config, module.layer_id)
    for name in _PROJECTIONS:
        setattr(reference, name, getattr(module, name))
    return reference.train(module.training)
