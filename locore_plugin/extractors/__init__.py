"""Features from raw images: the extractor registry, image loading, query crops and the feature cache.

An extractor turns an image into :class:`ImageFeatures` (locals with ``xy``, ``scale``,
``weight`` and a mask, plus a global descriptor). Plugins register extractors through the
``register_extractors`` hook; :func:`create_extractor` builds one by name. Every extractor shares
the machinery here: images come from a path, base64 text, encoded bytes, a rerankers image
``Document``, a PIL image or a numpy array; a query's bounding box crops the image before
extraction and its local positions are mapped back to the full image (as the official
``fix_query_pos`` does); features are cached per image content so that repeated queries do not
re-extract.

The package: ``images`` (loading, crops), ``cache``, ``base`` (registry and base class),
``command`` (``locore-plugin extract``).
"""
from __future__ import annotations

from .base import ImageExtractor, create_extractor, list_extractors, registered_extractors
from .cache import FeatureCache
from .command import add_extract_command, extract_split
from .images import BBox, Crop, LoadedImage, crop_box, image_key, load_image

__all__ = [
    "BBox", "Crop", "FeatureCache", "ImageExtractor", "LoadedImage", "add_extract_command", "create_extractor",
    "crop_box", "extract_split", "image_key", "list_extractors", "load_image", "registered_extractors",
]
