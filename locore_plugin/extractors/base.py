"""The extractor registry (``register_extractors`` hook, :func:`create_extractor`) and the base
class every extractor shares: loading, query crops (local positions mapped back to the full image,
as the official ``fix_query_pos`` does) and the cache."""
from __future__ import annotations

import abc
import hashlib
import json
from dataclasses import fields
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np

from locore_plugin.features import ImageFeatures
from locore_plugin.registry import ExtractorInfo, RegistryEntry, collect, lookup

from .cache import FeatureCache
from .images import BBox, Crop, LoadedImage, crop_box, image_key, load_image


def registered_extractors() -> dict[str, RegistryEntry]:
    return collect("register_extractors", "extractor", ExtractorInfo)


def list_extractors() -> list[RegistryEntry]:
    """The registered extractors, sorted by name; each says which plugin and distribution provides it."""
    return sorted(registered_extractors().values(), key=lambda e: e.name)


def create_extractor(
    name: str, cache_dir: Union[str, Path, None] = None, cache_size: int = 1024, dense_dtype: Optional[str] = None,
    cache_disk_gb: Optional[float] = None, **kwargs,
) -> "ImageExtractor":
    """Build the extractor registered as ``name`` with ``kwargs`` passed to its factory.

    ``cache_size`` images' features stay in memory (least recently used dropped first);
    ``cache_dir`` also keeps them on disk, keyed by the extractor's settings and the image content;
    ``dense_dtype="float16"`` keeps dense maps there in half precision and ``cache_disk_gb`` bounds
    what the directory holds, least recently used deleted first (see :class:`FeatureCache`).
    """
    extractor = lookup(registered_extractors(), name, "extractor").factory(**kwargs)
    if not isinstance(extractor, ImageExtractor):
        raise TypeError(f"the factory of extractor {name!r} returned {type(extractor).__name__}, not an ImageExtractor")
    extractor.name = name
    disk_limit = None if cache_disk_gb is None else int(cache_disk_gb * 2**30)
    extractor.cache = FeatureCache(cache_size, cache_dir, dense_dtype, disk_limit)
    return extractor


class ImageExtractor(abc.ABC):
    """Turns images into :class:`ImageFeatures`.

    Subclasses implement :meth:`_extract_batch` on :class:`Crop` objects, returning ``xy``
    normalised by the crop's size (x = column / width, y = row / height), and :attr:`settings`
    (everything that changes the output: the cache key). The public methods load images, crop
    queries to their bounding box, map positions back to the full image and use the cache.
    """

    name: str = ""
    num_locals: int = 0  # the most locals one image gets: the ``topk`` of the descriptor files
    batch_size: int = 1
    verbose: int = 0
    cache: Optional[FeatureCache] = None

    @property
    @abc.abstractmethod
    def settings(self) -> dict:
        """JSON-serialisable description of the extractor's output (model files, sizes, top-k)."""

    @abc.abstractmethod
    def _extract_batch(self, crops: list[Crop]) -> list[ImageFeatures]:
        """Features of each crop, positions normalised by the crop's own size."""

    @property
    def identity(self) -> str:
        """A short, stable name for these settings: the folder of the on-disk cache."""
        text = json.dumps({"name": self.name, **self.settings}, sort_keys=True, default=str)
        return f"{self.name or type(self).__name__}-{hashlib.sha1(text.encode()).hexdigest()[:16]}"

    def extract(self, image, bbox: Optional[BBox] = None) -> ImageFeatures:
        """Features of one image; with ``bbox`` [x0, y0, x1, y1] (pixels), of that crop, with
        positions in the full image's frame."""
        return self.extract_many([image], None if bbox is None else [bbox])[0]

    def extract_many(self, images: Sequence, bboxes: Optional[Sequence[Optional[BBox]]] = None) -> list[ImageFeatures]:
        """Features of several images (``bboxes``: one box or None per image), cached ones reused,
        the others extracted ``batch_size`` at a time."""
        images = list(images)
        if not images:
            raise ValueError("no images to extract features from")
        if bboxes is not None and len(bboxes) != len(images):
            raise ValueError(f"{len(images)} images but {len(bboxes)} bounding boxes")
        if self.cache is None:
            self.cache = FeatureCache()
        identity = self.identity
        out: list[Optional[ImageFeatures]] = [None] * len(images)
        pending = []
        for i, source in enumerate(images):
            box = None if bboxes is None or bboxes[i] is None else tuple(float(v) for v in bboxes[i])
            key = (image_key(source), box)
            out[i] = self.cache.get(identity, key)
            if out[i] is None:
                pending.append((i, key))
        progress = _progress(len(pending), self.verbose, f"extract {self.name}")
        for start in range(0, len(pending), max(self.batch_size, 1)):
            chunk = pending[start : start + max(self.batch_size, 1)]
            crops, frames = zip(*(_crop(load_image(images[i]), key[1]) for i, key in chunk))
            for (i, key), frame, features in zip(chunk, frames, self._extract_batch(list(crops)), strict=True):
                out[i] = self.cache.stored(_to_full_frame(features, *frame))
                self.cache.put(identity, key, out[i])
            progress.update(len(chunk))
        progress.close()
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.name!r})"


def _crop(image: LoadedImage, bbox) -> tuple[Crop, tuple]:
    height, width = image.pixels.shape[:2]
    if bbox is None:
        return Crop(image.pixels, (height, width)), (0, 0, width, height, width, height)
    x0, y0, x1, y1 = crop_box(height, width, bbox)
    return Crop(np.ascontiguousarray(image.pixels[y0:y1, x0:x1]), (height, width)), (x0, y0, x1, y1, width, height)


def _to_full_frame(features: ImageFeatures, x0, y0, x1, y1, width, height) -> ImageFeatures:
    """Positions normalised by a crop -> normalised by the full image (the official ``fix_query_pos``)."""
    if features.xy is None or (x0, y0, x1, y1) == (0, 0, width, height):
        return features
    xy = (features.xy * np.float32([x1 - x0, y1 - y0]) + np.float32([x0, y0])) / np.float32([width, height])
    values = {f.name: getattr(features, f.name) for f in fields(features)}
    return ImageFeatures(**{**values, "xy": np.where(features.mask[:, None], xy, 0.0)})


def _progress(total: int, verbose: int, description: str):
    from locore_plugin.progress import progress

    return progress(total=total, desc=description, disable=not verbose or total == 0, unit="image")
