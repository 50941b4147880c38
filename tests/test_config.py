"""The one configuration system: typed schemas, one error form naming key and source, shared generation settings."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

from dreampainter.cli import main
from dreampainter.data.loading.config import EpochMode, LoaderConfig
from dreampainter.errors import InvalidInputError
from dreampainter.evaluation.bench_settings import BenchmarkSettings, load_evaluation_file
from dreampainter.evaluation.registry import EvaluationConfig, InceptionEntry, InceptionKind
from dreampainter.evaluation.runner import generate_batch
from dreampainter.models.adapter import AdapterConfig
from dreampainter.pipelines.jobs import GenerationJob, JobSettings, read_jobs, run_job
from dreampainter.pipelines.settings import PIPELINE_KEYS, GenerationSettings
from dreampainter.toy.demo import DemoSettings
from dreampainter.training.components import adapter_config_from
from dreampainter.training.config import (
    AdapterSection,
    MixedPrecision,
    TrainConfig,
    ValidationConfig,
    load_config,
    save_config,
)
from dreampainter.training.validation import ValidationSample, validation_grid
from dreampainter.utils.config import config_from_dict, config_to_dict
from dreampainter.utils.config import load_config as load_schema

REPO = Path(__file__).resolve().parents[1]


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def _error(fn, *args) -> str:
    with pytest.raises(InvalidInputError) as caught:
        fn(*args)
    message = str(caught.value)
    assert "\n" not in message, message
    return message


# ------------------------------------------------------------------------- one error form


def test_unknown_keys_name_the_key_and_the_file_or_override(tmp_path):
    config = _write(tmp_path / "x.yaml", "optim:\n  lrr: 0.1\n")
    assert _error(load_config, config) == f"{config}: unknown config key 'optim.lrr'"
    ok = _write(tmp_path / "ok.yaml", "optim:\n  lr: 0.1\n")
    assert _error(load_config, ok, ["data.loader.resolutoin=64"]) == (
        "override 'data.loader.resolutoin=64': unknown config key 'data.loader.resolutoin'"
    )
    assert "unknown config key 'trainer'" in _error(load_config, _write(tmp_path / "t.yaml", "trainer: {}\n"))


def test_wrong_types_and_bad_choices_name_the_key_and_list_the_choices(tmp_path):
    config = _write(tmp_path / "x.yaml", "train:\n  batch_size: lots\n")
    message = _error(load_config, config)
    assert message.startswith(f"{config}: bad value for 'train.batch_size' (") and "Integer" in message
    config = _write(tmp_path / "y.yaml", "train:\n  mixed_precision: fp32\n")
    message = _error(load_config, config)
    assert message.startswith(f"{config}: bad value for 'train.mixed_precision'")
    assert "fp32" in message and all(choice in message for choice in ("no", "fp16", "bf16"))
    message = _error(load_config, None, ["data.loader.language=fr"])
    assert message.startswith("override 'data.loader.language=fr': bad value for 'data.loader.language'")
    assert all(choice in message for choice in ("en", "zh", "random"))


def test_value_checks_name_the_key_and_the_source_that_set_it(tmp_path):
    base = _write(tmp_path / "base.yaml", "train:\n  max_steps: 0\n")
    child = _write(tmp_path / "child.yaml", "base: base.yaml\noptim:\n  lr: 0.5\n")
    assert _error(load_config, child) == f"{base}: bad value for 'train.max_steps' (must be >= 1, got 0)"
    assert _error(load_config, child, ["train.max_steps=2", "train.batch_size=0"]) == (
        "override 'train.batch_size=0': bad value for 'train.batch_size' (must be >= 1, got 0)"
    )
    drops = _write(tmp_path / "drops.yaml", "data:\n  loader:\n    p_drop_text: 0.6\n    p_drop_both: 0.6\n")
    message = _error(load_config, drops)
    assert message.startswith(f"{drops}: bad value for 'data.loader.p_drop_text' (") and "sum to <= 1" in message
    # a cross-field rule names whichever source set one of its keys last
    frozen = _write(tmp_path / "frozen.yaml", "model:\n  unet_training: frozen\n")
    assert _error(load_config, frozen, ["run.stage=1"]).startswith(
        "override 'run.stage=1': bad value for 'model.unet_training' (frozen leaves nothing to train in stage 1"
    )
    message = _error(load_config, None, ["data.loader.mask_grow_px=[1, 2, 3]"])
    assert "bad value for 'data.loader.mask_grow_px' (must be an int or [lo, hi]" in message


def test_a_base_chain_merges_in_order_relative_to_each_file(tmp_path):
    (tmp_path / "shared").mkdir()
    _write(tmp_path / "shared" / "root.yaml", "optim:\n  lr: 0.1\n  warmup_steps: 7\ntrain:\n  max_steps: 5\n")
    _write(tmp_path / "shared" / "mid.yaml", "base: root.yaml\noptim:\n  lr: 0.2\n")
    child = _write(tmp_path / "child.yaml", "base: shared/mid.yaml\ntrain:\n  max_steps: 9\n")
    config = load_config(child, ["optim.warmup_steps=3"])
    assert (config.optim.lr, config.optim.warmup_steps, config.train.max_steps) == (0.2, 3, 9)
    assert _error(load_config, _write(tmp_path / "loop.yaml", "base: loop.yaml\n")).endswith("circular 'base' chain")


def test_override_needs_key_value():
    assert "must look like key=value" in _error(load_config, None, ["optim.lr"])


# ------------------------------------------------------------------------- typed objects


def _walk(value, path="config"):
    assert not OmegaConf.is_config(value), path
    if dataclasses.is_dataclass(value):
        for field in dataclasses.fields(value):
            _walk(getattr(value, field.name), f"{path}.{field.name}")
    elif isinstance(value, dict):
        for key, item in value.items():
            _walk(item, f"{path}.{key}")
    elif isinstance(value, list):
        for item in value:
            _walk(item, path)


@pytest.mark.parametrize(
    "name", ["configs/sd15_stage1.yaml", "configs/sd15_stage2.yaml", "dreampainter/toy/configs/demo_stage1.yaml"]
)
def test_shipped_configs_load_as_dataclasses_all_the_way_down(name):
    config = load_config(REPO / name)
    assert type(config) is TrainConfig and type(config.data.loader) is LoaderConfig
    assert type(config.model.adapter) is AdapterSection and isinstance(config.model.adapter, AdapterConfig)
    assert type(config.validation) is ValidationConfig and isinstance(config.validation, GenerationSettings)
    _walk(config)
    assert config.data.loader.epoch_mode is EpochMode.balanced


def test_choices_are_enums_that_equal_their_strings():
    config = load_config(REPO / "configs" / "sd15_base.yaml")
    assert config.train.mixed_precision is MixedPrecision.bf16
    assert config.train.mixed_precision == "bf16" and f"{config.train.mixed_precision}" == "bf16"
    assert str(config.train.mixed_precision) == "bf16"
    assert LoaderConfig(epoch_mode="exact").epoch_mode is EpochMode.exact  # made in code: coerced too
    with pytest.raises(InvalidInputError, match=r"bad value for 'epoch_mode' \(must be one of balanced, exact"):
        LoaderConfig(epoch_mode="fast")


def test_loader_section_keeps_its_union_forms(tmp_path):
    config = _write(
        tmp_path / "x.yaml",
        "data:\n  loader:\n    resolution: [48, 64]\n    buckets: [[48, 64], [64, 48]]\n    mask_grow_px: [0, 4]\n",
    )
    loader = load_config(config).data.loader
    assert loader.size == (48, 64) and loader.bucket_sizes() == [(48, 64), (64, 48)]
    assert list(loader.mask_grow_px) == [0, 4]
    assert load_config(None, ["data.loader.buckets=true"]).data.loader.bucket_sizes()[0][0] > 0


def test_saved_config_is_yaml_that_loads_back_equal(tmp_path):
    config = load_config(REPO / "configs" / "sd15_stage1.yaml", ["train.max_steps=3"])
    save_config(config, tmp_path / "config.yaml")
    assert "base" not in OmegaConf.load(tmp_path / "config.yaml")
    assert load_config(tmp_path / "config.yaml") == config


def test_training_adapter_section_extends_the_one_adapter_schema():
    section = load_config(REPO / "configs" / "sd15_stage2.yaml", ["model.adapter.init_from=x.bin"]).model.adapter
    encoder = SimpleNamespace(feature_dim=lambda kind: {"global": 1024, "tokens": 1280}[kind])
    adapter = adapter_config_from(SimpleNamespace(model=SimpleNamespace(adapter=section)), encoder)
    assert type(adapter) is AdapterConfig and adapter.image_embed_dim == 1280
    assert adapter.to_dict() == {**{k: v for k, v in config_to_dict(section).items() if k != "init_from"},
                                 "image_embed_dim": 1280}
    assert AdapterConfig.from_dict(json.loads(json.dumps(adapter.to_dict()))) == adapter
    wrong = load_config(None, ["model.adapter.image_embed_dim=768"]).model.adapter
    with pytest.raises(InvalidInputError, match="model.adapter.image_embed_dim is 768 but .* 1024"):
        wrong.adapter_config(1024)


def test_evaluation_backbones_are_typed_and_accept_a_path_shorthand():
    config = EvaluationConfig.from_dict({"backbones": {"inception": "w/fid.pth", "clip": None}})
    assert config.backbones.inception == InceptionEntry(path="w/fid.pth", kind=InceptionKind.fid)
    assert config.backbone("clip").path is None and config.backbone("clip").model == "ViT-L-14-quickgelu"
    message = _error(EvaluationConfig.from_dict, {"backbones": {"inception": {"kind": "tiny"}}})
    assert "'backbones.inception.kind'" in message and "fid" in message and "torchscript" in message


# ------------------------------------------------------------------------- generation settings


OLD_SPELLINGS = {
    "steps": "num_inference_steps",
    "text_guidance": "text_guidance_scale",
    "reference_guidance": "reference_guidance_scale",
    "inference_steps": "num_inference_steps",
}


@pytest.mark.parametrize("old", sorted(OLD_SPELLINGS))
def test_old_generation_keys_name_the_new_key(tmp_path, old):
    new = OLD_SPELLINGS[old]
    evaluation = _write(tmp_path / "eval.yaml", f"benchmark:\n  {old}: 3\n")
    assert _error(load_evaluation_file, evaluation) == (
        f"{evaluation}: unknown config key 'benchmark.{old}' (renamed: use 'benchmark.{new}')"
    )
    assert _error(load_config, None, [f"validation.{old}=3"]) == (
        f"override 'validation.{old}=3': unknown config key 'validation.{old}' (renamed: use 'validation.{new}')"
    )
    jobs = _write(tmp_path / "jobs.jsonl", json.dumps({"image": "a.png", "prompt": "x", old: 3}) + "\n")
    assert _error(read_jobs, jobs) == f"{jobs}:1: unknown config key '{old}' (renamed: use '{new}')"


SETTINGS = {
    "num_inference_steps": 7,
    "text_guidance_scale": 4.5,
    "reference_guidance_scale": 2.0,
    "reference_scale": 0.8,
    "reference_guidance_interval": (0.0, 0.5),
    "reference_guidance_every": 2,
    "negative_prompt": "blurry",
    "negative_prompt_2": "dark",
    "seed": 11,
    "resolution": 24,
    "feather_radius": 1.5,
    "product_dilation": 2,
}


class RecordingPipe:
    """Stands in for DreamPainterPipeline: records each call's keywords and echoes the inputs."""

    has_reference_adapter = True

    def __init__(self):
        self.calls = []

    def set_progress_bar_config(self, **kwargs):
        pass

    def __call__(self, **kwargs):
        self.calls.append(kwargs)
        images = kwargs["image"] if isinstance(kwargs["image"], list) else [kwargs["image"]]
        images = images * kwargs.get("num_images_per_prompt", 1)
        if kwargs.get("output_type") == "np":
            return SimpleNamespace(images=[np.asarray(image, dtype=np.float32) / 255 for image in images])
        return SimpleNamespace(images=[image.copy() for image in images])


def test_one_generation_settings_drives_validation_benchmark_jobs_and_the_demo(tmp_path):
    photo = Image.fromarray(np.random.default_rng(0).integers(0, 256, (16, 16, 3), dtype=np.uint8))
    mask = np.zeros((16, 16), np.uint8)
    mask[4:12, 4:12] = 255
    photo.save(tmp_path / "photo.png")
    Image.fromarray(mask).save(tmp_path / "mask.png")

    overrides = [f"validation.{key}={json.dumps(value)}" for key, value in SETTINGS.items()]
    validation = load_config(None, overrides).validation
    benchmark_yaml = "benchmark:\n" + "".join(f"  {key}: {json.dumps(value)}\n" for key, value in SETTINGS.items())
    _, benchmark = load_evaluation_file(_write(tmp_path / "eval.yaml", benchmark_yaml))
    jobs = _write(tmp_path / "jobs.jsonl", json.dumps({"image": "photo.png", "mask": "mask.png", "prompt": "x",
                                                      **SETTINGS}) + "\n")
    (job,) = read_jobs(jobs)
    demo = load_schema(DemoSettings, None, [f"generation.{key}={json.dumps(value)}" for key, value in SETTINGS.items()])
    shared = GenerationSettings(**SETTINGS)
    for settings in (validation, benchmark, job, demo.generation):
        assert settings.generation_settings() == shared
    expected = {key: value for key, value in SETTINGS.items() if key != "seed"}
    assert set(PIPELINE_KEYS) == set(expected)

    pipe = RecordingPipe()
    validation_grid(pipe, [ValidationSample("k", photo, mask, photo, "a loft")], validation)
    sample = SimpleNamespace(key="k", photo=photo, product_mask=mask, reference=photo, prompt="a loft")
    generate_batch(pipe, [sample], [photo], benchmark)
    run_job(pipe, job, tmp_path / "out")
    assert len(pipe.calls) == 3
    for call in pipe.calls:
        assert {key: call[key] for key in PIPELINE_KEYS} == expected


def test_job_settings_come_from_the_flags_and_the_jsonl_line_overrides_them(tmp_path):
    jobs = _write(tmp_path / "jobs.jsonl", '{"image": "a.png", "prompt": "x", "num_inference_steps": 4}\n'
                                           '{"image": "b.png", "prompt": "y"}\n')
    (tmp_path / "a.png").touch()
    (tmp_path / "b.png").touch()
    first, second = read_jobs(jobs, JobSettings(num_inference_steps=9, text_guidance_scale=2.0, num=2))
    assert isinstance(first, GenerationJob) and first.image == str(tmp_path / "a.png")
    assert (first.num_inference_steps, second.num_inference_steps) == (4, 9)
    assert first.pipeline_kwargs()["num_images_per_prompt"] == 2 and second.text_guidance_scale == 2.0
    assert config_from_dict(BenchmarkSettings, {"controls": []}).controls == []


def test_command_lines_report_config_errors_in_one_line(tmp_path, capsys):
    config = _write(tmp_path / "bad.yaml", "base: missing_base.yaml\n")
    assert main(["train", "--config", str(config)]) == 2
    assert "config file not found" in capsys.readouterr().err
    config = _write(tmp_path / "typo.yaml", "optim:\n  lrr: 1\n")
    assert main(["cache-latents", "--config", str(config), "--out", str(tmp_path / "c")]) == 2
    err = capsys.readouterr().err.strip()
    assert err == f"error: {config}: unknown config key 'optim.lrr'"


def test_yaml_syntax_errors_name_the_problem_and_the_line(tmp_path):
    from dreampainter.training.config import TrainConfig
    from dreampainter.utils.config import load_config

    path = tmp_path / "dup.yaml"
    path.write_text("optim:\n  lr: 1.0e-4\n  lr: 2.0e-4\n")
    with pytest.raises(InvalidInputError, match=r"dup.yaml: cannot parse YAML \(found duplicate key lr at line 3"):
        load_config(TrainConfig, path)
    path.write_text("optim: [1, 2\n")
    with pytest.raises(InvalidInputError, match=r"cannot parse YAML \(.* at line 2, column 1\)"):
        load_config(TrainConfig, path)
