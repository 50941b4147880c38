"""Shared set-up for the training tests: a tiny base pipeline folder and toy shards on disk."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]


def make_tiny_base(folder: Path, with_reference_encoder: bool = True, backbone: str = "sd") -> Path:
    """A tiny DreamPainter pipeline folder without adapter (what stage 1 / stage 2 start from)."""
    from dreampainter.models import remove_reference_adapter
    from dreampainter.toy.pipeline import build_tiny_pipeline

    pipe = build_tiny_pipeline(folder / "_tokenizer", reference=with_reference_encoder, backbone=backbone)
    if with_reference_encoder:
        remove_reference_adapter(pipe.unet)
    pipe.save_pretrained(str(folder / "base"))
    return folder / "base"


def make_toy_shards(folder: Path, num: int = 40) -> Path:
    from dreampainter.toy.data import write_toy_dataset

    write_toy_dataset(folder, num=num, seed=0, resolution=32, samples_per_shard=9, progress=False)
    return folder / "train"


def tiny_config(base_dir: Path, train_shards: Path, output_dir: Path, **sections) -> dict:
    """A tiny run's config as a dict (sections override the defaults below)."""
    config = {
        "run": {"output_dir": str(output_dir), "seed": 0, "stage": 2},
        "model": {
            "pretrained": str(base_dir),
            "adapter": {"projection": "resampler", "num_tokens": 4, "resampler_depth": 1,
                        "resampler_heads": 2, "resampler_dim_head": 16, "resampler_ff_mult": 2},
        },
        "data": {"train": str(train_shards), "num_workers": 0,
                 "loader": {"resolution": 32, "reference_size": 32, "shuffle_buffer": 16}},
        "optim": {"lr": 1e-3},
        "train": {"batch_size": 4, "max_steps": 6},
        "checkpoint": {"every_steps": 2, "keep_last": 2},
        "logging": {"report_to": "none", "every_steps": 1},
        "validation": {"num_samples": 0},
    }
    _deep_update(config, sections)
    return config


def _deep_update(target: dict, updates: dict) -> None:
    for key, value in updates.items():
        if isinstance(value, dict) and isinstance(target.get(key), dict):
            _deep_update(target[key], value)
        else:
            target[key] = value


def write_config(config: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def subprocess_env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    return env


def run_cli(args: list[str], **kwargs) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "dreampainter.cli", *args], env=subprocess_env(), capture_output=True, text=True, **kwargs
    )


def accelerate_launch(
    launch_config: Path, script: str, *args: str, launch_args: tuple[str, ...] = (), check: bool = True
) -> subprocess.CompletedProcess:
    """``accelerate launch --config_file launch_config [launch_args] scripts/<script> args`` on a free port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(launch_config), *launch_args,
        "--main_process_port", str(port), str(REPO / "scripts" / script), *args,
    ]  # fmt: skip
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=600)
    if check:
        assert done.returncode == 0, done.stderr[-3000:]
    return done
