"""The training feed: official-layout files -> lists of (query, first K neighbours, labels)."""
from __future__ import annotations

import numpy as np
import pytest
from torch.utils.data import DataLoader

from locore_plugin import ImageFeatures
from locore_plugin.data.synthetic import generate
from locore_plugin.data.training_lists import (
    TrainingLists,
    open_training_lists,
    read_image_list,
    write_synthetic_split,
)
from locore_plugin.io.descriptors import write_descriptors, write_nn
from locore_plugin.training import collate_lists


def test_image_list_reads_landmark_ids(tmp_path):
    path = tmp_path / "train.txt"
    path.write_text("a/1.jpg,17,640,480\nb/2.jpg,3,480,640\n\n")
    assert read_image_list(path).tolist() == [17, 3]
    path.write_text("a/1.jpg\n")
    with pytest.raises(ValueError, match="train.txt:1: expected 'path,landmark_id,width,height'"):
        read_image_list(path)
    with pytest.raises(FileNotFoundError, match="train_750k"):
        read_image_list(tmp_path / "missing.txt")


def _lists(**kwargs) -> TrainingLists:
    # 6 images; image i's neighbours put itself second, as a global search may after ties
    features = [ImageFeatures(global_desc=np.full(2, i, np.float32)) for i in range(6)]
    neighbours = np.array([[1, 0, 2, 3, 4], [1, 0, 2, 5, 4], [5, 2, 3, 4, 0],
                           [3, 4, 5, 0, 1], [4, 3, 5, 0, 1], [5, 2, 4, 3, 0]], np.float64)  # floats, as the pickles hold
    labels = np.array([7, 7, 9, 7, -1, 9])  # image 4 is a distractor
    return TrainingLists(features, neighbours, labels, **kwargs)


def test_lists_skip_the_query_take_the_first_k_and_label_same_landmark():
    lists = _lists(list_length=3, shuffle_gallery=False)
    assert len(lists) == 5  # the distractor is never a query
    assert lists.queries.tolist() == [0, 1, 2, 3, 5]
    item = lists[1]  # image 1: neighbours [1, 0, 2, 5, 4] minus itself -> [0, 2, 5]
    assert item.index == 1 and item.query.global_desc[0] == 1
    assert [f.global_desc[0] for f in item.shortlist] == [0, 2, 5]
    assert item.labels.tolist() == [1, 0, 0]
    item = lists[3]  # image 3 -> [4, 5, 0]: the distractor is a negative, landmark 7 matches image 0
    assert item.labels.tolist() == [0, 0, 1]
    assert _lists(list_length=3, num_samples=2).queries.tolist() == [0, 1]
    # positives per list (topk 3): 0 -> [1, 2, 3]: 2; 1 -> [0, 2, 5]: 1; 2 -> [5, 3, 4]: 1; 3 -> [4, 5, 0]: 1; 5 -> [2, 4, 3]: 1
    assert _lists(list_length=3, min_positives=2).queries.tolist() == [0]
    assert _lists(list_length=3, min_positives=1).queries.tolist() == [0, 1, 2, 3, 5]


def test_triplets_draw_one_positive_and_one_negative_by_similarity_cubed():
    """The AMES TripletSampler: per anchor one positive and one negative of its first topk neighbours,
    each drawn with probability ~ similarity ** 3 among those of positive similarity."""
    features = [ImageFeatures(global_desc=np.full(2, i, np.float32)) for i in range(6)]
    neighbours = np.array([[0, 1, 2, 3, 4, 5]] * 6)
    sims = np.tile([1.0, 0.9, 0.5, 0.8, 0.4, -0.2], (6, 1))
    labels = np.array([1, 1, 1, 2, 2, 2])
    lists = TrainingLists(features, neighbours, labels, list_length=5, similarities=sims, pairs="triplet")
    assert lists.queries.tolist() == [0, 1, 2, 3, 4, 5]
    drawn = []
    for epoch in range(2000):
        lists.set_epoch(epoch)
        item = lists[0]  # anchor 0 (itself skipped): positives 1 (0.9), 2 (0.5); negatives 3 (0.8), 4 (0.4), 5 (-0.2)
        assert item.labels.tolist() == [1, 0] and len(item.shortlist) == 2
        drawn.append([f.global_desc[0] for f in item.shortlist])
    drawn = np.array(drawn)
    expected_pos = 0.9**3 / (0.9**3 + 0.5**3)
    expected_neg = 0.8**3 / (0.8**3 + 0.4**3)
    assert abs((drawn[:, 0] == 1).mean() - expected_pos) < 0.03
    assert abs((drawn[:, 1] == 3).mean() - expected_neg) < 0.03
    assert not (drawn[:, 1] == 5).any()  # a negative similarity is never drawn
    # the same (seed, epoch, index) draws the same pair: a resumed run sees the same pairs
    lists.set_epoch(7)
    again = TrainingLists(features, neighbours, labels, list_length=5, similarities=sims, pairs="triplet")
    again.set_epoch(7)
    assert [f.global_desc[0] for f in lists[2].shortlist] == [f.global_desc[0] for f in again[2].shortlist]
    # power 0: uniform (RRT), no similarities needed; anchors need min_positives / min_negatives
    uniform = TrainingLists(features, neighbours, labels, list_length=5, pairs="triplet", triplet_power=0)
    assert len(uniform[0].shortlist) == 2
    # every anchor has 2 positives and 3 negatives among its 5
    assert len(TrainingLists(features, neighbours, labels, list_length=5, pairs="triplet", triplet_power=0, min_negatives=3)) == 6
    with pytest.raises(ValueError, match=">= 4 negatives"):
        TrainingLists(features, neighbours, labels, list_length=5, pairs="triplet", triplet_power=0, min_negatives=4)
    with pytest.raises(ValueError, match="pass similarities"):
        TrainingLists(features, neighbours, labels, list_length=5, pairs="triplet")
    with pytest.raises(ValueError, match="pairs must be one of"):
        TrainingLists(features, neighbours, labels, list_length=5, pairs="quadruplet")
    with pytest.raises(ValueError, match="align"):
        TrainingLists(features, neighbours, labels, list_length=5, similarities=sims[:, :3], pairs="triplet")


def test_gallery_shuffle_is_seeded_by_seed_epoch_and_index():
    a, b = _lists(list_length=4, seed=3), _lists(list_length=4, seed=3)
    orders = {}
    for epoch in range(4):
        a.set_epoch(epoch)
        b.set_epoch(epoch)
        ia, ib = a.shortlist_indices(0)[1], b.shortlist_indices(0)[1]
        assert ia.tolist() == ib.tolist()  # the same in any process, after any restart
        assert sorted(ia.tolist()) == [1, 2, 3, 4]  # a permutation of the first 4 neighbours
        orders[epoch] = tuple(ia)
    assert len(set(orders.values())) > 1  # and it changes with the epoch
    item = a[0]  # labels follow the shuffled order
    assert item.labels.tolist() == [int(f.global_desc[0] in (1, 3)) for f in item.shortlist]


def test_bad_lists_fail_clearly():
    with pytest.raises(ValueError, match="holds only 5 neighbours"):
        _lists(list_length=6)
    with pytest.raises(ValueError, match="only 4 neighbours other than itself"):
        _lists(list_length=5)[0]
    features = [ImageFeatures(global_desc=np.ones(2)) for _ in range(3)]
    with pytest.raises(ValueError, match=r"lie in \[0, 3\)"):
        TrainingLists(features, np.array([[1, 3], [0, 2], [0, 1]]), np.zeros(3), list_length=1)
    with pytest.raises(ValueError, match="labels of shape"):
        TrainingLists(features, np.array([[1], [0], [0]]), np.zeros(4), list_length=1)
    with pytest.raises(ValueError, match="no image can be a query"):
        TrainingLists(features, np.array([[1], [0], [0]]), -np.ones(3), list_length=1)


def _write_official(folder, n=12, locals_=5, dim=4, seed=0):
    """Official-layout training files through the project's writers; returns the features written."""
    rng = np.random.default_rng(seed)
    features = []
    for i in range(n):
        valid = 2 + i % 4  # some images have padding rows
        features.append(ImageFeatures(
            global_desc=rng.normal(size=dim), local=rng.normal(size=(valid, dim)), xy=rng.random((valid, 2)),
            scale=rng.integers(0, 3, valid), weight=np.sort(rng.random(valid))[::-1],
        ))
    write_descriptors(folder, "d", "train", features, topk=locals_)
    g = np.stack([f.global_desc for f in features])
    sims = g @ g.T
    idx = np.argsort(-sims, axis=1)
    write_nn(folder / "nn_d.pkl", np.take_along_axis(sims, idx, 1), idx)
    labels = np.arange(n) % 3
    (folder / "train.txt").write_text("".join(f"img{i}.jpg,{labels[i]},64,48\n" for i in range(n)))
    return features, idx, labels


def test_official_files_become_lists(tmp_path):
    features, idx, labels = _write_official(tmp_path)
    lists = open_training_lists(tmp_path / "train.txt", tmp_path / "d_train_local.hdf5", tmp_path / "nn_d.pkl",
                                tmp_path / "d_train_global.pt", num_locals=4, list_length=6, shuffle_gallery=False)
    item = lists[5]
    expected = [j for j in idx[5] if j != 5][:6]
    assert [int(j) for j in lists.shortlist_indices(5)[1]] == expected
    assert item.labels.tolist() == [int(labels[j] == labels[5]) for j in expected]
    for got, j in zip([item.query, *item.shortlist], [5, *expected]):
        want = features[j]
        keep = min(want.num_locals, 4)  # the 4 strongest (rows are written by weight)
        np.testing.assert_allclose(got.global_desc, want.global_desc, rtol=1e-6)
        assert got.mask.tolist() == [True] * keep + [False] * (4 - keep)  # file mask 1 = padding, converted
        np.testing.assert_allclose(got.local[:keep], want.local[:keep], rtol=1e-6)
        np.testing.assert_array_equal(got.scale[:keep], want.scale[:keep])


def test_loader_workers_read_the_same_lists(tmp_path):
    """HDF5 is reopened in each worker process; what they read equals the main process's reads."""
    _write_official(tmp_path)
    lists = open_training_lists(tmp_path / "train.txt", tmp_path / "d_train_local.hdf5", tmp_path / "nn_d.pkl",
                                tmp_path / "d_train_global.pt", num_locals=5, list_length=4, seed=1)
    lists.set_epoch(2)
    batches = list(DataLoader(lists, batch_size=3, num_workers=2, collate_fn=collate_lists))
    queries, shortlists, labels = (sum((list(b[k]) for b in batches), []) for k in range(3))
    for i in range(len(lists)):
        direct = lists[i]
        np.testing.assert_array_equal(queries[i].local, direct.query.local)
        np.testing.assert_array_equal(np.stack([f.global_desc for f in shortlists[i]]),
                                      np.stack([f.global_desc for f in direct.shortlist]))
        np.testing.assert_array_equal(labels[i], direct.labels)


def test_missing_files_are_named(tmp_path):
    _write_official(tmp_path)
    with pytest.raises(FileNotFoundError, match="nope_local.hdf5"):
        open_training_lists(tmp_path / "train.txt", tmp_path / "nope_local.hdf5", tmp_path / "nn_d.pkl")


def test_synthetic_split_labels_agree_with_the_benchmark_ground_truth(tmp_path):
    paths = write_synthetic_split(tmp_path, seeds=(5,), size="tiny", depth=30)
    lists = open_training_lists(**paths, num_locals=24, list_length=20, shuffle_gallery=False)
    data = generate(5, "tiny")
    nq = len(data.query_local)
    instance = [frozenset(e["easy"] + e["hard"] + e["junk"]) for e in data.gnd["gnd"]]  # all views of it
    for q in range(nq):  # split rows: the queries, then the gallery (offset nq)
        row = int(np.flatnonzero(lists.queries == q)[0])
        _, gallery = lists.shortlist_indices(row)
        same = {nq + g for g in instance[q]} | {p for p in range(nq) if instance[p] == instance[q]}
        assert lists[row].labels.tolist() == [int(j in same) for j in gallery]
    stamp = (tmp_path / "nn_synth_train.pkl").stat().st_mtime_ns
    assert write_synthetic_split(tmp_path, seeds=(5,), size="tiny", depth=30) == paths
    assert (tmp_path / "nn_synth_train.pkl").stat().st_mtime_ns == stamp  # reused, not rewritten


def test_lists_from_a_category_benchmark_are_each_image_and_its_nearest_training_images(tmp_path):
    from locore_plugin.data.training_lists import open_benchmark_lists

    rng = np.random.default_rng(0)
    labels = np.repeat([4, 9, 2, 7], [3, 4, 2, 3])
    folder = tmp_path / "sop"
    folder.mkdir()
    (folder / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n"
                                           + "".join(f"{i + 1} {c} 1 p/{i}.jpg\n" for i, c in enumerate(labels)))
    (folder / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 100 1 t/0.jpg\n2 100 1 t/1.jpg\n")
    g = rng.normal(size=(len(labels), 8)).astype(np.float32)
    g /= np.linalg.norm(g, axis=1, keepdims=True)
    features = [ImageFeatures(global_desc=v, local=rng.normal(size=(3, 4)).astype(np.float32)) for v in g]
    write_descriptors(folder, "toy", "train", features)
    lists = open_benchmark_lists("sop", tmp_path, desc="toy", num_locals=None, list_length=5, shuffle_gallery=False)
    sims = g @ g.T
    assert len(lists) == len(labels)
    for i in range(len(labels)):
        expected = sorted((j for j in range(len(labels)) if j != i), key=lambda j: (-sims[i, j], j))[:5]
        item = lists[i]
        image, gallery = lists.shortlist_indices(i)
        assert image == i and gallery.tolist() == expected
        assert item.labels.tolist() == [int(labels[j] == labels[i]) for j in expected]
        np.testing.assert_array_equal(item.query.local, features[i].local)
    assert (folder / "nn_toy_train_exact.npz").is_file()  # built once, beside the descriptors
    with pytest.raises(ValueError, match="unknown benchmark 'sopp'"):
        open_benchmark_lists("sopp", tmp_path, desc="toy")
    (folder / "Ebay_train.txt").unlink()
    with pytest.raises(FileNotFoundError, match="no train split"):
        open_benchmark_lists("sop", tmp_path, desc="toy")


def test_the_synthetic_category_world_trains_and_validates_through_the_recipe_tables(tmp_path):
    from locore_plugin.data.training_lists import training_data
    from locore_plugin.training import build_validation

    lists = training_data({"benchmark": "synthetic-sop", "data_root": str(tmp_path), "world": {"seed": 0, "size": "tiny"},
                           "num_locals": 16, "list_length": 6})
    assert len(lists) > 0 and 0 < np.mean([lists[i].labels.mean() for i in range(len(lists))]) < 1
    validate = build_validation({"synthetic_sop": {"seed": 5, "size": "tiny"}, "directory": str(tmp_path / "v"),
                                 "protocols": ["map@r", "r@1"], "top_k": 6})
    from locore_plugin.registry import create_reranker

    scores = validate(create_reranker("superglobal"))
    assert list(scores) == ["mAP@R", "R@1", "global_mAP@R", "global_R@1"]
    with pytest.raises(ValueError, match="data.benchmark needs data.data_root"):
        training_data({"benchmark": "sop"})
