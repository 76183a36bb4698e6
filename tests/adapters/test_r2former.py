"""R2Former: official outputs (golden fixtures), checkpoints, padding, training loss and input errors."""
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.adapters.r2former import CONFIGS, R2Former, R2FormerConfig, build_module
from locore_plugin.io.checkpoints import StateDictMismatchError, read_state_dict
from locore_plugin.nn import set_attention_implementation

TINY = {"hidden": 16, "depth": 2, "pair_depth": 1, "heads": 2, "local_dim": 8, "global_dim": 8, "num_patches": 16}


# -- golden fixtures ------------------------------------------------------------------------------


def case_config(case) -> dict:
    """The case's own official constructor arguments, and the local dimension (an input of ours only)."""
    meta = json.loads((case / "config.json").read_text())
    return {**meta["constructor_kwargs"], "local_dim": meta["local_dim"]}


def golden_module(case, dtype=torch.float32, attn="sdpa") -> R2Former:
    module = build_module("r2former", case / "weights.safetensors", case_config(case)).to(dtype).eval()
    return set_attention_implementation(module, attn)


def side(rerank: np.ndarray, dtype=torch.float32) -> dict:
    """Official channel layout [x, y, attention, descriptor...] -> the module's inputs."""
    t = torch.as_tensor(rerank).to(dtype)
    return {"local": t[..., 3:], "xy": t[..., :2], "weight": t[..., 2], "mask": torch.ones(t.shape[:2], dtype=torch.bool)}


def inputs_and_outputs(case):
    yield np.load(case / "inputs.npz"), np.load(case / "outputs.npz")
    if (case / "inputs_n500.npz").is_file():
        yield np.load(case / "inputs_n500.npz"), np.load(case / "outputs_n500.npz")


@pytest.mark.golden("r2former")
@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_logits_match_official(golden_case, attn):
    module = golden_module(golden_case, attn=attn)
    for inputs, outputs in inputs_and_outputs(golden_case):
        with torch.no_grad():
            logits = module(side(inputs["x_rerank"]), side(inputs["y_rerank"])).numpy()
        np.testing.assert_allclose(logits, outputs["logits"], atol=1e-5, rtol=0)
        np.testing.assert_allclose(torch.softmax(torch.as_tensor(logits), 1)[:, 1], outputs["prob_same"], atol=1e-5)


@pytest.mark.golden("r2former")
@pytest.mark.parametrize("attn", ["sdpa", "reference"])
def test_float64_matches_official_float64(golden_case, attn):
    module = golden_module(golden_case, torch.float64, attn)
    inputs, expected = np.load(golden_case / "inputs.npz"), np.load(golden_case / "outputs_f64.npz")
    with torch.no_grad():
        logits = module(side(inputs["x_rerank"], torch.float64), side(inputs["y_rerank"], torch.float64)).numpy()
    np.testing.assert_allclose(logits, expected["logits_f64"], atol=1e-9, rtol=0)


@pytest.mark.golden("r2former")
def test_correspondences_match_official(golden_case):
    module = golden_module(golden_case)
    intermediates = np.load(golden_case / "intermediates.npz")
    for inputs, outputs in inputs_and_outputs(golden_case):
        expected = outputs if "select" in outputs else intermediates
        with torch.no_grad():
            corr = module.correspondences(side(inputs["x_rerank"]), side(inputs["y_rerank"]))
        np.testing.assert_array_equal(corr.query_index.numpy(), expected["topk_idx_q"])
        np.testing.assert_array_equal(corr.gallery_index.numpy(), expected["topk_idx_k"])
        np.testing.assert_allclose(corr.select.numpy(), expected["select"], atol=1e-6, rtol=0)
        if "correlation" in expected:
            np.testing.assert_allclose(corr.correlation.numpy(), expected["correlation"], atol=1e-6, rtol=0)


@pytest.mark.golden("r2former")
def test_stage_intermediates_match_official(golden_case):
    """Both stages' inputs and normalised outputs, captured with hooks on the official module names."""
    module = golden_module(golden_case)
    inputs, expected = np.load(golden_case / "inputs.npz"), np.load(golden_case / "intermediates.npz")
    seen = {}
    norm_outputs = []
    hooks = [
        module.blocks_2[0].register_forward_pre_hook(lambda m, a: seen.setdefault("stage1_tokens_in", a[0])),
        module.blocks[0].register_forward_pre_hook(lambda m, a: seen.setdefault("stage2_tokens_in", a[0])),
        module.pair_head_2.register_forward_hook(lambda m, a, out: seen.setdefault("pair_head_2_out", out)),
        module.decoder_norm.register_forward_hook(lambda m, a, out: norm_outputs.append(out)),
    ]
    with torch.no_grad():
        module(side(inputs["x_rerank"]), side(inputs["y_rerank"]))
    for h in hooks:
        h.remove()
    b, rows = expected["select"].shape[:2]
    got = {
        "stage1_tokens_in": seen["stage1_tokens_in"].reshape(b, rows, -1, module.config.hidden),
        "stage1_norm_cls": norm_outputs[0][:, 0].reshape(b, rows, -1),
        "pair_head_2_out": seen["pair_head_2_out"].reshape(b, rows, -1),
        "stage2_tokens_in": seen["stage2_tokens_in"],
        "stage2_norm_out": norm_outputs[1],
    }
    got["pair_tokens"] = got["stage1_tokens_in"][:, :, 1:]
    for name, value in got.items():
        np.testing.assert_allclose(value.numpy(), expected[name], atol=2e-5, rtol=0, err_msg=name)


def features(rerank: np.ndarray, global_desc=None, pad: int = 0, rng=None) -> ImageFeatures:
    """One image in the official layout as ImageFeatures, optionally with ``pad`` garbage padded rows."""
    local, xy, weight = rerank[:, 3:], rerank[:, :2], rerank[:, 2]
    mask = np.ones(len(rerank), bool)
    if pad:
        junk = rng.normal(size=(pad, rerank.shape[1])).astype(np.float32)
        local, xy, weight = np.r_[local, junk[:, 3:]], np.r_[xy, junk[:, :2]], np.r_[weight, junk[:, 2]]
        mask = np.r_[mask, np.zeros(pad, bool)]
    return ImageFeatures(global_desc=global_desc, local=local, mask=mask, xy=xy, weight=weight)


@pytest.mark.golden("r2former")
def test_reranker_scores_are_official_probabilities_and_final_scores(golden_case):
    """Through ImageFeatures, padded to a longer length, several queries in one forward: the scores
    are the official softmax[:, 1]; fusion="default" gives the official final_score. Pairs whose
    attention is not max-normalised (as the official extractor writes it) are left to the module tests."""
    rng = np.random.default_rng(0)
    options = {"checkpoint": golden_case / "weights.safetensors", "config": case_config(golden_case)}
    for inputs, outputs in inputs_and_outputs(golden_case):
        x, y = inputs["x_rerank"], inputs["y_rerank"]
        pairs = [i for i in range(len(x)) if x[i, :, 2].max() == 1 and y[i, :, 2].max() == 1]
        assert pairs
        queries = [features(x[i], inputs["x_global"][i], pad=3, rng=rng) for i in pairs]
        shortlists = [[features(y[i], inputs["y_global"][i])] for i in pairs]
        length = x.shape[1] + 4
        for fusion, expected in ((None, "prob_same"), ("default", "final_score")):
            reranker = create_reranker("r2former", query_length=length, gallery_length=length, fusion=fusion, **options)
            scores = np.concatenate([r.scores for r in reranker.rerank_many(queries, shortlists)])
            np.testing.assert_allclose(scores, outputs[expected][pairs], atol=1e-5, rtol=0, err_msg=expected)


@pytest.mark.golden("r2former")
def test_nested_dataparallel_and_bare_checkpoints_load_the_same(golden_case, tmp_path):
    bare = read_state_dict(golden_case / "weights.safetensors")
    nested = {f"Reranker.{k}": v for k, v in bare.items()}
    torch.save(nested, tmp_path / "nested.pth")
    # a whole GeoLocalizationNetRerank saved from DataParallel: the backbone keys are not ours
    whole = {f"module.{k}": v for k, v in nested.items()} | {"module.local_head.weight": torch.zeros(128, 384)}
    torch.save({"state": whole}, tmp_path / "whole.pth")
    reference = golden_module(golden_case).state_dict()
    for name in ("nested.pth", "whole.pth"):
        loaded = build_module("r2former", tmp_path / name, case_config(golden_case)).state_dict()
        assert loaded.keys() == reference.keys()
        assert all(torch.equal(loaded[k], reference[k]) for k in reference)


@pytest.mark.golden("r2former")
def test_sizes_come_from_the_checkpoint(golden_case):
    """A bare official file and nothing but what no tensor shows (heads, correspondences, input
    dimensions): width, depths, MLP ratio and position table come from the tensors."""
    official = case_config(golden_case)
    unseen = {k: official[k] for k in ("decoder_num_heads", "num_corr", "input_dim", "local_dim")}
    module = build_module("r2former", golden_case / "weights.safetensors", unseen).eval()
    expected = golden_module(golden_case).config
    assert module.config == expected
    assert (expected.hidden, expected.depth, expected.num_patches) == (
        official["decoder_embed_dim"], official["decoder_depth"], official["num_patches"])
    for inputs, outputs in inputs_and_outputs(golden_case):
        with torch.no_grad():
            logits = module(side(inputs["x_rerank"]), side(inputs["y_rerank"])).numpy()
        np.testing.assert_allclose(logits, outputs["logits"], atol=1e-5, rtol=0)


# -- checkpoints and configs ---------------------------------------------------------------------


def tiny_reranker(**kw):
    torch.manual_seed(0)
    return create_reranker("r2former", pretrained=False, config=TINY, **{"query_length": 12, "gallery_length": 10, **kw})


def random_image(rng, n, dim=8, pad=0, with_global=True):
    total = n + pad
    return ImageFeatures(
        global_desc=rng.normal(size=dim) if with_global else None,
        local=rng.normal(size=(total, dim)),
        mask=np.r_[np.ones(n, bool), np.zeros(pad, bool)],
        xy=rng.uniform(0, 1, size=(total, 2)),
        weight=rng.uniform(0.1, 3, size=total),
    )


@pytest.fixture
def data():
    rng = np.random.default_rng(1)
    queries = [random_image(rng, n) for n in (12, 7, 9)]
    shortlists = [[random_image(rng, int(rng.integers(5, 11))) for _ in range(k)] for k in (4, 6, 1)]
    return queries, shortlists


def test_save_pretrained_round_trip(tmp_path, data):
    queries, shortlists = data
    reranker = tiny_reranker()
    reranker.save_pretrained(tmp_path / "saved")
    saved = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert saved == {"reranker": "r2former", **R2FormerConfig(**TINY).to_dict()}
    keys = read_state_dict(tmp_path / "saved" / "model.safetensors").keys()
    assert "blocks_2.0.attn.qkv.weight" in keys and "decoder_pred.bias" in keys and "ratio" in keys
    again = create_reranker("r2former", checkpoint=tmp_path / "saved", query_length=12, gallery_length=10)
    for a, b in zip(reranker.rerank_many(queries, shortlists), again.rerank_many(queries, shortlists)):
        np.testing.assert_array_equal(a.scores, b.scores)


def test_checkpoint_mismatch_names_the_keys(tmp_path):
    state = R2Former(R2FormerConfig(**TINY)).state_dict()
    state.pop("pair_head.bias")
    state["Reranker_extra"] = torch.zeros(1)
    torch.save(state, tmp_path / "bad.pth")
    with pytest.raises(StateDictMismatchError, match=r"pair_head\.bias(.|\n)*Reranker_extra"):
        build_module("r2former", tmp_path / "bad.pth", TINY)
    with pytest.raises(StateDictMismatchError, match="pair_head.weight"):  # a checkpoint of another width
        build_module("r2former", tmp_path / "bad.pth", {**TINY, "hidden": 8})
    with pytest.raises(FileNotFoundError):
        create_reranker("r2former", checkpoint=tmp_path / "missing.pth")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        create_reranker("r2former", checkpoint=tmp_path)
    with pytest.raises(ValueError, match="pretrained=False"):
        create_reranker("r2former")


def test_registered_variants_and_config_as_data():
    assert R2FormerConfig(**CONFIGS["r2former"]) == R2FormerConfig()  # the official defaults
    assert CONFIGS["r2former"] == dict(hidden=32, depth=6, pair_depth=2, heads=4, mlp_ratio=4.0, local_dim=128, global_dim=256,
                                       num_corr=5, num_patches=1000)
    wide = create_reranker("r2former-768", pretrained=False, config={"depth": 1, "pair_depth": 1})
    assert wide.module.pair_head.out_features == 768 and wide.local_dim == 768
    assert wide.module.blocks[0].attn.heads == 12
    rng = np.random.default_rng(0)
    result = wide.rerank(random_image(rng, 6, dim=768), [random_image(rng, 6, dim=768) for _ in range(2)])
    assert np.isfinite(result.scores).all() and ((result.scores > 0) & (result.scores < 1)).all()
    with pytest.raises(ValueError, match=r"unknown r2former config key\(s\) \['width'\]; accepted: .*decoder_embed_dim"):
        create_reranker("r2former", pretrained=False, config={"width": 3})
    with pytest.raises(ValueError, match="divisible"):
        create_reranker("r2former", pretrained=False, config={"hidden": 30})
    with pytest.raises(TypeError):
        create_reranker("r2former", pretrained=False, window=3)


# -- behaviour ------------------------------------------------------------------------------------


def test_scores_are_probabilities_ordered_and_batch_independent(data):
    queries, shortlists = data
    together = tiny_reranker(batch_size=64).rerank_many(queries, shortlists)
    single = tiny_reranker(batch_size=1).rerank_many(queries, shortlists)
    for a, b, shortlist in zip(together, single, shortlists):
        np.testing.assert_allclose(a.scores, b.scores, atol=1e-6)
        assert ((a.scores > 0) & (a.scores < 1)).all() and len(a.scores) == len(shortlist)
        np.testing.assert_array_equal(a.order, np.argsort(-a.scores, kind="stable"))


def test_probability_is_softmax_of_the_module_logits(data):
    queries, shortlists = data
    reranker = tiny_reranker()
    query, item = reranker.pair_inputs(queries, np.zeros(4, int), shortlists[0])
    with torch.no_grad():
        logits = reranker.module(reranker._prepare(query, "query"), reranker._prepare(item, "gallery"))
    expected = torch.softmax(logits, 1)[:, 1].numpy()
    np.testing.assert_allclose(reranker.rerank(queries[0], shortlists[0]).scores, expected, atol=1e-6)


def test_local_order_does_not_matter():
    """The official logits are invariant to permuting either image's locals."""
    rng = np.random.default_rng(2)
    query, item = random_image(rng, 12), random_image(rng, 10)
    perm_q, perm_g = rng.permutation(12), rng.permutation(10)
    shuffled_q = ImageFeatures(local=query.local[perm_q], xy=query.xy[perm_q], weight=query.weight[perm_q])
    shuffled_g = ImageFeatures(local=item.local[perm_g], xy=item.xy[perm_g], weight=item.weight[perm_g])
    reranker = tiny_reranker()
    np.testing.assert_allclose(
        reranker.rerank(query, [item]).scores, reranker.rerank(shuffled_q, [shuffled_g]).scores, atol=1e-6
    )


def test_padding_is_ignored_even_with_fewer_locals_than_correspondences():
    """Padded rows (any content) never change the score, also when an image has < num_corr locals."""
    rng = np.random.default_rng(3)
    query = random_image(rng, 9)
    few = random_image(rng, 3)
    padded = [
        ImageFeatures(local=np.r_[few.local, rng.normal(size=(4, 8))], mask=np.r_[np.ones(3, bool), np.zeros(4, bool)],
                      xy=np.r_[few.xy, rng.normal(size=(4, 2))], weight=np.r_[few.weight, rng.normal(size=4) + 5])
        for _ in range(2)
    ]
    reranker = tiny_reranker()
    scores = [reranker.rerank(query, [g]).scores for g in (few, *padded)]
    assert np.isfinite(scores[0]).all()
    for other in scores[1:]:
        np.testing.assert_allclose(other, scores[0], atol=1e-6)


def test_weight_is_max_normalised_per_image():
    """The attention column is divided by its per-image maximum, as the official extractor does."""
    rng = np.random.default_rng(4)
    query, item = random_image(rng, 8), random_image(rng, 8)
    scaled = ImageFeatures(local=item.local, xy=item.xy, weight=item.weight * 7.5)
    reranker = tiny_reranker()
    np.testing.assert_allclose(reranker.rerank(query, [item]).scores, reranker.rerank(query, [scaled]).scores, atol=1e-6)


def test_top_k_rescores_only_the_head(data):
    queries, shortlists = data
    full = tiny_reranker().rerank(queries[1], shortlists[1][:2]).scores
    result = tiny_reranker(top_k=2).rerank(queries[1], shortlists[1], global_scores=np.arange(6, dtype=np.float32))
    np.testing.assert_allclose(result.scores[:2], full, atol=1e-6)
    np.testing.assert_array_equal(result.scores[2:], [2, 3, 4, 5])
    np.testing.assert_array_equal(result.order[2:], [2, 3, 4, 5])
    np.testing.assert_array_equal(result.order[:2], np.argsort(-full, kind="stable"))


def test_fusion_options(data):
    queries, shortlists = data
    plain = tiny_reranker().rerank(queries[0], shortlists[0]).scores
    official = tiny_reranker(fusion="default")
    assert official.fusion == (0.5, 1.0)  # the official initial ratio, clamped to [0.1, 0.9]
    glob = np.stack([d.global_desc for d in shortlists[0]]) @ queries[0].global_desc
    np.testing.assert_allclose(official.rerank(queries[0], shortlists[0]).scores, 0.5 * glob + 0.5 * plain, atol=1e-5)
    with pytest.raises(ValueError, match="fusion"):
        tiny_reranker(fusion="learned")


def test_training_negatives_are_drawn_from_the_hardest_each_time_as_the_official_reranking_stage():
    """Default: one negative per query drawn from its 100 hardest (train_reranking.sh), a new draw per use."""
    reranker = tiny_reranker()
    assert (reranker.negatives_per_query, reranker.negative_pool) == (1, 100)
    label = np.r_[0, 0, 1, np.zeros(150)]  # the best positive is item 2; negatives 0, 1, 3, 4, ...
    hardest = np.flatnonzero(label == 0)[:100]
    drawn = []
    for _ in range(400):
        lists, items, targets = reranker.sample_pairs([label], reranker.rng)
        np.testing.assert_array_equal(items[:1], [2])
        np.testing.assert_array_equal(targets, [1, 0])
        drawn.append(items[1])
    assert set(drawn) <= set(hardest.tolist()) and len(set(drawn)) > 80  # re-drawn, never beyond the 100 hardest
    pooled = tiny_reranker(negatives_per_query=3, negative_pool=5)
    lists, items, targets = pooled.sample_pairs([label], pooled.rng)
    assert len(set(items[3:])) == 3 and set(items[3:]) <= {0, 1, 3, 4, 5}
    with pytest.raises(ValueError, match="negative_pool"):
        tiny_reranker(negatives_per_query=3, negative_pool=2)


def test_training_loss_is_the_official_two_class_cross_entropy(data):
    """Best positive (first) against the hardest negatives (first ones), CE over the two classes."""
    queries, shortlists = data
    reranker = tiny_reranker(negatives_per_query=2, negative_pool=None)
    labels = [np.array([0, 1, 0, 1]), np.array([0, 0, 0, 1, 0, 0]), np.array([1])]  # the last: no negative
    lists, items, targets = reranker.sample_pairs(labels, reranker.rng)
    np.testing.assert_array_equal(lists, [0, 0, 0, 0, 1, 1, 1, 1])
    np.testing.assert_array_equal(items, [1, 1, 0, 2, 3, 3, 0, 1])
    np.testing.assert_array_equal(targets, [1, 1, 0, 0, 1, 1, 0, 0])
    loss = reranker.training_loss(queries, shortlists, labels)
    query, item = reranker.pair_inputs(queries, lists, [shortlists[l][i] for l, i in zip(lists, items)])
    logits = reranker.module(reranker._prepare(query, "query"), reranker._prepare(item, "gallery"))
    expected = F.cross_entropy(logits, torch.as_tensor(targets, dtype=torch.long))
    torch.testing.assert_close(loss, expected, atol=1e-6, rtol=1e-6)
    loss.backward()
    assert reranker.module.pair_head.weight.grad is not None
    # lists without a usable pair give a zero loss that still runs the model (DDP ranks stay in step)
    empty = reranker.training_loss(queries[2:], shortlists[2:], labels[2:])
    assert empty.item() == 0.0 and empty.requires_grad


# -- bad input ------------------------------------------------------------------------------------


def test_bad_input_errors(data):
    queries, shortlists = data
    reranker = tiny_reranker()
    rng = np.random.default_rng(5)
    with pytest.raises(ValueError, match="dimension 6, but the model expects 8"):
        reranker.rerank(random_image(rng, 8, dim=6, with_global=False), shortlists[0])
    no_weight = ImageFeatures(local=rng.normal(size=(6, 8)), xy=rng.uniform(size=(6, 2)))
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['weight'\]"):
        reranker.rerank(queries[0], [no_weight])
    empty = ImageFeatures(local=np.zeros((4, 8)), mask=np.zeros(4, bool), xy=np.zeros((4, 2)), weight=np.zeros(4))
    with pytest.raises(ValueError, match="no valid local descriptors"):
        reranker.rerank(queries[0], [empty])
    with pytest.raises(ValueError, match="NaN"):
        ImageFeatures(local=np.full((4, 8), np.nan), xy=np.zeros((4, 2)), weight=np.ones(4))
    pixels = ImageFeatures(local=rng.normal(size=(6, 8)), xy=rng.uniform(0, 640, size=(6, 2)), weight=np.ones(6))
    with pytest.raises(ValueError, match="max\\(image height, width\\)"):
        reranker.rerank(queries[0], [pixels])
    with pytest.raises(ValueError, match="num_corr"):
        tiny_reranker(gallery_length=4)
    with pytest.raises(ValueError, match="global"):
        tiny_reranker(fusion="default").rerank(random_image(rng, 6, with_global=False), shortlists[0])


def test_fused_attention_equals_the_reference_with_padding_values_and_gradients():
    """Training runs the fused attention: its logits and parameter gradients equal timm's explicit
    softmax (the reference path) on padded inputs."""
    torch.manual_seed(4)
    fused = R2Former(R2FormerConfig(**TINY))
    reference = set_attention_implementation(R2Former(R2FormerConfig(**TINY)), "reference")
    reference.load_state_dict(fused.state_dict())

    def sides(n):
        mask = torch.rand(3, n) > 0.3
        mask[:, :5] = True
        return {"local": torch.randn(3, n, 8), "mask": mask, "xy": torch.rand(3, n, 2), "weight": torch.rand(3, n)}

    query, gallery = sides(9), sides(7)
    grads = []
    for module in (fused, reference):
        logits = module(query, gallery)
        logits.square().sum().backward()
        grads.append((logits.detach(), {n: p.grad.clone() for n, p in module.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(grads[0][0], grads[1][0], atol=1e-5, rtol=1e-5)
    assert grads[0][1].keys() == grads[1][1].keys() and grads[0][1]
    for name in grads[0][1]:
        torch.testing.assert_close(grads[0][1][name], grads[1][1][name], atol=1e-4, rtol=1e-4, msg=name)
