"""The synthetic revisited dataset: official layout, determinism, and the planted structure.

The structure is checked with independent, hand-written scorers on the generated arrays:
mutual local matches (pair-wise evidence) and two-hop matches through the shortlist
(list-wise evidence), scored with revisitop's compute_map.
"""
from __future__ import annotations

import pickle

import numpy as np
import pytest

from locore_plugin.data import synthetic
from locore_plugin.evaluation.metrics import compute_map, revisited_gnd
from locore_plugin.io.descriptors import open_revisited, read_nn
from locore_plugin.io.pickles import read_pickle

MATCH = 0.75  # cosine above which two locals count as the same pattern (noise norm 0.5 -> ~0.89)


@pytest.fixture(scope="module")
def small():
    return synthetic.generate(0, "small")


def _locals(rows):
    return rows[..., 5:], rows[..., 3] == 0


def _matches(a_rows, b_rows):
    """[A, B] number of locals of each A image with a matching local in each B image."""
    a, am = _locals(a_rows)
    b, bm = _locals(b_rows)
    sims = np.einsum("ild,jmd->ijlm", a, b)
    sims = np.where(am[:, None, :, None] & bm[None, :, None, :], sims, -1)
    return (sims > MATCH).any(3).sum(2)


def _map(scores, gnd, protocol):
    return compute_map(np.argsort(-scores, axis=1, kind="stable").T, revisited_gnd(gnd, protocol))[0]


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = synthetic.generate(3, "tiny"), synthetic.generate(3, "tiny"), synthetic.generate(4, "tiny")
    for name in ("query_local", "gallery_local", "query_global", "gallery_global"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    assert a.gnd == b.gnd
    assert not np.array_equal(a.gallery_global, c.gallery_global)
    with pytest.raises(ValueError, match=r"unknown synthetic size 'huge'.*\['small', 'tiny'\]"):
        synthetic.generate(0, "huge")


def test_written_files_follow_the_official_layout(tmp_path):
    folder = synthetic.write(tmp_path, seed=1, size="tiny")
    data = synthetic.generate(1, "tiny")
    cfg = data.config
    names = {p.name for p in folder.iterdir()}
    assert {"gnd_synthetic.pkl", "nn_global.pkl", "synth_query_local.hdf5", "synth_gallery_local.hdf5",
            "synth_query_global.pt", "synth_gallery_global.pt"} <= names
    import h5py

    with h5py.File(folder / "synth_gallery_local.hdf5") as f:
        features = f["features"][:]
    assert features.shape == (len(data.gallery_global), cfg.topk, 5 + cfg.local_dim)
    np.testing.assert_array_equal(features, data.gallery_local)  # x, y, scale, mask (1 = padding), weight, desc
    assert set(np.unique(features[..., 3])) <= {0.0, 1.0} and features[..., 3].any()
    raw = np.fromfile(folder / "synth_gallery_global.pt", dtype="<f4").reshape(len(data.gallery_global), -1)
    np.testing.assert_array_equal(raw, data.gallery_global)
    gnd = read_pickle(folder / "gnd_synthetic.pkl")
    assert gnd == data.gnd and set(gnd["gnd"][0]) == {"easy", "hard", "junk", "bbx"}
    sims, idx = read_nn(folder / "nn_global.pkl")
    exact = data.query_global @ data.gallery_global.T
    assert idx.shape == (len(data.query_global), cfg.nn_depth)
    np.testing.assert_array_equal(idx[:, 0], exact.argmax(1))
    np.testing.assert_allclose(sims, np.take_along_axis(exact, idx, 1), atol=1e-6)
    with open_revisited("synthetic", "synth", tmp_path) as opened:  # the shared reader sees the same images
        first = opened.gallery.features([0])[0]
        assert first.num_locals == int((data.gallery_local[0, :, 3] == 0).sum())


def test_write_keeps_a_complete_folder_and_rewrites_for_another_seed(tmp_path):
    folder = synthetic.write(tmp_path, seed=0, size="tiny")
    stamp = (folder / "synth_gallery_local.hdf5").stat().st_mtime_ns
    synthetic.write(tmp_path, seed=0, size="tiny")
    assert (folder / "synth_gallery_local.hdf5").stat().st_mtime_ns == stamp
    synthetic.write(tmp_path, seed=5, size="tiny")
    assert read_pickle(folder / "gnd_synthetic.pkl") == synthetic.generate(5, "tiny").gnd


def test_ground_truth_is_consistent(small):
    ndb = len(small.gallery_global)
    for entry, transitive in zip(small.gnd["gnd"], small.transitive):
        sets = [set(entry[k]) for k in ("easy", "hard", "junk")]
        assert all(not (a & b) for i, a in enumerate(sets) for b in sets[i + 1 :])
        assert entry["easy"] and all(0 <= i < ndb for s in sets for i in s)
        assert set(transitive) <= sets[1]
    assert sum(len(t) for t in small.transitive) >= len(small.transitive)  # about one transitive case per query


def test_local_evidence_separates_what_the_global_descriptor_confuses(small):
    gnd = small.gnd["gnd"]
    global_scores = small.query_global @ small.gallery_global.T
    matches = _matches(small.query_local, small.gallery_local)
    local_scores = matches + 1e-3 * global_scores  # ties broken by the global score
    assert _map(global_scores, gnd, "medium") < 0.65
    assert _map(local_scores, gnd, "medium") > _map(global_scores, gnd, "medium") + 0.25
    easy = np.concatenate([matches[q, e["easy"]] for q, e in enumerate(gnd)])
    negatives = np.concatenate([
        np.delete(matches[q], np.concatenate([e["easy"], e["hard"], e["junk"]]).astype(int)) for q, e in enumerate(gnd)
    ])
    assert easy.mean() > 3 and negatives.mean() < 0.5


def test_transitive_hard_positives_need_list_wise_evidence(small):
    gnd = small.gnd["gnd"]
    matches = _matches(small.query_local, small.gallery_local)
    for q, transitive in enumerate(small.transitive):
        if transitive:
            assert (matches[q, transitive] == 0).all()  # nothing in common with the query...
            linked = _matches(small.gallery_local[transitive], small.gallery_local[gnd[q]["easy"]])
            assert (linked.max(1) >= 1).all()  # ...but with an easy positive
    # Two hops through the query's best direct matches lift them: the Hard mAP rises.
    direct = matches + 1e-3 * (small.query_global @ small.gallery_global.T)
    anchors = np.argsort(-direct, axis=1)[:, :3]
    two_hop = np.stack([_matches(small.gallery_local[a], small.gallery_local).max(0) for a in anchors])
    assert _map(direct + 0.5 * two_hop, gnd, "hard") > _map(direct, gnd, "hard") + 0.05


def test_gnd_pickle_is_plain(tmp_path):
    folder = synthetic.write(tmp_path, size="tiny")
    assert pickle.loads((folder / "gnd_synthetic.pkl").read_bytes()) == read_pickle(folder / "gnd_synthetic.pkl")
