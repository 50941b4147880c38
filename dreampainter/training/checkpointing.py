"""Training-state checkpoints: ``checkpoint-<step>/`` folders written atomically, pruned, resumed.

A checkpoint holds what ``accelerator.save_state`` writes (model, optimizer, LR scheduler, RNG states and
the objects registered for checkpointing: the EMA and the :class:`TrainState`) plus each rank's own
noise generator, so :func:`resume` continues the run exactly.

Every process calls :func:`save_checkpoint` (DeepSpeed and FSDP need all ranks in ``save_state``); the
state goes to a hidden temporary folder first and the main process renames it to ``checkpoint-<step>``
only once everyone has finished writing, so a killed save never leaves a ``checkpoint-*`` folder that
cannot load, and "latest" always means the newest complete one.
"""

from __future__ import annotations

import dataclasses
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator

from dreampainter.errors import InvalidInputError, MissingFileError

CHECKPOINT_RE = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-checkpoint-"


@dataclass
class TrainState:
    """Where the run is, saved in every checkpoint so resume is exact (the same on every rank)."""

    global_step: int = 0
    epoch: int = 0
    epoch_batches: int = 0  # batches each rank consumed in the current epoch
    skipped_steps: int = 0
    consecutive_bad_steps: int = 0

    def state_dict(self) -> dict:
        return dataclasses.asdict(self)

    def load_state_dict(self, state: dict) -> None:
        for key in self.state_dict():
            setattr(self, key, int(state[key]))


def list_checkpoints(output_dir: str | Path) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    output_dir = Path(output_dir)
    if not output_dir.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in output_dir.iterdir() if p.is_dir() and (m := CHECKPOINT_RE.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | Path) -> int:
    match = CHECKPOINT_RE.match(Path(path).name)
    if not match:
        raise InvalidInputError(f"{path}: not a checkpoint folder (expected a name like checkpoint-500)")
    return int(match.group(1))


def resolve_resume(output_dir: str | Path, resume: str | None) -> Path | None:
    """``None`` / ``"latest"`` (None when there is none yet) / an explicit folder (must exist)."""
    if not resume:
        return None
    if resume == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume)
    if not path.is_dir():
        raise MissingFileError(f"checkpoint.resume_from_checkpoint: folder not found: {path}")
    checkpoint_step(path)
    return path


def remove_stale_temporaries(output_dir: str | Path) -> None:
    """Delete half-written checkpoints left by a killed run (main process, before training)."""
    output_dir = Path(output_dir)
    if output_dir.is_dir():
        for path in output_dir.iterdir():
            if path.name.startswith(TMP_PREFIX):
                shutil.rmtree(path, ignore_errors=True)


def rank_state_path(checkpoint: str | Path, rank: int) -> Path:
    return Path(checkpoint) / f"rank_state_{rank}.pt"


def load_rank_state(checkpoint: str | Path, rank: int) -> dict:
    """What :func:`save_checkpoint` stored for this rank alone (e.g. its noise generator)."""
    path = rank_state_path(checkpoint, rank)
    if not path.exists():
        raise MissingFileError(f"{checkpoint}: no state for rank {rank} ({path.name}); was it saved with another world size?")
    return torch.load(path, map_location="cpu", weights_only=True)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | Path,
    step: int,
    keep_last: int,
    generator: torch.Generator | None = None,
) -> Path:
    """``save_state`` into a temporary folder on every rank, then rename and prune on the main process.

    ``generator`` (this rank's noise generator) is saved by every rank on its own (accelerate's custom
    objects are saved by rank 0 only).
    """
    output_dir = Path(output_dir)
    final = output_dir / f"checkpoint-{step}"
    tmp = output_dir / f"{TMP_PREFIX}{step}"
    if accelerator.is_main_process:
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if generator is not None:
        torch.save({"generator": generator.get_state()}, rank_state_path(tmp, accelerator.process_index))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if final.exists():  # the same step saved again (e.g. the final save after a periodic one)
            shutil.rmtree(final)
        tmp.rename(final)
        if keep_last > 0:
            for old in list_checkpoints(output_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
    accelerator.wait_for_everyone()
    return final


def resume(accelerator: Accelerator, output_dir: str | Path, resume_from: str | None, generator: torch.Generator) -> Path | None:
    """Load ``checkpoint.resume_from_checkpoint`` (see :func:`resolve_resume`) into the prepared objects,
    the registered ones and this rank's ``generator``; returns the checkpoint, or ``None`` to start fresh."""
    checkpoint = resolve_resume(output_dir, resume_from)
    if checkpoint is not None:
        accelerator.load_state(str(checkpoint))
        generator.set_state(load_rank_state(checkpoint, accelerator.process_index)["generator"])
    return checkpoint
