"""Joint augmentation, masks, reference preparation and buckets: exact checks on synthetic images."""

from __future__ import annotations

import io
import random

import numpy as np
import pytest
import torch
from data_shards import encode

from dreampainter.data.loading import masks
from dreampainter.data.loading.augment import CropPlan, apply_crop, plan_crop, prepare_reference
from dreampainter.data.loading.buckets import bucket_batches, make_buckets, nearest_bucket
from dreampainter.data.loading.config import LoaderConfig
from dreampainter.data.loading.fastdecode import probe
from dreampainter.data.loading.sample import PlannedSample, process_sample
from dreampainter.errors import InvalidInputError


def _coordinate_image(width: int, height: int) -> torch.Tensor:
    """uint8 (3, H, W): channel 0 = x, channel 1 = y, channel 2 = x ^ y (all < 256)."""
    y, x = torch.meshgrid(torch.arange(height), torch.arange(width), indexing="ij")
    return torch.stack([x, y, x ^ y]).to(torch.uint8)


@pytest.mark.parametrize("seed", range(40))
def test_plan_keeps_the_whole_product_in_frame(seed):
    rng = random.Random(seed)
    width, height = rng.randint(40, 400), rng.randint(40, 400)
    box_w, box_h = (
        rng.randint(width // 4, width),
        rng.randint(height // 4, height),
    )  # visible after downscaling
    x0, y0 = rng.randint(0, width - box_w), rng.randint(0, height - box_h)
    box = (x0, y0, x0 + box_w, y0 + box_h)
    out = (rng.choice([32, 48, 64]), rng.choice([32, 48, 64]))
    plan = plan_crop((width, height), out, box, rng, max_zoom=rng.choice([1.0, 3.0]), flip_prob=0.5)
    mask = torch.zeros(1, height, width, dtype=torch.uint8)
    mask[:, box[1] : box[3], box[0] : box[2]] = 255
    scaled = masks.binarize(apply_crop(mask, CropPlan(plan.scaled_size, (0, 0), plan.scaled_size)))
    cropped = masks.binarize(apply_crop(mask, plan))
    assert cropped.shape == (1, out[1], out[0])
    # every product pixel of the resized image lands inside the window
    assert cropped.sum() == scaled.sum() > 0


def test_crop_without_resize_is_an_exact_window_and_flip_mirrors_it():
    image = _coordinate_image(64, 48)
    rng = random.Random(3)
    plan = plan_crop((64, 48), (40, 48), (20, 10, 30, 20), rng, flip_prob=0.0)
    assert plan.scaled_size == (64, 48)  # 48 px high already covers the output: no resize
    x, y = plan.offset
    out = apply_crop(image, plan)
    assert torch.equal(out, image[:, y : y + 48, x : x + 40])
    assert x <= 20 and x + 40 >= 30
    flipped = apply_crop(image, CropPlan(plan.scaled_size, plan.offset, plan.out_size, flip=True))
    assert torch.equal(flipped, out.flip(-1))


def test_product_too_large_is_scaled_down_and_padded():
    # a 200x50 product in a 200x100 image, square 64 output: must shrink below the covering scale
    plan = plan_crop((200, 100), (64, 64), (0, 25, 200, 75), random.Random(0))
    assert plan.scaled_size[0] <= 64 - 2 and plan.scaled_size[1] < 64
    image = torch.full((3, 100, 200), 200, dtype=torch.uint8)
    out = apply_crop(image, plan, fill=7)
    assert (out == 7).any() and (out == 200).any()  # padded, and the image is inside
    mask = torch.zeros(1, 100, 200, dtype=torch.uint8)
    mask[:, 25:75] = 255
    assert masks.binarize(apply_crop(mask, plan))[0].any(dim=0).sum() == plan.scaled_size[0]


def _planned(photo: np.ndarray, mask: np.ndarray, reference: np.ndarray, key: str = "k") -> PlannedSample:
    data = {
        "photo": encode(photo, "PNG"),
        "mask": encode(mask, "PNG"),
        "reference": encode(reference, "PNG"),
    }
    return PlannedSample(
        key=key,
        url="memory",
        photo=data["photo"],
        mask=data["mask"],
        reference=data["reference"],
        meta={"prompt": "a red box", "prompt_zh": "红盒子"},
        photo_header=probe(data["photo"], "photo"),
        reference_header=probe(data["reference"], "reference"),
    )


@pytest.mark.parametrize("max_zoom", [1.0, 2.0])
def test_photo_and_mask_stay_pixel_aligned_through_the_full_sample_path(max_zoom):
    """The photo is white exactly where the product is: after resize, crop and flip it must still be."""
    rng = np.random.default_rng(0)
    config = LoaderConfig(resolution=(48, 64), max_zoom=max_zoom, reference_size=16, reference_aligned=True)
    flips = set()
    for index in range(12):
        height, width = int(rng.integers(50, 120)), int(rng.integers(50, 120))
        mask = np.zeros((height, width), np.uint8)
        x0, y0 = int(rng.integers(0, width // 2)), int(rng.integers(0, height // 2))
        mask[y0 : y0 + height // 3, x0 : x0 + width // 3] = 255
        photo = np.repeat(mask[..., None], 3, axis=2)
        reference = np.zeros((height, width, 3), np.uint8)
        reference[:, : width // 2] = 255  # left half white: tells whether the reference was flipped
        sample = process_sample(
            _planned(photo, mask, reference, key=f"k{index}"), config, (48, 64), seed=index
        )
        white = (sample["pixel_values"] > 0).all(dim=0, keepdim=True).float()
        assert torch.equal(white, sample["product_mask"])
        assert torch.equal(sample["mask"], 1 - sample["product_mask"])
        assert torch.equal(sample["masked_pixel_values"], sample["pixel_values"] * (1 - sample["mask"]))
        assert sample["product_mask"].sum() > 0
        ref = sample["reference_pixel_values"]
        left_brighter = ref[:, :, :8].mean() > ref[:, :, 8:].mean()
        flipped = not bool(left_brighter)
        flips.add(flipped)
    assert flips == {True, False}  # both branches were exercised


def test_flip_and_crop_move_photo_and_mask_identically():
    """A coordinate-coded photo: the mask's product pixels must carry the product's source coordinates."""
    width, height = 80, 60
    photo = _coordinate_image(width, height).permute(1, 2, 0).numpy()
    mask = np.zeros((height, width), np.uint8)
    mask[20:40, 30:50] = 255
    config = LoaderConfig(resolution=(60, 60), reference_size=8, flip_prob=0.5)
    seen_flip = set()
    for seed in range(8):
        sample = process_sample(_planned(photo, mask, photo), config, (60, 60), seed=seed)
        pixels = ((sample["pixel_values"] + 1) * 127.5).round().to(torch.int64)
        xs = pixels[0][sample["product_mask"][0] > 0]
        ys = pixels[1][sample["product_mask"][0] > 0]
        assert xs.min() == 30 and xs.max() == 49 and ys.min() == 20 and ys.max() == 39
        seen_flip.add(bool(pixels[0, 0, 0] > pixels[0, 0, -1]))  # x decreasing = mirrored
    assert seen_flip == {True, False}


def test_mask_grow_shrink_and_box():
    product = torch.zeros(1, 20, 20)
    product[:, 5:10, 5:10] = 1
    product[:, 12, 14] = 1
    assert masks.grow(product, 1)[:, 4:11, 4:11].sum() == 49
    assert masks.grow(product, -1).sum() == 9  # the 5x5 square -> 3x3, the single pixel vanishes
    assert masks.bounding_box(product) == (5, 5, 15, 13)
    assert masks.box_mask(product).sum() == 10 * 8
    assert masks.bounding_box(torch.zeros(1, 4, 4)) is None


def test_prepare_reference_pad_keeps_everything_and_crop_fills_the_square():
    wide = np.zeros((50, 100, 3), np.uint8)
    wide[:, :50] = 255  # left half white
    padded = prepare_reference(wide, size=32, mode="pad")
    cropped = prepare_reference(wide, size=32, mode="crop")
    assert padded.shape == cropped.shape == (3, 32, 32)
    # pad: 32x16 image centred, mean-colour bars (~0 after normalisation) above and below
    assert padded[:, :6].abs().max() < 0.01 and padded[:, 26:].abs().max() < 0.01
    assert torch.all(padded[:, 9:23, :14] > 1.5) and torch.all(padded[:, 9:23, 18:] < -1.3)
    # crop: the centre 50x50 of the (scaled) image, half white half black, no padding
    assert torch.all(cropped[:, :, :14] > 1.5) and torch.all(cropped[:, :, 18:] < -1.3)
    with pytest.raises(InvalidInputError, match="reference_mode"):
        prepare_reference(wide, mode="stretch")


@pytest.mark.parametrize("mode", ["pad", "crop"])
@pytest.mark.parametrize("shape", [(300, 500), (500, 300), (256, 256)])
def test_prepare_reference_matches_the_inference_preprocessing(mode, shape):
    """Training (loader, uint8 path) and inference (reference encoder, float path) must agree."""
    from dreampainter.models.reference_encoder import prepare_reference as inference_prepare

    rng = np.random.default_rng(0)
    y, x = np.mgrid[0 : shape[0], 0 : shape[1]]
    image = np.stack([x * 255 / shape[1], y * 255 / shape[0], 128 + 60 * np.sin(x / 9.0)], -1).astype(
        np.uint8
    )
    image = np.clip(image + rng.integers(-3, 4, image.shape), 0, 255).astype(np.uint8)
    pixels = torch.from_numpy(image).permute(2, 0, 1)
    ours = prepare_reference(pixels, 64, mode)
    reference = inference_prepare(pixels.float() / 255.0, 64, mode)
    assert (ours - reference).abs().mean() < 0.01
    assert (ours - reference).abs().max() < 0.15  # uint8 rounding / bicubic overshoot clamping only


def test_prepare_reference_accepts_pil_and_tensor_alike():
    from PIL import Image

    array = np.random.default_rng(1).integers(0, 256, (30, 40, 3), dtype=np.uint8)
    from_array = prepare_reference(array, 24, "crop")
    assert torch.equal(from_array, prepare_reference(Image.fromarray(array), 24, "crop"))
    assert torch.equal(from_array, prepare_reference(torch.from_numpy(array).permute(2, 0, 1), 24, "crop"))


def test_make_buckets_matches_the_documented_set_and_assigns_by_aspect():
    buckets = make_buckets(512, 64)
    assert sorted(buckets) == sorted([(512, 512), (448, 576), (576, 448), (384, 640), (640, 384)])
    assert all(h % 64 == 0 and w % 64 == 0 and h * w <= 768 * 768 for h, w in make_buckets(768, 64, 3.0))
    assert (768, 768) in make_buckets(768, 64, 3.0)
    assert buckets[nearest_bucket((1000, 1000), buckets)] == (512, 512)
    assert buckets[nearest_bucket((1600, 900), buckets)] == (384, 640)  # 16:9 landscape
    assert buckets[nearest_bucket((800, 1000), buckets)] == (576, 448)  # 4:5 portrait


def test_bucket_batches_are_single_bucket_and_keep_stream_order():
    items = [("a", 0), ("b", 1), ("c", 0), ("d", 1), ("e", 0), ("f", 0)]
    got = list(bucket_batches(items, lambda item: item[1], 2, drop_last=False))
    assert got == [(0, [items[0], items[2]]), (1, [items[1], items[3]]), (0, [items[4], items[5]])]
    assert list(bucket_batches(items[:3], lambda item: item[1], 2, drop_last=True)) == [
        (0, [items[0], items[2]])
    ]


def test_dropout_flags_follow_the_exclusive_draw():
    mask = np.zeros((32, 32), np.uint8)
    mask[8:24, 8:24] = 255
    photo = np.repeat(mask[..., None], 3, axis=2)
    config = LoaderConfig(
        resolution=16, reference_size=8, p_drop_text=0.2, p_drop_reference=0.3, p_drop_both=0.1
    )
    counts = {"text": 0, "ref": 0, "both": 0, "none": 0}
    item = _planned(photo, mask, photo)
    for index in range(600):
        item.key = f"key{index}"
        sample = process_sample(item, config, (16, 16), seed=1)
        kind = {(True, False): "text", (False, True): "ref", (True, True): "both", (False, False): "none"}
        counts[kind[(sample["drop_text"], sample["drop_reference"])]] += 1
    assert abs(counts["text"] / 600 - 0.2) < 0.06
    assert abs(counts["ref"] / 600 - 0.3) < 0.06
    assert abs(counts["both"] / 600 - 0.1) < 0.05


def test_prompt_language_choice_and_fallback():
    mask = np.zeros((16, 16), np.uint8)
    mask[4:8, 4:8] = 255
    photo = np.repeat(mask[..., None], 3, axis=2)
    item = _planned(photo, mask, photo)
    zh = LoaderConfig(resolution=16, reference_size=8, language="zh")
    assert process_sample(item, zh, (16, 16))["prompt"] == "红盒子"
    item.meta = {"prompt": "a red box"}
    assert process_sample(item, zh, (16, 16))["prompt"] == "a red box"
    item.meta = {"prompt": "a red box", "prompt_zh": "红盒子"}
    mixed = LoaderConfig(resolution=16, reference_size=8, language="random")
    prompts = set()
    for index in range(20):
        item.key = f"k{index}"
        prompts.add(process_sample(item, mixed, (16, 16))["prompt"])
    assert prompts == {"a red box", "红盒子"}


def test_config_rejects_unknown_keys_and_bad_values():
    with pytest.raises(InvalidInputError, match="resolutoin"):
        LoaderConfig.from_dict({"resolutoin": 512})
    with pytest.raises(InvalidInputError, match="language"):
        LoaderConfig(language="fr")
    with pytest.raises(InvalidInputError, match="sum to"):
        LoaderConfig(p_drop_text=0.5, p_drop_reference=0.5, p_drop_both=0.5)


@pytest.mark.parametrize("orientation", [1, 6, 8, 3])
@pytest.mark.parametrize(
    ("fmt", "scale"), [("JPEG", 1), ("JPEG", 3), ("PNG", 1)]
)  # JPEG at 3x: decoded in draft mode at reduced size
def test_exif_rotated_photo_stays_aligned_with_its_upright_mask(orientation, fmt, scale):
    from PIL import Image

    height, width = 40 * scale, 56 * scale
    mask = np.zeros((height, width), np.uint8)
    mask[8 * scale : 24 * scale, 10 * scale : 30 * scale] = 255
    upright = np.repeat(mask[..., None], 3, axis=2)
    # store the pixels so that applying the EXIF orientation gives the upright photo back
    undo = {
        1: None,
        3: Image.Transpose.ROTATE_180,
        6: Image.Transpose.ROTATE_90,
        8: Image.Transpose.ROTATE_270,
    }
    stored = Image.fromarray(upright)
    if undo[orientation] is not None:
        stored = stored.transpose(undo[orientation])
    exif = Image.Exif()
    exif[0x0112] = orientation
    buffer = io.BytesIO()
    stored.save(buffer, fmt, exif=exif.tobytes(), **({"quality": 100} if fmt == "JPEG" else {}))
    item = _planned(upright, mask, upright)
    item.photo = buffer.getvalue()
    item.photo_header = probe(item.photo, "photo")
    assert item.photo_header.size == (width, height)
    config = LoaderConfig(resolution=(40, 56), reference_size=8, flip_prob=0.0)
    sample = process_sample(item, config, (40, 56))
    white = (sample["pixel_values"] > 0).all(dim=0, keepdim=True).float()
    disagree = (white != sample["product_mask"]).float().mean()
    assert disagree < 0.02  # JPEG ringing at the edges only; a rotation/flip mix-up disagrees on ~40%
