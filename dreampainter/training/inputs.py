"""A loader batch -> :class:`~dreampainter.training.step.StepInputs`, from pixels or from the latent cache.

The pixel path runs the frozen encoders (VAE on the photo and the masked photo, the text encoder,
in stage 2 the reference encoder) and applies the batch's dropout flags; a cached batch already holds
their outputs, so only the dropout is applied. Both give the same inputs for the same batch.
"""

from __future__ import annotations

import torch

from dreampainter.models import reference_features
from dreampainter.models.backbones import TextConditions
from dreampainter.training.cache import cached_step_inputs, is_cached_batch
from dreampainter.training.components import TrainingComponents
from dreampainter.training.step import (
    StepInputs,
    batch_time_ids,
    condition_reference,
    drop_masks,
    encode_latent_distribution,
    encode_text,
    latent_mask,
    select_text,
)


def prepare_inputs(
    batch: dict,
    parts: TrainingComponents | None,
    empty_embeds: TextConditions | torch.Tensor | None,
    stage: int,
    device,
) -> StepInputs:
    """Pixels -> latent distributions, latent-size mask, text conditions, reference features.

    ``empty_embeds`` is what a dropped prompt becomes (``step.empty_text``). A cached batch
    (``data.cache``) needs neither ``parts`` nor ``empty_embeds``: it carries its own.
    """
    if is_cached_batch(batch):  # data.cache: everything but the UNet was computed by cache-latents
        return cached_step_inputs(batch, stage, device)
    latent_mean, latent_std = encode_latent_distribution(parts.vae, batch["pixel_values"].to(device))
    masked_mean, masked_std = encode_latent_distribution(parts.vae, batch["masked_pixel_values"].to(device))
    drop_text, drop_reference = drop_masks(batch, stage)
    text = select_text(encode_text(parts, batch["prompt"]), empty_embeds, drop_text)
    latent_size = tuple(latent_mean.shape[-2:])
    time_ids = batch_time_ids(parts, batch)
    features = None
    if stage == 2 and parts.unet.reference_adapter_config.decoupled:  # in_context: no CLIP features
        with torch.no_grad():
            encoded = parts.reference_encoder(batch["reference_pixel_values"].to(device))
        features = condition_reference(
            reference_features(encoded, parts.unet.reference_adapter_config).float(), drop_reference
        )
    return StepInputs(
        latent_mean.float(),
        latent_std.float(),
        masked_mean.float(),
        masked_std.float(),
        latent_mask(batch["mask"].to(device), latent_size),
        text.tokens,
        features,
        pooled_text_embeds=text.pooled,
        time_ids=None if time_ids is None else time_ids.to(device),
    )
