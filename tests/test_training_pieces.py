"""The trainer's public pieces on their own: what each stage trains, the optimizer, one step's NaN/inf skip
and clipping, and when progress is logged."""

import importlib.util

import pytest
import torch
from accelerate import Accelerator
from training_utils import make_tiny_base, tiny_config, write_config

from dreampainter.errors import InvalidInputError
from dreampainter.training import TrainingStoppedError, load_config
from dreampainter.training.checkpointing import TrainState
from dreampainter.training.components import load_components
from dreampainter.training.progress import ProgressLog
from dreampainter.training.setup import build_optimizer, mark_trainable
from dreampainter.training.update import train_step

ADAPTER_MARKERS = ("encoder_hid_proj.", ".to_k_ref.", ".to_v_ref.")  # the adapter's parameters by name


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    return make_tiny_base(tmp_path_factory.mktemp("pieces"))


def _config(tmp_path, base, **sections):
    config = tiny_config(base, tmp_path / "shards", tmp_path / "run", **sections)
    return load_config(write_config(config, tmp_path / "run.yaml"))


@pytest.mark.parametrize("stage, unet_training", [(1, "full"), (1, "lora"), (2, "frozen"), (2, "lora")])
def test_mark_trainable_enables_exactly_what_the_stage_trains(tmp_path, base, stage, unet_training):
    config = _config(tmp_path, base, run={"stage": stage}, model={"unet_training": unet_training, "lora": {"rank": 2}})
    parts = load_components(config)
    trainable = mark_trainable(config, parts)

    named = list(parts.unet.named_parameters())
    names = [name for name, _ in named]
    adapter = {name for name in names if any(marker in name for marker in ADAPTER_MARKERS)}
    lora = {name for name in names if ".lora_A." in name or ".lora_B." in name}
    assert bool(adapter) == (stage == 2) and bool(lora) == (unet_training == "lora")
    assert all(any(f".{target}.lora_" in name for target in config.model.lora.target_modules) for name in lora)
    expected = {(1, "full"): set(names), (1, "lora"): lora, (2, "frozen"): adapter, (2, "lora"): adapter | lora}
    assert {name for name, param in named if param.requires_grad} == expected[stage, unet_training]
    # the returned list is exactly those parameters, each once, in the UNet's order
    assert [id(p) for p in trainable] == [id(p) for _, p in named if p.requires_grad]
    for module in (parts.vae, parts.text_encoder, parts.reference_encoder):
        assert module is None or not any(p.requires_grad for p in module.parameters())


def test_build_optimizer_follows_the_config(tmp_path, base):
    config = _config(tmp_path, base, optim={"lr": 2e-3, "betas": [0.8, 0.95], "weight_decay": 0.5, "eps": 1e-6})
    params = [torch.nn.Parameter(torch.zeros(3))]
    optimizer = build_optimizer(config, params, torch.device("cpu"))
    assert type(optimizer) is torch.optim.AdamW  # auto: no 8-bit AdamW on the CPU
    group = optimizer.param_groups[0]
    assert (group["lr"], group["betas"], group["weight_decay"], group["eps"]) == (2e-3, (0.8, 0.95), 0.5, 1e-6)
    assert group["params"] == params
    if importlib.util.find_spec("bitsandbytes") is None:
        config.optim.use_8bit_adam = "yes"
        with pytest.raises(InvalidInputError, match="needs bitsandbytes"):
            build_optimizer(config, params, torch.device("cpu"))


def test_train_step_skips_non_finite_losses_clips_and_stops(tmp_path, base):
    config = _config(tmp_path, base, train={"max_consecutive_bad_steps": 2}, optim={"max_grad_norm": 1.0})
    accelerator = Accelerator(cpu=True)
    model = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = list(model.parameters())
    state = TrainState(global_step=5)

    def compute_loss(batch: dict) -> torch.Tensor:
        return model(torch.ones(4, 2)).sum() * batch["scale"]

    def step(scale: float):
        before = torch.cat([p.detach().flatten() for p in trainable])
        loss = train_step(accelerator, model, optimizer, scheduler, trainable, compute_loss, {"scale": scale}, state, config)
        after = torch.cat([p.detach().flatten() for p in trainable])
        return loss, (after - before).norm().item()

    loss, moved = step(1000.0)  # a huge gradient, clipped to norm 1: SGD moves the weights by lr * 1
    assert torch.isfinite(loss) and moved == pytest.approx(0.1, rel=1e-4)
    assert accelerator.sync_gradients and (state.skipped_steps, state.consecutive_bad_steps) == (0, 0)

    loss, moved = step(float("nan"))  # skipped: no update, no gradients left behind, counted
    assert loss is None and moved == 0 and all(p.grad is None for p in trainable)
    assert (state.skipped_steps, state.consecutive_bad_steps) == (1, 1)

    loss, moved = step(1e-3)  # a finite loss resets the run of bad steps
    assert loss is not None and 0 < moved < 0.1 and (state.skipped_steps, state.consecutive_bad_steps) == (1, 0)

    assert step(float("inf"))[0] is None
    with pytest.raises(TrainingStoppedError, match="NaN/inf for 2 steps in a row at step 5"):
        step(float("nan"))
    assert state.skipped_steps == 3 and state.global_step == 5  # the step counter is the loop's, not the step's


def test_a_skipped_step_inside_an_accumulation_window_drops_the_windows_gradients(tmp_path, base):
    """accelerate's wrapped zero_grad does nothing on accumulation steps; a NaN there must still drop the
    gradients of the window's earlier micro-batches, so the next optimizer step sees only what follows."""
    config = _config(tmp_path, base, train={"gradient_accumulation_steps": 3}, optim={"max_grad_norm": 0})
    accelerator = Accelerator(cpu=True, gradient_accumulation_steps=3)
    model = torch.nn.Linear(2, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    trainable = list(model.parameters())
    state = TrainState()

    def compute_loss(batch: dict) -> torch.Tensor:
        return model(torch.ones(1, 2)).sum() * batch["scale"]

    before = trainable[0].detach().clone()
    for scale in (5.0, float("nan"), 1.0):  # micro-batches 1-3 of one window; the 3rd steps the optimizer
        train_step(accelerator, model, optimizer, scheduler, trainable, compute_loss, {"scale": scale}, state, config)
    assert accelerator.sync_gradients
    # only the last micro-batch's gradient (1 per weight, divided by the 3 accumulation steps) was applied
    assert torch.allclose(before - trainable[0].detach(), torch.full_like(before, 1 / 3))


class _RecordingAccelerator:
    is_local_main_process = False

    def __init__(self):
        self.logged = []

    def log(self, values: dict, step: int) -> None:
        self.logged.append((step, values))


def test_progress_logs_every_n_steps_and_at_the_last(tmp_path, base):
    config = _config(tmp_path, base, logging={"every_steps": 3}, train={"max_steps": 7})
    accelerator = _RecordingAccelerator()
    progress = ProgressLog(accelerator, config, initial_step=0)
    for step in range(1, 8):
        progress.count_samples(8)
        progress.step(step, loss=float(step), lr=0.5, skipped_steps=1, skipped_samples=2)
    progress.close()
    assert [step for step, _ in accelerator.logged] == [3, 6, 7]
    step, values = accelerator.logged[0]
    assert values["loss"] == 3.0 and values["lr"] == 0.5 and values["samples_per_s"] > 0
    assert (values["skipped_steps"], values["skipped_samples"]) == (1, 2)
