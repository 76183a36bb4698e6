"""The shared result rules of locore_plugin.interface, by hand-computed cases."""
import numpy as np
import pytest

from locore_plugin.interface import RerankResult, ranked, with_tail


def test_ranked_orders_by_descending_score_stably():
    result = ranked(np.array([0.1, 0.5, 0.5, -1.0]))
    assert result.order.tolist() == [1, 2, 0, 3]
    np.testing.assert_array_equal(result.scores, np.float32([0.1, 0.5, 0.5, -1.0]))


def test_with_tail_keeps_the_tail_in_its_incoming_order_and_scores():
    head = RerankResult(order=np.array([2, 0, 1]), scores=np.float32([5.0, 3.0, 4.0]))
    result = with_tail(head, np.float32([0.9, 0.8, 0.7, 0.6, 0.5]), 5)
    assert result.order.tolist() == [2, 0, 1, 3, 4] and result.order.dtype == np.int64
    np.testing.assert_array_equal(result.scores, np.float32([5.0, 3.0, 4.0, 0.6, 0.5]))
    no_scores = with_tail(head, None, 4)
    np.testing.assert_array_equal(no_scores.scores, np.float32([5.0, 3.0, 4.0, 0.0]))
    assert with_tail(head, None, 3).order.tolist() == [2, 0, 1]
    with pytest.raises(ValueError, match="does not fit a shortlist of 2"):
        with_tail(head, None, 2)
