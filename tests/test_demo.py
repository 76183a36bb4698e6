"""``locore-plugin demo``: the built-in benchmark on the tiny synthetic world, and what it trains."""
from locore_plugin import demo
from locore_plugin.registry import list_rerankers
from locore_plugin.training import load_config


def test_the_demo_trains_every_cpu_smoke_recipe_of_a_learned_method():
    """The recipes are found, not listed: each names a learned re-ranker, and every learned method
    with a smoke recipe takes part (RRT has none yet: docs/training.md says why)."""
    from importlib.resources import as_file, files

    recipes = demo.demo_recipes()
    assert recipes == sorted(recipes) and "train_cpu_smoke.toml" in recipes and len(recipes) >= 4
    learned = {e.name for e in list_rerankers() if e.metadata.learned}
    for recipe in recipes:
        with as_file(files("locore_plugin.recipes") / recipe) as path:
            assert load_config(path).reranker in learned, recipe


def test_demo_runs_training_free_rerankers_and_leaves_out_untrained_ones(tmp_path):
    lines = []
    report = demo.demo(tmp_path, size="tiny", rerankers=["superglobal", "locore-tiny", "superglobal+locore-tiny"],
                           log=lines.append)
    assert list(report["results"]) == ["global", "superglobal"]
    left = [line for line in lines if line.startswith("left out")]
    assert left == ["left out 2 learned re-ranker(s) without trained weights (locore-tiny, superglobal+locore-tiny): "
                    "random weights would say nothing; --checkpoint NAME=PATH adds one"]
    assert (tmp_path / "results" / "results.md").is_file() and (tmp_path / "data" / "synthetic" / "synthetic.json").is_file()


def test_cli_demo_prints_the_table(tmp_path, capsys):
    from locore_plugin.cli import main

    assert main(["demo", "--out", str(tmp_path), "--size", "tiny", "--reranker", "superglobal"]) == 0
    out = capsys.readouterr().out
    assert "Built-in synthetic benchmark (tiny, seed 0)" in out and "| superglobal |" in out


