"""Small layers the pair-wise transformers share (AMES, RRT), under the official parameter names.

``SelfAttention`` holds exactly the parameters of ``torch.nn.MultiheadAttention`` (``in_proj_weight``,
``in_proj_bias``, ``out_proj``), so official checkpoints load into it unchanged, but it computes with
``scaled_dot_product_attention`` and one boolean mask that callers build once per forward: the
``nn.MultiheadAttention`` path with a key-padding mask runs a separate masked softmax and batched
matmuls, several times slower on a CPU. ``forward_blocks`` computes only the allowed blocks of a
block-structured pattern (AMES's self and cross attention).
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    """Multi-head self-attention over (B, L, D) with ``nn.MultiheadAttention``'s parameters and
    initialisation; ``allowed`` is a boolean mask broadcastable to (B, heads, L, L), True where a
    query token may attend to a key token (None: everything)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        super().__init__()
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        self.heads, self.dropout = heads, float(dropout)
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * dim))
        self.out_proj = nn.Linear(dim, dim)
        # nn.MultiheadAttention._reset_parameters, in its order (the random draws match it)
        nn.init.xavier_uniform_(self.in_proj_weight)
        nn.init.zeros_(self.in_proj_bias)
        nn.init.zeros_(self.out_proj.bias)

    def forward(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None) -> torch.Tensor:
        q, k, v = self._heads(x)
        return self._merge(self._attend(q, k, v, allowed))

    def forward_blocks(self, x: torch.Tensor, padding: torch.Tensor, blocks) -> torch.Tensor:
        """The same attention when the allowed pattern is block-structured: ``blocks`` is a list of
        (rows, keys), a slice of query positions (covering 0..L-1 in order) and the keys they may
        attend to (a slice, taken without a copy, or an index tensor); ``padding`` (B, L), True = a
        padded key. Only the allowed blocks are computed: for AMES's cross attention between a
        600-local query and a 50-local database image, a seventh of the full L x L products."""
        q, k, v = self._heads(x)
        outputs = []
        for rows, keys in blocks:
            allowed = ~_take(padding, keys, 1)[:, None, None, :]
            outputs.append(self._attend(q[:, :, rows], _take(k, keys, 2), _take(v, keys, 2), allowed))
        return self._merge(torch.cat(outputs, 2))

    def _heads(self, x):
        batch, length, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, length, 3, self.heads, -1)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)

    def _attend(self, q, k, v, allowed):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)

    def _merge(self, out):
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


def _take(t: torch.Tensor, keys: Union[slice, torch.Tensor], dim: int) -> torch.Tensor:
    return t[(slice(None),) * dim + (keys,)] if isinstance(keys, slice) else t.index_select(dim, keys)


def allowed_keys(padding: torch.Tensor) -> torch.Tensor:
    """The ``allowed`` mask (B, 1, 1, L) of ``SelfAttention`` from an official key-padding mask
    (B, L), True = padding."""
    return ~padding[:, None, None, :]


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """L2 normalisation computed in float32: in float16 the official eps (1e-12) underflows and the
    zero padding would become NaN."""
    return F.normalize(x.float(), p=2, dim=-1).to(x.dtype)


def xavier_init(module: nn.Module) -> None:
    """The ViT-style initialisation of the official R2Former and ELViS code, applied to ``module``
    and its children: xavier-uniform Linear weights, zero biases, unit LayerNorm."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)


def is_layer_norm_eps_1e6(value) -> bool:
    """Whether an official ``norm_layer`` argument is ``partial(nn.LayerNorm, eps=1e-6)`` (the one the
    R2Former and ELViS ports implement), given as that object or as the text a config file records."""
    if isinstance(value, functools.partial):
        return value.func is nn.LayerNorm and value.keywords == {"eps": 1e-6} and not value.args
    return isinstance(value, str) and value.replace(" ", "") in ("partial(nn.LayerNorm,eps=1e-6)", "partial(nn.LayerNorm,eps=1e-06)")
