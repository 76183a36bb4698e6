"""CVNet Reranker against the official code's outputs on real photos (../shared/golden/cvnet),
its checkpoints, the batched scoring and the input errors."""
from __future__ import annotations

import json
import lzma
import pickle

import numpy as np
import pytest
import torch

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.evaluation.metrics import compute_map
from locore_plugin.extractors import create_extractor
from locore_plugin.extractors.images import crop_box
from locore_plugin.io.checkpoints import StateDictMismatchError

# The official rerank_ranks_revisitop: per protocol, the gnd lists whose images are not re-ranked
# (they keep their places), and the lists that are positives when scoring (test_revisitop).
SKIPPED = {"E": ("junk", "hard"), "M": ("junk",), "H": ("junk", "easy")}
POSITIVES = {"E": ("easy",), "M": ("easy", "hard"), "H": ("hard",)}


class Case:
    """One golden case: its config, arrays, ground truth and weights (official key names, float32)."""

    def __init__(self, folder, tmp_path):
        self.folder = folder
        self.config = json.loads((folder / "config.json").read_text())
        self.inputs, self.outputs = np.load(folder / "inputs.npz"), np.load(folder / "outputs.npz")
        self.gnd = pickle.loads((folder / "gnd_roxford5k.pkl").read_bytes())["gnd"]
        self.weights = tmp_path / "weights.safetensors"
        self.weights.write_bytes(lzma.decompress((folder / "weights_fp16.safetensors.xz").read_bytes()))
        self.name = f"cvnet-r{self.config['constructor_kwargs']['RESNET_DEPTH']}"

    def official_file(self, tmp_path):
        """The official release's container: ``torch.save({'model_state': state_dict})`` in float32."""
        from safetensors.torch import load_file

        path = tmp_path / "CVPR2022_CVNet.pyth"
        torch.save({"model_state": {k: v.float() if v.is_floating_point() else v for k, v in load_file(str(self.weights)).items()}}, path)
        return path

    def bgr(self, name: str) -> np.ndarray:
        return self.inputs[f"image_{name}"]

    def query_box(self, i: int):
        bgr = self.bgr(self.config["query_names"][i])
        return crop_box(*bgr.shape[:2], self.gnd[i]["bbx"])

    def query_bgr(self, i: int) -> np.ndarray:
        x0, y0, x1, y1 = self.query_box(i)
        return self.bgr(self.config["query_names"][i])[y0:y1, x0:x1]

    def features(self, role: str, i: int) -> ImageFeatures:
        return ImageFeatures(global_desc=self.outputs[f"global_{role}_multiscale"][i], dense=self.outputs[f"featuremap_{role}_{i}"][0])


@pytest.fixture
def case(golden_case, tmp_path):
    return Case(golden_case, tmp_path)


def extractor(case, **kw):
    kw = {"scales": case.config["global_scale_list"], **kw}
    return create_extractor(case.name, checkpoint=case.weights, config=case.config["constructor_kwargs"], **kw)


def reranker(case, **kw):
    return create_reranker(case.name, checkpoint=case.weights, config=case.config["constructor_kwargs"], **kw)


def assert_relative(got, expected, tolerance=1e-4):
    got, expected = np.asarray(got, np.float64), np.asarray(expected, np.float64)
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= tolerance * max(np.abs(expected).max(), 1e-12)


# -- the extractor ---------------------------------------------------------------------------------


@pytest.mark.golden("cvnet")
def test_preprocessing_is_exactly_official(case):
    from locore_plugin.adapters.cvnet import prepare

    for i in range(len(case.config["query_names"])):
        np.testing.assert_array_equal(prepare(case.query_bgr(i)), case.outputs[f"prepared_query_{i}"])
    for j, name in enumerate(case.config["db_names"]):
        np.testing.assert_array_equal(prepare(case.bgr(name)), case.outputs[f"prepared_db_{j}"])


@pytest.mark.golden("cvnet")
def test_feature_maps_and_global_descriptors_match_official(case):
    model = extractor(case)
    single = extractor(case, scales=[1.0], dense=False)
    images = [case.query_bgr(i) for i in range(len(case.config["query_names"]))] + [case.bgr(n) for n in case.config["db_names"]]
    roles = [("query", i) for i in range(len(case.config["query_names"]))] + [("db", j) for j in range(len(case.config["db_names"]))]
    for bgr, (role, i) in zip(images, roles):
        assert_relative(model.feature_map(bgr), case.outputs[f"featuremap_{role}_{i}"][0])
        assert_relative(model.global_descriptor(bgr), case.outputs[f"global_{role}_multiscale"][i])
        assert_relative(single.global_descriptor(bgr), case.outputs[f"global_{role}_scale1"][i])


@pytest.mark.golden("cvnet")
def test_raw_images_through_the_extractor_api_crop_queries_to_their_box(case):
    model = extractor(case)
    name = case.config["query_names"][0]
    rgb = np.ascontiguousarray(case.bgr(name)[:, :, ::-1])  # what load_image gives
    features = model.extract(rgb, bbox=case.gnd[0]["bbx"])
    assert_relative(features.dense, case.outputs["featuremap_query_0"][0])
    assert_relative(features.global_desc, case.outputs["global_query_multiscale"][0])
    half = extractor(case, dense_dtype="float16").extract(rgb, bbox=case.gnd[0]["bbx"])  # how evaluation caches maps
    assert half.dense.dtype == np.float16
    assert_relative(half.dense.astype(np.float32), case.outputs["featuremap_query_0"][0], 2e-3)


# -- the re-ranker -----------------------------------------------------------------------------------


@pytest.mark.golden("cvnet")
def test_correlation_logits_scores_and_forward_match_official(case):
    rr = reranker(case)
    module = rr.module
    with torch.inference_mode():
        q = torch.from_numpy(case.outputs["featuremap_query_0"])
        k = torch.from_numpy(case.outputs["featuremap_db_0"])
        size = (*q.shape[-2:], *k.shape[-2:])
        for correlation in (module.correlation, module.official_correlation):
            assert_relative(correlation(module.project(q), module.project(k), size), case.outputs["correlation_q0_db0"])
        from locore_plugin.adapters.cvnet import prepare

        pair = module(torch.from_numpy(prepare(case.query_bgr(0)))[None], torch.from_numpy(prepare(case.bgr(case.config["db_names"][0])))[None])
    assert float(pair[0]) == pytest.approx(float(case.outputs["forward_q0_db0"]), abs=1e-4)
    gallery = [case.features("db", j) for j in range(len(case.config["db_names"]))]
    official = reranker(case, implementation="official", batch_size=1)
    for i in range(len(case.config["query_names"])):
        logits = rr.pair_logits(case.features("query", i), gallery)
        np.testing.assert_allclose(logits, case.outputs["logits"][i], atol=1e-4)
        np.testing.assert_allclose(official.pair_logits(case.features("query", i), gallery), case.outputs["logits"][i], atol=1e-4)
        scores = torch.from_numpy(logits).softmax(1)[:, 1].numpy()
        np.testing.assert_allclose(scores, case.outputs["scores"][i], atol=1e-4)
        head = rr.head_logits([case.features("query", i)], [gallery])[0]
        np.testing.assert_allclose(1 / (1 + np.exp(-head)), case.outputs["scores"][i], atol=1e-4)


@pytest.mark.golden("cvnet")
def test_batched_equal_size_groups_equal_one_pair_at_a_time(case):
    gallery = [case.features("db", j) for j in range(len(case.config["db_names"]))]
    gallery += [ImageFeatures(dense=g.dense * 0.5) for g in gallery[:3]]  # equal-size groups, whatever the case's photos
    query = case.features("query", 0)
    batched = reranker(case, batch_size=16).pair_logits(query, gallery)
    single = reranker(case, batch_size=1).pair_logits(query, gallery)
    np.testing.assert_allclose(batched, single, atol=1e-5)


def official_rerank(case, rr, protocol: str) -> np.ndarray:
    """rerank_ranks_revisitop with this re-ranker: per query, the first ``topk`` images not skipped
    by the protocol are re-sorted in their own places; the rest keep theirs."""
    ranks, sims = case.inputs["ranks_global"], case.inputs["sim_global"]
    gallery = [case.features("db", j) for j in range(len(case.config["db_names"]))]
    out = ranks.copy()
    for i, entry in enumerate(case.gnd):
        skipped = np.concatenate([np.asarray(entry[k], int) for k in SKIPPED[protocol]])
        places = [p for p in range(len(ranks)) if ranks[p, i] not in skipped][: case.config["rerank"]["topk"]]
        ids = ranks[places, i]
        result = rr.rerank(case.features("query", i), [gallery[j] for j in ids], global_scores=sims[ids, i])
        out[places, i] = ids[result.order]
    return out


@pytest.mark.golden("cvnet")
def test_reranked_rankings_and_maps_are_exactly_official(case):
    rr = reranker(case, top_k=case.config["rerank"]["topk"], mix_ratio=case.config["rerank"]["mix_ratio"])
    for protocol in ("E", "M", "H"):
        got = official_rerank(case, rr, protocol)
        np.testing.assert_array_equal(got, case.outputs[f"ranks_reranked_{protocol}"])
        scoring = [{"ok": np.concatenate([np.asarray(e[k], int) for k in POSITIVES[protocol]]),
                    "junk": np.concatenate([np.asarray(e[k], int) for k in SKIPPED[protocol]])} for e in case.gnd]
        assert compute_map(got, scoring)[0] == pytest.approx(case.config["map_reranked"][protocol], abs=1e-9)
        assert compute_map(case.inputs["ranks_global"], scoring)[0] == pytest.approx(case.config["map_global"][protocol], abs=1e-9)


@pytest.mark.golden("cvnet")
def test_the_official_container_and_a_bare_file_load_with_their_architecture(case, tmp_path):
    official = case.official_file(tmp_path)
    bare = create_reranker(case.name, checkpoint=official)  # depth and width read from the tensors
    assert bare.module.config == {"depth": case.config["constructor_kwargs"]["RESNET_DEPTH"],
                                  "reduction_dim": case.config["constructor_kwargs"]["REDUCTION_DIM"]}
    assert sum(p.numel() for p in bare.module.parameters()) == case.config["num_parameters"]
    gallery = [case.features("db", j) for j in range(3)]
    np.testing.assert_allclose(bare.pair_logits(case.features("query", 0), gallery), case.outputs["logits"][0, :3], atol=1e-4)
    other = "cvnet-r101" if case.name == "cvnet-r50" else "cvnet-r50"
    assert create_reranker(other, checkpoint=official).module.config == bare.module.config  # the tensors decide


def test_a_checkpoint_of_another_depth_names_the_block_counts(tmp_path):
    from locore_plugin.adapters.cvnet import CVNetRerank

    state = {k: v for k, v in CVNetRerank(50).state_dict().items() if not k.startswith("encoder_q.s3.b6.")}
    path = tmp_path / "cut.pth"
    torch.save({"model_state": state}, path)
    with pytest.raises(StateDictMismatchError, match=r"5 blocks.*6 \(ResNet-50\), 23 \(ResNet-101\)"):
        create_reranker("cvnet-r50", checkpoint=path)
    with pytest.raises(StateDictMismatchError, match="encoder_q.s3.b6"):
        create_reranker("cvnet-r50", checkpoint=path, config={"RESNET_DEPTH": 50})


# -- input errors ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def random_cvnet():
    torch.manual_seed(0)
    return create_reranker("cvnet-r50", pretrained=False, top_k=3)


def dense_features(rng, channels=1024, size=(4, 5)):
    return ImageFeatures(global_desc=rng.normal(size=8), dense=rng.normal(size=(channels, *size)).astype(np.float32))


def test_bad_maps_are_clear_errors(random_cvnet):
    rng = np.random.default_rng(0)
    query = dense_features(rng)
    with pytest.raises(ValueError, match="512-channel map"):
        random_cvnet.rerank(query, [dense_features(rng, channels=512)])
    with pytest.raises(ValueError, match=r"at least 2 x 2 \(images of at least 17 pixels"):
        random_cvnet.rerank(query, [dense_features(rng, size=(1, 6))])
    with pytest.raises(ValueError, match="no dense feature map"):
        random_cvnet.rerank(query, [ImageFeatures(global_desc=rng.normal(size=8))])
    bad = rng.normal(size=(1024, 3, 3)).astype(np.float32)
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="dense contains NaN"):
        ImageFeatures(dense=bad)
    with pytest.raises(ValueError, match=r"dense must have shape \(C, h, w\)"):
        ImageFeatures(dense=np.zeros((4, 4), np.float32))
    with pytest.raises(TypeError, match="mix_ratio .* or fusion"):
        create_reranker("cvnet-r50", pretrained=False, mix_ratio=0.5, fusion=(0.5, 1.0))
    with pytest.raises(ValueError, match="needs checkpoint="):
        create_reranker("cvnet-r50")


def test_an_image_too_small_for_the_4d_convolutions_says_the_minimum():
    model = create_extractor("cvnet-r50", pretrained=False)
    with pytest.raises(ValueError, match="at least 17 pixels"):
        model.extract(np.zeros((16, 40, 3), np.uint8))
    assert model.extract(np.zeros((17, 17, 3), np.uint8)).dense.shape == (1024, 2, 2)


def test_the_fast_correlation_equals_the_official_one_on_random_maps():
    from locore_plugin.adapters.cvnet import CVNetRerank

    torch.manual_seed(0)
    module = CVNetRerank(50).eval()
    query, keys = torch.randn(1, 1024, 7, 5), torch.randn(3, 1024, 6, 9)
    with torch.inference_mode():
        size = (7, 5, 6, 9)
        q, k = module.project(query), module.project(keys)
        fast = module.correlation(q, k, size)
        paired = module.correlation([m.expand(3, -1, -1, -1) for m in q], k, size)  # a query per pair (the official forward)
        official = module.official_correlation([m.expand(3, -1, -1, -1) for m in q], k, size)
        assert fast.shape == official.shape == (3, 9, 7, 5, 6, 9)
        torch.testing.assert_close(fast, official, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(paired, official, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(module.pair_logits(query, keys), module.pair_logits(query, keys, official=True), atol=1e-5, rtol=1e-5)


def test_only_the_head_is_re_ranked_and_the_tail_keeps_its_order(random_cvnet):
    rng = np.random.default_rng(1)
    query, shortlist = dense_features(rng), [dense_features(rng) for _ in range(5)]
    incoming = np.array([0.9, 0.8, 0.7, 0.6, 0.5], np.float32)
    result = random_cvnet.rerank(query, shortlist, global_scores=incoming)
    assert sorted(result.order[:3]) == [0, 1, 2] and result.order[3:].tolist() == [3, 4]
    logits = random_cvnet.head_logits([query], [shortlist])[0]
    official = incoming[:3] + 0.5 / (1 + np.exp(-logits))  # global + mix_ratio * score
    assert result.order[:3].tolist() == np.argsort(-official, kind="stable").tolist()


@pytest.mark.golden("cvnet")
def test_raw_photos_rank_through_rerankers_with_the_checkpoint_s_own_extractor(case, tmp_path):
    import cv2
    import rerankers
    from rerankers import Document

    import locore_plugin  # noqa: F401  (installs the bridge)

    ranker = rerankers.Reranker(case.name, checkpoint=case.weights, config=case.config["constructor_kwargs"], verbose=0)
    paths = []
    for name in [case.config["query_names"][0], *case.config["db_names"]]:
        paths.append(tmp_path / f"{name}.png")  # lossless: the pixels the official code read
        cv2.imwrite(str(paths[-1]), case.bgr(name))
    query = Document(document_type="image", image_path=str(paths[0]), metadata={"bbox": case.gnd[0]["bbx"]})
    result = ranker.rank(query, [Document(document_type="image", image_path=str(p), doc_id=str(j)) for j, p in enumerate(paths[1:])])
    official = case.inputs["sim_global"][:, 0] + 0.5 * case.outputs["scores"][0]  # every image of the case re-ranked
    assert [int(r.document.doc_id) for r in result.results] == np.argsort(-official).tolist()


@pytest.mark.golden("cvnet")
def test_eval_on_the_images_reproduces_the_official_reranked_maps(case, tmp_path):
    """``locore-plugin eval --images``: the official Medium (junk skipped) and Hard (junk and easy
    skipped) re-rankings are this project's Medium and Hard* with junk removed; the maps are read
    from the photos through the extractor, the global ranking from the descriptor files."""
    import cv2

    from locore_plugin.cli import main
    from locore_plugin.io.descriptors import write_descriptors

    folder = tmp_path / "data" / "cvcase"
    (folder / "jpg").mkdir(parents=True)
    info = pickle.loads((case.folder / "gnd_roxford5k.pkl").read_bytes())
    (folder / "gnd_cvcase.pkl").write_bytes(pickle.dumps(info))
    for name in [*case.config["query_names"], *case.config["db_names"]]:
        cv2.imwrite(str(folder / "jpg" / f"{name}.png"), case.bgr(name))  # lossless: the official pixels
    for split, role in (("query", "query"), ("gallery", "db")):
        write_descriptors(folder, "cvnetg", split, [ImageFeatures(global_desc=g) for g in case.outputs[f"global_{role}_multiscale"]])
    out = tmp_path / "out"
    args = ["eval", "--data-root", str(tmp_path / "data"), "--dataset", "cvcase", "--desc", "cvnetg", "--reranker", case.name,
            "--checkpoint", f"{case.name}={case.weights}", "--option", f"{case.name}.config={json.dumps(case.config['constructor_kwargs'])}",
            "--top-k", str(case.config["rerank"]["topk"]), "--junk", "remove", "--out", str(out), "--no-plots"]
    assert main(args) == 0
    results = json.loads((out / "results.json").read_text())["results"]
    assert results["global"]["cvcase"]["medium"]["value"] == pytest.approx(case.config["map_global"]["M"], abs=1e-9)
    assert results[case.name]["cvcase"]["medium"]["value"] == pytest.approx(case.config["map_reranked"]["M"], abs=1e-9)
    assert results[case.name]["cvcase"]["hard*"]["value"] == pytest.approx(case.config["map_reranked"]["H"], abs=1e-9)
    cached = list((out / "cache" / "features").rglob("*.npz"))
    ranks, topk = case.inputs["ranks_global"], case.config["rerank"]["topk"]
    shown = set()  # the images some protocol re-ranks: only those are read
    for i, entry in enumerate(case.gnd):
        for protocol in ("M", "H"):
            skipped = np.concatenate([np.asarray(entry[k], int) for k in SKIPPED[protocol]])
            shown |= set([int(j) for j in ranks[:, i] if j not in skipped][:topk])
    assert len(cached) == len(case.config["query_names"]) + len(shown)
    with np.load(cached[0]) as stored:
        assert stored["dense"].dtype == np.float16
    # a bound on the feature cache changes what stays on disk, not the result
    bound = 3 * max(p.stat().st_size for p in cached)
    bounded = tmp_path / "bounded"
    assert main([*args[:-3], "--out", str(bounded), "--no-plots", "--image-cache-gb", str(bound / 2**30)]) == 0
    assert json.loads((bounded / "results.json").read_text())["results"][case.name] == results[case.name]
    kept = list((bounded / "cache" / "features").rglob("*.npz"))
    assert len(kept) < len(cached) and sum(p.stat().st_size for p in kept) <= bound
    # the published procedure works for CVNet too: tune its fusion on the cached logits of the photos
    tuned = tmp_path / "tune"
    assert main(["tune", "--data-root", str(tmp_path / "data"), "--dataset", "cvcase", "--desc", "cvnetg", "--reranker", case.name,
                 "--checkpoint", f"{case.name}={case.weights}", "--option", f"{case.name}.config={json.dumps(case.config['constructor_kwargs'])}",
                 "--top-k", str(case.config["rerank"]["topk"]), "--out", str(tuned)]) == 0
    grid = json.loads((tuned / "tune.json").read_text())
    assert grid["grid"][grid["weights"].index(1.0)] == pytest.approx([100 * case.config["map_global"]["M"]] * len(grid["temperatures"]), abs=1e-3)
