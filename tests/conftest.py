"""Test-wide settings: offline, deterministic, one intra-op thread (tiny models; no oversubscription)."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "disabled")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)  # tiny models gain nothing from more; CI and shared machines stay fast


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield
