"""A synthetic category-level benchmark with planted structure, written in the SOP layout.

The world: classes belong to super-classes (as SOP's products belong to 12 categories). Every
class owns ``parts`` patterns (unit local descriptors); an image of a class shows a random
subset of them, each under descriptor noise, plus clutter of its own. Global descriptors mix a
super-class direction (shared by every class of it) with a weaker class direction and noise, so
the global top of a query is crowded with look-alike classes of its super-class; local
descriptors are what separates the classes. Train and test classes are disjoint, as in SOP.

Files (``{root}/synthetic-sop/``): ``Ebay_train.txt`` / ``Ebay_test.txt`` (the SOP format),
``synth_{train,test}_{local.hdf5,global.pt}`` in the official layout and ``synthetic-sop.json``
(seed and config, written last). Everything is drawn from one seeded generator.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from locore_plugin.io.atomic import atomic_write

DATASET = "synthetic-sop"
DESCRIPTOR = "synth"


@dataclass(frozen=True)
class CategoryWorldConfig:
    train_classes: int = 1000
    test_classes: int = 60
    super_classes: int = 6
    images_per_class: tuple = (2, 8)  # drawn per class in [low, high], SOP's classes hold 2-12
    parts: int = 16  # patterns a class owns
    seen: int = 10  # patterns an image shows (a random subset): two images share about 6
    detect: float = 0.9  # probability that a shown pattern yields a local descriptor
    clutter: int = 4
    topk: int = 16  # local rows per image in the files (padded with mask = 1)
    local_dim: int = 32
    global_dim: int = 32
    local_noise: float = 0.5
    super_signal: float = 1.0  # weight of the super-class direction in a global descriptor
    class_signal: float = 0.5  # weight of the class direction
    global_noise: float = 0.9


SIZES = {
    "tiny": CategoryWorldConfig(train_classes=12, test_classes=12, super_classes=2, class_signal=0.3),
    "small": CategoryWorldConfig(),
    # SOP's test split at full size (60,502 images of 11,316 classes): for the scale measurement.
    "sop-test-size": CategoryWorldConfig(train_classes=2, test_classes=11_000, super_classes=12,
                                         images_per_class=(5, 6)),
}


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def generate(seed: int = 0, size="small") -> dict:
    """``{split: (rows [n, topk, 5 + local_dim], globals [n, global_dim], labels [n], super labels [n])}``."""
    cfg = SIZES[size] if isinstance(size, str) else size
    if not 1 <= cfg.seen <= cfg.parts or cfg.topk < 1 or cfg.images_per_class[0] < 2:
        raise ValueError(f"a category world needs 1 <= seen <= parts, topk >= 1 and >= 2 images per class, got {cfg}")
    rng = np.random.default_rng(seed)
    out = {}
    for split, classes in (("train", cfg.train_classes), ("test", cfg.test_classes)):
        low, high = cfg.images_per_class
        counts = rng.integers(low, high + 1, classes)
        labels = np.repeat(np.arange(classes), counts)
        supers_of_class = rng.integers(0, cfg.super_classes, classes)
        n = len(labels)
        super_dirs = _unit(rng.normal(size=(cfg.super_classes, cfg.global_dim)))
        class_dirs = _unit(rng.normal(size=(classes, cfg.global_dim)))
        noise = rng.normal(size=(n, cfg.global_dim)) * (cfg.global_noise / np.sqrt(cfg.global_dim))
        globals_ = _unit(cfg.super_signal * super_dirs[supers_of_class[labels]] + cfg.class_signal * class_dirs[labels] + noise)

        patterns = _unit(rng.normal(size=(classes, cfg.parts, cfg.local_dim)))
        shown = np.argsort(rng.random((n, cfg.parts)), 1)[:, : cfg.seen]  # each image's subset of its class's parts
        detected = rng.random((n, cfg.seen)) < cfg.detect
        seen = patterns[labels[:, None], shown] + cfg.local_noise / np.sqrt(cfg.local_dim) * rng.normal(size=(n, cfg.seen, cfg.local_dim))
        clutter = rng.normal(size=(n, cfg.clutter, cfg.local_dim))
        desc = _unit(np.concatenate([seen, clutter], 1))
        valid = np.concatenate([detected, np.ones((n, cfg.clutter), bool)], 1)
        order = np.argsort(~valid + rng.random(valid.shape), 1, kind="stable")[:, : cfg.topk]  # valid first, shuffled
        desc, valid = np.take_along_axis(desc, order[..., None], 1), np.take_along_axis(valid, order, 1)
        rows = np.zeros((n, order.shape[1], 5 + cfg.local_dim), np.float32)
        rows[..., 0], rows[..., 1] = rng.random(valid.shape) * 512, rng.random(valid.shape) * 384
        rows[..., 2] = rng.integers(0, 3, valid.shape)
        rows[..., 3] = ~valid  # mask: 1 = padding
        rows[..., 4] = np.where(valid, -np.sort(-rng.random(valid.shape), 1), 0)  # weights, strongest first
        rows[..., 5:] = np.where(valid[..., None], desc, 0)
        perm = rng.permutation(n)  # file order carries no label
        out[split] = (rows[perm], globals_[perm].astype(np.float32), labels[perm], supers_of_class[labels][perm])
    return out


def write(root, seed: int = 0, size="small") -> Path:
    """Generate and write ``{root}/synthetic-sop/`` (see the module docstring); returns that folder.
    An existing complete folder with the same seed and config is left as it is."""
    from locore_plugin.io.descriptors import write_descriptors

    from .synthetic import image_features

    cfg = SIZES[size] if isinstance(size, str) else size
    folder = Path(root) / DATASET
    marker = folder / f"{DATASET}.json"
    stamp = json.loads(json.dumps({"seed": int(seed), "config": asdict(cfg)}))  # as read back (tuples as lists)
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    marker.unlink(missing_ok=True)
    offset = 0
    for split, (rows, globals_, labels, supers) in generate(seed, cfg).items():
        write_descriptors(folder, DESCRIPTOR, split, image_features(rows, globals_), topk=cfg.topk)
        classes = labels + offset + 1  # SOP numbers classes from 1, train and test apart
        lines = ["image_id class_id super_class_id path"]
        lines += [f"{i + 1} {c} {s + 1} class_{c:05d}/image_{i:06d}.jpg" for i, (c, s) in enumerate(zip(classes, supers))]
        atomic_write(folder / f"Ebay_{split}.txt", ("\n".join(lines) + "\n").encode())
        offset = int(classes.max())
    atomic_write(marker, json.dumps(stamp, indent=1).encode())
    return folder
