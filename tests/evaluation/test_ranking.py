"""The global ranking held as head + positions (no full matrix, no full argsort) against the
full stable argsort it replaces: heads, positions, ties, published shortlists, and the scores
of whole evaluations under every protocol."""
from __future__ import annotations

import numpy as np
import pytest

from locore_plugin import create_reranker
from locore_plugin.data import synthetic
from locore_plugin.evaluation import DatasetEvaluation, EvalData, EvaluationError, global_ranking, load_dataset
from locore_plugin.evaluation.ranking import RankingError
from locore_plugin.interface import ImageReranker, ranked


class Blocks:
    """A gallery read in blocks of 7, as a DescriptorSet is."""

    def __init__(self, array):
        self.array = array

    def __len__(self):
        return len(self.array)

    def global_batches(self, batch_size: int = 7):
        for start in range(0, len(self.array), batch_size):
            yield start, self.array[start : start + batch_size]


def _reference(queries, gallery, nn=None):
    """The full ranking the way it was built before: blockwise inner products, stable argsort,
    a published shortlist first."""
    sims = np.concatenate([queries @ block.T for _, block in Blocks(gallery).global_batches()], 1)
    order = np.argsort(-sims, axis=1, kind="stable")
    if nn is None:
        return order, sims
    rows = []
    for q in range(len(order)):
        listed = np.isin(order[q], nn[1][q])
        rows.append(np.r_[nn[1][q], order[q][~listed]])
    return np.stack(rows), sims


@pytest.mark.parametrize("seed", range(12))
def test_head_and_positions_equal_the_full_stable_argsort(seed):
    rng = np.random.default_rng(seed)
    n, nq = int(rng.integers(5, 200)), int(rng.integers(1, 5))
    gallery = rng.standard_normal((n, 8)).astype(np.float32)
    queries = rng.standard_normal((nq, 8)).astype(np.float32)
    if seed % 2 == 0:  # small integers: many tied scores, broken by index as a stable sort does
        gallery, queries = np.round(gallery), np.round(queries)
    gallery[n // 2] = gallery[0]  # a duplicate image
    nn = None
    if seed % 3 == 0:
        k = int(rng.integers(1, min(n, 10) + 1))
        nn = (rng.random((nq, k)).astype(np.float32), np.stack([rng.choice(n, k, replace=False) for _ in range(nq)]))
    full, sims = _reference(queries, gallery, nn)
    named = [rng.choice(n, size=min(n, 15), replace=False) for _ in range(nq)]
    depth = int(rng.integers(1, n + 3))
    head, scores, tail = global_ranking(queries, Blocks(gallery), depth, named, nn)
    d = min(depth, n)
    np.testing.assert_array_equal(head, full[:, :d])
    for q in range(nq):
        position = np.empty(n, np.int64)
        position[full[q]] = np.arange(n)
        np.testing.assert_array_equal(tail.ranks[q], position[tail.named[q]])
        expected_scores = sims[q, head[q]] if nn is None else np.r_[nn[0][q], sims[q, full[q, len(nn[0][q]):]]][:d]
        np.testing.assert_array_equal(scores[q], expected_scores)
        # a re-ordered head: named images inside it move with it, the others keep their place
        row = head[q][rng.permutation(d)]
        final = np.r_[row, full[q, d:]]
        position[final] = np.arange(n)
        np.testing.assert_array_equal(tail.positions(q, row, tail.named[q]), position[tail.named[q]])


class Reverse(ImageReranker):
    """Turns each head upside down: a re-ranking that moves every positive it sees."""

    def _rerank_many(self, queries, shortlists, global_scores):
        return [ranked(-np.asarray(s)) for s in global_scores]


@pytest.fixture(scope="module")
def synthetic_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write(root, seed=0, size="tiny")
    return root


@pytest.mark.parametrize("junk", ["remove", "keep"])
def test_an_evaluation_on_the_head_scores_as_on_the_full_ranking(synthetic_root, junk):
    held = load_dataset(synthetic_root, "synthetic", "synth", top_k=5)
    n = len(synthetic.generate(0, "tiny").gallery_global)
    assert held.tail is not None and held.ranking.shape[1] < n  # only the head is held
    world = synthetic.generate(0, "tiny")
    full, scores, _ = global_ranking(world.query_global, world.gallery_global, depth=n)
    whole = EvalData(held.name, held.gnd, held.queries, held.gallery, full, scores)
    protocols = ["medium", "hard", "hard*"]
    for reranker in (None, Reverse(), create_reranker("superglobal")):
        got = DatasetEvaluation(held, protocols, junk).run(reranker, top_k=5)
        expected = DatasetEvaluation(whole, protocols, junk).run(reranker, top_k=5)
        assert got.keys() == expected.keys() == set(protocols)
        for name in protocols:
            assert got[name]["value"] == pytest.approx(expected[name]["value"], abs=1e-12)
            np.testing.assert_allclose(got[name]["per_query"], expected[name]["per_query"], atol=1e-12)
            np.testing.assert_allclose(got[name]["mP@k"], expected[name]["mP@k"], atol=1e-12)
    assert DatasetEvaluation(held, ["hard"], junk).run(Reverse(), top_k=5)["hard"]["value"] != pytest.approx(
        DatasetEvaluation(held, ["hard"], junk).run(None)["hard"]["value"])  # the comparison is not vacuous


def test_a_head_too_short_for_the_re_ranking_is_refused(synthetic_root):
    held = load_dataset(synthetic_root, "synthetic", "synth", top_k=5)
    with pytest.raises(EvaluationError, match="top_k >= 40"):
        DatasetEvaluation(held, ["hard*"], "remove").run(Reverse(), top_k=40)


def test_bad_global_descriptors_are_named():
    gallery = np.eye(4, dtype=np.float32)
    with pytest.raises(RankingError, match="dimension"):
        global_ranking(np.ones((1, 3), np.float32), gallery, 2)
    with pytest.raises(RankingError, match="NaN"):
        global_ranking(np.full((1, 4), np.nan, np.float32), gallery, 2)
    with pytest.raises(RankingError, match="outside the gallery"):
        global_ranking(np.ones((1, 4), np.float32), gallery, 2, named=[[1, 9]])
    with pytest.raises(RankingError, match="depth"):
        global_ranking(np.ones((1, 4), np.float32), gallery, 0)
