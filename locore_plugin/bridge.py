"""The one place that touches rerankers' internals.

``install()`` wraps ``rerankers.Reranker`` so that every name our registry knows (chains
included) builds our :class:`ImageRanker`; every other name goes to rerankers' own dispatch
unchanged. Errors raised while building our re-rankers reach the user as themselves (rerankers
turns a KeyError into a "missing dependencies" message).
"""
from __future__ import annotations

import functools
import os
from pathlib import Path
from typing import Optional, Sequence, Union

import numpy as np
import rerankers
import rerankers.reranker
from rerankers.documents import Document
from rerankers.models.ranker import BaseRanker
from rerankers.results import RankedResults, Result

from locore_plugin.extractors import ImageExtractor, create_extractor, list_extractors
from locore_plugin.features import ImageFeatures
from locore_plugin.registry import CHAIN_SEPARATOR, create_reranker, is_reranker_name, registered_rerankers

MODEL_TYPE = "locore_plugin"
FEATURES_KEY = "features"
IMAGE_KEY = "image"  # in-memory pixels (PIL / numpy) of a Document
BBOX_KEY = "bbox"  # [x0, y0, x1, y1] in pixels: extract from this crop (a query's region of interest)


class ImageRanker(BaseRanker):
    """A rerankers ``BaseRanker`` around one of our image re-rankers.

    Queries and documents are :class:`ImageFeatures`, image ``Document``s whose
    ``metadata["features"]`` holds them, or raw images: paths, base64 text, image ``Document``s
    (``image_path`` / ``base64``; ``metadata["bbox"]`` = [x0, y0, x1, y1] crops a query), PIL
    images or numpy arrays. Raw images go through ``extractor`` (a registered name or an
    :class:`ImageExtractor`; default: the one the re-ranker registers), built once with
    ``extractor_options`` and reused, so its feature cache spans calls.
    """

    def __init__(self, model_name_or_path: str, verbose: int = 1, extractor=None,
                 extractor_options: Optional[dict] = None, **kwargs):
        self.model_name = model_name_or_path
        self.verbose = verbose
        self.model = create_reranker(model_name_or_path, verbose=verbose, **kwargs)
        if extractor is not None and not isinstance(extractor, (str, ImageExtractor)):
            raise TypeError(f"extractor must be a registered name or an ImageExtractor, got {type(extractor).__name__}")
        if extractor_options and not isinstance(extractor, (str, type(None))):
            raise ValueError("extractor_options are for an extractor given by name")
        self._extractor = extractor
        self._extractor_options = dict(extractor_options or {})

    def rank(self, query, docs, doc_ids: Optional[Sequence[Union[str, int]]] = None) -> RankedResults:
        docs = _as_documents(docs, doc_ids)
        features = self._features([query, *docs])
        result = self.model.rerank(features[0], features[1:])
        ranked = [
            Result(document=docs[i], score=float(result.scores[i]), rank=position + 1)
            for position, i in enumerate(result.order)
        ]
        return RankedResults(results=ranked, query=query, has_scores=True)

    def score(self, query, doc) -> float:
        return self.rank(query, [doc]).results[0].score

    def _features(self, items) -> list[ImageFeatures]:
        """Features of every item; the raw images among them extracted in one batch."""
        out = [_features_of(item) for item in items]
        raw = [i for i, f in enumerate(out) if f is None]
        if raw:
            extractor = self.extractor(raw_item=items[raw[0]])
            bboxes = [_bbox_of(items[i]) for i in raw]
            for i, features in zip(raw, extractor.extract_many([_image_of(items[i]) for i in raw], bboxes)):
                out[i] = features
        return out

    def extractor(self, raw_item=None) -> ImageExtractor:
        """The extractor for raw images, built on first use."""
        if not isinstance(self._extractor, ImageExtractor):
            name = self._extractor or _default_extractor(self.model_name)
            if name is None:
                what = f"Document {raw_item.doc_id!r} has" if isinstance(raw_item, Document) else "an item has"
                raise ValueError(
                    f"{what} no ImageFeatures in metadata[{FEATURES_KEY!r}] and {self.model_name!r} names no default "
                    f"extractor: pass Reranker({self.model_name!r}, extractor=<name>) to rank raw images "
                    f"(registered extractors: {', '.join(e.name for e in list_extractors())})"
                )
            own = self.model.extractor_options() if self._extractor is None else {}  # its registered extractor
            self._extractor = create_extractor(name, **{"verbose": self.verbose, **own, **self._extractor_options})
        return self._extractor


def _as_documents(docs, doc_ids) -> list[Document]:
    if isinstance(docs, (ImageFeatures, Document, str, Path)) or _is_pixels(docs):  # one doc, not a list
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
        elif isinstance(doc, (str, Path)):
            is_file = isinstance(doc, Path) or os.path.isfile(doc)
            doc = Document(document_type="image", doc_id=doc_id, image_path=str(doc) if is_file else None,
                           base64=None if is_file else doc)
        elif _is_pixels(doc):
            doc = Document(document_type="image", doc_id=doc_id, metadata={IMAGE_KEY: doc})
        else:
            raise TypeError(
                f"doc {i}: expected ImageFeatures, an image Document, a path, base64 text, a PIL image or a numpy "
                f"array, got {type(doc).__name__}"
            )
        out.append(doc)
    return out


def _features_of(item) -> Optional[ImageFeatures]:
    """The item's ImageFeatures, or None for a raw image (to extract)."""
    if isinstance(item, ImageFeatures):
        return item
    if isinstance(item, Document):
        features = item.metadata.get(FEATURES_KEY)
        if features is not None and not isinstance(features, ImageFeatures):
            raise TypeError(f"Document {item.doc_id!r}: metadata[{FEATURES_KEY!r}] is {type(features).__name__}, "
                            "not ImageFeatures")
        return features
    if isinstance(item, (str, Path)) or _is_pixels(item):
        return None
    raise TypeError(f"expected ImageFeatures, an image Document or an image, got {type(item).__name__}")


def _image_of(item):
    """What the extractor loads: a Document's pixels, image file (a Path) or base64 text; other items as they are."""
    if not isinstance(item, Document):
        return item
    if item.document_type != "image":
        raise ValueError(f"Document {item.doc_id!r} is a {item.document_type!r} document, not an image")
    if item.metadata.get(IMAGE_KEY) is not None:
        return item.metadata[IMAGE_KEY]
    if item.image_path:
        return Path(item.image_path)
    if item.base64:
        return item.base64
    raise ValueError(f"image Document {item.doc_id!r} has neither image_path nor base64 (nor features)")


def _bbox_of(item):
    return item.metadata.get(BBOX_KEY) if isinstance(item, Document) else None


def _is_pixels(item) -> bool:
    return isinstance(item, np.ndarray) or type(item).__module__.startswith("PIL.")


def _default_extractor(model_name: str) -> Optional[str]:
    """The extractor the re-ranker's stages register (a chain's stages must agree)."""
    entries = registered_rerankers()
    named = {entries[part].metadata.extractor for part in model_name.split(CHAIN_SEPARATOR)} - {None}
    return named.pop() if len(named) == 1 else None


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
