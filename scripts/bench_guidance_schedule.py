"""Benchmark: fidelity of dual guidance with a reference guidance schedule vs full dual guidance.

On the toy bench split with the CPU demo's trained pipeline, every configuration generates the same samples
with the same seed; per sample (ΔE of the background, ``background_distances``, lower = closer):

* ``ref``: prompt + the sample's reference, ΔE to that reference (reference fidelity);
* ``ref_only``: empty prompt + the sample's reference, ΔE to it (the reference alone);
* ``ref_conflict``: prompt + another sample's reference, ΔE to that reference (the reference followed
  against the prompt);
* ``text_conflict``: the same image, ΔE to the sample's own reference, the scene its prompt names (the
  text followed against the reference).

Each schedule is compared with full dual guidance by the paired per-sample difference (schedule − full):
mean, 95% paired bootstrap interval and sign test; "within noise" when the interval includes 0. Text
fidelity without a reference (the demo's text ratio) runs two branches and is not changed by a schedule.

    python scripts/bench_guidance_schedule.py --pipeline /tmp/demo_integ16/stage2/pipeline \\
        --bench /tmp/demo_integ16/toy/bench --samples 48 --steps 10
"""

from __future__ import annotations

import argparse
import random

import numpy as np
import torch

from dreampainter.evaluation.colour import background_distances
from dreampainter.evaluation.paired_stats import bootstrap_interval, sign_test
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.training.validation import read_validation_samples
from dreampainter.utils.logging import silence_known_noise

SCHEDULES = {
    "full": {},
    "interval 0-0.3": dict(reference_guidance_interval=(0.0, 0.3)),
    "interval 0-0.5, every 2": dict(reference_guidance_interval=(0.0, 0.5), reference_guidance_every=2),
    "every 4": dict(reference_guidance_every=4),
    "interval 0.35-0.65": dict(reference_guidance_interval=(0.35, 0.65)),
    "interval 0.7-1": dict(reference_guidance_interval=(0.7, 1.0)),
}
METRICS = ("ref", "ref_only", "ref_conflict", "text_conflict")


def main() -> None:
    silence_known_noise()
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--pipeline", required=True)
    parser.add_argument("--bench", required=True)
    parser.add_argument("--samples", type=int, default=48)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--text-guidance", type=float, default=3.0)
    parser.add_argument("--reference-guidance", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--configs", nargs="+", default=list(SCHEDULES), help="schedules to run (full always)")
    parser.add_argument("--plain", action="store_true", help="also plain two-branch guidance (s_ref = s_text)")
    args = parser.parse_args()

    pipe = DreamPainterPipeline.from_pretrained(args.pipeline)
    pipe.set_progress_bar_config(disable=True)
    samples = read_validation_samples(args.bench, args.samples)
    offset = random.Random(args.seed).randrange(1, len(samples))
    configs = {name: dict(schedule, reference_guidance_scale=args.reference_guidance)
               for name, schedule in SCHEDULES.items() if name == "full" or name in args.configs}  # fmt: skip
    if args.plain:
        configs["plain two-branch (s_ref = s_text)"] = dict(reference_guidance_scale=args.text_guidance)

    def delta_e(image, sample, reference) -> float:
        pixels = (image * 255).round().astype(np.uint8)[sample.product_mask < 128]
        return background_distances(pixels, np.asarray(reference).reshape(-1, 3))["bg_delta_e"]

    values = {name: {metric: [] for metric in METRICS} for name in configs}
    for i, sample in enumerate(samples):
        other = samples[(i + offset) % len(samples)]
        for name, config in configs.items():

            def generate(prompt, reference, config=config, sample=sample):
                return pipe(
                    prompt=prompt, image=sample.photo, product_mask=sample.product_mask, reference_image=reference,
                    num_inference_steps=args.steps, text_guidance_scale=args.text_guidance, output_type="np",
                    generator=torch.Generator().manual_seed(args.seed), **config,
                ).images[0]  # fmt: skip

            conflict = generate(sample.prompt, other.reference)
            row = values[name]
            row["ref"].append(delta_e(generate(sample.prompt, sample.reference), sample, sample.reference))
            row["ref_only"].append(delta_e(generate("", sample.reference), sample, sample.reference))
            row["ref_conflict"].append(delta_e(conflict, sample, other.reference))
            row["text_conflict"].append(delta_e(conflict, sample, sample.reference))
        print(f"sample {i + 1}/{len(samples)}", flush=True)

    print(
        f"\n{len(samples)} samples, {args.steps} steps, s_text {args.text_guidance}, s_ref {args.reference_guidance}; "
        "ΔE lower = closer; diff = config − full, 95% paired bootstrap interval, sign test (+/− samples)"
    )
    print("| config | metric | mean ΔE | diff vs full [95% CI] | +/− | sign p | verdict |")
    print("|---|---|---|---|---|---|---|")
    full = values["full"]
    for name, row in values.items():
        for metric in METRICS:
            mean = float(np.mean(row[metric]))
            if name == "full":
                print(f"| {name} | {metric} | {mean:.2f} | | | | |")
                continue
            diff = np.array(row[metric]) - np.array(full[metric])
            low, high = bootstrap_interval(diff, seed=args.seed)
            above, below = int((diff > 0).sum()), int((diff < 0).sum())
            verdict = "within noise" if low <= 0 <= high else ("worse" if low > 0 else "better")
            print(
                f"| {name} | {metric} | {mean:.2f} | {diff.mean():+.2f} [{low:+.2f}, {high:+.2f}] | "
                f"{above}/{below} | {sign_test(above, below):.3f} | {verdict} |"
            )


if __name__ == "__main__":
    main()
