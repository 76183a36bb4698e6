"""Features extracted from a dataset's images during evaluation, for methods whose inputs the
descriptor files do not carry: a dense feature map per image (CVNet) is about 12 MB in float32
at full resolution, so a gallery's maps are never written as descriptor files. The images a
re-ranker is shown (the queries, cropped to their box, and the shortlisted gallery images) go
through the extractor the method registers, with the extractor's on-disk cache (maps in float16,
its size bounded by ``image_cache_gb``): an interrupted evaluation extracts nothing twice."""
from __future__ import annotations

from pathlib import Path
from typing import Optional, Sequence

from locore_plugin.features import ImageFeatures
from locore_plugin.io.pickles import read_pickle

from .datasets import EvaluationError

IMAGE_INPUTS = ("dense",)  # descriptor kinds that only images provide
IMAGE_CACHE_SIZE = 256  # images kept in memory (a shortlist's maps); the rest stay on disk
SUFFIXES = (".jpg", ".jpeg", ".png")


def needs_images(name: str) -> bool:
    """Whether a registered name (or a stage of a chain) reads inputs that only images provide."""
    from locore_plugin.registry import registered_rerankers

    entries = registered_rerankers()
    return any(set(entries[part].metadata.inputs) & set(IMAGE_INPUTS) for part in name.split("+"))


def image_folder(root: Path, dataset: str, images: Optional[str]) -> Path:
    """``images`` (``{dataset}`` replaced by the dataset's name), else ``{root}/{dataset}/jpg``, the official layout."""
    folder = Path(images.replace("{dataset}", dataset)) if images else root / dataset / "jpg"
    if not folder.is_dir():
        raise EvaluationError(f"{dataset}: image folder {folder} does not exist; methods that read dense maps "
                              "(CVNet) extract them from the images: pass --images DIR")
    return folder


class ImageFeatureSource:
    """The queries (cropped to their ``bbx``) and gallery images of a revisited dataset as
    :class:`ImageFeatures` from ``extractor``, extracted when first asked for; images are
    ``{folder}/{name}.jpg`` as in the official test scripts. Sizes equal the descriptor files'."""

    def __init__(self, extractor, folder: Path, root: Path, dataset: str):
        if dataset.endswith("+1m"):
            raise EvaluationError(f"{dataset}: the distractor images of revisitop1m are not read for image-based methods")
        info = read_pickle(root / dataset / f"gnd_{dataset}.pkl")
        if not {"qimlist", "imlist"} <= set(info):
            raise EvaluationError(f"{dataset}: gnd_{dataset}.pkl has no qimlist / imlist to find the images by")
        self.extractor, self.folder = extractor, folder
        self.query_names, self.gallery_names = list(info["qimlist"]), list(info["imlist"])
        self.boxes = [entry.get("bbx") for entry in info["gnd"]]
        self.queries = _Queries(self)

    def path(self, name: str) -> Path:
        for suffix in SUFFIXES:
            candidate = self.folder / f"{name}{suffix}"
            if candidate.is_file():
                return candidate
        raise EvaluationError(f"image {name} not found in {self.folder} (as {', '.join(name + s for s in SUFFIXES)})")

    def gallery(self, ids: Sequence[int]) -> list[ImageFeatures]:
        return self.extractor.extract_many([self.path(self.gallery_names[int(i)]) for i in ids])


class _Queries(Sequence):
    """The query features, extracted (cropped to the box) on first access."""

    def __init__(self, source: ImageFeatureSource):
        self.source = source

    def __len__(self) -> int:
        return len(self.source.query_names)

    def __getitem__(self, q: int) -> ImageFeatures:
        source = self.source
        return source.extractor.extract(source.path(source.query_names[q]), source.boxes[q])
