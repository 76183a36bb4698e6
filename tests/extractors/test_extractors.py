"""Shared extractor machinery: registry, image loading, crops, cache, descriptor files, rank() on images."""
import base64
import json
import pickle
import time

import cv2
import numpy as np
import pytest
import rerankers
from PIL import Image
from rerankers import Document

import locore_plugin  # noqa: F401  (installs the bridge)
from locore_plugin import create_reranker
from locore_plugin.cli import main
from locore_plugin.extractors import (
    ImageExtractor,
    create_extractor,
    crop_box,
    list_extractors,
    load_image,
)
from locore_plugin.features import ImageFeatures
from locore_plugin.hookspecs import hookimpl
from locore_plugin.io.descriptors import LocalReader, read_globals
from locore_plugin.registry import UnknownNameError

CALLS = []  # images the probe extracted, across instances (the CLI builds its own)


class Probe(ImageExtractor):
    """Locals = the pixels of a 4x4 grid of the crop (descriptor = their RGB), so that positions
    and crops can be checked against the image itself."""

    num_locals = 16

    def __init__(self, tag=0, fail_after=None, batch_size=2, verbose=0):
        self.tag, self.fail_after = tag, fail_after
        self.batch_size, self.verbose = batch_size, verbose

    @property
    def settings(self):
        return {"tag": self.tag}

    def _extract_batch(self, crops):
        out = []
        for crop in crops:
            if self.fail_after is not None and len(CALLS) >= self.fail_after:
                raise RuntimeError("interrupted")
            CALLS.append(crop.pixels.shape)
            h, w = crop.pixels.shape[:2]
            rows, cols = np.meshgrid(np.arange(4) * h // 4, np.arange(4) * w // 4, indexing="ij")
            rows, cols = rows.ravel(), cols.ravel()
            local = crop.pixels[rows, cols].astype(np.float32)
            out.append(ImageFeatures(global_desc=local.mean(0), local=local,
                                     xy=np.stack([(cols + 0.5) / w, (rows + 0.5) / h], 1),
                                     scale=np.full(16, self.tag), weight=16 - np.arange(16)))
        return out


class ProbePlugin:
    @hookimpl
    def register_extractors(self, register):
        register("probe", Probe, description="test probe")


@pytest.fixture
def probe(register_plugin):
    register_plugin(ProbePlugin(), "probe-plugin")
    CALLS.clear()


def picture(h=60, w=80, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def write_png(path, rgb):
    ok, data = cv2.imencode(".png", rgb[:, :, ::-1])
    path.write_bytes(data.tobytes())
    return path


# ---------------------------------------------------------------------------------------- registry


def test_builtin_extractors_are_listed_with_their_plugin():
    entries = {e.name: e for e in list_extractors()}
    assert {"sift", "dinov2-ames"} <= set(entries)
    assert entries["sift"].plugin == "locore_plugin.adapters.sift"
    assert entries["sift"].distribution == "locore-plugin"


def test_unknown_extractor_suggests_close_names_and_factories_reject_unknown_options():
    with pytest.raises(UnknownNameError, match="Did you mean: sift"):
        create_extractor("sfit")
    with pytest.raises(TypeError, match="no_such_option"):
        create_extractor("sift", no_such_option=1)


# ---------------------------------------------------------------------------------------- images


def test_every_image_source_decodes_to_the_same_rgb_pixels(tmp_path):
    rgb = picture()
    path = write_png(tmp_path / "a.png", rgb)
    text = base64.b64encode(path.read_bytes()).decode()
    sources = [path, str(path), text, "data:image/png;base64," + text, path.read_bytes()]
    keys = set()
    for source in sources:
        image = load_image(source)
        np.testing.assert_array_equal(image.pixels, rgb)
        keys.add(image.key)
    assert len(keys) == 1  # the key is the file content, however it arrives
    np.testing.assert_array_equal(load_image(Image.fromarray(rgb)).pixels, rgb)
    np.testing.assert_array_equal(load_image(rgb).pixels, rgb)
    np.testing.assert_array_equal(load_image(rgb[..., 0]).pixels, np.repeat(rgb[..., :1], 3, axis=2))
    assert load_image(rgb).key == load_image(Image.fromarray(rgb)).key != load_image(picture(seed=1)).key


def test_bad_image_sources_are_refused_clearly(tmp_path):
    with pytest.raises(FileNotFoundError, match="neither an image file nor base64"):
        load_image(str(tmp_path / "missing.jpg"))
    with pytest.raises(FileNotFoundError, match="not found"):
        load_image(tmp_path / "missing.jpg")
    with pytest.raises(ValueError, match="could not decode"):
        load_image(b"not an image")
    with pytest.raises(ValueError, match="uint8"):
        load_image(np.zeros((4, 4, 3), np.float32))
    with pytest.raises(TypeError, match="must be a path"):
        load_image(42)


def test_crop_box_truncates_like_the_official_slicing_and_clips():
    assert crop_box(60, 80, [10.7, 5.2, 50.9, 45.99]) == (10, 5, 50, 45)
    assert crop_box(60, 80, [-5, -1, 500, 70]) == (0, 0, 80, 60)
    with pytest.raises(ValueError, match="leaves nothing"):
        crop_box(60, 80, [30, 10, 30.5, 20])
    with pytest.raises(ValueError, match="x0, y0, x1, y1"):
        crop_box(60, 80, [1, 2, 3])


# ---------------------------------------------------------------------------------------- crops and cache


def test_a_query_crop_is_extracted_and_its_positions_mapped_to_the_full_image(probe):
    rgb = picture()
    extractor = create_extractor("probe")
    cropped = extractor.extract(rgb, bbox=[10.7, 5.2, 50.9, 45.0])
    assert CALLS == [(40, 40, 3)]  # the crop [5:45, 10:50]
    cols = np.rint(cropped.xy[:, 0] * 80 - 0.5).astype(int)
    rows = np.rint(cropped.xy[:, 1] * 60 - 0.5).astype(int)
    np.testing.assert_allclose(cropped.xy[:, 0] * 80 - 0.5, cols, atol=1e-4)
    np.testing.assert_array_equal(cropped.local, rgb[rows, cols])  # each local is the full image's pixel at its xy
    assert cols.min() == 10 and cols.max() == 10 + 3 * 40 // 4 and rows.min() == 5
    full = extractor.extract(rgb)
    np.testing.assert_allclose(full.xy[:, 0] * 80 - 0.5, np.tile(np.arange(4) * 20, 4), atol=1e-4)


def test_hook_register_extractors_adds_an_extractor_without_code_changes(probe):
    entry = {e.name: e for e in list_extractors()}["probe"]
    assert entry.plugin == "probe-plugin" and entry.description == "test probe"
    features = create_extractor("probe").extract(picture())
    assert features.local.shape[0] > 0 and len(CALLS) == 1


def test_features_are_cached_in_memory_per_image_and_box(probe):
    rgb = picture()
    extractor = create_extractor("probe", cache_size=2)
    first = extractor.extract(rgb)
    assert extractor.extract(rgb.copy()) is first and len(CALLS) == 1
    extractor.extract(rgb, bbox=[0, 0, 40, 40])
    assert len(CALLS) == 2
    extractor.extract_many([picture(seed=1), picture(seed=2)])  # evicts the two oldest
    extractor.extract(rgb)
    assert len(CALLS) == 5


def test_the_disk_cache_survives_instances_and_tells_settings_apart(probe, tmp_path):
    rgb = picture()
    a = create_extractor("probe", cache_dir=tmp_path).extract(rgb, bbox=[1, 2, 30, 40])
    b = create_extractor("probe", cache_dir=tmp_path).extract(rgb, bbox=[1, 2, 30, 40])
    assert len(CALLS) == 1
    for name in ("global_desc", "local", "mask", "xy", "scale", "weight"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))
    create_extractor("probe", cache_dir=tmp_path, tag=1).extract(rgb, bbox=[1, 2, 30, 40])
    assert len(CALLS) == 2
    assert len(list(tmp_path.glob("probe-*/*.npz"))) == 2
    assert [p.suffix for p in tmp_path.rglob("*") if p.is_file()] == [".npz", ".npz"]  # no temporary file left


def test_the_disk_cache_bound_deletes_the_least_recently_used_entries(probe, tmp_path):
    unbounded = create_extractor("probe", cache_dir=tmp_path / "sizes", cache_size=0)
    sizes = []
    for seed in (1, 2, 3, 4):
        unbounded.extract(picture(seed=seed))
        sizes.append(max(p.stat().st_size for p in (tmp_path / "sizes").rglob("*.npz")))
    limit = 3 * max(sizes) - 1  # two entries fit, three do not
    bounded = create_extractor("probe", cache_dir=tmp_path / "bounded", cache_size=0, cache_disk_gb=limit / 2**30)

    def entries():
        return {p.name for p in (tmp_path / "bounded").rglob("*.npz")}

    names = []
    for seed in (1, 2, 3):
        before = entries()
        bounded.extract(picture(seed=seed))
        names.append((entries() - before).pop())
        time.sleep(0.02)  # distinct modification times
    assert entries() == {names[1], names[2]}  # the oldest went
    calls = len(CALLS)
    bounded.extract(picture(seed=2))  # read from disk: now the most recently used
    assert len(CALLS) == calls
    time.sleep(0.02)
    bounded.extract(picture(seed=4))
    assert len(entries()) == 2 and names[1] in entries() and names[2] not in entries()
    bounded.extract(picture(seed=1))  # deleted: extracted again
    assert len(CALLS) == calls + 2
    with pytest.raises(ValueError, match="disk limit"):
        create_extractor("probe", cache_dir=tmp_path, cache_disk_gb=0)


def test_an_unreadable_disk_cache_entry_is_set_aside_and_recomputed(probe, tmp_path, capsys):
    rgb = picture()
    first = create_extractor("probe", cache_dir=tmp_path).extract(rgb)
    (entry,) = tmp_path.glob("probe-*/*.npz")
    entry.write_bytes(entry.read_bytes()[:100])
    again = create_extractor("probe", cache_dir=tmp_path).extract(rgb)
    assert len(CALLS) == 2  # recomputed
    np.testing.assert_array_equal(first.local, again.local)
    assert str(entry) in capsys.readouterr().err and entry.with_name(entry.name + ".corrupt").is_file()
    assert create_extractor("probe", cache_dir=tmp_path).extract(rgb) is not None and len(CALLS) == 2


# ---------------------------------------------------------------------------------------- descriptor files


def revisited_folder(tmp_path):
    images = tmp_path / "jpg"
    images.mkdir()
    names = [f"img{i}" for i in range(5)]
    for i, name in enumerate(names):
        write_png(images / f"{name}.png", picture(40 + 4 * i, 56, seed=i))
    gnd = {"imlist": [f"{n}.png" for n in names[2:]], "qimlist": [f"{n}.png" for n in names[:2]],
           "gnd": [{"bbx": [3.5, 4.0, 30.2, 33.0], "easy": [0], "hard": [], "junk": []},
                   {"bbx": [0, 0, 56, 44], "easy": [1], "hard": [], "junk": []}]}
    gnd_path = tmp_path / "gnd_test.pkl"
    gnd_path.write_bytes(pickle.dumps(gnd))
    return images, gnd_path, gnd


def test_extract_command_writes_the_official_layout_that_the_evaluation_reads(probe, tmp_path):
    images, gnd_path, gnd = revisited_folder(tmp_path)
    out = tmp_path / "out"
    assert main(["extract", "probe", "--images", str(images), "--out", str(out), "--gnd", str(gnd_path),
                 "--desc", "dino", "--quiet", "--option", "tag=2"]) == 0
    reference = create_extractor("probe", tag=2)
    for split, names, boxes in (("query", gnd["qimlist"], [g["bbx"] for g in gnd["gnd"]]),
                                ("gallery", gnd["imlist"], None)):
        expected = reference.extract_many([images / n for n in names], boxes)
        reader = LocalReader(out / f"dino_{split}_local.hdf5")
        assert reader.layout == "flat" and reader.topk == 16 and reader.dim == 3
        rows = reader.read(np.arange(len(names)))
        globals_ = read_globals(out / f"dino_{split}_global.pt", len(names))
        for i, f in enumerate(expected):
            np.testing.assert_array_equal(rows["local"][i], f.local)
            np.testing.assert_array_equal(rows["mask"][i], f.mask)
            np.testing.assert_allclose(rows["xy"][i], f.xy, rtol=1e-6)
            np.testing.assert_array_equal(rows["scale"][i], 2)
            np.testing.assert_array_equal(rows["weight"][i], f.weight)
            np.testing.assert_array_equal(globals_[i], f.global_desc)
        reader.close()
    assert not (out / ".extract-cache").exists()  # removed after success


def test_extract_command_writes_every_split_of_a_category_benchmark_that_eval_reads(probe, tmp_path):
    """``--benchmark sop``: the split files' images, in their order, as ``{desc}_{split}_*``; then
    ``eval --dataset sop`` scores the global ranking of those very descriptors."""
    folder = tmp_path / "sop"
    labels = {"train": [1, 1, 2], "test": [3, 3, 4, 4, 3]}
    for split, classes in labels.items():
        lines = ["image_id class_id super_class_id path"]
        for i, c in enumerate(classes):
            (folder / f"c{c}").mkdir(parents=True, exist_ok=True)
            write_png(folder / f"c{c}" / f"{split}{i}.png", picture(40, 48, seed=10 * c + i))
            lines.append(f"{i + 1} {c} 1 c{c}/{split}{i}.png")
        (folder / f"Ebay_{split}.txt").write_text("\n".join(lines) + "\n")
    assert main(["extract", "probe", "--images", str(folder), "--out", str(folder), "--benchmark", "sop", "--quiet"]) == 0
    reference = create_extractor("probe")
    for split, classes in labels.items():
        paths = [folder / f"c{c}" / f"{split}{i}.png" for i, c in enumerate(classes)]
        globals_ = read_globals(folder / f"probe_{split}_global.pt", len(paths))
        np.testing.assert_array_equal(globals_, [f.global_desc for f in reference.extract_many(paths)])
    out = tmp_path / "out"
    assert main(["eval", "--data-root", str(tmp_path), "--dataset", "sop", "--desc", "probe", "--protocols", "r@1,map@r",
                 "--out", str(out), "--no-plots"]) == 0
    g = read_globals(folder / "probe_test_global.pt", 5).astype(np.float64)
    sims = g @ g.T
    np.fill_diagonal(sims, -np.inf)
    test = np.array(labels["test"])
    expected = np.mean(test[sims.argmax(1)] == test)
    assert json.loads((out / "results.json").read_text())["results"]["global"]["sop"]["r@1"]["value"] == pytest.approx(expected)
    (folder / "c4" / "test2.png").unlink()
    with pytest.raises(FileNotFoundError, match="1 images of the test split missing"):
        main(["extract", "probe", "--images", str(folder), "--out", str(tmp_path / "x"), "--benchmark", "sop", "--quiet"])


def test_extract_command_resumes_after_an_interruption_and_skips_finished_splits(probe, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    for i in range(6):
        write_png(images / f"{i}.png", picture(seed=i))
    out = tmp_path / "out"
    args = ["extract", "probe", "--images", str(images), "--out", str(out), "--quiet", "--chunk-size", "2"]
    with pytest.raises(RuntimeError, match="interrupted"):
        main(args + ["--option", "fail_after=4"])  # fails in the third batch of two
    assert len(CALLS) == 4 and not (out / "probe_gallery_local.hdf5").exists()
    assert main(args) == 0
    assert len(CALLS) == 6  # only the two missing images were extracted
    assert (out / "probe_gallery_images.txt").read_text().split() == [f"{i}.png" for i in range(6)]
    assert len(read_globals(out / "probe_gallery_global.pt", 6)) == 6
    assert main(args) == 0 and len(CALLS) == 6  # finished: skipped


# ---------------------------------------------------------------------------------------- rank() on images


@pytest.fixture
def photos(shared_data, tmp_path):
    """Five landmark photos downscaled to 240 px: three of Sacre-Coeur, then two of London Bridge."""
    folder = shared_data("landmarks")
    chosen = sorted(folder.glob("sacre_coeur_*.jpg"))[:3] + sorted(folder.glob("london_bridge_*.jpg"))[:2]
    out = []
    for path in chosen:
        image = cv2.imread(str(path))
        factor = 240 / max(image.shape[:2])
        small = cv2.resize(image, None, fx=factor, fy=factor, interpolation=cv2.INTER_AREA)
        out.append(tmp_path / path.name)
        cv2.imwrite(str(out[-1]), small)
    return out


def test_rank_on_image_documents_equals_rerank_on_the_extracted_features(photos):
    query, gallery = photos[0], photos[1:]
    docs = [Document(document_type="image", doc_id=p.stem, image_path=str(p)) for p in gallery]
    ranker = rerankers.Reranker("gv", extractor="sift", extractor_options={"num_locals": 300}, verbose=0)
    sift = create_extractor("sift", num_locals=300)
    expected = create_reranker("gv").rerank(sift.extract(query), sift.extract_many(gallery))
    for q in (str(query), base64.b64encode(query.read_bytes()).decode(), Document(document_type="image", image_path=str(query))):
        results = ranker.rank(q, docs)
        assert [r.doc_id for r in results] == [gallery[i].stem for i in expected.order]
        np.testing.assert_array_equal([r.score for r in results], expected.scores[expected.order])
    assert results.results[0].document is docs[expected.order[0]]
    assert expected.scores[expected.order[0]] > 0
    single = ranker.rank(str(query), str(gallery[0]))  # one doc given alone, not as a list
    assert len(single.results) == 1 and single.results[0].document.image_path == str(gallery[0])
    assert ranker.score(str(query), str(gallery[0])) == single.results[0].score == expected.scores[0]


def test_rank_mixes_paths_features_and_pixels_and_uses_the_default_extractor(photos, monkeypatch):
    ranker = rerankers.Reranker("gv", verbose=0)  # gv registers sift as its default extractor
    sift = create_extractor("sift")
    features = sift.extract(photos[2])
    docs = [str(photos[1]), features, cv2.imread(str(photos[3]))[:, :, ::-1].copy(), Image.open(photos[4])]
    results = ranker.rank(str(photos[0]), docs)
    expected = create_reranker("gv").rerank(sift.extract(photos[0]), sift.extract_many([photos[1], photos[2], photos[3], photos[4]]))
    assert [r.doc_id for r in results] == list(expected.order)
    assert ranker.extractor().name == "sift"
    seen = []
    monkeypatch.setattr(ranker.extractor(), "_extract_batch", lambda crops: seen.append(crops) or [])
    ranker.rank(str(photos[0]), docs)  # every image is cached: nothing is extracted again
    assert seen == []


def test_a_query_document_bbox_crops_the_query(photos):
    box = [20, 30, 180, 170]
    query = Document(document_type="image", image_path=str(photos[0]), metadata={"bbox": box})
    ranker = rerankers.Reranker("gv", verbose=0, extractor="sift")
    results = ranker.rank(query, [str(p) for p in photos[1:]])
    sift = create_extractor("sift")
    expected = create_reranker("gv").rerank(sift.extract(photos[0], bbox=box), sift.extract_many(photos[1:]))
    np.testing.assert_array_equal([r.score for r in results], expected.scores[expected.order])


def test_raw_images_need_an_extractor_when_the_reranker_names_none(photos):
    with pytest.raises(ValueError, match="no ImageFeatures.*extractor=<name>.*sift"):
        rerankers.Reranker("superglobal", verbose=0).rank(str(photos[0]), [str(p) for p in photos[1:]])
    results = rerankers.Reranker("superglobal", extractor="sift", K=1, verbose=0).rank(str(photos[0]), [str(p) for p in photos[1:]])
    assert len(results.results) == 4
    with pytest.raises(TypeError, match="registered name or an ImageExtractor"):
        rerankers.Reranker("gv", extractor=3, verbose=0)
