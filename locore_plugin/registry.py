"""Re-ranker names: what the plugins register, and how a name becomes a re-ranker.

``a+b`` names a chain: ``a`` re-ranks the shortlist first, then ``b`` re-ranks ``a``'s order
with ``a``'s scores as its global similarities (e.g. ``superglobal+locore-base``).
"""
from __future__ import annotations

import difflib
import os
from dataclasses import dataclass, field, fields
from typing import Callable, Optional, Union

import numpy as np

from locore_plugin.fusion import read_tuned_fusion
from locore_plugin.interface import ImageReranker, RerankResult
from locore_plugin.plugins import load_plugins, plugin_distribution

CHAIN_SEPARATOR = "+"


DESCRIPTOR_KINDS = ("global", "local", "dense")  # dense: a feature map (ImageFeatures.dense)
LOCAL_COLUMNS = ("scale", "weight", "xy")  # the per-local columns of ImageFeatures


@dataclass(frozen=True)
class RerankerInfo:
    """What a re-ranker declares when it registers (as timm's pretrained configs do for models):
    evaluation, the benchmark, the demo and the rerankers bridge read these fields and never
    guess them. ``register(name, factory, description, **fields)``; an unknown field is an error.

    ``learned``: whether it has weights to train or load (None: the plugin does not say; then a
    build with ``pretrained=False`` tells). ``trainable``: whether the shared training loop trains it
    (a :class:`~locore_plugin.interface.TrainableReranker`); None: as ``learned`` says. A learned
    method registers False when only inference is implemented (CVNet: no official training code).
    ``inputs``: the descriptor kinds it reads (``"global"``,
    ``"local"``, ``"dense"`` maps; given as a tuple or as ``"local+global"``). ``columns``: the per-local columns it
    reads besides the descriptors (``"scale"``, ``"weight"``, ``"xy"``). ``extractor``: the
    extractor that ``rank()`` uses on raw images when the user names none. ``attn_implementations``:
    ``(reference, fast)`` names its factory accepts as ``attn_implementation`` (the benchmark runs
    both). ``sliding_window``: it re-ranks a ``top_k`` longer than one model input by sliding
    windows (the benchmark then also times a 400-candidate shortlist). ``one_pass``: it also scores
    a whole ``top_k`` in one sequence with ``window="all"`` (a model without a context limit; the
    benchmark times that at several lengths, to show how the cost grows). ``official_options``: factory
    options that give the official computation where the default is a faster equivalent (CVNet:
    ``{"batch_size": 1}``, one pair per forward); the benchmark times both.

    Every re-ranker speaks one vocabulary of options, which the benchmark reads back as attributes:
    ``top_k`` (candidates re-ranked), ``query_length`` / ``gallery_length`` (locals per image),
    ``fusion`` (``(weight, temperature)`` with the global similarity, ``"default"``, or None).
    """

    learned: Optional[bool] = None
    trainable: Optional[bool] = None
    inputs: tuple[str, ...] = ()
    columns: tuple[str, ...] = ()
    extractor: Optional[str] = None
    attn_implementations: tuple[str, ...] = ()
    sliding_window: bool = False
    one_pass: bool = False
    official_options: dict = field(default_factory=dict)

    def __post_init__(self):
        inputs = self.inputs.split("+") if isinstance(self.inputs, str) else list(self.inputs)
        _check_among("inputs", inputs, DESCRIPTOR_KINDS)
        _check_among("columns", list(self.columns), LOCAL_COLUMNS)
        object.__setattr__(self, "inputs", tuple(sorted(set(inputs))))
        object.__setattr__(self, "columns", tuple(self.columns))
        object.__setattr__(self, "attn_implementations", tuple(self.attn_implementations))
        if self.attn_implementations and len(self.attn_implementations) != 2:
            raise ValueError(f"attn_implementations must be (reference, fast), got {self.attn_implementations}")
        for flag in ("learned", "trainable"):
            if getattr(self, flag) not in (None, True, False):
                raise ValueError(f"{flag} must be True, False or None, got {getattr(self, flag)!r}")
        if self.sliding_window not in (True, False):
            raise ValueError(f"sliding_window must be True or False, got {self.sliding_window!r}")
        if not isinstance(self.official_options, dict):
            raise ValueError(f"official_options must be a dict of factory options, got {self.official_options!r}")


@dataclass(frozen=True)
class ExtractorInfo:
    """What an extractor declares when it registers: ``local_dim``, the size of its local descriptors."""

    local_dim: Optional[int] = None


def _check_among(what: str, values: list, allowed: tuple) -> None:
    unknown = [v for v in values if v not in allowed]
    if unknown:
        raise ValueError(f"{what} {unknown} are not among {list(allowed)}")


@dataclass(frozen=True)
class RegistryEntry:
    """One name a plugin registered (a re-ranker or an extractor) and who provides it."""

    name: str
    factory: Callable
    plugin: str
    distribution: str
    description: str = ""
    metadata: Union[RerankerInfo, ExtractorInfo] = field(default_factory=RerankerInfo)


class UnknownNameError(KeyError):
    """No plugin registers this name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def collect(hook: str, kind: str, info: type, reserved: str = "") -> dict[str, RegistryEntry]:
    """Ask every plugin implementing ``hook`` to register its names, afresh (registration is cheap).

    ``kind`` names what is registered in errors, ``info`` the dataclass its metadata fills; a name
    may not contain ``reserved``.
    """
    pm = load_plugins()
    entries: dict[str, RegistryEntry] = {}
    accepted = [f.name for f in fields(info)]
    for impl in getattr(pm.hook, hook).get_hookimpls():
        entries.update(_registrations(impl, kind, info, accepted, reserved, entries))
    return entries


def _registrations(impl, kind: str, info: type, accepted: list[str], reserved: str, entries: dict) -> dict:
    """What one hook implementation registers; its provenance comes from the plugin manager, not
    from anything the plugin passes."""
    plugin, distribution, added = impl.plugin_name, plugin_distribution(impl.plugin), {}

    def register(name, factory, description="", **metadata):
        if not isinstance(name, str) or not name or (reserved and reserved in name):
            raise ValueError(f"plugin {plugin!r}: invalid {kind} name {name!r}")
        if not callable(factory):
            raise TypeError(f"plugin {plugin!r}: the factory for {kind} {name!r} is not callable")
        if name in entries or name in added:
            first = (entries.get(name) or added[name]).plugin
            raise ValueError(f"{kind} name {name!r} is registered twice: by {first!r} and by {plugin!r}")
        unknown = sorted(set(metadata) - set(accepted))
        if unknown:
            raise ValueError(f"plugin {plugin!r}, {kind} {name!r}: unknown metadata {unknown}; accepted: {accepted}")
        try:
            typed = info(**metadata)
        except ValueError as error:
            raise ValueError(f"plugin {plugin!r}, {kind} {name!r}: {error}") from None
        added[name] = RegistryEntry(name, factory, plugin, distribution, description, typed)

    impl.function(register=register)
    return added


def lookup(entries: dict[str, RegistryEntry], name: str, kind: str) -> RegistryEntry:
    """The entry of ``name``, or an error that lists the close matches."""
    if name not in entries:
        close = difflib.get_close_matches(str(name), entries, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown {kind} {name!r}.{hint} Registered: {', '.join(sorted(entries))}")
    return entries[name]


def registered_rerankers() -> dict[str, RegistryEntry]:
    return collect("register_rerankers", "re-ranker", RerankerInfo, reserved=CHAIN_SEPARATOR)


def list_rerankers() -> list[RegistryEntry]:
    """The registered re-rankers, sorted by name; each says which plugin and distribution provides it."""
    return sorted(registered_rerankers().values(), key=lambda e: e.name)


def is_reranker_name(name: str) -> bool:
    """Whether ``name`` (or every stage of a chain) is registered."""
    entries = registered_rerankers()
    return isinstance(name, str) and all(part in entries for part in name.split(CHAIN_SEPARATOR))


def create_reranker(name: str, stage_options: Optional[dict[str, dict]] = None, **kwargs) -> ImageReranker:
    """Build the re-ranker registered as ``name`` with ``kwargs`` passed to its factory.

    For a chain ``a+b``, ``kwargs`` go to every stage and ``stage_options={"b": {...}}`` adds
    options for one stage only (e.g. its ``checkpoint``). ``fusion="…/tune.json"`` takes the best
    (weight, temperature) that ``locore-plugin tune`` chose for this name.
    """
    entries = registered_rerankers()
    parts = name.split(CHAIN_SEPARATOR) if isinstance(name, str) else [name]
    for part in parts:
        lookup(entries, part, "re-ranker")
    stage_options = stage_options or {}
    unknown = set(stage_options) - set(parts)
    if unknown:
        raise ValueError(f"stage_options names stages that are not in {name!r}: {sorted(unknown)}")
    if len(parts) == 1:
        if stage_options:
            raise ValueError("stage_options is for chains; pass the options directly")
        return _build(entries[name], kwargs)
    return ChainReranker([_build(entries[p], {**kwargs, **stage_options.get(p, {})}) for p in parts], name)


def _build(entry: RegistryEntry, kwargs: dict) -> ImageReranker:
    fusion = kwargs.get("fusion")
    if isinstance(fusion, (str, os.PathLike)) and str(fusion).endswith(".json"):  # a `locore-plugin tune` result
        kwargs = {**kwargs, "fusion": read_tuned_fusion(fusion, entry.name)}
    reranker = entry.factory(**kwargs)
    if not isinstance(reranker, ImageReranker):
        raise TypeError(f"the factory of {entry.name!r} returned {type(reranker).__name__}, not an ImageReranker")
    reranker.name = entry.name
    return reranker


class ChainReranker(ImageReranker):
    """Stages applied in turn; each re-ranks the previous stage's order and sees its scores as global scores."""

    def __init__(self, stages: list[ImageReranker], name: str):
        self.stages = stages
        self.name = name

    def _rerank_many(self, queries, shortlists, global_scores):
        orders = [np.arange(len(s)) for s in shortlists]
        scores = global_scores
        for stage in self.stages:
            results = stage.rerank_many(
                queries,
                [[s[i] for i in o] for s, o in zip(shortlists, orders)],
                [None if g is None else g[o] for g, o in zip(scores, orders)],
            )
            scores = [_unpermute(r.scores, o) for r, o in zip(results, orders)]
            orders = [o[r.order] for r, o in zip(results, orders)]
        return [RerankResult(order=o, scores=s) for o, s in zip(orders, scores)]


def _unpermute(values: np.ndarray, order: np.ndarray) -> np.ndarray:
    out = np.empty_like(values)
    out[order] = values
    return out
