"""RRT, Reranking Transformers (Tan et al., ICCV 2021): the official ``MatchERT`` of RRT_GLD.

One post-norm transformer encoder reads ``[CLS, query global, query locals, SEP, gallery global,
gallery locals]``: the globals are remapped (Linear) and L2-normalised, the locals L2-normalised
and given a scale embedding (7 bins) and a segment embedding per role; there is no positional
embedding (the official ``pos_encoder`` is commented out). A Linear on the CLS token gives the
logit, by which the official evaluation ranks (no fusion with the global similarity).
"""
from __future__ import annotations

import functools
from typing import Optional

import torch
import torch.nn as nn

from locore_plugin.hookspecs import hookimpl
from locore_plugin.io.checkpoints import count_blocks
from locore_plugin.nn import (
    ATTENTION_IMPLEMENTATIONS,
    FUSED,
    LayerStack,
    SelfAttention,
    allowed_keys,
    l2_normalize,
    set_attention_implementation,
)
from locore_plugin.nn import activation as activation_function
from locore_plugin.pairwise import PairwiseReranker, architecture, check_heads, loaded

# RRT_GLD/models/ingredient.py, named config RRT (seq_len and dim_K only served the unused Linformer).
CONFIGS = {
    "rrt": dict(d_global=2048, d_model=128, nhead=4, num_encoder_layers=6, dim_feedforward=1024, dropout=0.0,
                activation="relu", normalize_before=False),
    # The paper's RRT*: 768 hidden on DINOv2 descriptors (768-d locals and globals); heads and FFN
    # width follow the BERT-base ratio.
    "rrt-768": dict(d_global=768, d_model=768, nhead=12, num_encoder_layers=6, dim_feedforward=3072, dropout=0.0,
                    activation="relu", normalize_before=False),
}
# Our config keys are MatchERT's own names; the sacred ingredient's two other spellings are
# accepted too, and the Linformer sizes, which the released (full-attention) model never uses.
OFFICIAL_NAMES = {"num_global_features": "d_global", "num_local_features": "d_model"}
IGNORED_OFFICIAL = ("seq_len", "d_K", "dim_K", "name")
DEFAULT_SCALE_COLUMN = {"rrt": "value", "rrt-768": "index"}  # DELG files vs AMES-format DINOv2 files
DESCRIPTIONS = {
    "rrt": "RRT (ICCV 2021) reranking transformer on DELG global + local descriptors",
    "rrt-768": "RRT* (LoCoRE supplementary): RRT with 768 hidden size on DINOv2 descriptors",
}
# RRT_GLD/utils/data/dataset.py: the scale bins (DELG's 1/image-scale values, as decimal literals).
# The index is bisect_right(SCALES, s) - 1 on the float64 value of the float32 scale; DELG's own
# scales 0.7071, 1.4142, 2.8284 fall just below their literals, so real DELG data only uses bins
# {0, 2, 4, 6} -- the "7 scales reduced to 4" bug the authors left in, which the released
# checkpoints were trained with. This reproduces it.
SCALES = (0.5, 0.70710677, 1.0, 1.41421354, 2.0, 2.82842708, 4.0)
SEGMENTS = {"query_local": 0, "gallery_local": 1, "cls": 2, "sep": 3, "query_global": 4, "gallery_global": 5}
# The shared pair-wise options this method sets apart from their defaults (the official 500 locals).
RUNTIME = dict(query_length=500, gallery_length=500)
# What the ``scale`` column holds: DELG scale values (binned as above), or the scale-pyramid level
# the AMES-format files store (``scale_enc``: 0 for single-scale DINOv2), used as the bin itself.
SCALE_COLUMNS = ("value", "index")
# The official TripletSampler (RRT_GLD/utils/data/utils.py: anchors with >= 5 positives among their
# 100 neighbours, one random positive and one random negative each) is the training data's
# pairs="triplet" with list_length=100, triplet_power=0, min_positives=5 (recipes/train_rrt*.toml).


def sizes_from_state(state: dict) -> dict:
    """The sizes an official MatchERT state dict determines (all but ``nhead``, ``activation`` and
    ``dropout``), as far as its keys go: a file of another layout fails at the strict load, which names them."""
    sizes = {"num_encoder_layers": count_blocks(state, "encoder.layers."), "normalize_before": "encoder.norm.weight" in state}
    if "remap.weight" in state:
        sizes["d_model"], sizes["d_global"] = state["remap.weight"].shape
    if "encoder.layers.0.linear1.weight" in state:
        sizes["dim_feedforward"] = state["encoder.layers.0.linear1.weight"].shape[0]
    return sizes


def scale_index(scales: torch.Tensor) -> torch.Tensor:
    """The official bin of each scale (-1 below 0.5), computed in float64 as the official code does."""
    boundaries = torch.tensor(SCALES, dtype=torch.float64, device=scales.device)
    return torch.bucketize(scales.to(torch.float64), boundaries, right=True) - 1


class EncoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, dropout, activation, normalize_before):
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead, dropout=dropout)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.dropout1 = nn.Dropout(dropout)
        self.dropout2 = nn.Dropout(dropout)
        self.activation = activation_function(activation)
        self.normalize_before = normalize_before

    def forward(self, x, allowed):
        def sa(y):
            return self.dropout1(self.self_attn(y, allowed))

        def ff(y):
            return self.dropout2(self.linear2(self.dropout(self.activation(self.linear1(y)))))

        if self.normalize_before:
            x = x + sa(self.norm1(x))
            return x + ff(self.norm2(x))
        x = self.norm1(x + sa(x))
        return self.norm2(x + ff(x))


class MatchERT(nn.Module):
    """``forward(src_global, src_local, src_mask, src_scales, tgt_global, tgt_local, tgt_mask,
    tgt_scales) -> (B,)`` logits; masks True = padding and scales are bin indices, as officially
    (the unused positions are left out); src = query, tgt = gallery image."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        d = config["d_model"]
        self.encoder = LayerStack(
            (EncoderLayer(d, config["nhead"], config["dim_feedforward"], config["dropout"], config["activation"],
                          config["normalize_before"]) for _ in range(config["num_encoder_layers"])),
            nn.LayerNorm(d) if config["normalize_before"] else None,
        )
        self.remap = nn.Linear(config["d_global"], d)
        self.scale_encoder = nn.Embedding(len(SCALES), d)
        self.seg_encoder = nn.Embedding(len(SEGMENTS), d)
        self.classifier = nn.Linear(d, 1)
        for p in self.parameters():  # the official _reset_parameters
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)

    def forward(self, src_global, src_local, src_mask, src_scales, tgt_global, tgt_local, tgt_mask, tgt_scales):
        seg = self.seg_encoder.weight
        batch = src_local.shape[0]
        src_g = l2_normalize(self.remap(src_global)) + seg[SEGMENTS["query_global"]]
        tgt_g = l2_normalize(self.remap(tgt_global)) + seg[SEGMENTS["gallery_global"]]
        src = l2_normalize(src_local) + self.scale_encoder(src_scales) + seg[SEGMENTS["query_local"]]
        tgt = l2_normalize(tgt_local) + self.scale_encoder(tgt_scales) + seg[SEGMENTS["gallery_local"]]
        cls = seg[SEGMENTS["cls"]].expand(batch, 1, -1)
        sep = seg[SEGMENTS["sep"]].expand(batch, 1, -1)
        tokens = torch.cat([cls, src_g[:, None], src, sep, tgt_g[:, None], tgt], 1)
        visible = src_mask.new_zeros(batch, 2)
        padding = torch.cat([visible, src_mask, visible, tgt_mask], 1)
        return self.classifier(self.encoder(tokens, allowed_keys(padding))[:, 0]).view(-1)


class RRTReranker(PairwiseReranker):
    """RRT scores each (query, shortlist item) pair from globals, locals and local scales."""

    columns = ("scale",)
    needs_global = True
    exact_without_padding = True  # no positions; padded tokens are masked keys
    accelerator_batch_size = 64

    def __init__(self, module: MatchERT, scale_column: str = "value", **kwargs):
        if scale_column not in SCALE_COLUMNS:
            raise ValueError(f"scale_column must be one of {SCALE_COLUMNS}, got {scale_column!r}")
        self.scale_column = scale_column
        self.local_dim = module.config["d_model"]
        self.global_dim = module.config["d_global"]
        super().__init__(module, **kwargs)

    def pair_logits(self, module, query, gallery):
        return module(
            query["global"], query["local"], ~query["mask"], self.scale_bins(query),
            gallery["global"], gallery["local"], ~gallery["mask"], self.scale_bins(gallery),
        )

    def scale_bins(self, images: dict) -> torch.Tensor:
        """Scale-embedding rows of the valid locals (0 at padding)."""
        scale, valid = images["scale"], images["mask"]
        if self.scale_column == "value":
            bins = scale_index(scale)
            if (bins[valid] < 0).any():
                low = scale[valid & (bins < 0)].min().item()
                raise ValueError(
                    f"{self.method}: local scale {low:g} is below the smallest scale bin {SCALES[0]} (scale "
                    "columns that hold a pyramid-level index, as the AMES files do, need scale_column='index')"
                )
        else:
            bins = scale.round().long()
            bad = valid & ((bins != scale) | (bins < 0) | (bins >= len(SCALES)))
            if bad.any():
                raise ValueError(
                    f"{self.method}: with scale_column='index' the scale column must hold integers 0..{len(SCALES) - 1}, "
                    f"got {scale[bad][0].item():g}"
                )
        return bins.where(valid, torch.zeros_like(bins))


def build_rrt(name: str, checkpoint=None, pretrained: bool = True, config: Optional[dict] = None,
              scale_column: Optional[str] = None, attn_implementation: str = FUSED, **options) -> RRTReranker:
    """``checkpoint``: an official ``.pt`` (``{'state': ...}``), a ``.safetensors`` file or a
    ``save_pretrained`` folder; ``pretrained=False`` starts from the official random init.
    A bare official file sizes the model from its tensors (depth, widths, global dimension,
    pre-norm); ``nhead``, ``activation`` and ``dropout``, which no tensor shows, come from
    ``config`` or the named variant. ``config`` overrides architecture keys under the official
    ``MatchERT(...)`` (or ingredient) keyword names. ``fusion=(weight, temperature)``
    ranks by the ensemble with the global similarity; None (the official behaviour) by the logit.
    ``scale_column``: "value" (DELG scales, the default of ``rrt``) or "index" (a pyramid-level
    index as in the AMES-format files, the default of ``rrt-768``).
    ``options`` are the shared :class:`~locore_plugin.pairwise.PairwiseReranker` options
    (``query_length``, ``gallery_length``, ``top_k``, ``device``, ``dtype``, ``batch_size``,
    ``variable_locals``, ``verbose``), with this method's defaults in ``RUNTIME``.
    ``attn_implementation``: ``"sdpa"`` (fused attention, the default) or ``"reference"``
    (``nn.MultiheadAttention``'s own forward, for equivalence checks and ``locore-plugin bench``)."""
    settings, state = architecture(name, CONFIGS[name], checkpoint, pretrained, config, "uvavision/RerankingTransformer",
                                   sizes_from_state=sizes_from_state, official_names=OFFICIAL_NAMES,
                                   ignored=IGNORED_OFFICIAL)
    activation_function(settings["activation"])  # an unknown one fails here, before any weights are built
    check_heads(name, settings["d_model"], settings["nhead"], "d_model", "nhead")
    return RRTReranker(set_attention_implementation(loaded(MatchERT(settings), state, checkpoint), attn_implementation),
                       scale_column=DEFAULT_SCALE_COLUMN[name] if scale_column is None else scale_column,
                       **{**RUNTIME, **options})


@hookimpl
def register_rerankers(register):
    for name in CONFIGS:
        register(name, functools.partial(build_rrt, name), description=DESCRIPTIONS[name], learned=True, inputs=("global", "local"),
                 columns=("scale",), attn_implementations=ATTENTION_IMPLEMENTATIONS)
