"""Text alignment (CLIP-T) and reference fidelity in CLIP space (CLIP-I).

- CLIP-T: ``100 * max(cos(E_image, E_text), 0)``, torchmetrics' ``CLIPScore`` definition, of the
  composited result against its prompt. Samples with an empty prompt get NaN (left out of the mean).
- CLIP-I: ``cos(E_result, E_reference)`` (plain cosine, as in DreamBooth), in [-1, 1].
"""

from __future__ import annotations

import math

import torch

from dreampainter.evaluation.backbones import ClipBackbone
from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Row-wise cosine similarity of two ``(N, D)`` matrices, in float64."""
    a = a.double()
    b = b.double()
    return (a / a.norm(dim=-1, keepdim=True) * (b / b.norm(dim=-1, keepdim=True))).sum(dim=-1)


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> torch.Tensor:
    """torchmetrics' CLIPScore per pair: ``100 * max(cos, 0)``."""
    return (100.0 * cosine(image_features, text_features)).clamp(min=0.0)


class ReferenceSimilarityMetric(Metric):
    """Base of metrics comparing the composited result with its reference in a backbone's feature space."""

    def __init__(self, backbone, batch_size: int = 32, progress: bool = True) -> None:
        self.backbone = backbone
        self.batch_size = batch_size
        self.progress = progress
        super().__init__()

    def result_and_reference_features(self, batch: EvalBatch) -> tuple[torch.Tensor, torch.Tensor]:
        encode = self.backbone.encode_images
        results = encode([s.composited for s in batch], self.batch_size, self.progress)
        references = encode([s.reference for s in batch], self.batch_size, self.progress)
        return results, references


class ClipMetric(ReferenceSimilarityMetric):
    """CLIP-T (result vs prompt) and CLIP-I (result vs reference) with one open_clip model."""

    name = "clip"
    requires = ("clip",)
    columns = ("clip_t", "clip_i")
    higher_is_better = {"clip_t": True, "clip_i": True}

    backbone: ClipBackbone

    def score(self, batch: EvalBatch) -> list[Row]:
        results, references = self.result_and_reference_features(batch)
        clip_i = cosine(results, references).tolist()
        clip_t = [math.nan] * len(batch)
        with_prompt = [i for i, sample in enumerate(batch) if sample.prompt.strip()]
        if with_prompt:
            texts = self.backbone.encode_texts(
                [batch.samples[i].prompt for i in with_prompt], progress=self.progress
            )
            for i, value in zip(with_prompt, clip_score(results[with_prompt], texts).tolist()):
                clip_t[i] = value
        return [{"clip_t": t, "clip_i": i} for t, i in zip(clip_t, clip_i)]
