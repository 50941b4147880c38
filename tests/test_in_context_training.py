"""Stage 2 with in-context reference conditioning: cached inputs, the saved mode, and a learning signal."""

from __future__ import annotations

import pytest
import torch
from training_utils import REPO, accelerate_launch, make_tiny_base, make_toy_shards, tiny_config, write_config

from dreampainter.errors import InvalidInputError
from dreampainter.models import get_adapter_config
from dreampainter.pipelines import DreamPainterPipeline
from dreampainter.toy.demo import sign_test_p
from dreampainter.training import load_config, train
from dreampainter.training.cache import LATENT_NAMES, LatentCache, cache_latents
from dreampainter.training.components import load_components
from dreampainter.training.in_context import REFERENCE_LATENTS_NAME, add_in_context_inputs, in_context_rows
from dreampainter.training.inputs import prepare_inputs
from dreampainter.training.step import StepInputs, diffusion_loss, empty_text

IN_CONTEXT = {"adapter": {"reference_mode": "in_context"}, "unet_training": "lora", "lora": {"rank": 8}}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("in_context")
    base, shards = make_tiny_base(root), make_toy_shards(root / "toy")
    return root, base, shards


def _config(root, base, shards, name, cache=None, **sections):
    if "model" not in sections:  # in-context: the CLIP-sized reference (48 px here) is resized to the photo's side
        sections["model"] = IN_CONTEXT
        sections.setdefault("data", {}).setdefault("loader", {})["reference_size"] = 48
    sections.setdefault("checkpoint", {"every_steps": 0})
    data = sections.setdefault("data", {})
    data.setdefault("loader", {}).update(reference_aligned=True, p_drop_reference=0.1, p_drop_text=0.0, p_drop_both=0.0)
    if cache is not None:
        data["cache"] = str(cache)
    return load_config(write_config(tiny_config(base, shards, root / name, **sections), root / f"{name}.yaml"))


def test_rows_of_kept_references():
    assert in_context_rows(torch.tensor([False, True, False, True, False])).tolist() == [0, -1, 1, -1, 2]


def test_cached_reference_latents_equal_the_uncached_ones_and_the_mode_is_saved(setup):
    root, base, shards = setup
    config = _config(root, base, shards, "cache_run")
    cache_latents(config, root / "cache", progress=False)
    cache = LatentCache(root / "cache")
    assert cache.index["reference_latents"] and cache.index["reference_feature_type"] is None

    parts = load_components(config)
    from dreampainter.data.loading.loader import build_dataloader

    batch = next(iter(build_dataloader(config.data.train, config.data.loader, batch_size=4, seed=0)))
    batch["drop_reference"] = torch.tensor([False, True, False, False])
    empty = empty_text(parts)
    uncached = add_in_context_inputs(prepare_inputs(batch, parts, empty, 2, "cpu"), batch, parts, config.data.loader, 2, "cpu")
    cached_batch = cache.read([cache.index_of(key) for key in batch["key"]], (*LATENT_NAMES, REFERENCE_LATENTS_NAME))
    cached_batch.update(drop_text=batch["drop_text"], drop_reference=batch["drop_reference"],
                        empty_text_embeds=cache.empty_text_embeds())
    cached = add_in_context_inputs(prepare_inputs(cached_batch, None, None, 2, "cpu"), cached_batch, parts,
                                   config.data.loader, 2, "cpu")
    assert uncached.reference_features is None  # in_context only: no CLIP features
    assert batch["reference_pixel_values"].shape[-1] == 48
    assert cached.reference_latents.shape == (3, 4, 16, 16)  # the kept rows, at the photo's latent size
    assert torch.allclose(cached.reference_latents, uncached.reference_latents, atol=1e-5)
    assert cached.reference_rows.tolist() == [0, -1, 1, 2]

    result = train(_config(root, base, shards, "cached", cache=root / "cache", train={"max_steps": 2}))
    loaded = DreamPainterPipeline.from_pretrained(result.pipeline_dir)
    assert get_adapter_config(loaded.unet).reference_mode == "in_context"
    # A decoupled-only cache has no reference latents: refused, naming the fix.
    decoupled = _config(root, base, shards, "decoupled", model={"unet_training": "frozen"})
    cache_latents(decoupled, root / "decoupled_cache", progress=False)
    with pytest.raises(InvalidInputError, match="no reference latents"):
        train(_config(root, base, shards, "stale", cache=root / "decoupled_cache"))
    with pytest.raises(InvalidInputError, match="gradient_checkpointing"):
        _config(root, base, shards, "gc", train={"gradient_checkpointing": True})


def test_two_processes_train_the_in_context_lora_in_sync(setup):
    """DDP (2 CPU processes, gloo) runs the wrapped UNet twice per step (reference pass, then the step) before
    one backward: the ranks must end with the same weights."""
    import json

    root, base, shards = setup
    config = tiny_config(base, shards, root / "ddp", model=IN_CONTEXT, train={"max_steps": 2},
                         checkpoint={"every_steps": 0}, data={"loader": {"p_drop_reference": 0.3}})
    accelerate_launch(REPO / "configs" / "accelerate" / "cpu_2proc.yaml", "train.py", "--config",
                      str(write_config(config, root / "ddp.yaml")))
    summary = json.loads((root / "ddp" / "train_summary.json").read_text())
    assert summary["num_processes"] == 2 and summary["global_step"] == 2
    assert summary["rank_checksums"][0] == summary["rank_checksums"][1]


def _scenes(n: int, generator: torch.Generator) -> torch.Tensor:
    """Latents of flat-coloured scenes (one random colour each, a little texture): the reference shows it."""
    return torch.randn(n, 4, 1, 1, generator=generator) + 0.1 * torch.randn(n, 4, 8, 8, generator=generator)


def _inputs(latents: torch.Tensor, references: torch.Tensor) -> StepInputs:
    """Everything to repaint, no text: only the in-context reference tells the scene's colour."""
    n, zeros = latents.shape[0], torch.zeros_like(latents)
    return StepInputs(latents, zeros, zeros, zeros, torch.ones(n, 1, 8, 8), torch.zeros(n, 1, 32), None,
                      reference_latents=references, reference_rows=torch.arange(n))


def _reference_ratio(unet, scheduler, held_out: torch.Tensor) -> tuple[float, int]:
    """Mean per-sample loss with another sample's reference / with its own, and the samples where it is higher."""

    def losses(references):
        with torch.no_grad():
            return torch.tensor([
                float(diffusion_loss(unet, scheduler, _inputs(held_out[i : i + 1], references[i : i + 1]),
                                     torch.Generator().manual_seed(i)))
                for i in range(held_out.shape[0])
            ])  # fmt: skip

    true, shuffled = losses(held_out), losses(held_out.roll(1, dims=0))
    return float(shuffled.mean() / true.mean()), int((shuffled > true).sum())


def test_a_short_in_context_lora_run_learns_to_use_the_reference():
    """The training objective (diffusion_loss) with the reference pass, a peft LoRA as stage 2 adds it, 50 steps
    of flat-coloured scenes: held-out losses become lower with each sample's own reference than with another
    sample's (ratio > 1.2, a majority of per-sample wins); before training they are not."""
    from diffusers import DDIMScheduler
    from peft import LoraConfig

    from dreampainter.models import AdapterConfig, install_reference_adapter
    from dreampainter.toy.base_model import demo_scheduler_config
    from dreampainter.toy.models import build_tiny_unet

    unet = build_tiny_unet(seed=0)
    install_reference_adapter(unet, AdapterConfig(reference_mode="in_context"))
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=8, lora_alpha=8, init_lora_weights="gaussian",
                                target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    scheduler = DDIMScheduler(**demo_scheduler_config())  # the demo's v-prediction, zero-terminal-SNR schedule
    held_out = _scenes(32, torch.Generator().manual_seed(99))
    before, _ = _reference_ratio(unet, scheduler, held_out)
    generator = torch.Generator().manual_seed(0)
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=3e-3, weight_decay=0.0)
    for _ in range(50):
        latents = _scenes(16, generator)
        loss = diffusion_loss(unet, scheduler, _inputs(latents, latents), generator)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    ratio, wins = _reference_ratio(unet, scheduler, held_out)
    n = held_out.shape[0]
    assert before < 1.1, before
    assert ratio > 1.2 and wins > n / 2, (ratio, wins, n, sign_test_p(wins, n))
