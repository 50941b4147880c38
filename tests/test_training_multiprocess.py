"""Two CPU processes (gloo) under a real ``accelerate launch``: disjoint data, identical weights, one
checkpoint writer, and a resumed 2-process run bitwise-equal to an uninterrupted one."""

import json

import pytest
import torch
from safetensors.torch import load_file
from training_utils import REPO, accelerate_launch, make_tiny_base, make_toy_shards, tiny_config, write_config

LAUNCH_CONFIG = REPO / "configs" / "accelerate" / "cpu_2proc.yaml"


def _launch(config_path, *overrides):
    return accelerate_launch(LAUNCH_CONFIG, "train.py", "--config", str(config_path), *overrides)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("multiprocess")
    return make_tiny_base(root), make_toy_shards(root / "toy", num=60)


def _config(setup, tmp_path, name):
    base, shards = setup
    config = tiny_config(base, shards, tmp_path / name, train={"max_steps": 6},
                         logging={"sample_keys": True},
                         checkpoint={"every_steps": 1, "keep_last": 2, "resume_from_checkpoint": "latest"})
    return write_config(config, tmp_path / f"{name}.yaml"), tmp_path / name


def test_two_processes_train_in_sync_and_resume_exactly(setup, tmp_path):
    config, out = _config(setup, tmp_path, "uninterrupted")
    _launch(config)
    summary = json.loads((out / "train_summary.json").read_text())
    assert summary["num_processes"] == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]

    keys = [set((out / "sample_keys" / f"rank-{r}.txt").read_text().split()) for r in (0, 1)]
    assert keys[0] and keys[1] and not keys[0] & keys[1], "ranks must see disjoint samples"
    assert len(keys[0]) == len(keys[1]) == 6 * 4  # 6 steps x batch 4 per rank, no repeats within the epoch

    checkpoint = out / "checkpoint-6"
    assert sorted(p.name for p in checkpoint.glob("random_states_*.pkl")) == ["random_states_0.pkl", "random_states_1.pkl"]
    assert sorted(p.name for p in checkpoint.glob("rank_state_*.pt")) == ["rank_state_0.pt", "rank_state_1.pt"]
    assert len(list(checkpoint.glob("model*.safetensors"))) == 1
    assert not list(out.glob(".tmp-checkpoint-*"))

    config, resumed = _config(setup, tmp_path, "resumed")
    _launch(config, "train.max_steps=3")
    done = _launch(config)  # the same run continued from checkpoint-3 to step 6
    assert "resumed from" in done.stdout + done.stderr
    expected = load_file(str(out / "adapter" / "adapter.safetensors"))
    actual = load_file(str(resumed / "adapter" / "adapter.safetensors"))
    assert all(torch.equal(expected[k], actual[k]) for k in expected)
