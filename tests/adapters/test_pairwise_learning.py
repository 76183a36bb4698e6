"""Every pair-wise method can learn: overfitting a handful of synthetic lists drives its training
loss near 0, and its logit alone then ranks every trained positive of a list above every trained
negative (the pairs its sampler picks; AMES and RRT train all of them, R2Former each list's first
positive against its hardest negatives), through the evaluation path: the eval-mode forward, the
float16 database cast of AMES, ``rerank_many``."""
import numpy as np
import pytest
import torch

from locore_plugin import create_reranker
from locore_plugin.training_data import training_data

SMALL = {
    "ames-dinov2": dict(config=dict(local_dim=32, model_dim=32, nhead=2, num_encoder_layers=1, dim_feedforward=64)),
    "rrt": dict(config=dict(d_global=32, d_model=32, nhead=2, num_encoder_layers=1, dim_feedforward=64), scale_column="index"),
    "r2former": dict(config=dict(hidden=32, depth=1, pair_depth=1, heads=2, local_dim=32, global_dim=32, num_patches=48),
                     xy_scale=512),  # the synthetic files hold pixel positions of 512 x 384 images
}


@pytest.fixture(scope="module")
def lists(tmp_path_factory):
    data = training_data(dict(synthetic=dict(seeds=[1], size="tiny"), directory=str(tmp_path_factory.mktemp("split")),
                              num_locals=16, topk=6, shuffle_gallery=False))
    chosen = [data[i] for i in range(len(data)) if 0 < data[i].labels.sum() < 6][:4]
    assert len(chosen) == 4
    return chosen


@pytest.mark.parametrize("name", sorted(SMALL))
def test_overfits_a_handful_of_lists_and_then_ranks_them_by_its_logit(name, lists):
    torch.manual_seed(0)
    reranker = create_reranker(name, pretrained=False, query_length=16, gallery_length=16, fusion=None, **SMALL[name])
    queries, shortlists, labels = [l.query for l in lists], [l.shortlist for l in lists], [l.labels for l in lists]
    optimizer = torch.optim.AdamW(reranker.module.parameters(), lr=2e-3, weight_decay=0.0)
    reranker.module.train()
    for _ in range(300):  # R2Former leaves its plateau after ~200 steps
        loss = reranker.training_loss(queries, shortlists, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05
    trained_list, trained_item, target = reranker.sample_pairs(labels, np.random.default_rng(0))
    for i, result in enumerate(reranker.rerank_many(queries, shortlists)):
        mine = trained_list == i
        positives, negatives = trained_item[mine & (target == 1)], trained_item[mine & (target == 0)]
        assert len(positives) and len(negatives)
        assert result.scores[positives].min() > result.scores[negatives].max()
