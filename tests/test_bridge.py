"""The rerankers bridge: our names build our ranker, every other name goes to rerankers unchanged."""
import asyncio

import numpy as np
import pytest
import rerankers
import rerankers.reranker
from rerankers import Document
from rerankers.models.ranker import BaseRanker
from rerankers.results import RankedResults

import locore_plugin
from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.bridge import ImageRanker, install
from locore_plugin.hookspecs import hookimpl


def gallery(n=8, dim=8, seed=0):
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n + 1, dim))
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    return ImageFeatures(global_desc=vectors[0]), [ImageFeatures(global_desc=v) for v in vectors[1:]]


@pytest.mark.parametrize("model_type", [None, "locore_plugin", "superglobal"])
def test_our_names_build_our_ranker_with_kwargs(model_type):
    ranker = rerankers.Reranker("superglobal", model_type=model_type, K=3, batch_size=5, verbose=0)
    assert isinstance(ranker, ImageRanker) and isinstance(ranker, BaseRanker)
    assert ranker.model.K == 3 and ranker.model.batch_size == 5


def test_from_import_after_locore_plugin():
    from rerankers import Reranker

    assert isinstance(Reranker("superglobal", verbose=0), ImageRanker)


def test_rank_returns_image_documents_in_our_order():
    query, docs = gallery()
    ranker = rerankers.Reranker("superglobal", K=2, verbose=0)
    results = ranker.rank(query, docs, doc_ids=[f"img{i}" for i in range(len(docs))])
    expected = create_reranker("superglobal", K=2).rerank(query, docs)
    assert isinstance(results, RankedResults) and results.has_scores
    assert [r.doc_id for r in results] == [f"img{i}" for i in expected.order]
    assert [r.rank for r in results] == list(range(1, len(docs) + 1))
    assert all(r.document.document_type == "image" for r in results)
    np.testing.assert_allclose([r.score for r in results], expected.scores[expected.order])
    assert results.top_k(1)[0].doc_id == f"img{expected.order[0]}"


def test_documents_carrying_features_and_async_and_score():
    query, features = gallery()
    docs = [Document(document_type="image", doc_id=f"d{i}", metadata={"features": f}) for i, f in enumerate(features)]
    ranker = rerankers.Reranker("superglobal", K=2, verbose=0)
    by_features = ranker.rank(query, features)
    by_documents = asyncio.run(ranker.rank_async(Document(document_type="image", metadata={"features": query}), docs))
    assert [r.doc_id for r in by_documents] == [f"d{r.doc_id}" for r in by_features]
    assert by_documents[0].document is docs[int(by_documents[0].doc_id[1:])]
    assert isinstance(ranker.score(query, features[0]), float)


def test_documents_without_features_are_refused_clearly():
    query, _ = gallery()
    ranker = rerankers.Reranker("superglobal", verbose=0)
    with pytest.raises(ValueError, match="no ImageFeatures"):
        ranker.rank(query, [Document(document_type="image", doc_id="x", image_path="nowhere.jpg")])
    with pytest.raises(ValueError, match="doc_ids"):
        ranker.rank(query, gallery()[1], doc_ids=[1])


def test_image_documents_are_unpacked_for_the_extractor(tmp_path):
    """Only the bridge knows rerankers' Document: the extractor gets a path, base64 text or pixels."""
    from pathlib import Path

    from locore_plugin.bridge import _image_of

    pixels = np.zeros((2, 2, 3), np.uint8)
    assert _image_of(Document(document_type="image", image_path=str(tmp_path / "a.jpg"))) == Path(tmp_path / "a.jpg")
    assert _image_of(Document(document_type="image", base64="aGVsbG8=")) == "aGVsbG8="
    assert _image_of(Document(document_type="image", metadata={"image": pixels})) is pixels
    assert _image_of("x.jpg") == "x.jpg"
    with pytest.raises(ValueError, match="'text' document, not an image"):
        _image_of(Document(text="hello"))
    with pytest.raises(ValueError, match="neither image_path nor base64"):
        _image_of(Document(document_type="image", doc_id="d"))


def test_other_names_go_to_rerankers_dispatch(monkeypatch):
    seen = {}

    class FakeTransformerRanker:
        def __init__(self, model_name, verbose=1, **kwargs):
            seen.update(model_name=model_name, kwargs=kwargs)

    monkeypatch.setitem(rerankers.reranker.AVAILABLE_RANKERS, "TransformerRanker", FakeTransformerRanker)
    out = rerankers.Reranker("org/some-minilm-cross-encoder", model_type="cross-encoder", device="cpu", verbose=0)
    assert isinstance(out, FakeTransformerRanker)
    assert seen == {"model_name": "org/some-minilm-cross-encoder", "kwargs": {"device": "cpu"}}


def test_a_name_of_ours_with_a_foreign_model_type_is_not_ours(monkeypatch):
    monkeypatch.setitem(rerankers.reranker.AVAILABLE_RANKERS, "TransformerRanker", lambda name, verbose=1, **kw: ("theirs", name))
    assert rerankers.Reranker("superglobal", model_type="cross-encoder", verbose=0) == ("theirs", "superglobal")


def test_errors_while_building_ours_reach_the_user_as_themselves(register_plugin):
    class Broken:
        @hookimpl
        def register_rerankers(self, register):
            def factory(**kwargs):
                raise KeyError("weights.missing_key")

            register("test-broken", factory)

    register_plugin(Broken(), "broken")
    with pytest.raises(KeyError, match="weights.missing_key"):
        rerankers.Reranker("test-broken", verbose=0)


def test_unknown_name_with_our_model_type_lists_close_matches():
    with pytest.raises(KeyError, match="Did you mean: superglobal"):
        rerankers.Reranker("superglobl", model_type="locore_plugin", verbose=0)


def test_installing_twice_changes_nothing():
    wrapper = rerankers.Reranker
    install()
    import importlib

    importlib.reload(locore_plugin)
    assert rerankers.Reranker is wrapper and rerankers.reranker.Reranker is wrapper
    assert not hasattr(wrapper._locore_original, "_locore_original")
