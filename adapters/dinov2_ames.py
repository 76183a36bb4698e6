"""``dinov2-ames``: the descriptors AMES and LoCoRE are trained and evaluated on.

DINOv2 ViT-B/14 with registers (``transformers``' ``Dinov2WithRegistersModel``; a local folder or
a hub id) gives the final-norm patch tokens; the AMES local-feature detector
(``SpatialAttention2d``: 1x1 conv + BN, whose output is L2-normalised into the local
descriptors, then ReLU, 1x1 conv to one channel and softplus for the detector weight) scores
every patch; the ``topk`` patches with the largest weight are the locals, strongest first
(700 for evaluation, 100 for LoCoRE's training data). The global descriptor is the
L2-normalised detector-weighted mean of all patch descriptors.

Preprocessing follows the official ``extract/image_dataset.py``: OpenCV decoding; with
``imsize`` the image is scaled by ``imsize / longer side`` (of the full image, also for query
crops), without it kept at full resolution; each side is then rounded to a multiple of the
patch size (INTER_AREA when shrinking, INTER_LINEAR when enlarging), divided by 255 and
normalised with the ImageNet mean and std. The official AMES evaluation descriptors use no
``imsize``; LoCoRE's training descriptors use ``imsize=770``.

Deviation: the official ``calculate_receptive_boxes`` stores the patch row in its first
position column and the column in the second (and ``fix_query_pos`` then scales the row by the
box width); here ``xy`` is (column, row) = (x, y), consistently mapped to the full image for
query crops. No official model reads these columns.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from locore_plugin.extractors import Crop, ImageExtractor
from locore_plugin.features import ImageFeatures
from locore_plugin.hookspecs import hookimpl
from locore_plugin.io.checkpoints import load_strict, read_state_dict
from locore_plugin.options import renamed_options
from locore_plugin.runtime import resolve_device, resolve_dtype

DEFAULT_MODEL = "facebook/dinov2-with-registers-base"
DETECTOR_URL = "http://ptak.felk.cvut.cz/personal/sumapave/public/ames/networks/dinov2_detector.pt"
MEAN = (0.485, 0.456, 0.406)  # RGB; the official code lists them in BGR order, then flips the image to RGB
STD = (0.229, 0.224, 0.225)


class SpatialAttention2d(nn.Module):
    """The AMES detector; parameter names as in the official ``extract/spatial_attention_2d.py``."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, dim, 1, 1)
        self.bn = nn.BatchNorm2d(dim, eps=1e-5, momentum=0.1)
        self.act1 = nn.ReLU()
        self.conv2 = nn.Conv2d(dim, 1, 1, 1)
        self.softplus = nn.Softplus(beta=1, threshold=20)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, C, H, W) -> L2-normalised descriptors (B, C, H, W) and weights (B, 1, H, W)."""
        x = self.bn(self.conv1(x))
        descriptors = F.normalize(x, p=2, dim=1, eps=1e-15)
        return descriptors, self.softplus(self.conv2(self.act1(x)))


class Dinov2AmesExtractor(ImageExtractor):
    def __init__(self, detector=None, model=DEFAULT_MODEL, num_locals=None, imsize=None, device=None, dtype="float32",
                 batch_size=8, verbose=0, **deprecated):
        given = renamed_options({"num_locals": num_locals}, deprecated, {"topk": "num_locals"}, "dinov2-ames")
        num_locals = 700 if given["num_locals"] is None else given["num_locals"]
        if detector is None:
            raise ValueError(
                f"dinov2-ames needs detector=<path to the AMES detector weights, dinov2_detector.pt from {DETECTOR_URL}>"
            )
        if num_locals < 1:
            raise ValueError(f"num_locals must be >= 1, got {num_locals}")
        from transformers import Dinov2WithRegistersModel

        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.backbone = Dinov2WithRegistersModel.from_pretrained(str(model)).eval().to(self.device, self.dtype)
        config = self.backbone.config
        self.patch_size = int(config.patch_size)
        self.num_registers = int(config.num_register_tokens)
        self.detector = SpatialAttention2d(config.hidden_size)
        load_strict(self.detector, read_state_dict(detector), source=str(detector))
        self.detector.eval().to(self.device)
        self.model_name = str(model)
        # What was loaded, fixed once: the cache key of every later call (no re-hashing per call).
        self.detector_hash = hashlib.sha1(Path(detector).read_bytes()).hexdigest()
        folder = Path(self.model_name)  # a local model folder: its files' sizes and times stand for its weights
        self.model_files = sorted((p.name, p.stat().st_size, p.stat().st_mtime_ns) for p in folder.iterdir()) if folder.is_dir() else []
        self.num_locals = int(num_locals)
        self.imsize = None if imsize is None else int(imsize)
        self.batch_size = int(batch_size)
        self.verbose = verbose

    @property
    def settings(self) -> dict:
        return {"model": self.model_name, "model_files": self.model_files, "detector": self.detector_hash, "topk": self.num_locals,
                "imsize": self.imsize, "dtype": str(self.dtype)}

    def preprocess(self, crop: Crop) -> np.ndarray:
        """The network input (3, H, W) float32, sides multiples of the patch size."""
        import cv2

        height, width = crop.pixels.shape[:2]
        scale = 1.0 if self.imsize is None else self.imsize / max(*crop.full_size, 3)
        scale_x, scale_y = self._quantised(width, scale), self._quantised(height, scale)
        if scale_x < 1.0 or scale_y < 1.0:
            image = cv2.resize(crop.pixels, (0, 0), fx=scale_x, fy=scale_y, interpolation=cv2.INTER_AREA)
        elif scale_x > 1.0 or scale_y > 1.0:
            image = cv2.resize(crop.pixels, (0, 0), fx=scale_x, fy=scale_y, interpolation=cv2.INTER_LINEAR)
        else:
            image = crop.pixels
        image = image.astype(np.float32) / 255.0
        image = (image - np.float32(MEAN)) / np.float32(STD)
        return np.ascontiguousarray(image.transpose(2, 0, 1))

    def _quantised(self, side: int, scale: float) -> float:
        """The factor that brings ``side * scale`` to the nearest multiple of the patch size (at least one patch)."""
        patches = side * scale / self.patch_size
        return scale / (patches / max(round(patches), 1.0))

    def _extract_batch(self, crops: list[Crop]) -> list[ImageFeatures]:
        inputs = [self.preprocess(c) for c in crops]
        out: list = [None] * len(crops)
        by_shape: dict[tuple, list[int]] = {}
        for i, x in enumerate(inputs):
            by_shape.setdefault(x.shape, []).append(i)
        for members in by_shape.values():
            for i, features in zip(members, self.features(torch.from_numpy(np.stack([inputs[i] for i in members])))):
                out[i] = features
        return out

    @torch.inference_mode()
    def features(self, pixels: torch.Tensor) -> list[ImageFeatures]:
        """Features of a batch of preprocessed images (B, 3, H, W) of one size."""
        batch, _, height, width = pixels.shape
        rows, cols = height // self.patch_size, width // self.patch_size
        tokens = self.backbone(pixel_values=pixels.to(self.device, self.dtype)).last_hidden_state
        patches = tokens[:, 1 + self.num_registers :].float()  # (B, N, C), row-major over the patch grid
        descriptors, weights = self.detector(patches.transpose(1, 2)[..., None])  # a 1x1 detector ignores the layout
        descriptors, weights = descriptors[..., 0].transpose(1, 2), weights[:, 0, :, 0]  # (B, N, C), (B, N)
        global_desc = F.normalize((weights[..., None] * descriptors).mean(1), p=2, dim=-1)
        k = min(self.num_locals, rows * cols)
        top_weights, ids = torch.topk(weights, k, dim=1)
        top = torch.gather(descriptors, 1, ids[..., None].expand(-1, -1, descriptors.shape[-1]))
        centres = (torch.stack([ids % cols, ids // cols], dim=-1).float() * self.patch_size + self.patch_size / 2)
        xy = centres / torch.tensor([width, height], dtype=torch.float32, device=centres.device)
        return [
            ImageFeatures(global_desc=global_desc[b].cpu().numpy(), local=top[b].cpu().numpy(), xy=xy[b].cpu().numpy(),
                          scale=np.zeros(k, np.float32), weight=top_weights[b].cpu().numpy())
            for b in range(batch)
        ]


@hookimpl
def register_extractors(register):
    register(
        "dinov2-ames",
        Dinov2AmesExtractor,
        description="DINOv2 ViT-B/14 (registers) patch tokens + the AMES detector: top-k locals, weighted-mean global",
        local_dim=768,
    )
