"""RRT against the official model's outputs (../shared/golden/rrt), plus scale bins, pair sampling and input checks."""
import json
import lzma

import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.adapters.rrt import CONFIGS
from locore_plugin.features import stack_locals


def unxz(path, target):
    target.write_bytes(lzma.decompress(path.read_bytes()))
    return target


def images(inputs, role):
    """ImageFeatures from the official model-ready arrays (mask True = padding, NaN scale = padding)."""
    return [
        ImageFeatures(global_desc=g, local=l, mask=~m, scale=np.nan_to_num(s), xy=p)
        for g, l, m, s, p in zip(
            inputs[f"{role}_global"], inputs[f"{role}_local"], inputs[f"{role}_mask"],
            inputs[f"{role}_scale_values"], inputs[f"{role}_positions"],
        )
    ]


def load_case(case):
    inputs = np.load(case / "inputs.npz")
    config = json.loads((case / "config.json").read_text())
    return images(inputs, "query"), images(inputs, "gallery"), inputs, np.load(case / "outputs.npz"), config


def rrt(checkpoint, config, architecture=None, **kw):
    """The case's model: built from its own official constructor arguments (``architecture``
    overrides them; a dict without sizes leaves them to the checkpoint's tensors)."""
    length = config["max_sequence_len"]
    official = config["constructor_kwargs"] if architecture is None else architecture
    return create_reranker("rrt", checkpoint=checkpoint, config=official, query_length=length, gallery_length=length, **kw)


def all_pairs(reranker, queries, gallery):
    return np.stack([r.scores for r in reranker.rerank_many(queries, [gallery] * len(queries))])


@pytest.mark.golden("rrt")
@pytest.mark.parametrize("attn", ["sdpa", "reference"])
@pytest.mark.parametrize("container", ["checkpoint.pt.xz", "weights.safetensors.xz"])
def test_logits_match_official(golden_case, container, attn, tmp_path):
    queries, gallery, _, outputs, config = load_case(golden_case)
    suffix = ".pt" if container.endswith(".pt.xz") else ".safetensors"
    reranker = rrt(unxz(golden_case / container, tmp_path / f"w{suffix}"), config, batch_size=5, attn_implementation=attn)
    np.testing.assert_allclose(all_pairs(reranker, queries, gallery), outputs["logits"], atol=1e-4, rtol=0)
    qi, gi = outputs["debug_pair"]
    single = rrt(tmp_path / f"w{suffix}", config, batch_size=1, attn_implementation=attn).rerank(queries[qi], [gallery[gi]]).scores
    np.testing.assert_allclose(single, outputs["debug_logit"], atol=1e-4, rtol=0)


@pytest.mark.golden("rrt")
def test_sizes_come_from_the_checkpoint(golden_case, tmp_path):
    """A bare official file and nothing but what no tensor shows (heads, activation, dropout):
    depth and widths are read from the tensors, and the logits are the official ones."""
    queries, gallery, _, outputs, config = load_case(golden_case)
    official = config["constructor_kwargs"]
    unseen = {k: official[k] for k in ("nhead", "activation", "dropout")}
    reranker = rrt(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config, unseen)
    sized = {k: official[k] for k in ("d_global", "d_model", "num_encoder_layers", "dim_feedforward", "normalize_before")}
    assert {k: reranker.module.config[k] for k in sized} == sized
    np.testing.assert_allclose(all_pairs(reranker, queries, gallery), outputs["logits"], atol=1e-4, rtol=0)
    # the sacred ingredient's names are accepted too
    ingredient = config.get("ingredient_config")
    if ingredient:
        again = rrt(tmp_path / "w.pt", config, ingredient)
        assert again.module.config == reranker.module.config


@pytest.mark.golden("rrt")
def test_raw_delg_features_give_the_official_inputs(golden_case, tmp_path):
    """From the raw ragged features (attention as detector weight): same truncation, scale bins and logits."""
    from locore_plugin.adapters.rrt import scale_index

    _, _, inputs, outputs, config = load_case(golden_case)
    raw = np.load(golden_case / "raw_delg.npz")
    bounds = np.r_[0, np.cumsum(raw["feature_counts"])]
    features = []
    for i in range(len(raw["image_names"])):
        part = slice(bounds[i], bounds[i + 1])
        yx = raw["locations_yx"][part]
        features.append(ImageFeatures(
            global_desc=raw["global_desc"][i], local=raw["descriptors"][part], scale=raw["scales"][part],
            weight=raw["attention"][part], xy=np.stack([yx[:, 1] / raw["widths"][i], yx[:, 0] / raw["heights"][i]], -1),
        ))
    n_query = len(inputs["query_global"])
    length = config["max_sequence_len"]
    for role, group in (("query", features[:n_query]), ("gallery", features[n_query:])):
        stacked = stack_locals(group, length, ("scale", "xy"))
        np.testing.assert_array_equal(stacked["local"], inputs[f"{role}_local"])
        np.testing.assert_array_equal(stacked["mask"], ~inputs[f"{role}_mask"])
        np.testing.assert_array_equal(stacked["xy"], inputs[f"{role}_positions"])
        bins = scale_index(torch.from_numpy(stacked["scale"])).numpy()
        np.testing.assert_array_equal(np.where(stacked["mask"], bins, 0), inputs[f"{role}_scale_inds"])
    reranker = rrt(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config)
    got = all_pairs(reranker, features[:n_query], features[n_query:])
    np.testing.assert_allclose(got, outputs["logits"], atol=1e-4, rtol=0)


@pytest.mark.golden("rrt")
def test_scale_bins_follow_the_official_bisect(golden_case):
    from locore_plugin.adapters.rrt import scale_index

    mapping = json.loads((golden_case / "scale_mapping.json").read_text())["mapping"]
    scales = torch.tensor([m["scale"] for m in mapping], dtype=torch.float64)
    assert scale_index(scales).tolist() == [m["index"] for m in mapping]
    # the scales real files hold are float32 values: the float32 path gives the same bins
    f32 = [m for m in mapping if np.float64(np.float32(m["scale"])) == m["scale"]]
    got = scale_index(torch.tensor([m["scale"] for m in f32], dtype=torch.float32)).tolist()
    assert got == [m["index"] for m in f32]
    assert {m["index"] for m in mapping if "DELG feature scale" in m["note"]} == {0, 2, 4, 6}


def push_down(inds, junk):
    is_junk = np.isin(inds, junk)
    return np.r_[inds[~is_junk], inds[is_junk]]


@pytest.mark.golden("rrt")
def test_official_ranking_by_logit_alone(golden_case, tmp_path):
    queries, gallery, inputs, outputs, config = load_case(golden_case)
    gnd = json.loads((golden_case / "gnd.json").read_text())["gnd"]
    reranker = rrt(unxz(golden_case / "weights.safetensors.xz", tmp_path / "w.safetensors"), config, top_k=100)
    assert reranker.fusion is None
    for name, junk_of in [("medium", lambda g: g["junk"]), ("hard", lambda g: g["junk"] + g["easy"])]:
        lists = np.stack([push_down(inputs["nn_inds"][i], junk_of(g)) for i, g in enumerate(gnd)])
        np.testing.assert_array_equal(lists, outputs[f"{name}_nn_inds"])
        results = reranker.rerank_many(queries, [[gallery[j] for j in row] for row in lists])
        np.testing.assert_allclose(np.stack([r.scores for r in results]), outputs[f"{name}_scores"], atol=1e-4)
        ranks = np.stack([row[r.order] for row, r in zip(lists, results)])
        np.testing.assert_array_equal(ranks, outputs[f"{name}_ranks"])


@pytest.mark.golden("rrt")
def test_fusion_is_optional(golden_case, tmp_path):
    queries, gallery, inputs, outputs, config = load_case(golden_case)
    reranker = rrt(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config, fusion=(0.5, 0.1))
    result = reranker.rerank(queries[0], gallery, inputs["global_sims"][0])
    expected = 0.5 * inputs["global_sims"][0] + 0.5 / (1 + np.exp(-0.1 * outputs["logits"][0].astype(np.float64)))
    np.testing.assert_allclose(result.scores, expected, atol=1e-5)


@pytest.mark.golden("rrt")
def test_training_pairs_follow_the_official_sampler(golden_case, tmp_path):
    """The official TripletSampler is the data's pairs="triplet" (power 0, >= 5 positives in the first
    100): each anchor's list is one random positive and one random negative, and the loss is the
    binary cross-entropy of the official logits of those two pairs."""
    from locore_plugin.data.training_lists import TrainingLists

    queries, gallery, _, outputs, config = load_case(golden_case)
    reranker = rrt(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config)
    n_query, n_gallery = len(queries), len(gallery)
    images = queries + gallery
    # every query's neighbours: the whole gallery in file order; landmark ids make the labels
    neighbours = np.tile(np.arange(n_query, n_query + n_gallery), (n_query + n_gallery, 1))
    # query 0 shares landmark 0 with every other gallery image; the rest of the gallery are distractors
    landmark = np.r_[np.arange(n_query), np.where(np.arange(n_gallery) % 2 == 0, 0, -1)]
    lists = TrainingLists(images, neighbours, landmark, list_length=n_gallery, pairs="triplet", triplet_power=0,
                          min_positives=5)
    # queries 1, 2 have no positive, distractors are never anchors; landmark-0 gallery images are anchors too
    assert lists.queries.tolist() == [0, *range(n_query, n_query + n_gallery, 2)]
    batch = [lists[0]]
    assert batch[0].labels.tolist() == [1, 0]
    picked = [gallery.index(item) for item in batch[0].shortlist]
    assert landmark[n_query + picked[0]] == 0 and landmark[n_query + picked[1]] != 0
    loss = reranker.training_loss([b.query for b in batch], [b.shortlist for b in batch], [b.labels for b in batch])
    x = outputs["logits"][0, picked].astype(np.float64)
    assert loss.item() == pytest.approx(np.mean(np.logaddexp(0, x) - np.array([1, 0]) * x), abs=1e-5)
    loss.backward()
    assert reranker.module.scale_encoder.weight.grad.abs().sum() > 0


@pytest.mark.golden("rrt")
def test_save_pretrained_round_trip(golden_case, tmp_path):
    queries, gallery, _, _, config = load_case(golden_case)
    reranker = rrt(unxz(golden_case / "checkpoint.pt.xz", tmp_path / "w.pt"), config)
    reranker.save_pretrained(tmp_path / "saved")
    again = rrt(tmp_path / "saved", config)
    np.testing.assert_array_equal(all_pairs(again, queries[:1], gallery), all_pairs(reranker, queries[:1], gallery))


def tiny(**kw):
    config = dict(d_global=12, d_model=8, nhead=2, num_encoder_layers=2, dim_feedforward=16)
    return create_reranker("rrt", pretrained=False, config=config, query_length=6, gallery_length=6, **kw)


def image(rng, n=4, d_local=8, d_global=12, scale=1.0, **kw):
    return ImageFeatures(global_desc=rng.normal(size=d_global), local=rng.normal(size=(n, d_local)),
                         scale=np.full(n, scale), **kw)


def test_registered_defaults_and_keys():
    r = create_reranker("rrt", pretrained=False)
    assert (r.query_length, r.gallery_length, r.fusion, r.top_k) == (500, 500, None, None)
    assert sorted(k for k in r.module.state_dict() if not k.startswith("encoder.")) == [
        "classifier.bias", "classifier.weight", "remap.bias", "remap.weight", "scale_encoder.weight", "seg_encoder.weight",
    ]
    big = create_reranker("rrt-768", pretrained=False, config=dict(num_encoder_layers=1))
    assert big.module.remap.weight.shape == (768, 768) and (big.local_dim, big.global_dim) == (768, 768)


def test_bad_inputs_are_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    q = image(rng)
    assert np.isfinite(tiny().rerank(q, [image(rng, n=1), image(rng, n=9)]).scores).all()
    with pytest.raises(ValueError, match=r"needs the column\(s\) \['scale'\]"):
        tiny().rerank(q, [ImageFeatures(global_desc=rng.normal(size=12), local=rng.normal(size=(3, 8)))])
    with pytest.raises(ValueError, match="global_desc"):
        tiny().rerank(q, [ImageFeatures(local=rng.normal(size=(3, 8)), scale=np.ones(3))])
    with pytest.raises(ValueError, match="local descriptors have dimension 5, but the model expects 8"):
        tiny().rerank(q, [image(rng, d_local=5)])
    with pytest.raises(ValueError, match="global descriptors have dimension 7, but the model expects 12"):
        tiny().rerank(image(rng, d_global=7), [image(rng, d_global=7)])
    with pytest.raises(ValueError, match="scale 0.3 is below the smallest scale bin 0.5.*scale_column='index'"):
        tiny().rerank(q, [image(rng, scale=0.3)])
    with pytest.raises(ValueError, match="no valid local descriptors"):
        tiny().rerank(q, [image(rng, mask=np.zeros(4, bool))])
    with pytest.raises(ValueError, match="NaN"):
        image(rng, scale=np.nan)
    with pytest.raises(ValueError, match="checkpoint="):
        create_reranker("rrt")
    with pytest.raises(TypeError):
        create_reranker("rrt", pretrained=False, lamb=0.5)
    torch.save({"state": {"remap.weight": torch.zeros(3, 3)}}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match=r"(?s)missing keys .*classifier\.bias.*shape mismatches \(1\): remap\.weight"):
        create_reranker("rrt", checkpoint=tmp_path / "bad.pt", config=CONFIGS["rrt"])


@pytest.mark.golden("rrt")
@pytest.mark.parametrize("dtype, atol", [("fp16", 0.1), ("bf16", 0.5)])
def test_reduced_precision_stays_close(golden_case, dtype, atol, tmp_path):
    """Zero padding stays zero through the L2 normalisation in float16 (the official eps underflows there)."""
    queries, gallery, _, outputs, config = load_case(golden_case)
    reranker = rrt(unxz(golden_case / "weights.safetensors.xz", tmp_path / "w.safetensors"), config, dtype=dtype)
    np.testing.assert_allclose(all_pairs(reranker, queries, gallery), outputs["logits_f64"], atol=atol, rtol=0)


def test_scale_column_index_uses_the_level_as_the_bin():
    """AMES-format files store the pyramid level (0 for DINOv2): with scale_column='index' it is the bin."""
    rng = np.random.default_rng(2)
    levels = np.array([0, 2, 6, 1])
    q = image(rng)
    item = ImageFeatures(global_desc=rng.normal(size=12), local=rng.normal(size=(4, 8)), scale=levels)
    by_index = tiny(scale_column="index")
    by_value = tiny(scale_column="value")
    by_value.module.load_state_dict(by_index.module.state_dict())
    # the bins of the DELG values 0.5, 1, 4, 0.75 are 0, 2, 6, 1
    same = ImageFeatures(global_desc=item.global_desc, local=item.local, scale=np.array([0.5, 1.0, 4.0, 0.75]))
    q_index = ImageFeatures(global_desc=q.global_desc, local=q.local, scale=np.full(4, 2))  # q's scales are 1.0
    np.testing.assert_array_equal(by_index.rerank(q_index, [item]).scores, by_value.rerank(q, [same]).scores)
    with pytest.raises(ValueError, match="integers 0..6, got 7"):
        by_index.rerank(q_index, [ImageFeatures(global_desc=q.global_desc, local=q.local, scale=np.full(4, 7))])
    with pytest.raises(ValueError, match="integers 0..6, got 0.5"):
        by_index.rerank(q_index, [ImageFeatures(global_desc=q.global_desc, local=q.local, scale=np.full(4, 0.5))])
    assert create_reranker("rrt-768", pretrained=False, config=dict(num_encoder_layers=1)).scale_column == "index"
    with pytest.raises(ValueError, match="scale_column must be one of"):
        tiny(scale_column="level")


def test_trains_through_the_shared_loop_with_gradient_checkpointing(tmp_path):
    from locore_plugin.data.training_lists import TrainingLists
    from locore_plugin.training import TrainConfig, train

    rng = np.random.default_rng(0)
    features = [image(rng, n=5) for _ in range(16)]
    labels = np.arange(16) // 8  # 8 images per landmark: each list has 6 positives and 1 negative
    others = [np.flatnonzero((labels == labels[i]) & (np.arange(16) != i))[:6] for i in range(16)]
    neighbours = np.stack([np.r_[o, (i + 8) % 16] for i, o in enumerate(others)])
    options = dict(config=dict(d_global=12, d_model=8, nhead=2, num_encoder_layers=2, dim_feedforward=16),
                   query_length=6, gallery_length=6)
    cfg = TrainConfig.from_dict(dict(
        reranker="rrt", reranker_options=options, output_dir=str(tmp_path / "run"), data={}, epochs=1,
        per_device_batch_size=4, grad_accumulation=1, lr=1e-2, save_every=0, progress=False, device="cpu",
        gradient_checkpointing=True,
    ))
    train(cfg, TrainingLists(features, neighbours, labels, list_length=7, seed=0))
    trained = create_reranker("rrt", checkpoint=tmp_path / "run" / "final", **options)
    torch.manual_seed(0)
    initial = create_reranker("rrt", pretrained=False, **options)
    assert not torch.equal(trained.module.classifier.weight, initial.module.classifier.weight)
    assert np.isfinite(trained.rerank(features[0], features[1:6]).scores).all()
