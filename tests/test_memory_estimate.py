"""Training memory estimates: the real UNets' parameter counts, the byte arithmetic, the script's table."""

import importlib.util
import json

import pytest
from training_utils import REPO

from dreampainter.models.unet_configs import sd15_inpainting_unet_config, sdxl_inpainting_unet_config
from dreampainter.toy.models import tiny_unet_config
from dreampainter.training.config import TrainConfig
from dreampainter.training.memory import GIB, count_trainable, estimate_memory, frozen_encoder_parameters
from dreampainter.utils.config import config_from_dict


def _config(**sections):
    base = {"run": {"stage": 2}, "model": {"adapter": {"projection": "linear", "num_tokens": 4, "image_embed_dim": 24}},
            "train": {"mixed_precision": "no"}}  # fmt: skip
    for key, value in sections.items():
        base[key] = {**base.get(key, {}), **value}
    return config_from_dict(TrainConfig, base)


def test_real_unets_have_their_published_parameter_counts():
    """SD1.5's UNet is 859,520,964 parameters and SDXL's 2,567,463,684; the inpainting versions take 5 more
    input channels into the first 3x3 convolution to 320 channels (5 x 320 x 9 = 14,400 more)."""
    stage1 = _config(run={"stage": 1}, model={"unet_training": "full"})
    assert count_trainable(stage1, sd15_inpainting_unet_config()) == (859_535_364, 859_535_364)
    assert count_trainable(stage1, sdxl_inpainting_unet_config()) == (2_567_478_084, 2_567_478_084)
    assert frozen_encoder_parameters("sdxl", 1) - frozen_encoder_parameters("sd", 1) == 694_659_840  # bigG text


def test_estimate_is_the_byte_arithmetic_of_each_part():
    config = _config()
    unet, trainable = count_trainable(config, tiny_unet_config())
    assert 0 < trainable < unet
    frozen = unet + frozen_encoder_parameters("sd", 2)
    plain = estimate_memory(config, tiny_unet_config(), "sd")
    assert plain.total_gib * GIB == pytest.approx(frozen * 4 + trainable * (4 + 4 + 8))
    eight_bit = estimate_memory(_config(optim={"use_8bit_adam": "yes"}), tiny_unet_config(), "sd")
    assert eight_bit.optimizer_gib * GIB == pytest.approx(trainable * 2)
    zero = estimate_memory(_config(train={"mixed_precision": "bf16"}), tiny_unet_config(), "sd", 4, zero2=True)
    assert zero.weights_gib * GIB == pytest.approx((frozen + trainable) * 2)
    assert zero.optimizer_gib * GIB == pytest.approx(trainable * 12 / 4)  # fp32 masters + moments, sharded
    ema = estimate_memory(_config(train={"ema": {"enabled": True}}), tiny_unet_config(), "sd")
    assert ema.ema_gib * GIB == pytest.approx(trainable * 4)


def test_script_prints_every_backbone_and_run(tmp_path, capsys):
    spec = importlib.util.spec_from_file_location("memory_estimate", REPO / "scripts" / "memory_estimate.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.main(["--gpus", "4", "--json", str(tmp_path / "m.json")]) == 0
    rows = json.loads((tmp_path / "m.json").read_text())
    assert len(rows) == 12 and {r["backbone"] for r in rows} == {"sd15", "sdxl"}
    sdxl_plus = [r for r in rows if r["backbone"] == "sdxl" and r["run"].startswith("stage 2")][0]
    assert sdxl_plus["trainable_parameters"] == 423_748_864  # ip-adapter-plus_sdxl_vit-h's size
    assert "ZeRO-2 x 4" in capsys.readouterr().out
