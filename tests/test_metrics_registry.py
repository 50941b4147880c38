"""The metric suite: config, backbones from local files, skipped metrics with reasons, multi-process merge."""

import json
import math

import numpy as np
import pytest

from dreampainter.errors import InvalidInputError
from dreampainter.evaluation import EvalBatch, EvaluationConfig, build_suite
from dreampainter.evaluation.registry import json_ready
from dreampainter.toy.backbones import TinyFeatureNet, write_tiny_backbones

WEIGHT_FREE = {"product", "expansion", "colour"}


def toy_batch(keys, seed):
    """Toy scenes: wall/floor reference, a product box, results with a slightly different background."""
    rng = np.random.default_rng(seed)
    samples = []
    for _ in keys:
        reference = np.empty((32, 32, 3), np.uint8)
        reference[:16] = rng.integers(100, 255, 3)
        reference[16:] = rng.integers(0, 120, 3)
        mask = np.zeros((32, 32), np.uint8)
        mask[8:24, 10:22] = 255
        photo = reference.copy()
        photo[mask == 255] = rng.integers(0, 255, 3)
        raw = np.clip(photo.astype(int) + rng.integers(-8, 9, photo.shape), 0, 255).astype(np.uint8)
        composited = np.where(mask[..., None] == 255, photo, raw)
        samples.append((raw, composited, photo, mask, reference))
    fields = list(zip(*samples))
    prompts = [f"a product on a table {i}" for i in range(len(keys))]
    return EvalBatch.from_lists(keys, *fields, prompt=prompts)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    return write_tiny_backbones(tmp_path_factory.mktemp("weights"))


def test_without_weights_the_weight_free_metrics_run_and_the_others_say_why_not(tmp_path):
    config = EvaluationConfig.from_dict(
        {
            "backbones": {"clip": {"model": "ViT-L-14", "path": str(tmp_path / "vit_l14.bin")}},
            "segmenter": "known_scene",
            "progress": False,
        }
    )
    suite = build_suite(config)
    assert set(suite.metrics) == WEIGHT_FREE
    assert "evaluation.backbones.inception.path" in suite.skipped["image_quality"]
    assert "vit_l14.bin" in suite.skipped["clip"] and "MissingFileError" in suite.skipped["clip"]
    assert "evaluation.backbones.lpips.path" in suite.skipped["lpips"]
    rows = suite.update(toy_batch(["a", "b"], 0))
    assert set(rows["a"]) >= {"psnr", "ssim", "composite_change_max", "expansion", "bg_delta_e"}
    report = suite.compute()
    assert report["values"]["composite_change_max"] == 0
    assert report["values"]["expansion_mean"] == 0
    assert set(report["skipped"]) == {"image_quality", "clip", "dino", "lpips"}
    assert suite.columns()[:2] == ["psnr", "ssim"] and "bg_emd" in suite.columns()
    assert suite.higher_is_better()["psnr"] is True and suite.higher_is_better()["expansion"] is False
    report["values"]["nothing"] = float("nan")
    text = json.dumps(json_ready(report), allow_nan=False)  # strict JSON for metrics.json
    assert json.loads(text)["values"]["nothing"] is None


def test_full_suite_from_local_files_and_process_split_gives_identical_results(weights, tmp_path):
    config = EvaluationConfig.from_dict(
        {
            "backbones": weights,
            "feature_cache": str(tmp_path / "cache"),
            "kid_subset_size": 3,
            "segmenter": "known_scene",
            "progress": False,
        }
    )
    batches = [toy_batch(["a", "b", "c"], 1), toy_batch(["d", "e"], 2), toy_batch(["f", "g"], 3)]

    import open_clip.factory

    # As in a fresh process (e.g. the CLI): the tiny CLIP config is not registered yet.
    open_clip.factory._MODEL_CONFIGS.pop(weights["clip"]["model"], None)
    one = build_suite(config)  # every backbone from the config: files, and the tiny FID features
    assert not one.skipped
    for batch in batches:
        one.update(batch)
    single = one.compute()["values"]
    expected = {
        "fid",
        "kid_mean",
        "clip_t",
        "clip_i",
        "dino",
        "psnr",
        "ssim",
        "lpips",
        "expansion_mean",
        "bg_emd",
    }
    assert expected <= set(single)
    assert all(math.isfinite(single[name]) for name in expected)
    assert 0 <= single["clip_t"] <= 100 and -1 <= single["dino"] <= 1 and single["psnr"] > 20
    per_sample = one.per_sample()
    assert list(per_sample) == list("abcdefg")
    assert single["psnr"] == pytest.approx(np.mean([row["psnr"] for row in per_sample.values()]))

    # Two "processes" each score some batches (in another order); merged states give the same numbers.
    states = []
    for part in ([batches[2], batches[0]], [batches[1]]):
        suite = build_suite(config, backbones=one.backbones)  # loaded once, shared
        for batch in part:
            suite.update(batch)
        states.append(suite.state_dict())
    merged = build_suite(config, backbones=one.backbones)
    merged.merge_state(states)
    assert merged.compute()["values"] == pytest.approx(single, rel=1e-9)


def test_a_metric_failing_later_is_skipped_while_others_finish(weights):
    config = EvaluationConfig(metrics=["image_quality", "colour"], progress=False)
    suite = build_suite(config, backbones={"inception": TinyFeatureNet()})
    suite.update(toy_batch(["only"], 4))  # one sample: FID/KID cannot be computed
    report = suite.compute()
    assert "at least 2" in report["skipped"]["image_quality"]
    assert math.isfinite(report["values"]["bg_delta_e"])


def test_config_errors_name_the_key():
    with pytest.raises(InvalidInputError, match="evaluation: unknown config key 'metrcs'"):
        EvaluationConfig.from_dict({"metrcs": ["fid"]})
    with pytest.raises(InvalidInputError, match="evaluation: unknown config key 'backbones.inceptionv3'"):
        EvaluationConfig.from_dict({"backbones": {"inceptionv3": "x.pth"}})
    with pytest.raises(InvalidInputError, match="evaluation: unknown config key 'backbones.clip.arch'"):
        EvaluationConfig.from_dict({"backbones": {"clip": {"arch": "x"}}})
    with pytest.raises(InvalidInputError, match="unknown metrics \\['fid'\\]"):
        build_suite(EvaluationConfig(metrics=["fid"]))
    no_segmenter = build_suite(EvaluationConfig(metrics=["expansion"]))  # the default: none
    assert "segmenter" in no_segmenter.skipped["expansion"]
    with pytest.raises(InvalidInputError, match="evaluation.segmenter"):
        build_suite(EvaluationConfig(metrics=["expansion"], segmenter="sam"))


def test_samples_accept_pil_numpy_and_tensors_and_name_bad_fields():
    import torch
    from PIL import Image

    from dreampainter.evaluation.batch import EvalSample

    rgb = np.random.default_rng(0).integers(0, 256, (6, 8, 3), dtype=np.uint8)
    as_float_chw = torch.from_numpy(rgb).permute(2, 0, 1).float() / 255
    mask = np.zeros((6, 8), np.uint8)
    mask[2:4, 2:5] = 255
    sample = EvalSample(
        key="k",
        raw=as_float_chw,
        composited=Image.fromarray(rgb),
        photo=rgb.astype(np.float32) / 255,
        product_mask=torch.from_numpy(mask > 0),
        reference=rgb[:3],
    )
    assert np.array_equal(sample.raw, rgb) and np.array_equal(sample.composited, rgb)
    assert np.array_equal(sample.photo, rgb) and np.array_equal(sample.product_mask, mask)
    assert sample.product.sum() == 6
    soft = EvalSample("k", rgb, rgb, rgb, mask.astype(np.float32) * 0.5, rgb)  # float 0..127.5 mask
    assert soft.product_mask.max() == 128 and soft.product.sum() == 6
    with pytest.raises(InvalidInputError, match="sample 'bad': raw is \\(6, 7\\)"):
        EvalSample("bad", rgb[:, :7], rgb, rgb, mask, rgb)
    with pytest.raises(InvalidInputError, match="batch field 'photo' has 1 items, expected 2"):
        EvalBatch.from_lists(["a", "b"], [rgb] * 2, [rgb] * 2, [rgb], [mask] * 2, [rgb] * 2)
