"""What an evaluation runs on: its configuration (methods x datasets x protocols), the datasets
in the official revisited layout, and the global ranking every re-ranker starts from."""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from locore_plugin.data.categories import CATEGORY_DATASETS

from .protocols import DATASET_PROTOCOLS, GLDV2, REVISITED, check_junk_mode, dataset_protocols, parse_protocols
from .ranking import RankingError, RankingTail, global_ranking

IMAGE_CACHE_GB = 32.0  # default bound of the features cached from images (ROxford's 4,993 float16 CVNet maps: ~30 GB)

GLOBAL_ROW = "global"
KAPPAS = (1, 5, 10)
SHORT_NAMES = {"roxford5k": "ROxf", "rparis6k": "RPar", "roxford5k+1m": "ROxf+1M", "rparis6k+1m": "RPar+1M",
               "synthetic": "Synth", "gldv2-test": "GLDv2", "gldv2-val": "GLDv2-val", "sop": "SOP",
               "inshop": "In-shop", "cub200": "CUB", "synthetic-sop": "Synth-SOP"}


class EvaluationError(RuntimeError):
    """A problem the user must fix (missing data, bad option): printed without a traceback."""


@dataclass
class MethodSpec:
    """One table row: a registered name (or chain) with its factory options.

    ``options`` go to every stage; ``stage_options`` ({stage: {...}}) to one stage of a chain.
    ``label`` names the row (default: ``name``), so one method can appear with two checkpoints.
    """

    name: str
    options: dict = field(default_factory=dict)
    stage_options: dict = field(default_factory=dict)
    label: str = ""

    @property
    def row(self) -> str:
        return self.label or self.name


@dataclass
class EvalConfig:
    datasets: list
    methods: list  # MethodSpec; the global-only row is always added first
    data_root: Optional[str] = None  # default: $LOCORE_DATA
    out: str = "eval_results"
    protocols: list = field(default_factory=lambda: ["medium", "hard", "hard*"])
    junk: str = "remove"
    top_k: int = 100
    metric: str = "standard"  # or "truncated" (AMES/LoCoRE top-K variant, on the first `depth` items)
    depth: Optional[int] = None  # list length for metric="truncated" (default: the nn file's K, else 1600)
    desc: str = "dinov2"
    nn: Optional[str] = None  # nn_{nn}.pkl shortlist; None: exact global ranking
    device: Optional[str] = None
    dtype: Optional[str] = None
    batch_size: Optional[int] = None
    plots: bool = True
    baseline: str = GLOBAL_ROW  # the row every other row is tested against (paired, per query)
    images: Optional[str] = None  # image folder for methods that read images ({dataset} replaced); default {root}/{dataset}/jpg
    image_cache_gb: float = IMAGE_CACHE_GB  # the most the features extracted from those images take on disk

    def validate(self) -> None:
        if not self.datasets:
            raise EvaluationError("no dataset given")
        check_junk_mode(self.junk)
        try:
            outside = [p.name for p in parse_protocols(self.protocols) if p.scoring == GLDV2]
        except ValueError as error:
            raise EvaluationError(str(error)) from None
        if outside:
            raise EvaluationError(f"protocols {outside} belong to GLDv2 datasets, which are scored under their own; "
                                  f"`protocols` chooses among {list(REVISITED)} for the revisited datasets and "
                                  "r@K / map@r for the category ones")
        if self.metric not in ("standard", "truncated"):
            raise EvaluationError(f"metric must be 'standard' or 'truncated', got {self.metric!r}")
        if self.top_k < 1:
            raise EvaluationError(f"top_k must be >= 1, got {self.top_k}")
        rows = [m.row for m in self.methods]
        if GLOBAL_ROW in rows or len(set(rows)) != len(rows):
            raise EvaluationError(f"method rows must be unique and not {GLOBAL_ROW!r}: {rows}")
        if self.baseline not in (GLOBAL_ROW, *rows):
            raise EvaluationError(f"baseline {self.baseline!r} is not a row of this evaluation: {[GLOBAL_ROW, *rows]}")


def resolve_data_root(data_root: Optional[str]) -> Path:
    """The dataset root: the argument, else ``$LOCORE_DATA``; a clear error when neither is set."""
    from locore_plugin.io.descriptors import data_root as find_root

    try:
        return find_root(data_root or None)
    except FileNotFoundError as error:
        raise EvaluationError(f"{error} (set the LOCORE_DATA environment variable or pass --data-root)") from None


@dataclass
class EvalData:
    """What the runner needs of one dataset.

    ``gnd``: the pickle's per-query list (``easy``/``hard``/``junk``), or a :class:`CategoryTruth`
    for the category benchmarks; ``queries``: one ImageFeatures per query (a sequence, read lazily
    for the category benchmarks); ``gallery(ids)``: the ImageFeatures of gallery images ``ids``,
    read lazily; ``ranking`` [nq, n]: the global ranking (the top-K shortlist for the truncated
    metric, GLDv2 and the category benchmarks) and ``scores`` [nq, n] the global similarities
    aligned with it, which the re-rankers receive. ``tail``: for the standard metric, where the
    images the ground truth names stand in the full global ranking, of which ``ranking`` is then
    the head (deep enough for every protocol's re-ranking); None when ``ranking`` is what is scored.
    """

    name: str
    gnd: list
    queries: list
    gallery: object
    ranking: np.ndarray
    scores: np.ndarray
    tail: Optional[RankingTail] = None


def load_dataset(root, dataset: str, desc: str, metric: str = "standard", nn: Optional[str] = None,
                 depth: Optional[int] = None, cache_dir=None, num_locals: Optional[int] = None,
                 with_local: bool = True, protocols=REVISITED, top_k: int = 100) -> EvalData:
    """Open ``{root}/{dataset}`` (``name+1m`` adds the revisitop1m distractors) in the official layout.

    ``metric="standard"`` ranks the whole gallery (exact inner products; a published ``nn_{nn}.pkl``
    shortlist, if named, comes first), held as its head and the positions of the ground truth's
    images (:func:`~locore_plugin.evaluation.ranking.global_ranking`, block by block);
    ``"truncated"`` uses the top-``depth`` shortlist itself
    (``nn_{nn}.pkl``, or exact faiss search, cached), as the AMES/LoCoRE code does, and so do the
    GLDv2 datasets always (their metric reads the first 100). ``with_local=False`` opens the
    global descriptors only (no method of the run reads locals, so the local file may be absent).
    A category benchmark (SOP, In-shop, CUB-200) ranks its global top-``depth`` shortlist (default:
    the longest of ``top_k`` and its ``protocols``' R@K), see :func:`load_category_dataset`.
    """
    from locore_plugin.io.descriptors import open_revisited

    if dataset in CATEGORY_DATASETS:
        if depth is None:
            depth = max(p.k for p in dataset_protocols(dataset, protocols))
        return load_category_dataset(root, dataset, desc, depth, top_k, cache_dir, num_locals, with_local)

    base, plus1m = (dataset[: -len("+1m")], True) if dataset.endswith("+1m") else (dataset, False)
    try:
        data = open_revisited(base, desc, root, plus1m=plus1m, num_locals=num_locals, with_local=with_local)
    except FileNotFoundError as error:
        raise EvaluationError(str(error)) from None
    if metric == "truncated" or base in DATASET_PROTOCOLS:  # GLDv2 (761,757 index images): the shortlist only
        nn_scores, nn_idx = data.shortlist(depth, nn, cache_dir=cache_dir)
        ranking, scores = nn_idx, nn_scores
        tail = None
    else:
        # Deep enough that every protocol re-ranks top_k images after its removals (easy, junk).
        removable = max((sum(len(entry.get(k, ())) for k in ("easy", "junk")) for entry in data.gnd), default=0)
        named = [np.concatenate([np.asarray(entry.get(k, ()), np.int64).ravel() for k in ("easy", "hard", "junk")])
                 for entry in data.gnd]
        try:
            ranking, scores, tail = global_ranking(data.queries.globals(np.arange(len(data.queries))), data.gallery,
                                                   int(top_k) + removable, named, data.shortlist(nn=nn) if nn else None)
        except RankingError as error:
            raise EvaluationError(f"{dataset}: {error}") from None
    return EvalData(
        dataset, data.gnd, data.queries.features(np.arange(len(data.queries))), data.gallery.features, ranking, scores,
        tail,
    )


@dataclass(frozen=True)
class CategoryTruth:
    """The ground truth of a category benchmark: one label per query and per gallery image, and
    whether the queries are the gallery images themselves (each left out of its own ranking)."""

    query_labels: np.ndarray
    gallery_labels: np.ndarray
    exclude_self: bool

    def __len__(self) -> int:
        return len(self.query_labels)


def load_category_dataset(root, dataset: str, desc: str, depth: int, top_k: int = 100, cache_dir=None,
                          num_locals: Optional[int] = None, with_local: bool = True) -> EvalData:
    """Open a category benchmark (``CATEGORY_DATASETS``: its split files and ``{desc}_{split}_*``
    descriptor files in ``{root}/{dataset}``) with its global shortlist: ``depth`` (the deepest
    Recall@K) and the largest R of mAP@R must fit in what each query ranks, ``top_k`` (re-ranked)
    is added where it fits; built block by block (see ``build_shortlist``) and cached."""
    from locore_plugin.evaluation.metrics import relevant_counts
    from locore_plugin.io.descriptors import DescriptorSet, cached_shortlist, descriptor_paths

    bench = CATEGORY_DATASETS[dataset]
    folder = Path(root) / dataset
    try:
        splits = bench.read(folder)
    except (FileNotFoundError, ValueError) as error:
        raise EvaluationError(f"{dataset} ({bench.name} layout): {error}") from None

    def descriptors(split: str):
        local, glob = descriptor_paths(folder, desc, split)
        missing = [str(path) for path in ((local, glob) if with_local else (glob,)) if not path.is_file()]
        if missing:
            raise EvaluationError(f"{dataset}: {', '.join(missing)} missing; write them with `locore-plugin extract "
                                  f"EXTRACTOR --benchmark {bench.name} --images {folder} --out {folder} --desc {desc}`")
        try:
            return DescriptorSet([(local if with_local else None, glob)], [len(splits[split])], num_locals)
        except ValueError as error:
            raise EvaluationError(f"{dataset}: {error} (the {split} split of {bench.marker} lists {len(splits[split])})") from None

    gallery = descriptors(bench.gallery_split)
    queries = gallery if bench.queries_are_gallery else descriptors(bench.query_split)
    truth = CategoryTruth(splits[bench.query_split].labels, splits[bench.gallery_split].labels, bench.queries_are_gallery)
    relevant = relevant_counts(truth.query_labels, truth.gallery_labels, exclude_self=truth.exclude_self)
    if (relevant < 1).any():
        raise EvaluationError(f"{dataset}: queries {np.flatnonzero(relevant < 1)[:10].tolist()} have no same-label "
                              "gallery image (mAP@R and Recall@K are undefined for them)")
    depth = max(int(depth), int(relevant.max()))
    ranked = len(gallery) - int(truth.exclude_self)
    if depth > ranked:
        raise EvaluationError(f"{dataset}: a ranking of depth {depth} (Recall@K, R of mAP@R) asked, but each query ranks "
                              f"{ranked} images; choose smaller R@K with --protocols (e.g. r@1,r@10,map@r)")
    depth = min(max(depth, int(top_k)), ranked)
    cache = Path(cache_dir or folder) / f"nn_{desc}_{bench.query_split}_exact.npz"
    sims, idx = cached_shortlist(cache, queries, gallery, depth, exclude_self=truth.exclude_self)
    idx = idx.astype(np.int32 if len(gallery) < 2**31 else np.int64)  # SOP: 60,502 x 1,000 ranks in 242 MB
    return EvalData(dataset, truth, queries, gallery.features, idx, sims)
