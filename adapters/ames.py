"""AMES (Suma et al., ECCV 2024): asymmetric pair-wise similarity of local descriptors.

The model of the official ``src/models/matcher.py`` with its state-dict key names: L2-normalised
locals -> Linear + LayerNorm (or the ITQ binarisation layer, sign, Linear + LayerNorm) shared by
both images; tokens ``[MTC, query locals, database locals]``; each post-norm layer runs
self-attention within each image, then "cross" attention across the images (the same token set
under the complementary mask), then the FFN; Linear on the MTC token gives the logit. In
evaluation the full-precision model rounds the database tokens to float16 and back, as the
official code does (it models storing the database in half precision).
"""
from __future__ import annotations

import functools
from pathlib import Path
from typing import Optional, Union

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from locore_plugin.hookspecs import hookimpl
from locore_plugin.io.checkpoints import count_blocks
from locore_plugin.nn import (
    ATTENTION_IMPLEMENTATIONS,
    FUSED,
    LayerStack,
    SelfAttention,
    l2_normalize,
    set_attention_implementation,
)
from locore_plugin.nn import activation as activation_function
from locore_plugin.pairwise import PairwiseReranker, architecture, check_heads, loaded

# conf/model/ames.yaml, with local_dim from the descriptor type (DINOv2 ViT-B/14: 768, CVNet: 1024).
_OFFICIAL = dict(model_dim=128, nhead=2, num_encoder_layers=5, dim_feedforward=1024, activation="relu",
                 normalize_before=False)
CONFIGS = {
    "ames-dinov2": dict(local_dim=768, binarized=False, **_OFFICIAL),
    "ames-dinov2-binary": dict(local_dim=768, binarized=True, **_OFFICIAL),
    "ames-cvnet": dict(local_dim=1024, binarized=False, **_OFFICIAL),
    "ames-cvnet-binary": dict(local_dim=1024, binarized=True, **_OFFICIAL),
    # The paper's AMES*: 768 hidden on DINOv2 locals; heads and FFN width follow the BERT-base ratio.
    "ames-768": dict(local_dim=768, binarized=False, **{**_OFFICIAL, "model_dim": 768, "nhead": 12, "dim_feedforward": 3072}),
}
# (lambda, gamma) of the ensemble, official README (tuned on the GLDv2 public test split).
FUSION = {
    "ames-dinov2": (0.55, 0.30),
    "ames-dinov2-binary": (0.35, 0.10),
    "ames-cvnet": (0.85, 0.80),
    "ames-cvnet-binary": (0.65, 0.20),
    "ames-768": (0.55, 0.30),  # not tuned: the DINOv2 full-precision value
}
DESCRIPTIONS = {
    "ames-dinov2": "AMES (ECCV 2024) on DINOv2 local descriptors, full precision",
    "ames-dinov2-binary": "AMES (ECCV 2024) on DINOv2 local descriptors, ITQ-binarised",
    "ames-cvnet": "AMES (ECCV 2024) on CVNet local descriptors, full precision",
    "ames-cvnet-binary": "AMES (ECCV 2024) on CVNet local descriptors, ITQ-binarised",
    "ames-768": "AMES* (LoCoRE supplementary): AMES with 768 hidden size on DINOv2 local descriptors",
}
# The shared pair-wise options this method sets apart from their defaults: the official README
# run's 600 query and 50 database locals (truncation keeps the highest detector weights).
RUNTIME = dict(query_length=600, gallery_length=50)
# Our config keys are the official constructor's own names; ``data_root`` only locates the ITQ
# file that initialises the binarisation layer, whose trained matrix every checkpoint holds.
IGNORED_OFFICIAL = ("data_root",)
# Fitting ITQ (``itq=`` a descriptor file): locals drawn from it and iterations of the rotation
# (Gong & Lazebnik's 50, as the official ``_itq_rotation`` callers use).
ITQ_SAMPLES = 100_000
ITQ_ITERATIONS = 50
DESCRIPTOR_SUFFIXES = (".hdf5", ".h5")


def sizes_from_state(state: dict) -> dict:
    """The sizes an official AMES state dict determines (all but ``nhead`` and ``activation``), as
    far as its keys go: a file of another layout fails at the strict load, which names them."""
    sizes = {
        "num_encoder_layers": count_blocks(state, "decoder.layers."),
        "normalize_before": "decoder.norm.weight" in state,
        "binarized": "remap_local.0.W" in state,
    }
    if "mtc_token" in state:
        sizes["model_dim"] = state["mtc_token"].shape[0]
    if sizes["binarized"]:
        sizes["local_dim"] = state["remap_local.0.W"].shape[0]  # W: (local_dim, bits)
    elif "remap_local.0.weight" in state:
        sizes["local_dim"] = state["remap_local.0.weight"].shape[1]
    if "decoder.layers.0.linear1.weight" in state:
        sizes["dim_feedforward"] = state["decoder.layers.0.linear1.weight"].shape[0]
    return sizes


class BinarizationLayer(nn.Module):
    """ITQ projection ``x @ W`` then sign; training uses the smooth ``erf(x / sqrt(2 sigma))``."""

    def __init__(self, dims: int, bits: int, sigma: float = 1e-6):
        super().__init__()
        # The official layer starts from an ITQ file; a checkpoint overrides it anyway.
        self.W = nn.Parameter(torch.randn(dims, bits))
        self.sigma = sigma

    def forward(self, x):
        x = F.normalize(x.float(), p=2, dim=-1).to(x.dtype) @ self.W
        if self.training:
            return torch.erf(x / (2 * self.sigma) ** 0.5)
        return torch.sign(x)


def fit_itq(descriptors: np.ndarray, bits: int, iterations: int = ITQ_ITERATIONS, seed: int = 0) -> np.ndarray:
    """The ITQ projection (Gong & Lazebnik, CVPR 2011) of locals, as the binarisation layer uses it:
    W (D, bits) = PCA to ``bits`` dimensions, then the rotation that minimises the quantisation
    error ||sign(V R) - V R|| by alternating sign and orthogonal Procrustes steps.

    The locals are L2-normalised first, as the layer normalises its input; the PCA centres them,
    but the layer (officially) projects without subtracting the mean, so the mean is not kept.
    """
    x = np.asarray(descriptors, np.float64)
    if x.ndim != 2 or not np.isfinite(x).all():
        raise ValueError(f"fit_itq needs finite descriptors [N, D], got shape {x.shape}")
    if not 1 <= bits <= x.shape[1] or len(x) < bits:
        raise ValueError(f"fit_itq: {bits} bits need 1 <= bits <= D = {x.shape[1]} and at least {bits} descriptors, got {len(x)}")
    x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
    x = x - x.mean(0)
    eigenvalues, eigenvectors = np.linalg.eigh(x.T @ x)
    pca = eigenvectors[:, np.argsort(eigenvalues)[::-1][:bits]]
    v = x @ pca
    rotation = np.linalg.qr(np.random.default_rng(seed).normal(size=(bits, bits)))[0]
    for _ in range(iterations):
        codes = np.where(v @ rotation >= 0, 1.0, -1.0)
        u, _, wt = np.linalg.svd(v.T @ codes)
        rotation = u @ wt
    return (pca @ rotation).astype(np.float32)


def read_itq(source: Union[str, Path], local_dim: int, bits: int) -> torch.Tensor:
    """The binarisation layer's initial W (local_dim, bits) from ``source``: an official ITQ file
    (AMES ``itq_<desc>_D<bits>.npz`` with ``proj``; ELViS ``.pt`` with ``W``) or a local-descriptor
    HDF5 file in the official layout, on whose valid locals ITQ is fitted (``ITQ_SAMPLES`` of them)."""
    path = Path(source)
    if not path.is_file():
        raise FileNotFoundError(f"ITQ source {path} does not exist (an official itq_*.npz / .pt file or a local-descriptor .hdf5)")
    if path.suffix in DESCRIPTOR_SUFFIXES:
        from locore_plugin.io.descriptors import LocalReader

        reader = LocalReader(path)
        try:
            rng = np.random.default_rng(0)
            # enough images for ITQ_SAMPLES locals, not ITQ_SAMPLES images (GLDv2: 700 x 768 floats each)
            images = min(len(reader), -(-ITQ_SAMPLES // max(reader.topk, 1)))
            rows = np.sort(rng.choice(len(reader), images, replace=False))
            block = reader.read(rows)
        finally:
            reader.close()
        valid = block["local"][block["mask"]]
        valid = valid[rng.permutation(len(valid))[:ITQ_SAMPLES]]
        projection = torch.from_numpy(fit_itq(valid, bits))
    elif path.suffix == ".npz":
        with np.load(path) as data:
            if "proj" not in data:
                raise KeyError(f"{path}: an official ITQ .npz holds 'proj', found {sorted(data.files)}")
            projection = torch.from_numpy(np.asarray(data["proj"], np.float32))
    else:
        data = torch.load(path, map_location="cpu", weights_only=True)
        data = data.get("state", data) if isinstance(data, dict) else data
        if not isinstance(data, dict) or "W" not in data:
            keys = sorted(data) if isinstance(data, dict) else type(data).__name__
            raise KeyError(f"{path}: an official ITQ .pt holds 'W', found {keys}")
        projection = data["W"].float()
    if tuple(projection.shape) != (local_dim, bits):
        raise ValueError(f"{path}: the ITQ projection is {tuple(projection.shape)}, the model needs ({local_dim}, {bits})")
    return projection


class DecoderLayer(nn.Module):
    def __init__(self, d_model, nhead, dim_feedforward, activation, normalize_before):
        super().__init__()
        self.self_attn = SelfAttention(d_model, nhead)
        self.cross_attn = SelfAttention(d_model, nhead)
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm1 = nn.LayerNorm(d_model)
        self.norm2 = nn.LayerNorm(d_model)
        self.norm3 = nn.LayerNorm(d_model)
        self.activation = activation_function(activation)
        self.normalize_before = normalize_before

    def forward(self, x, padding, within, across):
        def sa(y):
            return self.self_attn(y, padding=padding, blocks=within)

        def ca(y):
            return self.cross_attn(y, padding=padding, blocks=across)

        def ff(y):
            return self.linear2(self.activation(self.linear1(y)))

        if self.normalize_before:
            x = x + sa(self.norm1(x))
            x = x + ca(self.norm2(x))
            return x + ff(self.norm3(x))
        x = self.norm1(x + sa(x))
        x = self.norm2(x + ca(x))
        return self.norm3(x + ff(x))


class AMES(nn.Module):
    """``forward(src_local, src_mask, tgt_local, tgt_mask) -> (B,)`` logits; masks True = padding
    (the official convention); src = query, tgt = database image."""

    def __init__(self, config: dict):
        super().__init__()
        self.config = dict(config)
        dim = config["model_dim"]
        self.binarized = config["binarized"]
        self.mtc_token = nn.Parameter(torch.empty(dim))
        if self.binarized:
            self.remap_local = nn.Sequential(BinarizationLayer(config["local_dim"], dim), nn.Linear(dim, dim), nn.LayerNorm(dim))
        else:
            self.remap_local = nn.Sequential(nn.Linear(config["local_dim"], dim), nn.LayerNorm(dim))
        self.decoder = LayerStack(
            (DecoderLayer(dim, config["nhead"], config["dim_feedforward"], config["activation"], config["normalize_before"])
             for _ in range(config["num_encoder_layers"])),
            nn.LayerNorm(dim) if config["normalize_before"] else None,
        )
        self.classifier = nn.Linear(dim, 1)
        self.apply(_official_init)
        nn.init.trunc_normal_(self.mtc_token, std=0.02)

    def forward(self, src_local, src_mask, tgt_local, tgt_mask, return_tokens: bool = False):
        src = self.remap_local(l2_normalize(src_local))
        tgt = self.remap_local(l2_normalize(tgt_local))
        if not self.training and not self.binarized:
            tgt = tgt.half().to(src.dtype)  # the official evaluation's half-precision database
        batch, q, t = src.shape[0], src.shape[1], tgt.shape[1]
        tokens = torch.cat([self.mtc_token.expand(batch, 1, -1), src, tgt], 1)
        padding = torch.cat([src_mask.new_zeros(batch, 1), src_mask, tgt_mask], 1)
        x = self.decoder(tokens, padding, *attention_blocks(q, t, tokens.device))
        logits = self.classifier(x[:, 0]).view(-1)
        return (logits, x) if return_tokens else logits  # the official ``return_logits``: the final states


def attention_blocks(q: int, t: int, device) -> tuple[list, list]:
    """The official masks of ``[MTC, q query tokens, t database tokens]`` as blocks of
    (query rows, allowed keys): the MTC token sees everything in both attentions; "self" attention
    keeps each image's tokens to their own image (and the MTC), "cross" attention to the other's."""
    every, mtc_and_query = slice(0, 1 + q + t), slice(0, 1 + q)  # contiguous: no copy of the keys
    mtc_and_database = torch.cat([torch.zeros(1, dtype=torch.long), torch.arange(1 + q, 1 + q + t)]).to(device)
    rows = (slice(0, 1), slice(1, 1 + q), slice(1 + q, 1 + q + t))
    within = [(rows[0], every), (rows[1], mtc_and_query), (rows[2], mtc_and_database)]
    across = [(rows[0], every), (rows[1], mtc_and_database), (rows[2], mtc_and_query)]
    return within, across


def _official_init(m):
    """The official ``_init_weights``: truncated normal Linear weights, unit LayerNorm, zero biases."""
    if isinstance(m, nn.Linear):
        nn.init.trunc_normal_(m.weight, std=0.02)
    elif isinstance(m, nn.LayerNorm):
        nn.init.ones_(m.weight)
    if isinstance(m, (nn.Linear, nn.LayerNorm)) and m.bias is not None:
        nn.init.zeros_(m.bias)


class AMESReranker(PairwiseReranker):
    """AMES scores each (query, shortlist item) pair from their local descriptors alone."""

    columns = ()
    exact_without_padding = True  # no positions; padded tokens are masked keys
    needs_global = False

    def __init__(self, module: AMES, **kwargs):
        self.local_dim = module.config["local_dim"]
        super().__init__(module, **kwargs)

    supports_distillation = True  # the official binary AMES is distilled from the full-precision one

    def pair_logits(self, module, query, gallery):
        return module(query["local"], ~query["mask"], gallery["local"], ~gallery["mask"])

    def pair_tokens(self, module, query, gallery):
        return module(query["local"], ~query["mask"], gallery["local"], ~gallery["mask"], return_tokens=True)


def build_ames(name: str, checkpoint=None, pretrained: bool = True, config: Optional[dict] = None, fusion="default",
               attn_implementation: str = FUSED, itq=None, **options) -> AMESReranker:
    """``checkpoint``: an official ``.pt`` (``{'state': ...}``), a ``.safetensors`` file or a
    ``save_pretrained`` folder; ``pretrained=False`` starts from the official random init.
    A bare official file sizes the model from its tensors (depth, widths, local dimension,
    pre-norm, binarisation); ``nhead`` and ``activation``, which no tensor shows, come from
    ``config`` or the named variant. ``config`` overrides architecture keys under the official
    ``AMES(...)`` keyword names; ``fusion`` is (lambda, gamma), ``"default"`` for the official
    value of this descriptor type, or None for the logit alone.
    ``options`` are the shared :class:`~locore_plugin.pairwise.PairwiseReranker` options
    (``query_length``, ``gallery_length``, ``top_k``, ``device``, ``dtype``, ``batch_size``,
    ``variable_locals``, ``verbose``), with this method's defaults in ``RUNTIME``.
    ``attn_implementation``: ``"sdpa"`` (fused attention, the default) or ``"reference"``
    (``nn.MultiheadAttention``'s own forward, for equivalence checks and ``locore-plugin bench``).
    ``itq``: where a binarised model to be trained starts its projection W, as the official
    training does (:func:`read_itq`: an official ITQ file, or a descriptor file to fit ITQ on);
    a checkpoint holds its own trained W, so the two do not go together."""
    if itq is not None and not CONFIGS[name]["binarized"]:
        raise ValueError(f"{name}: itq initialises the binarisation layer, which only the -binary variants have")
    if itq is not None and checkpoint is not None:
        raise ValueError(f"{name}: itq initialises a model trained from scratch (pretrained=False, no checkpoint); "
                         "a checkpoint holds its own trained projection")
    settings, state = architecture(name, CONFIGS[name], checkpoint, pretrained, config, "pavelsuma/ames",
                                   sizes_from_state=sizes_from_state, ignored=IGNORED_OFFICIAL)
    activation_function(settings["activation"])  # an unknown one fails here, before any weights are built
    if settings["binarized"] != CONFIGS[name]["binarized"]:
        kind = "an ITQ-binarised" if settings["binarized"] else "a full-precision"
        raise ValueError(
            f"{name}: the checkpoint or config is {kind} AMES, but {name} is the "
            f"{'binarised' if CONFIGS[name]['binarized'] else 'full-precision'} variant (its fusion constants "
            f"differ); use {'/'.join(n for n, c in CONFIGS.items() if c['binarized'] == settings['binarized'])}"
        )
    check_heads(name, settings["model_dim"], settings["nhead"], "model_dim", "nhead")
    module = set_attention_implementation(loaded(AMES(settings), state, checkpoint), attn_implementation)
    if itq is not None:
        with torch.no_grad():
            module.remap_local[0].W.copy_(read_itq(itq, settings["local_dim"], settings["model_dim"]))
    return AMESReranker(module, fusion=FUSION[name] if fusion == "default" else fusion, **{**RUNTIME, **options})


@hookimpl
def register_rerankers(register):
    for name in CONFIGS:
        extractor = "dinov2-ames" if "cvnet" not in name else None  # no CVNet extractor is registered
        register(name, functools.partial(build_ames, name), description=DESCRIPTIONS[name], learned=True, inputs="local",
                 columns=(), extractor=extractor, attn_implementations=ATTENTION_IMPLEMENTATIONS)
