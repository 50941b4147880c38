"""The stage interfaces and the component registry.

Every component is a class built with ``cls(**options, device=device)`` (``options``: its config
section minus ``kind``) and called with batches. Photos are HxWx3 ``uint8`` RGB arrays; masks are
HxW ``uint8`` with 255 = product. Components are looked up by dotted path, so model-backed ones
(``dreampainter.data.build.models``) and the toy world's are only imported when a config names them.
"""

from __future__ import annotations

import importlib
import inspect
from typing import Any, Protocol

import numpy as np

from dreampainter.errors import InvalidInputError, MissingFileError


class MaskMaker(Protocol):  # product mask from a photo
    def __call__(self, photos: list[np.ndarray]) -> list[tuple[np.ndarray, float]]: ...  # (HxW uint8 0..255, confidence 0..1)


class MaskRefiner(Protocol):  # e.g. SAM prompted by the mask's box
    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]: ...


class ReferenceMaker(Protocol):  # background reference: product region (dilated) removed
    def __call__(self, photos: list[np.ndarray], masks: list[np.ndarray]) -> list[np.ndarray]: ...  # HxWx3 uint8


class Captioner(Protocol):
    def __call__(self, images: list[np.ndarray]) -> list[str]: ...


class Translator(Protocol):
    def __call__(self, texts: list[str]) -> list[str]: ...


MODEL_COMPONENTS = {
    ("mask", "onnx"): "dreampainter.data.build.models.onnx_segmenter:OnnxSalientSegmenter",
    ("refine", "sam"): "dreampainter.data.build.models.sam:SamRefiner",
    ("reference", "diffusers"): "dreampainter.data.build.models.diffusers_inpaint:DiffusersInpaintReference",
    ("reference", "lama"): "dreampainter.data.build.models.lama:LamaReference",
    ("prompt", "blip"): "dreampainter.data.build.models.blip:BlipCaptioner",
    ("translate", "marian"): "dreampainter.data.build.models.marian:MarianTranslator",
}

# Weight-free components. ``given`` kinds are handled by the pipeline itself (they read the input).
BUILTIN_COMPONENTS = {
    ("mask", "studio"): "dreampainter.data.build.masks:StudioSegmenter",
    ("reference", "fill"): "dreampainter.data.build.references:FillReference",
    ("mask", "toy"): "dreampainter.toy.build_components:ToySceneMasks",
    ("reference", "toy"): "dreampainter.toy.build_components:ToySceneReferences",
    ("prompt", "toy"): "dreampainter.toy.build_components:ToyScenePrompts",
}
GIVEN = "given"
NONE = "none"


def component_kinds(stage: str) -> list[str]:
    """Every kind a stage accepts (``given`` / ``none`` where they apply)."""
    kinds = {kind for (name, kind) in (*MODEL_COMPONENTS, *BUILTIN_COMPONENTS) if name == stage}
    if stage in ("mask", "reference", "prompt"):
        kinds.add(GIVEN)
    if stage in ("refine", "translate"):
        kinds.add(NONE)
    return sorted(kinds)


def load_class(stage: str, kind: str) -> type:
    """The class registered for ``(stage, kind)``; a clear error when unknown or not installed."""
    target = MODEL_COMPONENTS.get((stage, kind)) or BUILTIN_COMPONENTS.get((stage, kind))
    if target is None:
        raise InvalidInputError(
            f"{stage}.kind: unknown kind {kind!r} (choose from {', '.join(component_kinds(stage))})"
        )
    module_name, _, class_name = target.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as error:
        raise MissingFileError(
            f"{stage}.kind {kind!r}: its module {module_name} is not available ({error})"
        ) from None
    try:
        return getattr(module, class_name)
    except AttributeError:
        raise MissingFileError(f"{stage}.kind {kind!r}: {module_name} has no class {class_name}") from None


def build_component(stage: str, section: dict[str, Any], device: str) -> Any:
    """``cls(**options, device=device)`` for a config section; None for ``given`` / ``none``."""
    kind = section["kind"]
    if kind in (GIVEN, NONE):
        if kind not in component_kinds(stage):
            raise InvalidInputError(f"{stage}.kind: {kind!r} is not allowed for this stage")
        extra = sorted(set(section) - {"kind"})
        if extra:
            raise InvalidInputError(f"{stage}: unknown option(s) {', '.join(extra)} for kind {kind!r}")
        return None
    cls = load_class(stage, kind)
    options = {key: value for key, value in section.items() if key != "kind"}
    try:
        inspect.signature(cls).bind(**options, device=device)
    except TypeError as error:
        raise InvalidInputError(f"{stage} (kind {kind!r}): bad options ({error})") from None
    return cls(**options, device=device)
