"""locore-plugin: image re-ranking (LoCoRE and its baselines) for the rerankers library.

Importing the package connects it to ``rerankers.Reranker`` (see :mod:`locore_plugin.bridge`).
"""
from .extractors import create_extractor, list_extractors
from .features import ImageFeatures
from .interface import ImageReranker, RerankResult
from .metrics import compute_map
from .pickles import read_pickle
from .registry import create_reranker, list_rerankers
from . import bridge as _bridge

_bridge.install()

__all__ = [
    "ImageFeatures", "ImageReranker", "RerankResult", "compute_map", "create_extractor", "create_reranker",
    "list_extractors", "list_rerankers", "read_pickle",
]
