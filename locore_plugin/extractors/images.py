"""Images from any source a user hands over (a path, base64 text, encoded bytes, a PIL image, a
numpy array, a rerankers ``Document`` unpacked by the bridge) and query crops to a bounding box."""
from __future__ import annotations

import base64
import binascii
import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import numpy as np

BBox = Sequence[float]


@dataclass(frozen=True, eq=False)
class LoadedImage:
    """Decoded pixels (H, W, 3) uint8 RGB and a key that identifies the content (SHA-1)."""

    pixels: np.ndarray
    key: str


def image_key(source) -> str:
    """The content key of an image without decoding it (the SHA-1 of the file or array bytes)."""
    kind, payload = _resolve(source)
    if kind == "array":
        return _array_key(payload)
    return hashlib.sha1(payload).hexdigest()


def load_image(source) -> LoadedImage:
    """Decode an image given as a path, base64 text (a data URI too), encoded bytes, a PIL image
    or an (H, W[, 3]) uint8 RGB array (rerankers ``Document``s are unpacked by the bridge).

    Files are decoded with OpenCV, as the official extraction scripts read them.
    """
    kind, payload = _resolve(source)
    if kind == "array":
        return LoadedImage(payload, _array_key(payload))
    import cv2

    bgr = cv2.imdecode(np.frombuffer(payload, np.uint8), cv2.IMREAD_COLOR)
    if bgr is None:
        raise ValueError(f"could not decode an image from {_describe(source)}")
    return LoadedImage(np.ascontiguousarray(bgr[:, :, ::-1]), hashlib.sha1(payload).hexdigest())


def _resolve(source) -> tuple[str, Any]:
    """('bytes', encoded file bytes) or ('array', RGB uint8 pixels)."""
    if isinstance(source, Path):
        if not source.is_file():
            raise FileNotFoundError(f"image not found: {source}")
        return "bytes", source.read_bytes()
    if isinstance(source, str):
        if os.path.isfile(source):
            return "bytes", Path(source).read_bytes()
        try:
            return "bytes", _decode_base64(source, "the string")
        except ValueError:
            raise FileNotFoundError(f"{_describe(source)} is neither an image file nor base64 image data") from None
    if isinstance(source, (bytes, bytearray, memoryview)):
        return "bytes", bytes(source)
    if isinstance(source, np.ndarray):
        return "array", _rgb_array(source)
    if type(source).__module__.startswith("PIL."):
        return "array", _rgb_array(np.asarray(source.convert("RGB")))
    raise TypeError(
        "an image must be a path, base64 text, encoded bytes, a PIL image or a numpy "
        f"array, got {type(source).__name__}"
    )


def _decode_base64(text: str, what: str) -> bytes:
    if text.startswith("data:"):
        text = text.partition(",")[2]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise ValueError(f"{what} is not valid base64") from None
    if not data:
        raise ValueError(f"{what} is empty base64")
    return data


def _rgb_array(array: np.ndarray) -> np.ndarray:
    if array.dtype != np.uint8:
        raise ValueError(f"image arrays must be uint8 (0..255), got dtype {array.dtype}")
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if array.ndim != 3 or array.shape[2] != 3:
        raise ValueError(f"image arrays must have shape (H, W) or (H, W, 3) RGB, got {array.shape}")
    if array.shape[0] == 0 or array.shape[1] == 0:
        raise ValueError(f"image array is empty: {array.shape}")
    return np.ascontiguousarray(array)


def _array_key(array: np.ndarray) -> str:
    digest = hashlib.sha1(repr(array.shape).encode())
    digest.update(array.tobytes())
    return digest.hexdigest()


def _describe(source) -> str:
    text = str(source)
    return repr(text if len(text) <= 80 else text[:77] + "...")


def crop_box(height: int, width: int, bbox: BBox) -> tuple[int, int, int, int]:
    """Pixel bounds ``(x0, y0, x1, y1)`` of a box ``[x0, y0, x1, y1]``, truncated to integers and
    clipped to the image, as the official scripts crop (``img[int(y0):int(y1), int(x0):int(x1)]``)."""
    values = np.asarray(bbox, dtype=np.float64)
    if values.shape != (4,) or not np.isfinite(values).all():
        raise ValueError(f"a bounding box is [x0, y0, x1, y1], got {bbox!r}")
    x0, y0, x1, y1 = (int(v) for v in values)
    x0, x1 = max(x0, 0), min(x1, width)
    y0, y1 = max(y0, 0), min(y1, height)
    if x1 <= x0 or y1 <= y0:
        raise ValueError(f"bounding box {list(bbox)} leaves nothing of a {width}x{height} image")
    return x0, y0, x1, y1


@dataclass(frozen=True, eq=False)
class Crop:
    """What an extractor sees: the (cropped) pixels, RGB uint8, and the size (H, W) of the full
    image they come from (the official scripts choose the resize factor from the full image)."""

    pixels: np.ndarray
    full_size: tuple[int, int]
