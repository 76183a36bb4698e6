"""Evaluation: re-rankers x datasets x protocols, as in LoCoRE supplementary Table B.

``datasets`` (configuration, the revisited datasets, the global ranking), ``protocols`` (Medium,
Hard, Hard*), ``metrics`` (revisitop's mAP), ``scoring`` (re-rank the head, score per protocol),
``runner`` (the cached, resumable run), ``tuning`` (the fusion grid search), ``report`` (tables and
plots), ``command`` (``locore-plugin eval`` and ``tune``). Methods are reached only through the registry.
"""
from __future__ import annotations

from .command import add_eval_command, add_tune_command, apply_options, checkpoint_option, config_from_args, guarded, main, read_recipe
from .datasets import (
    GLOBAL_ROW,
    EvalConfig,
    EvalData,
    EvaluationError,
    MethodSpec,
    full_ranking,
    global_similarities,
    load_dataset,
    resolve_data_root,
)
from .report import format_table, write_outputs, write_plots
from .runner import run, untrained_reason
from .scoring import DatasetEvaluation, rerank_top, score_ranking
from .tuning import TuneConfig, grid_maps, head_logits, tune

__all__ = [
    "GLOBAL_ROW", "DatasetEvaluation", "EvalConfig", "EvalData", "EvaluationError", "MethodSpec", "TuneConfig",
    "add_eval_command", "add_tune_command", "grid_maps", "head_logits", "tune",
    "apply_options", "checkpoint_option", "config_from_args", "format_table", "full_ranking", "global_similarities",
    "guarded", "load_dataset", "main", "read_recipe", "rerank_top", "resolve_data_root", "run", "score_ranking",
    "untrained_reason", "write_outputs", "write_plots",
]
