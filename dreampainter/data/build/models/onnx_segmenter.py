"""Product masks from an ONNX salient-object model (U²-Net, IS-Net, BiRefNet exports, as rembg uses them).

The photo is resized to ``input_size``, scaled to [0, 1] and normalised with ``mean`` / ``std``; the
model's ``output_index``-th output is the saliency map (Bx1xhxw or Bxhxw), normalised to [0, 1] by
min-max (U²-Net, IS-Net) or by a sigmoid (BiRefNet's logits; ``sigmoid="auto"`` applies it when the
map leaves [0, 1]) and resized back to the photo's size. The confidence is how two-sided the map is.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image

from dreampainter.errors import InvalidInputError

from .common import check_photos, check_positive, chunks, one_line, require_path, resolve_device

HINT = "download e.g. u2net.onnx or isnet-general-use.onnx, as rembg uses, and set mask.path"


def _pair(value, name: str) -> tuple[int, int]:
    """``input_size`` as ``(height, width)``."""
    if isinstance(value, int) and not isinstance(value, bool):
        value = (value, value)
    try:
        height, width = (int(v) for v in value)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: expected a size or [height, width], got {value!r}") from None
    if height < 1 or width < 1:
        raise InvalidInputError(f"{name}: expected positive sizes, got {value!r}")
    return height, width


def _triple(value, name: str) -> np.ndarray:
    try:
        array = np.asarray(value, dtype=np.float32).reshape(3)
    except (TypeError, ValueError):
        raise InvalidInputError(f"{name}: expected three numbers (R, G, B), got {value!r}") from None
    return array


def map_confidence(prob: np.ndarray, contrast: float = 1.0) -> float:
    """How bimodal a [0, 1] map is: mean ``|2p - 1|`` (1 for a hard 0/1 map, 0 for all 0.5).

    Scaled by ``contrast`` (the raw map's range when min-max stretched it, so that a flat map
    stretched into noise is not confident); 0 when no pixel is foreground.
    """
    if not (prob > 0.5).any():
        return 0.0
    return float(np.clip(np.abs(2.0 * prob - 1.0).mean() * contrast, 0.0, 1.0))


class OnnxSalientSegmenter:
    """``MaskMaker``: (mask HxW uint8 0..255, confidence 0..1) per photo from a salient-object ONNX model."""

    def __init__(
        self,
        path: str | os.PathLike,
        input_size: int | Sequence[int] = 320,
        mean: Sequence[float] = (0.485, 0.456, 0.406),
        std: Sequence[float] = (0.229, 0.224, 0.225),
        output_index: int = 0,
        sigmoid: bool | str = False,
        device: str | torch.device | None = None,
        batch_size: int = 8,
    ) -> None:
        path = require_path(path, "ONNX salient model", HINT)
        if path.is_dir():
            raise InvalidInputError(f"{path}: expected an .onnx file, got a folder ({HINT})")
        if sigmoid not in (True, False, "auto"):
            raise InvalidInputError(f"sigmoid: expected true, false or auto, got {sigmoid!r}")
        self.path = path
        self.input_size = _pair(input_size, "input_size")
        self.mean = _triple(mean, "mean")
        self.std = _triple(std, "std")
        if (self.std == 0).any():
            raise InvalidInputError(f"std: must not contain 0, got {list(std)}")
        self.sigmoid = sigmoid
        self.device = resolve_device(device)
        self.batch_size = check_positive("batch_size", batch_size)
        self.session = self._open_session()
        self._check_io(output_index)

    def _open_session(self):
        try:
            import onnxruntime as ort
        except ImportError:
            raise InvalidInputError(
                "the ONNX segmenter needs onnxruntime (pip install onnxruntime, or onnxruntime-gpu for CUDA)"
            ) from None
        providers: list = ["CPUExecutionProvider"]
        if self.device.type == "cuda":
            if "CUDAExecutionProvider" in ort.get_available_providers():
                providers.insert(0, ("CUDAExecutionProvider", {"device_id": self.device.index or 0}))
            else:
                warnings.warn(
                    "onnxruntime has no CUDA execution provider (install onnxruntime-gpu); "
                    "the ONNX segmenter runs on the CPU",
                    stacklevel=3,
                )
        options = ort.SessionOptions()
        options.log_severity_level = 3
        if self.device.type != "cuda":
            options.intra_op_num_threads = max(1, torch.get_num_threads())
        try:
            return ort.InferenceSession(str(self.path), sess_options=options, providers=providers)
        except Exception as error:  # onnxruntime raises its own exception types for unreadable models
            raise InvalidInputError(f"{self.path}: not a readable ONNX model ({one_line(error)})") from None

    def _check_io(self, output_index: int) -> None:
        inputs, outputs = self.session.get_inputs(), self.session.get_outputs()
        if len(inputs) != 1 or len(inputs[0].shape) != 4:
            shapes = [list(i.shape) for i in inputs]
            raise InvalidInputError(
                f"{self.path}: expected one image input Bx3xHxW, the model takes {shapes}"
            )
        self.input_name = inputs[0].name
        batch, channels, height, width = inputs[0].shape
        if isinstance(channels, int) and channels != 3:
            raise InvalidInputError(
                f"{self.path}: expected an RGB input (3 channels), the model takes {channels}"
            )
        fixed = tuple(d if isinstance(d, int) else None for d in (height, width))
        if fixed[0] is not None and fixed[1] is not None and fixed != self.input_size:
            raise InvalidInputError(
                f"input_size: the model at {self.path} takes {fixed[0]}x{fixed[1]}, "
                f"not {self.input_size[0]}x{self.input_size[1]} (set mask.input_size)"
            )
        if isinstance(batch, int):  # exported with a fixed batch (often 1)
            self.batch_size = min(self.batch_size, batch)
        if (
            isinstance(output_index, bool)
            or not isinstance(output_index, int)
            or not 0 <= output_index < len(outputs)
        ):
            raise InvalidInputError(
                f"output_index: {output_index!r} is not one of the model's {len(outputs)} outputs"
            )
        self.output_name = outputs[output_index].name

    def preprocess(self, photos: Sequence[np.ndarray]) -> np.ndarray:
        """Bx3xHxW float32: each photo resized to ``input_size``, scaled to [0, 1], normalised."""
        height, width = self.input_size
        batch = np.empty((len(photos), 3, height, width), dtype=np.float32)
        for i, photo in enumerate(photos):
            resized = np.asarray(Image.fromarray(photo).resize((width, height), Image.Resampling.LANCZOS))
            batch[i] = ((resized.astype(np.float32) / 255.0 - self.mean) / self.std).transpose(2, 0, 1)
        return batch

    def run(self, batch: np.ndarray) -> np.ndarray:
        """The raw saliency maps, Bxhxw float32, of a preprocessed batch."""
        (maps,) = self.session.run([self.output_name], {self.input_name: batch})
        maps = np.asarray(maps, dtype=np.float32)
        if maps.ndim == 4 and maps.shape[1] == 1:
            maps = maps[:, 0]
        if maps.ndim != 3 or maps.shape[0] != batch.shape[0]:
            raise InvalidInputError(
                f"{self.path}: output {self.output_name!r} has shape {list(maps.shape)}, expected Bx1xHxW "
                "(set mask.output_index to the saliency map)"
            )
        return maps

    def normalise(self, raw: np.ndarray) -> tuple[np.ndarray, float]:
        """A raw map in [0, 1] (sigmoid or min-max, by ``sigmoid``) and its confidence."""
        low, high = float(raw.min()), float(raw.max())
        use_sigmoid = self.sigmoid is True or (self.sigmoid == "auto" and (low < 0.0 or high > 1.0))
        if use_sigmoid:
            prob = 1.0 / (1.0 + np.exp(-np.clip(raw, -60.0, 60.0)))
            return prob.astype(np.float32), map_confidence(prob)
        prob = (raw - low) / max(high - low, 1e-8)
        return prob.astype(np.float32), map_confidence(prob, contrast=min(1.0, high - low))

    def __call__(self, photos: list[np.ndarray]) -> list[tuple[np.ndarray, float]]:
        photos = check_photos(photos)
        results: list[tuple[np.ndarray, float]] = []
        for indices in chunks(range(len(photos)), self.batch_size):
            maps = self.run(self.preprocess([photos[i] for i in indices]))
            for i, raw in zip(indices, maps):
                prob, confidence = self.normalise(raw)
                height, width = photos[i].shape[:2]
                full = np.asarray(Image.fromarray(prob).resize((width, height), Image.Resampling.BILINEAR))
                mask = np.clip(np.rint(full * 255.0), 0, 255).astype(np.uint8)
                results.append((mask, confidence))
        return results
