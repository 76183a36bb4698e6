"""ELViS (Suma et al., ICLR 2026): pair-wise similarity of local descriptors by optimal transport.

The model of the official ``elvis/models/elvis.py`` (pavelsuma/ELViS) with its state-dict key
names: locals -> Linear + LayerNorm (``remap_local``) -> L2 normalisation; a learned dust-bin
score per local (``dust_bin_mlp``) and one for the bin pair (``dust_bin``); the cosine correlation
of the two images' locals, augmented with the dust bins, goes through ``sh_iter`` Sinkhorn
iterations in log space at temperature ``1 / sh_temp``; each local keeps its best matching
probability (row maxima for the query, column maxima for the database image), the small MLP ``f``
maps each to a logit, and the score is the sum of their sigmoids over the valid locals. In
training the sum goes through the MLP ``g`` (the official training logit); evaluation ranks by
the sum itself, fused with the global similarity as AMES does. No transformer: the cost is the
correlation and the Sinkhorn iterations.

Padding is not neutral in the official code: padded locals are excluded from the correlation but
keep their share of the transport mass (the normalisation counts the padded lengths), so a padded
pair scores slightly differently from the same pair unpadded. This port reproduces both.
"""
from __future__ import annotations

import functools
import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from locore_plugin.hookspecs import hookimpl
from locore_plugin.nn import is_layer_norm_eps_1e6, xavier_init
from locore_plugin.pairwise import PairwiseReranker, architecture, loaded

# conf/model/elvis.yaml, with local_dim from the descriptor type (DINOv2 ViT-B/14: 768).
CONFIGS = {
    "elvis-dinov2": dict(local_dim=768, model_dim=128, embed_dim=16, proj_dim=64, num_classes=1, sh_iter=10, sh_temp=10.0),
}
# The shared pair-wise options this method sets apart from their defaults (conf/dataset/test_dataset.yaml:
# 600 query and 600 database locals).
RUNTIME = dict(query_length=600, gallery_length=600)
# (lambda, temperature) of the ensemble, conf/dataset/test_dataset.yaml.
FUSION = {"elvis-dinov2": (0.5, 0.5)}
DESCRIPTIONS = {"elvis-dinov2": "ELViS (ICLR 2026) optimal-transport matching of DINOv2 local descriptors"}
# Official keywords that size nothing here, or that this port supports with one value only.
IGNORED_OFFICIAL = ("desc_name", "pretrained")
FIXED_OFFICIAL = {
    "binarized": (lambda v: v is False, "False (the full-precision model; the binarised one is not ported)"),
    "norm_layer": (is_layer_norm_eps_1e6, "LayerNorm with eps=1e-6"),
}


def sizes_from_state(state: dict) -> dict:
    """The sizes an official ELViS state dict determines: all but ``sh_iter`` and ``sh_temp``."""
    sizes = {}
    if "remap_local.0.weight" in state:
        sizes["model_dim"], sizes["local_dim"] = state["remap_local.0.weight"].shape
    if "f.0.weight" in state:
        sizes["embed_dim"] = state["f.0.weight"].shape[0]
    if "g.0.weight" in state:
        sizes["proj_dim"] = state["g.0.weight"].shape[0]
    if "g.2.weight" in state:
        sizes["num_classes"] = state["g.2.weight"].shape[0]
    return sizes


def sinkhorn_log(scores: torch.Tensor, bin_score: torch.Tensor, src_bins: torch.Tensor, tgt_bins: torch.Tensor,
                 iterations: int, temperature: float) -> torch.Tensor:
    """Log transport plan (B, M, N) of the official ``get_matching_probs``: ``scores`` (B, M, N)
    augmented with a dust-bin column (``src_bins`` (B, M)), row (``tgt_bins`` (B, N)) and corner
    (``bin_score``), divided by ``temperature``, balanced by Sinkhorn iterations in log space
    towards marginals 1/(M+N) per local and N/(M+N), M/(M+N) for the bins, shifted by log(M+N)."""
    b, m, n = scores.shape
    augmented = torch.cat([
        torch.cat([scores, src_bins[:, :, None]], 2),
        torch.cat([tgt_bins, bin_score.to(scores.dtype).expand(b, 1)], 1)[:, None, :],
    ], 1) / temperature
    norm = -math.log(m + n)
    log_a = scores.new_full((b, m + 1), norm)
    log_a[:, -1] += math.log(n)
    log_b = scores.new_full((b, n + 1), norm)
    log_b[:, -1] += math.log(m)
    u, v = torch.zeros_like(log_a), torch.zeros_like(log_b)
    for _ in range(iterations):
        u = log_a - torch.logsumexp(augmented + v[:, None, :], dim=2)
        v = log_b - torch.logsumexp(augmented + u[:, :, None], dim=1)
    return (augmented + u[:, :, None] + v[:, None, :] - norm)[:, :-1, :-1]


class Elvis(nn.Module):
    """``forward(src_local, src_mask, tgt_local, tgt_mask) -> (B,)``: the evaluation score (the
    sum), or in training mode the training logit ``g(sum)``; masks True = padding (the official
    convention); src = query, tgt = database image."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        dim, embed, proj = config["model_dim"], config["embed_dim"], config["proj_dim"]
        self.remap_local = nn.Sequential(nn.Linear(config["local_dim"], dim), nn.LayerNorm(dim))
        self.f = nn.Sequential(nn.Linear(1, embed), nn.LayerNorm(embed, eps=1e-6), nn.GELU(), nn.Linear(embed, 1))
        self.g = nn.Sequential(nn.Linear(1, proj), nn.GELU(), nn.Linear(proj, config["num_classes"]))
        self.dust_bin = nn.Parameter(torch.tensor(1.0))
        # The official MLP is Linear(128, 128): the model width of every official config.
        self.dust_bin_mlp = nn.Sequential(nn.Linear(dim, dim), nn.GELU(), nn.Linear(dim, 1), nn.Tanh())
        xavier_init(self)  # the official _init_weights

    def forward(self, src_local, src_mask, tgt_local, tgt_mask):
        src = F.normalize(self.remap_local(src_local), p=2, dim=-1)
        tgt = F.normalize(self.remap_local(tgt_local), p=2, dim=-1)
        src_bins = self.dust_bin_mlp(src).squeeze(-1)
        tgt_bins = self.dust_bin_mlp(tgt).squeeze(-1)
        correlation = torch.einsum("bid,bjd->bij", src, tgt)
        both_valid = ~src_mask[:, :, None] & ~tgt_mask[:, None, :]
        correlation = correlation.masked_fill(~both_valid, float("-inf"))
        plan = sinkhorn_log(correlation, self.dust_bin, src_bins, tgt_bins, self.config["sh_iter"],
                            1.0 / self.config["sh_temp"]).exp()
        best = torch.cat([plan.amax(2), plan.amax(1)], 1)[..., None]  # (B, M + N, 1): query rows, then database columns
        valid = ~torch.cat([src_mask, tgt_mask], 1)[..., None]
        score = (torch.sigmoid(self.f(best)) * valid).sum(1)  # (B, 1)
        if self.training:
            score = self.g(score)
        return score.view(-1)


class ElvisReranker(PairwiseReranker):
    """ELViS scores each (query, shortlist item) pair from their local descriptors alone."""

    columns = ()
    needs_global = False

    def __init__(self, module: Elvis, **kwargs):
        if module.config["num_classes"] != 1:
            raise ValueError(f"ELViS re-ranks with one training logit per pair; num_classes is {module.config['num_classes']}")
        self.local_dim = module.config["local_dim"]
        super().__init__(module, **kwargs)

    def pair_logits(self, module, query, gallery):
        return module(query["local"], ~query["mask"], gallery["local"], ~gallery["mask"])


def build_elvis(name: str, checkpoint=None, pretrained: bool = True, config: Optional[dict] = None, fusion="default",
                **options) -> ElvisReranker:
    """``checkpoint``: an official ``.pt`` (``{'state': ...}``), a ``.safetensors`` file or a
    ``save_pretrained`` folder; ``pretrained=False`` starts from the official random init. A
    bare file sizes the model from its tensors; ``sh_iter`` and ``sh_temp`` come from ``config``
    (official ``Elvis(...)`` keyword names) or the named variant. ``fusion`` is (lambda,
    temperature), ``"default"`` for the official (0.5, 0.5), or None for the score alone; the
    official evaluation uses 600 query and 600 database locals.
    ``options`` are the shared :class:`~locore_plugin.pairwise.PairwiseReranker` options
    (``query_length``, ``gallery_length``, ``top_k``, ``device``, ``dtype``, ``batch_size``,
    ``variable_locals``, ``verbose``), with this method's defaults in ``RUNTIME``."""
    settings, state = architecture(name, CONFIGS[name], checkpoint, pretrained, config, "pavelsuma/ELViS",
                                   sizes_from_state=sizes_from_state, fixed=FIXED_OFFICIAL, ignored=IGNORED_OFFICIAL)
    for key in ("sh_iter", "sh_temp"):
        if not settings[key] > 0:
            raise ValueError(f"{name}: {key} must be > 0, got {settings[key]}")
    return ElvisReranker(loaded(Elvis(settings), state, checkpoint), fusion=FUSION[name] if fusion == "default" else fusion,
                         **{**RUNTIME, **options})


@hookimpl
def register_rerankers(register):
    for name in CONFIGS:
        register(name, functools.partial(build_elvis, name), description=DESCRIPTIONS[name], learned=True, inputs="local", columns=(),
                 extractor="dinov2-ames")
