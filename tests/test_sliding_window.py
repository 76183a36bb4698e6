"""The sliding-window procedure on hand-computed cases and on the official run's recorded windows."""
from __future__ import annotations

import json

import numpy as np
import pytest

from locore_plugin.sliding_window import sliding_rerank, window_starts


def test_window_starts():
    assert window_starts(40, 16, 8) == [24, 16, 8, 0]  # the golden run
    assert window_starts(400, 100, 50) == [300, 250, 200, 150, 100, 50, 0]  # the paper setting
    assert window_starts(400, 100, 50, "start-to-end") == [0, 50, 100, 150, 200, 250, 300]  # official range(0, 350, 50)
    assert window_starts(5, 16, 8) == [0]  # shorter than the window: one window
    assert window_starts(16, 16, 8) == [0]
    assert window_starts(40, 16, 10) == [24, 14, 4, 0]  # the official range stops at 4; 0 is added
    for bad in [(0, 16, 8), (40, 0, 8), (40, 16, 0)]:
        with pytest.raises(ValueError):
            window_starts(*bad)
    with pytest.raises(ValueError, match="unknown sliding order"):
        window_starts(40, 16, 8, "middle-out")


class TableScorer:
    """Scores a candidate by a fixed logit per shortlist position and records the windows it was fed."""

    def __init__(self, logits):
        self.logits = [np.asarray(l, np.float32) for l in logits]
        self.calls = []

    def __call__(self, requests):
        self.calls.append([(q, rows.tolist()) for q, rows in requests])
        return [self.logits[q][rows] for q, rows in requests]


# Hand-computed: g = [.4, .3, .2, .1], logits [-100, 0, 0, 100], alpha .5, T 1 ->
# fused = .5 g + .5 sigmoid(logit) = [.2, .4, .35, .55].
G = np.array([0.4, 0.3, 0.2, 0.1], np.float32)
LOGITS = [-100.0, 0.0, 0.0, 100.0]
FUSED = [0.2, 0.4, 0.35, 0.55]


def test_end_to_start_by_hand():
    # windows of 2, stride 1, starts 2, 1, 0:
    # [2,3] -> [3,2]: 0 1 3 2;  [1,3] -> [3,1]: 0 3 1 2;  [0,3] -> [3,0]: 3 0 1 2.
    scorer = TableScorer([LOGITS])
    (result,) = sliding_rerank([G], scorer, top_k=4, window=2, stride=1, fusion=(0.5, 1.0))
    assert scorer.calls == [[(0, [2, 3])], [(0, [1, 3])], [(0, [0, 3])]]
    assert result.order.tolist() == [3, 0, 1, 2]  # 0 stays above 1: they never share a window
    np.testing.assert_allclose(result.scores, FUSED, atol=1e-7)


def test_start_to_end_by_hand():
    # starts 0, 1, 2: [0,1] -> [1,0]: 1 0 2 3;  [0,2] -> [2,0]: 1 2 0 3;  [0,3] -> [3,0]: 1 2 3 0.
    scorer = TableScorer([LOGITS])
    (result,) = sliding_rerank([G], scorer, top_k=4, window=2, stride=1, order="start-to-end", fusion=(0.5, 1.0))
    assert scorer.calls == [[(0, [0, 1])], [(0, [0, 2])], [(0, [0, 3])]]
    assert result.order.tolist() == [1, 2, 3, 0]


def test_shortlist_shorter_than_window_and_tail_beyond_shortlist():
    scorer = TableScorer([LOGITS])
    (short,) = sliding_rerank([G], scorer, top_k=4, window=10, stride=5, fusion=(0.5, 1.0))
    assert scorer.calls == [[(0, [0, 1, 2, 3])]]
    assert short.order.tolist() == [3, 1, 2, 0]  # one window: plain sort by fused score

    six = np.array([0.4, 0.3, 0.2, 0.1, 0.05, 0.01], np.float32)
    scorer = TableScorer([LOGITS + [100.0, 100.0]])
    (result,) = sliding_rerank([six], scorer, top_k=4, window=10, stride=5, fusion=(0.5, 1.0))
    assert result.order.tolist() == [3, 1, 2, 0, 4, 5]  # 4 and 5 are beyond the shortlist: never scored
    np.testing.assert_allclose(result.scores, FUSED + [0.05, 0.01], atol=1e-7)


def test_queries_share_steps_and_lists_of_any_length():
    scorer = TableScorer([LOGITS, [0.0, 5.0], [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]])
    globals_ = [G, np.array([0.5, 0.5], np.float32), np.linspace(0.6, 0.1, 6).astype(np.float32)]
    results = sliding_rerank(globals_, scorer, top_k=6, window=2, stride=2, fusion=(0.5, 1.0))
    # starts: [2, 0] for 4, [0] for 2, [4, 2, 0] for 6; each step batches the queries that still have a window
    assert [[q for q, _ in call] for call in scorer.calls] == [[0, 1, 2], [0, 2], [2]]
    assert results[1].order.tolist() == [1, 0]
    for q, result in enumerate(results):
        (alone,) = sliding_rerank([globals_[q]], TableScorer([scorer.logits[q]]), top_k=6, window=2, stride=2,
                                  fusion=(0.5, 1.0))
        assert alone.order.tolist() == result.order.tolist()


def test_scorer_result_shape_is_checked():
    with pytest.raises(RuntimeError, match="returned shape"):
        sliding_rerank([G], lambda requests: [np.zeros(1) for _ in requests], top_k=4, window=2, stride=1)


@pytest.mark.golden("locore")
def test_replaying_official_window_logits_reproduces_official_run(golden_case):
    """The procedure alone (no model): fed the official run's window logits, it makes the official moves."""
    if not (golden_case / "sliding.npz").is_file():
        pytest.skip(f"{golden_case.name} has no sliding-window case")
    data = np.load(golden_case / "sliding.npz")
    settings = json.loads((golden_case / "sliding.json").read_text())
    steps = {}

    def replay(requests):
        out = []
        for q, rows in requests:
            step = steps.get(q, 0)
            steps[q] = step + 1
            assert rows.tolist() == data["window_input_order"][q, step].tolist()
            out.append(data["window_local_logits"][q, step])
        return out

    results = sliding_rerank(
        list(data["global_sims"]), replay, top_k=settings["sliding_topk_shortlist"],
        window=settings["window_size (--topk)"], stride=settings["stride (--sliding_stride)"],
        fusion=(settings["alpha"], settings["temp"]),
    )
    assert settings["window_starts"] == window_starts(settings["sliding_topk_shortlist"], settings["window_size (--topk)"],
                                                      settings["stride (--sliding_stride)"])
    for q, result in enumerate(results):
        assert result.order.tolist() == data["final_order"][q].tolist()
        np.testing.assert_allclose(result.scores, data["final_ensemble_score"][q], atol=1e-6, rtol=0)
