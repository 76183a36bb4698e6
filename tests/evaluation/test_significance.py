"""Paired significance of a difference between two rows: hand-computed cases and invariants."""
from __future__ import annotations

import itertools

import numpy as np
import pytest

from locore_plugin.evaluation import significance


def test_identical_rows_give_p_one_and_a_zero_interval():
    aps = np.random.default_rng(0).uniform(size=70)
    result = significance.compare(aps, aps)
    assert result.p_value == 1.0 and result.difference == 0.0 and (result.ci_low, result.ci_high) == (0.0, 0.0)
    assert not result.exact and result.queries == 70


def test_a_uniform_shift_on_every_query_gives_the_smallest_p():
    base = np.random.default_rng(1).uniform(0, 0.9, size=70)
    drawn = significance.compare(base, base + 0.05)
    # no random sign assignment reaches the observed mean: only the +1 of the finite-sample p-value
    assert drawn.p_value == pytest.approx(1 / (significance.PERMUTATIONS + 1))
    assert drawn.difference == pytest.approx(0.05) and drawn.ci_low == pytest.approx(0.05) and drawn.ci_high == pytest.approx(0.05)
    exact = significance.compare(base[:8], base[:8] + 0.05)  # 2**8 assignments: all enumerated
    assert exact.exact and exact.p_value == pytest.approx(2 / 2**8)  # all + and all - reach it


def test_exact_test_against_a_hand_enumeration():
    # differences (1, -1, 2): sums over the 8 sign assignments are 2, -2, 4, 0, 0, -4, 2, -2;
    # six of them reach |2|, so p = 6/8
    p, exact = significance.randomization_p_value(np.array([1.0, -1.0, 2.0]))
    assert exact and p == 0.75


def test_drawn_test_approximates_the_exact_one():
    d = np.random.default_rng(2).normal(0.1, 1.0, size=14)
    exact = np.mean([abs(np.mean(np.array(s) * d)) >= abs(d.mean()) - 1e-12
                     for s in itertools.product((-1, 1), repeat=d.size)])
    drawn, is_exact = significance.randomization_p_value(d, permutations=10_000)
    assert not is_exact and abs(drawn - exact) < 0.02  # 4 standard errors of a 10k draw


def test_queries_without_an_ap_are_left_out_and_lengths_must_match():
    result = significance.compare([0.5, None, 0.2], [0.7, 0.9, None])
    assert result.queries == 1 and result.difference == pytest.approx(0.2)
    with pytest.raises(ValueError, match="same queries"):
        significance.compare([0.1, 0.2], [0.1])


def test_the_bootstrap_interval_covers_the_difference_and_is_seeded():
    rng = np.random.default_rng(3)
    a, b = rng.uniform(size=70), rng.uniform(size=70)
    low, high = significance.bootstrap_interval(b - a)
    assert low < (b - a).mean() < high
    assert (low, high) == significance.bootstrap_interval(b - a)
