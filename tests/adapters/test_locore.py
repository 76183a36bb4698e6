"""LoCoRE against the official model's outputs (golden fixtures), plus checkpoints, training loss and bad input."""
from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures, create_reranker, list_rerankers
from locore_plugin.adapters.locore import LocoreConfig, LocoreModel, parameter_count
from locore_plugin.io.checkpoints import StateDictMismatchError, read_state_dict
from locore_plugin.listwise import REDUCTIONS, reduce_scores

GOLDEN = pytest.mark.golden("locore")


def fixture_reranker(case, **options):
    """The official fixture's model, loaded through the public path (weights file + config.json beside it)."""
    return create_reranker("locore-base", checkpoint=case / "weights.safetensors", device="cpu", **options)


def official_kwargs(arrays, dtype=torch.float32):
    """The official forward kwargs as our model's arguments; the official 1 = pad masks become True = valid."""
    t = lambda k: torch.from_numpy(arrays[k])
    f = lambda k: t(k).to(dtype)
    return dict(
        query_local=f("query_local_features"), query_scale=t("query_local_scales"),
        query_mask=t("query_local_mask") == 0, gallery_local=f("gallery_local_features"),
        gallery_scale=t("gallery_local_scales"), gallery_mask=t("gallery_local_mask") == 0,
        query_global=f("query_global_features")[:, 0], gallery_global=f("gallery_global_features")[:, :, 0],
    )


def features(arrays, b, k=None):
    """ImageFeatures of the official batch row b (the query when k is None, else gallery image k)."""
    side, index = ("query", (b,)) if k is None else ("gallery", (b, k))
    return ImageFeatures(
        global_desc=arrays[f"{side}_global_features"][index][0],
        local=arrays[f"{side}_local_features"][index],
        scale=arrays[f"{side}_local_scales"][index],
        mask=arrays[f"{side}_local_mask"][index] == 0,
    )


# ---- golden: the official model ----------------------------------------------------------------------


@GOLDEN
def test_state_dict_keys_match_official(golden_case):
    expected = {e["key"]: tuple(e["shape"]) for e in json.loads((golden_case / "keys.json").read_text())}
    model = LocoreModel(LocoreConfig.from_json(json.loads((golden_case / "config.json").read_text())))
    assert {k: tuple(v.shape) for k, v in model.state_dict().items()} == expected


@GOLDEN
def test_token_logits_and_reductions_match_official(golden_case):
    inputs, ref = np.load(golden_case / "inputs.npz"), np.load(golden_case / "outputs.npz")
    batch, num_gallery, num_locals = inputs["gallery_local_mask"].shape
    reranker = fixture_reranker(golden_case, query_length=num_locals, window=num_gallery)
    model = reranker.module
    kwargs = official_kwargs(inputs)
    with torch.inference_mode():
        _, mask, positions = model.build_inputs(**kwargs)
        logits = model(**kwargs)
    length = ref["token_logits"].shape[1]
    assert (mask[:, :length].numpy() == ref["merged_attention_mask"]).all()
    assert (positions.numpy() == ref["position_ids"]).all()
    np.testing.assert_allclose(logits.numpy(), ref["token_logits"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(logits.numpy(), ref["token_logits_f32"], atol=1e-4, rtol=0)
    per_image = reranker.config.tokens_per_image(num_locals)
    for reduction in REDUCTIONS:
        key = "score_" + reduction.replace("-", "_")
        scores = reduce_scores(logits, per_image, reduction).numpy()
        if reduction == "max-prod":  # products of ~N+1 logits: compare relatively
            np.testing.assert_allclose(scores, ref[key], rtol=1e-4)
        else:
            np.testing.assert_allclose(scores, ref[key], atol=1e-4, rtol=0)
            np.testing.assert_allclose(scores, ref[key + "_f32"], atol=1e-4, rtol=0)
        assert (np.argsort(-scores, axis=1, kind="stable") == ref["order_" + reduction.replace("-", "_")]).all()

    model.double()
    with torch.inference_mode():
        logits64 = model(**official_kwargs(inputs, torch.float64))
    np.testing.assert_allclose(logits64.numpy(), ref["token_logits"], atol=1e-9, rtol=0)


@GOLDEN
def test_sliding_window_reranking_matches_official(golden_case):
    if not (golden_case / "sliding.npz").is_file():
        pytest.skip(f"{golden_case.name} has no sliding-window case")
    data = np.load(golden_case / "sliding.npz")
    settings = json.loads((golden_case / "sliding.json").read_text())
    batch, shortlist, num_locals = data["gallery_local_mask"].shape
    reranker = fixture_reranker(
        golden_case, query_length=num_locals, window=settings["window_size (--topk)"],
        stride=settings["stride (--sliding_stride)"], top_k=shortlist, fusion=(settings["alpha"], settings["temp"]),
        batch_size=2,
    )
    fed, raw = [], []
    score_windows = reranker.score_windows

    def recording(items):
        out = score_windows(items)
        fed.append([rows.cpu().numpy() for _, _, rows in items])
        raw.append(out)
        return out

    reranker.score_windows = recording
    queries = [features(data, b) for b in range(batch)]
    shortlists = [[features(data, b, k) for k in range(shortlist)] for b in range(batch)]
    results = reranker.rerank_many(queries, shortlists, [data["global_sims"][b] for b in range(batch)])

    assert [len(step) for step in fed] == [batch] * len(data["window_starts"])  # both queries share each forward
    for b, result in enumerate(results):
        assert (np.stack([step[b] for step in fed]) == data["window_input_order"][b]).all()
        np.testing.assert_allclose(np.stack([step[b] for step in raw]), data["window_local_logits"][b], atol=1e-4, rtol=0)
        assert (result.order == data["final_order"][b]).all()
        assert (data["shortlist_db_ids"][b][result.order] == data["final_db_ids"][b]).all()
        np.testing.assert_allclose(result.scores, data["final_ensemble_score"][b], atol=1e-6, rtol=0)


@GOLDEN
def test_bfloat16_sliding_window_ranking_agrees_with_float32(golden_case):
    """bfloat16 (the fast CPU precision) against float32 on the official sliding-window case, same
    weights: the top 10 agree (at least 9 of 10) and any two items bfloat16 puts in the other
    order are within the bfloat16 perturbation of each other in float32 (their float32 score gap
    is at most twice the largest score change). The per-token logits move by bfloat16's 8-bit
    mantissa through every layer; only near-ties may swap."""
    if not (golden_case / "sliding.npz").is_file():
        pytest.skip(f"{golden_case.name} has no sliding-window case")
    data = np.load(golden_case / "sliding.npz")
    settings = json.loads((golden_case / "sliding.json").read_text())
    batch, shortlist, num_locals = data["gallery_local_mask"].shape
    queries = [features(data, b) for b in range(batch)]
    shortlists = [[features(data, b, k) for k in range(shortlist)] for b in range(batch)]
    results = {}
    for dtype in ("fp32", "bf16"):
        reranker = fixture_reranker(
            golden_case, query_length=num_locals, window=settings["window_size (--topk)"],
            stride=settings["stride (--sliding_stride)"], top_k=shortlist, fusion=(settings["alpha"], settings["temp"]),
            dtype=dtype,
        )
        results[dtype] = reranker.rerank_many(queries, shortlists, [data["global_sims"][b] for b in range(batch)])
    for full, reduced in zip(results["fp32"], results["bf16"]):
        assert len(set(full.order[:10]) & set(reduced.order[:10])) >= 9
        score_full, score_reduced = full.scores, reduced.scores  # one per shortlist item (RerankResult)
        perturbation = np.abs(score_full - score_reduced).max()
        rank_full, rank_reduced = np.argsort(full.order), np.argsort(reduced.order)
        swapped = (np.sign(rank_full[:, None] - rank_full[None, :]) != np.sign(rank_reduced[:, None] - rank_reduced[None, :]))
        gaps = np.abs(score_full[:, None] - score_full[None, :])[swapped]
        assert (gaps <= 2 * perturbation).all(), (gaps.max(), perturbation)


@GOLDEN
@pytest.mark.parametrize("reduction", ["max-end", "max-sum", "max-start"])
def test_one_window_matches_official_non_sliding_path(golden_case, reduction):
    if not (golden_case / "sliding.npz").is_file():
        pytest.skip(f"{golden_case.name} has no sliding-window case")
    data = np.load(golden_case / "sliding.npz")
    key = reduction.replace("-", "_")
    top = data[f"oneshot_order_{key}"].shape[1]
    num_locals = data["gallery_local_mask"].shape[2]
    reranker = fixture_reranker(golden_case, query_length=num_locals, window=top, top_k=top, reduction=reduction)
    for b in range(data["global_sims"].shape[0]):
        result = reranker.rerank(features(data, b), [features(data, b, k) for k in range(top)], data["global_sims"][b][:top])
        assert (result.order == data[f"oneshot_order_{key}"][b]).all()
        np.testing.assert_allclose(result.scores, data[f"oneshot_ensemble_{key}"][b], atol=1e-6, rtol=0)


# ---- checkpoints ---------------------------------------------------------------------------------------


def small_config(**overrides):
    base = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                attention_window=(8, 16), max_position_embeddings=258, local_dim=24, global_dim=16)
    return LocoreConfig(**{**base, **overrides})


def random_images(rng, count, num_locals=6, local_dim=24, global_dim=16, valid=None):
    out = []
    for i in range(count):
        n = num_locals if valid is None else valid
        out.append(ImageFeatures(
            global_desc=rng.normal(size=global_dim) / np.sqrt(global_dim), local=rng.normal(size=(n, local_dim)),
            scale=rng.integers(0, 3, n), weight=rng.random(n),
        ))
    return out


def test_registered_names():
    names = {e.name for e in list_rerankers()}
    assert {"locore-tiny", "locore-small", "locore-base"} <= names


def test_tiny_parameter_count_by_formula():
    h, ffn, layers, pos, desc = 512, 2048, 4, 5122, 768
    layer = 7 * (h * h + h) + 2 * h + (h * ffn + ffn) + (ffn * h + h) + 2 * h  # 6 q/k/v + out, 2 LayerNorms, FFN
    embeddings = pos * h + h + 2 * h  # positions, token type, LayerNorm
    extra = 2 * h + (2 * h + 2) + 3 * h + 2 * (desc * h + h)  # sep/pad, classifier, scales, 2 projections
    assert parameter_count("locore-tiny") == layers * layer + embeddings + extra == 19_176_450


def test_variant_configs_are_table_a():
    tiny, small, base = (LocoreConfig.variant(n) for n in ("locore-tiny", "locore-small", "locore-base"))
    assert (tiny.num_hidden_layers, tiny.hidden_size, tiny.intermediate_size, tiny.num_attention_heads,
            set(tiny.attention_window)) == (4, 512, 2048, 8, {1024})
    assert (small.num_hidden_layers, small.hidden_size, set(small.attention_window)) == (6, 768, {512})
    assert (base.num_hidden_layers, base.hidden_size, base.num_attention_heads) == (12, 768, 12)
    assert {c.context for c in (tiny, small, base)} == {5120}


@pytest.fixture(scope="module")
def small_checkpoint(tmp_path_factory):
    """A folder in our checkpoint layout holding a small random model (fast to build)."""
    from safetensors.torch import save_file

    folder = tmp_path_factory.mktemp("locore_small")
    torch.manual_seed(0)
    config = small_config()
    save_file(LocoreModel(config).state_dict(), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config.to_json()))
    return folder


@pytest.fixture
def small(small_checkpoint):
    """``small(**options)``: a re-ranker on the small checkpoint, 6 locals, window 5, stride 2, shortlist 9."""
    defaults = dict(device="cpu", query_length=6, window=5, stride=2, top_k=9)
    return lambda **options: create_reranker("locore-tiny", checkpoint=small_checkpoint, **{**defaults, **options})


def test_save_pretrained_round_trip(small, tmp_path):
    rng = np.random.default_rng(0)
    reranker = small()
    reranker.save_pretrained(tmp_path / "ckpt")
    assert sorted(p.name for p in (tmp_path / "ckpt").iterdir()) == ["config.json", "model.safetensors"]
    loaded = create_reranker("locore-tiny", checkpoint=tmp_path / "ckpt", device="cpu", query_length=6, window=5,
                             stride=2, top_k=9)
    assert loaded.config == reranker.config
    for key, value in reranker.module.state_dict().items():
        assert torch.equal(loaded.module.state_dict()[key], value)
    query, *shortlist = random_images(rng, 13)
    first, second = reranker.rerank(query, shortlist), loaded.rerank(query, shortlist)
    assert (first.order == second.order).all() and np.array_equal(first.scores, second.scores)


def test_head_logits_are_the_one_window_logits_that_reranking_fuses(small):
    """Fusion tuning scores the head in one window: fusing those logits with any (alpha, T) gives
    exactly the ranking and scores of re-ranking with that fusion when the head fits one window."""
    from locore_plugin.fusion import fuse_scores

    rng = np.random.default_rng(4)
    queries = [random_images(rng, 1)[0] for _ in range(3)]
    shortlists = [random_images(rng, n) for n in (5, 3, 7)]
    logits = small(top_k=5).head_logits(queries, shortlists)
    assert [len(l) for l in logits] == [5, 3, 5]
    for fusion in ((0.0, 1.0), (0.3, 0.7), (0.9, 0.1)):
        for q, s, logit in zip(queries, shortlists, logits):
            result = small(top_k=5, fusion=fusion).rerank(q, s)
            glob = np.stack([d.global_desc for d in s[: len(logit)]]) @ q.global_desc
            fused = fuse_scores(glob, logit, *fusion)
            np.testing.assert_allclose(result.scores[: len(logit)], fused, atol=1e-6)
            np.testing.assert_array_equal(result.order[: len(logit)], np.argsort(-fused, kind="stable"))
    with pytest.raises(ValueError, match="top_k <= 5"):
        small(top_k=7).head_logits(queries, shortlists)


def test_official_layout_without_config_takes_dims_from_weights(tmp_path, small_checkpoint):
    from safetensors.torch import save_file

    save_file(LocoreModel(LocoreConfig.variant("locore-tiny", local_dim=40, global_dim=512)).state_dict(),
              str(tmp_path / "model.safetensors"))
    reranker = create_reranker("locore-tiny", checkpoint=tmp_path, device="cpu")
    assert (reranker.config.local_dim, reranker.config.global_dim) == (40, 512)
    assert isinstance(reranker.module.global_to_lm, torch.nn.Identity)
    assert isinstance(reranker.module.local_to_lm, torch.nn.Linear)
    # A checkpoint of another architecture, without its config: the error names the keys.
    with pytest.raises(StateDictMismatchError, match=r"missing keys .*encoder\.layer\.3\.") as error:
        _load_without_config(small_checkpoint, tmp_path)
    assert "shape mismatches" in str(error.value)


def _load_without_config(folder, tmp_path):
    bare = tmp_path / "bare"
    bare.mkdir()
    shutil.copy(folder / "model.safetensors", bare / "model.safetensors")
    return create_reranker("locore-tiny", checkpoint=bare, device="cpu")


@GOLDEN
def test_key_mismatch_names_the_keys(golden_case, tmp_path):
    state = read_state_dict(golden_case / "weights.safetensors")
    state["language_model.extra.weight"] = torch.zeros(1)
    del state["scale_encoder.weight"]
    state["language_model.classifier.bias"] = torch.zeros(3)
    from safetensors.torch import save_file

    save_file(state, str(tmp_path / "model.safetensors"))
    shutil.copy(golden_case / "config.json", tmp_path / "config.json")
    with pytest.raises(StateDictMismatchError) as error:
        create_reranker("locore-base", checkpoint=tmp_path, device="cpu", query_length=8, window=12)
    message = str(error.value)
    assert "scale_encoder.weight" in message and "language_model.extra.weight" in message
    assert "language_model.classifier.bias: checkpoint (3,) vs model (2,)" in message


def test_missing_checkpoint_and_offline_hub(tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="not found"):
        create_reranker("locore-tiny", checkpoint=tmp_path / "absent", device="cpu")
    with pytest.raises(FileNotFoundError, match="holds no model.safetensors"):
        create_reranker("locore-tiny", checkpoint=tmp_path, device="cpu")
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    with pytest.raises(FileNotFoundError, match="could not be fetched from the Hugging Face hub"):
        create_reranker("locore-base", checkpoint="vislang/locore_dinov2_base", device="cpu")


def test_options_are_validated():
    with pytest.raises(TypeError):
        create_reranker("locore-tiny", no_such_option=1)
    with pytest.raises(ValueError, match="pretrained=False"):
        create_reranker("locore-tiny", pretrained=False, checkpoint="x")
    with pytest.raises(ValueError, match="locore-tiny needs checkpoint=.*pass pretrained=False"):
        create_reranker("locore-tiny")  # random weights only when asked for
    with pytest.raises(ValueError, match="unknown reduction"):
        create_reranker("locore-tiny", pretrained=False, reduction="max-mean")
    with pytest.raises(ValueError, match="unknown order"):
        create_reranker("locore-tiny", pretrained=False, order="middle-out")
    with pytest.raises(ValueError, match="unknown attn_implementation"):
        create_reranker("locore-tiny", pretrained=False, attn_implementation="magic")
    # Table C settings fit the 5,120 context; one image more than the budget does not.
    LocoreConfig.variant("locore-tiny").check_context(50, 98)
    LocoreConfig.variant("locore-tiny").check_context(200, 23)
    with pytest.raises(ValueError, match=r"context budget exceeded: \(1 \+ 102 images\) x 50 tokens = 5150, padded to 6144"):
        create_reranker("locore-tiny", pretrained=False, window=102)
    with pytest.raises(ValueError, match="padded to 5632 .*512.* 5120 positions"):
        LocoreConfig.variant("locore-base").check_context(102, 48)


# ---- inference behaviour and bad input -------------------------------------------------------------------


def test_rerank_sliding_order_scores_and_tail(small):
    rng = np.random.default_rng(1)
    query, *shortlist = random_images(rng, 13)
    reranker = small()
    result = reranker.rerank(query, shortlist)
    assert sorted(result.order) == list(range(12))
    assert (result.order[9:] == np.arange(9, 12)).all()  # beyond the shortlist: global order
    g = np.stack([s.global_desc for s in shortlist]) @ query.global_desc
    np.testing.assert_allclose(result.scores[9:], g[9:], rtol=1e-6)
    assert ((result.scores[:9] > 0) & (result.scores[:9] < 1)).all()


def test_batched_queries_equal_single_queries(small):
    rng = np.random.default_rng(2)
    lists = [random_images(rng, n) for n in (13, 4, 9)]  # the 3-image list is shorter than the window
    reranker = small(batch_size=2)
    together = reranker.rerank_many([l[0] for l in lists], [l[1:] for l in lists])
    for images, result in zip(lists, together):
        alone = reranker.rerank(images[0], images[1:])
        assert (alone.order == result.order).all()
        np.testing.assert_allclose(alone.scores, result.scores, atol=1e-6)


def test_more_locals_than_num_locals_keeps_the_strongest(small):
    rng = np.random.default_rng(3)
    query, *shortlist = random_images(rng, 6, num_locals=10)
    top = [np.sort(np.argsort(-f.weight)[:6]) for f in shortlist]
    trimmed = [ImageFeatures(global_desc=f.global_desc, local=f.local[t], scale=f.scale[t]) for f, t in zip(shortlist, top)]
    q_top = np.sort(np.argsort(-query.weight)[:6])
    q_trimmed = ImageFeatures(global_desc=query.global_desc, local=query.local[q_top], scale=query.scale[q_top])
    reranker = small()
    full, cut = reranker.rerank(query, shortlist), reranker.rerank(q_trimmed, trimmed)
    assert (full.order == cut.order).all() and np.array_equal(full.scores, cut.scores)


def test_bad_input(small):
    rng = np.random.default_rng(4)
    query, *shortlist = random_images(rng, 4)
    reranker = small()
    with pytest.raises(ValueError, match="local descriptors have dimension 20, this LoCoRE model takes 24"):
        reranker.rerank(random_images(rng, 1, local_dim=20)[0], shortlist)
    with pytest.raises(ValueError, match="global descriptors have dimension 8, this LoCoRE model takes 16"):
        reranker.rerank(*(lambda q, *s: (q, s))(*random_images(rng, 4, global_dim=8)))
    with pytest.raises(ValueError, match="query 0 has no valid local descriptors"):
        reranker.rerank(ImageFeatures(global_desc=query.global_desc, local=query.local, scale=query.scale,
                                      mask=np.zeros(6, bool)), shortlist)
    with pytest.raises(ValueError, match="query 0 has no valid local descriptors"):
        reranker.rerank(ImageFeatures(global_desc=query.global_desc), shortlist)
    with pytest.raises(ValueError, match="shortlist is empty"):
        reranker.rerank(query, [])
    with pytest.raises(ValueError, match="NaN"):
        reranker.rerank(query, shortlist, global_scores=np.array([0.1, np.nan, 0.2]))
    with pytest.raises(ValueError, match="NaN"):
        ImageFeatures(local=np.full((2, 24), np.nan))
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['scale'\]"):
        reranker.rerank(ImageFeatures(global_desc=query.global_desc, local=query.local), shortlist)
    with pytest.raises(ValueError, match="scale ids must be integers in"):
        reranker.rerank(ImageFeatures(global_desc=query.global_desc, local=query.local, scale=np.full(6, 3)), shortlist)
    with pytest.raises(ValueError, match="needs the column"):  # this model uses global descriptors
        reranker.rerank(ImageFeatures(local=query.local, scale=query.scale), shortlist, global_scores=np.zeros(3))


def test_gallery_image_without_valid_locals_is_scored(small):
    rng = np.random.default_rng(5)
    query, *shortlist = random_images(rng, 4)
    shortlist[1] = ImageFeatures(global_desc=shortlist[1].global_desc, local=shortlist[1].local,
                                 scale=shortlist[1].scale, mask=np.zeros(6, bool))
    assert sorted(small().rerank(query, shortlist).order) == [0, 1, 2]


def test_through_rerankers(small_checkpoint):
    from rerankers import Reranker

    rng = np.random.default_rng(9)
    query, *docs = random_images(rng, 8)
    options = dict(checkpoint=small_checkpoint, device="cpu", query_length=6, window=5, stride=2, verbose=0)
    ranked = Reranker("locore-tiny", **options).rank(query, docs)
    expected = create_reranker("locore-tiny", **options).rerank(query, docs)
    assert [r.doc_id for r in ranked.results] == expected.order.tolist()
    np.testing.assert_allclose([r.score for r in ranked.results], expected.scores[expected.order], rtol=1e-6)


def test_without_global_descriptors(tmp_path):
    from safetensors.torch import save_file

    model = LocoreModel(small_config(use_global=False))
    assert not any(k.startswith("global_to_lm") for k in model.state_dict())  # as the official "noglobal" models
    save_file(model.state_dict(), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps(model.config.to_json()))
    rng = np.random.default_rng(6)
    images = [ImageFeatures(local=f.local, scale=f.scale) for f in random_images(rng, 8)]
    reranker = create_reranker("locore-tiny", checkpoint=tmp_path, device="cpu", query_length=6, window=5, stride=2)
    assert reranker.config.tokens_per_image(6) == 7
    with pytest.raises(ValueError, match="global similarities"):
        reranker.rerank(images[0], images[1:])
    result = reranker.rerank(images[0], images[1:], global_scores=np.linspace(1, 0, 7))
    assert sorted(result.order) == list(range(7))


def test_half_precision_runs_close_to_float32(small):
    rng = np.random.default_rng(7)
    query, *shortlist = random_images(rng, 6)
    reference = small().rerank(query, shortlist).scores
    np.testing.assert_allclose(small(dtype="bf16").rerank(query, shortlist).scores, reference, atol=0.05)


# ---- training ----------------------------------------------------------------------------------------------


def test_training_loss_is_token_cross_entropy_over_gallery_tokens(small):
    rng = np.random.default_rng(8)
    reranker = small(dtype="fp64")
    lists = [random_images(rng, 5), random_images(rng, 5), random_images(rng, 3)]
    labels = [np.array([1, 0, 0, 1]), np.array([0, 0, 1, 0]), np.array([0, 1])]
    loss = reranker.training_loss([l[0] for l in lists], [l[1:] for l in lists], labels)
    # Independent expectation: each list alone, -log softmax of its label at every gallery token.
    per_image, total, count = reranker.config.tokens_per_image(6), 0.0, 0
    for images, label in zip(lists, labels):
        kw = reranker._batch([(*reranker._prepare(images[0], images[1:], 0), torch.arange(len(images) - 1))])
        with torch.no_grad():
            logp = torch.log_softmax(reranker.module(**kw)[0], -1).numpy()
        for image, y in enumerate(label):
            rows = slice((image + 1) * per_image, (image + 2) * per_image)
            total -= logp[rows, y].sum()
            count += per_image
    assert loss.item() == pytest.approx(total / count, rel=1e-10)
    loss.backward()
    assert reranker.module.language_model.classifier.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="labels must be 0/1"):
        reranker.training_loss([lists[0][0]], [lists[0][1:]], [np.array([2, 0, 0, 1])])


def test_config_overrides_build_a_small_model_from_scratch():
    small = dict(hidden_size=32, num_hidden_layers=1, num_attention_heads=2, intermediate_size=64,
                 attention_window=32, max_position_embeddings=1026, local_dim=16, global_dim=16)
    reranker = create_reranker("locore-tiny", pretrained=False, query_length=6, window=5, stride=5, config=small)
    layers = reranker.module.state_dict()
    assert reranker.config.hidden_size == 32 and reranker.config.attention_window == (32,)
    assert sum(1 for k in layers if ".layer." in k and k.endswith("attention.self.query.weight")) == 1
    with pytest.raises(ValueError, match=r"unknown LoCoRE config key\(s\) \['hidden'\]"):
        create_reranker("locore-tiny", pretrained=False, config={"hidden": 3})
