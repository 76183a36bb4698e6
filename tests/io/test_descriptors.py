"""Official descriptor files: both HDF5 layouts, padding masks, +1M lazy concatenation, nn pickles, shortlists."""
from __future__ import annotations

import os
import pickle

import h5py
import numpy as np
import pytest

from locore_plugin import ImageFeatures, read_pickle
from locore_plugin.io import descriptors as dmod
from locore_plugin.io.descriptors import (
    DescriptorSet,
    DescriptorWriter,
    build_shortlist,
    descriptor_paths,
    open_revisited,
    read_nn,
    write_descriptors,
    write_nn,
)

D_LOCAL, D_GLOBAL, TOPK = 6, 4, 5


def _images(rng, n, max_locals=7):
    out = []
    for _ in range(n):
        k = int(rng.integers(1, max_locals + 1))
        out.append(ImageFeatures(
            global_desc=rng.standard_normal(D_GLOBAL), local=rng.standard_normal((k, D_LOCAL)),
            xy=rng.random((k, 2)), scale=rng.integers(0, 3, k).astype(float), weight=rng.random(k) + 0.1,
        ))
    return out


def _expected_rows(f, topk):
    """The rows a writer must keep: the strongest ``topk`` by weight, in their original order."""
    return np.sort(np.argsort(-f.weight, kind="stable")[:topk])


@pytest.mark.parametrize("layout", ["flat", "structured"])
def test_round_trip_both_layouts(tmp_path, layout):
    rng = np.random.default_rng(0)
    images = _images(rng, 9)
    local_path, global_path = write_descriptors(tmp_path, "toy", "gallery", images, topk=TOPK, layout=layout)
    assert (local_path.name, global_path.name) == ("toy_gallery_local.hdf5", "toy_gallery_global.pt")
    # the raw global file: N x D float32, no header
    np.testing.assert_array_equal(np.fromfile(global_path, "<f4").reshape(9, D_GLOBAL),
                                  np.stack([f.global_desc for f in images]))
    with h5py.File(local_path) as h5:
        if layout == "flat":
            raw = h5["features"][:]
            assert raw.shape == (9, TOPK, 5 + D_LOCAL) and raw.dtype == np.float32
            meta, desc = raw[..., :5], raw[..., 5:]
        else:
            assert h5["features"].shape == (9,)
            meta, desc = h5["features"]["metadata"], h5["features"]["descriptor"].astype(np.float32)
            assert h5["features"].dtype["descriptor"].base == np.float16
    tol = 0 if layout == "flat" else 2e-3
    with DescriptorSet([(local_path, global_path)]) as gallery:
        assert len(gallery) == 9 and gallery.local_dim == D_LOCAL and gallery.global_dim == D_GLOBAL
        order = [4, 0, 4, 8]
        read = gallery.features(order)
        for f, i in zip(read, order):
            src = images[i]
            keep = _expected_rows(src, TOPK)
            n = len(keep)
            assert f.mask.tolist() == [True] * n + [False] * (TOPK - n)
            np.testing.assert_array_equal(meta[i, n:, 3], 1.0)  # official padding flag
            np.testing.assert_array_equal(meta[i, :n, 3], 0.0)
            np.testing.assert_allclose(f.local[:n], src.local[keep], atol=tol * 4, rtol=tol)
            np.testing.assert_array_equal(f.local[n:], 0.0)
            np.testing.assert_array_equal(f.xy[:n], src.xy[keep])
            np.testing.assert_array_equal(f.scale[:n], src.scale[keep])
            np.testing.assert_array_equal(f.weight[:n], src.weight[keep])
            np.testing.assert_array_equal(f.global_desc, src.global_desc)
            np.testing.assert_allclose(desc[i, :n], src.local[keep], atol=tol * 4, rtol=tol)
        short = DescriptorSet([(local_path, global_path)], num_locals=2)[3]
        assert short.local.shape == (2, D_LOCAL)


def test_reads_a_file_written_the_official_way(tmp_path):
    """A flat file written directly as the AMES extractor does (columns x, y, scale, mask=1 pad, weight, desc)."""
    n, topk, dim = 3, 4, 2
    rows = np.zeros((n, topk, 5 + dim), np.float32)
    valid = [4, 1, 0]
    for i, v in enumerate(valid):
        rows[i, :v, 0:2] = [0.1 * i, 0.2]
        rows[i, :v, 2] = 1
        rows[i, :v, 4] = np.arange(v, 0, -1)
        rows[i, :v, 5:] = i + 1
        rows[i, v:, 3] = 1
    with h5py.File(tmp_path / "d_query_local.hdf5", "w") as h5:
        h5.create_dataset("features", data=rows)
    np.arange(n * 3, dtype=np.float32).tofile(tmp_path / "d_query_global.pt")
    s = DescriptorSet([descriptor_paths(tmp_path, "d", "query")])
    out = s.locals([2, 0, 1])
    assert out["mask"].tolist() == [[False] * 4, [True] * 4, [True, False, False, False]]
    np.testing.assert_array_equal(out["local"][1], np.ones((4, 2)))
    np.testing.assert_array_equal(out["weight"][1], [4, 3, 2, 1])
    np.testing.assert_array_equal(s.globals([1]), [[3, 4, 5]])
    assert s[2].num_locals == 0


def test_structured_as_two_datasets(tmp_path):
    meta = np.zeros((2, 3, 5), np.float32)
    meta[0, 2, 3] = meta[1, 1:, 3] = 1
    desc = np.arange(2 * 3 * 4, dtype=np.float16).reshape(2, 3, 4)
    with h5py.File(tmp_path / "s_gallery_local.hdf5", "w") as h5:
        h5["metadata"], h5["descriptor"] = meta, desc
    s = DescriptorSet([(tmp_path / "s_gallery_local.hdf5", None)])
    out = s.locals([1, 0])
    assert out["mask"].tolist() == [[True, False, False], [True, True, False]]
    np.testing.assert_array_equal(out["local"], desc[[1, 0]].astype(np.float32))
    assert not s.has_global and s[0].global_desc is None


def _dataset(root, name, nq, ndb, n1m, seed=0):
    rng = np.random.default_rng(seed)
    qs, db, dis = _images(rng, nq), _images(rng, ndb), _images(rng, n1m)
    write_descriptors(root / name, "toy", "query", qs, topk=TOPK)
    write_descriptors(root / name, "toy", "gallery", db, topk=TOPK)
    write_descriptors(root / "revisitop1m", "toy", None, dis, topk=TOPK)
    gnd = {"gnd": [{"easy": [0], "hard": [1], "junk": [], "bbx": [0, 0, 1, 1]} for _ in range(nq)],
           "imlist": [f"db{i}" for i in range(ndb)], "qimlist": [f"q{i}" for i in range(nq)]}
    (root / name / f"gnd_{name}.pkl").write_bytes(pickle.dumps(gnd))
    return qs, db, dis


def test_plus1m_concatenates_lazily(tmp_path, monkeypatch):
    qs, db, dis = _dataset(tmp_path, "toyset", 3, 5, 6)
    assert (tmp_path / "revisitop1m" / "toy_local.hdf5").is_file()
    reads = []
    original = dmod.LocalReader.read

    def spy(self, indices, num_locals=None):
        reads.append((self.path.name, sorted(np.asarray(indices).tolist())))
        return original(self, indices, num_locals)

    monkeypatch.setattr(dmod.LocalReader, "read", spy)
    monkeypatch.setenv("LOCORE_DATA", str(tmp_path))
    with open_revisited("toyset", "toy", plus1m=True) as data:
        assert len(data.queries) == 3 and len(data.gallery) == 11 and len(data.gnd) == 3
        assert all(isinstance(p.globals, np.memmap) for p in data.gallery._parts)
        got = data.gallery.features([7, 4, 5, 0, 10])
        want = [dis[2], db[4], dis[0], db[0], dis[5]]
        for f, w in zip(got, want):
            np.testing.assert_array_equal(f.global_desc, w.global_desc)
            np.testing.assert_array_equal(f.local[f.mask], w.local[_expected_rows(w, TOPK)])
        assert sorted(reads) == [("toy_gallery_local.hdf5", [0, 4]), ("toy_local.hdf5", [0, 2, 5])]
        batches = list(data.gallery.global_batches(4))
        assert [s for s, _ in batches] == [0, 4, 5, 9]
        np.testing.assert_array_equal(np.concatenate([b for _, b in batches]),
                                      np.stack([f.global_desc for f in db + dis]))
    with open_revisited("toyset", "toy", root=tmp_path) as data:
        assert len(data.gallery) == 5


def test_nn_pickle_round_trip(tmp_path):
    sims = np.array([[0.9, 0.5, 0.1], [0.8, 0.7, 0.2]], np.float32)
    idx = np.array([[4, 0, 2], [1, 3, 0]])
    path = write_nn(tmp_path / "nn_toy.pkl", sims, idx)
    raw = read_pickle(path)  # the official format: a float64 [2, nq, K] tensor, read back as numpy
    assert raw.dtype == np.float64 and raw.shape == (2, 2, 3)
    s, i = read_nn(path)
    np.testing.assert_array_equal(s, sims)
    np.testing.assert_array_equal(i, idx)
    assert i.dtype == np.int64
    (tmp_path / "nn_np.pkl").write_bytes(pickle.dumps(np.stack([sims, idx]).astype(np.float32)))  # the gldv2 form
    np.testing.assert_array_equal(read_nn(tmp_path / "nn_np.pkl")[1], idx)
    (tmp_path / "bad.pkl").write_bytes(pickle.dumps(np.zeros((3, 2, 2))))
    with pytest.raises(ValueError, match=r"\[2, nq, K\]"):
        read_nn(tmp_path / "bad.pkl")


def test_faiss_shortlist_matches_brute_force_with_batches():
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((50, 8)).astype(np.float32)
    gallery[31] = gallery[3]  # a tie: the lower index comes first
    queries = np.concatenate([gallery[3:4], rng.standard_normal((4, 8)).astype(np.float32)])
    sims, idx = build_shortlist(queries, gallery, depth=12, batch_size=7, verbose=False)
    full = queries @ gallery.T
    want = np.lexsort((np.broadcast_to(np.arange(50), full.shape), -full), axis=1)[:, :12]
    np.testing.assert_array_equal(idx, want)
    np.testing.assert_allclose(sims, np.take_along_axis(full, want, 1), rtol=1e-5, atol=1e-5)
    assert idx[0, 0] == 3 and idx[0, 1] == 31
    assert build_shortlist(queries, gallery, depth=99, verbose=False)[1].shape == (5, 50)


def test_shortlist_cache_and_official_nn(tmp_path, monkeypatch):
    _dataset(tmp_path, "toyset", 3, 5, 6)
    data = open_revisited("toyset", "toy", root=tmp_path, plus1m=True)
    sims, idx = data.shortlist(depth=4, verbose=False)
    cache = tmp_path / "toyset+1m" / "nn_toy_exact.npz"
    assert cache.is_file() and idx.shape == (3, 4)
    q = data.queries.globals(range(3))
    g = data.gallery.globals(range(11))
    np.testing.assert_array_equal(idx, np.argsort(-(q @ g.T), axis=1, kind="stable")[:, :4])

    def refuse(*a, **k):
        raise AssertionError("the cache should have been used")

    monkeypatch.setattr(dmod, "build_shortlist", refuse)
    np.testing.assert_array_equal(data.shortlist(depth=3)[1], idx[:, :3])
    with pytest.raises(AssertionError):  # deeper than the cache: rebuilt
        data.shortlist(depth=6)
    later = cache.stat().st_mtime + 10
    os.utime(tmp_path / "revisitop1m" / "toy_global.pt", (later, later))
    with pytest.raises(AssertionError):  # descriptors newer than the cache: rebuilt
        data.shortlist(depth=3)
    monkeypatch.undo()
    cache.write_bytes(cache.read_bytes()[:40])  # truncated (and newer than the descriptors): set aside and rebuilt
    os.utime(cache, (later + 10, later + 10))
    np.testing.assert_array_equal(data.shortlist(depth=4, verbose=False)[1], idx)
    assert cache.with_name(cache.name + ".corrupt").is_file()
    write_nn(tmp_path / "toyset+1m" / "nn_sg.pkl", sims[:, ::-1], idx[:, ::-1])
    np.testing.assert_array_equal(data.shortlist(nn="sg")[1], idx[:, ::-1])
    with pytest.raises(FileNotFoundError, match=r"nn_other\.pkl.*revisitop"):
        data.shortlist(nn="other")
    write_nn(tmp_path / "toyset+1m" / "nn_big.pkl", sims, idx + 20)
    with pytest.raises(ValueError, match="outside the gallery"):
        data.shortlist(nn="big")
    data.close()


def test_missing_files_and_root(tmp_path, monkeypatch):
    monkeypatch.delenv("LOCORE_DATA", raising=False)
    with pytest.raises(FileNotFoundError, match="LOCORE_DATA"):
        open_revisited("roxford5k", "dinov2")
    with pytest.raises(FileNotFoundError, match=r"gnd_roxford5k\.pkl.*cmp\.felk\.cvut\.cz/revisitop"):
        open_revisited("roxford5k", "dinov2", root=tmp_path)
    _dataset(tmp_path, "toyset", 2, 3, 2)
    with pytest.raises(FileNotFoundError, match=r"dinov2_query_local\.hdf5.*revisitop"):
        open_revisited("toyset", "dinov2", root=tmp_path)


def test_writer_is_atomic_and_checks_counts(tmp_path):
    images = _images(np.random.default_rng(2), 3)
    with pytest.raises(ValueError, match="2 images written, 3 announced"):
        with DescriptorWriter(tmp_path, "w", "query", 3, TOPK, D_LOCAL, D_GLOBAL) as writer:
            writer.append(images[:2])
    with pytest.raises(RuntimeError):
        with DescriptorWriter(tmp_path, "w", "query", 3, TOPK, D_LOCAL, D_GLOBAL) as writer:
            writer.append(images)
            raise RuntimeError("interrupted")
    assert list(tmp_path.iterdir()) == []
    with pytest.raises(ValueError, match="dimension"):
        write_descriptors(tmp_path, "w", "query",
                          images + [ImageFeatures(global_desc=np.ones(D_GLOBAL + 1), local=np.ones((1, D_LOCAL)))])
    with DescriptorWriter(tmp_path, "w", "gallery", 3, TOPK, global_dim=D_GLOBAL) as writer:  # globals only
        writer.append(images[:1])
        writer.append(images[1:])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w_gallery_global.pt"]
