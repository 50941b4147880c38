"""Reference fidelity in DINO space: cosine of the CLS features of the result and the reference."""

from __future__ import annotations

from dreampainter.evaluation.backbones import DinoBackbone
from dreampainter.evaluation.base import Metric, Row
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.evaluation.clip_scores import cosine


class DinoMetric(Metric):
    """``dino = cos(CLS(result), CLS(reference))`` with a timm DINO ViT, in [-1, 1]."""

    name = "dino"
    requires = ("dino",)
    columns = ("dino",)
    higher_is_better = {"dino": True}

    def __init__(self, backbone: DinoBackbone, batch_size: int = 32, progress: bool = True) -> None:
        self.backbone = backbone
        self.batch_size = batch_size
        self.progress = progress
        super().__init__()

    def score(self, batch: EvalBatch) -> list[Row]:
        encode = self.backbone.encode_images
        results = encode([s.composited for s in batch], self.batch_size, self.progress)
        references = encode([s.reference for s in batch], self.batch_size, self.progress)
        return [{"dino": value} for value in cosine(results, references).tolist()]
