"""Fusion tuning as the LoCoRE and AMES authors select their ensemble: score each query's head once,
keep the raw logits, and search ``fusion = (weight, temperature)`` of
:func:`~locore_plugin.fusion.fuse_scores` over a grid on them (officially ``linspace(0, 1, 11)``
for both, one pass over the top 100, on the GLDv2 public validation split), then evaluate the
chosen pair on the benchmarks (``locore-plugin eval --fusion-from tune.json``).

Any re-ranker with a fusion step takes part through the registry: it implements
:meth:`~locore_plugin.interface.ImageReranker.head_logits`. The logits are cached on disk (atomically,
keyed by everything that changes them), so a rerun with another grid or metric never re-runs the model.
"""
from __future__ import annotations

import hashlib
import io
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from locore_plugin.fusion import fuse_scores
from locore_plugin.interface import ImageReranker, ranked
from locore_plugin.io.atomic import atomic_write
from locore_plugin.progress import progress

from .datasets import IMAGE_CACHE_GB, EvaluationError, MethodSpec, load_dataset, resolve_data_root
from .images import ImageFeatureSource, image_folder, needs_images
from .protocols import REVISITED, dataset_protocols, get_protocol, measure_name
from .runner import dataset_fingerprint, jsonable, method_extractor, path_stamp, reads_descriptor_locals
from .scoring import DatasetEvaluation

OFFICIAL_GRID = tuple(round(v, 10) for v in np.linspace(0.0, 1.0, 11))  # eval_revisitop.py / AMES: alpha and T


@dataclass
class TuneConfig:
    method: MethodSpec
    dataset: str
    data_root: Optional[str] = None
    out: str = "tune_results"
    protocol: Optional[str] = None  # default: the dataset's first protocol (medium; GLDv2: public)
    junk: str = "remove"
    top_k: int = 100
    metric: str = "standard"
    depth: Optional[int] = None
    desc: str = "dinov2"
    nn: Optional[str] = None
    weights: tuple = OFFICIAL_GRID
    temperatures: tuple = OFFICIAL_GRID
    batch_size: int = 8
    common: dict = field(default_factory=dict)  # device / dtype / batch_size for the re-ranker
    images: Optional[str] = None  # image folder for methods that read images (see EvalConfig.images)
    image_cache_gb: float = IMAGE_CACHE_GB  # see EvalConfig.image_cache_gb


def grid_maps(evaluation: DatasetEvaluation, protocol: str, logits: list, weights, temperatures) -> np.ndarray:
    """mAP (fraction) of every (weight, temperature): each query's head ranked by
    ``fuse_scores(global, logits, weight, temperature)``, exactly as ``rerank_many`` would with that fusion."""
    protocol = get_protocol(protocol)
    members, ranking, scores, kept = _group(evaluation, protocol)
    maps = np.empty((len(weights), len(temperatures)))
    for i, w in enumerate(weights):
        for j, t in enumerate(temperatures):
            final = ranking.copy()
            for q, logit in enumerate(logits):
                d = len(logit)
                final[q, :d] = ranking[q, :d][ranked(fuse_scores(scores[q, :d], logit, float(w), float(t))).order]
            maps[i, j] = evaluation.score(final, protocol)["value"]
    return maps


def head_logits(reranker, evaluation: DatasetEvaluation, protocol: str, top_k: int, batch_size: int = 8,
                features=None) -> list:
    """The raw logits of every query's re-ranked head (the first ``min(top_k, kept)`` of its
    shortlist under ``protocol``'s rule), one call per ``batch_size`` queries; ``features`` as in
    :meth:`DatasetEvaluation.run` (default: the descriptor files)."""
    _, ranking, _, kept = _group(evaluation, get_protocol(protocol))
    evaluation.check_depth(top_k)
    data = features or evaluation.data
    nq, out = len(data.queries), []
    for start in progress(range(0, nq, batch_size), desc=f"logits of {reranker.name or type(reranker).__name__}", unit="batch"):
        batch = range(start, min(start + batch_size, nq))
        heads = [data.gallery(ranking[q, : min(top_k, int(kept[q]))]) for q in batch]
        for q, logit, head in zip(batch, reranker.head_logits([data.queries[q] for q in batch], heads), heads):
            logit = np.asarray(logit, np.float32)
            if logit.shape != (len(head),) or not np.isfinite(logit).all():
                raise EvaluationError(f"{reranker!r}: head_logits gave shape {logit.shape} (finite: {np.isfinite(logit).all()}) "
                                      f"for a head of {len(head)}")
            out.append(logit)
    return out


def _group(evaluation: DatasetEvaluation, protocol):
    for members, ranking, scores, kept in evaluation.groups:
        if protocol.name in (p.name for p in members):
            return members, ranking, scores, kept
    raise EvaluationError(f"protocol {protocol.name!r} was not prepared for this evaluation")


def tune(config: TuneConfig, log=print) -> dict:
    """Tune ``config.method``'s fusion on ``config.dataset``; writes ``tune.json`` (the grid, the best
    pair, the settings), ``tune.md`` and ``tune.png`` into ``config.out`` and returns the JSON's content."""
    from locore_plugin.registry import create_reranker

    if config.top_k < 1 or not config.weights or not config.temperatures:
        raise EvaluationError("tune needs top_k >= 1 and non-empty weight and temperature grids")
    if any(not 0.0 <= float(w) <= 1.0 for w in config.weights):
        raise EvaluationError(f"fusion weights must lie in [0, 1], got {list(config.weights)}")
    spec = config.method
    try:  # the dataset's protocols, the requested one among them if it is of the dataset's kind
        allowed = [p.name for p in dataset_protocols(config.dataset, [config.protocol] if config.protocol else REVISITED)]
        protocol = get_protocol(config.protocol or allowed[0]).name
    except ValueError as error:
        raise EvaluationError(str(error)) from None
    if protocol not in allowed:
        raise EvaluationError(f"{config.dataset} is scored under {list(allowed)}, not {protocol!r}")
    try:
        reranker = create_reranker(spec.name, **config.common, **spec.options)
    except (KeyError, TypeError, ValueError, FileNotFoundError) as error:
        raise EvaluationError(f"cannot build re-ranker {spec.name!r}: {error}") from error
    if type(reranker).head_logits is ImageReranker.head_logits:
        raise EvaluationError(f"{spec.name} has no fusion step to tune (it does not implement head_logits)")
    root = resolve_data_root(config.data_root)
    out = Path(config.out)
    folder = image_folder(root, config.dataset, config.images) if needs_images(spec.name) else None
    key = jsonable({
        "method": spec.name, "options": path_stamp(spec.options), "common": config.common, "dataset": config.dataset,
        **({"images": path_stamp(str(folder))} if folder is not None else {}),
        "fingerprint": dataset_fingerprint(root, config.dataset, config.desc), "protocol": protocol,
        "junk": config.junk, "top_k": config.top_k, "metric": config.metric, "depth": config.depth, "desc": config.desc,
        "nn": config.nn,
    })
    cache = out / "cache" / f"logits-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}.npz"
    data = load_dataset(root, config.dataset, config.desc, config.metric, config.nn, config.depth, cache_dir=out / "cache",
                        with_local=reads_descriptor_locals(spec.name), protocols=[protocol], top_k=config.top_k)
    evaluation = DatasetEvaluation(data, [protocol], config.junk, config.metric)
    if cache.is_file():
        with np.load(cache) as stored:
            logits = np.split(stored["logits"], np.cumsum(stored["depths"])[:-1])
        log(f"{spec.name}: logits read from {cache}")
    else:
        try:
            features = None
            if folder is not None:
                extractor = method_extractor(reranker, spec, out, config.image_cache_gb)
                features = ImageFeatureSource(extractor, folder, root, config.dataset)
            logits = head_logits(reranker, evaluation, protocol, config.top_k, config.batch_size, features)
        except ValueError as error:
            raise EvaluationError(str(error)) from error
        buffer = io.BytesIO()
        np.savez(buffer, logits=np.concatenate(logits), depths=np.array([len(l) for l in logits]))
        cache.parent.mkdir(parents=True, exist_ok=True)
        atomic_write(cache, buffer.getvalue())
    maps = grid_maps(evaluation, protocol, logits, config.weights, config.temperatures)
    best = np.unravel_index(np.argmax(maps), maps.shape)  # the first best in row-major order on ties
    result = {
        "method": spec.name, "dataset": config.dataset, "protocol": protocol, "metric": config.metric,
        "top_k": config.top_k, "weights": [float(w) for w in config.weights],
        "temperatures": [float(t) for t in config.temperatures], "measure": measure_name(protocol),
        "grid": (100 * maps).round(4).tolist(),
        "best": {"fusion": [float(config.weights[best[0]]), float(config.temperatures[best[1]])],
                 "value": round(100 * float(maps[best]), 4)},
        "settings": key,
    }
    write_tuning(result, out)
    return result


def format_grid(result: dict) -> str:
    """The grid as a Markdown table: rows = weight, columns = temperature, the best in bold."""
    best = result["best"]["fusion"]
    lines = [f"{result['method']} on {result['dataset']} ({result['protocol']}, top {result['top_k']}): {result['measure']} by fusion "
             "weight (rows) and temperature (columns)", "",
             "| weight \\ T | " + " | ".join(f"{t:g}" for t in result["temperatures"]) + " |",
             "|---" * (len(result["temperatures"]) + 1) + "|"]
    for w, row in zip(result["weights"], result["grid"]):
        cells = [f"**{v:.2f}**" if [w, t] == best else f"{v:.2f}" for t, v in zip(result["temperatures"], row)]
        lines.append(f"| {w:g} | " + " | ".join(cells) + " |")
    lines += ["", f"best: fusion = ({best[0]:g}, {best[1]:g}), {result['measure']} {result['best']['value']:.2f}"]
    return "\n".join(lines)


def write_tuning(result: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / "tune.md", format_grid(result) + "\n")
    fig, ax = plt.subplots(figsize=(6.4, 5.2))
    image = ax.imshow(np.asarray(result["grid"]), origin="lower", cmap="viridis", aspect="auto")
    ax.set_xticks(range(len(result["temperatures"])), [f"{t:g}" for t in result["temperatures"]])
    ax.set_yticks(range(len(result["weights"])), [f"{w:g}" for w in result["weights"]])
    ax.set(xlabel="temperature", ylabel="weight of the global similarity",
           title=f"{result['method']} on {result['dataset']} ({result['protocol']}): best {result['best']['value']:.2f}")
    w, t = result["best"]["fusion"]
    ax.scatter([result["temperatures"].index(t)], [result["weights"].index(w)], marker="*", s=160, color="red")
    fig.colorbar(image, ax=ax, label=result["measure"])
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110)
    plt.close(fig)
    atomic_write(out / "tune.png", buffer.getvalue())
    atomic_write(out / "tune.json", json.dumps(result, indent=1))  # last: a folder with it is complete
