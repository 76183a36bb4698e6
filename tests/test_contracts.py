"""Contracts every registered re-ranker keeps, checked over ``list_rerankers()`` (so a third-party
plugin installed beside this one is checked too): one ``pretrained`` rule for all of them."""
import numpy as np
import pytest

from locore_plugin import TrainableReranker, create_reranker, list_rerankers

NAMES = [entry.name for entry in list_rerankers()]


@pytest.mark.parametrize("name", NAMES)
def test_the_pretrained_rule(name):
    """A learned method (registered ``learned=True``) never builds random weights silently: without
    a checkpoint it asks for ``pretrained=False``, and then it is trainable unless it registers
    ``trainable=False``. A training-free one builds without options and accepts ``pretrained=False``."""
    entry = {e.name: e for e in list_rerankers()}[name]
    random_weights = create_reranker(name, pretrained=False)
    if entry.metadata.learned:
        with pytest.raises(ValueError, match=r"checkpoint=.*pretrained=False"):
            create_reranker(name)
        assert isinstance(random_weights, TrainableReranker) == (entry.metadata.trainable is not False)
    else:
        create_reranker(name)
        assert not isinstance(random_weights, TrainableReranker)


@pytest.mark.parametrize("name", NAMES)
def test_unknown_options_are_refused(name):
    with pytest.raises(TypeError):
        create_reranker(name, pretrained=False, no_such_option_anywhere=1)


def _inputs(reranker, count: int, seed: int):
    """A query and ``count`` gallery images at the sizes the re-ranker states, with global scores."""
    from locore_plugin.bench import one_query

    return one_query(reranker, count, seed)


@pytest.mark.parametrize("name", NAMES)
def test_rerank_returns_a_permutation_and_batched_equals_one_by_one(name):
    reranker = create_reranker(name, pretrained=False)
    lists = [_inputs(reranker, count, seed) for count, seed in ((5, 0), (3, 10))]
    one_by_one = [reranker.rerank(q, g, s) for q, g, s in lists]
    batched = reranker.rerank_many([q for q, _, _ in lists], [g for _, g, _ in lists], [s for _, _, s in lists])
    for (_, gallery, _), single, together in zip(lists, one_by_one, batched):
        assert sorted(single.order.tolist()) == list(range(len(gallery)))
        assert single.scores.shape == (len(gallery),) and np.isfinite(single.scores).all()
        np.testing.assert_array_equal(together.order, single.order)
        np.testing.assert_allclose(together.scores, single.scores, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("name", [e.name for e in list_rerankers() if e.metadata.learned and e.metadata.trainable is not False])
def test_a_learned_reranker_round_trips_save_and_load(name, tmp_path):
    reranker = create_reranker(name, pretrained=False)
    query, gallery, scores = _inputs(reranker, 4, 3)
    reranker.save_pretrained(tmp_path / "saved")
    loaded = create_reranker(name, checkpoint=tmp_path / "saved")
    want, got = reranker.rerank(query, gallery, scores), loaded.rerank(query, gallery, scores)
    np.testing.assert_array_equal(got.order, want.order)
    np.testing.assert_allclose(got.scores, want.scores, atol=1e-6, rtol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_local_methods_state_their_lengths_in_the_shared_vocabulary(name):
    """What the benchmark and evaluation read back: a method of local descriptors says how many
    locals per image it keeps as ``query_length`` / ``gallery_length``."""
    entry = {e.name: e for e in list_rerankers()}[name]
    if "local" not in entry.metadata.inputs or "+" in name:
        pytest.skip(f"{name} reads no local descriptors itself")
    reranker = create_reranker(name, pretrained=False)
    assert reranker.query_length >= 1 and reranker.gallery_length >= 1
