"""PairwiseReranker with a hand-made scorer: batching, fusion, ordering, inputs and the pair loss."""
import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures
from locore_plugin.fusion import fuse_scores
from locore_plugin.pairwise import PairwiseReranker


class MeanDot(torch.nn.Module):
    """logit = scale * <mean valid query local, mean valid gallery local> (+ optional global dot)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.tensor(2.0))

    def forward(self, q, qm, g, gm):
        qmean = (q * qm[..., None]).sum(1) / qm.sum(1, keepdim=True)
        gmean = (g * gm[..., None]).sum(1) / gm.sum(1, keepdim=True)
        return self.scale * (qmean * gmean).sum(-1)


class MeanDotReranker(PairwiseReranker):
    columns = ("scale",)
    local_dim = 4

    def pair_logits(self, module, query, gallery):
        assert query["scale"].dtype == torch.float32 and query["local"].shape[0] == gallery["local"].shape[0]
        return module(query["local"], query["mask"], gallery["local"], gallery["mask"])

    def save_pretrained(self, directory):
        from safetensors.torch import save_file

        save_file(self.module.state_dict(), f"{directory}/model.safetensors")


def mean_dot(query, item):
    """The expected logit, computed independently in numpy over the valid locals (first `length` kept)."""
    return 2.0 * float(query.local[query.mask].mean(0) @ item.local[item.mask].mean(0))


def image(rng, n, dim=4, pad=0, with_global=True):
    local = rng.normal(size=(n + pad, dim)).astype(np.float32)
    mask = np.r_[np.ones(n, bool), np.zeros(pad, bool)]
    return ImageFeatures(
        global_desc=rng.normal(size=3) if with_global else None,
        local=local,
        mask=mask,
        scale=rng.uniform(0.5, 4, size=n + pad),
    )


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    queries = [image(rng, n, pad=p) for n, p in [(5, 2), (3, 0), (8, 1)]]
    shortlists = [[image(rng, int(rng.integers(1, 7)), pad=int(rng.integers(0, 3))) for _ in range(k)] for k in (4, 7, 1)]
    return queries, shortlists


def make(**kw):
    kw = {"query_length": 8, "gallery_length": 6, **kw}
    return MeanDotReranker(MeanDot(), **kw)


def test_logits_match_hand_computation_and_order_is_stable_descending(data):
    queries, shortlists = data
    results = make().rerank_many(queries, shortlists)
    for q, s, r in zip(queries, shortlists, results):
        expected = np.array([mean_dot(q, d) for d in s], np.float32)
        np.testing.assert_allclose(r.scores, expected, rtol=1e-5, atol=1e-6)
        np.testing.assert_array_equal(r.order, np.argsort(-expected, kind="stable"))


def test_batching_invariance(data):
    queries, shortlists = data
    together = make(batch_size=5).rerank_many(queries, shortlists)
    one_pair = make(batch_size=1).rerank_many(queries, shortlists)
    one_query = [make(batch_size=64).rerank(q, s) for q, s in zip(queries, shortlists)]
    for a, b, c in zip(together, one_pair, one_query):
        np.testing.assert_array_equal(a.scores, b.scores)
        np.testing.assert_array_equal(a.scores, c.scores)
        np.testing.assert_array_equal(a.order, c.order)


def test_ties_keep_shortlist_order():
    rng = np.random.default_rng(1)
    q = image(rng, 3)
    same = image(rng, 2)
    result = make().rerank(q, [same, image(rng, 2), same, same])
    tied = [i for i in result.order if i in (0, 2, 3)]
    assert tied == [0, 2, 3]


def test_fusion_with_global_scores(data):
    queries, shortlists = data
    logits = [r.scores for r in make().rerank_many(queries, shortlists)]
    given = [np.linspace(1, 0, len(s)).astype(np.float32) for s in shortlists]
    fused = make(fusion=(0.3, 0.5)).rerank_many(queries, shortlists, given)
    for g, l, r in zip(given, logits, fused):
        expected = 0.3 * g + 0.7 / (1 + np.exp(-0.5 * l))
        np.testing.assert_allclose(r.scores, expected, rtol=1e-6)
        np.testing.assert_array_equal(r.order, np.argsort(-fuse_scores(g, l, 0.3, 0.5), kind="stable"))
    # without given scores, the global descriptors' dot products are used
    q, s = queries[0], shortlists[0]
    dots = np.array([d.global_desc @ q.global_desc for d in s])
    np.testing.assert_allclose(make(fusion=(0.3, 0.5)).rerank(q, s).scores, fuse_scores(dots, logits[0], 0.3, 0.5), rtol=1e-6)


def test_fusion_without_globals_is_a_clear_error():
    rng = np.random.default_rng(2)
    q = image(rng, 3, with_global=False)
    with pytest.raises(ValueError, match="fusion"):
        make(fusion=(0.5, 0.1)).rerank(q, [image(rng, 2, with_global=False)])


def test_truncation_keeps_highest_weight_locals():
    rng = np.random.default_rng(3)
    local = rng.normal(size=(10, 4)).astype(np.float32)
    weight = np.arange(10, dtype=np.float32)
    q = ImageFeatures(local=local, weight=weight, scale=np.ones(10))
    item = image(rng, 4)
    got = make(query_length=3).rerank(q, [item]).scores[0]
    expected = 2.0 * float(local[7:].mean(0) @ item.local.mean(0))
    assert got == pytest.approx(expected, rel=1e-5)


def test_bad_inputs_are_clear_errors():
    rng = np.random.default_rng(4)
    q = image(rng, 3)
    with pytest.raises(ValueError, match="dimension 5, but the model expects 4"):
        make().rerank(q, [image(rng, 2, dim=5)])
    with pytest.raises(ValueError, match="no valid local descriptors"):
        make().rerank(q, [ImageFeatures(local=np.ones((2, 4)), mask=np.zeros(2, bool), scale=np.ones(2))])
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['scale'\]"):
        make().rerank(q, [ImageFeatures(local=np.ones((2, 4)))])
    with pytest.raises(ValueError, match="NaN"):
        ImageFeatures(local=np.full((2, 4), np.nan), scale=np.ones(2))


def test_training_loss_is_bce_over_all_pairs_and_differentiable(data):
    queries, shortlists = data
    reranker = make()
    labels = [np.arange(len(s)) % 2 for s in shortlists]
    loss = reranker.training_loss(queries, shortlists, labels)
    logits = np.concatenate([[mean_dot(q, d) for d in s] for q, s in zip(queries, shortlists)])
    y = np.concatenate(labels)
    expected = np.mean(np.logaddexp(0, logits) - y * logits)
    assert loss.item() == pytest.approx(expected, rel=1e-5)
    loss.backward()
    assert reranker.module.scale.grad is not None and reranker.module.scale.grad != 0
    with pytest.raises(ValueError, match="labels must have shape"):
        reranker.training_loss(queries, shortlists, [l[:-1] for l in labels])


def test_sample_pairs_override_picks_the_trained_pairs(data):
    queries, shortlists = data

    class FirstOnly(MeanDotReranker):
        def sample_pairs(self, labels, rng):
            return np.array([1]), np.array([2]), np.array([1.0], np.float32)

    loss = FirstOnly(MeanDot(), query_length=8, gallery_length=6).training_loss(
        queries, shortlists, [np.zeros(len(s)) for s in shortlists]
    )
    logit = mean_dot(queries[1], shortlists[1][2])
    assert loss.item() == pytest.approx(np.logaddexp(0, -logit), rel=1e-5)


def test_rerank_restores_training_mode(data):
    queries, shortlists = data
    reranker = make()
    reranker.module.train()
    reranker.rerank_many(queries, shortlists)
    assert reranker.module.training


def test_top_k_reranks_the_head_and_keeps_the_tail(data):
    queries, shortlists = data
    q, s = queries[1], shortlists[1]
    given = np.linspace(1, 0, len(s)).astype(np.float32)
    full = make().rerank(q, s[:3])
    result = make(top_k=3).rerank(q, s, given)
    np.testing.assert_array_equal(result.order, np.r_[full.order, np.arange(3, len(s))])
    np.testing.assert_array_equal(result.scores, np.r_[full.scores, given[3:]])
    assert make(top_k=100).rerank(q, s).order.tolist() == make().rerank(q, s).order.tolist()
