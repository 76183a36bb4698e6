"""``locore-plugin demo``: the built-in benchmark, on a fresh machine with nothing downloaded.

It writes the synthetic dataset, trains the small learned re-rankers briefly with the CPU smoke
recipes (so that their rows mean something), and runs the evaluation on it. It sits on top of
evaluation and training, which never import it.
"""
from __future__ import annotations

import dataclasses
import fnmatch
from importlib.resources import as_file, files
from pathlib import Path
from typing import Optional, Sequence

from locore_plugin.data import synthetic
from locore_plugin.evaluation import EvalConfig, MethodSpec, apply_options, checkpoint_option, format_table, guarded, run, untrained_reason
from locore_plugin.registry import create_reranker, list_rerankers
from locore_plugin.training import load_config
from locore_plugin.training import train as train_run

# The demo trains every CPU smoke recipe (``recipes/train_cpu_smoke*.toml``, installed as
# ``locore_plugin.recipes``), so that learned re-rankers take part with weights that mean something;
# a new method takes part by adding its recipe, with no change here.
DEMO_RECIPES = "train_cpu_smoke*.toml"


def demo_recipes() -> list[str]:
    """The file names of the demo's training recipes, sorted."""
    return sorted(p.name for p in files("locore_plugin.recipes").iterdir() if fnmatch.fnmatch(p.name, DEMO_RECIPES))


def train_demo_rerankers(out, log=print) -> list[MethodSpec]:
    """Train the demo's learned re-rankers briefly on synthetic worlds other than the benchmark's.

    A finished run is reused and an interrupted one resumes. Every file goes under ``out``: the
    runs in ``train/<recipe>``, the training worlds in ``train-data/<the recipe's folder name>``
    (recipes that name the same worlds share them), the validation world in ``validation-data``
    (the recipes validate on a world of their own, never on the benchmark reported here). Rows
    use the ``final`` weights.
    """
    out = Path(out)
    methods = []
    for recipe in demo_recipes():
        stem = recipe.removesuffix(".toml")
        with as_file(files("locore_plugin.recipes") / recipe) as path:
            config = load_config(path)
        config = dataclasses.replace(
            config,
            output_dir=str(out / "train" / stem),
            data={**config.data, "directory": str(out / "train-data" / Path(config.data["directory"]).name)},
            validation={**config.validation, "directory": str(out / "validation-data")},
        )
        final = Path(config.output_dir) / "final"
        if not final.is_dir():
            log(f"training {config.reranker} briefly on synthetic worlds ({recipe}; once, then reused) ...")
            train_run(config)
        options = {k: v for k, v in config.reranker_options.items() if k != "config"}
        options["checkpoint"] = str(final)
        methods.append(MethodSpec(config.reranker, options=options, label=f"{config.reranker} (trained: {stem})"))
        # A second row ranks by the method's own score alone (``fusion=None``, the shared
        # vocabulary), unless that already is its ranking, so that the table shows what it learned.
        if create_reranker(config.reranker, **options).fusion is not None:
            methods.append(MethodSpec(config.reranker, options={**options, "fusion": None},
                                      label=f"{config.reranker} (trained: {stem}; own score alone)"))
    return methods


def demo(out="locore-demo", size: str = "small", seed: int = 0, rerankers: Optional[Sequence[str]] = None,
         checkpoints: Sequence[str] = (), top_k: int = 100, train: bool = True, log=print) -> dict:
    """The built-in benchmark: write the synthetic dataset under ``{out}/data`` and compare the
    re-rankers on it (every registered training-free one by default). A learned re-ranker runs
    only with trained weights: a ``NAME=PATH`` checkpoint, or (``train``, the default) the brief
    CPU training of the recipes ``demo_recipes()`` finds; random weights would say nothing."""
    out = Path(out)
    synthetic.write(out / "data", seed, size)
    names = list(rerankers) if rerankers else [e.name for e in list_rerankers()]
    chosen, untrained = [], []
    for name in names:
        (chosen if untrained_reason(name, checkpoints) is None else untrained).append(name)
    if untrained:
        log(f"left out {len(untrained)} learned re-ranker(s) without trained weights ({', '.join(untrained)}): random "
            "weights would say nothing; --checkpoint NAME=PATH adds one")
    methods = [MethodSpec(name) for name in chosen]
    apply_options(methods, [checkpoint_option(c) for c in checkpoints if c.partition("=")[0] in
                            {p for m in methods for p in m.name.split("+")}])
    if train and size == "small" and seed == 0:
        methods += train_demo_rerankers(out, log)
    elif train:
        log("the demo's training recipes validate on the small benchmark of seed 0; no trained rows for this size/seed")
    config = EvalConfig(datasets=[synthetic.DATASET], methods=methods, data_root=str(out / "data"),
                        out=str(out / "results"), desc=synthetic.DESCRIPTOR, top_k=top_k)
    return run(config, log=log)


def _run_demo(args) -> None:
    report = demo(args.out, args.size, args.seed, args.rerankers, args.checkpoint, args.top_k, train=not args.no_train)
    print()
    print(f"Built-in synthetic benchmark ({args.size}, seed {args.seed}):")
    print(format_table(report))
    print(f"tables, per-query APs and plots in {(Path(args.out) / 'results').resolve()}")


def add_demo_command(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo", help="compare the re-rankers on the built-in synthetic benchmark (no download, a few minutes on CPU)",
        description=demo.__doc__,
    )
    parser.add_argument("--out", default="locore-demo", help="folder for the synthetic data, results and cache")
    parser.add_argument("--size", choices=sorted(synthetic.SIZES), default="small")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--reranker", action="append", dest="rerankers", metavar="NAME",
                        help="re-rankers to compare (default: every training-free registered one)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="trained weights for a learned re-ranker, which then takes part")
    parser.add_argument("--top-k", type=int, default=100)
    parser.add_argument("--no-train", action="store_true",
                        help="skip the brief CPU training of the small learned re-rankers (their rows are then left out)")
    parser.set_defaults(run=lambda args: guarded(_run_demo, args))
