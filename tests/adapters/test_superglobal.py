"""SuperGlobal against the official outputs and against cases computed by hand."""
import numpy as np
import pytest

from locore_plugin import ImageFeatures, create_reranker

CASES = {"M400_K9_beta0.15": dict(top_k=400, K=9, beta=0.15), "M50_K3_beta0.3": dict(top_k=50, K=3, beta=0.3)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_matches_official_outputs(golden_dir, case):
    folder = golden_dir("superglobal")
    inputs = np.load(folder / "inputs.npz")
    expected = np.load(folder / f"outputs_{case}.npz")
    Q, X, ranks = inputs["Q"], inputs["X"], inputs["ranks_init"]
    M = CASES[case]["top_k"]
    reranker = create_reranker("superglobal", **CASES[case])
    results = reranker.rerank_many(
        [ImageFeatures(global_desc=q) for q in Q],
        [[ImageFeatures(global_desc=X[i]) for i in ranks[:, j]] for j in range(len(Q))],
    )
    for j, result in enumerate(results):
        np.testing.assert_array_equal(ranks[:, j][result.order], expected["ranks_final"][:, j])
        # golden final scores are indexed by DBA order; ours are aligned with the shortlist
        np.testing.assert_allclose(result.scores[expected["dba_local_order"][j]], expected["final_scores"][j], atol=1e-6)
        np.testing.assert_allclose(result.scores[M:], inputs["sim_init"][ranks[M:, j], j], atol=1e-6)


# Three unit vectors in 2-D and the query (1, 0); the expected values were worked out by hand
# from the algorithm (neighbour weights 1 and beta * similarity, weighted mean, max-pooled query).
X0, X1, X2 = np.array([1.0, 0.0]), np.array([0.6, 0.8]), np.array([0.0, 1.0])
QUERY = ImageFeatures(global_desc=np.array([1.0, 0.0]))
SHORTLIST = [ImageFeatures(global_desc=v) for v in (X2, X1, X0)]  # initial order: worst first


def test_hand_case_k1():
    result = create_reranker("superglobal", top_k=400, K=1, beta=0.5).rerank(QUERY, SHORTLIST)
    assert result.order.tolist() == [2, 1, 0]
    np.testing.assert_allclose(result.scores, [0.567598, 0.776138, 0.944920], atol=2e-6)


def test_hand_case_m_smaller_than_shortlist():
    result = create_reranker("superglobal", top_k=2, K=1, beta=0.5).rerank(QUERY, SHORTLIST)
    # only the first two are re-ranked; X0 stays last with its incoming global score q.X0 = 1
    assert result.order.tolist() == [1, 0, 2]
    np.testing.assert_allclose(result.scores, [0.566939, 0.710204, 1.0], atol=2e-6)


def test_shortlist_shorter_than_m_and_k():
    result = create_reranker("superglobal", top_k=400, K=9).rerank(QUERY, SHORTLIST[:2])
    assert sorted(result.order.tolist()) == [0, 1]
    single = create_reranker("superglobal").rerank(QUERY, SHORTLIST[:1])
    assert single.order.tolist() == [0]


def test_batched_equals_one_by_one():
    rng = np.random.default_rng(0)
    unit = lambda v: (v / np.linalg.norm(v, axis=-1, keepdims=True)).astype(np.float32)
    queries = [ImageFeatures(global_desc=unit(rng.normal(size=16))) for _ in range(4)]
    shortlists = [[ImageFeatures(global_desc=unit(rng.normal(size=16))) for _ in range(n)] for n in (30, 12, 30, 5)]
    reranker = create_reranker("superglobal", top_k=20, K=3, batch_size=2)
    together = reranker.rerank_many(queries, shortlists)
    for q, s, r in zip(queries, shortlists, together):
        alone = reranker.rerank(q, s)
        np.testing.assert_array_equal(alone.order, r.order)
        np.testing.assert_allclose(alone.scores, r.scores, atol=1e-6)


def test_bad_input():
    reranker = create_reranker("superglobal")
    with pytest.raises(ValueError, match="empty"):
        reranker.rerank(QUERY, [])
    with pytest.raises(ValueError, match="dimension"):
        reranker.rerank(QUERY, [ImageFeatures(global_desc=np.ones(3))])
    with pytest.raises(ValueError, match="needs the column"):
        reranker.rerank(QUERY, [ImageFeatures(local=np.ones((4, 2)))])
    with pytest.raises(ValueError, match="top_k >= 1"):
        create_reranker("superglobal", top_k=0)
    with pytest.raises(TypeError):
        create_reranker("superglobal", checkpoint="x")
