"""GLDv2 retrieval as the AMES / ELViS code scores it (``utils/revisited.py``: ``compute_metrics``):
rectangular AP on the first 100 of each ranking, public = all test queries but the last 750,
private = the last 750, combined = all; ``gldv2-val`` = the public queries, with the test file's gnd."""
import json
import pickle

import numpy as np
import pytest

from locore_plugin import ImageFeatures
from locore_plugin.cli import main
from locore_plugin.evaluation.protocols import get_protocol
from locore_plugin.evaluation.scoring import score_ranking
from locore_plugin.io.descriptors import write_descriptors

NQ, NDB, PRIVATE = 760, 300, 750


def reference_ap(ranking_row, ok, depth=100):
    """The official per-query AP, written out: a 0/1 mask over the first ``depth`` ranks, the precision
    at each rank by cumulative sum, their sum at the positives over min(|ok|, depth)."""
    hits = np.isin(ranking_row[:depth], ok).astype(float)
    precision = np.cumsum(hits) / (np.arange(len(hits)) + 1)
    return (hits * precision).sum() / min(len(ok), depth)


def planted(seed=0):
    rng = np.random.default_rng(seed)
    gnd = [{"ok": np.sort(rng.choice(NDB, rng.integers(1, 150), replace=False)).tolist()} for _ in range(NQ)]
    rankings = np.stack([rng.permutation(NDB) for _ in range(NQ)])
    return gnd, rankings


def test_the_three_splits_against_the_official_definition_written_out():
    gnd, rankings = planted()
    per_query = np.array([reference_ap(r, g["ok"]) for r, g in zip(rankings, gnd)])
    expected = {"public": per_query[:-PRIVATE].mean(), "private": per_query[-PRIVATE:].mean(), "combined": per_query.mean()}
    for name, value in expected.items():
        got = score_ranking(rankings, gnd, get_protocol(name), dataset="gldv2-test")
        assert got["value"] == pytest.approx(value, abs=1e-12), name
    # hand-computed: positives at ranks 1 and 3 of 100 among 2 positives: (1/1 + 2/3) / 2
    row = np.r_[5, 7, 6, np.arange(8, NDB)]
    small = [{"ok": [5, 6]}] * NQ
    assert score_ranking(np.tile(row, (NQ, 1)), small, get_protocol("combined"), dataset="gldv2-test")["value"] == pytest.approx(5 / 6)
    # a positive beyond the first 100 does not count; 150 positives are normalised by 100, not 150
    late = [{"ok": [int(row[150])]}] * NQ
    assert score_ranking(np.tile(row, (NQ, 1)), late, get_protocol("combined"), dataset="gldv2-test")["value"] == 0.0
    many = [{"ok": row[:150].tolist()}] * NQ
    assert score_ranking(np.tile(row, (NQ, 1)), many, get_protocol("public"), dataset="gldv2-test")["value"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="private split"):
        score_ranking(rankings[:700], gnd[:700], get_protocol("public"), dataset="gldv2-test")


def write_gldv2(root, seed=1):
    """gldv2-test and gldv2-val in the official layout: global descriptors that put each query's
    positives near it, a few locals per image, the gnd pickle, and the validation folder holding the
    public queries with the test folder's gnd file."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, 16))
    gallery_class = rng.integers(0, 40, NDB)
    query_class = rng.integers(0, 40, NQ)

    def images(classes, noise):
        out = []
        for c in classes:
            g = centres[c] + noise * rng.normal(size=16)
            out.append(ImageFeatures(global_desc=(g / np.linalg.norm(g)).astype(np.float32), local=rng.normal(size=(3, 8)),
                                     xy=rng.uniform(0, 100, (3, 2)), scale=np.zeros(3), weight=np.ones(3)))
        return out

    gallery, queries = images(gallery_class, 1.5), images(query_class, 1.5)
    gnd = {"gnd": [{"ok": np.flatnonzero(gallery_class == c).tolist()} for c in query_class],
           "qimlist": [f"q{i}" for i in range(NQ)], "imlist": [f"g{i}" for i in range(NDB)]}
    for folder, chosen in (("gldv2-test", queries), ("gldv2-val", queries[:-PRIVATE])):
        write_descriptors(root / folder, "d", "query", chosen)
        write_descriptors(root / folder, "d", "gallery", gallery)
        (root / folder / "gnd_gldv2-test.pkl").write_bytes(pickle.dumps(gnd))
    return queries, gallery, gnd


def test_eval_reports_public_private_combined_and_val_is_the_public_part(tmp_path):
    queries, gallery, gnd = write_gldv2(tmp_path / "data")
    out = tmp_path / "out"
    assert main(["eval", "--data-root", str(tmp_path / "data"), "--dataset", "gldv2-test", "--dataset", "gldv2-val",
                 "--desc", "d", "--out", str(out), "--no-plots"]) == 0
    table = (out / "results.md").read_text()
    assert "GLDv2 Public | GLDv2 Private | GLDv2 Combined | GLDv2-val Public" in table
    results = json.loads((out / "results.json").read_text())["results"]["global"]
    q = np.stack([f.global_desc for f in queries])
    g = np.stack([f.global_desc for f in gallery])
    ranking = np.argsort(-(q @ g.T), axis=1, kind="stable")
    per_query = np.array([reference_ap(r, e["ok"]) for r, e in zip(ranking, gnd["gnd"])])
    assert results["gldv2-test"]["public"]["value"] == pytest.approx(per_query[:-PRIVATE].mean(), abs=1e-6)
    assert results["gldv2-test"]["private"]["value"] == pytest.approx(per_query[-PRIVATE:].mean(), abs=1e-6)
    assert results["gldv2-test"]["combined"]["value"] == pytest.approx(per_query.mean(), abs=1e-6)
    assert results["gldv2-val"]["public"]["value"] == pytest.approx(results["gldv2-test"]["public"]["value"], abs=1e-9)
    assert list(results["gldv2-val"]) == ["public"]


def test_the_published_procedure_tune_on_gldv2_val_then_eval_on_the_test_split(tmp_path):
    torch = pytest.importorskip("torch")
    from locore_plugin import create_reranker

    write_gldv2(tmp_path / "data")
    torch.manual_seed(0)
    small = dict(config=dict(local_dim=8, model_dim=8, nhead=2, num_encoder_layers=1, dim_feedforward=16), query_length=3,
                 gallery_length=3)
    create_reranker("ames-dinov2", pretrained=False, **small).save_pretrained(tmp_path / "ames")
    common = ["--data-root", str(tmp_path / "data"), "--desc", "d", "--checkpoint", f"ames-dinov2={tmp_path / 'ames'}",
              "--option", "ames-dinov2.query_length=3", "--option", "ames-dinov2.gallery_length=3"]
    assert main(["tune", "--reranker", "ames-dinov2", *common, "--out", str(tmp_path / "tune"), "--weights", "0.5,1",
                 "--temperatures", "0.5"]) == 0  # --dataset defaults to gldv2-val, --protocol to public
    tuned = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert (tuned["dataset"], tuned["protocol"]) == ("gldv2-val", "public")
    assert main(["eval", "--reranker", "ames-dinov2", "--dataset", "gldv2-test", *common, "--out", str(tmp_path / "eval"),
                 "--no-plots", "--fusion-from", str(tmp_path / "tune" / "tune.json")]) == 0
    results = json.loads((tmp_path / "eval" / "results.json").read_text())["results"]
    # the val split is the test split's public part: the tuned pair scores the same there
    assert 100 * results["ames-dinov2"]["gldv2-test"]["public"]["value"] == pytest.approx(tuned["best"]["value"], abs=1e-3)
