"""locore-plugin: image re-ranking (LoCoRE and its baselines) for the rerankers library.

Importing the package connects it to ``rerankers.Reranker`` (see :mod:`locore_plugin.bridge`):
at once if rerankers is loaded, else when it is first imported, so that commands that never use
rerankers do not pay for its backends.
"""
from importlib.metadata import PackageNotFoundError, version

from locore_plugin.evaluation.metrics import compute_map
from locore_plugin.extractors import ImageExtractor, create_extractor, list_extractors
from locore_plugin.features import ImageFeatures
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import ImageReranker, RerankResult, TrainableReranker, ranked, with_tail
from locore_plugin.io.pickles import read_pickle
from locore_plugin.post_import import when_imported as _when_imported
from locore_plugin.registry import UnknownNameError, create_reranker, list_rerankers


def _install_bridge(rerankers_module) -> None:
    from locore_plugin.bridge import install

    install()


_when_imported("rerankers", _install_bridge)

try:
    __version__ = version("locore-plugin")  # the one place it is written: pyproject.toml
except PackageNotFoundError:  # pragma: no cover - a source tree that was never installed
    __version__ = "0+unknown"

__all__ = [
    "ImageExtractor", "ImageFeatures", "ImageReranker", "RerankResult", "TrainableReranker", "UnknownNameError",
    "__version__", "compute_map", "create_extractor", "create_reranker", "hookimpl", "list_extractors",
    "list_rerankers", "ranked", "read_pickle", "with_tail",
]
