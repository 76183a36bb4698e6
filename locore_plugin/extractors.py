"""Features from raw images: the extractor registry, image loading, query crops and the feature cache.

An extractor turns an image into :class:`ImageFeatures` (locals with ``xy``, ``scale``,
``weight`` and a mask, plus a global descriptor). Plugins register extractors through the
``register_extractors`` hook; :func:`create_extractor` builds one by name. Every extractor shares
the machinery here: images come from a path, base64 text, encoded bytes, a rerankers image
``Document``, a PIL image or a numpy array; a query's bounding box crops the image before
extraction and its local positions are mapped back to the full image (as the official
``fix_query_pos`` does); features are cached per image content so that repeated queries do not
re-extract.
"""
from __future__ import annotations

import abc
import base64
import binascii
import hashlib
import io
import json
import os
import zipfile
from collections import OrderedDict
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Sequence, Union

import numpy as np

from locore_plugin.features import ImageFeatures
from locore_plugin.io.atomic import atomic_write, set_aside
from locore_plugin.options import parse_assignment
from locore_plugin.registry import ExtractorInfo, RegistryEntry, collect, lookup

BBox = Sequence[float]


# --------------------------------------------------------------------------------------------
# Registry


def registered_extractors() -> dict[str, RegistryEntry]:
    return collect("register_extractors", "extractor", ExtractorInfo)


def list_extractors() -> list[RegistryEntry]:
    """The registered extractors, sorted by name; each says which plugin and distribution provides it."""
    return sorted(registered_extractors().values(), key=lambda e: e.name)


def create_extractor(
    name: str, cache_dir: Union[str, Path, None] = None, cache_size: int = 1024, **kwargs
) -> "ImageExtractor":
    """Build the extractor registered as ``name`` with ``kwargs`` passed to its factory.

    ``cache_size`` images' features stay in memory (least recently used dropped first);
    ``cache_dir`` also keeps them on disk, keyed by the extractor's settings and the image content.
    """
    extractor = lookup(registered_extractors(), name, "extractor").factory(**kwargs)
    if not isinstance(extractor, ImageExtractor):
        raise TypeError(f"the factory of extractor {name!r} returned {type(extractor).__name__}, not an ImageExtractor")
    extractor.name = name
    extractor.cache = FeatureCache(cache_size, cache_dir)
    return extractor


# --------------------------------------------------------------------------------------------
# Images


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


# --------------------------------------------------------------------------------------------
# Cache


class FeatureCache:
    """Features by (image content, bbox): the ``size`` most recently used in memory, and all of
    them in ``directory`` (one ``.npz`` per image) when it is given."""

    def __init__(self, size: int = 1024, directory: Union[str, Path, None] = None):
        if size < 0:
            raise ValueError(f"cache_size must be >= 0, got {size}")
        self.size = int(size)
        self.directory = None if directory is None else Path(directory)
        self._memory: OrderedDict[tuple, ImageFeatures] = OrderedDict()

    def get(self, identity: str, key: tuple) -> Optional[ImageFeatures]:
        if key in self._memory:
            self._memory.move_to_end(key)
            return self._memory[key]
        path = self._path(identity, key)
        if path is None or not path.is_file():
            return None
        try:
            with np.load(path) as stored:
                features = ImageFeatures(**{name: stored[name] for name in stored.files})
        except (OSError, ValueError, EOFError, KeyError, TypeError, zipfile.BadZipFile) as error:
            set_aside(path, error)
            return None
        self._remember(key, features)
        return features

    def put(self, identity: str, key: tuple, features: ImageFeatures) -> None:
        self._remember(key, features)
        path = self._path(identity, key)
        if path is None:
            return
        arrays = {f.name: getattr(features, f.name) for f in fields(features) if getattr(features, f.name) is not None}
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        atomic_write(path, buffer.getvalue())  # a crash never leaves a truncated entry

    def _remember(self, key, features) -> None:
        if self.size == 0:
            return
        self._memory[key] = features
        self._memory.move_to_end(key)
        while len(self._memory) > self.size:
            self._memory.popitem(last=False)

    def _path(self, identity: str, key: tuple) -> Optional[Path]:
        if self.directory is None:
            return None
        content, bbox = key
        suffix = "" if bbox is None else "_" + "_".join(str(v) for v in bbox)
        return self.directory / identity / f"{content}{suffix}.npz"


# --------------------------------------------------------------------------------------------
# Extractor base


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
                out[i] = _to_full_frame(features, *frame)
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


# --------------------------------------------------------------------------------------------
# Descriptor files: the ``extract`` command

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")


def extract_split(extractor: ImageExtractor, images: Sequence, directory, desc: str, split: str,
                  bboxes: Optional[Sequence[Optional[BBox]]] = None, chunk_size: int = 64,
                  verbose: bool = True) -> tuple[Path, Path]:
    """Extract ``images`` and write ``{desc}_{split}_local.hdf5`` / ``{desc}_{split}_global.pt``
    (official layout, ``extractor.num_locals`` rows per image) with
    :class:`~locore_plugin.io.descriptors.DescriptorWriter`.

    Images go through the extractor's cache in chunks, so with an on-disk cache an interrupted run
    resumes where it stopped; the files appear only once complete.
    """
    from locore_plugin.io.descriptors import DescriptorWriter
    from locore_plugin.progress import progress

    if not images:
        raise ValueError(f"no images for the {split} split")
    if bboxes is not None and len(bboxes) != len(images):
        raise ValueError(f"{len(images)} images but {len(bboxes)} bounding boxes")
    chunks = range(0, len(images), chunk_size)
    bar = progress(total=len(images), desc=f"{desc} {split}", unit="image", disable=not verbose)

    def chunk(start):
        features = extractor.extract_many(images[start : start + chunk_size],
                                          None if bboxes is None else bboxes[start : start + chunk_size])
        bar.update(len(features))
        return features

    first = chunk(0)
    local_dim = None if first[0].local is None else first[0].local.shape[1]
    global_dim = None if first[0].global_desc is None else first[0].global_desc.shape[0]
    with bar, DescriptorWriter(directory, desc, split, len(images), max(extractor.num_locals, 1),
                               local_dim, global_dim) as writer:
        writer.append(first)
        for start in chunks[1:]:
            writer.append(chunk(start))
    return writer.local_path, writer.global_path


def _image_folder(folder: Path) -> list[Path]:
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    files = sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)
    if not files:
        raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) in {folder}")
    return files


def _revisited_splits(folder: Path, gnd_path: Path) -> dict[str, tuple[list[Path], Optional[list]]]:
    """Query (cropped to the ground-truth ``bbx``) and gallery images of a revisited dataset."""
    from locore_plugin.io.pickles import read_pickle

    info = read_pickle(gnd_path)
    if not isinstance(info, dict) or not {"imlist", "qimlist", "gnd"} <= set(info):
        raise ValueError(f"{gnd_path}: expected a dict with imlist, qimlist and gnd")
    if len(info["gnd"]) != len(info["qimlist"]):
        raise ValueError(f"{gnd_path}: {len(info['qimlist'])} queries but {len(info['gnd'])} ground-truth entries")

    def paths(names):
        out = [folder / (n if Path(n).suffix.lower() in IMAGE_SUFFIXES else f"{n}.jpg") for n in names]
        missing = [str(p) for p in out if not p.is_file()]
        if missing:
            raise FileNotFoundError(f"{len(missing)} images of {gnd_path.name} missing in {folder}, e.g. {missing[0]}")
        return out

    return {"query": (paths(info["qimlist"]), [g["bbx"] for g in info["gnd"]]),
            "gallery": (paths(info["imlist"]), None)}


def add_extract_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "extract",
        help="write descriptor files (official AMES/LoCoRE layout) for a folder of images or a revisited dataset",
        description="Writes {desc}_{split}_local.hdf5 and {desc}_{split}_global.pt into --out. A folder gives the "
        "gallery split (row order in {desc}_gallery_images.txt); with --gnd (gnd_<dataset>.pkl) the query split "
        "(images cropped to the ground-truth bbx) and the gallery split. Interrupted runs resume from the "
        "per-image cache; finished splits are skipped unless --overwrite.",
    )
    parser.add_argument("extractor", help="registered extractor name, e.g. sift or dinov2-ames (an unknown name lists them)")
    parser.add_argument("--images", required=True, type=Path, help="folder of images (for --gnd: <name>.jpg files)")
    parser.add_argument("--out", required=True, type=Path, help="output folder (a dataset folder of the data root)")
    parser.add_argument("--gnd", type=Path, help="gnd_<dataset>.pkl: extract its query and gallery images")
    parser.add_argument("--desc", help="descriptor name in the file names (default: the extractor name)")
    parser.add_argument("--option", action="append", default=[], metavar="KEY=VALUE",
                        help="extractor option (repeatable), e.g. num_locals=100; VALUE: a TOML or Python literal, or plain text")
    parser.add_argument("--cache-dir", type=Path, help="per-image cache for resuming (default: OUT/.extract-cache)")
    parser.add_argument("--keep-cache", action="store_true", help="keep the per-image cache after success")
    parser.add_argument("--overwrite", action="store_true", help="re-write splits whose files exist")
    parser.add_argument("--chunk-size", type=int, default=64, help="images per write")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")

    def run(args):
        import shutil

        options = dict(_option(text) for text in args.option)
        cache_dir = args.cache_dir or args.out / ".extract-cache"
        extractor = create_extractor(args.extractor, cache_dir=cache_dir, cache_size=0, **options)
        desc = args.desc or args.extractor
        if args.gnd is not None:
            splits = _revisited_splits(args.images, args.gnd)
        else:
            files = _image_folder(args.images)
            splits = {"gallery": (files, None)}
        args.out.mkdir(parents=True, exist_ok=True)
        for split, (images, bboxes) in splits.items():
            local_path, global_path = (args.out / f"{desc}_{split}_local.hdf5", args.out / f"{desc}_{split}_global.pt")
            if local_path.is_file() and global_path.is_file() and not args.overwrite:
                print(f"{local_path.name} and {global_path.name} exist: skipped (--overwrite to redo)")
                continue
            extract_split(extractor, images, args.out, desc, split, bboxes, args.chunk_size, not args.quiet)
            if args.gnd is None:
                names = "".join(f"{p.relative_to(args.images)}\n" for p in images)
                (args.out / f"{desc}_{split}_images.txt").write_text(names)
            print(f"wrote {local_path} and {global_path} ({len(images)} images)")
        if not args.keep_cache:
            shutil.rmtree(cache_dir / extractor.identity, ignore_errors=True)
            if cache_dir.is_dir() and not any(cache_dir.iterdir()):
                cache_dir.rmdir()
        return 0

    parser.set_defaults(run=run)


def _option(text: str) -> tuple[str, Any]:
    try:
        return parse_assignment(text, "--option")
    except ValueError as error:
        raise SystemExit(str(error)) from None
