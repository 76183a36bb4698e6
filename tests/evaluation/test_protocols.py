"""Protocols on a hand-made ground truth: which images a re-ranker may see, and what that does.

One query q and six gallery images (unit 3-d global descriptors): e0 easy, h1 hard, n2..n4
negatives, j5 junk. Global similarities to q: e0 0.7, n2 0.6, n3 0.5, j5 0.4, h1 0.3, n4 0.2.
h1 resembles only e0 (0.85; the transitive case): a list-wise scorer reaches it through e0.
"""
from __future__ import annotations

import numpy as np
import pytest

from locore_plugin import ImageFeatures, create_reranker
from locore_plugin.evaluation import DatasetEvaluation, EvalData, global_ranking
from locore_plugin.evaluation.protocols import HARD, HARD_STAR, MEDIUM, get_protocol, parse_protocols, prepare_ranking
from locore_plugin.interface import ImageReranker, ranked

GND = [{"easy": [0], "hard": [1], "junk": [5]}]


def _image(sim_q, toward_e0=0.0, private=None):
    """q = x; e0 = 0.7 x + 0.714 y; each other image adds its own private axis (so the
    negatives resemble each other only through q's axis)."""
    v = np.zeros(8)
    v[0], v[1] = sim_q, toward_e0
    if private is not None:
        v[private] = np.sqrt(1 - sim_q**2 - toward_e0**2)
    return v.astype(np.float32)


QUERY = _image(1.0)
GALLERY = np.stack([
    _image(0.7, np.sqrt(1 - 0.49)),  # e0
    _image(0.3, 0.9, private=2),  # h1: similarity 0.85 to e0, 0.3 to q
    _image(0.6, private=3),  # n2
    _image(0.5, private=4),  # n3
    _image(0.2, private=5),  # n4
    _image(0.4, private=6),  # j5
])


def _data():
    feats = [ImageFeatures(global_desc=g) for g in GALLERY]
    ranking, scores, _ = global_ranking(QUERY[None], GALLERY, depth=len(GALLERY))  # the full ranking
    return EvalData("hand", GND, [ImageFeatures(global_desc=QUERY)], lambda ids: [feats[i] for i in ids],
                    ranking, scores)


class PathScorer(ImageReranker):
    """List-wise: an image scores its best two-step path q -> y -> x through the shortlist."""

    def _rerank_many(self, queries, shortlists, global_scores):
        out = []
        for q, shortlist in zip(queries, shortlists):
            g = np.stack([d.global_desc for d in shortlist])
            direct = g @ q.global_desc
            via = np.minimum(direct[:, None], g @ g.T)  # [y, x]
            np.fill_diagonal(via, -1)
            out.append(ranked(np.maximum(direct, via.max(0))))
        return out


class BandScorer(ImageReranker):
    """Pair-wise: a score from (query, image) alone, preferring global similarity near 0.3."""

    def _rerank_many(self, queries, shortlists, global_scores):
        return [ranked(-np.abs(s - 0.3)) for s in global_scores]


def test_protocol_definitions():
    assert [p.name for p in parse_protocols("M, H, h*")] == ["medium", "hard", "hard*"]
    assert get_protocol("hardstar") is HARD_STAR
    assert MEDIUM.removed_keys("keep") == () and MEDIUM.removed_keys("remove") == ("junk",)
    assert HARD.removed_keys("keep") == () and HARD.removed_keys("remove") == ("junk",)
    assert HARD_STAR.removed_keys("keep") == ("easy",) and HARD_STAR.removed_keys("remove") == ("junk", "easy")
    ok_junk = HARD_STAR.scoring_gnd(GND)[0]  # Hard* is scored as Hard: easy counts as junk
    assert ok_junk["ok"].tolist() == [1] and sorted(ok_junk["junk"].tolist()) == [0, 5]
    with pytest.raises(ValueError, match="unknown protocol"):
        get_protocol("easy")
    with pytest.raises(ValueError, match="junk mode"):
        HARD.removed_keys("drop")


def test_prepare_ranking_moves_removed_images_behind_in_order():
    ranking = np.array([[0, 2, 3, 5, 1, 4]])
    order, kept = prepare_ranking(ranking, GND, HARD_STAR, "remove")
    assert np.take_along_axis(ranking, order, 1).tolist() == [[2, 3, 1, 4, 0, 5]] and kept.tolist() == [4]
    order, kept = prepare_ranking(ranking, GND, HARD, "keep")
    assert order.tolist() == [list(range(6))] and kept.tolist() == [6]
    with pytest.raises(ValueError, match="shape"):
        prepare_ranking(ranking[0], GND, HARD, "keep")


def test_global_ranking_is_what_the_hand_computation_says():
    scores = DatasetEvaluation(_data(), ["medium", "hard", "hard*"], junk="keep").run()
    # Order e0 n2 n3 j5 h1 n4. Medium (junk j5 deleted): e0 at 0, h1 at 3 -> (1 + (1/3 + 2/4)/2) / 2.
    assert scores["medium"]["value"] == pytest.approx((1 + (1 / 3 + 2 / 4) / 2) / 2)
    # Hard (e0, j5 junk): h1 at 2 -> (0 + 1/3) / 2.
    assert scores["hard"]["value"] == pytest.approx(1 / 6) and scores["hard*"]["value"] == pytest.approx(1 / 6)


def test_listwise_scorer_gives_different_hard_and_hard_star():
    scores = DatasetEvaluation(_data(), ["hard", "hard*"], junk="keep").run(PathScorer(), top_k=6)
    # Hard: e0 stays in the shortlist and lifts h1 (path q-e0-h1 = min(0.7, 0.85)) above every negative.
    assert scores["hard"]["value"] == pytest.approx(1.0)
    # Hard*: without e0, h1's best path is its own 0.3 (negative paths <= 0.3 * 0.6): behind
    # n2, n3 and j5 (junk), AP 1/6; the negatives keep their direct order (paths via others are lower).
    assert scores["hard*"]["value"] == pytest.approx(1 / 6)


def test_pairwise_scorer_gives_identical_hard_and_hard_star_on_the_same_shortlist():
    for junk in ("keep", "remove"):
        scores = DatasetEvaluation(_data(), ["hard", "hard*"], junk=junk).run(BandScorer(), top_k=6)
        assert scores["hard"]["per_query"] == scores["hard*"]["per_query"]
        assert scores["hard"]["value"] == pytest.approx(1.0)  # h1 (0.3) comes first


def test_junk_removal_changes_what_enters_a_short_shortlist():
    # top_k = 4: with junk kept the shortlist is e0 n2 n3 j5 and h1 cannot be reached;
    # with junk removed, h1 takes j5's slot and the pair-wise scorer puts it first.
    keep = DatasetEvaluation(_data(), ["hard"], junk="keep").run(BandScorer(), top_k=4)
    remove = DatasetEvaluation(_data(), ["hard"], junk="remove").run(BandScorer(), top_k=4)
    assert keep["hard"]["value"] == pytest.approx(1 / 6)
    assert remove["hard"]["value"] == pytest.approx(1.0)


def test_superglobal_uses_the_easy_image_as_an_anchor():
    """The registered list-wise SuperGlobal also sees Hard and Hard* differently here."""
    sg = create_reranker("superglobal", K=1)
    scores = DatasetEvaluation(_data(), ["hard", "hard*"], junk="keep").run(sg, top_k=6)
    assert scores["hard"]["value"] > scores["hard*"]["value"]
