"""The evaluation runner: re-rankers x datasets x protocols, as in LoCoRE supplementary Table B.

``locore-plugin eval ...`` (or ``python -m locore_plugin.evaluation ...``) ranks each dataset's
gallery by global similarity (or takes the official ``nn_*.pkl`` shortlist), applies each
protocol's shortlist rule (:mod:`locore_plugin.evaluation.protocols`), lets every re-ranker re-order the
top-K, and scores the result with revisitop's ``compute_map``. Re-rankers are reached only
through the registry, so a chain such as ``superglobal+locore-base`` is just a name.

Every (method, dataset) result is cached as one JSON file, written atomically, keyed by
everything that changes it: an interrupted run resumes where it stopped and a finished one
re-prints its table at once. Outputs: ``results.md``/``.csv``/``.json`` (rows = methods,
columns = Medium/Hard/Hard* per dataset), ``per_query_ap.csv`` and per-query AP scatter plots.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Sequence

from locore_plugin.options import SYNTAX, parse_assignment, read_recipe_file

from .datasets import IMAGE_CACHE_GB, EvalConfig, EvaluationError, MethodSpec
from .protocols import JUNK_MODES
from .report import format_table
from .runner import run, untrained_reason, weights_chosen
from .tuning import OFFICIAL_GRID, TuneConfig, format_grid, tune

RECIPE_KEYS = {"datasets", "methods", "data_root", "out", "protocols", "junk", "top_k", "metric", "depth", "desc",
               "nn", "device", "dtype", "batch_size", "plots", "baseline", "images", "image_cache_gb"}


def read_recipe(path) -> dict:
    """A TOML (or JSON) recipe with the keys of :class:`EvalConfig`; ``methods`` is a list of
    tables ``{name, label?, options?, stage_options?}``."""
    try:
        recipe = read_recipe_file(path)
    except (OSError, ValueError) as error:
        raise EvaluationError(str(error)) from None
    unknown = set(recipe) - RECIPE_KEYS
    if unknown:
        raise EvaluationError(f"recipe {path}: unknown keys {sorted(unknown)}; known: {sorted(RECIPE_KEYS)}")
    methods = []
    for entry in recipe.get("methods", []):
        extra = set(entry) - {"name", "label", "options", "stage_options"}
        if "name" not in entry or extra:
            raise EvaluationError(f"recipe {path}: a method needs 'name' and only label/options/stage_options, got {entry}")
        methods.append(MethodSpec(entry["name"], dict(entry.get("options", {})),
                                  {k: dict(v) for k, v in entry.get("stage_options", {}).items()}, entry.get("label", "")))
    recipe["methods"] = methods
    return recipe


def apply_options(methods: list, options: Sequence[str]) -> None:
    """``NAME.KEY=VALUE``: KEY=VALUE for the row or registered name NAME, or for the stage NAME of
    every chain that contains it (``--option locore-base.checkpoint=/ckpt`` reaches
    ``superglobal+locore-base``). ``--checkpoint NAME=PATH`` is ``NAME.checkpoint=PATH``."""
    for text in options:
        try:
            target, value = parse_assignment(text, "--option")
        except ValueError as error:
            raise EvaluationError(f"{error} (with NAME. before KEY)") from None
        name, dot, key = target.rpartition(".")
        if not (dot and name and key):
            raise EvaluationError(f"--option expects NAME.KEY=VALUE, got {text!r}; VALUE: {SYNTAX}")
        hits = 0
        for m in methods:
            if name in (m.row, m.name):
                m.options[key] = value
                hits += 1
            elif name in m.name.split("+"):
                m.stage_options.setdefault(name, {})[key] = value
                hits += 1
        if not hits:
            raise EvaluationError(f"--option {text!r}: no method or chain stage is named {name!r}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The options of ``locore-plugin eval`` (and ``python -m locore_plugin.evaluate``)."""
    parser.add_argument("--recipe", help="TOML/JSON recipe (recipes/eval_*.toml); the options below override it")
    parser.add_argument("--dataset", action="append", dest="datasets", metavar="NAME",
                        help="roxford5k, rparis6k, roxford5k+1m, rparis6k+1m, or any folder name under the data root "
                             "(repeatable)")
    parser.add_argument("--reranker", action="append", dest="rerankers", metavar="NAME",
                        help="registered name or chain a+b (repeatable; replaces the recipe's methods); the global-only "
                             "row is always included")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE",
                        help="a factory option of one method or chain stage (repeatable); VALUE: a TOML or "
                        "Python literal (None, True, 0.5, [0.0, 1.0], (0.55, 0.3)) or plain text")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH",
                        help="shorthand for --option NAME.checkpoint=PATH")
    parser.add_argument("--data-root", help="dataset root (default: $LOCORE_DATA)")
    parser.add_argument("--out", help="output folder (tables, per-query APs, plots, cache); default eval_results")
    parser.add_argument("--protocols", help="comma-separated: medium,hard,hard* (default all three); GLDv2 datasets "
                        "(gldv2-test, gldv2-val) always report their own public / private / combined")
    parser.add_argument("--junk", choices=JUNK_MODES, help="junk before re-ranking: keep (revisitop/SuperGlobal) or "
                                                           "remove (DELG/AMES/RRT/LoCoRE code; default)")
    parser.add_argument("--top-k", type=int, help="images re-ranked per query (default 100)")
    parser.add_argument("--metric", choices=("standard", "truncated"),
                        help="standard revisitop mAP on the full ranking (default), or the AMES/LoCoRE top-K variant")
    parser.add_argument("--depth", type=int, help="list length for --metric truncated (default: the nn file's, else 1600)")
    parser.add_argument("--desc", help="descriptor name of the files, {desc}_query_local.hdf5 ... (default dinov2)")
    parser.add_argument("--nn", help="use the published shortlist nn_NAME.pkl (default: exact global ranking)")
    parser.add_argument("--device", help="device for every re-ranker (cpu, cuda, auto)")
    parser.add_argument("--dtype", help="dtype for every re-ranker (fp32, bf16, fp16)")
    parser.add_argument("--batch-size", type=int, help="queries per re-ranking call and re-ranker batch size")
    parser.add_argument("--no-plots", dest="plots", action="store_false", default=None, help="skip the PNG scatter plots")
    parser.add_argument("--images", metavar="DIR", help="the dataset's images, for methods that read them (CVNet's dense "
                        "maps; extracted on the fly and cached): {dataset} is replaced; default DATA_ROOT/DATASET/jpg")
    parser.add_argument("--image-cache-gb", type=float, metavar="GB", help="the most the features extracted from "
                        f"--images take on disk, least recently used deleted first (default {IMAGE_CACHE_GB:g})")
    parser.add_argument("--baseline", metavar="ROW", help="the row every other row is tested against: paired "
                        "randomization p and bootstrap interval of the mAP difference (default: global)")
    parser.add_argument("--fusion-from", action="append", default=[], metavar="TUNE_JSON",
                        help="use the fusion that `locore-plugin tune` chose (its tune.json) for the method it names "
                             "(repeatable)")


def config_from_args(args: argparse.Namespace) -> EvalConfig:
    recipe = read_recipe(args.recipe) if args.recipe else {}
    if args.rerankers:
        recipe["methods"] = [MethodSpec(name) for name in args.rerankers]
    for key in ("datasets", "data_root", "out", "protocols", "junk", "top_k", "metric", "depth", "desc", "nn",
                "device", "dtype", "batch_size", "plots", "baseline", "images", "image_cache_gb"):
        value = getattr(args, key)
        if value is not None:
            recipe[key] = value
    if isinstance(recipe.get("protocols"), str):
        recipe["protocols"] = recipe["protocols"].split(",")
    recipe.setdefault("methods", [])
    if "datasets" not in recipe:
        raise EvaluationError("no dataset: give --dataset NAME or a --recipe that lists datasets")
    apply_options(recipe["methods"], [*args.option, *(checkpoint_option(c) for c in args.checkpoint),
                                      *(fusion_option(f) for f in args.fusion_from)])
    try:
        return EvalConfig(**recipe)
    except TypeError as error:
        raise EvaluationError(str(error)) from None


def checkpoint_option(text: str) -> str:
    name, sep, path = text.partition("=")
    if not (sep and name and path):
        raise EvaluationError(f"--checkpoint expects NAME=PATH, got {text!r}")
    return f"{name}.checkpoint={json.dumps(path)}"


def fusion_option(path: str) -> str:
    """``--fusion-from tune.json``: ``METHOD.fusion=tune.json`` for the method the file was tuned for."""
    try:
        method = json.loads(Path(path).read_text())["method"]
    except (OSError, ValueError, KeyError, TypeError) as error:
        raise EvaluationError(f"--fusion-from {path}: not a readable tune.json ({error})") from None
    return f"{method}.fusion={json.dumps(str(path))}"


def guarded(function, args) -> int:
    """Run a command; a user error is one line on stderr and exit status 2, not a traceback."""
    try:
        function(args)
    except (EvaluationError, ValueError, FileNotFoundError) as error:
        print(f"locore-plugin: error: {error}", file=sys.stderr)
        return 2
    return 0


def _run_eval(args) -> None:
    config = config_from_args(args)
    report = run(config)
    print(format_table(report))
    print(f"tables, per-query APs and plots in {Path(config.out).resolve()}")


def add_eval_command(subparsers) -> None:
    parser = subparsers.add_parser("eval", help="evaluate re-rankers on revisited Oxford/Paris (Medium/Hard/Hard*)",
                                   description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    parser.set_defaults(run=lambda args: guarded(_run_eval, args))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m locore_plugin.evaluation", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_arguments(parser)
    return guarded(_run_eval, parser.parse_args(argv))



# -- locore-plugin tune ---------------------------------------------------------------------------


def add_tune_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--reranker", required=True, metavar="NAME", help="registered name of a re-ranker with a fusion step")
    parser.add_argument("--dataset", default="gldv2-val", help="tuning dataset under the data root (default gldv2-val, "
                        "the GLDv2 public validation split as the paper; or any revisited-layout folder not reported on)")
    parser.add_argument("--option", action="append", default=[], metavar="NAME.KEY=VALUE", help="a factory option (repeatable)")
    parser.add_argument("--checkpoint", action="append", default=[], metavar="NAME=PATH", help="shorthand for --option NAME.checkpoint=PATH")
    parser.add_argument("--data-root", help="dataset root (default: $LOCORE_DATA)")
    parser.add_argument("--out", default="tune_results", help="output folder: tune.json / .md / .png and the logits cache")
    parser.add_argument("--protocol", help="the protocol whose mAP chooses the pair (default: medium; GLDv2: public)")
    parser.add_argument("--junk", choices=JUNK_MODES, default="remove", help="junk before re-ranking (default remove)")
    parser.add_argument("--top-k", type=int, default=100, help="images scored per query, in one pass (default 100)")
    parser.add_argument("--metric", choices=("standard", "truncated"), default="standard")
    parser.add_argument("--depth", type=int, help="list length for --metric truncated")
    parser.add_argument("--desc", default="dinov2", help="descriptor name of the files (default dinov2)")
    parser.add_argument("--nn", help="use the published shortlist nn_NAME.pkl")
    parser.add_argument("--weights", type=_grid, default=OFFICIAL_GRID, help="comma-separated weights (default 0, 0.1, ..., 1)")
    parser.add_argument("--temperatures", type=_grid, default=OFFICIAL_GRID, help="comma-separated temperatures (default 0, 0.1, ..., 1)")
    parser.add_argument("--device", help="device for the re-ranker")
    parser.add_argument("--dtype", help="dtype for the re-ranker")
    parser.add_argument("--batch-size", type=int, default=8, help="queries per head_logits call")
    parser.add_argument("--images", metavar="DIR", help="the dataset's images, for methods that read them (as for eval)")
    parser.add_argument("--image-cache-gb", type=float, default=IMAGE_CACHE_GB, metavar="GB",
                        help=f"bound of the features cached from --images (as for eval; default {IMAGE_CACHE_GB:g})")


def _grid(text: str) -> tuple:
    try:
        return tuple(float(v) for v in text.split(",") if v.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated numbers, got {text!r}") from None


def _run_tune(args) -> None:
    method = MethodSpec(args.reranker)
    apply_options([method], [*args.option, *(checkpoint_option(c) for c in args.checkpoint)])
    reason = untrained_reason(method.name, weights_chosen(method))
    if reason is not None:
        raise EvaluationError(f"{reason}; pass --checkpoint {method.name}=PATH")
    common = {k: v for k, v in (("device", args.device), ("dtype", args.dtype)) if v is not None}
    result = tune(TuneConfig(method, args.dataset, args.data_root, args.out, args.protocol, args.junk, args.top_k,
                             args.metric, args.depth, args.desc, args.nn, args.weights, args.temperatures,
                             args.batch_size, common, args.images, args.image_cache_gb))
    print(format_grid(result))
    print(f"grid, heat map and the chosen fusion in {Path(args.out).resolve()}; evaluate with "
          f"`locore-plugin eval ... --fusion-from {Path(args.out) / 'tune.json'}`")


def add_tune_command(subparsers) -> None:
    from . import tuning

    parser = subparsers.add_parser("tune", help="choose a re-ranker's fusion (weight, temperature) on a tuning dataset",
                                   description=tuning.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_tune_arguments(parser)
    parser.set_defaults(run=lambda args: guarded(_run_tune, args))
