"""SIFT with RootSIFT descriptors (OpenCV): an extractor that needs no downloaded weights.

It exists so that the raw-image path (``rank()`` on photos, ``locore-plugin extract``, the ``gv``
re-ranker) works on a machine with no model hub. The columns follow the official descriptor
files: ``xy`` keypoint centres normalised by the image size (pixel-edge convention, so the
image spans [0, 1]), ``weight`` the detector response (locals sorted by it, strongest first),
``scale`` the keypoint diameter relative to the longer image side. The global descriptor is the
L2-normalised mean of the RootSIFT descriptors: honest and simple, far weaker than a learned
global descriptor; use it to build small shortlists, not to compete with DINOv2 or CVNet.
"""
from __future__ import annotations

import numpy as np

from locore_plugin.extractors import Crop, ImageExtractor
from locore_plugin.features import ImageFeatures
from locore_plugin.hookspecs import hookimpl
from locore_plugin.options import renamed_options

DIM = 128


class SiftExtractor(ImageExtractor):
    """``num_locals`` strongest SIFT keypoints of the image resized so that its longer side is
    at most ``imsize`` (the factor chosen on the full image, so a query crop keeps its scale)."""

    def __init__(self, num_locals=None, imsize=1024, batch_size=16, verbose=0, **deprecated):
        given = renamed_options({"num_locals": num_locals}, deprecated, {"max_keypoints": "num_locals"}, "sift")
        num_locals = 1000 if given["num_locals"] is None else given["num_locals"]
        if num_locals < 1:
            raise ValueError(f"num_locals must be >= 1, got {num_locals}")
        if imsize is not None and imsize < 16:
            raise ValueError(f"imsize must be None or >= 16, got {imsize}")
        self.num_locals = int(num_locals)
        self.imsize = None if imsize is None else int(imsize)
        self.batch_size = int(batch_size)
        self.verbose = verbose

    @property
    def settings(self) -> dict:
        import cv2

        return {"max_keypoints": self.num_locals,  # the cache key of 0.1, kept so caches stay valid
                "imsize": self.imsize, "opencv": cv2.__version__}

    def _extract_batch(self, crops: list[Crop]) -> list[ImageFeatures]:
        import cv2

        sift = cv2.SIFT_create(nfeatures=self.num_locals)
        return [self._extract_one(sift, crop) for crop in crops]

    def _extract_one(self, sift, crop: Crop) -> ImageFeatures:
        import cv2

        gray = cv2.cvtColor(crop.pixels, cv2.COLOR_RGB2GRAY)
        factor = 1.0 if self.imsize is None else min(1.0, self.imsize / max(crop.full_size))
        if factor < 1.0:
            size = (max(round(gray.shape[1] * factor), 1), max(round(gray.shape[0] * factor), 1))
            gray = cv2.resize(gray, size, interpolation=cv2.INTER_AREA)
        height, width = gray.shape
        keypoints, descriptors = sift.detectAndCompute(gray, None)
        if not keypoints:
            return ImageFeatures(global_desc=np.zeros(DIM, np.float32), local=np.zeros((0, DIM), np.float32),
                                 xy=np.zeros((0, 2)), scale=np.zeros(0), weight=np.zeros(0))
        response = np.array([k.response for k in keypoints], np.float32)
        order = np.argsort(-response, kind="stable")[: self.num_locals]
        points = np.array([k.pt for k in keypoints], np.float32)[order]
        local = root_sift(descriptors[order])
        return ImageFeatures(
            global_desc=_unit(local.mean(0)),
            local=local,
            xy=(points + 0.5) / np.float32([width, height]),
            scale=np.array([keypoints[i].size for i in order], np.float32) / max(height, width),
            weight=response[order],
        )


def root_sift(descriptors: np.ndarray, eps: float = 1e-7) -> np.ndarray:
    """RootSIFT (Arandjelovic & Zisserman, CVPR 2012): L1-normalise, then square root, so that
    the dot product of two descriptors is the Hellinger kernel of the SIFT histograms (unit L2 norm)."""
    d = np.asarray(descriptors, np.float32)
    return np.sqrt(d / (np.abs(d).sum(axis=1, keepdims=True) + eps))


def _unit(v: np.ndarray) -> np.ndarray:
    norm = np.linalg.norm(v)
    return v / norm if norm > 0 else v


@hookimpl
def register_extractors(register):
    register(
        "sift",
        SiftExtractor,
        description="OpenCV SIFT keypoints with RootSIFT descriptors (no downloaded weights); global = mean RootSIFT",
        local_dim=DIM,
    )
