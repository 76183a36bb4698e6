"""The evaluation runner: every (method, dataset) result is cached as one JSON file, written
atomically and keyed by everything that changes it, so an interrupted run resumes where it
stopped and a finished one re-prints its table at once."""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Optional, Sequence

from locore_plugin.io.atomic import atomic_write, set_aside
from locore_plugin.progress import progress

from .datasets import GLOBAL_ROW, KAPPAS, EvalConfig, EvaluationError, MethodSpec, load_dataset, resolve_data_root
from .images import IMAGE_CACHE_SIZE, ImageFeatureSource, image_folder, needs_images
from .protocols import dataset_protocols, parse_protocols
from .report import _slug, compare_rows, write_outputs
from .scoring import DatasetEvaluation
from .sharding import FinishedQueries, Shard

# Bumped when what a cached result holds changes (2: per-query shortlist positives; 3: value /
# per_query, the keys of every measure), so older
# entries are recomputed rather than read without it.
RESULT_FORMAT = 3


def jsonable(value):
    return json.loads(json.dumps(value, default=str))


def path_stamp(value):
    """Options that name existing files or folders (checkpoints) enter the cache key with their
    sizes and modification times, so a retrained checkpoint is re-evaluated."""
    if isinstance(value, dict):
        return {k: path_stamp(v) for k, v in sorted(value.items())}
    if isinstance(value, str) and value and os.path.exists(value):
        path = Path(value)
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
        return [value, [(str(p.relative_to(path.parent)), p.stat().st_size, p.stat().st_mtime_ns) for p in files]]
    return value


def dataset_fingerprint(root: Path, dataset: str, desc: str) -> str:
    """Sizes and modification times of the dataset's files: a changed file means a new cache entry."""
    base = dataset[: -len("+1m")] if dataset.endswith("+1m") else dataset
    files = [p for p in (root / base).glob("*") if p.is_file() and not p.name.startswith(".")]
    if dataset.endswith("+1m"):
        files += [p for p in (root / "revisitop1m").glob(f"{desc}_*") if p.is_file()]
        files += [p for p in (root / dataset).glob("nn_*.pkl") if p.is_file()]
    stamp = [(str(p.relative_to(root)), p.stat().st_size, p.stat().st_mtime_ns) for p in sorted(files)]
    return hashlib.sha256(repr(stamp).encode()).hexdigest()[:16]


class ResultCache:
    """One JSON file per (method, dataset, settings): written atomically, read back on resume."""

    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, key: dict) -> Path:
        digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
        return self.folder / _slug(key["dataset"]) / f"{_slug(key['row'])}-{digest}.json"

    def get(self, key: dict) -> Optional[dict]:
        path = self.path(key)
        if not path.is_file():
            return None
        try:
            entry = json.loads(path.read_text())
            return entry["scores"] if entry.get("key") == jsonable(key) else None
        except (ValueError, KeyError, TypeError, AttributeError) as error:  # truncated or foreign JSON
            set_aside(path, error)
            return None

    def put(self, key: dict, scores: dict) -> None:
        atomic_write(self.path(key), json.dumps({"key": key, "scores": scores}))


def _settings(config: EvalConfig) -> dict:
    return {
        "protocols": [p.name for p in parse_protocols(config.protocols)], "junk": config.junk,
        "top_k": config.top_k, "metric": config.metric, "depth": config.depth, "desc": config.desc,
        "nn": config.nn, "kappas": list(KAPPAS),
    }


def run(config: EvalConfig, log=print) -> dict:
    """Evaluate every method on every dataset (cached), write the tables and plots, return the results.

    Returns ``{"settings": ..., "results": {row: {dataset: {protocol: {value, per_query,
    mP@k (revisited), shortlist_positives}}}}, "comparisons": {row: {dataset: {protocol: paired
    test vs the baseline}}}}``: ``value`` is the column's measure (mAP for the revisited and GLDv2
    protocols, R@K or mAP@R for the category ones), ``per_query`` its per-query terms (AP, hit, AP@R).
    """
    from locore_plugin.registry import create_reranker, is_reranker_name

    config.validate()
    shard = Shard.from_environment()
    if not shard.is_main:  # one rank speaks and writes
        log = _silent
    for m in config.methods:
        if not is_reranker_name(m.name):
            _create(create_reranker, m, {})  # raises before any work, naming close matches
        if needs_images(m.name) and "+" in m.name:
            raise EvaluationError(f"{m.row}: chains with a method that reads images (dense maps) are not supported; "
                                  "evaluate it on its own")
        reason = untrained_reason(m.name, weights_chosen(m))
        if reason is not None:  # never report random weights as if they were a method's numbers
            raise EvaluationError(f"{m.row}: {reason}; pass --checkpoint NAME=PATH (or --option "
                                  "NAME.pretrained=false to measure random weights on purpose)")
    root = resolve_data_root(config.data_root)
    out = Path(config.out)
    cache = ResultCache(out / "cache")
    settings = _settings(config)
    rows = [MethodSpec(GLOBAL_ROW)] + list(config.methods)
    common = {k: v for k, v in (("device", config.device), ("dtype", config.dtype), ("batch_size", config.batch_size))
              if v is not None}
    if shard.world_size > 1 and config.device in (None, "auto", "cuda"):
        import torch

        if torch.cuda.is_available():  # each rank re-ranks on its own GPU
            common["device"] = f"cuda:{shard.local_rank}"
    built: dict[str, object] = {}
    results: dict[str, dict] = {m.row: {} for m in rows}
    fresh: set[tuple[str, str]] = set()  # (row, dataset) computed in this run
    for dataset in config.datasets:
        fingerprint = dataset_fingerprint(root, dataset, config.desc)
        folders = {m.row: image_folder(root, dataset, config.images) for m in config.methods if needs_images(m.name)}
        keys = {
            m.row: jsonable({
                "format": RESULT_FORMAT, "row": m.row, "method": m.name, "options": path_stamp(m.options),
                **({"images": path_stamp(str(folders[m.row]))} if m.row in folders else {}),
                "stage_options": path_stamp(m.stage_options), "common": common if m.name != GLOBAL_ROW else {},
                "dataset": dataset, "fingerprint": fingerprint,
                **{k: v for k, v in settings.items() if m.name != GLOBAL_ROW or k != "top_k"},  # nothing re-ranked
            })
            for m in rows
        }
        todo = []
        for m in rows:
            cached = cache.get(keys[m.row])
            if cached is not None:
                results[m.row][dataset] = cached
            else:
                todo.append(m)
        shard.barrier()  # every rank has read the cache before rank 0 writes to it
        if not todo:
            log(f"{dataset}: every row cached")
            continue
        log(f"{dataset}: loading (rows to compute: {', '.join(m.row for m in todo)})")
        with_local = any(reads_descriptor_locals(m.name) for m in todo if m.name != GLOBAL_ROW)
        data = load_dataset(root, dataset, config.desc, config.metric, config.nn, config.depth, cache_dir=out / "cache",
                            with_local=with_local, protocols=config.protocols, top_k=config.top_k)
        evaluation = DatasetEvaluation(data, config.protocols, config.junk, config.metric)
        for m in progress(todo, desc=dataset, unit="method"):
            if m.name == GLOBAL_ROW:
                scores = evaluation.run(None)
            else:
                if m.row not in built:
                    built[m.row] = _create(create_reranker, m, common)
                features = None
                if m.row in folders:
                    features = ImageFeatureSource(method_extractor(built[m.row], m, out, config.image_cache_gb), folders[m.row], root, dataset)
                stem = cache.path(keys[m.row]).with_suffix("")  # its finished queries, kept for a resume
                scores = evaluation.run(built[m.row], config.top_k, config.batch_size or 8, m.row, features, shard,
                                        stem.with_name(stem.name + ".finished"))
            if shard.is_main:
                cache.put(keys[m.row], scores)
            shard.barrier()
            if shard.is_main and m.name != GLOBAL_ROW:
                for rule in range(len(evaluation.groups)):
                    FinishedQueries(stem.with_name(f"{stem.name}.finished-{rule}")).clear()  # the result holds them now
            results[m.row][dataset] = scores
            fresh.add((m.row, dataset))
    columns = {d: [p.name for p in dataset_protocols(d, config.protocols)] for d in config.datasets}
    report = {"settings": {**settings, "datasets": list(config.datasets), "columns": columns, "baseline": config.baseline},
              "results": results}
    report["comparisons"] = compare_rows(report, config.baseline)
    report["peak_memory_mb"] = peak_memory_mb()
    log(f"peak memory: {report['peak_memory_mb']:,.0f} MB (resident, this process{', rank 0' if shard.world_size > 1 else ''})")
    if shard.is_main:
        write_outputs(report, out, plots=config.plots, fresh=fresh)
    shard.barrier()
    return report


def peak_memory_mb() -> float:
    """The largest resident set of this process so far (what a run needs of the machine)."""
    import resource
    import sys

    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10  # bytes on macOS, KiB on Linux


def _silent(*args, **kwargs) -> None:
    """The log of ranks other than 0."""


def _create(create_reranker, spec: MethodSpec, common: dict):
    try:
        if spec.stage_options:
            return create_reranker(spec.name, stage_options=spec.stage_options, **common, **spec.options)
        return create_reranker(spec.name, **common, **spec.options)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        raise EvaluationError(f"cannot build re-ranker {spec.row!r} ({spec.name}): {error}") from error


def reads_descriptor_locals(name: str) -> bool:
    """Whether a method (or a stage of a chain) reads the local descriptor files: it registers
    ``local`` among its inputs, or registers no inputs at all (then it may read anything)."""
    from locore_plugin.registry import registered_rerankers

    entries = registered_rerankers()
    return any(not entries[part].metadata.inputs or "local" in entries[part].metadata.inputs for part in name.split("+"))


def method_extractor(reranker, spec: MethodSpec, out: Path, cache_gb: float):
    """The extractor a method that reads images registers, with what it needs from the re-ranker
    (its checkpoint) and the on-disk feature cache of the run (dense maps in float16, at most
    ``cache_gb`` GiB, least recently used deleted first)."""
    from locore_plugin.extractors import create_extractor
    from locore_plugin.registry import registered_rerankers

    name = registered_rerankers()[spec.name].metadata.extractor
    if name is None:
        raise EvaluationError(f"{spec.row}: {spec.name} reads images but registers no extractor")
    return create_extractor(name, cache_dir=out / "cache" / "features", cache_size=IMAGE_CACHE_SIZE, dense_dtype="float16",
                            cache_disk_gb=cache_gb, **reranker.extractor_options())


def weights_chosen(spec: MethodSpec) -> list[str]:
    """``NAME=`` for each stage whose weights the user chose: a checkpoint, or ``pretrained=False`` on purpose."""
    chosen = []
    for part in spec.name.split("+"):
        options = {**spec.options, **spec.stage_options.get(part, {})}
        if options.get("checkpoint") is not None or options.get("pretrained") is False:
            chosen.append(f"{part}=")
    return chosen


def untrained_reason(name: str, checkpoints: Sequence[str] = ()) -> Optional[str]:
    """Why a registered name (or chain) cannot be reported without trained weights, or None.

    A stage is learned when it registers ``learned=True`` (the registry metadata every learned
    adapter declares) or, for a plugin that does not say, when it builds a
    :class:`~locore_plugin.interface.TrainableReranker` (with ``pretrained=False``, which every
    factory accepts); it counts as trained only when ``checkpoints`` (``NAME=PATH``) names it.
    """
    from locore_plugin.interface import TrainableReranker
    from locore_plugin.registry import create_reranker, registered_rerankers

    entries = registered_rerankers()
    given = {c.partition("=")[0] for c in checkpoints}
    for part in name.split("+"):
        if part in given:
            continue
        learned = entries[part].metadata.learned
        if learned is None:
            learned = isinstance(create_reranker(part, pretrained=False), TrainableReranker)
        if learned:
            return f"{part} is a learned re-ranker and no trained checkpoint was given"
    return None
