"""The training feed: GLDv2-style lists of a query and its global nearest neighbours.

The official layout (LoCoRE's ``train_ames.py`` / ``common_utils/gld_data_utils_hdf5.py``, the
AMES GLDv2 split): an image list ``path,landmark_id,width,height`` per line (e.g.
``train_750k.txt``), local descriptors of every image in one HDF5 file, optionally the global
descriptors as a raw float32 memmap, and a nearest-neighbour pickle ``[2, N, 1600]``
(similarities, indices) over the same images. A training list is an image (the query) and its
first ``topk`` global neighbours other than itself — the hard negatives come from the global
shortlist itself — labelled 1 where the neighbour shows the same landmark. The gallery order is
shuffled per list, as the official collator does, but from a generator seeded by
(seed, epoch, index) instead of the global RNG, so that a resumed run sees the same lists.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from .features import ImageFeatures


@dataclass(frozen=True, eq=False)
class TrainingList:
    """One training example: a query, its shortlist (gallery order as the model sees it) and 0/1
    labels aligned with the shortlist (1 = same landmark as the query)."""

    index: int
    query: ImageFeatures
    shortlist: list
    labels: np.ndarray


def read_image_list(path) -> np.ndarray:
    """Landmark ids (one int per image, file order) of an official image list ``path,landmark_id,w,h``."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"image list not found: {path} (the GLDv2 training split of AMES/LoCoRE, e.g. train_750k.txt)"
        )
    labels = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        fields = line.split(",")
        try:
            labels.append(int(fields[1]))
        except (IndexError, ValueError):
            raise ValueError(f"{path}:{number}: expected 'path,landmark_id,width,height', got {line!r}") from None
    if not labels:
        raise ValueError(f"{path} lists no image")
    return np.asarray(labels, dtype=np.int64)


class TrainingLists(Dataset):
    """Lists of (query, first ``topk`` global neighbours, same-landmark labels), one per image.

    ``features`` is any indexable collection of :class:`ImageFeatures` (e.g. the lazy HDF5 reader
    of :func:`open_training_features`); ``neighbours`` (N, >= topk + 1) holds each image's global
    neighbours, best first (the image itself, wherever it appears, is skipped); ``labels`` (N,)
    the landmark ids. ``num_samples`` keeps the first images as queries (the official
    ``num_training_samples``); their neighbours may be any image.
    """

    def __init__(
        self,
        features,
        neighbours: np.ndarray,
        labels: np.ndarray,
        topk: int = 100,
        shuffle_gallery: bool = True,
        seed: int = 0,
        num_samples: Optional[int] = None,
    ):
        neighbours = np.asarray(neighbours)
        labels = np.asarray(labels)
        n = len(features)
        if labels.shape != (n,):
            raise ValueError(f"{n} images but labels of shape {labels.shape}")
        if neighbours.ndim != 2 or neighbours.shape[0] != n:
            raise ValueError(f"neighbours must have shape ({n}, K), got {neighbours.shape}")
        if not np.issubdtype(neighbours.dtype, np.integer):
            if not np.array_equal(neighbours, np.round(neighbours)):
                raise ValueError("neighbour indices must be whole numbers")
            neighbours = neighbours.astype(np.int64)
        if neighbours.size and (neighbours.min() < 0 or neighbours.max() >= n):
            raise ValueError(f"neighbour indices must lie in [0, {n}), got [{neighbours.min()}, {neighbours.max()}]")
        if topk < 1:
            raise ValueError(f"topk must be >= 1, got {topk}")
        if neighbours.shape[1] < topk:
            raise ValueError(f"topk={topk} but the neighbour file holds only {neighbours.shape[1]} neighbours per image")
        self.features = features
        self.neighbours = neighbours
        self.labels = labels
        self.topk = int(topk)
        self.shuffle_gallery = bool(shuffle_gallery)
        self.seed = int(seed)
        self.epoch = 0
        self.length = n if num_samples is None else min(int(num_samples), n)

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose gallery shuffles ``__getitem__`` draws (set before a loader starts its workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.length

    def shortlist_indices(self, index: int) -> np.ndarray:
        """The images of list ``index`` in the order the model sees them."""
        if not 0 <= index < self.length:
            raise IndexError(f"list {index} out of range [0, {self.length})")
        row = self.neighbours[index]
        row = row[row != index][: self.topk]
        if len(row) < self.topk:
            raise ValueError(f"image {index} has only {len(row)} neighbours other than itself; topk is {self.topk}")
        if self.shuffle_gallery:
            row = row[np.random.default_rng([self.seed, self.epoch, index]).permutation(len(row))]
        return row

    def __getitem__(self, index: int) -> TrainingList:
        index = int(index)
        gallery = self.shortlist_indices(index)
        images = _read(self.features, [index, *gallery.tolist()])
        labels = (self.labels[gallery] == self.labels[index]).astype(np.float32)
        return TrainingList(index, images[0], images[1:], labels)


def _read(features, indices: Sequence[int]) -> list:
    """Several images at once when the collection can (HDF5 reads in one sorted selection)."""
    many = getattr(features, "read_many", None)
    return list(many(indices)) if many is not None else [features[i] for i in indices]
