"""CVNet Reranker (Lee et al., CVPR 2022, "Correlation Verification for Image Retrieval").

A pair-wise re-ranker on dense CNN feature maps rather than detector locals. For a query and a
gallery image, the layer-3 maps of a ResNet (the output of the last block of stage 3, before
its ReLU: block 13 of ResNet-50, block 30 of ResNet-101) are projected to 256 channels at three
scales (0.25, 0.5, 1.0 of the map area: sides times sqrt(scale), bilinear, align_corners), one
3x3 convolution per scale (``conv2ds``); the 3 x 3 cross-scale cosine correlations, each
resized to the scale-1 sizes and clamped at 0, form a 9-channel 4D tensor (query rows, query
columns, gallery rows, gallery columns). ``CVLearner`` squeezes it with center-pivot 4D
convolutions (a 2D convolution over the query dimensions plus one over the gallery dimensions,
as in HSNet), GroupNorm and ReLU, averages it, and an MLP gives two logits; the score is their
softmax's second entry. The official evaluation ranks the first ``top_k`` (100) images by
``global + mix_ratio * score`` (``mix_ratio`` 0.5); the rest keep their order.

The same checkpoint holds the backbone (``encoder_q``, a pycls ResNet with a GeM head and a
2048 -> 2048 ``fc``): the ``cvnet-r50`` / ``cvnet-r101`` extractors give from raw images the
CVNet-Global descriptor (multi-scale) and the dense map the re-ranker reads
(``ImageFeatures.dense``). Key names are the official ones (``encoder_q.*``, ``conv2ds.*``,
``cv_learner.*``), so ``CVPR2022_CVNet_R50.pyth`` (``{'model_state': ...}``) loads strictly.

Beyond the official code, which scores one pair at a time: the gallery maps of a shortlist that
have the same size are scored in one batched forward with the query's projections computed once
(no resizing: only exact-size groups), which equals the one-pair computation.
"""
from __future__ import annotations

import hashlib
import math
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from locore_plugin.extractors import Crop, ImageExtractor
from locore_plugin.features import ImageFeatures
from locore_plugin.fusion import fuse_scores
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import ImageReranker, ranked, with_tail
from locore_plugin.io.checkpoints import StateDictMismatchError, load_strict, read_checkpoint
from locore_plugin.progress import progress
from locore_plugin.runtime import resolve_device, resolve_dtype

PUBLISHED_BY = "sungonce/CVNet (CVPR2022_CVNet_R50.pyth / CVPR2022_CVNet_R101.pyth)"
# Blocks per stage of the pycls ResNets; the depth is read back from the stage-3 count.
STAGE_DEPTHS = {50: (3, 4, 6, 3), 101: (3, 4, 23, 3)}
CONFIGS = {"cvnet-r50": {"depth": 50, "reduction_dim": 2048}, "cvnet-r101": {"depth": 101, "reduction_dim": 2048}}
OFFICIAL_NAMES = {"RESNET_DEPTH": "depth", "REDUCTION_DIM": "reduction_dim"}  # CVNet_Rerank(RESNET_DEPTH, REDUCTION_DIM)
MAP_CHANNELS = 1024  # layer-3 width of every ResNet of the paper
PROJECTED_CHANNELS = 256
CORRELATION_SCALES = (0.25, 0.5, 1.0)
GLOBAL_SCALES = (0.7071, 1.0, 1.4142)  # the CVNet-Global multi-scale descriptor of the official test
# Gallery maps per forward when batch_size is not given. Measured on a 2-core Zen 4 with 32 x 32
# maps (512 x 512 images): 124 ms a pair at 4, 129 at 2, 180 at 1, 189 at 8, 247 at 16 (memory-bound).
CPU_BATCH_SIZE, ACCELERATOR_BATCH_SIZE = 4, 16
IMPLEMENTATIONS = ("fast", "official")  # how the correlation is built (CVNetRerank.correlation / official_correlation)
MIX_RATIO = 0.5  # the official ranking: global + mix_ratio * score
TOP_K = 100  # the official default of re-ranked images (SuperGlobal's config uses 400)
MEAN_BGR = (0.406, 0.456, 0.485)  # test/dataset.py: per-channel mean and std in BGR order
STD_BGR = (0.225, 0.224, 0.229)
# The smallest map side that every correlation scale keeps non-empty: round(side * sqrt(0.25)) >= 1.
MIN_MAP_SIDE = 2
MIN_IMAGE_SIDE = 17  # a 17-pixel side gives a layer-3 side of 2 (four stride-2 stages, ceil)
BENCHMARK_MAP = (MAP_CHANNELS, 32, 32)  # the layer-3 map of a 512 x 512 image: the supplementary's setting


# -- the backbone (pycls ResNet, official names) -------------------------------------------------


class BottleneckTransform(nn.Module):
    """1x1, BN, ReLU, 3x3 (stride here), BN, ReLU, 1x1, BN."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
        super().__init__()
        self.a = nn.Conv2d(w_in, w_b, 1, bias=False)
        self.a_bn = nn.BatchNorm2d(w_b, eps=1e-5, momentum=0.1)
        self.a_relu = nn.ReLU(inplace=True)
        self.b = nn.Conv2d(w_b, w_b, 3, stride=stride, padding=1, bias=False)
        self.b_bn = nn.BatchNorm2d(w_b, eps=1e-5, momentum=0.1)
        self.b_relu = nn.ReLU(inplace=True)
        self.c = nn.Conv2d(w_b, w_out, 1, bias=False)
        self.c_bn = nn.BatchNorm2d(w_out, eps=1e-5, momentum=0.1)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


class ResBlock(nn.Module):
    """x + f(x) (a projected skip where the shape changes); ``pre_activation`` is the sum before
    the ReLU, which is where CVNet reads its feature map."""

    def __init__(self, w_in: int, w_out: int, stride: int, w_b: int):
        super().__init__()
        self.has_projection = w_in != w_out or stride != 1
        if self.has_projection:
            self.proj = nn.Conv2d(w_in, w_out, 1, stride=stride, bias=False)
            self.bn = nn.BatchNorm2d(w_out, eps=1e-5, momentum=0.1)
        self.f = BottleneckTransform(w_in, w_out, stride, w_b)
        self.relu = nn.ReLU(inplace=True)

    def pre_activation(self, x):
        skip = self.bn(self.proj(x)) if self.has_projection else x
        return skip + self.f(x)

    def forward(self, x):
        return self.relu(self.pre_activation(x))


class ResStage(nn.Module):
    def __init__(self, w_in: int, w_out: int, stride: int, depth: int, w_b: int):
        super().__init__()
        for i in range(depth):
            self.add_module(f"b{i + 1}", ResBlock(w_in if i == 0 else w_out, w_out, stride if i == 0 else 1, w_b))

    def forward(self, x):
        for block in self.children():
            x = block(x)
        return x


class ResStem(nn.Module):
    """7x7/2 convolution, BN, ReLU, 3x3/2 max pool."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 64, 7, stride=2, padding=3, bias=False)
        self.bn = nn.BatchNorm2d(64, eps=1e-5, momentum=0.1)
        self.relu = nn.ReLU(inplace=True)
        self.pool = nn.MaxPool2d(3, stride=2, padding=1)

    def forward(self, x):
        for layer in self.children():
            x = layer(x)
        return x


class GeneralizedMeanPooling(nn.Module):
    """GeM with a learnable exponent ``p`` (official init 3)."""

    def __init__(self, p: float = 3.0, eps: float = 1e-6):
        super().__init__()
        self.p = nn.Parameter(torch.ones(1) * p)
        self.eps = eps

    def forward(self, x):
        return F.adaptive_avg_pool2d(x.clamp(min=self.eps).pow(self.p), 1).pow(1.0 / self.p)


class GlobalHead(nn.Module):
    def __init__(self, width: int, reduction_dim: int):
        super().__init__()
        self.pool = GeneralizedMeanPooling()
        self.fc = nn.Linear(width, reduction_dim, bias=True)

    def forward(self, x):
        return self.fc(self.pool(x).flatten(1))


class ResNet(nn.Module):
    """The official ``encoder_q``."""

    def __init__(self, depth: int, reduction_dim: int):
        super().__init__()
        d1, d2, d3, d4 = STAGE_DEPTHS[depth]
        self.stem = ResStem()
        self.s1 = ResStage(64, 256, 1, d1, 64)
        self.s2 = ResStage(256, 512, 2, d2, 128)
        self.s3 = ResStage(512, 1024, 2, d3, 256)
        self.s4 = ResStage(1024, 2048, 2, d4, 512)
        self.head = GlobalHead(2048, reduction_dim)

    def feature_map(self, images: torch.Tensor) -> torch.Tensor:
        """The layer-3 map (B, 1024, h, w): the last stage-3 block's output before its ReLU."""
        x = self.s2(self.s1(self.stem(images)))
        blocks = list(self.s3.children())
        for block in blocks[:-1]:
            x = block(x)
        return blocks[-1].pre_activation(x)

    def global_descriptor(self, images: torch.Tensor) -> torch.Tensor:
        """The L2-normalised head output (B, reduction_dim) of ``model.extract_global_descriptor``."""
        x = self.s4(self.s3(self.s2(self.s1(self.stem(images)))))
        return F.normalize(self.head(x), dim=1)


# -- correlation verification ---------------------------------------------------------------------


class CenterPivotConv4d(nn.Module):
    """A 4D convolution as the sum of a 2D convolution over the query dimensions (``conv1``, at
    every gallery position kept by the gallery stride) and one over the gallery dimensions
    (``conv2``, at every query position kept by the query stride): HSNet's center-pivot form."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int, query_stride: int, key_stride: int):
        super().__init__()
        padding = kernel_size // 2
        self.conv1 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=query_stride, padding=padding)
        self.conv2 = nn.Conv2d(in_channels, out_channels, kernel_size, stride=key_stride, padding=padding)
        self.query_stride, self.key_stride = query_stride, key_stride

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, _, ha, wa, hb, wb = x.shape
        pruned = x[..., :: self.key_stride, :: self.key_stride]
        kb, kw = pruned.shape[-2:]
        over_query = self.conv1(pruned.permute(0, 4, 5, 1, 2, 3).reshape(batch * kb * kw, -1, ha, wa))
        over_query = over_query.view(batch, kb, kw, *over_query.shape[1:]).permute(0, 3, 4, 5, 1, 2)
        pruned = x[:, :, :: self.query_stride, :: self.query_stride]
        qa, qw = pruned.shape[2:4]
        over_key = self.conv2(pruned.permute(0, 2, 3, 1, 4, 5).reshape(batch * qa * qw, -1, hb, wb))
        over_key = over_key.view(batch, qa, qw, *over_key.shape[1:]).permute(0, 3, 1, 2, 4, 5)
        return over_query + over_key


def _squeezing_block(in_channels: int, widths: Sequence[int], kernels: Sequence[int], strides: Sequence[int]) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (width, kernel, stride) in enumerate(zip(widths, kernels, strides)):
        layers += [CenterPivotConv4d(in_channels if i == 0 else widths[i - 1], width, kernel, stride, stride),
                   nn.GroupNorm(4, width), nn.ReLU(inplace=True)]
    return nn.Sequential(*layers)


class CVLearner(nn.Module):
    """Four squeezing blocks of center-pivot 4D convolutions, a mean over the 4D positions and an
    MLP to two logits (not same / same instance)."""

    def __init__(self, in_channels: int = len(CORRELATION_SCALES) ** 2):
        super().__init__()
        self.block1 = _squeezing_block(in_channels, [16], [5], [2])
        self.block2 = _squeezing_block(16, [16, 32], [3, 3], [1, 2])
        self.block3 = _squeezing_block(32, [32, 32, 64], [3, 3, 3], [1, 1, 2])
        self.block4 = _squeezing_block(64, [64, 64, 128], [3, 3, 3], [1, 1, 1])
        self.mlp = nn.Sequential(nn.Linear(128, 128), nn.ReLU(), nn.Linear(128, 2))

    def forward(self, correlation: torch.Tensor) -> torch.Tensor:
        x = self.block4(self.block3(self.block2(self.block1(correlation))))
        return self.mlp(x.flatten(2).mean(-1))


def _resized(maps: torch.Tensor, scale: float) -> torch.Tensor:
    height, width = maps.shape[-2:]
    size = (round(height * math.sqrt(scale)), round(width * math.sqrt(scale)))  # Python's round, as the official code
    if size == (height, width):  # align_corners to the same size samples every pixel exactly: the identity
        return maps
    return F.interpolate(maps, size, mode="bilinear", align_corners=True)


def _resize_4d(correlation: torch.Tensor, size: tuple[int, int, int, int]) -> torch.Tensor:
    """Bilinear (align_corners) resize of (B, h1, w1, h2, w2) to ``size``: the query dimensions, then the gallery ones."""
    batch, h1, w1, h2, w2 = correlation.shape
    ha, wa, hb, wb = size
    x = F.interpolate(correlation.reshape(batch, h1, w1, h2 * w2).permute(0, 3, 1, 2), (ha, wa), mode="bilinear", align_corners=True)
    x = F.interpolate(x.reshape(batch, h2, w2, ha * wa).permute(0, 3, 1, 2), (hb, wb), mode="bilinear", align_corners=True)
    return x.reshape(batch, ha, wa, hb, wb)


class CVNetRerank(nn.Module):
    """The official ``CVNet_Rerank`` module tree: ``encoder_q``, ``conv2ds``, ``cv_learner``."""

    def __init__(self, depth: int = 50, reduction_dim: int = 2048):
        super().__init__()
        if depth not in STAGE_DEPTHS:
            raise ValueError(f"CVNet has ResNet depth {sorted(STAGE_DEPTHS)}, got {depth}")
        self.config = {"depth": int(depth), "reduction_dim": int(reduction_dim)}
        self.encoder_q = ResNet(depth, reduction_dim)
        self.conv2ds = nn.ModuleList(
            nn.Conv2d(MAP_CHANNELS, PROJECTED_CHANNELS, 3, padding=1, bias=False) for _ in CORRELATION_SCALES
        )
        self.cv_learner = CVLearner(len(CORRELATION_SCALES) ** 2)

    def project(self, maps: torch.Tensor) -> list[torch.Tensor]:
        """The 256-channel projection of (B, 1024, h, w) maps at each correlation scale."""
        return [conv(_resized(maps, scale)) for scale, conv in zip(CORRELATION_SCALES, self.conv2ds)]

    @staticmethod
    def official_correlation(query: list[torch.Tensor], key: list[torch.Tensor], size: tuple[int, int, int, int]) -> torch.Tensor:
        """The (B, 9, hq, wq, hk, wk) cross-scale cosine correlation of projected maps (query scale
        major), as the official ``build_crossscale_correlation``: each plane computed at its
        scales' sizes, resized in 4D to ``size`` (the scale-1 sizes), clamped at 0."""
        planes = []
        for q in query:
            batch, channels, qh, qw = q.shape
            rows = q.reshape(batch, channels, -1).transpose(1, 2)
            row_norms = rows.norm(p=2, dim=2, keepdim=True)
            for k in key:
                kh, kw = k.shape[-2:]
                columns = k.reshape(batch, channels, -1)
                cosine = torch.bmm(rows, columns) / (torch.bmm(row_norms, columns.norm(p=2, dim=1, keepdim=True)) + 1e-8)
                planes.append(_resize_4d(cosine.view(batch, qh, qw, kh, kw), size))
        return torch.stack(planes, 1).clamp(min=0)

    @staticmethod
    def correlation(query: list[torch.Tensor], key: list[torch.Tensor], size: tuple[int, int, int, int]) -> torch.Tensor:
        """:meth:`official_correlation` computed another way: bilinear resizing is linear, so
        resizing a cosine correlation over the query (gallery) dimensions equals correlating the
        unit-normalised maps resized to the scale-1 sizes. All nine planes are then one matrix
        product (a query of batch 1 is shared by every gallery map), and nothing 4D is resized.
        Equal up to float rounding and to where the official ``+ 1e-8`` meets the norms'
        product (a 1e-8 relative difference for unit-scale features)."""
        hq, wq, hk, wk = size

        def unit_maps(maps: list[torch.Tensor], height: int, width: int) -> torch.Tensor:
            out = []
            for m in maps:
                m = m / m.norm(p=2, dim=1, keepdim=True).clamp_min(1e-8)
                if m.shape[-2:] != (height, width):
                    m = F.interpolate(m, (height, width), mode="bilinear", align_corners=True)
                out.append(m.flatten(2))
            return torch.stack(out, 1)  # (B, scales, C, positions)

        q, k = unit_maps(query, hq, wq), unit_maps(key, hk, wk)
        # (Bq, Sq, 1, Pq, C) @ (B, 1, Sk, C, Pk) -> (B, Sq, Sk, Pq, Pk): written in the layout the
        # 4D convolutions read, a query of batch 1 broadcast to every gallery map
        cosine = q.transpose(2, 3)[:, :, None] @ k[:, None]
        return cosine.clamp_(min=0).view(len(cosine), -1, hq, wq, hk, wk)

    def pair_logits(self, query_map: torch.Tensor, key_maps: torch.Tensor, official: bool = False) -> torch.Tensor:
        """Logits (B, 2) of one query map (1, 1024, hq, wq) against gallery maps (B, 1024, hk, wk)
        of one size; ``official`` builds the correlation as the official code does."""
        size = (*query_map.shape[-2:], *key_maps.shape[-2:])
        query = self.project(query_map)
        if official:
            correlation = self.official_correlation([q.expand(len(key_maps), -1, -1, -1) for q in query], self.project(key_maps), size)
        else:
            correlation = self.correlation(query, self.project(key_maps), size)
        return self.cv_learner(correlation)

    def forward(self, query_images: torch.Tensor, key_images: torch.Tensor) -> torch.Tensor:
        """The official ``forward``: the score (softmax's second entry) of image pairs."""
        query, key = self.encoder_q.feature_map(query_images), self.encoder_q.feature_map(key_images)
        size = (*query.shape[-2:], *key.shape[-2:])
        return self.cv_learner(self.official_correlation(self.project(query), self.project(key), size)).softmax(1)[:, 1]


# -- loading ----------------------------------------------------------------------------------------


def sizes_from_state(state: dict, known: Sequence[str] = ()) -> dict:
    """depth (from the stage-3 block count) and reduction_dim (from ``head.fc``) of official
    tensors, except the ``known`` ones (given by the user: a mismatch then fails at the strict
    load, which names the keys)."""
    sizes = {}
    if "depth" not in known:
        blocks = {int(k.split(".")[2][1:]) for k in state if k.startswith("encoder_q.s3.b")}
        by_stage3 = {d[2]: depth for depth, d in STAGE_DEPTHS.items()}
        if len(blocks) not in by_stage3:
            raise StateDictMismatchError(
                f"the checkpoint's stage 3 has {len(blocks)} blocks (encoder_q.s3.b*); CVNet has "
                + ", ".join(f"{n} (ResNet-{d})" for n, d in sorted(by_stage3.items()))
            )
        sizes["depth"] = by_stage3[len(blocks)]
    if "reduction_dim" not in known:
        if "encoder_q.head.fc.weight" not in state:
            raise StateDictMismatchError(f"the checkpoint has no encoder_q.head.fc.weight; its keys start {sorted(state)[:5]}")
        sizes["reduction_dim"] = int(state["encoder_q.head.fc.weight"].shape[0])
    return sizes


def build_module(name: str, checkpoint=None, pretrained: bool = True, config: Optional[dict] = None) -> CVNetRerank:
    """The CVNet module of a registered variant: the variant's defaults, then the checkpoint's
    architecture (a ``.pyth`` / ``.pth`` / ``.safetensors`` file or a folder), then ``config``
    (our or the official constructor's keyword names); weights loaded strictly."""
    if checkpoint is None and pretrained:
        raise ValueError(f"{name} needs checkpoint= (the official weights are published by {PUBLISHED_BY}); "
                         "pass pretrained=False for a randomly initialised model")
    settings = dict(CONFIGS[name])
    given = {}
    for key, value in (config or {}).items():
        ours = OFFICIAL_NAMES.get(key, key)
        if ours not in settings:
            raise ValueError(f"unknown {name} config key {key!r}; accepted: {sorted(set(settings) | set(OFFICIAL_NAMES))}")
        given[ours] = value
    state = None
    if checkpoint is not None:
        read_back = read_checkpoint(checkpoint)
        read_back.check_name(name)
        state = read_back.state
        settings.update(read_back.config if read_back.config is not None else sizes_from_state(state, list(given)))
    module = CVNetRerank(**{**settings, **given})
    if state is not None:
        load_strict(module, state, source=str(checkpoint))
    return module.eval()


def _checked_map(features: ImageFeatures, role: str, index: int) -> np.ndarray:
    if features.dense is None:
        raise ValueError(f"cvnet: {role} {index} has no dense feature map (ImageFeatures.dense); extract it with "
                         "the cvnet-r50 / cvnet-r101 extractor")
    channels, height, width = features.dense.shape
    if channels != MAP_CHANNELS:
        raise ValueError(f"cvnet: {role} {index} has a {channels}-channel map; CVNet reads the {MAP_CHANNELS}-channel "
                         "layer-3 map of its ResNet")
    if min(height, width) < MIN_MAP_SIDE:
        raise ValueError(f"cvnet: {role} {index} has a {height} x {width} map; the 4D convolutions need at least "
                         f"{MIN_MAP_SIDE} x {MIN_MAP_SIDE} (images of at least {MIN_IMAGE_SIDE} pixels per side)")
    return features.dense


# -- the re-ranker -----------------------------------------------------------------------------------


class CVNetReranker(ImageReranker):
    """Re-ranks the first ``top_k`` (100) images of a shortlist by the official
    ``global + mix_ratio * score``, written in the shared vocabulary as ``fusion = (1 / (1 +
    mix_ratio), 1)`` on the logit difference (the same order: the fused score is the official one
    divided by 1 + mix_ratio, and softmax's second entry is the sigmoid of that difference).
    ``mix_ratio=`` takes the official parameter; ``fusion=None`` ranks by the score alone.

    Every query and gallery image needs its dense map (``ImageFeatures.dense``, 1024 x h x w);
    gallery maps of equal size are scored ``batch_size`` at a time in one forward.
    ``implementation="official"`` builds the correlation as the official code (see
    :meth:`CVNetRerank.correlation` for the fast default and why it is equal). ``dense_shape``
    (shared vocabulary, read by the benchmark) is the map of a 512 x 512 image, the supplementary's
    timing setting."""

    dense_shape = BENCHMARK_MAP

    def __init__(self, name: str = "cvnet-r50", checkpoint=None, pretrained: bool = True, config: Optional[dict] = None,
                 top_k: Optional[int] = TOP_K, fusion="default", mix_ratio: Optional[float] = None,
                 implementation: str = "fast", device=None, dtype="float32", batch_size: Optional[int] = None,
                 verbose: int = 0):
        if mix_ratio is not None:
            if fusion != "default":
                raise TypeError("give cvnet either mix_ratio (the official name) or fusion, not both")
            if mix_ratio < 0:
                raise ValueError(f"mix_ratio must be >= 0, got {mix_ratio}")
            fusion = (1.0 / (1.0 + mix_ratio), 1.0)
        elif isinstance(fusion, str) and fusion == "default":
            fusion = (1.0 / (1.0 + MIX_RATIO), 1.0)
        if fusion is not None:
            if len(fusion) != 2:
                raise ValueError(f"fusion must be None, 'default' or (weight, temperature), got {fusion!r}")
            fusion = (float(fusion[0]), float(fusion[1]))
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(f"implementation must be one of {IMPLEMENTATIONS}, got {implementation!r}")
        self.implementation = implementation
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.module = build_module(name, checkpoint, pretrained, config).to(self.device, self.dtype)
        self.checkpoint, self.config = checkpoint, config
        self.top_k = None if top_k is None else int(top_k)
        self.fusion = fusion
        if batch_size is None:
            batch_size = CPU_BATCH_SIZE if self.device.type == "cpu" else ACCELERATOR_BATCH_SIZE
        self.batch_size = int(batch_size)
        self.verbose = verbose

    def extractor_options(self) -> dict:
        """The extractor reads the same checkpoint: the maps and the global descriptor come from its backbone."""
        if self.checkpoint is None:
            return {"pretrained": False}
        return {"checkpoint": self.checkpoint, "config": self.config, "device": self.device, "dtype": self.dtype}

    def _rerank_many(self, queries, shortlists, global_scores):
        if self.fusion is not None and any(g is None for g in global_scores):
            raise ValueError("cvnet: fusion with the global similarity needs global scores or global descriptors")
        results = []
        for shortlist, incoming, logit in zip(shortlists, global_scores, self.head_logits(queries, shortlists)):
            if self.fusion is None:
                head = ranked(1.0 / (1.0 + np.exp(-logit.astype(np.float64))))
            else:
                head = ranked(fuse_scores(incoming[: len(logit)], logit, *self.fusion))
            results.append(with_tail(head, incoming, len(shortlist)))
        return results

    def head_logits(self, queries, shortlists):
        """The logit difference (same minus not same) of each head item: the score is its sigmoid."""
        out = []
        for i, (query, shortlist) in enumerate(zip(queries, shortlists)):
            depth = len(shortlist) if self.top_k is None else min(self.top_k, len(shortlist))
            logits = self.pair_logits(query, shortlist[:depth], i)
            out.append((logits[:, 1] - logits[:, 0]).astype(np.float32))
        return out

    @torch.inference_mode()
    def pair_logits(self, query: ImageFeatures, gallery: Sequence[ImageFeatures], index: int = 0) -> np.ndarray:
        """The official two logits (G, 2) of one query against each gallery image."""
        query_map = torch.from_numpy(_checked_map(query, "query", index)).to(self.device, self.dtype)[None]
        maps = [_checked_map(g, f"query {index}: gallery image", j) for j, g in enumerate(gallery)]
        groups: dict[tuple, list[int]] = {}
        for j, m in enumerate(maps):
            groups.setdefault(m.shape, []).append(j)
        out = np.empty((len(gallery), 2), np.float32)
        chunks = [members[s : s + self.batch_size] for members in groups.values() for s in range(0, len(members), self.batch_size)]
        for chunk in progress(chunks, desc="cvnet", unit="batch", disable=not self.verbose):
            keys = torch.from_numpy(np.stack([maps[j] for j in chunk])).to(self.device, self.dtype)
            out[chunk] = self.module.pair_logits(query_map, keys, self.implementation == "official").float().cpu().numpy()
        if not np.isfinite(out).all():
            raise FloatingPointError(f"cvnet: the model produced non-finite logits (dtype {self.dtype})")
        return out


# -- the extractor ------------------------------------------------------------------------------------


def _content_hash(path: Path) -> str:
    """SHA-1 of a weights file, or of the files of a folder (names and contents)."""
    digest = hashlib.sha1()
    for file in [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(file.name.encode())
        with open(file, "rb") as handle:
            for block in iter(lambda: handle.read(1 << 24), b""):
                digest.update(block)
    return digest.hexdigest()


def prepare(bgr: np.ndarray) -> np.ndarray:
    """The official network input (3, H, W) float32 of a BGR uint8 image (``test/dataset.py``):
    /255, then per channel (x - mean) / std in BGR order; no resizing."""
    image = bgr.astype(np.float32).transpose(2, 0, 1) / 255.0
    return np.ascontiguousarray((image - np.float32(MEAN_BGR)[:, None, None]) / np.float32(STD_BGR)[:, None, None])


def rescaled(bgr: np.ndarray, scale: float) -> np.ndarray:
    """The official multi-scale resize: ``cv2.resize(fx=fy=scale)``, INTER_AREA below 1, INTER_LINEAR above."""
    import cv2

    if scale == 1.0:
        return bgr
    interpolation = cv2.INTER_AREA if scale < 1.0 else cv2.INTER_LINEAR
    return cv2.resize(bgr, dsize=(0, 0), fx=scale, fy=scale, interpolation=interpolation)


class CVNetExtractor(ImageExtractor):
    """From a raw image (a query cropped to its box): the CVNet-Global descriptor (per scale of
    ``scales`` the normalised head output, averaged and normalised again) and the layer-3 map at
    full resolution, both from the checkpoint's ``encoder_q`` (``create_extractor(...,
    dense_dtype="float16")`` halves what the maps take in its cache)."""

    def __init__(self, name: str = "cvnet-r50", checkpoint=None, pretrained: bool = True, config: Optional[dict] = None,
                 scales: Sequence[float] = GLOBAL_SCALES, dense: bool = True, device=None, dtype="float32", verbose: int = 0):
        if not scales or any(s <= 0 for s in scales):
            raise ValueError(f"scales must be positive, got {list(scales)}")
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.encoder = build_module(name, checkpoint, pretrained, config).encoder_q.to(self.device, self.dtype)
        self.checkpoint = None if checkpoint is None else str(checkpoint)
        self.scales, self.dense = tuple(float(s) for s in scales), bool(dense)
        self.batch_size, self.verbose = 1, verbose  # full-resolution images of different sizes: one at a time
        # What was loaded, fixed once: the cache key of every later call (no re-hashing per call).
        self.weights_stamp = "random" if checkpoint is None else _content_hash(Path(checkpoint))

    @property
    def settings(self) -> dict:
        return {"weights": self.weights_stamp, "scales": self.scales, "dense": self.dense, "dtype": str(self.dtype)}

    def _input(self, bgr: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(prepare(bgr))[None].to(self.device, self.dtype)

    @torch.inference_mode()
    def global_descriptor(self, bgr: np.ndarray) -> np.ndarray:
        """The multi-scale CVNet-Global descriptor of a BGR uint8 image."""
        per_scale = [self.encoder.global_descriptor(self._input(rescaled(bgr, s))).float() for s in self.scales]
        return F.normalize(torch.stack(per_scale).mean(0), dim=1)[0].cpu().numpy()

    @torch.inference_mode()
    def feature_map(self, bgr: np.ndarray) -> np.ndarray:
        """The layer-3 map (1024, h, w) of a BGR uint8 image at full resolution."""
        height, width = bgr.shape[:2]
        if min(height, width) < MIN_IMAGE_SIDE:
            raise ValueError(f"cvnet: a {width} x {height} image is too small; CVNet needs at least {MIN_IMAGE_SIDE} "
                             f"pixels per side (a {MIN_MAP_SIDE} x {MIN_MAP_SIDE} layer-3 map)")
        return self.encoder.feature_map(self._input(bgr))[0].float().cpu().numpy()

    def _extract_batch(self, crops: list[Crop]) -> list[ImageFeatures]:
        out = []
        for crop in crops:
            bgr = np.ascontiguousarray(crop.pixels[:, :, ::-1])  # crops are RGB; the official input is OpenCV's BGR
            dense = self.feature_map(bgr) if self.dense else None
            out.append(ImageFeatures(global_desc=self.global_descriptor(bgr), dense=dense))
        return out


@hookimpl
def register_rerankers(register):
    for name, config in CONFIGS.items():
        register(
            name,
            lambda name=name, **options: CVNetReranker(name, **options),
            description=f"CVNet Reranker (CVPR 2022), ResNet-{config['depth']}: cross-scale correlation of dense "
                        "layer-3 maps verified by center-pivot 4D convolutions",
            learned=True,
            trainable=False,  # inference only: the official code and weights have no training script
            inputs="dense+global",
            extractor=name,
            official_options={"batch_size": 1, "implementation": "official"},  # as the official test: one pair per forward
        )


@hookimpl
def register_extractors(register):
    for name, config in CONFIGS.items():
        register(
            name,
            lambda name=name, **options: CVNetExtractor(name, **options),
            description=f"CVNet ResNet-{config['depth']}: the multi-scale CVNet-Global descriptor and the layer-3 map",
        )
