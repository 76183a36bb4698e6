"""Re-ranker names: what the plugins register, and how a name becomes a re-ranker.

``a+b`` names a chain: ``a`` re-ranks the shortlist first, then ``b`` re-ranks ``a``'s order
with ``a``'s scores as its global similarities (e.g. ``superglobal+locore-base``).
"""
from __future__ import annotations

import difflib
from dataclasses import dataclass, field
from typing import Callable, Optional

import numpy as np

from .interface import ImageReranker, RerankResult
from .plugins import load_plugins, plugin_distribution

CHAIN_SEPARATOR = "+"


@dataclass(frozen=True)
class RegistryEntry:
    """One name a plugin registered (a re-ranker or an extractor) and who provides it."""

    name: str
    factory: Callable
    plugin: str
    distribution: str
    description: str = ""
    metadata: dict = field(default_factory=dict)


class UnknownNameError(KeyError):
    """No plugin registers this name."""

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0])


def collect(hook: str, kind: str, reserved: str = "") -> dict[str, RegistryEntry]:
    """Ask every plugin implementing ``hook`` to register its names, afresh (registration is cheap).

    ``kind`` names what is registered in errors; a name may not contain ``reserved``.
    """
    pm = load_plugins()
    entries: dict[str, RegistryEntry] = {}
    for impl in getattr(pm.hook, hook).get_hookimpls():
        distribution = plugin_distribution(impl.plugin)

        def register(name, factory, description="", _plugin=impl.plugin_name, _dist=distribution, **metadata):
            if not isinstance(name, str) or not name or (reserved and reserved in name):
                raise ValueError(f"plugin {_plugin!r}: invalid {kind} name {name!r}")
            if not callable(factory):
                raise TypeError(f"plugin {_plugin!r}: the factory for {kind} {name!r} is not callable")
            if name in entries:
                raise ValueError(f"{kind} name {name!r} is registered twice: by {entries[name].plugin!r} and by {_plugin!r}")
            entries[name] = RegistryEntry(name, factory, _plugin, _dist, description, metadata)

        impl.function(register=register)
    return entries


def lookup(entries: dict[str, RegistryEntry], name: str, kind: str) -> RegistryEntry:
    """The entry of ``name``, or an error that lists the close matches."""
    if name not in entries:
        close = difflib.get_close_matches(str(name), entries, n=5, cutoff=0.5)
        hint = f" Did you mean: {', '.join(close)}?" if close else ""
        raise UnknownNameError(f"unknown {kind} {name!r}.{hint} Registered: {', '.join(sorted(entries))}")
    return entries[name]


def registered_rerankers() -> dict[str, RegistryEntry]:
    return collect("register_rerankers", "re-ranker", reserved=CHAIN_SEPARATOR)


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
    options for one stage only (e.g. its ``checkpoint``).
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
