"""dreampainter.pipelines: inference (DreamPainterPipeline) and its pixel-space helpers."""

from dreampainter.pipelines.assembly import assemble_components
from dreampainter.pipelines.guidance import GuidancePlan
from dreampainter.pipelines.image_processing import place_cutout, prepare_product_input
from dreampainter.pipelines.pipeline_dreampainter import DreamPainterPipeline, DreamPainterPipelineOutput

__all__ = [
    "DreamPainterPipeline",
    "DreamPainterPipelineOutput",
    "GuidancePlan",
    "assemble_components",
    "place_cutout",
    "prepare_product_input",
]
