"""Sharded training under a real ``accelerate launch`` with two CPU processes.

DeepSpeed ZeRO-2 runs on the CPU (gloo, DeepSpeed's CPU accelerator): stage 2 with EMA and gradient
accumulation, a resume from a copied checkpoint that ends bitwise-equal to the uninterrupted run, and
stage 1 (full UNet) of the SDXL backbone in bf16, whose saved UNet must be DeepSpeed's fp32 master weights. FSDP (sharded parameters) is not supported by the loop and must be refused at
start-up; on the CPU accelerate would otherwise run it as plain DDP without a word.
"""

import importlib.util
import json
import math
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file
from training_utils import REPO, accelerate_launch, make_tiny_base, make_toy_shards, tiny_config, write_config

from dreampainter.models import adapter_state_dict

ACCELERATE = REPO / "configs" / "accelerate"
needs_deepspeed = pytest.mark.skipif(
    importlib.util.find_spec("deepspeed") is None or shutil.which(os.environ.get("CXX", "c++")) is None,
    reason="needs deepspeed (pip install deepspeed) and a C++ compiler for its CPU comm op",
)


def _launch(launch_config, config_path, *overrides, check: bool = True):
    return accelerate_launch(
        launch_config, "train.py", "--config", str(config_path), *overrides,
        launch_args=("--num_processes", "2", "--mixed_precision", "no"), check=check,
    )  # fmt: skip


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("sharded")
    return make_tiny_base(root), make_toy_shards(root / "toy", num=40)


@pytest.fixture(scope="module")
def sdxl_setup(tmp_path_factory, setup):
    root = tmp_path_factory.mktemp("sharded_sdxl")
    return make_tiny_base(root, backbone="sdxl"), setup[1]


def _config(setup, tmp_path, name, **sections):
    base, shards = setup
    config = tiny_config(base, shards, tmp_path / name, **sections)
    return write_config(config, tmp_path / f"{name}.yaml"), tmp_path / name


def _summary(output_dir) -> dict:
    return json.loads((output_dir / "train_summary.json").read_text())


@needs_deepspeed
def test_deepspeed_zero2_stage2_resumes_exactly(setup, tmp_path):
    from dreampainter.pipelines import DreamPainterPipeline

    sections = dict(
        train={"max_steps": 4, "gradient_accumulation_steps": 2, "ema": {"enabled": True, "decay": 0.9}},
        checkpoint={"every_steps": 2, "keep_last": 2, "resume_from_checkpoint": "latest"},
    )
    config, out = _config(setup, tmp_path, "uninterrupted", **sections)
    _launch(ACCELERATE / "deepspeed_zero2_cpu.yaml", config)
    summary = _summary(out)
    assert summary["num_processes"] == 2 and summary["global_step"] == 4
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    # ZeRO-2: one optimizer-state partition per rank, written by every rank into the same checkpoint
    partitions = sorted(p.name for p in (out / "checkpoint-4" / "pytorch_model").glob("*optim_states.pt"))
    assert len(partitions) == 2 and "rank_0" in partitions[0] and "rank_1" in partitions[1]

    # the saved pipeline loads and carries the trained adapter; the frozen UNet did not move
    pipe = DreamPainterPipeline.from_pretrained(str(out / "pipeline"))
    adapter = load_file(str(out / "adapter" / "adapter.safetensors"))
    loaded = adapter_state_dict(pipe.unet)
    assert adapter.keys() == loaded.keys()
    assert all(torch.equal(adapter[k], loaded[k].float()) for k in adapter)
    base = load_file(str(setup[0] / "unet" / "diffusion_pytorch_model.safetensors"))
    trained = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    assert all(torch.equal(base[k], trained[k]) for k in base)

    # a second run picks up checkpoint-2 (ZeRO partitions, EMA, rank generators) and ends bitwise-equal
    config, resumed = _config(setup, tmp_path, "resumed", **sections)
    resumed.mkdir()
    shutil.copytree(out / "checkpoint-2", resumed / "checkpoint-2")
    done = _launch(ACCELERATE / "deepspeed_zero2_cpu.yaml", config)
    assert "resumed from" in done.stdout + done.stderr
    actual = load_file(str(resumed / "adapter" / "adapter.safetensors"))
    different = [k for k in adapter if not torch.equal(adapter[k], actual[k])]
    assert not different, f"{len(different)} adapter tensors differ after resume, e.g. {different[:3]}"


@needs_deepspeed
def test_deepspeed_zero2_bf16_sdxl_stage1_saves_the_fp32_master_weights(sdxl_setup, tmp_path):
    """Under DeepSpeed bf16 the module holds bf16 copies; the saved UNet must be DeepSpeed's fp32 masters.
    On the SDXL backbone (two text encoders, pooled embeddings, micro-conditioning)."""
    setup = sdxl_setup
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from dreampainter.pipelines import DreamPainterPipeline

    config, out = _config(
        setup, tmp_path, "stage1", run={"stage": 1}, model={"unet_training": "full"},
        train={"max_steps": 2, "mixed_precision": "bf16"}, checkpoint={"every_steps": 2, "keep_last": 1},
    )
    _launch(ACCELERATE / "deepspeed_zero2_cpu.yaml", config)  # train.mixed_precision decides, not the launcher
    summary = _summary(out)
    assert summary["num_processes"] == 2 and math.isfinite(summary["final_loss"])
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]
    assert DreamPainterPipeline.from_pretrained(str(out / "pipeline")).backbone.name == "sdxl"
    saved = load_file(str(out / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors"))
    masters = get_fp32_state_dict_from_zero_checkpoint(str(out / "checkpoint-2"), tag="pytorch_model")
    assert saved.keys() == masters.keys()
    different = [k for k in saved if not torch.equal(saved[k], masters[k].float())]
    assert not different, f"{len(different)} UNet tensors differ from the fp32 masters, e.g. {different[:3]}"
    base = load_file(str(setup[0] / "unet" / "diffusion_pytorch_model.safetensors"))
    assert sum(not torch.equal(base[k], saved[k]) for k in base) > len(base) // 2  # the whole UNet trained
    assert not all(torch.equal(v, v.bfloat16().float()) for v in saved.values())  # not bf16-rounded copies


FSDP_LAUNCH = """\
compute_environment: LOCAL_MACHINE
distributed_type: FSDP
fsdp_config:
  fsdp_version: 2
  fsdp_auto_wrap_policy: SIZE_BASED_WRAP
  fsdp_min_num_params: 1000
  fsdp_use_orig_params: true
  fsdp_sync_module_states: false
  fsdp_cpu_ram_efficient_loading: false
num_machines: 1
num_processes: 2
mixed_precision: "no"
"""


def test_fsdp_is_refused_before_training(setup, tmp_path):
    """FSDP shards the parameters, which the loop does not support; on the CPU accelerate would even
    run this config as plain DDP without a word. The run must stop at start-up and say why."""
    launch = tmp_path / "fsdp_launch.yaml"
    launch.write_text(FSDP_LAUNCH)
    config, out = _config(setup, tmp_path, "fsdp", train={"max_steps": 1})
    done = _launch(launch, config, check=False)
    assert done.returncode != 0
    assert "error: the accelerate config asks for FSDP" in done.stderr, done.stderr[-3000:]
    assert "deepspeed_zero2.yaml" in done.stderr
    assert not (out / "pipeline").exists() and not list(out.glob("checkpoint-*"))
