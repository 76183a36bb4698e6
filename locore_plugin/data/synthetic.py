"""A small synthetic "revisited" dataset with planted structure, written in the official layout.

The world: each landmark instance is a strip of ``parts`` distinct patterns (unit local
descriptors). An image of an instance sees a window of consecutive parts, each detected with
some probability and under descriptor noise, plus clutter patterns of its own. For a query,
the gallery images of its instance are

* easy: their window overlaps at least half of the query's window;
* hard: a smaller, non-empty overlap, or no overlap at all but a third of an easy image's
  window (the transitive case of LoCoRE supplementary Figure C: only list-wise evidence links it);
* junk: neither.

Global descriptors mix an instance direction with strong noise (weaker for hard views, and
"look-alike" distractors share an instance's direction), so the global ranking is mediocre and
local evidence is what separates positives from look-alikes. Everything is drawn from one seeded
``numpy.random.Generator``: the same seed gives the same files.
"""
from __future__ import annotations

import json
import pickle
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from locore_plugin.io.atomic import atomic_write

DATASET = "synthetic"
DESCRIPTOR = "synth"
NN_NAME = "global"


@dataclass(frozen=True)
class SyntheticConfig:
    instances: int = 10  # landmark instances with queries
    queries_per_instance: int = 3
    views_per_instance: int = 24  # gallery images of each instance
    distractor_instances: int = 20  # instances never queried (their views are negatives)
    views_per_distractor: int = 6
    lookalikes: int = 120  # negatives whose global descriptor resembles a queried instance
    parts: int = 48  # patterns along an instance
    window: int = 16  # consecutive parts an image sees
    detect: float = 0.9  # probability that a part in view yields a local descriptor
    clutter: int = 8  # clutter locals per image
    topk: int = 32  # local rows per image in the files (padded with mask = 1)
    local_dim: int = 32
    global_dim: int = 32
    local_noise: float = 0.5  # norm of the noise added to a detected pattern (a unit vector)
    global_signal: float = 1.0  # weight of the instance direction in an easy view's global descriptor
    global_noise: float = 1.0  # norm of the noise added to a global descriptor
    hard_signal: float = 0.75  # instance weight for views that overlap the query's window little or not at all
    nn_depth: int = 200  # length of the nn_global.pkl shortlist


SIZES = {
    "tiny": SyntheticConfig(instances=4, queries_per_instance=2, views_per_instance=14, distractor_instances=6,
                            views_per_distractor=4, lookalikes=30, nn_depth=60),
    "small": SyntheticConfig(),
}


@dataclass
class SyntheticData:
    """Arrays of a generated dataset, in memory (rows of the local arrays: x, y, scale, mask, weight, desc)."""

    config: SyntheticConfig
    seed: int
    query_local: np.ndarray  # [nq, topk, 5 + local_dim] float32
    gallery_local: np.ndarray  # [ndb, topk, 5 + local_dim] float32
    query_global: np.ndarray  # [nq, global_dim] float32, unit rows
    gallery_global: np.ndarray  # [ndb, global_dim]
    gnd: dict  # {"gnd": [{"easy", "hard", "junk", "bbx"}], "imlist", "qimlist"}
    transitive: list  # per query: hard positives that share no part with the query


def _unit(x: np.ndarray) -> np.ndarray:
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _config(size: str | SyntheticConfig) -> SyntheticConfig:
    """A named size (``SIZES``) or a config as it is."""
    if isinstance(size, SyntheticConfig):
        return size
    if size not in SIZES:
        raise ValueError(f"unknown synthetic size {size!r}; expected one of {sorted(SIZES)} or a SyntheticConfig")
    return SIZES[size]


def generate(seed: int = 0, size: str | SyntheticConfig = "small") -> SyntheticData:
    """Draw a dataset; the same ``seed`` and ``size`` give identical arrays."""
    cfg = _config(size)
    if not 1 <= cfg.window <= cfg.parts or cfg.topk < 1:
        raise ValueError(f"a synthetic config needs 1 <= window <= parts and topk >= 1, got {cfg}")
    rng = np.random.default_rng(seed)
    n_inst = cfg.instances + cfg.distractor_instances
    patterns = _unit(rng.normal(size=(n_inst, cfg.parts, cfg.local_dim)))
    directions = _unit(rng.normal(size=(n_inst, cfg.global_dim)))
    heights = rng.random((n_inst, cfg.parts))  # each pattern's fixed height: views differ by a shift in x
    last_start = cfg.parts - cfg.window

    # Gallery views: queried instances spread their windows over the whole strip.
    view_inst, view_start = [], []
    for i in range(cfg.instances):
        view_inst += [i] * cfg.views_per_instance
        view_start += list(np.round(np.linspace(0, last_start, cfg.views_per_instance)).astype(int))
    for i in range(cfg.instances, n_inst):
        view_inst += [i] * cfg.views_per_distractor
        view_start += list(rng.integers(0, last_start + 1, cfg.views_per_distractor))
    n_views = len(view_inst)
    lookalike_inst = rng.integers(0, cfg.instances, cfg.lookalikes)
    ndb = n_views + cfg.lookalikes
    perm = rng.permutation(ndb)  # gallery order is shuffled so position carries no label

    q_inst = np.repeat(np.arange(cfg.instances), cfg.queries_per_instance)
    q_start = rng.integers(0, last_start + 1, len(q_inst))

    def locals_for(inst, starts, lookalike=False):
        n = len(inst)
        rows = np.zeros((n, cfg.topk, 5 + cfg.local_dim), np.float32)
        for r in range(n):
            # A look-alike sees no instance pattern: it shares only the global appearance.
            parts = np.arange(starts[r], starts[r] + (0 if lookalike else cfg.window))
            parts = parts[rng.random(len(parts)) < cfg.detect]
            seen = _unit(patterns[inst[r], parts] + cfg.local_noise / np.sqrt(cfg.local_dim) * rng.normal(size=(len(parts), cfg.local_dim)))
            clutter = _unit(rng.normal(size=(cfg.clutter + (cfg.window if lookalike else 0), cfg.local_dim)))
            desc = np.concatenate([seen, clutter])
            x = np.concatenate([(parts - starts[r] + 0.5) / cfg.window, rng.random(len(clutter))])
            y = np.concatenate([heights[inst[r], parts], rng.random(len(clutter))])
            keep = rng.permutation(len(desc))[: cfg.topk]
            desc, x, y = desc[keep], x[keep], y[keep]
            weight = np.sort(rng.random(len(desc)))[::-1]  # the official files list locals by detector weight
            m = len(desc)
            rows[r, :m, 0] = x * 512
            rows[r, :m, 1] = y * 384
            rows[r, :m, 2] = rng.integers(0, 3, m)
            rows[r, m:, 3] = 1.0  # mask: 1 = padding
            rows[r, :m, 4] = weight
            rows[r, :m, 5:] = desc
        return rows

    def globals_for(inst, signal):
        noise = rng.normal(size=(len(inst), cfg.global_dim)) * (cfg.global_noise / np.sqrt(cfg.global_dim))
        return _unit(signal[:, None] * directions[inst] + noise).astype(np.float32)

    query_local = locals_for(q_inst, q_start)
    query_global = globals_for(q_inst, np.full(len(q_inst), cfg.global_signal))
    view_local = locals_for(np.asarray(view_inst), np.asarray(view_start))
    lookalike_local = locals_for(lookalike_inst, np.zeros(cfg.lookalikes, int), lookalike=True)

    view_start = np.asarray(view_start)
    view_signal = rng.uniform(cfg.hard_signal, cfg.global_signal, n_views)  # some views look less typical
    view_global = globals_for(np.asarray(view_inst), view_signal)
    lookalike_global = globals_for(lookalike_inst, np.full(cfg.lookalikes, cfg.hard_signal))

    position = np.argsort(perm)  # gallery row perm[k] is stored at position k
    gallery_local = np.concatenate([view_local, lookalike_local])[perm]
    gallery_global = np.concatenate([view_global, lookalike_global])[perm]

    entries, transitive = [], []
    view_inst = np.asarray(view_inst)
    for q in range(len(q_inst)):
        same = np.flatnonzero(view_inst == q_inst[q])
        overlap = cfg.window - np.abs(view_start[same] - q_start[q])
        overlap = np.clip(overlap, 0, None)
        easy = same[overlap * 2 >= cfg.window]
        linked = np.zeros(len(same), bool)
        for e in easy:  # a third of an easy view's window shared
            linked |= (cfg.window - np.abs(view_start[same] - view_start[e])) * 3 >= cfg.window
        rest = overlap * 2 < cfg.window
        hard_mask = rest & ((overlap > 0) | linked)
        hard = same[hard_mask]
        junk = same[rest & ~hard_mask]
        trans = same[hard_mask & (overlap == 0)]
        entries.append({
            "easy": sorted(int(position[v]) for v in easy),
            "hard": sorted(int(position[v]) for v in hard),
            "junk": sorted(int(position[v]) for v in junk),
            "bbx": [0.0, 0.0, 512.0, 384.0],  # the query crop: the whole image
        })
        transitive.append(sorted(int(position[v]) for v in trans))
    gnd = {
        "gnd": entries,
        "imlist": [f"gallery_{k:05d}" for k in range(ndb)],
        "qimlist": [f"query_{q:03d}" for q in range(len(q_inst))],
    }
    return SyntheticData(cfg, seed, query_local, gallery_local, query_global, gallery_global, gnd, transitive)


def image_features(rows: np.ndarray, globals_: np.ndarray):
    """ImageFeatures of official flat-layout rows [N, topk, 5 + D] and their globals."""
    from locore_plugin.features import ImageFeatures
    from locore_plugin.io.descriptors import META, official_columns

    columns = official_columns(rows[..., :META], rows[..., META:])
    return [ImageFeatures(global_desc=g, **{k: v[i] for k, v in columns.items()}) for i, g in enumerate(globals_)]


def write(root, seed: int = 0, size: str | SyntheticConfig = "small") -> Path:
    """Generate and write ``{root}/synthetic/`` in the official layout; returns that folder.

    Files: ``gnd_synthetic.pkl``, ``synth_{query,gallery}_{local.hdf5,global.pt}``,
    ``nn_global.pkl`` (exact global top-``nn_depth``) and ``synthetic.json`` (seed and config,
    written last: a folder with it is complete). An existing complete folder with the same seed
    and config is left as it is.
    """
    from locore_plugin.io.descriptors import build_shortlist, write_descriptors, write_nn

    cfg = _config(size)
    folder = Path(root) / DATASET
    marker = folder / f"{DATASET}.json"
    stamp = {"seed": int(seed), "config": asdict(cfg)}
    if marker.is_file() and json.loads(marker.read_text()) == stamp:
        return folder
    marker.unlink(missing_ok=True)
    data = generate(seed, cfg)
    write_descriptors(folder, DESCRIPTOR, "query", image_features(data.query_local, data.query_global), topk=cfg.topk)
    write_descriptors(folder, DESCRIPTOR, "gallery", image_features(data.gallery_local, data.gallery_global), topk=cfg.topk)
    sims, idx = build_shortlist(data.query_global, data.gallery_global, cfg.nn_depth, verbose=False)
    write_nn(folder / f"nn_{NN_NAME}.pkl", sims, idx)
    atomic_write(folder / f"gnd_{DATASET}.pkl", pickle.dumps(data.gnd, protocol=2))
    atomic_write(marker, json.dumps(stamp, indent=1).encode())
    return folder
