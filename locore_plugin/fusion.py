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


def read_tuned_fusion(path, name: str) -> tuple[float, float]:
    """The best ``(weight, temperature)`` a ``locore-plugin tune`` run wrote to ``path`` (its
    ``tune.json``) for the re-ranker ``name``; a file tuned for another method is an error."""
    import json
    from pathlib import Path

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"fusion file {path} does not exist (write one with `locore-plugin tune`)")
    tuned = json.loads(path.read_text())
    if not isinstance(tuned, dict) or "best" not in tuned or "method" not in tuned:
        raise ValueError(f"{path} is not a tune.json (keys 'method' and 'best' expected)")
    if tuned["method"] != name:
        raise ValueError(f"{path} was tuned for {tuned['method']!r}, not {name!r}")
    weight, temperature = tuned["best"]["fusion"]
    return float(weight), float(temperature)
