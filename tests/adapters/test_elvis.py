"""ELViS against the official model's outputs (../shared/golden/elvis), plus sizes, training and input checks."""
import json

import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.fusion import fuse_scores
from locore_plugin.io.checkpoints import StateDictMismatchError


def load_case(case):
    inputs, outputs = np.load(case / "inputs.npz"), np.load(case / "outputs.npz")
    config = json.loads((case / "config.json").read_text())
    query = ImageFeatures(local=inputs["query_local"][0], mask=~inputs["query_mask"][0])
    gallery = [ImageFeatures(local=l, mask=~m) for l, m in zip(inputs["gallery_local"], inputs["gallery_mask"])]
    return query, gallery, inputs, outputs, config


def elvis(case, config, container="weights.safetensors", architecture=None, **kw):
    official = config["constructor_kwargs"] if architecture is None else architecture
    kw = {"query_length": config["query_length"], "gallery_length": config["gallery_length"], "fusion": None, **kw}
    return create_reranker("elvis-dinov2", checkpoint=case / container, config=official, **kw)


@pytest.mark.golden("elvis")
@pytest.mark.parametrize("container", ["weights.safetensors", "checkpoint.pt"])
def test_scores_match_official(golden_case, container):
    query, gallery, _, outputs, config = load_case(golden_case)
    tol = config["tolerance"]
    scores = elvis(golden_case, config, container, batch_size=5).rerank(query, gallery).scores
    np.testing.assert_allclose(scores, outputs["sims"], rtol=tol["sims_rtol"], atol=tol["sims_atol"])


@pytest.mark.golden("elvis")
def test_padding_is_not_neutral_as_in_the_official_code(golden_case):
    """The first pair with its padding cut off gives the official unpadded score, not the padded one."""
    query, gallery, inputs, outputs, config = load_case(golden_case)
    nq, ng = int((~inputs["query_mask"][0]).sum()), int((~inputs["gallery_mask"][0]).sum())
    tight = elvis(golden_case, config, query_length=nq, gallery_length=ng)
    score = tight.rerank(ImageFeatures(local=query.local[:nq]), [ImageFeatures(local=gallery[0].local[:ng])]).scores
    tol = config["tolerance"]
    np.testing.assert_allclose(score, outputs["sims_first_pair_unmasked"], rtol=tol["sims_rtol"], atol=tol["sims_atol"])
    if nq < len(query.local) or ng < len(gallery[0].local):
        assert abs(score[0] - outputs["sims"][0]) > 1e-6


@pytest.mark.golden("elvis")
def test_official_fusion_and_order(golden_case):
    query, gallery, inputs, outputs, config = load_case(golden_case)
    reranker = elvis(golden_case, config, fusion=(config["lamb"], config["temp"]))
    result = reranker.rerank(query, gallery, inputs["global_sims"])
    np.testing.assert_allclose(result.scores, outputs["fused"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(result.order, outputs["order"])
    np.testing.assert_allclose(fuse_scores(inputs["global_sims"], outputs["sims"], config["lamb"], config["temp"]),
                               outputs["fused"], atol=1e-6)


@pytest.mark.golden("elvis")
def test_sizes_come_from_the_checkpoint(golden_case):
    """A bare official file and only what no tensor shows (the Sinkhorn iterations and temperature)."""
    query, gallery, _, outputs, config = load_case(golden_case)
    official = config["constructor_kwargs"]
    reranker = elvis(golden_case, config, "checkpoint.pt", {k: official[k] for k in ("sh_iter", "sh_temp")})
    sized = {k: official[k] for k in ("local_dim", "model_dim", "embed_dim", "proj_dim")}
    assert {k: reranker.module.config[k] for k in sized} == sized
    tol = config["tolerance"]
    np.testing.assert_allclose(reranker.rerank(query, gallery).scores, outputs["sims"], rtol=tol["sims_rtol"], atol=tol["sims_atol"])
    with pytest.raises(StateDictMismatchError, match="remap_local.0.weight"):
        elvis(golden_case, config, architecture={**official, "local_dim": official["local_dim"] + 4})


@pytest.mark.golden("elvis")
def test_save_pretrained_round_trip(golden_case, tmp_path):
    query, gallery, _, _, config = load_case(golden_case)
    reranker = elvis(golden_case, config)
    reranker.save_pretrained(tmp_path / "saved")
    again = create_reranker("elvis-dinov2", checkpoint=tmp_path / "saved", query_length=config["query_length"],
                            gallery_length=config["gallery_length"], fusion=None)
    np.testing.assert_array_equal(again.rerank(query, gallery).scores, reranker.rerank(query, gallery).scores)


def tiny(**kw):
    config = dict(local_dim=12, model_dim=16, embed_dim=4, proj_dim=8, sh_iter=3, sh_temp=5.0)
    return create_reranker("elvis-dinov2", pretrained=False, config=config, query_length=6, gallery_length=5, **kw)


def test_training_logit_is_g_of_the_score_and_the_loss_is_bce():
    rng = np.random.default_rng(0)
    q = ImageFeatures(local=rng.normal(size=(6, 12)))
    shortlist = [ImageFeatures(local=rng.normal(size=(n, 12))) for n in (5, 3)]
    reranker = tiny(fusion=None)
    scores = reranker.rerank(q, shortlist).scores
    module = reranker.module
    expected = module.g(torch.as_tensor(scores, dtype=torch.float32)[:, None]).view(-1).detach().numpy()
    module.train()
    loss = reranker.training_loss([q], [shortlist], [np.array([1, 0])])
    x = expected.astype(np.float64)
    assert loss.item() == pytest.approx(np.mean(np.logaddexp(0, x) - np.array([1, 0]) * x), abs=1e-5)
    loss.backward()
    assert module.dust_bin.grad is not None and module.remap_local[0].weight.grad.abs().sum() > 0


def test_score_is_bounded_by_the_number_of_valid_locals_and_errors_are_clear():
    rng = np.random.default_rng(1)
    q = ImageFeatures(local=rng.normal(size=(4, 12)))
    shortlist = [ImageFeatures(local=rng.normal(size=(n, 12))) for n in (5, 2)]
    scores = tiny(fusion=None).rerank(q, shortlist).scores
    assert (scores > 0).all() and scores[1] < 4 + 2 and scores[0] < 4 + 5
    with pytest.raises(ValueError, match="dimension 7, but the model expects 12"):
        tiny(fusion=None).rerank(q, [ImageFeatures(local=rng.normal(size=(3, 7)))])
    with pytest.raises(ValueError, match="checkpoint="):
        create_reranker("elvis-dinov2")
    with pytest.raises(ValueError, match="binarized=True is not supported"):
        create_reranker("elvis-dinov2", pretrained=False, config={"binarized": True})
    with pytest.raises(ValueError, match="unknown elvis-dinov2 config key"):
        create_reranker("elvis-dinov2", pretrained=False, config={"width": 3})
