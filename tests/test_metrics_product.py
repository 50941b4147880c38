"""Product consistency against scikit-image (PSNR, SSIM), hand-built cases, and LPIPS with a local trunk."""

import numpy as np
import pytest
import torch
from skimage.metrics import peak_signal_noise_ratio, structural_similarity

from dreampainter.errors import CheckpointMismatchError, MissingFileError
from dreampainter.evaluation.backbones import load_lpips
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.evaluation.product import (
    PSNR_CAP,
    LpipsMetric,
    ProductMetric,
    product_box,
    psnr_in_region,
    ssim_in_region,
)
from dreampainter.toy.backbones import save_random_lpips_trunk


def scene(seed=0, size=(48, 64)):
    """A textured photo with an elliptic product; ``raw`` repaints the background and perturbs the product."""
    rng = np.random.default_rng(seed)
    h, w = size
    photo = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    yy, xx = np.mgrid[:h, :w]
    product = ((yy - 24) / 14) ** 2 + ((xx - 30) / 18) ** 2 <= 1
    mask = product.astype(np.uint8) * 255
    raw = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)  # a brand-new background
    noise = rng.integers(-20, 21, (h, w, 3))
    raw[product] = np.clip(photo[product].astype(int) + noise[product], 0, 255)
    return photo, mask, product, raw


def test_psnr_in_region_matches_scikit_image_on_the_region_pixels():
    photo, _, product, raw = scene()
    expected = peak_signal_noise_ratio(photo[product], raw[product], data_range=255)
    assert psnr_in_region(raw, photo, product) == pytest.approx(expected, rel=1e-10)
    assert psnr_in_region(photo, photo, product) == PSNR_CAP
    assert np.isnan(psnr_in_region(raw, photo, np.zeros_like(product)))


def test_ssim_in_region_is_scikit_image_ssim_map_averaged_over_the_region():
    photo, _, product, raw = scene(1)
    kept = np.where(product[..., None], raw, photo)  # the background change is not the product's
    _, full = structural_similarity(
        photo,
        kept,
        channel_axis=-1,
        gaussian_weights=True,
        sigma=1.5,
        use_sample_covariance=False,
        data_range=255,
        full=True,
    )
    expected = full.mean(axis=-1)[product].mean()
    assert ssim_in_region(raw, photo, product) == pytest.approx(expected, rel=1e-9)
    assert ssim_in_region(photo, photo, product) == pytest.approx(1.0)
    # A brand-new background around an untouched product does not lower the product's SSIM.
    untouched = np.where(product[..., None], photo, 255 - photo)
    assert ssim_in_region(untouched, photo, product) == pytest.approx(1.0)


def test_product_metric_reports_composite_changes_of_solid_product_pixels():
    photo, mask, product, raw = scene(2)
    composited = np.where(product[..., None], photo, raw)
    mask_edge = mask.copy()
    mask_edge[0, 0] = 100  # an antialiased edge pixel is not "solid" product
    composited[0, 0] = 0
    bad = composited.copy()
    solid = np.argwhere(product)[0]
    bad[solid[0], solid[1]] = np.clip(photo[solid[0], solid[1]].astype(int) + [30, 0, 0], 0, 255)
    changed = abs(int(bad[solid[0], solid[1], 0]) - int(photo[solid[0], solid[1], 0]))
    batch = EvalBatch.from_lists(
        ["good", "bad"], [raw, raw], [composited, bad], [photo] * 2, [mask_edge] * 2, [photo] * 2
    )
    metric = ProductMetric()
    good_row, bad_row = metric.update(batch)
    assert good_row["composite_change_mean"] == 0 and good_row["composite_change_max"] == 0
    assert bad_row["composite_change_max"] == changed
    assert bad_row["composite_change_mean"] == pytest.approx(changed / (3 * product.sum()))
    values = metric.compute()
    assert values["composite_change_max"] == changed
    assert values["psnr"] == pytest.approx(psnr_in_region(raw, photo, product))


def test_product_box_contains_the_region_and_has_the_minimum_size():
    region = np.zeros((100, 80), bool)
    region[3:6, 70:79] = True
    rows, cols = product_box(region, min_size=64)
    assert (rows.stop - rows.start, cols.stop - cols.start) == (64, 64)
    assert region[rows, cols].sum() == region.sum()
    small = np.zeros((20, 30), bool)
    small[5, 5] = True
    assert product_box(small, 64) == (slice(0, 20), slice(0, 30))


@pytest.fixture(scope="module")
def lpips_model(tmp_path_factory):
    path = tmp_path_factory.mktemp("lpips") / "alexnet-owt-7be5be79.pth"
    save_random_lpips_trunk(path, "alex", seed=3)
    return load_lpips("alex", path), path


def test_lpips_loads_the_local_trunk_and_only_sees_the_product(lpips_model):
    model, path = lpips_model
    trunk = torch.load(path, weights_only=True)
    assert torch.equal(model.net.slice1[0].weight, trunk["features.0.weight"])
    assert torch.equal(model.net.slice5._modules["10"].weight, trunk["features.10.weight"])
    photo, mask, product, raw = scene(4)
    untouched = np.where(product[..., None], photo, raw)
    batch = EvalBatch.from_lists(
        ["same", "changed"], [untouched, raw], [raw, raw], [photo] * 2, [mask] * 2, [photo] * 2
    )
    same, changed = LpipsMetric(model).update(batch)
    assert same["lpips"] == pytest.approx(0.0, abs=1e-6)
    assert changed["lpips"] > 1e-4
    # Equal to the lpips package's own spatial map averaged over the product (whole image fits the box).
    rows, cols = product_box(product)
    kept = np.where(product[..., None], raw, photo)[rows, cols]
    to_tensor = lambda a: torch.from_numpy(np.ascontiguousarray(a)).permute(2, 0, 1)[None].float() / 127.5 - 1  # noqa: E731
    with torch.no_grad():
        spatial = model(to_tensor(kept), to_tensor(photo[rows, cols]))[0, 0].numpy()
    assert changed["lpips"] == pytest.approx(float(spatial[product[rows, cols]].mean()), rel=1e-6)


def test_lpips_missing_or_wrong_trunk_is_a_clear_error(tmp_path):
    with pytest.raises(MissingFileError, match="alexnet-owt-7be5be79.pth") as info:
        load_lpips("alex", tmp_path / "alexnet-owt-7be5be79.pth")
    assert "torchvision" in str(info.value)
    torch.save({"features.0.weight": torch.zeros(3, 3, 3, 3)}, tmp_path / "wrong.pth")
    with pytest.raises(CheckpointMismatchError, match="wrong.pth"):
        load_lpips("alex", tmp_path / "wrong.pth")
