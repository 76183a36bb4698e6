"""Fusion tuning (``locore-plugin tune``): the grid is searched on logits scored once, every grid
point equals what evaluating with that fusion gives, and the chosen pair reaches ``eval``."""
import dataclasses
import json
import sys

import numpy as np
import pytest

from locore_plugin import create_reranker
from locore_plugin.cli import main
from locore_plugin.data import synthetic
from locore_plugin.evaluation import DatasetEvaluation, EvaluationError, MethodSpec, TuneConfig, load_dataset, tune
from locore_plugin.evaluation.tuning import grid_maps, head_logits
from locore_plugin.hookspecs import hookimpl
from locore_plugin.interface import ImageReranker, ranked

SMALL_AMES = dict(config=dict(local_dim=32, model_dim=16, nhead=2, num_encoder_layers=1, dim_feedforward=32),
                  query_length=24, gallery_length=24)
GRID = (0.0, 0.25, 0.5, 1.0)


class Oracle(ImageReranker):
    """Logit 1 for a same-instance image, 0 otherwise (read from the gallery's planted labels); counts calls."""

    calls = 0

    def __init__(self, fusion=(0.5, 0.5), top_k=100, pretrained=True):
        self.fusion, self.top_k = fusion, top_k

    def head_logits(self, queries, shortlists):
        Oracle.calls += 1
        return [np.array([float(item.global_desc[-1] == query.global_desc[-1]) for item in s[: self.top_k]]) for query, s in
                zip(queries, shortlists)]

    def _rerank_many(self, queries, shortlists, global_scores):
        return [ranked(np.zeros(len(s))) for s in shortlists]


class NoFusion(ImageReranker):
    def __init__(self, pretrained=True):
        pass

    def _rerank_many(self, queries, shortlists, global_scores):
        return [ranked(np.zeros(len(s))) for s in shortlists]


@hookimpl
def register_rerankers(register):
    register("test-oracle", Oracle, description="tuning tests only", learned=False)
    register("test-no-fusion", NoFusion, description="tuning tests only", learned=False)


@pytest.fixture(autouse=True)
def plugin(register_plugin):
    register_plugin(sys.modules[__name__], "test-tuning-plugin")


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("tuning-data")
    synthetic.write(root, seed=0, size="tiny")
    return root


def evaluation(world, protocol="medium"):
    return DatasetEvaluation(load_dataset(world, "synthetic", "synth"), [protocol], "remove")


def test_every_grid_point_equals_evaluating_with_that_fusion_and_the_model_runs_once(world, tmp_path):
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    reranker = create_reranker("ames-dinov2", pretrained=False, **SMALL_AMES)
    reranker.save_pretrained(tmp_path / "ames")
    ev = evaluation(world)
    forwards = []
    hook = reranker.module.register_forward_hook(lambda *_: forwards.append(1))
    logits = head_logits(reranker, ev, "medium", top_k=20, batch_size=4)
    calls = len(forwards)
    maps = grid_maps(ev, "medium", logits, GRID, GRID)
    hook.remove()
    assert calls > 0 and len(forwards) == calls  # the grid never runs the model
    for i, w in enumerate(GRID):
        for j, t in enumerate(GRID):
            direct = create_reranker("ames-dinov2", checkpoint=tmp_path / "ames", fusion=(w, t), top_k=20, **SMALL_AMES)
            assert maps[i, j] == pytest.approx(ev.run(direct, top_k=20)["medium"]["value"], abs=1e-12), (w, t)
    global_map = ev.run(None)["medium"]["value"]
    assert np.allclose(maps[-1], global_map) and np.allclose(maps[:, 0], global_map)  # weight 1 or temperature 0: global


def test_the_planted_best_pair_is_found_from_one_pass(world, tmp_path):
    """The oracle's logit separates positives perfectly: the logit alone (weight 0, any temperature > 0)
    ranks every positive first (AP 1); the first such pair in grid order is chosen."""
    data = load_dataset(world, "synthetic", "synth")
    owner = np.full(1 + int(data.ranking.max()), -1.0)  # the first query whose instance each gallery image shows
    views = [np.r_[entry["easy"], entry["hard"], entry["junk"]].astype(int) for entry in data.gnd]
    for q in reversed(range(len(views))):
        owner[views[q]] = q
    instance = [owner[v[0]] for v in views]  # queries of one instance share its views
    gallery = data.gallery

    def planted(ids):  # the label rides in an extra global dimension, which only the oracle reads
        return [dataclasses.replace(f, global_desc=np.r_[f.global_desc, owner[i]].astype(np.float32))
                for f, i in zip(gallery(ids), ids)]

    data.gallery = planted
    data.queries = [dataclasses.replace(f, global_desc=np.r_[f.global_desc, instance[q]].astype(np.float32))
                    for q, f in enumerate(data.queries)]
    Oracle.calls = 0
    ev = DatasetEvaluation(data, ["medium"], "remove")
    logits = head_logits(Oracle(top_k=1000), ev, "medium", top_k=1000, batch_size=8)  # the whole gallery
    assert Oracle.calls == -(-len(data.queries) // 8)
    maps = grid_maps(ev, "medium", logits, (0.0, 0.5, 1.0), (0.0, 0.1, 1.0))
    best = np.unravel_index(np.argmax(maps), maps.shape)
    assert best == (0, 1)
    assert maps[0, 1] == pytest.approx(1.0) and maps[2, 0] < 0.8  # every positive first, far above the global ranking


def test_tune_writes_the_grid_and_eval_reads_the_chosen_fusion(world, tmp_path, capsys):
    torch = pytest.importorskip("torch")
    torch.manual_seed(1)
    create_reranker("ames-dinov2", pretrained=False, **SMALL_AMES).save_pretrained(tmp_path / "ames")
    common = ["--data-root", str(world), "--dataset", "synthetic", "--desc", "synth", "--checkpoint", f"ames-dinov2={tmp_path / 'ames'}",
              "--option", "ames-dinov2.query_length=24", "--option", "ames-dinov2.gallery_length=24"]
    assert main(["tune", "--reranker", "ames-dinov2", *common, "--out", str(tmp_path / "tune"), "--weights", "0,0.5,1",
                 "--temperatures", "0,0.3,1"]) == 0
    tuned = json.loads((tmp_path / "tune" / "tune.json").read_text())
    assert tuned["method"] == "ames-dinov2" and np.asarray(tuned["grid"]).shape == (3, 3)
    assert (tmp_path / "tune" / "tune.png").stat().st_size > 0 and "best: fusion" in (tmp_path / "tune" / "tune.md").read_text()
    assert tuned["best"]["value"] == pytest.approx(np.max(tuned["grid"]))
    assert main(["eval", "--reranker", "ames-dinov2", *common, "--out", str(tmp_path / "eval"), "--no-plots",
                 "--protocols", "medium", "--fusion-from", str(tmp_path / "tune" / "tune.json")]) == 0
    report = json.loads((tmp_path / "eval" / "results.json").read_text())
    assert 100 * report["results"]["ames-dinov2"]["synthetic"]["medium"]["value"] == pytest.approx(tuned["best"]["value"], abs=1e-3)
    # the file also reaches create_reranker, and only for the method it was tuned for
    assert create_reranker("ames-dinov2", checkpoint=tmp_path / "ames", fusion=tmp_path / "tune" / "tune.json",
                           **SMALL_AMES).fusion == tuple(tuned["best"]["fusion"])
    with pytest.raises(ValueError, match="tuned for 'ames-dinov2', not 'elvis-dinov2'"):
        create_reranker("elvis-dinov2", pretrained=False, fusion=str(tmp_path / "tune" / "tune.json"))


def test_clear_errors(world, tmp_path):
    with pytest.raises(EvaluationError, match="no fusion step"):
        tune(TuneConfig(MethodSpec("test-no-fusion"), "synthetic", str(world), str(tmp_path), desc="synth"))
    with pytest.raises(EvaluationError, match=r"weights must lie in \[0, 1\]"):
        tune(TuneConfig(MethodSpec("test-oracle"), "synthetic", str(world), str(tmp_path), desc="synth", weights=(1.5,)))
    assert main(["tune", "--reranker", "ames-dinov2", "--data-root", str(world), "--dataset", "synthetic", "--desc", "synth",
                 "--out", str(tmp_path / "x")]) == 2  # a learned method without a checkpoint
    assert main(["eval", "--reranker", "ames-dinov2", "--data-root", str(world), "--dataset", "synthetic",
                 "--fusion-from", str(tmp_path / "missing.json")]) == 2
