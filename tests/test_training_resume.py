"""Exact resume: a run killed with SIGKILL and resumed ends bitwise-equal to the uninterrupted run."""

import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file
from training_utils import make_tiny_base, make_toy_shards, subprocess_env, tiny_config, write_config

from dreampainter.training.checkpointing import list_checkpoints, resolve_resume

MAX_STEPS = 8


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("resume")
    return make_tiny_base(root), make_toy_shards(root / "toy")


def _config(setup, tmp_path, name: str) -> tuple:
    base, shards = setup
    config = tiny_config(
        base, shards, tmp_path / name,
        train={"max_steps": MAX_STEPS, "gradient_accumulation_steps": 2, "ema": {"enabled": True, "decay": 0.9}},
        optim={"lr_scheduler": "cosine", "warmup_steps": 2},
        data={"loader": {"p_drop_text": 0.2, "p_drop_reference": 0.2, "p_drop_both": 0.1}},
        checkpoint={"every_steps": 1, "keep_last": 2, "resume_from_checkpoint": "latest"},
    )
    return write_config(config, tmp_path / f"{name}.yaml"), tmp_path / name


def _command(config_path):
    return [sys.executable, "-m", "dreampainter.cli", "train", "--config", str(config_path)]


def _weights(output_dir):
    pipeline = output_dir / "pipeline"
    tensors = load_file(str(pipeline / "reference_adapter" / "adapter.safetensors"))
    tensors.update(load_file(str(pipeline / "unet" / "diffusion_pytorch_model.safetensors")))
    return tensors


def test_sigkill_then_resume_is_bitwise_equal(setup, tmp_path):
    reference_config, reference_dir = _config(setup, tmp_path, "uninterrupted")
    done = subprocess.run(_command(reference_config), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]

    config, output_dir = _config(setup, tmp_path, "killed")
    kill_after = random.Random().randint(2, MAX_STEPS - 2)  # a random step: epoch boundaries, accumulation, EMA
    process = subprocess.Popen(_command(config), env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 600
    while not (output_dir / f"checkpoint-{kill_after}").exists():
        assert process.poll() is None, f"run ended before step {kill_after}: {process.stderr.read()[-2000:]}"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert not (output_dir / "pipeline").exists()
    latest = resolve_resume(output_dir, "latest")
    assert latest is not None and int(latest.name.split("-")[1]) >= kill_after

    resumed = subprocess.run(_command(config), env=subprocess_env(), capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout + resumed.stderr
    expected, actual = _weights(reference_dir), _weights(output_dir)
    assert expected.keys() == actual.keys()
    different = [key for key in expected if not torch.equal(expected[key], actual[key])]
    assert not different, f"{len(different)} tensors differ after resume (killed after step {kill_after}), e.g. {different[:3]}"
    assert not list(output_dir.glob(".tmp-checkpoint-*"))
    assert [p.name for p in list_checkpoints(output_dir)] == [f"checkpoint-{MAX_STEPS - 1}", f"checkpoint-{MAX_STEPS}"]
