"""R2Former re-ranking (Zhu et al., CVPR 2023): a pair classifier over local correspondences.

Faithful to the official ``R2Former`` module (bytedance/R2Former ``model/R2Former.py``): for
each local of either image, its 5 best correspondences by cosine similarity become 7-d tokens
``[query x, y, attention | gallery x, y, attention | correlation]`` (both row kinds keep that
order); a first transformer (2 blocks) summarises each local's correspondences into one token
(CLS), a second one (6 blocks) classifies the pair from all locals' tokens. Positions enter as
MAE-style 2-D sin-cos embeddings of the raw [0, 1] coordinates. The score is softmax[:, 1].

Padding (images with fewer locals than the padded length) is the one extension: padded locals
are never selected as correspondences and are masked out of attention. Without padding the
forward is the official one.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from locore_plugin.hookspecs import hookimpl
from locore_plugin.io.checkpoints import Checkpoint, count_blocks, read_checkpoint
from locore_plugin.nn import (
    ATTENTION_IMPLEMENTATIONS,
    FUSED,
    REFERENCE,
    SwitchableAttention,
    is_layer_norm_eps_1e6,
    set_attention_implementation,
    xavier_init,
)
from locore_plugin.options import LocoreDeprecationWarning
from locore_plugin.pairwise import PairwiseReranker, architecture, loaded


@dataclass(frozen=True)
class R2FormerConfig:
    """Architecture hyper-parameters (the official values are the defaults).

    ``num_patches`` only sizes ``decoder_pos_embed``, a parameter the official forward never
    uses but every official checkpoint holds (``2 * num_local``; 1000 with the official num_local=500).
    ``global_dim`` is the official ``input_dim``: recorded, unused by the logits.
    """

    hidden: int = 32
    depth: int = 6
    pair_depth: int = 2
    heads: int = 4
    mlp_ratio: float = 4.0
    local_dim: int = 128
    global_dim: int = 256
    num_corr: int = 5
    num_patches: int = 1000

    def __post_init__(self):
        if self.hidden % self.heads:
            raise ValueError(
                f"hidden ({self.hidden}) must be divisible by heads ({self.heads}); the number of heads cannot be read "
                "from a checkpoint's tensors: pass config={'heads': ...}"
            )
        if self.hidden % 4:
            raise ValueError(f"hidden ({self.hidden}) must be divisible by 4 (2-D sin-cos embedding)")
        for name in ("hidden", "depth", "pair_depth", "heads", "local_dim", "num_corr", "num_patches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive, got {getattr(self, name)}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> "R2FormerConfig":
        unknown = set(data) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown R2Former config field(s): {sorted(unknown)}")
        return cls(**data)


# The registered variants as data (architecture keywords, as every adapter writes them); unset
# fields take R2FormerConfig's defaults, the official values.
CONFIGS = {
    # the released model: DeiT-S locals through a 128-d local head, 256-d global
    "r2former": dict(hidden=32, depth=6, pair_depth=2, heads=4, mlp_ratio=4.0, local_dim=128, global_dim=256, num_corr=5,
                     num_patches=1000),
    # the LoCoRE paper's R2Former*: 768 hidden on DINOv2 (ViT-B) locals; 12 heads (head dim 64) is our choice
    "r2former-768": dict(hidden=768, depth=6, pair_depth=2, heads=12, mlp_ratio=4.0, local_dim=768, global_dim=768,
                         num_corr=5, num_patches=1000),
}


class Attention(SwitchableAttention):
    """timm 0.5.4 ``Attention`` (fused qkv with bias), with an optional key mask; ``"reference"``
    runs timm's explicit ``softmax(q k^T / sqrt(d)) v``, the default the fused kernel."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor]) -> torch.Tensor:
        b, s, c = x.shape
        q, k, v = self.qkv(x).reshape(b, s, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        mask = None if valid is None else valid[:, None, None, :]
        if self.implementation == REFERENCE:
            scores = (q @ k.transpose(-2, -1)) * (c // self.heads) ** -0.5
            if mask is not None:
                scores = scores.masked_fill(~mask, float("-inf"))
            out = scores.softmax(-1) @ v
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return self.proj(out.transpose(1, 2).reshape(b, s, c))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x)))


class Block(nn.Module):
    """timm 0.5.4 pre-norm ``Block`` (LayerNorm eps 1e-6, exact GELU), same parameter names."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor, valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), valid)
        return x + self.mlp(self.norm2(x))


def sincos_2d(dim: int, coords: torch.Tensor) -> torch.Tensor:
    """MAE 2-D sin-cos embedding of continuous coordinates (..., 2) -> (..., dim):
    ``[sin(x w), cos(x w), sin(y w), cos(y w)]`` with ``w_k = 10000^(-k / (dim/4))``."""
    quarter = dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float32, device=coords.device) / quarter)
    angles = coords[..., :, None] * omega.to(coords.dtype)  # (..., 2, dim/4)
    emb = torch.cat([angles.sin(), angles.cos()], dim=-1)  # (..., 2, dim/2): x half, then y half
    return emb.flatten(-2)


@dataclass
class Correspondences:
    """The top-k correspondences of every local of a pair, as the official forward builds them.

    ``select`` (P, N+M, k, 7): rows 0..N-1 are query locals (their k best gallery locals), rows
    N.. gallery locals (their k best query locals); ``valid`` (P, N+M, k) whether both ends are
    real locals; ``row_valid`` (P, N+M); ``correlation`` (P, N, M); ``query_index`` (P, N, k) and
    ``gallery_index`` (P, k, M) the chosen partners (official ``order_q`` / ``order_k`` layouts).
    """

    select: torch.Tensor
    valid: torch.Tensor
    row_valid: torch.Tensor
    correlation: torch.Tensor
    query_index: torch.Tensor
    gallery_index: torch.Tensor


class R2Former(nn.Module):
    """The official ``R2Former`` reranker module (key names as in its state dict).

    Inputs per image side: ``local`` (P, N, D) raw descriptors (L2-normalised here), ``mask``
    (P, N) bool True = real local, ``xy`` (P, N, 2) patch centres divided by max(H, W), and
    ``weight`` (P, N) attention divided by its per-image maximum; xy and weight are clamped to
    [0, 1] as the official forward does. Returns the two-class logits (P, 2).
    """

    def __init__(self, config: R2FormerConfig = R2FormerConfig()):
        super().__init__()
        self.config = config
        c = config.hidden
        self.cls_token = nn.Parameter(torch.zeros(1, 1, c))
        self.cls_token_2 = nn.Parameter(torch.zeros(1, 1, c))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, config.num_patches + 1, c))
        self.ratio = nn.Parameter(torch.full((1,), 0.5))
        self.blocks = nn.ModuleList(Block(c, config.heads, config.mlp_ratio) for _ in range(config.depth))
        self.blocks_2 = nn.ModuleList(Block(c, config.heads, config.mlp_ratio) for _ in range(config.pair_depth))
        self.decoder_norm = nn.LayerNorm(c, eps=1e-6)
        self.pair_head = nn.Linear(7, c)
        self.pair_head_2 = nn.Linear(c, c)
        self.decoder_pred = nn.Linear(c, 2)
        self._init_weights()

    def _init_weights(self):
        """The official initialisation (for training from scratch)."""
        nn.init.trunc_normal_(self.cls_token, std=0.02)
        nn.init.trunc_normal_(self.cls_token_2, std=0.02)
        nn.init.normal_(self.decoder_pos_embed[:, 1:], std=0.01)
        xavier_init(self)

    def fusion_weight(self) -> float:
        """The learned weight of the global similarity in the official ``final_score``."""
        return float(self.ratio.detach().clamp(0.1, 0.9))

    def correspondences(self, query: dict, gallery: dict) -> Correspondences:
        """Top-k correspondences each way (padded locals never chosen when real ones remain)."""
        k = self.config.num_corr
        q_desc, g_desc = query["local"], gallery["local"]
        n, m = q_desc.shape[1], g_desc.shape[1]
        if min(n, m) < k:
            raise ValueError(f"R2Former needs at least num_corr={k} local slots per image, got {n} and {m}")
        q_mask, g_mask = query["mask"], gallery["mask"]
        correlation = F.normalize(q_desc, dim=2) @ F.normalize(g_desc, dim=2).transpose(1, 2)
        q_pts = torch.cat([query["xy"], query["weight"][..., None]], dim=2).clamp(0, 1)  # (P, N, 3)
        g_pts = torch.cat([gallery["xy"], gallery["weight"][..., None]], dim=2).clamp(0, 1)
        pair_valid = q_mask[:, :, None] & g_mask[:, None, :]
        ranking = correlation.masked_fill(~pair_valid, float("-inf"))

        q_index = ranking.topk(k, dim=2).indices  # (P, N, k) best gallery locals per query local
        g_index = ranking.topk(k, dim=1).indices  # (P, k, M) best query locals per gallery local
        g_index_t = g_index.transpose(1, 2)  # (P, M, k)
        partners_q = _gather_rows(g_pts, q_index)  # (P, N, k, 3)
        partners_g = _gather_rows(q_pts, g_index_t)  # (P, M, k, 3)
        rows_q = torch.cat(
            [q_pts[:, :, None].expand(-1, -1, k, -1), partners_q, correlation.gather(2, q_index)[..., None]], dim=3
        )
        rows_g = torch.cat(
            [partners_g, g_pts[:, :, None].expand(-1, -1, k, -1), correlation.gather(1, g_index).transpose(1, 2)[..., None]],
            dim=3,
        )
        return Correspondences(
            select=torch.cat([rows_q, rows_g], dim=1),
            valid=torch.cat([pair_valid.gather(2, q_index), pair_valid.gather(1, g_index).transpose(1, 2)], dim=1),
            row_valid=torch.cat([q_mask, g_mask], dim=1),
            correlation=correlation,
            query_index=q_index,
            gallery_index=g_index,
        )

    def forward(self, query: dict, gallery: dict) -> torch.Tensor:
        """Two-class logits (P, 2) of P (query, gallery) pairs; see the class docstring for the dicts."""
        corr = self.correspondences(query, gallery)
        select, row_valid = corr.select, corr.row_valid
        p, rows, k, _ = select.shape
        c = self.config.hidden
        padded = not bool(row_valid.all())

        # stage 1: one CLS summary per local (padded rows skipped) from its k correspondence tokens
        chosen = select[row_valid] if padded else select.reshape(p * rows, k, 7)
        tokens = self.pair_head(chosen) + sincos_2d(c, chosen[..., 3:5])
        x = torch.cat([self.cls_token_2.expand(len(chosen), -1, -1), tokens], dim=1)
        valid_1 = None
        if padded or not bool(corr.valid.all()):
            token_valid = corr.valid[row_valid] if padded else corr.valid.reshape(p * rows, k)
            valid_1 = F.pad(token_valid, (1, 0), value=True)
        for block in self.blocks_2:
            x = block(x, valid_1)
        summary = self.pair_head_2(self.decoder_norm(x)[:, 0])
        if padded:
            summary = summary.new_zeros(p, rows, c).index_put((row_valid,), summary)
        else:
            summary = summary.reshape(p, rows, c)

        # stage 2: classify the pair from every local's summary, placed at its slot-0 query position
        x = summary + sincos_2d(c, select[:, :, 0, 0:2])
        x = torch.cat([self.cls_token.expand(p, -1, -1), x], dim=1)
        valid_2 = F.pad(row_valid, (1, 0), value=True) if padded else None
        for block in self.blocks:
            x = block(x, valid_2)
        return self.decoder_pred(self.decoder_norm(x)[:, 0])


def _gather_rows(points: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """points (P, L, 3), index (P, R, k) -> points[p, index[p, r, j]] as (P, R, k, 3)."""
    p, r, k = index.shape
    flat = index.reshape(p, r * k, 1).expand(-1, -1, points.shape[2])
    return points.gather(1, flat).reshape(p, r, k, points.shape[2])


# -- checkpoints ----------------------------------------------------------------------------------

NESTED_PREFIX = "Reranker."


def read_r2former_checkpoint(checkpoint) -> Checkpoint:
    """The checkpoint with the reranker's tensors under their bare official names.

    ``checkpoint`` is a :meth:`R2FormerReranker.save_pretrained` folder, or a file holding the bare
    ``R2Former`` state dict, the same nested as ``Reranker.*`` (and/or ``module.*``, DataParallel),
    or a whole ``GeoLocalizationNetRerank`` state dict, whose non-``Reranker.`` keys (the feature
    extractor, which this adapter does not run) are left out.
    """
    read_back = read_checkpoint(checkpoint, strip_prefixes=("module.", NESTED_PREFIX))
    nested = {k[len(NESTED_PREFIX):]: v for k, v in read_back.state.items() if k.startswith(NESTED_PREFIX)}
    return dataclasses.replace(read_back, state=nested or read_back.state)


# -- the re-ranker --------------------------------------------------------------------------------

# The shared pair-wise options this method sets apart from their defaults (the official 500 locals).
RUNTIME = dict(query_length=500, gallery_length=500)
# The official re-ranking stage (train_reranking.sh: --mining global --negs_num_per_query 1
# --neg_hardness 100): one negative per query, drawn from its 100 hardest.
NEGATIVES_PER_QUERY = 1
NEGATIVE_POOL = 100


class R2FormerReranker(PairwiseReranker):
    """Scores each (query, gallery) pair with R2Former; the score is softmax[:, 1] of its two logits.

    ``pair_logits`` returns ``logit[1] - logit[0]``, whose sigmoid is softmax[:, 1]; the pair
    binary cross-entropy on it equals the official two-class cross-entropy. ``fusion="default"``
    reproduces the official ``final_score`` (``r * global + (1 - r) * softmax[:, 1]`` with the
    checkpoint's ``ratio`` clamped to [0.1, 0.9]).
    """

    columns = ("xy", "weight")
    needs_global = False
    exact_without_padding = True  # padded locals are never chosen as correspondences and are masked out
    accelerator_batch_size = 100

    def __init__(self, module: R2Former, *, fusion=None, negatives_per_query: int = NEGATIVES_PER_QUERY,
                 negative_pool: Optional[int] = NEGATIVE_POOL, xy_scale: Optional[float] = None, **kwargs):
        if fusion == "official":  # locore-plugin 0.1's name
            warnings.warn("r2former: fusion='official' is deprecated and will be removed in the next release; use "
                          "fusion='default'", LocoreDeprecationWarning, stacklevel=3)
            fusion = "default"
        if fusion == "default":
            fusion = (module.fusion_weight(), 1.0)
        elif isinstance(fusion, str):
            raise ValueError(f"fusion must be None, 'default' or (weight, temperature), got {fusion!r}")
        if negatives_per_query < 1:
            raise ValueError(f"negatives_per_query must be >= 1, got {negatives_per_query}")
        if negative_pool is not None and negative_pool < negatives_per_query:
            raise ValueError(f"negative_pool must be None or >= negatives_per_query ({negatives_per_query}), got {negative_pool}")
        if xy_scale is not None and not xy_scale > 0:
            raise ValueError(f"xy_scale must be None or > 0, got {xy_scale}")
        self.xy_scale = xy_scale
        k = module.config.num_corr
        if min(kwargs["query_length"], kwargs["gallery_length"]) < k:
            raise ValueError(f"query_length and gallery_length must be >= num_corr={k}")
        super().__init__(module, fusion=fusion, **kwargs)
        self.min_length = k  # top-k correspondences need k slots per image
        self.local_dim = module.config.local_dim
        self.negatives_per_query = int(negatives_per_query)
        self.negative_pool = None if negative_pool is None else int(negative_pool)

    def pair_logits(self, module, query, gallery):
        logits = module(self._prepare(query, "query"), self._prepare(gallery, "gallery"))
        return logits[:, 1] - logits[:, 0]

    def _prepare(self, side: dict, role: str) -> dict:
        """R2Former's local columns: xy must be normalised by max(H, W); the weight is divided by
        its per-image maximum (as the official extractor does; identity on official features)."""
        mask = side["mask"]
        xy, weight = side["xy"], side["weight"]
        if self.xy_scale is not None:  # files that hold pixel positions
            xy = xy / self.xy_scale
        worst = float(xy[mask].abs().max())
        if worst > 2:
            raise ValueError(
                f"{self.method}: {role} xy reach {worst:g}; R2Former expects patch centres divided by "
                "max(image height, width), in [0, 1] (pixel coordinates? pass xy_scale=<the longer image side>)"
            )
        peak = weight.masked_fill(~mask, float("-inf")).amax(1, keepdim=True)
        weight = torch.where(peak > 0, weight / peak, weight)
        dtype = side["local"].dtype
        return {"local": side["local"], "mask": mask, "xy": xy.to(dtype), "weight": weight.to(dtype)}

    def scores_from_logits(self, logits):
        """The official softmax[:, 1] (``pair_logits`` returns logit[1] - logit[0])."""
        return (1.0 / (1.0 + np.exp(-logits.astype(np.float64)))).astype(np.float32)

    def sample_pairs(self, labels, rng):
        """The official re-ranking triplets: per list, its best positive (the first in the global
        shortlist) against ``negatives_per_query`` negatives drawn without replacement from its
        ``negative_pool`` hardest (the first negatives), drawn again every time the list comes
        back; ``negative_pool=None`` takes the hardest ones themselves. The positive pair is repeated
        once per negative; lists without a positive or a negative are skipped."""
        lists, items, targets = [], [], []
        for i, label in enumerate(labels):
            positives, negatives = np.flatnonzero(label > 0), np.flatnonzero(label <= 0)
            if self.negative_pool is None:
                negatives = negatives[: self.negatives_per_query]
            else:
                pool = negatives[: self.negative_pool]
                negatives = np.sort(rng.choice(pool, min(self.negatives_per_query, len(pool)), replace=False))
            if len(positives) == 0 or len(negatives) == 0:
                continue
            lists.append(np.full(2 * len(negatives), i))
            items.append(np.r_[np.full(len(negatives), positives[0]), negatives])
            targets.append(np.r_[np.ones(len(negatives)), np.zeros(len(negatives))])
        if not lists:
            return np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float32)
        return np.concatenate(lists), np.concatenate(items), np.concatenate(targets).astype(np.float32)

    def architecture_config(self) -> dict:
        return self.module.config.to_dict()


# The official ``R2Former(...)`` keywords that differ from ours; ``pair_depth`` has none (the
# official pair transformer has 2 blocks) and ``local_dim`` neither (only our input check uses it).
OFFICIAL_NAMES = {
    "decoder_embed_dim": "hidden", "decoder_depth": "depth", "decoder_num_heads": "heads",
    "decoder_mlp_ratio": "mlp_ratio", "input_dim": "global_dim",
}
FIXED_OFFICIAL = {
    "num_classes": (lambda v: v == 2, "2 (the two-class head whose softmax[:, 1] is the score)"),
    "decoder_norm_layer": (is_layer_norm_eps_1e6, "LayerNorm with eps=1e-6, as GeoLocalizationNetRerank builds it"),
}
IGNORED_OFFICIAL = ("img_size", "embed_dim")  # recorded by the official module, size nothing


def sizes_from_state(state: dict) -> dict:
    """The sizes an official R2Former state dict determines (all but ``heads``, ``num_corr`` and the
    input dimensions, which no tensor shows), as far as its keys go."""
    sizes = {"depth": count_blocks(state, "blocks."), "pair_depth": count_blocks(state, "blocks_2.")}
    if "cls_token" in state:
        sizes["hidden"] = state["cls_token"].shape[-1]
        if "blocks.0.mlp.fc1.weight" in state:
            sizes["mlp_ratio"] = state["blocks.0.mlp.fc1.weight"].shape[0] / sizes["hidden"]
    if "decoder_pos_embed" in state:
        sizes["num_patches"] = state["decoder_pos_embed"].shape[1] - 1
    return sizes


def build_module(name: str, checkpoint=None, config: Optional[dict] = None, pretrained: bool = False) -> R2Former:
    """The model of a registered variant: its config, then the checkpoint's saved config or the
    sizes its tensors determine, then ``config`` overrides (ours or the official keyword names)."""
    settings, state = architecture(
        name, R2FormerConfig(**CONFIGS[name]).to_dict(), checkpoint, pretrained, config, "bytedance/R2Former",
        sizes_from_state=sizes_from_state, official_names=OFFICIAL_NAMES, fixed=FIXED_OFFICIAL,
        ignored=IGNORED_OFFICIAL, read=read_r2former_checkpoint,
    )
    return loaded(R2Former(R2FormerConfig.from_dict(settings)), state, checkpoint)


def build_r2former(name: str, checkpoint: Union[str, Path, None] = None, pretrained: bool = True,
                   config: Optional[dict] = None, attn_implementation: str = FUSED, **options) -> R2FormerReranker:
    """``checkpoint``: an official file (bare, ``Reranker.``-nested or a whole-model state dict;
    ``.pth`` or ``.safetensors``) or a ``save_pretrained`` folder; ``pretrained=False`` starts
    from the official random init. A bare file sizes the model from its tensors (width, both
    depths, MLP ratio, position table); ``heads``, ``num_corr`` and the input dimensions come
    from ``config`` or the named variant. ``config`` overrides architecture fields, under our
    names or the official ``R2Former(...)`` keywords. ``fusion``: None
    (rank by softmax[:, 1], as the official evaluation), ``"default"`` (the official
    ``final_score``) or (weight, temperature). ``top_k``: re-rank only the first k (officially 100).
    ``negatives_per_query`` / ``negative_pool``: in training, each positive is paired with that
    many negatives drawn from the list's ``negative_pool`` hardest (official 1 of 100; a pool of
    None takes the hardest themselves, always the same). ``xy_scale``
    divides the ``xy`` column first, for files that hold pixel positions (the longer image side).
    ``options`` are the shared :class:`~locore_plugin.pairwise.PairwiseReranker` options
    (``query_length``, ``gallery_length``, ``top_k``, ``device``, ``dtype``, ``batch_size``,
    ``variable_locals``, ``verbose``), with this method's defaults in ``RUNTIME``.
    ``attn_implementation``: ``"sdpa"`` (fused attention, the default) or ``"reference"`` (timm's
    explicit softmax, as the official code), for equivalence checks and ``locore-plugin bench``."""
    module = set_attention_implementation(build_module(name, checkpoint, config, pretrained), attn_implementation)
    return R2FormerReranker(module, **{**RUNTIME, **options})


DESCRIPTIONS = {
    "r2former": "R2Former (CVPR 2023) pair re-ranker: top-5 local correspondences of 128-d locals with xy and attention",
    "r2former-768": "R2Former* of the LoCoRE paper: hidden 768 on 768-d DINOv2 locals",
}


@hookimpl
def register_rerankers(register):
    for name in CONFIGS:
        register(name, functools.partial(build_r2former, name), description=DESCRIPTIONS[name], learned=True,
                 inputs="local", columns=R2FormerReranker.columns, attn_implementations=ATTENTION_IMPLEMENTATIONS)
