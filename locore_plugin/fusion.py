"""Ensemble of a re-ranker's logit with the global similarity, as LoCoRE, AMES and RRT evaluate it."""
from __future__ import annotations

import numpy as np


def fuse_scores(global_scores: np.ndarray, logits: np.ndarray, weight: float, temperature: float) -> np.ndarray:
    """``weight * g + (1 - weight) * sigmoid(temperature * logit)``.

    LoCoRE calls the two parameters alpha and T (0.5, 0.1); AMES calls them lambda and gamma.
    """
    logits = np.asarray(logits, dtype=np.float64)
    fused = weight * np.asarray(global_scores, dtype=np.float64) + (1.0 - weight) / (1.0 + np.exp(-temperature * logits))
    return fused.astype(np.float32)
