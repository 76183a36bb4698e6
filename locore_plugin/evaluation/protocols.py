"""Revisited Oxford/Paris evaluation protocols for re-ranking (LoCoRE supplementary B.1).

Scoring follows revisitop (:func:`locore_plugin.evaluation.metrics.revisited_gnd`). What differs between
the protocols, and between published evaluation codes, is which gallery images may enter the
shortlist that a re-ranker sees:

* ``medium``: positives = easy + hard, junk ignored when scoring.
* ``hard``: positives = hard; easy images stay in the database and take part in re-ranking (a
  list-wise method may use them as anchors) and count as junk when scoring. The convention of the
  SuperGlobal paper.
* ``hard*``: positives = hard; easy images leave the database before the shortlist is built,
  as the ``hard_split`` of the AMES and LoCoRE evaluation code does.

Junk handling before re-ranking is a separate, explicit choice:

* ``keep`` (revisitop / SuperGlobal): junk stays in the shortlist and is only ignored by the metric.
* ``remove`` (DELG / AMES / RRT / LoCoRE evaluation code): junk leaves the shortlist before the
  top-K is re-ranked.

Images that leave the shortlist are moved, in their order, behind every other gallery image.
They are always junk under the protocol's own scoring, so where they end up never changes a
score; it only frees their shortlist slots for the next images of the global ranking.

GLDv2 retrieval and the category-level benchmarks (SOP, In-shop, CUB-200) have protocols of
their own: GLDv2's public / private / combined mAP, and ``r@K`` (Recall@K) / ``map@r`` (mAP@R)
on the final ranking of the category datasets; nothing leaves their shortlists.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Sequence

import numpy as np

from locore_plugin.data.categories import CATEGORY_DATASETS

from .metrics import revisited_gnd

JUNK_MODES = ("keep", "remove")


GLDV2 = "gldv2"  # the scoring of the GLDv2 retrieval protocols
GLDV2_PRIVATE_QUERIES = 750  # the last 750 test queries form the private split (AMES / ELViS utils/revisited.py)
GLDV2_MAP_DEPTH = 100  # their map_k: the first 100 of each ranking are scored
CATEGORY = "category"  # the scoring of the category-level protocols (labels, not gnd lists)


@dataclass(frozen=True)
class Protocol:
    name: str  # "medium", "hard", "hard*"; GLDv2: "public", "private", "combined"; "r@K", "map@r"
    label: str  # table column header
    scoring: str  # the revisitop protocol that scores it (metrics.revisited_gnd), GLDV2 or CATEGORY
    easy_leaves: bool  # easy images leave the database before the shortlist is built
    k: int = 0  # Recall@k for the category "r@K" protocols; 0 otherwise

    def removed_keys(self, junk: str) -> tuple[str, ...]:
        """The ground-truth lists whose images leave the shortlist under junk mode ``junk``.

        Protocols with equal keys see identical shortlists, so one re-ranking serves them all
        (Medium and Hard always do). GLDv2 and the category datasets have no junk: nothing leaves
        (as in the official code)."""
        check_junk_mode(junk)
        if self.scoring in (GLDV2, CATEGORY):
            return ()
        return (("junk",) if junk == "remove" else ()) + (("easy",) if self.easy_leaves else ())

    def scoring_gnd(self, gnd: Sequence[Mapping]) -> list[dict[str, np.ndarray]]:
        """Per-query ``ok``/``junk`` arrays for :func:`locore_plugin.evaluation.metrics.compute_map`."""
        if self.scoring == GLDV2:
            missing = [q for q, entry in enumerate(gnd) if "ok" not in entry]
            if missing:
                raise KeyError(f"GLDv2 gnd entries {missing[:5]} lack 'ok' (has {sorted(gnd[missing[0]])})")
            return [{"ok": np.asarray(e["ok"], np.int64).ravel(), "junk": np.asarray(e.get("junk", ()), np.int64).ravel()}
                    for e in gnd]
        return revisited_gnd(gnd, self.scoring)


MEDIUM = Protocol("medium", "Medium", "medium", easy_leaves=False)
HARD = Protocol("hard", "Hard", "hard", easy_leaves=False)
HARD_STAR = Protocol("hard*", "Hard*", "hard", easy_leaves=True)
# GLDv2 retrieval: rectangular AP on the first 100, over the public queries (all but the last 750),
# the private ones (the last 750) or all of them.
PUBLIC = Protocol("public", "Public", GLDV2, easy_leaves=False)
PRIVATE = Protocol("private", "Private", GLDV2, easy_leaves=False)
COMBINED = Protocol("combined", "Combined", GLDV2, easy_leaves=False)
MAP_AT_R = Protocol("map@r", "mAP@R", CATEGORY, easy_leaves=False)
PROTOCOLS = {p.name: p for p in (MEDIUM, HARD, HARD_STAR, PUBLIC, PRIVATE, COMBINED, MAP_AT_R)}
REVISITED = ("medium", "hard", "hard*")
# Datasets with protocols of their own (the official GLDv2 layout): the `protocols` option of an
# evaluation chooses among the revisited ones for the revisited datasets, and among r@K / map@r
# for the category ones.
DATASET_PROTOCOLS = {"gldv2-test": ("public", "private", "combined"), "gldv2-val": ("public",)}


def recall_protocol(k: int) -> Protocol:
    """Recall@k of a category benchmark (the share of queries with a same-label image in the top k)."""
    if int(k) < 1:
        raise ValueError(f"Recall@k needs k >= 1, got {k}")
    return Protocol(f"r@{int(k)}", f"R@{int(k)}", CATEGORY, easy_leaves=False, k=int(k))


def dataset_protocols(dataset: str, requested) -> list["Protocol"]:
    """The protocols ``dataset`` is scored under: GLDv2's own; for a category dataset the requested
    r@K / map@r, or its benchmark's R@K and mAP@R when none is requested; else the requested
    revisited ones (all three when none is)."""
    if dataset in DATASET_PROTOCOLS:
        return parse_protocols(DATASET_PROTOCOLS[dataset])
    requested = parse_protocols(requested)
    if dataset in CATEGORY_DATASETS:
        chosen = [p for p in requested if p.scoring == CATEGORY]
        return chosen or [*(recall_protocol(k) for k in CATEGORY_DATASETS[dataset].recall_ks), MAP_AT_R]
    return [p for p in requested if p.scoring not in (GLDV2, CATEGORY)] or parse_protocols(REVISITED)


def query_rows(protocol: "Protocol", num_queries: int, dataset: str) -> np.ndarray:
    """The queries a protocol averages over: GLDv2 test splits its queries into public (all but the
    last 750) and private; ``gldv2-val`` holds the public queries only."""
    if protocol.scoring != GLDV2 or protocol.name == "combined" or dataset == "gldv2-val":
        return np.arange(num_queries)
    if num_queries <= GLDV2_PRIVATE_QUERIES:
        raise ValueError(f"{dataset}: {num_queries} queries, but the GLDv2 private split alone is the last {GLDV2_PRIVATE_QUERIES}")
    split = num_queries - GLDV2_PRIVATE_QUERIES
    return np.arange(split) if protocol.name == "public" else np.arange(split, num_queries)
_ALIASES = {"m": "medium", "h": "hard", "h*": "hard*", "hardstar": "hard*", "hard-star": "hard*"}


def get_protocol(name: str) -> Protocol:
    """``medium``/``hard``/``hard*`` (or ``M``, ``H``, ``H*``, ``hardstar``), GLDv2's, ``r@K``, ``map@r``."""
    key = str(name).strip().lower()
    key = _ALIASES.get(key, key)
    if key.startswith("r@") and key[2:].isdigit():
        return recall_protocol(int(key[2:]))
    if key not in PROTOCOLS:
        raise ValueError(f"unknown protocol {name!r}; expected one of {list(REVISITED)} (or M, H, H*), GLDv2's "
                         "public / private / combined, or a category benchmark's r@K / map@r")
    return PROTOCOLS[key]


def measure_name(protocol: str) -> str:
    """What a protocol's column holds: mAP (revisited, GLDv2), or the category measure (R@K, mAP@R)."""
    p = get_protocol(protocol)
    return p.label if p.scoring == CATEGORY else "mAP"


def parse_protocols(names) -> list[Protocol]:
    """A list of protocols from names or one comma-separated string, without duplicates, in order."""
    if isinstance(names, str):
        names = names.split(",")
    out = []
    for name in names:
        p = get_protocol(name)
        if p not in out:
            out.append(p)
    if not out:
        raise ValueError("no protocol given")
    return out


def check_junk_mode(junk: str) -> str:
    if junk not in JUNK_MODES:
        raise ValueError(f"unknown junk mode {junk!r}; expected one of {JUNK_MODES}")
    return junk


def prepare_ranking(ranking: np.ndarray, gnd: Sequence[Mapping], protocol: Protocol, junk: str):
    """Apply the protocol's shortlist rule to global rankings.

    ``ranking`` [nq, n]: each row one query's gallery indices, best first. Returns ``order``
    [nq, n], the positions that reorder each row (``np.take_along_axis(ranking, order, 1)``, and
    any array aligned with ``ranking`` likewise) so that images leaving the shortlist come, in
    their order, behind the others, and the number of images per query that may still be
    shortlisted.
    """
    ranking = np.asarray(ranking)
    if ranking.ndim != 2 or ranking.shape[0] != len(gnd):
        raise ValueError(f"ranking must have shape [{len(gnd)} queries, n], got {ranking.shape}")
    keys = protocol.removed_keys(junk)
    n = ranking.shape[1]
    order = np.broadcast_to(np.arange(n), ranking.shape).copy()
    kept = np.full(len(gnd), n, dtype=np.int64)
    if not keys:
        return order, kept
    for q, entry in enumerate(gnd):
        missing = [k for k in keys if k not in entry]
        if missing:
            raise KeyError(f"gnd entry {q} lacks {missing}, which protocol {protocol.name!r} with junk={junk!r} needs")
        removed = np.concatenate([np.asarray(entry[k], dtype=np.int64).ravel() for k in keys])
        leaves = np.isin(ranking[q], removed)
        kept[q] = n - int(leaves.sum())
        order[q] = np.argsort(leaves, kind="stable")
    return order, kept
