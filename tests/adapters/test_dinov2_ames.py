"""dinov2-ames on a small random DINOv2 (registers) and random detector weights."""
import cv2
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from locore_plugin.adapters.dinov2_ames import SpatialAttention2d
from locore_plugin.extractors import Crop, create_extractor
from locore_plugin.io.checkpoints import StateDictMismatchError

DIM = 32
OFFICIAL_KEYS = {  # extract/spatial_attention_2d.py: conv1 + bn + conv2 (act1 and softplus hold no weights)
    "conv1.weight": (DIM, DIM, 1, 1), "conv1.bias": (DIM,), "bn.weight": (DIM,), "bn.bias": (DIM,),
    "bn.running_mean": (DIM,), "bn.running_var": (DIM,), "bn.num_batches_tracked": (),
    "conv2.weight": (1, DIM, 1, 1), "conv2.bias": (1,),
}


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A tiny random DINOv2-with-registers folder and a random detector in the official container."""
    from transformers import Dinov2WithRegistersConfig, Dinov2WithRegistersModel

    folder = tmp_path_factory.mktemp("dinov2")
    torch.manual_seed(0)
    config = Dinov2WithRegistersConfig(hidden_size=DIM, num_hidden_layers=2, num_attention_heads=4,
                                       intermediate_size=64, patch_size=14, image_size=56, num_register_tokens=4)
    Dinov2WithRegistersModel(config).save_pretrained(folder / "backbone")
    g = torch.Generator().manual_seed(1)
    state = {k: (torch.randn(shape, generator=g) * 0.3 if k != "bn.num_batches_tracked" else torch.tensor(7))
             for k, shape in OFFICIAL_KEYS.items()}
    state["bn.running_var"] = state["bn.running_var"].abs() + 0.5
    torch.save({"state": state}, folder / "dinov2_detector.pt")
    return folder / "backbone", folder / "dinov2_detector.pt", state


def extractor(weights, **kw):
    backbone, detector, _ = weights
    return create_extractor("dinov2-ames", model=str(backbone), detector=str(detector), **kw)


def photo(h, w, seed=0):
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(h // 7, 1), max(w // 7, 1), 3), dtype=np.uint8)
    return cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)


def test_detector_keys_are_the_official_ones():
    assert {k: tuple(v.shape) for k, v in SpatialAttention2d(DIM).state_dict().items()} == OFFICIAL_KEYS


def test_a_detector_with_other_keys_is_refused_with_the_keys_named(weights, tmp_path):
    _, _, state = weights
    bad = {("attention." + k if k.startswith("conv2") else k): v for k, v in state.items()}
    torch.save({"state": bad}, tmp_path / "bad.pt")
    with pytest.raises(StateDictMismatchError, match="conv2.weight"):
        create_extractor("dinov2-ames", model=str(weights[0]), detector=str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match="dinov2_detector.pt"):
        create_extractor("dinov2-ames", model=str(weights[0]))


def test_input_sizes_follow_the_official_quantisation(weights):
    ex = extractor(weights)
    # no imsize: full resolution, each side to the nearest multiple of 14: 100 -> 98, 150 -> 154
    assert ex.preprocess(Crop(photo(100, 150), (100, 150))).shape == (3, 98, 154)
    ex = extractor(weights, imsize=70)
    # scale 70/150: 46.7 px = 3.33 patches -> 3 (42 px); 70 px = 5 patches
    assert ex.preprocess(Crop(photo(100, 150), (100, 150))).shape == (3, 42, 70)
    # a query crop is scaled by the full image's factor (75/150): 30 px -> 2 patches, 40 px -> 3 patches
    ex = extractor(weights, imsize=75)
    assert ex.preprocess(Crop(photo(60, 80), (100, 150))).shape == (3, 28, 42)
    # a tiny side keeps one patch
    assert ex.preprocess(Crop(photo(4, 80), (4, 150))).shape[1] == 14


def test_pixels_are_normalised_with_the_imagenet_statistics_in_rgb(weights):
    rgb = np.zeros((28, 42, 3), np.uint8)
    rgb[..., 0], rgb[..., 1], rgb[..., 2] = 255, 128, 0
    x = extractor(weights).preprocess(Crop(rgb, (28, 42)))  # already a multiple of 14: no resize
    expected = [(1 - 0.485) / 0.229, (128 / 255 - 0.456) / 0.224, (0 - 0.406) / 0.225]
    np.testing.assert_allclose(x[:, 5, 7], expected, rtol=1e-5)


def by_hand(weights, rgb, topk):
    """The official pipeline written out: backbone patch tokens, detector as matrix products,
    weighted-mean global, top-k by weight, patch centres."""
    from transformers import Dinov2WithRegistersModel

    backbone, _, s = weights
    model = Dinov2WithRegistersModel.from_pretrained(str(backbone)).eval()
    h, w = rgb.shape[:2]
    x = (rgb.astype(np.float32) / 255 - [0.485, 0.456, 0.406]) / [0.229, 0.224, 0.225]
    with torch.no_grad():
        tokens = model(pixel_values=torch.tensor(x.transpose(2, 0, 1)[None], dtype=torch.float32)).last_hidden_state[0, 5:]
    y = tokens @ s["conv1.weight"][:, :, 0, 0].T + s["conv1.bias"]
    y = (y - s["bn.running_mean"]) / torch.sqrt(s["bn.running_var"] + 1e-5) * s["bn.weight"] + s["bn.bias"]
    desc = y / y.norm(dim=1, keepdim=True)
    weight = F.softplus(y.clamp(min=0) @ s["conv2.weight"][0, :, 0, 0] + s["conv2.bias"])
    global_desc = F.normalize((weight[:, None] * desc).mean(0), dim=0)
    order = torch.argsort(weight, descending=True)[:topk]
    cols, rows = order % (w // 14), order // (w // 14)
    xy = torch.stack([(cols * 14 + 7) / w, (rows * 14 + 7) / h], 1)
    return desc[order].numpy(), weight[order].numpy(), xy.numpy(), global_desc.numpy()


def test_features_match_the_pipeline_written_out(weights):
    rgb = photo(42, 70)  # multiples of 14: the network sees these pixels
    f = extractor(weights, num_locals=8).extract(rgb)
    desc, weight, xy, global_desc = by_hand(weights, rgb, 8)
    assert f.local.shape == (8, DIM) and f.mask.all()
    np.testing.assert_allclose(f.local, desc, atol=2e-5)
    np.testing.assert_allclose(f.weight, weight, rtol=1e-4)
    np.testing.assert_allclose(f.xy, xy, atol=1e-6)
    np.testing.assert_allclose(f.global_desc, global_desc, atol=2e-5)
    np.testing.assert_array_equal(f.scale, 0)  # one scale: the official scale index 0
    assert np.all(np.diff(f.weight) <= 0)


def test_topk_beyond_the_patch_count_keeps_every_patch(weights):
    f = extractor(weights, num_locals=700).extract(photo(42, 70))
    assert f.num_locals == 15  # 3 x 5 patches
    assert sorted(map(tuple, np.rint(f.xy * [70, 42]).astype(int))) == [(x, y) for x in (7, 21, 35, 49, 63) for y in (7, 21, 35)]


def test_query_crop_equals_extracting_the_crop_with_positions_mapped(weights):
    rgb = photo(84, 112, seed=3)
    ex = extractor(weights, num_locals=20)
    cropped = ex.extract(rgb, bbox=[14, 28, 70.9, 84])
    alone = extractor(weights, num_locals=20).extract(np.ascontiguousarray(rgb[28:84, 14:70]))
    np.testing.assert_allclose(cropped.local, alone.local, atol=1e-6)
    np.testing.assert_allclose(cropped.global_desc, alone.global_desc, atol=1e-6)
    np.testing.assert_allclose(cropped.xy, (alone.xy * [56, 56] + [14, 28]) / [112, 84], atol=1e-6)


def test_batches_of_mixed_sizes_equal_one_by_one_and_are_deterministic(weights):
    images = [photo(42, 70, 0), photo(56, 56, 1), photo(42, 70, 2)]
    batched = extractor(weights, num_locals=10, batch_size=3).extract_many(images)
    for image, f in zip(images, batched):
        single = extractor(weights, num_locals=10, batch_size=1).extract(image)
        np.testing.assert_allclose(f.local, single.local, atol=1e-5)
        np.testing.assert_allclose(f.weight, single.weight, rtol=1e-5)
        np.testing.assert_array_equal(f.xy, single.xy)
    again = extractor(weights, num_locals=10, batch_size=3).extract_many(images)
    for a, b in zip(batched, again):
        np.testing.assert_array_equal(a.local, b.local)
        np.testing.assert_array_equal(a.global_desc, b.global_desc)


def test_rank_on_images_through_rerankers_equals_rerank_on_the_features(weights):
    import rerankers

    import locore_plugin  # noqa: F401  (installs the bridge)
    from locore_plugin import create_reranker

    backbone, detector, _ = weights
    options = {"model": str(backbone), "detector": str(detector), "num_locals": 12}
    images = [photo(56, 70, seed) for seed in range(4)]
    ranker = rerankers.Reranker("gv", extractor="dinov2-ames", extractor_options=options, verbose=0)
    results = ranker.rank(images[0], images[1:])
    ex = create_extractor("dinov2-ames", **options)
    expected = create_reranker("gv").rerank(ex.extract(images[0]), ex.extract_many(images[1:]))
    assert [r.doc_id for r in results] == list(expected.order)
    np.testing.assert_array_equal([r.score for r in results], expected.scores[expected.order])
