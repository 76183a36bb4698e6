"""Category benchmarks in evaluation (SOP, In-shop, CUB-200 protocol): the shortlist, Recall@K and
mAP@R of ``eval`` against an independent brute-force computation, re-ranking through the registry,
and the errors a user meets."""
import json
import sys

import numpy as np
import pytest

from locore_plugin.cli import main
from locore_plugin.data import synthetic_sop
from locore_plugin.evaluation import EvalConfig, EvaluationError, MethodSpec, run
from locore_plugin.features import ImageFeatures
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import ImageReranker, ranked
from locore_plugin.io.descriptors import build_shortlist, write_descriptors


class LabelOracle(ImageReranker):
    """Same-label images first (the label planted in the first local row), global order otherwise."""

    def __init__(self, pretrained=True, top_k=100):
        self.top_k = top_k

    def _rerank_many(self, queries, shortlists, global_scores):
        return [ranked(np.array([float(item.local[0, 0] == query.local[0, 0]) for item in s]) + 1e-3 * np.asarray(g))
                for query, s, g in zip(queries, shortlists, global_scores)]


@hookimpl
def register_rerankers(register):
    register("test-label-oracle", LabelOracle, description="category tests only", learned=False, inputs=("global", "local"))


@pytest.fixture(autouse=True)
def plugin(register_plugin):
    register_plugin(sys.modules[__name__], "test-categories-plugin")


def brute_force(query_globals, gallery_globals, query_labels, gallery_labels, exclude_self, ks, rerank=None):
    """Recall@K and mAP@R by their definitions, one query at a time, from the full similarity matrix."""
    recalls, aps = {k: [] for k in ks}, []
    for q, g in enumerate(query_globals):
        sims = gallery_globals @ g
        candidates = [i for i in range(len(gallery_globals)) if not (exclude_self and i == q)]
        order = sorted(candidates, key=lambda i: (-sims[i], i))
        if rerank is not None:
            head = order[:rerank]
            order = sorted(head, key=lambda i: (gallery_labels[i] != query_labels[q], -sims[i])) + order[rerank:]
        relevant = [gallery_labels[i] == query_labels[q] for i in order]
        for k in ks:
            recalls[k].append(any(relevant[:k]))
        r = sum(relevant)
        aps.append(sum(sum(relevant[: i + 1]) / (i + 1) for i in range(r) if relevant[i]) / r)
    return {f"r@{k}": float(np.mean(v)) for k, v in recalls.items()} | {"map@r": float(np.mean(aps))}


def write_layout(folder, split_labels, split_globals, desc="toy"):
    """Descriptor files whose first local row holds the label (for the oracle)."""
    for split, labels in split_labels.items():
        features = [ImageFeatures(global_desc=g, local=np.array([[float(c), 1.0]], np.float32)) for g, c in zip(split_globals[split], labels)]
        write_descriptors(folder, desc, split, features)


def unit_rows(rng, n, d=6):
    x = rng.normal(size=(n, d)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def test_sop_layout_scores_every_image_against_the_others_as_the_definitions(tmp_path):
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(1, 21), rng.integers(2, 6, 20))
    folder = tmp_path / "sop"
    folder.mkdir()
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n"
                                          + "".join(f"{i + 1} {c} 1 p/{i}.jpg\n" for i, c in enumerate(labels)))
    globals_ = unit_rows(rng, len(labels))
    write_layout(folder, {"test": labels}, {"test": globals_})
    config = EvalConfig(datasets=["sop"], methods=[MethodSpec("test-label-oracle")], data_root=str(tmp_path),
                        out=str(tmp_path / "out"), desc="toy", protocols=["r@1", "r@4", "r@10", "map@r"], top_k=5, plots=False)
    report = run(config, log=lambda *a: None)
    expected = brute_force(globals_, globals_, labels, labels, True, (1, 4, 10))
    oracle = brute_force(globals_, globals_, labels, labels, True, (1, 4, 10), rerank=5)
    for name in ("r@1", "r@4", "r@10", "map@r"):
        assert report["results"]["global"]["sop"][name]["value"] == pytest.approx(expected[name], abs=1e-12), name
        assert report["results"]["test-label-oracle"]["sop"][name]["value"] == pytest.approx(oracle[name], abs=1e-12), name
    assert oracle["map@r"] > expected["map@r"]
    # Figure A colouring: same-label images among the 5 re-ranked
    sims = globals_ @ globals_.T
    np.fill_diagonal(sims, -np.inf)
    heads = np.argsort(-sims, 1, kind="stable")[:, :5]
    positives = (labels[heads] == labels[:, None]).sum(1)
    assert report["results"]["test-label-oracle"]["sop"]["r@1"]["shortlist_positives"] == positives.tolist()
    md = (tmp_path / "out" / "results.md").read_text()
    assert "| Method | SOP R@1 | SOP R@4 | SOP R@10 | SOP mAP@R |" in md and "Recall@K and mAP@R" in md and "revisitop" not in md


def test_inshop_layout_queries_the_query_split_against_the_gallery(tmp_path):
    rng = np.random.default_rng(1)
    query_labels, gallery_labels = np.array([3, 3, 5, 9]), np.array([5, 3, 9, 9, 3, 7, 5, 5])
    folder = tmp_path / "inshop"
    folder.mkdir()
    rows = [f"img/q{i}.jpg id_{c:08d} query" for i, c in enumerate(query_labels)]
    rows += [f"img/g{i}.jpg id_{c:08d} gallery" for i, c in enumerate(gallery_labels)] + ["img/t.jpg id_00000001 train"]
    (folder / "list_eval_partition.txt").write_text(f"{len(rows)}\nimage_name item_id evaluation_status\n" + "\n".join(rows) + "\n")
    q, g = unit_rows(rng, 4), unit_rows(rng, 8)
    write_layout(folder, {"query": query_labels, "gallery": gallery_labels}, {"query": q, "gallery": g})
    config = EvalConfig(datasets=["inshop"], methods=[], data_root=str(tmp_path), out=str(tmp_path / "out"), desc="toy",
                        protocols=["r@1", "r@2", "map@r"], plots=False, top_k=3)
    report = run(config, log=lambda *a: None)
    expected = brute_force(q, g, query_labels, gallery_labels, False, (1, 2))
    for name in ("r@1", "r@2", "map@r"):
        assert report["results"]["global"]["inshop"][name]["value"] == pytest.approx(expected[name], abs=1e-12), name


def test_cub_layout_through_the_cli_with_the_benchmark_recall_ks(tmp_path):
    rng = np.random.default_rng(2)
    labels = np.repeat(np.arange(101, 111), 10)  # test classes only (101-200)
    folder = tmp_path / "cub200"
    folder.mkdir()
    (folder / "images.txt").write_text("".join(f"{i + 1} {c}.bird/{i}.jpg\n" for i, c in enumerate(labels)))
    (folder / "image_class_labels.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(labels)))
    globals_ = unit_rows(rng, len(labels))
    write_layout(folder, {"test": labels}, {"test": globals_})
    out = tmp_path / "out"
    assert main(["eval", "--data-root", str(tmp_path), "--dataset", "cub200", "--desc", "toy", "--out", str(out), "--no-plots"]) == 0
    results = json.loads((out / "results.json").read_text())["results"]["global"]["cub200"]
    assert list(results) == ["r@1", "r@2", "r@4", "r@8", "map@r"]  # the CUB papers' R@K, then mAP@R
    expected = brute_force(globals_, globals_, labels, labels, True, (1, 2, 4, 8))
    assert {k: v["value"] for k, v in results.items()} == pytest.approx(expected, abs=1e-12)


def test_the_synthetic_world_evaluates_and_its_shortlist_is_cached(tmp_path):
    synthetic_sop.write(tmp_path, 0, "small")
    config = EvalConfig(datasets=["synthetic-sop"], methods=[], data_root=str(tmp_path), out=str(tmp_path / "out"),
                        desc="synth", plots=False, top_k=20)
    report = run(config, log=lambda *a: None)
    assert list(report["results"]["global"]["synthetic-sop"]) == ["r@1", "r@10", "r@100", "map@r"]
    assert list((tmp_path / "out" / "cache").glob("nn_synth_test_exact.npz"))


def test_shortlist_without_self_equals_the_full_sort_even_with_duplicate_images():
    rng = np.random.default_rng(3)
    x = unit_rows(rng, 40)
    x[7] = x[3]  # a duplicate: image 3's best match ties with itself
    sims, idx = build_shortlist(x, x, 10, batch_size=16, verbose=False, exclude_self=True)
    full = x @ x.T
    for q in range(len(x)):
        order = sorted((i for i in range(len(x)) if i != q), key=lambda i: (-full[q, i], i))[:10]
        assert set(idx[q]) == set(order) and q not in idx[q]
        np.testing.assert_allclose(sims[q], full[q, idx[q]], atol=1e-6)
    assert 7 in idx[3] and 3 in idx[7]


def test_errors_name_the_problem(tmp_path):
    folder = tmp_path / "sop"
    folder.mkdir()
    labels = np.array([1, 1, 2, 2, 3])
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n"
                                          + "".join(f"{i + 1} {c} 1 p/{i}.jpg\n" for i, c in enumerate(labels)))
    base = dict(datasets=["sop"], methods=[], data_root=str(tmp_path), out=str(tmp_path / "out"), desc="toy", plots=False)
    with pytest.raises(EvaluationError, match="toy_test_global.pt missing; write them with `locore-plugin extract"):
        run(EvalConfig(**base, protocols=["r@1"]), log=lambda *a: None)
    write_layout(folder, {"test": labels}, {"test": unit_rows(np.random.default_rng(0), 5)})
    with pytest.raises(EvaluationError, match="queries \\[4\\] have no same-label gallery image"):
        run(EvalConfig(**base, protocols=["r@1"]), log=lambda *a: None)
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n"
                                          + "".join(f"{i + 1} {c} 1 p/{i}.jpg\n" for i, c in enumerate([1, 1, 2, 2, 2])))
    with pytest.raises(EvaluationError, match="depth 1000 .* each query ranks 4 images; choose smaller R@K"):
        run(EvalConfig(**base), log=lambda *a: None)  # SOP's R@100 / R@1000 on 5 images
    with pytest.raises(EvaluationError, match="belong to GLDv2"):
        run(EvalConfig(**base, protocols=["public"]), log=lambda *a: None)
