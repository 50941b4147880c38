"""The CPU demo: toy data -> tiny base model -> stage 1 -> stage 2 -> evaluation -> results grid.

Everything is built in code and runs offline on a CPU. At the end it prints a table that shows whether
both conditions were learned, measured on the held-out toy bench split:

* reference fidelity: the result's background is closer (mean CIELAB colour, ΔE) to the reference it
  was given than results made with references shuffled across samples are, both with an empty prompt
  (the reference alone) and with the sample's prompt (which then disagrees with a shuffled reference);
* text fidelity: text-only results are closer to the scene their prompt names than results made
  with shuffled prompts (on toy data the reference *is* the scene the prompt describes);
* product consistency: product pixels after compositing are identical to the input; masked PSNR of
  the product before compositing.
"""

from __future__ import annotations

import json
import math
import random
import shutil
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from tqdm.auto import tqdm

from dreampainter.errors import MissingFileError
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.utils.grid import image_grid

CONFIG_DIR = Path(__file__).resolve().parent / "configs"  # package data: works from a wheel too


def _demo_generation() -> GenerationSettings:
    return GenerationSettings(num_inference_steps=10, text_guidance_scale=3.0)


@dataclass
class DemoSettings:
    """What the demo does; ``quick()`` is the shortened version the test suite runs.

    ``seed`` drives the toy data, the base model, training and the shuffles; ``generation.seed`` the
    evaluation's generators (``dreampainter demo --seed`` sets both).
    """

    out_dir: Path = Path("outputs/demo")
    seed: int = 0
    num_toy: int = 3000
    resolution: int = 32  # toy image side (also the training resolution)
    vae_steps: int = 300
    text_steps: int = 400  # fitting the tiny text encoder (dreampainter.toy.text_fit)
    stage1_steps: int = 900
    stage2_steps: int = 800
    batch_size: int = 32
    eval_samples: int = 48
    generation: GenerationSettings = field(default_factory=_demo_generation)  # the evaluation's
    overrides: list[str] = field(default_factory=list)  # extra key=value for both stages

    @classmethod
    def short(cls, out_dir: Path) -> DemoSettings:
        """About a third of the demo's training; enough for the effects to show (the test suite runs it)."""
        return cls(out_dir=Path(out_dir), num_toy=1200, vae_steps=150, stage1_steps=300, stage2_steps=400,
                   eval_samples=24)

    @classmethod
    def quick(cls, out_dir: Path) -> DemoSettings:
        """Every step, a few iterations each: seconds; shows that the demo runs, not that it learns."""
        return cls(out_dir=Path(out_dir), num_toy=200, vae_steps=30, text_steps=20, stage1_steps=6, stage2_steps=6,
                   batch_size=8, eval_samples=6,
                   generation=GenerationSettings(num_inference_steps=3, text_guidance_scale=3.0))


def sign_test_p(wins: int, n: int) -> float:
    """One-sided sign test: P(at least ``wins`` of ``n`` fair coin flips come up heads)."""
    return sum(math.comb(n, k) for k in range(wins, n + 1)) / 2**n if n else 1.0


@dataclass
class DemoReport:
    seconds: dict[str, float]
    reference_ratio: float  # ΔE(shuffled refs) / ΔE(true refs), empty prompt; > 1: the reference is followed
    reference_with_prompt_ratio: float  # the same with each sample's prompt
    text_ratio: float  # ΔE(shuffled prompts) / ΔE(true prompts), no reference; > 1: the text is followed
    reference_wins: tuple[int, int]  # samples where the true reference beat the shuffled one, of n
    reference_with_prompt_wins: tuple[int, int]
    text_wins: tuple[int, int]
    delta_e: dict[str, float]
    product_max_abs_change: float  # after compositing; must be 0
    product_psnr: float  # inside the product, before compositing
    grid: str
    pipeline: str
    # Object expansion (evaluation/expansion.py, the toy scene's known background as segmenter): the mean
    # fraction of the image painted as product outside the product mask (results with reference and prompt).
    object_expansion: float = float("nan")

    @staticmethod
    def verdict(ratio: float, wins: tuple[int, int]) -> str:
        """"learned" when true beats shuffled on average *and* per sample (sign test, p < 0.05)."""
        p = sign_test_p(*wins)
        learned = ratio > 1 and p < 0.05
        return f"ratio {ratio:.2f}, better on {wins[0]}/{wins[1]} samples (p={p:.2g}): {'learned' if learned else 'NOT learned'}"

    def table(self) -> str:
        rows = [
            ("reference fidelity: ΔE to given ref, true / shuffled refs",
             f"{self.delta_e['true_reference']:.2f} / {self.delta_e['shuffled_reference']:.2f}",
             self.verdict(self.reference_ratio, self.reference_wins)),
            ("  the same with the sample's prompt",
             f"{self.delta_e['true_reference_with_prompt']:.2f} / {self.delta_e['shuffled_reference_with_prompt']:.2f}",
             self.verdict(self.reference_with_prompt_ratio, self.reference_with_prompt_wins)),
            ("text fidelity: ΔE to named scene, true / shuffled prompts",
             f"{self.delta_e['true_prompt']:.2f} / {self.delta_e['shuffled_prompt']:.2f}",
             self.verdict(self.text_ratio, self.text_wins)),
            ("product pixels changed after compositing (max abs)", f"{self.product_max_abs_change:.0f}",
             "exact" if self.product_max_abs_change == 0 else "CHANGED"),
            ("product PSNR before compositing (dB)", f"{self.product_psnr:.2f}", ""),
            ("object expansion (image fraction painted as product outside it)", f"{self.object_expansion:.4f}", ""),
        ]
        width = max(len(r[0]) for r in rows)
        lines = [f"{'metric'.ljust(width)} | value | verdict", "-" * (width + 30)]
        lines += [f"{name.ljust(width)} | {value} | {verdict}" for name, value, verdict in rows]
        timing = ", ".join(f"{k} {v:.0f}s" for k, v in self.seconds.items())
        return "\n".join(lines + [f"time: {timing}", f"grid: {self.grid}", f"pipeline: {self.pipeline}"])


def _config_path(name: str) -> Path:
    path = CONFIG_DIR / name
    if not path.exists():
        raise MissingFileError(f"demo config not found: {path} (the package was installed without its data files: reinstall dreampainter)")
    return path


def _stage_overrides(settings: DemoSettings, pretrained: Path, data: Path, output: Path, steps: int) -> list[str]:
    return [
        f"model.pretrained={pretrained}",
        f"data.train={data / 'train'}",
        f"data.validation={data / 'val'}",
        f"run.output_dir={output}",
        f"run.seed={settings.seed}",
        f"train.max_steps={steps}",
        f"train.batch_size={settings.batch_size}",
        f"data.loader.resolution={settings.resolution}",
        f"data.loader.reference_size={settings.resolution}",
        "data.loader.shuffle_buffer=64",
        *settings.overrides,
    ]


def stage_config(
    settings: DemoSettings, data: Path, output: Path, config_name: str, pretrained: Path, steps: int,
    extra: Sequence[str] = (), cache: Path | None = None,
):
    """The demo's training config for one stage (``extra``: overrides for this stage only)."""
    from dreampainter.training import load_config

    overrides = [*_stage_overrides(settings, pretrained, data, output, steps), *extra]
    return load_config(_config_path(config_name), [*overrides, *([f"data.cache={cache}"] if cache else [])])


def train_stage(
    settings: DemoSettings, out: Path, data: Path, name: str, config_name: str, pretrained: Path, steps: int,
    extra: Sequence[str] = (),
):
    """Cache the latents of one stage into ``out/<name>_cache``, then train it into ``out/<name>``."""
    from dreampainter.training import train
    from dreampainter.training.cache import cache_latents

    cache = out / f"{name}_cache"
    if cache.exists():
        shutil.rmtree(cache)
    # Steps then run only the UNet (augmentation fixed at epoch 0's).
    cache_latents(stage_config(settings, data, out / name, config_name, pretrained, steps, extra), cache)
    return train(stage_config(settings, data, out / name, config_name, pretrained, steps, extra, cache))


def run_demo(settings: DemoSettings) -> DemoReport:
    """Run every step of the demo and return (and save) its report."""
    from dreampainter.toy.base_model import build_demo_base_model
    from dreampainter.toy.data import write_toy_dataset

    out = Path(settings.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    seconds: dict[str, float] = {}

    def stage(name: str, config_name: str, pretrained: Path, steps: int):
        return train_stage(settings, out, data, name, config_name, pretrained, steps)

    def timed(name: str, fn):
        start = time.perf_counter()
        print(f"== {name}")
        value = fn()
        seconds[name] = time.perf_counter() - start
        print(f"== {name}: {seconds[name]:.1f}s")
        return value

    data = out / "toy"
    timed("toy data", lambda: write_toy_dataset(
        data, num=settings.num_toy, seed=settings.seed, resolution=settings.resolution, overwrite=True,
        samples_per_shard=max(64, settings.num_toy // 8)))
    base = timed("base model", lambda: build_demo_base_model(
        out / "base", resolution=settings.resolution, seed=settings.seed, vae_steps=settings.vae_steps,
        text_steps=settings.text_steps))
    stage1 = timed("stage 1", lambda: stage("stage1", "demo_stage1.yaml", base, settings.stage1_steps))
    stage2 = timed("stage 2", lambda: stage("stage2", "demo_stage2.yaml", stage1.pipeline_dir, settings.stage2_steps))
    report = timed("evaluation", lambda: evaluate_demo(stage2.pipeline_dir, data / "bench", out, settings))
    report.seconds = seconds
    (out / "report.json").write_text(json.dumps(asdict(report), indent=2) + "\n")
    print(report.table())
    return report


def _bench_samples(source: Path, limit: int):
    from dreampainter.training.validation import read_validation_samples

    return read_validation_samples(str(source), limit)


def _background(image: np.ndarray, product_mask: np.ndarray) -> np.ndarray:
    return image[product_mask < 128]


@torch.no_grad()
def evaluate_demo(pipeline_dir: Path, bench: Path, out: Path, settings: DemoSettings) -> DemoReport:
    """Score the trained pipeline on the bench split with true and shuffled references and prompts."""
    from dreampainter.evaluation.batch import EvalSample
    from dreampainter.evaluation.colour import background_distances
    from dreampainter.evaluation.expansion import KnownSceneSegmenter, expansion_fraction
    from dreampainter.evaluation.product import psnr_in_region
    from dreampainter.pipelines import DreamPainterPipeline
    from dreampainter.pipelines.image_processing import composite, feathered_alpha

    pipe = DreamPainterPipeline.from_pretrained(str(pipeline_dir))
    pipe.set_progress_bar_config(disable=True)
    samples = _bench_samples(bench, settings.eval_samples)
    # A rotation by a seeded offset: every sample gets another sample's reference / prompt.
    offset = random.Random(settings.seed).randrange(1, len(samples)) if len(samples) > 1 else 0
    shuffled = [(i + offset) % len(samples) for i in range(len(samples))]

    generation = settings.generation

    def generate(sample, prompt, reference, paste=True):
        return pipe(
            prompt=prompt, image=sample.photo, product_mask=sample.product_mask, reference_image=reference,
            generator=torch.Generator().manual_seed(generation.seed), paste_product=paste, output_type="np",
            **generation.pipeline_kwargs(),
        ).images[0]

    names = ("true_reference", "shuffled_reference", "true_reference_with_prompt", "shuffled_reference_with_prompt",
             "true_prompt", "shuffled_prompt")
    distances: dict[str, list[float]] = {name: [] for name in names}
    psnrs, expansions, max_change, grid_rows = [], [], 0.0, []
    segmenter = KnownSceneSegmenter()
    for i, sample in enumerate(tqdm(samples, desc="evaluation")):
        other = samples[shuffled[i]]
        reference = np.asarray(sample.reference).reshape(-1, 3)
        photo = np.asarray(sample.photo)
        # One generation gives both the raw image (product PSNR) and, pasted back with the pipeline's
        # own compositing, the final result (as the evaluation runner does).
        raw = generate(sample, sample.prompt, sample.reference, paste=False)
        alpha = feathered_alpha(sample.product_mask, generation.feather_radius)
        results = {
            "true_reference": generate(sample, "", sample.reference),
            "shuffled_reference": generate(sample, "", other.reference),
            "true_reference_with_prompt": composite(raw, photo.astype(np.float32) / 255.0, alpha),
            "shuffled_reference_with_prompt": generate(sample, sample.prompt, other.reference),
            "true_prompt": generate(sample, sample.prompt, None),
            "shuffled_prompt": generate(sample, other.prompt, None),
        }
        for name, result in results.items():
            image = (result * 255).round().astype(np.uint8)
            distances[name].append(background_distances(_background(image, sample.product_mask), reference)["bg_delta_e"])
        product = sample.product_mask >= 128
        psnrs.append(psnr_in_region((raw * 255).round().astype(np.uint8), photo, product))
        pasted = (results["true_reference_with_prompt"] * 255).round().astype(np.uint8)
        scored = EvalSample(sample.key, raw=(raw * 255).round().astype(np.uint8), composited=pasted, photo=photo,
                            product_mask=sample.product_mask, reference=np.asarray(sample.reference))
        expansions.append(expansion_fraction(segmenter(scored.composited, scored), scored.product_mask))
        max_change = max(max_change, float(np.abs(pasted[product].astype(int) - photo[product].astype(int)).max()))
        if len(grid_rows) < 6:
            grid_rows.append([sample.photo, Image.fromarray(255 - sample.product_mask), sample.reference,
                              Image.fromarray(pasted), other.reference,
                              Image.fromarray((results["shuffled_reference_with_prompt"] * 255).round().astype(np.uint8))])
    mean = {name: float(np.mean(values)) for name, values in distances.items()}
    n = len(samples)

    def compare(true: str, shuffled: str) -> tuple[float, tuple[int, int]]:
        wins = int(sum(s > t for s, t in zip(distances[shuffled], distances[true])))
        return mean[shuffled] / max(mean[true], 1e-9), (wins, n)

    reference_ratio, reference_wins = compare("true_reference", "shuffled_reference")
    with_prompt_ratio, with_prompt_wins = compare("true_reference_with_prompt", "shuffled_reference_with_prompt")
    text_ratio, text_wins = compare("true_prompt", "shuffled_prompt")

    grid_path = out / "results_grid.png"
    image_grid(grid_rows, tile=96).save(grid_path)
    return DemoReport(
        seconds={},
        reference_ratio=reference_ratio,
        reference_with_prompt_ratio=with_prompt_ratio,
        text_ratio=text_ratio,
        reference_wins=reference_wins,
        reference_with_prompt_wins=with_prompt_wins,
        text_wins=text_wins,
        delta_e=mean,
        product_max_abs_change=max_change,
        product_psnr=float(np.mean(psnrs)),
        object_expansion=float(np.mean(expansions)),
        grid=str(grid_path),
        pipeline=str(pipeline_dir),
    )
