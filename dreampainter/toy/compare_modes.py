"""Decoupled vs in-context reference conditioning on the toy world, from one command.

``dreampainter demo --compare-reference-modes`` runs the demo's toy data, base model and stage 1 once,
then stage 2 once per reference mode (same steps, seeds, data, cache order and dropout draws; only the
mode and what trains differ), scores each with the demo's evaluation (ΔE ratios and sign tests,
product PSNR, object expansion) and measures the cost of a training step and of an image for every
mode, interleaved round by round so that a shared machine's load falls on all modes alike. It writes
``reference_modes.json``, ``reference_modes.md`` (the table) and ``reference_modes_grid.png``.
"""

from __future__ import annotations

import json
import statistics
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dreampainter.toy.demo import (
    DemoReport,
    DemoSettings,
    evaluate_demo,
    sign_test_p,
    stage_config,
    train_stage,
)
from dreampainter.utils.grid import image_grid

# Stage-2 overrides per compared mode (on top of the demo's stage-2 config, which trains the whole UNet
# with the decoupled adapter). in_context_lora is the paper's form (LoRA on the UNet); in_context_full
# trains like the decoupled run (whole UNet) so that the two differ only in how the reference enters.
MODES: dict[str, tuple[str, ...]] = {
    "decoupled": (),
    "in_context_lora": ("model.adapter.reference_mode=in_context", "model.unet_training=lora"),
    "in_context_full": ("model.adapter.reference_mode=in_context",),
    "both": ("model.adapter.reference_mode=both",),
}


@dataclass
class ModeResult:
    """One mode's scores (the demo's report), its stage-2 wall time and its measured costs."""

    mode: str
    overrides: list[str]
    report: DemoReport
    stage2_seconds: float
    seconds_per_step: float = float("nan")  # median over interleaved rounds, one batch of the demo's size
    seconds_per_image: float = float("nan")  # median over interleaved rounds, one bench sample


def _median_times(jobs: dict[str, callable], rounds: int, desc: str) -> dict[str, float]:
    """Run every job once per round, modes interleaved (after one warm-up round); the median per job."""
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for round_index in tqdm(range(rounds + 1), desc=desc):
        for name, job in jobs.items():
            start = time.perf_counter()
            job()
            if round_index:
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _step_job(settings: DemoSettings, config):
    """One stage-2 training step (forward with the reference, backward) on the run's first cached batch."""
    from dreampainter.training.cache import LatentCache
    from dreampainter.training.components import load_components
    from dreampainter.training.in_context import add_in_context_inputs
    from dreampainter.training.inputs import prepare_inputs
    from dreampainter.training.setup import mark_trainable
    from dreampainter.training.step import diffusion_loss

    torch.manual_seed(settings.seed)
    parts = load_components(config)
    mark_trainable(config, parts)
    loader = LatentCache(config.data.cache).dataloader(
        config.data.loader, batch_size=settings.batch_size, seed=settings.seed
    )
    batch = next(iter(loader))
    inputs = add_in_context_inputs(prepare_inputs(batch, None, None, 2, "cpu"), batch, parts, config.data.loader, 2, "cpu")
    unet = parts.unet.train()

    def job() -> None:
        loss = diffusion_loss(unet, parts.noise_scheduler, inputs, torch.Generator().manual_seed(0))
        loss.backward()
        unet.zero_grad(set_to_none=True)

    return job


def _image_job(settings: DemoSettings, pipeline_dir: Path, sample):
    """One bench image with its prompt and reference, the demo's generation settings."""
    from dreampainter.pipelines import DreamPainterPipeline

    pipe = DreamPainterPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    generation = settings.generation

    def job(chosen=sample) -> np.ndarray:
        return pipe(
            prompt=chosen.prompt, image=chosen.photo, product_mask=chosen.product_mask, reference_image=chosen.reference,
            generator=torch.Generator().manual_seed(generation.seed), output_type="np", **generation.pipeline_kwargs(),
        ).images[0]

    return job


def compare_reference_modes(
    settings: DemoSettings, modes: dict[str, tuple[str, ...]] | None = None, timing_rounds: int = 5
) -> list[ModeResult]:
    """Train and score stage 2 once per mode on shared toy data / base / stage 1; write the table and grid."""
    from dreampainter.toy.base_model import build_demo_base_model
    from dreampainter.toy.data import write_toy_dataset
    from dreampainter.training.validation import read_validation_samples

    modes = MODES if modes is None else modes
    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    data = out / "toy"
    print("== toy data, base model, stage 1 (shared by every mode)")
    write_toy_dataset(data, num=settings.num_toy, seed=settings.seed, resolution=settings.resolution,
                      overwrite=True, samples_per_shard=max(64, settings.num_toy // 8))
    base = build_demo_base_model(out / "base", resolution=settings.resolution, seed=settings.seed,
                                 vae_steps=settings.vae_steps, text_steps=settings.text_steps)
    stage1 = train_stage(settings, out, data, "stage1", "demo_stage1.yaml", base, settings.stage1_steps)

    results: list[ModeResult] = []
    for mode, extra in modes.items():
        print(f"== stage 2, {mode}")
        start = time.perf_counter()
        trained = train_stage(settings, out, data, f"stage2_{mode}", "demo_stage2.yaml", stage1.pipeline_dir,
                              settings.stage2_steps, extra)
        seconds = time.perf_counter() - start
        (out / mode).mkdir(exist_ok=True)
        report = evaluate_demo(trained.pipeline_dir, data / "bench", out / mode, settings)
        results.append(ModeResult(mode, list(extra), report, seconds))
        print(report.table())

    print("== cost per training step and per image (interleaved)")
    configs = {
        r.mode: stage_config(settings, data, out / f"stage2_{r.mode}", "demo_stage2.yaml", stage1.pipeline_dir,
                             settings.stage2_steps, modes[r.mode], out / f"stage2_{r.mode}_cache")
        for r in results
    }
    step_times = _median_times({m: _step_job(settings, c) for m, c in configs.items()}, timing_rounds, "step cost")
    samples = read_validation_samples(str(data / "bench"), 6)
    image_jobs = {r.mode: _image_job(settings, Path(r.report.pipeline), samples[0]) for r in results}
    image_times = _median_times(image_jobs, timing_rounds, "image cost")
    for result in results:
        result.seconds_per_step, result.seconds_per_image = step_times[result.mode], image_times[result.mode]

    rows = []
    for sample in samples:
        row = [("photo", sample.photo), ("reference", sample.reference)]
        row += [(mode, Image.fromarray((job(sample) * 255).round().astype(np.uint8))) for mode, job in image_jobs.items()]
        rows.append(row)
    image_grid(rows, tile=96).save(out / "reference_modes_grid.png")
    (out / "reference_modes.json").write_text(json.dumps([asdict(r) for r in results], indent=2) + "\n")
    table = comparison_table(results)
    (out / "reference_modes.md").write_text(table + "\n")
    print(table)
    return results


def _verdict(ratio: float, wins: tuple[int, int]) -> str:
    return f"{ratio:.2f} ({wins[0]}/{wins[1]}, p={sign_test_p(*wins):.1g})"


def comparison_table(results: list[ModeResult]) -> str:
    """The comparison as a Markdown table; costs also as multiples of the first mode's (decoupled)."""
    first = results[0]
    header = (
        "| mode | reference ratio, empty prompt (wins, p) | with the prompt | text ratio, no reference | "
        "product PSNR (dB) | object expansion | s / train step | s / image | stage 2 wall (s) |"
    )
    lines = [header, "| --- | --- | --- | --- | ---: | ---: | ---: | ---: | ---: |"]
    for r in results:
        rep = r.report
        lines.append(
            f"| {r.mode} | {_verdict(rep.reference_ratio, rep.reference_wins)} | "
            f"{_verdict(rep.reference_with_prompt_ratio, rep.reference_with_prompt_wins)} | "
            f"{_verdict(rep.text_ratio, rep.text_wins)} | {rep.product_psnr:.2f} | {rep.object_expansion:.4f} | "
            f"{r.seconds_per_step:.3f} (x{r.seconds_per_step / first.seconds_per_step:.2f}) | "
            f"{r.seconds_per_image:.3f} (x{r.seconds_per_image / first.seconds_per_image:.2f}) | {r.stage2_seconds:.0f} |"
        )
    return "\n".join(lines)
