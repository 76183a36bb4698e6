"""The one place that touches rerankers' internals.

``install()`` wraps ``rerankers.Reranker`` so that every name our registry knows (chains
included) builds our :class:`ImageRanker`; every other name goes to rerankers' own dispatch
unchanged. Errors raised while building our re-rankers reach the user as themselves (rerankers
turns a KeyError into a "missing dependencies" message).
"""
from __future__ import annotations

import functools
from typing import Optional, Sequence, Union

import rerankers
import rerankers.reranker
from rerankers.documents import Document
from rerankers.models.ranker import BaseRanker
from rerankers.results import RankedResults, Result

from .features import ImageFeatures
from .registry import create_reranker, is_reranker_name

MODEL_TYPE = "locore_plugin"
FEATURES_KEY = "features"


class ImageRanker(BaseRanker):
    """A rerankers ``BaseRanker`` around one of our image re-rankers.

    Queries and documents are :class:`ImageFeatures` or image ``Document``s whose
    ``metadata["features"]`` holds them.
    """

    def __init__(self, model_name_or_path: str, verbose: int = 1, **kwargs):
        self.model_name = model_name_or_path
        self.verbose = verbose
        self.model = create_reranker(model_name_or_path, verbose=verbose, **kwargs)

    def rank(self, query, docs, doc_ids: Optional[Sequence[Union[str, int]]] = None) -> RankedResults:
        docs = _as_documents(docs, doc_ids)
        result = self.model.rerank(_features_of(query), [_features_of(d) for d in docs])
        ranked = [
            Result(document=docs[i], score=float(result.scores[i]), rank=position + 1)
            for position, i in enumerate(result.order)
        ]
        return RankedResults(results=ranked, query=query, has_scores=True)

    def score(self, query, doc) -> float:
        return self.rank(query, [doc]).results[0].score


def _as_documents(docs, doc_ids) -> list[Document]:
    if isinstance(docs, (ImageFeatures, Document)):
        docs = [docs]
    docs = list(docs)
    if doc_ids is not None and len(doc_ids) != len(docs):
        raise ValueError(f"{len(docs)} docs but {len(doc_ids)} doc_ids")
    out = []
    for i, doc in enumerate(docs):
        doc_id = doc_ids[i] if doc_ids is not None else (getattr(doc, "doc_id", None) if isinstance(doc, Document) else None)
        doc_id = i if doc_id is None else doc_id
        if isinstance(doc, ImageFeatures):
            doc = Document(document_type="image", doc_id=doc_id, metadata={FEATURES_KEY: doc})
        elif isinstance(doc, Document):
            doc.doc_id = doc_id
        else:
            raise TypeError(f"doc {i}: expected ImageFeatures or an image Document, got {type(doc).__name__}")
        out.append(doc)
    return out


def _features_of(item) -> ImageFeatures:
    if isinstance(item, ImageFeatures):
        return item
    if isinstance(item, Document):
        features = item.metadata.get(FEATURES_KEY)
        if isinstance(features, ImageFeatures):
            return features
        raise ValueError(f"Document {item.doc_id!r} has no ImageFeatures in metadata[{FEATURES_KEY!r}]")
    raise TypeError(f"expected ImageFeatures or an image Document, got {type(item).__name__}")


def _is_ours(model_name, model_type) -> bool:
    if model_type not in (None, MODEL_TYPE, model_name):
        return False
    return model_type == MODEL_TYPE or is_reranker_name(model_name)


def install() -> None:
    """Wrap ``rerankers.Reranker``; a second call changes nothing."""
    original = rerankers.reranker.Reranker
    if getattr(original, "_locore_original", None) is not None:
        return

    @functools.wraps(original)
    def Reranker(model_name: str, lang: str = "en", model_type: Optional[str] = None, verbose: int = 1, **kwargs):
        if _is_ours(model_name, model_type):
            return ImageRanker(model_name, verbose=verbose, **kwargs)
        return original(model_name, lang=lang, model_type=model_type, verbose=verbose, **kwargs)

    Reranker._locore_original = original
    rerankers.reranker.Reranker = Reranker
    rerankers.Reranker = Reranker
