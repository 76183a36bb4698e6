"""The evaluation runner on the tiny synthetic dataset: scores, table layout, resume, CLI, demo."""
from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from locore_plugin import evaluation
from locore_plugin.data import synthetic
from locore_plugin.evaluation import EvalConfig, MethodSpec, global_ranking, runner
from locore_plugin.evaluation.metrics import compute_map, revisited_gnd
from locore_plugin.evaluation.runner import weights_chosen

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def data_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("data")
    synthetic.write(root, seed=0, size="tiny")
    return root


def _config(data_root, out, methods=("superglobal",), **kw):
    return EvalConfig(datasets=["synthetic"], methods=[m if isinstance(m, MethodSpec) else MethodSpec(m) for m in methods],
                      data_root=str(data_root), out=str(out), desc="synth", plots=kw.pop("plots", False), **kw)


def test_the_global_ranking_puts_the_published_shortlist_first():
    query, gallery = np.ones((1, 1), np.float32), np.array([[0.1], [0.9], [0.5], [0.3]], np.float32)
    ranking, scores, tail = global_ranking(query, gallery, depth=4, named=[[0, 3]])
    assert ranking.tolist() == [[1, 2, 3, 0]] and scores[0].tolist() == pytest.approx([0.9, 0.5, 0.3, 0.1])
    assert tail.ranks[0].tolist() == [3, 2]
    ranking, scores, tail = global_ranking(query, gallery, depth=3, named=[[0, 1, 2]],
                                           nn=(np.array([[0.7, 0.6]]), np.array([[3, 0]])))
    assert ranking.tolist() == [[3, 0, 1]] and scores[0].tolist() == pytest.approx([0.7, 0.6, 0.9])
    assert tail.ranks[0].tolist() == [1, 2, 3]


def test_global_row_matches_an_independent_computation(data_root, tmp_path):
    report = evaluation.run(_config(data_root, tmp_path, methods=()), log=lambda *a: None)
    data = synthetic.generate(0, "tiny")
    ranks = np.argsort(-(data.query_global @ data.gallery_global.T), axis=1, kind="stable").T
    gnd = data.gnd["gnd"]
    got = report["results"]["global"]["synthetic"]
    assert got["medium"]["value"] == pytest.approx(compute_map(ranks, revisited_gnd(gnd, "medium"))[0])
    assert got["hard"]["value"] == pytest.approx(compute_map(ranks, revisited_gnd(gnd, "hard"))[0])
    assert got["hard*"]["value"] == got["hard"]["value"]  # no re-ranking: removing easy (junk in Hard) changes nothing


def test_truncated_metric_scores_the_published_shortlist(data_root, tmp_path):
    report = evaluation.run(_config(data_root, tmp_path, methods=(), metric="truncated", nn="global", junk="keep"),
                          log=lambda *a: None)
    from locore_plugin.io.descriptors import read_nn

    _, idx = read_nn(data_root / "synthetic" / "nn_global.pkl")
    gnd = synthetic.generate(0, "tiny").gnd["gnd"]
    expected = compute_map(idx.T, revisited_gnd(gnd, "medium"), truncated=True)[0]
    assert report["results"]["global"]["synthetic"]["medium"]["value"] == pytest.approx(expected)


def test_tables_follow_the_supplementary_table_b_layout(data_root, tmp_path):
    config = _config(data_root, tmp_path, plots=True)
    report = evaluation.run(config, log=lambda *a: None)
    md = (tmp_path / "results.md").read_text().splitlines()
    assert md[0] == "| Method | Synth Medium | Synth Hard | Synth Hard* |"
    assert [line.split("|")[1].strip() for line in md[2:4]] == ["global", "superglobal"]
    for line, row in zip(md[2:4], ("global", "superglobal")):
        cells = [c.strip() for c in line.split("|")[2:-1]]
        expected = [f"{100 * report['results'][row]['synthetic'][p]['value']:.1f}" for p in ("medium", "hard", "hard*")]
        assert cells == expected
    with open(tmp_path / "results.csv") as f:
        rows = list(csv.reader(f))
    assert rows[0][:4] == ["method", "Synth Medium", "Synth Hard", "Synth Hard*"] and [r[0] for r in rows[1:]] == ["global", "superglobal"]
    assert rows[0][4:8] == [f"Synth Medium {k} vs global" for k in ("diff", "ci low", "ci high", "p")]
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["settings"]["junk"] == "remove" and set(summary["results"]["superglobal"]["synthetic"]) == {"medium", "hard", "hard*"}
    with open(tmp_path / "per_query_ap.csv") as f:
        per_query = list(csv.DictReader(f))
    nq = len(synthetic.generate(0, "tiny").query_global)
    assert len(per_query) == 3 * nq
    assert set(per_query[0]) == {"dataset", "protocol", "query", "positives_in_shortlist", "global", "superglobal"}
    aps = [float(r["superglobal"]) for r in per_query if r["protocol"] == "medium"]
    assert np.mean(aps) == pytest.approx(report["results"]["superglobal"]["synthetic"]["medium"]["value"])
    plots = sorted(p.name for p in (tmp_path / "plots").iterdir())
    assert plots == ["synthetic__global__vs__superglobal.png"]
    assert (tmp_path / "plots" / plots[0]).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    stamp = (tmp_path / "plots" / plots[0]).stat().st_mtime_ns
    evaluation.run(config, log=lambda *a: None)  # everything cached: the plot is not redrawn
    assert (tmp_path / "plots" / plots[0]).stat().st_mtime_ns == stamp


def test_an_interrupted_run_resumes_and_a_finished_one_reprints_without_work(data_root, tmp_path, monkeypatch):
    methods = ("superglobal", MethodSpec("superglobal", {"K": 3}, label="superglobal-K3"))
    computed = []
    original = evaluation.DatasetEvaluation.run

    def counting(self, reranker=None, top_k=100, batch_size=8, label="", *args):
        if label == "superglobal-K3" and fail[0]:
            raise KeyboardInterrupt
        computed.append(label or "global")
        return original(self, reranker, top_k, batch_size, label, *args)

    monkeypatch.setattr(evaluation.DatasetEvaluation, "run", counting)
    fail = [True]
    with pytest.raises(KeyboardInterrupt):
        evaluation.run(_config(data_root, tmp_path, methods), log=lambda *a: None)
    assert computed == ["global", "superglobal"]
    assert not list((tmp_path / "cache").rglob("*.tmp"))

    fail[0] = False
    computed.clear()
    first = evaluation.run(_config(data_root, tmp_path, methods), log=lambda *a: None)
    assert computed == ["superglobal-K3"]  # only what the interruption lost

    computed.clear()
    monkeypatch.setattr(runner, "load_dataset", lambda *a, **k: pytest.fail("a finished run must not load data"))
    again = evaluation.run(_config(data_root, tmp_path, methods), log=lambda *a: None)
    assert computed == [] and again == first


def test_a_truncated_cache_entry_is_set_aside_and_recomputed(data_root, tmp_path, capsys):
    first = evaluation.run(_config(data_root, tmp_path), log=lambda *a: None)
    entry = sorted((tmp_path / "cache").rglob("superglobal-*.json"))[0]
    entry.write_text(entry.read_text()[:8])  # a full disk, a killed copy
    again = evaluation.run(_config(data_root, tmp_path), log=lambda *a: None)
    assert again == first
    assert str(entry) in capsys.readouterr().err
    assert entry.with_name(entry.name + ".corrupt").is_file() and json.loads(entry.read_text())["scores"]


def test_a_changed_setting_is_computed_again(data_root, tmp_path):
    evaluation.run(_config(data_root, tmp_path), log=lambda *a: None)
    entries = len(list((tmp_path / "cache").rglob("*.json")))
    evaluation.run(_config(data_root, tmp_path, top_k=20), log=lambda *a: None)
    assert len(list((tmp_path / "cache").rglob("*.json"))) == entries + 1  # the global row is unchanged by top_k


def test_options_reach_rows_and_chain_stages():
    methods = [MethodSpec("superglobal"), MethodSpec("superglobal+locore-base")]
    evaluation.apply_options(methods, ["superglobal.K=3", "locore-base.checkpoint=\"/ckpt\"", "superglobal+locore-base.dtype=bf16"])
    assert methods[0].options == {"K": 3}
    assert methods[1].stage_options == {"superglobal": {"K": 3}, "locore-base": {"checkpoint": "/ckpt"}}
    assert methods[1].options == {"dtype": "bf16"}
    with pytest.raises(evaluation.EvaluationError, match="no method"):
        evaluation.apply_options(methods, ["gv.threshold=0.1"])


def test_recipes_parse_and_cover_the_tox_envs():
    tox = (ROOT / "tox.ini").read_text()
    for name, dataset in {"roxf": "roxford5k", "rpar": "rparis6k", "roxf1m": "roxford5k+1m", "rpar1m": "rparis6k+1m",
                          "sop": "sop", "inshop": "inshop", "cub200": "cub200"}.items():
        recipe = evaluation.read_recipe(ROOT / "recipes" / f"eval_{name}.toml")
        assert recipe["datasets"] == [dataset] and recipe["methods"][0].name == "superglobal"
        assert f"{name}: python -m locore_plugin.evaluation --recipe {{toxinidir}}/recipes/eval_{name}.toml {{posargs}}" in tox
    assert "passenv" in tox and all(v in tox for v in ("LOCORE_DATA", "CUDA_VISIBLE_DEVICES", "HF_HOME"))


def test_the_tox_entry_fails_cleanly_without_locore_data(monkeypatch, capsys):
    monkeypatch.delenv("LOCORE_DATA", raising=False)
    assert evaluation.main(["--recipe", str(ROOT / "recipes" / "eval_roxf.toml")]) == 2
    err = capsys.readouterr().err
    assert "no data root" in err and "LOCORE_DATA" in err and "Traceback" not in err


def test_a_missing_file_is_named_with_where_to_get_it(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv("LOCORE_DATA", str(tmp_path))
    (tmp_path / "roxford5k").mkdir()
    assert evaluation.main(["--recipe", str(ROOT / "recipes" / "eval_roxf.toml"), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "gnd_roxford5k.pkl" in err and "http" in err


def test_cli_eval_prints_the_table(data_root, tmp_path, capsys):
    from locore_plugin.cli import main

    rc = main(["eval", "--data-root", str(data_root), "--dataset", "synthetic", "--desc", "synth",
               "--reranker", "superglobal", "--option", "superglobal.K=2", "--protocols", "medium,hard",
               "--junk", "keep", "--out", str(tmp_path), "--no-plots"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "| Method | Synth Medium | Synth Hard |" in out and "junk: keep" in out


def test_unknown_reranker_is_a_clean_error(data_root, tmp_path, capsys):
    assert evaluation.main(["--data-root", str(data_root), "--dataset", "synthetic", "--desc", "synth",
                          "--reranker", "superglobl", "--out", str(tmp_path)]) == 2
    assert "Did you mean: superglobal" in capsys.readouterr().err


def test_plus_1m_appends_the_distractors_and_can_only_lower_the_global_map(data_root, tmp_path):
    from locore_plugin import ImageFeatures
    from locore_plugin.io.descriptors import write_descriptors

    cfg = synthetic.SIZES["tiny"]
    rng = np.random.default_rng(0)
    unit = lambda x: (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)  # noqa: E731
    distractors = [ImageFeatures(global_desc=unit(rng.normal(size=cfg.global_dim)), local=unit(rng.normal(size=(4, cfg.local_dim))),
                                 xy=np.zeros((4, 2)), scale=np.zeros(4), weight=np.ones(4)) for _ in range(40)]
    write_descriptors(data_root / "revisitop1m", "synth", None, distractors, topk=cfg.topk)
    base = evaluation.run(_config(data_root, tmp_path / "a", methods=()), log=lambda *a: None)
    plus = evaluation.run(EvalConfig(datasets=["synthetic+1m"], methods=[], data_root=str(data_root), out=str(tmp_path / "b"),
                                   desc="synth", plots=False), log=lambda *a: None)
    for p in ("medium", "hard", "hard*"):
        a, b = base["results"]["global"]["synthetic"][p]["per_query"], plus["results"]["global"]["synthetic+1m"][p]["per_query"]
        assert all(y <= x + 1e-12 for x, y in zip(a, b) if x is not None)
    assert plus["results"]["global"]["synthetic+1m"]["medium"]["value"] < base["results"]["global"]["synthetic"]["medium"]["value"]


def test_eval_refuses_learned_rerankers_without_chosen_weights(data_root, tmp_path):
    for spec in (MethodSpec("locore-tiny"), MethodSpec("superglobal+locore-tiny", stage_options={"superglobal": {"K": 3}})):
        with pytest.raises(evaluation.EvaluationError, match="locore-tiny is a learned re-ranker.*--checkpoint"):
            evaluation.run(_config(data_root, tmp_path, methods=[spec]), log=lambda *a: None)
    # a checkpoint, or random weights asked for on purpose, is the user's choice
    chosen = MethodSpec("superglobal+locore-tiny", stage_options={"locore-tiny": {"pretrained": False}})
    assert weights_chosen(chosen) == ["locore-tiny="]
    assert weights_chosen(MethodSpec("locore-tiny", options={"checkpoint": "x"})) == ["locore-tiny="]


def test_figure_a_counts_the_positives_each_query_had_in_its_re_ranked_shortlist(data_root, tmp_path):
    report = evaluation.run(_config(data_root, tmp_path, top_k=3), log=lambda *a: None)
    data = synthetic.generate(0, "tiny")
    ranks = np.argsort(-(data.query_global @ data.gallery_global.T), axis=1, kind="stable")
    for protocol, ok_keys, leaves in (("medium", ("easy", "hard"), ("junk",)), ("hard", ("hard",), ("junk",)),
                                      ("hard*", ("hard",), ("junk", "easy"))):
        expected = []
        for q, entry in enumerate(data.gnd["gnd"]):
            gone = np.concatenate([np.asarray(entry[k], int) for k in leaves])
            head = [i for i in ranks[q] if i not in gone][:3]  # junk removed (default), and easy for Hard*
            expected.append(int(np.isin(head, np.concatenate([np.asarray(entry[k], int) for k in ok_keys])).sum()))
        assert report["results"]["superglobal"]["synthetic"][protocol]["shortlist_positives"] == expected
        assert "shortlist_positives" not in report["results"]["global"]["synthetic"][protocol]  # it re-ranks nothing
    with open(tmp_path / "per_query_ap.csv") as f:
        medium = [r for r in csv.DictReader(f) if r["protocol"] == "medium"]
    assert [int(r["positives_in_shortlist"]) for r in medium] == report["results"]["superglobal"]["synthetic"]["medium"]["shortlist_positives"]


def test_diagonal_counts_of_a_scatter():
    from locore_plugin.evaluation.report import diagonal_counts

    assert diagonal_counts([10, 50, 30, np.nan, 70], [20, 50, 10, 40, 90]) == (2, 1, 1)


def test_every_row_is_tested_against_the_chosen_baseline(data_root, tmp_path):
    methods = ("superglobal", MethodSpec("superglobal", label="superglobal-again"))
    report = evaluation.run(_config(data_root, tmp_path, methods, baseline="superglobal"), log=lambda *a: None)
    comparisons = report["comparisons"]
    assert set(comparisons) == {"global", "superglobal-again"}
    same = comparisons["superglobal-again"]["synthetic"]["medium"]
    assert same["difference"] == 0.0 and same["p"] == 1.0  # the same method twice
    g, s = (report["results"][r]["synthetic"]["medium"]["value"] for r in ("global", "superglobal"))
    assert comparisons["global"]["synthetic"]["medium"]["difference"] == pytest.approx(g - s)
    md = (tmp_path / "results.md").read_text()
    assert "Difference to superglobal" in md and "| superglobal | (baseline) |" in md
    summary = json.loads((tmp_path / "results.json").read_text())
    assert summary["settings"]["baseline"] == "superglobal" and summary["comparisons"] == comparisons
    with pytest.raises(evaluation.EvaluationError, match="baseline 'nope'"):
        evaluation.run(_config(data_root, tmp_path, methods, baseline="nope"), log=lambda *a: None)


def test_every_evaluation_recipe_names_registered_rerankers_and_checkpoints_a_recipe_writes():
    """A comparison recipe that names a run folder no training recipe writes would only fail when run."""
    from locore_plugin.registry import registered_rerankers
    from locore_plugin.training import load_config

    known = registered_rerankers()
    written = {load_config(path).output_dir for path in (ROOT / "recipes").glob("train_*.toml")}
    recipes = sorted((ROOT / "recipes").glob("eval_*.toml"))
    assert len(recipes) >= 9
    for path in recipes:
        for method in evaluation.read_recipe(path)["methods"]:
            assert all(stage in known for stage in method.name.split("+")), (path.name, method.name)
            checkpoint = method.options.get("checkpoint")
            if checkpoint and checkpoint.startswith("runs/"):
                assert str(Path(checkpoint).parent) in written, (path.name, checkpoint)
