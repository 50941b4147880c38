"""A brief "pre-training" of the demo's tiny CLIP text encoder on toy prompts.

Stable Diffusion's text encoder arrives pre-trained: the hidden state of "a red wall" already says
*red* in a form cross-attention can read. A randomly initialised tiny encoder does not, and then the
tiny UNet has to untangle colour words from a random mixing of 20-odd tokens within CPU minutes
(measured: text fidelity ratio ~1.1, where the toy data allow ~3.6). So the demo's base model fits
its text encoder the way the VAE is fitted: briefly, on toy prompts from their own split, to *describe
the scene its prompt names*: every token that has seen the whole prompt (the end-of-text token and the
padding after it, which is what SD's UNet attends to most) is read by one linear probe that must
return the named wall, floor and product colours (CIELAB of the palette entry) and the one-hot
material, surface, light direction and tint. The probe is thrown away; the encoder keeps the
representation. Only words are used (no pixels): the encoder learns what the names mean, as a
pre-trained CLIP knows it, not the jittered colours of particular images.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from dreampainter.errors import InvalidInputError
from dreampainter.toy.data import make_toy_sample, sample_seed
from dreampainter.toy.vocab import LIGHT_TINTS, LIGHTS, PALETTE, SURFACES, material_word

MATERIAL_WORDS = ("wood", "marble", "fabric", "glossy", "matte")
# Toy seeds of the prompts the text encoder is fitted on and of its held-out check: split names
# disjoint from the toy dataset's train/val/bench splits.
TEXT_FIT_SPLIT = "text_fit"
TEXT_HELD_OUT_SPLIT = "text_held_out"


@dataclass
class TextFitResult:
    """How the fit went: held-out R² of the scene description read from the token states, before (the
    best linear probe on the random encoder, least squares) and after (the fitted probe); wall time."""

    steps: int
    initial_r2: float
    final_r2: float
    seconds: float


def _one_hot(value: str, names) -> list[float]:
    return [1.0 if value == name else 0.0 for name in names]


def scene_description(meta: dict) -> np.ndarray:
    """What a toy prompt names, as a vector: wall, floor and product colour (palette CIELAB / 50,
    lightness centred) and one-hot material word, surface, light direction and light tint."""
    from dreampainter.evaluation.colour import rgb_to_lab

    colours = [PALETTE[meta[key]].rgb for key in ("wall_colour", "floor_colour", "product_colour")]
    lab = rgb_to_lab(np.asarray(colours, dtype=np.uint8)) / 50.0
    lab[:, 0] -= 1.0
    words = (
        _one_hot(material_word(meta["material"], meta["glossy"]), MATERIAL_WORDS)
        + _one_hot(meta["surface"], SURFACES)
        + _one_hot(meta["light"], LIGHTS)
        + _one_hot(meta["light_tint"], LIGHT_TINTS)
    )
    return np.concatenate([lab.reshape(-1), np.asarray(words)]).astype(np.float32)


def toy_prompts(seed: int, split: str, count: int, languages: tuple[str, ...] = ("en", "zh")):
    """``count`` toy samples' prompts (each language in ``languages``) and their scene descriptions."""
    prompts, targets = [], []
    for index in range(count):
        meta = make_toy_sample(sample_seed(seed, split, index), resolution=16).meta
        for language in languages:
            prompts.append(meta["prompt"] if language == "en" else meta["prompt_zh"])
            targets.append(scene_description(meta))
    return prompts, torch.from_numpy(np.stack(targets))


def _tokenize(tokenizer, prompts: list[str]) -> torch.Tensor:
    return tokenizer(
        prompts,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids


def _summary_mask(input_ids: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """(N, L) bool: the positions that have seen the whole prompt (the first end-of-text token and after)."""
    is_eos = input_ids == eos_token_id
    first = torch.where(
        is_eos.any(1), is_eos.float().argmax(1), torch.full_like(input_ids[:, 0], input_ids.shape[1] - 1)
    )
    return torch.arange(input_ids.shape[1])[None] >= first[:, None]


def _summary_states(text_encoder, input_ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    states = text_encoder(input_ids)[0]
    return states[mask]


def _rows(targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return targets[:, None, :].expand(-1, mask.shape[1], -1)[mask]


@torch.no_grad()
def _least_squares_r2(text_encoder, ids, mask, targets, held_ids, held_mask, held_targets) -> float:
    """Held-out R² of the best linear probe (least squares on the training prompts) on the encoder as it is."""

    def design(input_ids, positions):
        states = _summary_states(text_encoder, input_ids, positions)
        return torch.cat([states, torch.ones(len(states), 1)], dim=1).double()

    solution = torch.linalg.lstsq(design(ids, mask), _rows(targets, mask).double()).solution
    return _r2(design(held_ids, held_mask) @ solution, _rows(held_targets, held_mask).double())


def _r2(prediction: torch.Tensor, target: torch.Tensor) -> float:
    residual = ((prediction - target) ** 2).sum()
    total = ((target - target.mean(0)) ** 2).sum()
    return float(1.0 - residual / total.clamp_min(1e-12))


def fit_text_encoder(
    text_encoder,
    tokenizer,
    prompts: list[str],
    targets: torch.Tensor,
    held_out_prompts: list[str],
    held_out_targets: torch.Tensor,
    *,
    steps: int,
    batch_size: int = 64,
    lr: float = 2e-3,
    seed: int = 0,
    progress: bool = True,
) -> TextFitResult:
    """Fit ``text_encoder`` in place so that a linear probe reads ``targets`` from the states of the
    tokens that have seen the whole prompt (MSE, AdamW); leaves it frozen in eval mode.

    The result reports held-out R² (on ``held_out_prompts``) of the best linear probe before the fit
    and of the fitted probe after it.
    """
    if steps < 0 or batch_size < 1:
        raise InvalidInputError(
            f"text encoder fit: steps must be >= 0 and batch_size >= 1, got {steps}, {batch_size}"
        )
    if len(prompts) != len(targets) or len(held_out_prompts) != len(held_out_targets) or not prompts:
        raise InvalidInputError("text encoder fit: prompts and targets must be non-empty and of equal length")
    eos = int(text_encoder.config.eos_token_id)
    ids, held_ids = _tokenize(tokenizer, prompts), _tokenize(tokenizer, held_out_prompts)
    mask, held_mask = _summary_mask(ids, eos), _summary_mask(held_ids, eos)
    initial = _least_squares_r2(text_encoder, ids, mask, targets, held_ids, held_mask, held_out_targets)

    generator = torch.Generator().manual_seed(seed)
    probe = torch.nn.Linear(text_encoder.config.hidden_size, targets.shape[1])
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        probe.reset_parameters()
    start = time.perf_counter()
    text_encoder.train().requires_grad_(True)
    parameters = [*text_encoder.parameters(), *probe.parameters()]
    optimizer = torch.optim.AdamW(parameters, lr=lr, weight_decay=0.0)
    bar = tqdm(range(steps), desc="fit text encoder", disable=not progress, leave=False)
    for _ in bar:
        batch = torch.randint(len(ids), (batch_size,), generator=generator)
        states = _summary_states(text_encoder, ids[batch], mask[batch])
        loss = torch.mean((probe(states) - _rows(targets[batch], mask[batch])) ** 2)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        bar.set_postfix(mse=f"{loss.item():.4f}")
    text_encoder.eval().requires_grad_(False)
    with torch.no_grad():
        held = probe(_summary_states(text_encoder, held_ids, held_mask))
        final = _r2(held, _rows(held_out_targets, held_mask))
    return TextFitResult(steps, initial, final, time.perf_counter() - start)
