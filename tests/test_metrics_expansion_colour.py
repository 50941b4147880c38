"""Object expansion on a known toy scene, and background colour distances against scikit-image/scipy."""

import numpy as np
import pytest
from scipy.stats import wasserstein_distance
from skimage.color import rgb2lab

from dreampainter.evaluation.batch import EvalBatch
from dreampainter.evaluation.colour import (
    BackgroundColourMetric,
    channel_wasserstein,
    chi_square_distance,
    rgb_histogram,
    rgb_to_lab,
)
from dreampainter.evaluation.expansion import ExpansionMetric, KnownSceneSegmenter, image_only

WALL, FLOOR, PRODUCT = (200, 190, 170), (90, 60, 40), (200, 30, 30)


def toy_scene(h=40, w=50):
    """Wall over floor (the reference), a red box product on the floor line, and its mask."""
    reference = np.empty((h, w, 3), np.uint8)
    reference[: h // 2] = WALL
    reference[h // 2 :] = FLOOR
    photo = reference.copy()
    mask = np.zeros((h, w), np.uint8)
    mask[12:28, 18:32] = 255
    photo[mask == 255] = PRODUCT
    return photo, mask, reference


def test_expansion_counts_product_painted_outside_the_mask():
    photo, mask, reference = toy_scene()
    clean = photo.copy()
    grown = photo.copy()
    grown[12:28, 32:36] = (205, 35, 28)  # the product grew 4 columns to the right: 64 pixels
    shadow = photo.copy()
    shadow[28:31, 18:32] = (60, 40, 25)  # a shadow is not product
    batch = EvalBatch.from_lists(
        ["clean", "grown", "shadow"],
        [clean, grown, shadow],
        [clean, grown, shadow],
        [photo] * 3,
        [mask] * 3,
        [reference] * 3,
    )
    metric = ExpansionMetric(KnownSceneSegmenter(tolerance=40))
    rows = metric.update(batch)
    assert [row["expansion"] for row in rows] == pytest.approx([0.0, 64 / 2000, 0.0])
    values = metric.compute()
    assert values["expansion_mean"] == pytest.approx(64 / 2000 / 3)
    assert values["expansion_over_threshold"] == pytest.approx(1 / 3)  # 3.2% > 1%


def test_known_scene_ignores_a_background_that_already_has_the_product_colour():
    photo, mask, reference = toy_scene()
    reference[:5] = PRODUCT  # a red stripe on the wall, in the reference too
    photo[:5] = PRODUCT
    result = photo.copy()
    found = KnownSceneSegmenter()(
        result, EvalBatch.from_lists(["k"], [result], [result], [photo], [mask], [reference]).samples[0]
    )
    assert not found[:5].any()
    assert found[mask == 255].all()


def test_image_only_segmenters_plug_in_and_antialiased_edges_count_as_inside():
    photo, mask, reference = toy_scene()
    mask[11, 18:32] = 60  # an antialiased row above the product
    segment = image_only(lambda image: (image == PRODUCT).all(axis=-1) | (np.arange(40)[:, None] == 11))
    batch = EvalBatch.from_lists(["k"], [photo], [photo], [photo], [mask], [reference])
    assert ExpansionMetric(segment).update(batch)[0]["expansion"] == pytest.approx((50 - 14) / 2000)


def test_lab_conversion_matches_scikit_image():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (7, 9, 3), dtype=np.uint8)
    rgb[0, 0] = 0  # the linear segments near black
    rgb[0, 1] = (3, 5, 8)
    assert np.allclose(rgb_to_lab(rgb), rgb2lab(rgb), atol=1e-6)


def test_histogram_distances_against_hand_cases_and_scipy():
    a = np.array([[0, 0, 0], [0, 0, 0], [255, 255, 255], [10, 10, 10]], np.uint8)
    b = np.array([[255, 255, 255], [255, 255, 255]], np.uint8)
    p, q = rgb_histogram(a), rgb_histogram(b)
    assert p.sum() == pytest.approx(1) and p[0] == pytest.approx(0.75) and p[-1] == pytest.approx(0.25)
    # Bins: black 0.75 vs 0; white 0.25 vs 1 -> 0.5 * (0.75 + 0.5625 / 1.25)
    assert chi_square_distance(p, q) == pytest.approx(0.5 * (0.75 + 0.75**2 / 1.25))
    assert chi_square_distance(p, p) == 0
    rng = np.random.default_rng(1)
    x = rng.integers(0, 256, (300, 3), dtype=np.uint8)
    y = rng.integers(0, 180, (200, 3), dtype=np.uint8)
    expected = np.mean([wasserstein_distance(x[:, c], y[:, c]) for c in range(3)])
    assert channel_wasserstein(x, y) == pytest.approx(expected, rel=1e-9)


def test_background_colour_metric_uses_only_the_background():
    photo, mask, reference = toy_scene()
    background_only = photo[mask == 0][:, None, :]  # a reference made of exactly the background pixels
    same = BackgroundColourMetric().update(
        EvalBatch.from_lists(["k"], [photo], [photo], [photo], [mask], [background_only])
    )[0]
    assert same == {
        "bg_delta_e": pytest.approx(0, abs=1e-9),
        "bg_hist_chi2": pytest.approx(0, abs=1e-12),
        "bg_emd": 0,
    }
    # Against the product-free reference, the only difference is the product region, which is excluded
    # from the result's pixels; the reference keeps the wall/floor behind it: a small, non-zero distance.
    row = BackgroundColourMetric().update(
        EvalBatch.from_lists(["k"], [photo], [photo], [photo], [mask], [reference])
    )[0]
    background = photo[mask == 0]
    expected = np.linalg.norm(
        rgb2lab(background[None]).mean(axis=(0, 1)) - rgb2lab(reference).reshape(-1, 3).mean(0)
    )
    assert row["bg_delta_e"] == pytest.approx(expected, rel=1e-6)
    grey = np.full_like(photo, 128)
    far = BackgroundColourMetric().update(
        EvalBatch.from_lists(["k"], [grey], [grey], [photo], [mask], [reference])
    )[0]
    assert far["bg_delta_e"] > 10 * row["bg_delta_e"] and far["bg_hist_chi2"] == pytest.approx(1.0)


def test_background_distances_rank_the_true_reference_above_a_shuffled_one():
    photo, mask, reference = toy_scene()
    other = reference.copy()
    other[:20] = (60, 110, 160)  # another scene: blue wall, green floor
    other[20:] = (70, 140, 60)
    result = photo.copy()
    result[mask == 0] = np.clip(reference[mask == 0].astype(int) - 3, 0, 255)  # a close repaint (same bins)
    batch = EvalBatch.from_lists(
        ["true", "shuffled"], [result] * 2, [result] * 2, [photo] * 2, [mask] * 2, [reference, other]
    )
    true_row, shuffled_row = BackgroundColourMetric().update(batch)
    for name in ("bg_delta_e", "bg_hist_chi2", "bg_emd"):
        assert true_row[name] < shuffled_row[name] / 4, name
