"""What a run reports while it trains: a progress bar and the metrics sent to the trackers."""

from __future__ import annotations

import time

from accelerate import Accelerator
from tqdm.auto import tqdm

from dreampainter.training.config import TrainConfig


class ProgressLog:
    """The progress bar (local main process) and, every ``logging.every_steps`` optimizer steps and at the
    last one, ``loss``, ``lr``, ``samples_per_s`` (since the previous log), ``skipped_steps`` and
    ``skipped_samples`` to ``accelerator.log``."""

    def __init__(self, accelerator: Accelerator, config: TrainConfig, initial_step: int):
        self.accelerator = accelerator
        self.every_steps, self.max_steps = config.logging.every_steps, config.train.max_steps
        self.bar = tqdm(
            total=config.train.max_steps, initial=initial_step, desc=f"stage {config.run.stage}",
            disable=not accelerator.is_local_main_process, dynamic_ncols=True,
        )
        self.window_start, self.window_samples = time.perf_counter(), 0

    def count_samples(self, samples: int) -> None:
        """``samples`` (over all ranks) went through a training step."""
        self.window_samples += samples

    def step(self, step: int, loss: float, lr: float, skipped_steps: int, skipped_samples: int) -> None:
        """Optimizer step ``step`` is done: advance the bar, log when due."""
        self.bar.update(1)
        if step % self.every_steps != 0 and step != self.max_steps:
            return
        rate = self.window_samples / max(time.perf_counter() - self.window_start, 1e-9)
        self.window_start, self.window_samples = time.perf_counter(), 0
        logs = {
            "loss": loss, "lr": lr, "samples_per_s": rate,
            "skipped_steps": skipped_steps, "skipped_samples": skipped_samples,
        }
        self.bar.set_postfix(loss=f"{loss:.4f}", lr=f"{lr:.2e}", sps=f"{rate:.1f}")
        self.accelerator.log(logs, step=step)

    def close(self) -> None:
        self.bar.close()
