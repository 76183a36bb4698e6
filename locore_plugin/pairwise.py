"""Shared machinery for methods that score each (query, gallery) pair on its own (AMES, RRT, R2Former).

A method says which per-local columns it needs and how one batch of pairs becomes logits
(:meth:`PairwiseReranker.pair_logits`); this class turns shortlists into batches of pairs (the
query rows are gathered once per pair, never looped over), scores them, optionally fuses the
logits with the global similarity, ranks, and turns labelled lists into a pair-wise loss.
"""
from __future__ import annotations

import abc
from typing import Any, Callable, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from locore_plugin.features import ImageFeatures, stack_globals, stack_locals
from locore_plugin.fusion import fuse_scores
from locore_plugin.interface import TrainableReranker, ranked, with_tail
from locore_plugin.io.checkpoints import Checkpoint, load_strict, read_checkpoint, save_pretrained_folder
from locore_plugin.nn import REFERENCE, attention_layers
from locore_plugin.progress import progress
from locore_plugin.runtime import resolve_device, resolve_dtype

# Pairs per forward on a CPU when ``batch_size`` is not given: a batch's layer activations then
# stay in cache and its buffers are reused. Measured on a 2-core Zen 4 (100 pairs at the official
# shapes): AMES 1.9 s at 16 vs 3.0 s at 128, RRT 3.3 s vs 4.5 s at 64, R2Former 2.0 s at 10-16 vs
# 3.0 s at 100.
CPU_BATCH_SIZE = 16


class PairwiseReranker(TrainableReranker):
    """Scores every (query, shortlist item) pair with ``pair_logits`` and sorts by the score.

    Subclasses set ``columns`` (per-local columns besides the descriptors) and ``needs_global``,
    may set ``local_dim`` / ``global_dim`` (checked against the input, so that a descriptor of
    the wrong size is a clear error rather than a matmul failure), and implement
    :meth:`pair_logits`. ``fusion=(weight, temperature)`` ranks by
    ``weight * global + (1 - weight) * sigmoid(temperature * logit)``; None ranks by the logit.
    ``top_k`` re-ranks only the first ``top_k`` items of each shortlist (the official evaluations
    re-rank the top 100 or 400); the rest keep their order and their incoming global score (0
    without one), after the re-ranked ones. ``variable_locals=m`` trains each batch on a number of
    query locals drawn from [m, query_length) and of gallery locals from [m, gallery_length), the
    strongest kept (AMES's "universal" training, official m = 10), so that one model serves any count.
    ``batch_size``: pairs per forward; None picks ``CPU_BATCH_SIZE`` on a CPU and the method's
    ``accelerator_batch_size`` elsewhere.
    """

    columns: tuple[str, ...] = ()
    needs_global: bool = False
    local_dim: Optional[int] = None
    global_dim: Optional[int] = None
    # Whether the logits do not depend on padded slots (masked out of attention, no sequence
    # positions): then each batch is cut to its longest image instead of the fixed lengths, except
    # on the reference attention path, which keeps the official fixed-length computation.
    exact_without_padding: bool = False
    min_length: int = 1  # the fewest local slots the model accepts per image
    accelerator_batch_size: int = 128  # pairs per forward off the CPU when ``batch_size`` is not given

    def __init__(
        self,
        module: torch.nn.Module,
        *,
        query_length: int,
        gallery_length: int,
        fusion: Optional[tuple[float, float]] = None,
        top_k: Optional[int] = None,
        device=None,
        dtype="float32",
        batch_size: Optional[int] = None,
        variable_locals: Optional[int] = None,
        verbose: int = 0,
    ):
        if query_length < 1 or gallery_length < 1:
            raise ValueError(f"sequence lengths must be >= 1, got query {query_length}, gallery {gallery_length}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be None or >= 1, got {top_k}")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be None or >= 1, got {batch_size}")
        if variable_locals is not None and not 1 <= variable_locals < min(query_length, gallery_length):
            raise ValueError(
                f"variable_locals must lie in [1, min(query_length, gallery_length)) = [1, "
                f"{min(query_length, gallery_length)}), got {variable_locals}"
            )
        if fusion is not None:
            if len(fusion) != 2:
                raise ValueError(f"fusion must be None or (weight, temperature), got {fusion!r}")
            fusion = (float(fusion[0]), float(fusion[1]))
        self.device, self.dtype = resolve_device(device), resolve_dtype(dtype)
        self.module = module.to(device=self.device, dtype=self.dtype)
        self.query_length, self.gallery_length = int(query_length), int(gallery_length)
        self.fusion = fusion
        self.top_k = None if top_k is None else int(top_k)
        if batch_size is None:
            batch_size = CPU_BATCH_SIZE if self.device.type == "cpu" else self.accelerator_batch_size
        self.batch_size = int(batch_size)
        self.variable_locals = variable_locals
        self.verbose = verbose
        # Pair sampling for training draws from this generator; a trainer that resumes exactly
        # saves and restores ``rng.bit_generator.state``.
        self.rng = np.random.default_rng(0)

    @property
    def method(self) -> str:
        return self.name or type(self).__name__

    @abc.abstractmethod
    def pair_logits(self, module: torch.nn.Module, query: dict, gallery: dict) -> torch.Tensor:
        """Logits (P,) of P pairs through ``module`` (``self.module`` or the trainer's wrapper).

        ``query`` and ``gallery`` hold one row per pair: ``local`` (P, L, D) in the model dtype,
        ``mask`` (P, L) bool (True = valid, the opposite of the official files), each of
        ``columns`` as float32, and ``global`` (P, Dg) in the model dtype when ``needs_global``.
        """

    # -- inputs ---------------------------------------------------------------------------------

    def encode(self, features: Sequence[ImageFeatures], length: int, role: str) -> dict[str, torch.Tensor]:
        """Stack images into device tensors (one row per image), checking what the method needs."""
        stacked = stack_locals(features, length, self.columns, method=self.method)
        counts = stacked["mask"].sum(1)
        empty = np.flatnonzero(counts == 0)
        if len(empty):
            raise ValueError(f"{self.method}: {role} image(s) {empty.tolist()} have no valid local descriptors")
        if self.trims_padding():  # valid locals come first in each row
            keep = min(length, max(int(counts.max()), self.min_length))
            stacked = {k: v[:, :keep] for k, v in stacked.items()}
        _check_dim(self.local_dim, stacked["local"].shape[-1], f"{self.method}: {role} local descriptors")
        out = {k: torch.from_numpy(v).to(self.device) for k, v in stacked.items()}
        out["local"] = out["local"].to(self.dtype)
        if self.needs_global:
            globals_ = stack_globals(features, method=self.method)
            _check_dim(self.global_dim, globals_.shape[-1], f"{self.method}: {role} global descriptors")
            out["global"] = torch.from_numpy(globals_).to(self.device, self.dtype)
        return out

    def trims_padding(self) -> bool:
        """Whether batches are cut to their longest image (see ``exact_without_padding``)."""
        return self.exact_without_padding and not any(
            layer.implementation == REFERENCE for layer in attention_layers(self.module))

    def pair_inputs(
        self, queries: Sequence[ImageFeatures], rows: np.ndarray, gallery: Sequence[ImageFeatures],
        lengths: Optional[tuple[int, int]] = None,
    ) -> tuple[dict, dict]:
        """Inputs for the pairs (queries[rows[p]], gallery[p]): each query is encoded once and
        its row gathered for every pair it belongs to. ``lengths``: (query, gallery) locals kept,
        ``(query_length, gallery_length)`` by default."""
        query_length, gallery_length = lengths or (self.query_length, self.gallery_length)
        unique, inverse = np.unique(rows, return_inverse=True)
        encoded = self.encode([queries[i] for i in unique], query_length, "query")
        index = torch.as_tensor(inverse.reshape(-1), device=self.device)
        query = {k: v.index_select(0, index) for k, v in encoded.items()}
        return query, self.encode(gallery, gallery_length, "gallery")

    # -- inference ------------------------------------------------------------------------------

    def _rerank_many(self, queries, shortlists, global_scores):
        if self.fusion is not None:
            lacking = [i for i, g in enumerate(global_scores) if g is None]
            if lacking:
                raise ValueError(
                    f"{self.method}: fusion with the global similarity needs global scores or global "
                    f"descriptors, which query(ies) {lacking} lack"
                )
        results = []
        for shortlist, incoming, logit in zip(shortlists, global_scores, self.head_logits(queries, shortlists)):
            depth = len(logit)
            if self.fusion is not None:
                head = ranked(fuse_scores(incoming[:depth], logit, *self.fusion))
            else:
                head = ranked(self.scores_from_logits(logit))
            results.append(with_tail(head, incoming, len(shortlist)))
        return results

    def head_logits(self, queries, shortlists):
        depths = [len(s) if self.top_k is None else min(self.top_k, len(s)) for s in shortlists]
        heads = [list(s[:d]) for s, d in zip(shortlists, depths)]
        return np.split(self.score_pairs(list(queries), heads), np.cumsum(depths)[:-1])

    def scores_from_logits(self, logits: np.ndarray) -> np.ndarray:
        """The score of a re-ranked item without fusion; the logit itself unless a method reports
        a probability (any monotonic map keeps the order)."""
        return logits

    def score_pairs(self, queries: list[ImageFeatures], shortlists: list[list[ImageFeatures]]) -> np.ndarray:
        """Logits of every (query, shortlist item) pair, queries after each other, in ``batch_size`` chunks."""
        rows = np.repeat(np.arange(len(queries)), [len(s) for s in shortlists])
        gallery = [item for shortlist in shortlists for item in shortlist]
        out = np.empty(len(gallery), np.float32)
        starts = range(0, len(gallery), self.batch_size)
        was_training = self.module.training
        self.module.eval()
        try:
            with torch.inference_mode():
                for start in progress(starts, desc=self.method, unit="batch", disable=not self.verbose):
                    stop = start + self.batch_size
                    query, item = self.pair_inputs(queries, rows[start:stop], gallery[start:stop])
                    out[start:stop] = self.pair_logits(self.module, query, item).float().cpu().numpy()
        finally:
            self.module.train(was_training)
        if not np.isfinite(out).all():
            raise FloatingPointError(f"{self.method}: the model produced non-finite logits (dtype {self.dtype})")
        return out

    # -- saving ---------------------------------------------------------------------------------

    def architecture_config(self) -> dict:
        """The architecture config ``save_pretrained`` writes (the factory's ``config`` keys)."""
        return dict(self.module.config)

    def save_pretrained(self, directory) -> None:
        """``model.safetensors`` (official key names) and ``config.json`` (the architecture and the
        registry name), which ``create_reranker(name, checkpoint=directory)`` loads."""
        if not self.name:
            raise ValueError(f"{type(self).__name__}.save_pretrained needs the registry name it loads under: "
                             "build it with create_reranker()")
        save_pretrained_folder(directory, self.module, self.name, self.architecture_config())

    # -- training -------------------------------------------------------------------------------

    def sample_pairs(self, labels: list[np.ndarray], rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Which pairs a batch trains on: (list index, item index, 0/1 target) arrays. Default: all."""
        lengths = [len(l) for l in labels]
        list_index = np.repeat(np.arange(len(labels)), lengths)
        item_index = np.concatenate([np.arange(n) for n in lengths])
        return list_index, item_index, np.concatenate(labels).astype(np.float32)

    def pair_tokens(self, module: torch.nn.Module, query: dict, gallery: dict) -> tuple[torch.Tensor, torch.Tensor]:
        """Logits (P,) and the final token states (P, 1 + Lq + Lg, D) of ``[summary token, query
        locals, gallery locals]``, for distillation; methods with ``supports_distillation`` implement it."""
        raise NotImplementedError(f"{self.method} does not expose its token states, so it cannot be distilled")

    def _training_pairs(self, queries, shortlists, labels):
        """The batch's sampled pairs as model inputs: (query, item, target, (list index, items), empty)."""
        if not (len(queries) == len(shortlists) == len(labels)):
            raise ValueError(f"{len(queries)} queries, {len(shortlists)} shortlists, {len(labels)} label arrays")
        labels = [np.asarray(l) for l in labels]
        for i, (shortlist, label) in enumerate(zip(shortlists, labels)):
            if label.shape != (len(shortlist),):
                raise ValueError(f"list {i}: labels must have shape ({len(shortlist)},), got {label.shape}")
        list_index, item_index, target = self.sample_pairs(labels, self.rng)
        empty = len(list_index) == 0
        if empty:
            # No usable pair (e.g. no RRT anchor): a zero loss that still runs one pair through the
            # model, so that data-parallel ranks stay in step.
            list_index, item_index, target = np.zeros(1, np.int64), np.zeros(1, np.int64), np.zeros(1, np.float32)
        lengths = None
        if self.variable_locals is not None:
            lengths = (int(self.rng.integers(self.variable_locals, self.query_length)),
                       int(self.rng.integers(self.variable_locals, self.gallery_length)))
        items = [shortlists[l][i] for l, i in zip(list_index, item_index)]
        query, item = self.pair_inputs(queries, list_index, items, lengths)
        return (query, item, torch.as_tensor(target, device=self.device), (list_index, items), empty)

    def training_loss(self, queries, shortlists, labels, module=None):
        """Binary cross-entropy (mean over the sampled pairs) of the logits against same-instance labels."""
        query, item, target, _, empty = self._training_pairs(queries, shortlists, labels)
        logits = self.pair_logits(module if module is not None else self.module, query, item)
        if empty:
            return logits.float().sum() * 0.0
        return F.binary_cross_entropy_with_logits(logits.float(), target)

    def distillation_loss(self, queries, shortlists, labels, teacher, weight, module=None):
        """The official AMES distillation (ELViS ``utils/training.py``): the BCE of the sampled pairs
        plus ``weight`` x the mean squared difference between this model's final token states and
        the teacher's. The teacher (frozen, in evaluation mode) reads every local up to its own
        ``query_length`` / ``gallery_length``; this model reads the first ones only when
        ``variable_locals`` draws fewer, and the states are compared at the summary token and at
        the locals this model read (valid ones: padded slots carry no descriptor)."""
        query, item, target, (rows, items), empty = self._training_pairs(queries, shortlists, labels)
        logits, tokens = self.pair_tokens(module if module is not None else self.module, query, item)
        with torch.no_grad():
            was_training = teacher.module.training
            teacher.module.eval()
            try:
                teacher_query, teacher_item = teacher.pair_inputs(queries, rows, items)
                _, teacher_tokens = teacher.pair_tokens(teacher.module, teacher_query, teacher_item)
            finally:
                teacher.module.train(was_training)
        lq, lg, tq = query["mask"].shape[1], item["mask"].shape[1], teacher_query["mask"].shape[1]
        if tq < lq or teacher_item["mask"].shape[1] < lg:
            raise ValueError(f"{self.method}: the teacher reads fewer locals ({teacher.query_length} / {teacher.gallery_length}) "
                             f"than the model it distils into ({self.query_length} / {self.gallery_length})")
        if tokens.shape[-1] != teacher_tokens.shape[-1]:
            raise ValueError(f"{self.method}: token width {tokens.shape[-1]} differs from the teacher's {teacher_tokens.shape[-1]}")
        aligned = torch.cat([teacher_tokens[:, : 1 + lq], teacher_tokens[:, 1 + tq: 1 + tq + lg]], 1)
        valid = torch.cat([query["mask"].new_ones(len(target), 1), query["mask"], item["mask"]], 1)
        squared = (tokens.float() - aligned.float()).pow(2).mean(-1)
        distance = squared[valid].mean()
        if empty:
            return (logits.float().sum() + distance) * 0.0
        return F.binary_cross_entropy_with_logits(logits.float(), target) + weight * distance


def architecture(
    name: str,
    defaults: dict,
    checkpoint,
    pretrained: bool,
    overrides: Optional[dict],
    published_by: str,
    *,
    sizes_from_state: Callable[[dict], dict],
    official_names: Optional[dict[str, str]] = None,
    fixed: Optional[dict[str, tuple[Callable[[Any], bool], str]]] = None,
    ignored: tuple[str, ...] = (),
    read: Callable[[Any], Checkpoint] = read_checkpoint,
) -> tuple[dict, Optional[dict]]:
    """The architecture settings of a pair-wise method and its checkpoint's tensors (None without one).

    Settings are taken, later winning: the named variant's ``defaults``; then, with a checkpoint,
    its saved ``config.json`` or, for a bare official file, every size the tensors determine
    (``sizes_from_state(state)``: depths from key indices, widths from shapes); then
    ``overrides``. What shapes cannot tell (the number of heads) therefore comes from
    ``overrides``, a saved config or the variant. A checkpoint that contradicts an explicit
    override fails at the strict load, which names the keys.

    ``overrides`` may use the official constructor's keyword names: ``official_names`` maps
    those that differ from ours, ``fixed`` names official keywords this implementation supports
    with one value only (a predicate and the value in words), ``ignored`` those that size nothing
    here (e.g. RRT's Linformer ``seq_len``). Any other key is an error that lists the accepted ones.

    Without a checkpoint, ``pretrained=True`` is an error: a learned method with random weights
    must be asked for explicitly (``pretrained=False``)."""
    if checkpoint is None and pretrained:
        raise ValueError(
            f"{name} needs checkpoint= (the official weights are published by {published_by}); "
            "pass pretrained=False for a randomly initialised model"
        )
    settings, state = dict(defaults), None
    if checkpoint is not None:
        read_back = read(checkpoint)
        read_back.check_name(name)
        state = read_back.state
        settings.update(read_back.config if read_back.config is not None else sizes_from_state(state))
    settings.update(_our_names(name, overrides or {}, set(settings), official_names or {}, fixed or {}, ignored))
    return settings, state


def _our_names(name, overrides, ours, official_names, fixed, ignored) -> dict:
    """``overrides`` in our key names (official names translated, fixed and ignored ones checked and dropped)."""
    unknown = [k for k in overrides if k not in fixed and k not in ignored and official_names.get(k, k) not in ours]
    if unknown:
        accepted = sorted(ours | set(official_names) | set(fixed) | set(ignored))
        raise ValueError(f"unknown {name} config key(s) {unknown}; accepted: {accepted}")
    translated = {}
    for key, value in overrides.items():
        if key in fixed:
            supported, words = fixed[key]
            if not supported(value):
                raise ValueError(f"{name}: {key}={value!r} is not supported; this implementation has {key} = {words}")
        elif key not in ignored:
            target = official_names.get(key, key)
            if target in translated:
                raise ValueError(f"{name}: config gives {target!r} twice (under its own and its official name)")
            translated[target] = value
    return translated


def loaded(module: torch.nn.Module, state: Optional[dict], checkpoint) -> torch.nn.Module:
    """``module`` with the checkpoint's tensors loaded strictly (as it is without a checkpoint)."""
    if state is not None:
        load_strict(module, state, source=str(checkpoint))
    return module


def check_heads(name: str, width: int, heads: int, width_key: str, heads_key: str) -> None:
    """Attention widths must split into heads; the number of heads is the one size a checkpoint
    cannot tell, so the error says where it comes from."""
    if heads < 1 or width % heads:
        raise ValueError(
            f"{name}: {width_key}={width} is not divisible by {heads_key}={heads} (the number of heads cannot be "
            f"read from a checkpoint's tensors: pass config={{{heads_key!r}: ...}})"
        )


def _check_dim(expected: Optional[int], got: int, what: str) -> None:
    if expected is not None and got != expected:
        raise ValueError(f"{what} have dimension {got}, but the model expects {expected}")
