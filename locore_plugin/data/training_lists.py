"""The training feed: GLDv2-style lists of a query and its global nearest neighbours.

The official layout (LoCoRE's ``train_ames.py`` / ``common_utils/gld_data_utils_hdf5.py``, the
AMES GLDv2 split): an image list ``path,landmark_id,width,height`` per line (e.g.
``train_750k.txt``), local descriptors of every image in one HDF5 file, optionally the global
descriptors as a raw float32 memmap, and a nearest-neighbour pickle ``[2, N, 1600]``
(similarities, indices) over the same images. A training list is an image (the query) and its
first ``list_length`` global neighbours other than itself — the hard negatives come from the global
shortlist itself — labelled 1 where the neighbour shows the same landmark. The gallery order is
shuffled per list, as the official collator does, but from a generator seeded by
(seed, epoch, index) instead of the global RNG, so that a resumed run sees the same lists.

One extension of the official list: a negative landmark id marks a distractor, an image that
only ever appears as a negative in other images' lists and is never a query itself.

``pairs="triplet"`` feeds the pair-wise methods as the AMES authors train them (the
``TripletSampler`` of pavelsuma/ELViS ``elvis/utils/dataset_loader.py``): each list becomes the
anchor with one positive and one negative of its first ``list_length`` neighbours (their official
``num_candidates``), each drawn with probability proportional to the global similarity to the power
``triplet_power`` (3 officially; 0 draws uniformly, as RRT's sampler does) among those with a
positive similarity. Only the two drawn images are read, so a list of 300 candidates costs two
reads. The draw comes from the list's (seed, epoch, index) generator, so a resumed run sees the same pairs.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence

import numpy as np
from torch.utils.data import Dataset

from locore_plugin.features import ImageFeatures
from locore_plugin.io.atomic import atomic_write
from locore_plugin.io.descriptors import DescriptorSet, build_shortlist, read_nn, write_descriptors, write_nn
from locore_plugin.options import renamed_options


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
    """Lists of (query, first ``list_length`` global neighbours, same-landmark labels), one per image.

    ``features`` is an indexable collection of :class:`ImageFeatures`, or anything with a
    ``features(indices)`` method such as :class:`~locore_plugin.io.descriptors.DescriptorSet`;
    ``neighbours`` (N, >= list_length) holds each image's global neighbours, best first (the image
    itself is skipped wherever it appears); ``labels`` (N,) the landmark ids (negative = a
    distractor, never a query). ``min_positives`` keeps only queries with at least that many
    same-landmark images in their list (RRT's sampler takes anchors with >= 5), ``min_negatives``
    as many others (AMES's: 5); ``num_samples`` then keeps the first queries (the official
    ``num_training_samples``). ``similarities`` (N, K) are the global similarities aligned with
    ``neighbours``; ``pairs`` is ``"list"`` (the whole shortlist) or ``"triplet"`` (see the module
    docstring), which needs them unless ``triplet_power`` is 0.
    """

    def __init__(
        self,
        features,
        neighbours: np.ndarray,
        labels: np.ndarray,
        list_length: Optional[int] = None,
        shuffle_gallery: bool = True,
        seed: int = 0,
        num_samples: Optional[int] = None,
        min_positives: int = 0,
        min_negatives: int = 0,
        similarities: Optional[np.ndarray] = None,
        pairs: str = "list",
        triplet_power: float = 3.0,
        **deprecated,
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
        given = renamed_options({"list_length": list_length}, deprecated, {"topk": "list_length"}, "training data")
        length = 100 if given["list_length"] is None else int(given["list_length"])
        if length < 1:
            raise ValueError(f"list_length must be >= 1, got {length}")
        if neighbours.shape[1] < length:
            raise ValueError(f"list_length={length} but the neighbour file holds only {neighbours.shape[1]} neighbours per image")
        if pairs not in PAIRS:
            raise ValueError(f"pairs must be one of {PAIRS}, got {pairs!r}")
        if similarities is not None:
            similarities = np.asarray(similarities, dtype=np.float64)
            if similarities.shape != neighbours.shape:
                raise ValueError(f"similarities {similarities.shape} must align with neighbours {neighbours.shape}")
        elif pairs == "triplet" and triplet_power != 0:
            raise ValueError("pairs='triplet' draws by global similarity: pass similarities (or triplet_power=0)")
        if triplet_power < 0:
            raise ValueError(f"triplet_power must be >= 0, got {triplet_power}")
        self.features = features
        self.neighbours = neighbours
        self.labels = labels
        self.list_length = length
        self.shuffle_gallery = bool(shuffle_gallery)
        self.seed = int(seed)
        self.epoch = 0
        self.similarities = similarities
        self.pairs = pairs
        self.triplet_power = float(triplet_power)
        queries = labels >= 0
        if pairs == "triplet":  # an anchor must have a positive and a negative to draw
            min_positives, min_negatives = max(min_positives, 1), max(min_negatives, 1)
        if min_positives > 0 or min_negatives > 0:
            positives = _positives_in_list(neighbours, labels, self.list_length)
            queries &= (positives >= min_positives) & (self.list_length - positives >= min_negatives)
        self.queries = np.flatnonzero(queries)[:num_samples]
        if len(self.queries) == 0:
            raise ValueError(
                f"no image can be a query (landmark id >= 0, >= {min_positives} positives and >= {min_negatives} "
                "negatives in its list)"
            )

    def set_epoch(self, epoch: int) -> None:
        """The epoch whose gallery shuffles ``__getitem__`` draws (set before a loader starts its workers)."""
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.queries)

    def shortlist_indices(self, index: int) -> tuple[int, np.ndarray]:
        """List ``index``: its query image and its gallery images in the order the model sees them
        (with ``pairs="triplet"``: the drawn positive, then the drawn negative)."""
        if not 0 <= index < len(self.queries):
            raise IndexError(f"list {index} out of range [0, {len(self.queries)})")
        image = int(self.queries[index])
        keep = self.neighbours[image] != image
        row = self.neighbours[image][keep][: self.list_length]
        if len(row) < self.list_length:
            raise ValueError(f"image {image} has only {len(row)} neighbours other than itself; list_length is {self.list_length}")
        rng = np.random.default_rng([self.seed, self.epoch, index])
        if self.pairs == "triplet":
            sims = None if self.similarities is None else self.similarities[image][keep][: self.list_length]
            return image, self._triplet(row, sims, self.labels[row] == self.labels[image], rng)
        if self.shuffle_gallery:
            row = row[rng.permutation(len(row))]
        return image, row

    def _triplet(self, row: np.ndarray, sims: Optional[np.ndarray], same: np.ndarray, rng) -> np.ndarray:
        """One positive and one negative of ``row``, each drawn with probability ~ similarity ** power
        among the candidates of positive similarity (all of them when none has one, or at power 0)."""
        chosen = []
        for group in (np.flatnonzero(same), np.flatnonzero(~same)):
            weight = np.ones(len(group)) if sims is None or self.triplet_power == 0 else np.clip(sims[group], 0, None) ** self.triplet_power
            if weight.sum() <= 0:
                weight = np.ones(len(group))
            chosen.append(group[rng.choice(len(group), p=weight / weight.sum())])
        return row[chosen]

    def __getitem__(self, index: int) -> TrainingList:
        image, gallery = self.shortlist_indices(int(index))
        read = getattr(self.features, "features", None)
        ids = [image, *gallery.tolist()]
        images = list(read(ids)) if read is not None else [self.features[i] for i in ids]
        labels = (self.labels[gallery] == self.labels[image]).astype(np.int64)
        return TrainingList(image, images[0], images[1:], labels)


PAIRS = ("list", "triplet")


def _positives_in_list(neighbours: np.ndarray, labels: np.ndarray, length: int) -> np.ndarray:
    """Per image: same-landmark images among its first ``length`` neighbours other than itself."""
    window = neighbours[:, : length + 1]
    own = np.arange(len(neighbours))[:, None]
    is_self = window == own
    beyond = ~is_self.any(1)  # no self in the first length + 1: the last column is not in the list
    same = (labels[window] == labels[own]) & ~is_self
    return same.sum(1) - (beyond & same[:, -1]) * (window.shape[1] > length)


class _LazyDescriptors:
    """A :class:`DescriptorSet` opened in the process that reads it (HDF5 handles do not survive a
    fork into DataLoader workers, nor pickling for spawned ones)."""

    def __init__(self, local, global_desc, num_images: int, num_locals: Optional[int]):
        self.args = ([(local, global_desc)], [num_images], num_locals)
        self.num_images = num_images
        self._set, self._pid = None, None

    def __len__(self) -> int:
        return self.num_images

    def features(self, indices) -> list:
        if self._pid != os.getpid():
            self._set, self._pid = DescriptorSet(*self.args), os.getpid()
        return self._set.features(indices)

    def __getstate__(self):
        return {**self.__dict__, "_set": None, "_pid": None}


def open_training_lists(
    image_list,
    local,
    nn,
    global_desc=None,
    num_locals: Optional[int] = 48,
    **list_options,
) -> TrainingLists:
    """The official training files as lists: ``image_list`` (``path,landmark_id,w,h``), ``local``
    (HDF5 [N, topk, 5 + D]), ``nn`` (pickle [2, N, >= list_length + 1]), optional ``global_desc``
    (raw float32 [N, D]); ``num_locals`` strongest locals per image (the official default: 48 with
    a global descriptor, 49 without). ``list_options`` are :class:`TrainingLists`' (``list_length``,
    ``pairs``, ...)."""
    labels = read_image_list(image_list)
    similarities, neighbours = read_nn(nn)
    features = _LazyDescriptors(local, global_desc, len(labels), num_locals)
    features.features([0])  # fail now, not in a worker, when a file is missing or mis-sized
    return TrainingLists(features, neighbours, labels, similarities=similarities, **list_options)


def open_benchmark_lists(benchmark: str, data_root, desc: str = "dinov2", num_locals: Optional[int] = 48,
                         **list_options) -> TrainingLists:
    """Lists from the training split of a category benchmark (SOP, In-shop, CUB-200 in
    ``{data_root}/{benchmark}``, see :mod:`locore_plugin.data.categories`): each image and its first
    ``list_length`` global neighbours in that split (itself left out), labelled by class id, as
    GLDv2 lists are by landmark. The neighbours are built block by block and cached as
    ``nn_{desc}_{split}_exact.npz`` beside the descriptor files."""
    from locore_plugin.io.descriptors import cached_shortlist, descriptor_paths

    from .categories import CATEGORY_DATASETS

    if benchmark not in CATEGORY_DATASETS:
        raise ValueError(f"unknown benchmark {benchmark!r}; expected one of {sorted(CATEGORY_DATASETS)}")
    bench = CATEGORY_DATASETS[benchmark]
    folder = Path(data_root) / benchmark
    split = bench.read(folder).get(bench.train_split)
    if split is None:
        raise FileNotFoundError(f"{folder}: no {bench.train_split} split (e.g. Ebay_train.txt for SOP)")
    local, global_desc = descriptor_paths(folder, desc, bench.train_split)
    features = _LazyDescriptors(local, global_desc, len(split), num_locals)
    features.features([0])  # fail now, not in a worker, when a file is missing or mis-sized
    depth = int(list_options.get("list_length") or 100)
    globals_only = DescriptorSet([(None, global_desc)], [len(split)])
    similarities, neighbours = cached_shortlist(folder / f"nn_{desc}_{bench.train_split}_exact.npz", globals_only,
                                                globals_only, depth, exclude_self=True)
    return TrainingLists(features, neighbours, split.labels, similarities=similarities, **list_options)


def training_data(options: dict, seed: int = 0) -> TrainingLists:
    """The ``[data]`` table of a training recipe: the official GLDv2 files, ``synthetic = {...}``
    (a split written once into ``directory`` by :func:`write_synthetic_split`), or ``benchmark``
    (the training split of a category benchmark under ``data_root``, see :func:`open_benchmark_lists`;
    ``world = {seed, size}`` writes the synthetic ``synthetic-sop`` world there first)."""
    options = dict(options)
    if "benchmark" in options:
        if "data_root" not in options:
            raise ValueError("data.benchmark needs data.data_root (the folder holding the benchmark's folder)")
        world = options.pop("world", None)
        if world is not None:
            from . import synthetic_sop

            if options["benchmark"] != synthetic_sop.DATASET:
                raise ValueError(f"data.world writes the {synthetic_sop.DATASET} world, not {options['benchmark']!r}")
            synthetic_sop.write(options["data_root"], **world)
            options.setdefault("desc", synthetic_sop.DESCRIPTOR)
        return open_benchmark_lists(**{"seed": seed, **options})
    synthetic = options.pop("synthetic", None)
    if synthetic is not None:
        directory = options.pop("directory", None)
        if directory is None:
            raise ValueError("a synthetic training split needs data.directory (where it is written)")
        options = {**write_synthetic_split(directory, **synthetic), **options}
    return open_training_lists(**{"seed": seed, **options})


# -- a synthetic training split ------------------------------------------------------------------

SYNTHETIC_DESC = "synth"
SYNTHETIC_FILES = {"image_list": "train.txt", "local": f"{SYNTHETIC_DESC}_train_local.hdf5",
                   "global_desc": f"{SYNTHETIC_DESC}_train_global.pt", "nn": f"nn_{SYNTHETIC_DESC}_train.pkl"}


def write_synthetic_split(directory, seeds: Sequence[int] = (1, 2, 3), size: str = "small", depth: int = 200) -> dict:
    """Write a training split in the official layout from synthetic worlds (one per seed) and return
    the ``open_training_lists`` paths; an existing split written with the same arguments is reused.

    Every seed's queries and same-instance gallery views get that instance's landmark id; the other
    gallery images (views of never-queried instances, look-alikes) are distractors (id -1): their
    instances are not recorded in the ground truth, so they serve only as negatives. Train on
    seeds other than the held-out benchmark's: different seeds draw different instances.
    """
    from .synthetic import generate, image_features

    directory = Path(directory)
    paths = {k: str(directory / v) for k, v in SYNTHETIC_FILES.items()}
    stamp = {"seeds": [int(s) for s in seeds], "size": size, "depth": int(depth)}
    marker = directory / "split.json"
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return paths
    if not stamp["seeds"]:
        raise ValueError("write_synthetic_split needs at least one seed")
    local, globals_, labels = [], [], []
    for world, seed in enumerate(stamp["seeds"]):
        data = generate(seed, size)
        nq = len(data.query_local)
        gallery = np.full(len(data.gallery_local), -1, np.int64)
        first = world * (nq + 1)  # unique ids across worlds
        query_labels = np.empty(nq, np.int64)
        for q, entry in enumerate(data.gnd["gnd"]):
            same = np.asarray(entry["easy"] + entry["hard"] + entry["junk"], np.int64)
            known = np.unique(gallery[same][gallery[same] >= 0])
            query_labels[q] = known[0] if len(known) else first + q
            gallery[same] = query_labels[q]
        local += [data.query_local, data.gallery_local]
        globals_ += [data.query_global, data.gallery_global]
        labels += [query_labels, gallery]
    local, globals_, labels = np.concatenate(local), np.concatenate(globals_), np.concatenate(labels)
    directory.mkdir(parents=True, exist_ok=True)
    marker.unlink(missing_ok=True)
    write_descriptors(directory, SYNTHETIC_DESC, "train", image_features(local, globals_), topk=local.shape[1])
    sims, idx = build_shortlist(globals_, globals_, depth, verbose=False)
    write_nn(paths["nn"], sims, idx)
    lines = [f"synthetic/{i:06d}.jpg,{label},512,384" for i, label in enumerate(labels)]
    atomic_write(paths["image_list"], "\n".join(lines) + "\n")
    atomic_write(marker, json.dumps(stamp))  # last: a folder with it is complete
    return paths

