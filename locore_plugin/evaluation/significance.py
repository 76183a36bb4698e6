"""Is a difference in mAP real? Paired tests on per-query APs.

A comparison table of re-rankers reads differences of 0.5-2 mAP off 70 queries; whether such a
difference would survive another draw of queries is a question about the paired per-query APs
of the two rows. Two answers are reported next to every row:

* a two-sided **paired randomization (sign-flip) test**: under the null hypothesis that the two
  methods are exchangeable on each query, the sign of each per-query difference is a fair coin;
  the p-value is the share of sign assignments whose mean difference is at least as far from 0
  as the observed one. With ``2**n <= permutations`` every assignment is enumerated (the exact
  test); otherwise ``permutations`` random ones are drawn with a fixed seed and the p-value is
  ``(hits + 1) / (permutations + 1)``, which is never 0 and is valid for a finite sample.
* a **paired bootstrap** 95% confidence interval of the mAP difference (queries resampled with
  replacement, percentile interval).

Queries where either row has no AP (no positive under the protocol) are left out, as the mAP
leaves them out.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Sequence

import numpy as np

PERMUTATIONS = 10_000
BOOTSTRAP_SAMPLES = 10_000
CONFIDENCE = 0.95
SEED = 0
_CHUNK = 1 << 22  # sign draws per block: bounds memory for benchmarks with many queries


@dataclass(frozen=True)
class PairedComparison:
    """Row ``b`` against baseline ``a`` on the same queries (APs as fractions)."""

    queries: int  # queries scored by both rows
    difference: float  # mAP(b) - mAP(a) over those queries
    ci_low: float
    ci_high: float
    p_value: float
    exact: bool  # every sign assignment enumerated

    def as_dict(self) -> dict:
        return {"queries": self.queries, "difference": self.difference, "ci": [self.ci_low, self.ci_high],
                "p": self.p_value, "exact": self.exact}


def _paired(a: Sequence[Optional[float]], b: Sequence[Optional[float]]) -> np.ndarray:
    a = np.array([np.nan if v is None else v for v in a], np.float64)
    b = np.array([np.nan if v is None else v for v in b], np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same queries in both rows, got {a.size} and {b.size} APs")
    kept = ~(np.isnan(a) | np.isnan(b))
    return b[kept] - a[kept]


def randomization_p_value(differences: np.ndarray, permutations: int = PERMUTATIONS, seed: int = SEED) -> tuple[float, bool]:
    """Two-sided sign-flip p-value of the mean of ``differences``; (p, exact)."""
    d = np.asarray(differences, np.float64)
    n = d.size
    if n == 0:
        return float("nan"), True
    observed = abs(d.mean())
    tolerance = 1e-12 * max(1.0, np.abs(d).max())  # ties: float sums in another order
    if n <= 62 and 2**n <= permutations:  # exact: every assignment of signs, as bits of 0 .. 2**n - 1
        hits = 0
        codes = np.arange(2**n, dtype=np.int64)
        for start in range(0, codes.size, max(1, _CHUNK // n)):
            bits = (codes[start : start + _CHUNK // n, None] >> np.arange(n)) & 1
            means = ((1 - 2 * bits) * d).mean(1)
            hits += int((np.abs(means) >= observed - tolerance).sum())
        return hits / 2**n, True
    rng = np.random.default_rng(seed)
    hits = 0
    rows = max(1, _CHUNK // n)
    for start in range(0, permutations, rows):
        signs = rng.choice(np.array([-1.0, 1.0]), size=(min(rows, permutations - start), n))
        hits += int((np.abs((signs * d).mean(1)) >= observed - tolerance).sum())
    return (hits + 1) / (permutations + 1), False


def bootstrap_interval(differences: np.ndarray, samples: int = BOOTSTRAP_SAMPLES, confidence: float = CONFIDENCE,
                       seed: int = SEED) -> tuple[float, float]:
    """Percentile interval of the mean difference over queries resampled with replacement."""
    d = np.asarray(differences, np.float64)
    if d.size == 0:
        return float("nan"), float("nan")
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    rows = max(1, _CHUNK // d.size)
    for start in range(0, samples, rows):
        count = min(rows, samples - start)
        means[start : start + count] = d[rng.integers(0, d.size, size=(count, d.size))].mean(1)
    tail = (1 - confidence) / 2
    low, high = np.quantile(means, [tail, 1 - tail])
    return float(low), float(high)


def compare(baseline_aps, row_aps, permutations: int = PERMUTATIONS, samples: int = BOOTSTRAP_SAMPLES,
            seed: int = SEED) -> PairedComparison:
    """Paired randomization test and bootstrap interval of ``row`` minus ``baseline`` (per-query APs)."""
    d = _paired(baseline_aps, row_aps)
    p, exact = randomization_p_value(d, permutations, seed)
    low, high = bootstrap_interval(d, samples, seed=seed)
    return PairedComparison(int(d.size), float(d.mean()) if d.size else float("nan"), low, high, p, exact)
