"""revisitop metrics against the official numbers (golden/revisitop) and hand-computed cases."""
from __future__ import annotations

import json

import numpy as np
import pytest

from locore_plugin import compute_map
from locore_plugin.evaluation.metrics import map_at_r, recall_at_k, revisited_gnd
from locore_plugin.io.pickles import read_pickle

DATASETS = ("roxford5k", "rparis6k")
TOL = 1e-12


def _rankings(golden, name, ndb, nq):
    """Rebuild every golden ranking [ndb, nq] from the README recipes and the stored arrays."""
    arrays = np.load(golden / f"ranks_{name}.npz")
    out = {
        "identity": np.repeat(np.arange(ndb)[:, None], nq, 1),
        "reversed": np.repeat(np.arange(ndb)[::-1, None], nq, 1),
    }
    for seed in range(3):
        rng = np.random.default_rng(seed)
        out[f"random_seed{seed}"] = np.stack([rng.permutation(ndb) for _ in range(nq)], axis=1)
    for key in ("near_perfect", "junk_interleaved", "mixed_interleaved"):
        flat, off = arrays[f"{key}_prefix_flat"].astype(np.int64), arrays[f"{key}_prefix_offsets"]
        columns = []
        for q in range(nq):
            prefix = flat[off[q]:off[q + 1]]
            columns.append(np.concatenate([prefix, np.setdiff1d(np.arange(ndb), prefix)]))
        out[key] = np.stack(columns, axis=1)
    assert np.array_equal(out["random_seed0"], arrays["random_seed0"])
    for seed in range(3):
        assert np.array_equal(out[f"random_seed{seed}"][:100], arrays[f"random_seed{seed}_top100"])
    return out


_CACHE: dict = {}


@pytest.fixture(params=DATASETS)
def dataset(request, golden_dir, shared_data):
    """(expected numbers, gnd list, rankings) of one dataset, built once per session."""
    name = request.param
    if name not in _CACHE:
        golden = golden_dir("revisitop")
        expected = json.loads((golden / "metrics.json").read_text())["datasets"][name]
        gnd = read_pickle(shared_data("revisitop") / expected["gnd_file"])["gnd"]
        _CACHE[name] = expected, gnd, _rankings(golden, name, expected["ndb"], expected["nq"])
    return _CACHE[name]


def _close(actual, expected):
    expected = np.array(expected, dtype=float)  # null -> nan
    np.testing.assert_allclose(actual, expected, rtol=0, atol=TOL, equal_nan=True)


def test_standard_matches_official(dataset):
    expected, gnd, ranks = dataset
    for ranking, protocols in expected["standard"].items():
        for protocol, want in protocols.items():
            m, aps, mpr, prs = compute_map(ranks[ranking], revisited_gnd(gnd, protocol))
            _close(m, want["mAP"])
            _close(mpr, want["mP@k"])
            _close(aps, want["aps"])
            _close(prs, want["prs"])


def test_empty_easy_queries_are_nan(dataset):
    expected, gnd, ranks = dataset
    _, aps, _, prs = compute_map(ranks["identity"], revisited_gnd(gnd, "easy"))
    assert np.isnan(aps).sum() == expected["n_queries_without_easy"] == np.isnan(prs[:, 0]).sum()


def test_truncated_variant_matches_ames_and_locore(dataset):
    expected, gnd, ranks = dataset
    for ranking, protocols in expected["ames_variant_top100"].items():
        for protocol, want in protocols.items():
            m, aps, mpr, prs = compute_map(ranks[ranking][:100], revisited_gnd(gnd, protocol), truncated=True)
            _close(m, want["mAP"])
            _close(mpr, want["mP@k"])
            _close(aps, want["aps"])
            _close(prs, want["prs"])
    for ranking, protocols in expected["ames_variant_full"].items():
        for protocol, want in protocols.items():
            m, _, mpr, _ = compute_map(ranks[ranking], revisited_gnd(gnd, protocol), truncated=True)
            _close(m, want["mAP"])
            _close(mpr, want["mP@k"])


def test_standard_on_top100_matches_or_refuses(dataset):
    expected, gnd, ranks = dataset
    for ranking, protocols in expected["standard_on_top100"].items():
        if "error" in protocols:
            with pytest.raises(ValueError, match="truncated=True"):
                for protocol in "EMH":
                    compute_map(ranks[ranking][:100], revisited_gnd(gnd, protocol))
            continue
        for protocol, want in protocols.items():
            m, aps, mpr, prs = compute_map(ranks[ranking][:100], revisited_gnd(gnd, protocol))
            _close(m, want["mAP"])
            _close(mpr, want["mP@k"])


def test_hand_computed_ap_with_junk():
    # list: 0 P, 1 J, 2 N, 3 P, 4 N, 5 P ; junk removed -> positives at 0, 2, 4 ; 4 positives in total
    ranks = np.array([[10, 20, 30, 11, 31, 12]]).T
    gnd = [{"ok": [10, 11, 12, 13], "junk": [20]}]
    m, aps, mpr, prs = compute_map(ranks, gnd, kappas=(1, 2, 5, 10))
    trapezoids = [(1 + 1) / 2, (1 / 2 + 2 / 3) / 2, (2 / 4 + 3 / 5) / 2]
    assert m == pytest.approx(sum(trapezoids) / 4, abs=1e-15)
    # 1-based adjusted positions 1, 3, 5: kq = min(5, k)
    np.testing.assert_allclose(prs[0], [1 / 1, 1 / 2, 3 / 5, 3 / 5])
    np.testing.assert_allclose(mpr, prs[0])


def test_truncated_option_on_hand_case():
    ranks = np.array([[5, 0, 1], [6, 7, 8]]).T  # query 1 has no positive in its 3-item list
    gnd = [{"ok": [0, 1, 2, 3, 4], "junk": [5]}, {"ok": [1], "junk": []}]
    with pytest.raises(ValueError, match="query 1 has no positive"):
        compute_map(ranks, gnd)
    m, aps, mpr, prs = compute_map(ranks, gnd, kappas=(1,), truncated=True)
    # query 0: junk removed -> positives at 0, 1; nres = min(5, 3) = 3
    np.testing.assert_allclose(aps, [2 / 3, 0.0])
    assert m == pytest.approx(1 / 3)
    np.testing.assert_allclose(prs[:, 0], [1.0, 0.0])


def test_all_empty_and_bad_input():
    m, aps, mpr, _ = compute_map(np.zeros((3, 1), int), [{"ok": [], "junk": []}])
    assert np.isnan(m) and np.isnan(aps).all() and np.isnan(mpr).all()
    with pytest.raises(ValueError, match="2 columns but there are 1 queries"):
        compute_map(np.zeros((3, 2), int), [{"ok": [1]}])
    with pytest.raises(ValueError, match="integer"):
        compute_map(np.full((3, 1), 0.5), [{"ok": [1]}])
    with pytest.raises(ValueError, match="unknown protocol"):
        revisited_gnd([{"easy": [], "hard": [], "junk": []}], "hardest")


def test_revisited_protocols():
    gnd = [{"easy": [1, 2], "hard": [3], "junk": [4], "bbx": [0, 0, 1, 1]}]
    e, m, h = (revisited_gnd(gnd, p)[0] for p in ("easy", "M", "hard"))
    assert e["ok"].tolist() == [1, 2] and sorted(e["junk"].tolist()) == [3, 4]
    assert m["ok"].tolist() == [1, 2, 3] and m["junk"].tolist() == [4]
    assert h["ok"].tolist() == [3] and sorted(h["junk"].tolist()) == [1, 2, 4]


def test_recall_at_k_and_map_at_r_hand_computed():
    gallery_labels = np.array([0, 0, 0, 1, 1, 2])
    query_labels = np.array([0, 1])
    ranks = np.array([[0, 3, 1, 2, 4, 5], [5, 0, 1, 2, 4, 3]]).T
    np.testing.assert_allclose(recall_at_k(ranks, query_labels, gallery_labels, ks=(1, 2, 5)), [0.5, 0.5, 1.0])
    # query 0: R = 3, top-3 relevance 1,0,1 -> (1 + 2/3) / 3 ; query 1: R = 2, top-2 relevance 0,0 -> 0
    assert map_at_r(ranks, query_labels, gallery_labels) == pytest.approx(((1 + 2 / 3) / 3 + 0) / 2)
    # the query is a gallery image left out of its own list: R shrinks by one
    assert map_at_r(ranks, query_labels, gallery_labels, exclude_self=True) == pytest.approx((1 / 2 + 0) / 2)
    with pytest.raises(ValueError, match="ranked items"):
        map_at_r(ranks[:2], query_labels, gallery_labels)
