"""Reference fidelity in DINO space: cosine of the CLS features of the result and the reference."""

from __future__ import annotations

from dreampainter.evaluation.backbones import DinoBackbone
from dreampainter.evaluation.base import Row
from dreampainter.evaluation.batch import EvalBatch
from dreampainter.evaluation.clip_scores import ReferenceSimilarityMetric, cosine


class DinoMetric(ReferenceSimilarityMetric):
    """``dino = cos(CLS(result), CLS(reference))`` with a timm DINO ViT, in [-1, 1]."""

    name = "dino"
    requires = ("dino",)
    columns = ("dino",)
    higher_is_better = {"dino": True}

    backbone: DinoBackbone

    def score(self, batch: EvalBatch) -> list[Row]:
        results, references = self.result_and_reference_features(batch)
        return [{"dino": value} for value in cosine(results, references).tolist()]
