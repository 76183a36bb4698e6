"""The offline SIFT extractor: RootSIFT, columns, crops at the full image's scale, determinism."""
import cv2
import numpy as np
import pytest

from locore_plugin.adapters.sift import root_sift
from locore_plugin.extractors import create_extractor


def blobs(h=96, w=128):
    """Dark image with bright Gaussian blobs of a few sizes at known places."""
    yy, xx = np.mgrid[0:h, 0:w]
    image = np.zeros((h, w), np.float64)
    for x, y, s in ((30, 20, 3.0), (90, 60, 5.0), (60, 75, 2.0), (110, 25, 4.0)):
        image += np.exp(-((xx - x) ** 2 + (yy - y) ** 2) / (2 * s * s))
    gray = np.clip(image * 230 + 10, 0, 255).astype(np.uint8)
    return np.repeat(gray[:, :, None], 3, axis=2)


def test_root_sift_is_the_square_root_of_the_l1_normalised_histogram():
    d = np.zeros((2, 128), np.float32)
    d[0, :2] = [1, 3]
    d[1, 5] = 7
    out = root_sift(d)
    np.testing.assert_allclose(out[0, :2], [0.5, np.sqrt(0.75)], rtol=1e-6)
    np.testing.assert_allclose(out[1, 5], 1.0, rtol=1e-6)
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-6)


def test_columns_keypoint_positions_and_global():
    image = blobs()
    f = create_extractor("sift", num_locals=50).extract(image)
    assert 1 <= f.num_locals <= 50 and f.local.shape[1] == 128 and f.mask.all()
    assert np.all(np.diff(f.weight) <= 0)  # strongest first, as the official files
    assert np.all((f.xy > 0) & (f.xy < 1)) and np.all(f.scale > 0)
    np.testing.assert_allclose(np.linalg.norm(f.local, axis=1), 1.0, rtol=1e-5)
    mean = f.local.mean(0)
    np.testing.assert_allclose(f.global_desc, mean / np.linalg.norm(mean), rtol=1e-5)
    pixels = f.xy * [128, 96] - 0.5  # back to OpenCV pixel-centre coordinates
    for centre in ((30, 20), (90, 60), (110, 25)):  # every blob is found where it is
        assert np.min(np.linalg.norm(pixels - centre, axis=1)) < 1.5


def texture(h, w, seed=0):
    noise = np.random.default_rng(seed).integers(0, 256, (h // 4, w // 4), dtype=np.uint8)
    gray = cv2.GaussianBlur(cv2.resize(noise, (w, h), interpolation=cv2.INTER_CUBIC), (0, 0), 1.5)
    return np.repeat(gray[:, :, None], 3, axis=2)


def test_a_crop_keeps_the_full_images_scale_and_maps_positions_back():
    image = texture(192, 256)
    sift = create_extractor("sift", imsize=128)  # halves the full image, so also the crop
    box = (80, 60, 240, 180)
    cropped = sift.extract(image, bbox=box)
    half = cv2.resize(image[60:180, 80:240], (80, 60), interpolation=cv2.INTER_AREA)
    alone = create_extractor("sift").extract(half)
    assert cropped.num_locals > 10
    np.testing.assert_array_equal(cropped.local, alone.local)
    np.testing.assert_allclose(cropped.xy, (alone.xy * [160, 120] + [80, 60]) / [256, 192], rtol=1e-5)
    whole = sift.extract(image)  # the crop is not the full image's extraction
    assert whole.num_locals > cropped.num_locals


def test_a_uniform_image_has_no_locals_and_extraction_is_deterministic():
    empty = create_extractor("sift").extract(np.full((64, 64, 3), 128, np.uint8))
    assert empty.num_locals == 0 and not empty.global_desc.any()
    a, b = (create_extractor("sift", num_locals=30).extract(texture(96, 128)) for _ in range(2))
    assert a.num_locals == 30
    for name in ("local", "xy", "scale", "weight", "global_desc"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name))


def test_bad_options_are_refused():
    with pytest.raises(ValueError, match="num_locals"):
        create_extractor("sift", num_locals=0)
    with pytest.raises(ValueError, match="imsize"):
        create_extractor("sift", imsize=4)
