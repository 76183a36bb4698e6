"""Small layers the pair-wise transformers share (AMES, RRT, R2Former), under the official parameter names.

``SelfAttention`` *is* a ``torch.nn.MultiheadAttention`` (same parameters, initialisation and
state-dict names, so official checkpoints load into it unchanged) that computes, by default, with
``scaled_dot_product_attention`` and one boolean mask that callers build once per forward: the
``nn.MultiheadAttention`` path with a key-padding mask runs a separate masked softmax and batched
matmuls, several times slower on a CPU. It computes only the allowed blocks of a
block-structured pattern (AMES's self and cross attention) when called with ``blocks``.

Every attention layer here is a :class:`SwitchableAttention`: ``implementation`` is ``"sdpa"``
(the fused kernel, the default) or ``"reference"`` (what the official code runs: here
``nn.MultiheadAttention``'s own forward, in R2Former timm's explicit softmax), so that equivalence
tests and ``locore-plugin bench`` can run both on the same weights.
"""
from __future__ import annotations

import functools
from typing import Optional, Union

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

REFERENCE, FUSED = "reference", "sdpa"
ACTIVATIONS = {"relu": F.relu, "gelu": F.gelu}  # the official encoders' ``activation`` choices
ATTENTION_IMPLEMENTATIONS = (REFERENCE, FUSED)  # the reference first: registry metadata ``attn_implementations``


class SwitchableAttention(nn.Module):
    """Marker and switch of an attention layer with a fused and a reference implementation."""

    implementation: str = FUSED


def set_attention_implementation(module: nn.Module, name: str) -> nn.Module:
    """Switch every :class:`SwitchableAttention` inside ``module`` to ``name`` (``"sdpa"`` or ``"reference"``)."""
    if name not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"unknown attn_implementation {name!r}; use one of {list(ATTENTION_IMPLEMENTATIONS)}")
    for layer in module.modules():
        if isinstance(layer, SwitchableAttention):
            layer.implementation = name
    return module


def attention_layers(module: nn.Module) -> list[nn.Module]:
    """The attention layers of ``module`` (what ``locore-plugin bench`` times on their own): those
    its ``attention_layers()`` method names (a model whose attention comes from another library,
    e.g. LoCoRE's Longformer), else every :class:`SwitchableAttention` inside it."""
    if callable(getattr(module, "attention_layers", None)):
        return list(module.attention_layers())
    return [m for m in module.modules() if isinstance(m, SwitchableAttention)]


class SelfAttention(SwitchableAttention, nn.MultiheadAttention):
    """Multi-head self-attention over (B, L, D): an ``nn.MultiheadAttention`` (``batch_first``);
    ``allowed`` is a boolean mask broadcastable to (B, heads, L, L), True where a query token may
    attend to a key token (None: everything)."""

    def __init__(self, dim: int, heads: int, dropout: float = 0.0):
        if dim % heads:
            raise ValueError(f"width {dim} is not divisible by {heads} heads")
        super().__init__(dim, heads, dropout=dropout, batch_first=True)

    def forward(self, x: torch.Tensor, allowed: Optional[torch.Tensor] = None, *, padding: Optional[torch.Tensor] = None,
                blocks=None) -> torch.Tensor:
        """``allowed`` (see the class), or, when the allowed pattern is block-structured, ``padding``
        (B, L), True = a padded key, and ``blocks``, a list of (rows, keys): a slice of query
        positions (covering 0..L-1 in order) and the keys they may attend to (a slice, taken without
        a copy, or an index tensor). Only the allowed blocks are computed: for AMES's cross attention
        between a 600-local query and a 50-local database image, a seventh of the full L x L products."""
        if blocks is not None:
            return self._forward_blocks(x, padding, blocks)
        if self.implementation == REFERENCE:
            return self._reference(x, *_official_masks(allowed, x.shape[0], self.num_heads, x.shape[1]))
        q, k, v = self._heads(x)
        return self._merge(self._attend(q, k, v, allowed))

    def _forward_blocks(self, x: torch.Tensor, padding: torch.Tensor, blocks) -> torch.Tensor:
        if self.implementation == REFERENCE:
            blocked = torch.ones(x.shape[1], x.shape[1], dtype=torch.bool, device=x.device)
            for rows, keys in blocks:
                blocked[rows, keys] = False
            return self._reference(x, padding, blocked)
        q, k, v = self._heads(x)
        outputs = []
        for rows, keys in blocks:
            allowed = ~_take(padding, keys, 1)[:, None, None, :]
            outputs.append(self._attend(q[:, :, rows], _take(k, keys, 2), _take(v, keys, 2), allowed))
        return self._merge(torch.cat(outputs, 2))

    def _reference(self, x, key_padding_mask, attn_mask):
        """``nn.MultiheadAttention.forward`` itself (masks in its convention: True = not allowed)."""
        return nn.MultiheadAttention.forward(self, x, x, x, key_padding_mask=key_padding_mask, attn_mask=attn_mask,
                                             need_weights=False)[0]

    def _heads(self, x):
        batch, length, _ = x.shape
        qkv = F.linear(x, self.in_proj_weight, self.in_proj_bias).view(batch, length, 3, self.num_heads, -1)
        return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, heads, L, head_dim)

    def _attend(self, q, k, v, allowed):
        return F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=self.dropout if self.training else 0.0)

    def _merge(self, out):
        batch, _, length, _ = out.shape
        return self.out_proj(out.transpose(1, 2).reshape(batch, length, -1))


def _official_masks(allowed: Optional[torch.Tensor], batch: int, heads: int, length: int):
    """``allowed`` (True = may attend) as ``nn.MultiheadAttention``'s (key_padding_mask, attn_mask):
    a per-key mask (B, 1, 1, L) becomes the key padding, anything else a (B * heads, L, L) mask."""
    if allowed is None:
        return None, None
    if allowed.dim() == 4 and allowed.shape[1] == 1 and allowed.shape[2] == 1:
        return ~allowed[:, 0, 0, :].expand(batch, length), None
    return None, ~allowed.expand(batch, heads, length, length).reshape(batch * heads, length, length)


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


def activation(name: str):
    """The FFN activation of an official ``activation=`` keyword; an unknown one is an error that lists them."""
    if name not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {sorted(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]


class LayerStack(nn.Module):
    """The official encoder/decoder container (``layers``, then a final ``norm`` in pre-norm models
    only: those state-dict names), whose layers can recompute their activations in backward.

    ``forward(x, *args)`` runs ``layer(x, *args)`` in turn; the shared trainer's
    ``gradient_checkpointing = true`` finds :meth:`gradient_checkpointing_enable` here."""

    def __init__(self, layers, norm: Optional[nn.Module] = None):
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = norm
        self.gradient_checkpointing = False

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs=None) -> None:
        """Recompute each layer in backward (non-reentrant, which DDP supports)."""
        self.gradient_checkpointing = True

    def forward(self, x: torch.Tensor, *args) -> torch.Tensor:
        for layer in self.layers:
            if self.gradient_checkpointing and self.training:
                x = checkpoint(layer, x, *args, use_reentrant=False)
            else:
                x = layer(x, *args)
        return x if self.norm is None else self.norm(x)
