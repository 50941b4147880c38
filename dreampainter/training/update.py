"""One training step: the loss under gradient accumulation, an agreed NaN/inf skip, backward, clip, step.

A non-finite loss on any rank skips the step on every rank (the ranks agree through one gather, so
DDP never waits for a backward pass that one rank skipped); ``train.max_consecutive_bad_steps`` skips
in a row stop the run.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from accelerate import Accelerator

from dreampainter.errors import DreamPainterError
from dreampainter.training.checkpointing import TrainState
from dreampainter.training.config import TrainConfig


class TrainingStoppedError(DreamPainterError):
    """The run cannot go on (e.g. the loss stayed NaN/inf)."""


def all_finite(accelerator: Accelerator, loss: torch.Tensor) -> bool:
    """Whether ``loss`` is finite on every rank (a collective: every rank must call it)."""
    finite = torch.isfinite(loss.detach()).float().reshape(1)
    return bool(accelerator.gather(finite).min() > 0)


def drop_gradients(optimizer: torch.optim.Optimizer, trainable: list[torch.nn.Parameter]) -> None:
    """Drop every accumulated gradient, also in the middle of an accumulation window (accelerate's wrapped
    ``zero_grad`` does nothing there, which would keep the earlier micro-batches' gradients of a window
    whose step is skipped). Under DeepSpeed the engine accumulates into its own buffers, which this does not
    reach: there a skipped micro-batch inside a window still leaves the window's earlier ones."""
    optimizer.zero_grad(set_to_none=True)
    for param in trainable:
        param.grad = None


def train_step(
    accelerator: Accelerator,
    unet: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    lr_scheduler,
    trainable: list[torch.nn.Parameter],
    compute_loss: Callable[[dict], torch.Tensor],
    batch: dict,
    state: TrainState,
    config: TrainConfig,
) -> torch.Tensor | None:
    """One micro-batch: ``compute_loss(batch)``, then backward, clipping (on sync steps) and the optimizer and
    LR-scheduler steps, all inside ``accelerator.accumulate``.

    Returns the loss, or ``None`` when it was not finite on some rank: then the gradients accumulated so
    far in this window are dropped and ``state.skipped_steps`` counted, and :class:`TrainingStoppedError` is raised after
    ``train.max_consecutive_bad_steps`` such steps in a row. ``accelerator.sync_gradients`` tells
    whether an optimizer step completed.
    """
    with accelerator.accumulate(unet):
        loss = compute_loss(batch)
        if not all_finite(accelerator, loss):
            drop_gradients(optimizer, trainable)
            state.skipped_steps += 1
            state.consecutive_bad_steps += 1
            if state.consecutive_bad_steps >= config.train.max_consecutive_bad_steps:
                raise TrainingStoppedError(
                    f"loss was NaN/inf for {state.consecutive_bad_steps} steps in a row at step "
                    f"{state.global_step}: lower optim.lr, use bf16 instead of fp16, or check the data"
                )
            return None
        state.consecutive_bad_steps = 0
        accelerator.backward(loss)
        if accelerator.sync_gradients and config.optim.max_grad_norm > 0:
            accelerator.clip_grad_norm_(trainable, config.optim.max_grad_norm)
        optimizer.step()
        lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)
    return loss
