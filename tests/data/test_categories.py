"""Category benchmark readers (SOP, In-shop, CUB-200-2011 split files as distributed) and the
synthetic category world written in the SOP layout."""
import numpy as np
import pytest

from locore_plugin.data import synthetic_sop
from locore_plugin.data.categories import CATEGORY_DATASETS, read_cub200, read_inshop, read_sop
from locore_plugin.io.descriptors import LocalReader, read_globals


def test_sop_reads_both_splits_in_file_order(tmp_path):
    (tmp_path / "Ebay_train.txt").write_text("image_id class_id super_class_id path\n"
                                             "1 1 1 bicycle_final/111085122871_0.JPG\n2 1 1 bicycle_final/111085122871_1.JPG\n"
                                             "3 2 1 bicycle_final/111265328556_0.JPG\n")
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n"
                                            "1 11319 1 bicycle_final/251952414262_0.JPG\n"
                                            "2 11318 1 bicycle_final/251952414262_1.JPG\n\n")
    splits = read_sop(tmp_path)
    assert splits["train"].paths == ("bicycle_final/111085122871_0.JPG", "bicycle_final/111085122871_1.JPG",
                                     "bicycle_final/111265328556_0.JPG")
    assert splits["train"].labels.tolist() == [1, 1, 2] and splits["test"].labels.tolist() == [11319, 11318]
    (tmp_path / "Ebay_train.txt").unlink()
    assert set(read_sop(tmp_path)) == {"test"}  # an evaluation-only copy
    (tmp_path / "Ebay_test.txt").write_text("image_id class_id super_class_id path\n1 2 3\n")
    with pytest.raises(ValueError, match="lines \\[2\\] have fewer than 4 fields"):
        read_sop(tmp_path)
    (tmp_path / "Ebay_test.txt").unlink()
    with pytest.raises(FileNotFoundError, match="Ebay_test.txt"):
        read_sop(tmp_path)


def test_inshop_splits_by_evaluation_status_with_item_ids_as_labels(tmp_path):
    (tmp_path / "list_eval_partition.txt").write_text(
        "5\nimage_name item_id evaluation_status\n"
        "img/WOMEN/Dresses/id_00000002/02_1_front.jpg id_00000002 train\n"
        "img/WOMEN/Dresses/id_00000007/01_1_front.jpg id_00000007 query\n"
        "img/WOMEN/Dresses/id_00000007/01_2_side.jpg id_00000007 gallery\n"
        "img/MEN/Denim/id_00000080/01_1_front.jpg id_00000080 gallery\n"
        "img/WOMEN/Dresses/id_00000002/02_2_side.jpg id_00000002 train\n")
    splits = read_inshop(tmp_path)
    assert splits["train"].labels.tolist() == [2, 2] and splits["query"].labels.tolist() == [7]
    assert splits["gallery"].paths == ("img/WOMEN/Dresses/id_00000007/01_2_side.jpg", "img/MEN/Denim/id_00000080/01_1_front.jpg")
    assert splits["gallery"].labels.tolist() == [7, 80]
    with open(tmp_path / "list_eval_partition.txt", "a") as f:
        f.write("img/x.jpg id_00000001 validation\n")
    with pytest.raises(ValueError, match="unknown evaluation_status \\['validation'\\]"):
        read_inshop(tmp_path)


def test_cub200_splits_classes_1_to_100_from_101_to_200(tmp_path):
    (tmp_path / "images.txt").write_text("1 001.Black_footed_Albatross/a.jpg\n2 101.White_Pelican/b.jpg\n"
                                         "3 200.Common_Yellowthroat/c.jpg\n4 100.Brown_Pelican/d.jpg\n")
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 101\n3 200\n4 100\n")
    splits = read_cub200(tmp_path)
    assert splits["train"].paths == ("images/001.Black_footed_Albatross/a.jpg", "images/100.Brown_Pelican/d.jpg")
    assert splits["test"].labels.tolist() == [101, 200]
    (tmp_path / "image_class_labels.txt").write_text("1 1\n2 101\n3 200\n")
    with pytest.raises(ValueError, match="different image ids"):
        read_cub200(tmp_path)


def test_each_benchmark_names_its_protocol_and_published_recall_ks():
    assert CATEGORY_DATASETS["sop"].recall_ks == (1, 10, 100, 1000) and CATEGORY_DATASETS["sop"].queries_are_gallery
    assert CATEGORY_DATASETS["inshop"].recall_ks == (1, 10, 20, 30, 40, 50)
    assert (CATEGORY_DATASETS["inshop"].query_split, CATEGORY_DATASETS["inshop"].gallery_split) == ("query", "gallery")
    assert CATEGORY_DATASETS["cub200"].recall_ks == (1, 2, 4, 8)


def test_the_synthetic_world_is_seeded_and_written_in_the_sop_layout(tmp_path):
    a, b = synthetic_sop.generate(3, "tiny"), synthetic_sop.generate(3, "tiny")
    for split in ("train", "test"):
        for x, y in zip(a[split], b[split]):
            np.testing.assert_array_equal(x, y)
    assert not np.array_equal(a["test"][1], synthetic_sop.generate(4, "tiny")["test"][1])
    folder = synthetic_sop.write(tmp_path, 3, "tiny")
    splits = read_sop(folder)
    assert not set(splits["train"].labels) & set(splits["test"].labels)  # disjoint classes, as SOP
    rows, globals_, labels, _ = a["test"]
    assert len(splits["test"]) == len(labels) and np.bincount(splits["test"].labels).max() >= 2
    reader = LocalReader(folder / "synth_test_local.hdf5")
    assert len(reader) == len(labels)
    np.testing.assert_allclose(read_globals(folder / "synth_test_global.pt", len(labels)), globals_, atol=1e-6)
    # the planted structure: the nearest image by local matches is far more often of the same class than by globals
    valid = rows[..., 3] == 0
    desc = np.where(valid[..., None], rows[..., 5:], 0)
    matches = np.einsum("aid,bjd->abij", desc, desc).max(3).clip(0).sum(2)  # sum of best matches, per image pair
    sims = globals_ @ globals_.T
    for m in (matches, sims):
        np.fill_diagonal(m, -np.inf)
    by_locals, by_globals = (np.mean(labels[m.argmax(1)] == labels) for m in (matches, sims))
    assert by_locals > by_globals + 0.2, (by_locals, by_globals)
    stamp = (folder / "synthetic-sop.json").stat().st_mtime_ns
    assert synthetic_sop.write(tmp_path, 3, "tiny") == folder and (folder / "synthetic-sop.json").stat().st_mtime_ns == stamp
