"""Evaluation: re-rankers x datasets x protocols, as in LoCoRE supplementary Table B.

``datasets`` (configuration, the datasets), ``ranking`` (the global ranking, held as its head and
the positions of the ground truth's images), ``protocols`` (Medium,
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
    load_dataset,
    resolve_data_root,
)
from .ranking import RankingTail, global_ranking
from .report import format_table, write_outputs, write_plots
from .runner import run, untrained_reason
from .scoring import DatasetEvaluation, rerank_top, score_ranking
from .tuning import TuneConfig, grid_maps, head_logits, tune

__all__ = [
    "GLOBAL_ROW", "DatasetEvaluation", "EvalConfig", "EvalData", "EvaluationError", "MethodSpec", "RankingTail",
    "TuneConfig",
    "add_eval_command", "add_tune_command", "grid_maps", "head_logits", "tune",
    "apply_options", "checkpoint_option", "config_from_args", "format_table", "global_ranking",
    "guarded", "load_dataset", "main", "read_recipe", "rerank_top", "resolve_data_root", "run", "score_ranking",
    "untrained_reason", "write_outputs", "write_plots",
]
