"""Category-level benchmarks (LoCoRE supplementary Table D): Stanford Online Products, In-shop
Clothes and CUB-200-2011, read from the split files their users have, as distributed.

* SOP: ``Ebay_train.txt`` / ``Ebay_test.txt``, a header line then ``image_id class_id
  super_class_id path`` (paths relative to the dataset folder).
* In-shop: ``list_eval_partition.txt``, a count line, a header line, then ``image_name item_id
  evaluation_status`` with status ``train`` / ``query`` / ``gallery``; the label is the item id.
* CUB-200-2011: ``images.txt`` (``image_id path``, paths under ``images/``) and
  ``image_class_labels.txt`` (``image_id class_id``); classes 1-100 train, 101-200 test.

Descriptor files of split ``S`` are ``{desc}_{S}_local.hdf5`` / ``{desc}_{S}_global.pt`` in the
dataset folder (``locore-plugin extract --benchmark``), rows in the split file's order. SOP and CUB
query every test image against all the others (itself excluded); In-shop queries the ``query``
split against the ``gallery`` split. Each benchmark names the R@K its papers report.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import numpy as np


@dataclass(frozen=True)
class LabelledImages:
    """One split: image paths (relative to the dataset folder) and their class labels."""

    paths: tuple[str, ...]
    labels: np.ndarray  # [n] int64

    def __post_init__(self):
        if len(self.paths) != len(self.labels):
            raise ValueError(f"{len(self.paths)} paths but {len(self.labels)} labels")

    def __len__(self) -> int:
        return len(self.paths)


@dataclass(frozen=True)
class CategoryBenchmark:
    name: str
    marker: str  # the split file whose presence identifies the layout
    read: Callable[[Path], dict]  # folder -> {split: LabelledImages}
    query_split: str
    gallery_split: str  # the same as query_split: every image queries the others
    recall_ks: tuple[int, ...]  # the R@K the benchmark's papers report
    train_split: str = "train"

    @property
    def queries_are_gallery(self) -> bool:
        return self.query_split == self.gallery_split


def _rows(path: Path, skip: int, columns: int) -> list[list[str]]:
    if not path.is_file():
        raise FileNotFoundError(f"split file not found: {path}")
    lines = [line.split() for line in path.read_text().splitlines()[skip:] if line.strip()]
    bad = [i + skip + 1 for i, fields in enumerate(lines) if len(fields) < columns]
    if bad:
        raise ValueError(f"{path}: lines {bad[:5]} have fewer than {columns} fields")
    return lines


def read_sop(folder) -> dict[str, LabelledImages]:
    """``{"train", "test"}`` of Stanford Online Products (labels = class_id)."""
    folder = Path(folder)
    out = {}
    for split, name in (("train", "Ebay_train.txt"), ("test", "Ebay_test.txt")):
        path = folder / name
        if split == "train" and not path.is_file():
            continue  # an evaluation-only copy
        rows = _rows(path, 1, 4)
        out[split] = LabelledImages(tuple(r[3] for r in rows), np.array([int(r[1]) for r in rows], np.int64))
    return out


def read_inshop(folder) -> dict[str, LabelledImages]:
    """``{"train", "query", "gallery"}`` of In-shop Clothes Retrieval (labels = item id number)."""
    path = Path(folder) / "list_eval_partition.txt"
    rows = _rows(path, 2, 3)
    out = {}
    for split in ("train", "query", "gallery"):
        chosen = [r for r in rows if r[2] == split]
        labels = np.array([int(r[1].rsplit("_", 1)[-1]) for r in chosen], np.int64)
        out[split] = LabelledImages(tuple(r[0] for r in chosen), labels)
    unknown = sorted({r[2] for r in rows} - {"train", "query", "gallery"})
    if unknown:
        raise ValueError(f"{path}: unknown evaluation_status {unknown}")
    return out


def read_cub200(folder) -> dict[str, LabelledImages]:
    """``{"train", "test"}`` of CUB-200-2011: classes 1-100 train, 101-200 test (the metric-learning split)."""
    folder = Path(folder)
    images = {int(r[0]): r[1] for r in _rows(folder / "images.txt", 0, 2)}
    labels = {int(r[0]): int(r[1]) for r in _rows(folder / "image_class_labels.txt", 0, 2)}
    if set(images) != set(labels):
        raise ValueError(f"{folder}: images.txt and image_class_labels.txt list different image ids")
    ids = sorted(images)
    out = {}
    for split, keep in (("train", lambda c: c <= 100), ("test", lambda c: c > 100)):
        chosen = [i for i in ids if keep(labels[i])]
        out[split] = LabelledImages(tuple(f"images/{images[i]}" for i in chosen), np.array([labels[i] for i in chosen], np.int64))
    return out


SOP = CategoryBenchmark("sop", "Ebay_test.txt", read_sop, "test", "test", (1, 10, 100, 1000))
INSHOP = CategoryBenchmark("inshop", "list_eval_partition.txt", read_inshop, "query", "gallery", (1, 10, 20, 30, 40, 50))
CUB200 = CategoryBenchmark("cub200", "images.txt", read_cub200, "test", "test", (1, 2, 4, 8))
# Dataset names (folders of the data root) and the layout they are in; synthetic-sop is the
# planted category world of locore_plugin.data.synthetic_categories, written as SOP.
# (a few hundred images: R@1000 does not exist there).
CATEGORY_DATASETS = {"sop": SOP, "inshop": INSHOP, "cub200": CUB200, "synthetic-sop": replace(SOP, recall_ks=(1, 10, 100))}
