"""Hook specifications: what a plugin may provide to locore_plugin."""
from typing import Callable

import pluggy

hookspec = pluggy.HookspecMarker("locore_plugin")
hookimpl = pluggy.HookimplMarker("locore_plugin")


@hookspec
def register_rerankers(register: Callable[..., None]) -> None:
    """Register image re-rankers.

    Call ``register(name, factory, description=..., **metadata)`` once per name. ``factory(**kwargs)``
    returns an :class:`locore_plugin.ImageReranker`; it receives the user's keyword arguments
    (``device``, ``dtype``, ``batch_size``, ``verbose`` and method-specific ones such as
    ``checkpoint``) and must reject those it does not know. Every factory accepts ``pretrained``: a
    learned method (metadata ``learned=True``) refuses to build random weights unless
    ``pretrained=False`` is passed and no ``checkpoint``; a training-free one ignores it. The
    metadata are the fields of :class:`locore_plugin.registry.RerankerInfo` (``learned``,
    ``inputs``, ``columns``, ``extractor``, ``attn_implementations``); another keyword is an error.
    """


@hookspec
def register_extractors(register: Callable[..., None]) -> None:
    """Register feature extractors: what turns a raw image into :class:`locore_plugin.ImageFeatures`.

    Call ``register(name, factory, description=..., **metadata)`` once per name (metadata: the
    fields of :class:`locore_plugin.registry.ExtractorInfo`). ``factory(**kwargs)``
    returns an :class:`locore_plugin.extractors.ImageExtractor`. It receives ``verbose`` (always
    passed by ``rank()``), ``device``, ``dtype`` and ``batch_size`` where they apply, and its own
    options, and rejects the ones it does not know.
    """
