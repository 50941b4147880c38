"""Metric backbones, each loaded from a local weights file named in the config (never downloaded).

| backbone  | loader                | file                                                          |
| --------- | --------------------- | ------------------------------------------------------------- |
| inception | :func:`load_inception` | torch-fidelity's ``weights-inception-2015-12-05-6726825d.pth`` |
| clip      | :func:`load_clip`      | an open_clip checkpoint for the named model                   |
| dino      | :func:`load_dino`      | a timm ViT state dict (e.g. ``vit_small_patch16_224.dino``)   |
| lpips     | :func:`load_lpips`     | torchvision's ImageNet trunk (e.g. ``alexnet-owt-7be5be79.pth``) |

A missing file raises :class:`MissingFileError` naming it and where to get it; a file that does
not fit the architecture raises :class:`CheckpointMismatchError`.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import nn
from tqdm.auto import tqdm

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, require_file

INCEPTION_HINT = (
    "get weights-inception-2015-12-05-6726825d.pth from the torch-fidelity v0.2.0 GitHub release "
    "(the TF FID Inception converted to PyTorch), see docs/evaluation.md"
)
CLIP_HINT = (
    "get the open_clip checkpoint of this model, e.g. open_clip_model.safetensors from the "
    "timm/vit_large_patch14_clip_224.openai Hugging Face repo for ViT-L-14-quickgelu, see docs/evaluation.md"
)
DINO_HINT = "get model.safetensors from the timm/vit_small_patch16_224.dino Hugging Face repo (or FAIR's dino_deitsmall16_pretrain.pth), see docs/evaluation.md"
LPIPS_HINT = "get torchvision's ImageNet weights for the LPIPS trunk (alex: alexnet-owt-7be5be79.pth), see docs/evaluation.md"


def read_state_dict(path: str | os.PathLike, what: str, hint: str) -> dict[str, torch.Tensor]:
    """Load a tensor state dict from ``.safetensors`` or a pickle read with ``weights_only=True``.

    Unwraps the usual containers (``state_dict``, ``model``, ``teacher``) so that training
    checkpoints of the reference repositories load as they are.
    """
    require_file(path, what, hint)
    path = os.fspath(path)
    if path.endswith(".safetensors"):
        from safetensors.torch import load_file

        return load_file(path)
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt file or one that holds arbitrary pickled objects
        raise CheckpointMismatchError(
            f"{what}: cannot read {path} as a tensor state dict ({_one_line(error)})"
        ) from None
    for container in ("state_dict", "model", "teacher"):
        if isinstance(state, dict) and isinstance(state.get(container), dict):
            state = state[container]
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise CheckpointMismatchError(f"{what}: {path} does not hold a tensor state dict")
    return state


def _one_line(error: BaseException, limit: int = 300) -> str:
    """An exception's message on one line, shortened (errors are printed as one line by the CLI)."""
    text = " ".join(str(error).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _to_pil(image: np.ndarray) -> Image.Image:
    return Image.fromarray(np.asarray(image, dtype=np.uint8))


@torch.no_grad()
def encode_in_chunks(
    images: Sequence[Any],
    encode,
    batch_size: int = 32,
    desc: str = "features",
    progress: bool = True,
) -> torch.Tensor:
    """Run ``encode`` over ``images`` in chunks with a progress bar; returns the concatenated rows."""
    outputs = []
    starts = range(0, len(images), batch_size)
    for start in tqdm(starts, desc=desc, unit="batch", disable=not progress or len(starts) <= 1, leave=False):
        outputs.append(encode(images[start : start + batch_size]).float().cpu())
    if not outputs:
        raise InvalidInputError(f"{desc}: no images to encode")
    return torch.cat(outputs)


# --------------------------------------------------------------------------- Inception (FID, KID)


class ImageFeatureExtractor(nn.Module):
    """Turns a list of uint8 ``HxWx3`` images into an ``(N, D)`` feature matrix.

    Wraps any module that takes a uint8 ``NCHW`` batch and returns ``(N, D)`` features, e.g.
    torchmetrics' FID Inception (which resizes to 299 inside) or a tiny network for tests and
    the toy demo. With ``input_size`` set, images are first resized (bicubic) to that square.
    """

    def __init__(self, module: nn.Module, name: str, input_size: int | None = None) -> None:
        super().__init__()
        self.module = module.eval()
        self.name = name
        self.input_size = input_size

    @property
    def device(self) -> torch.device:
        parameter = next(self.module.parameters(), None)
        return parameter.device if parameter is not None else torch.device("cpu")

    @torch.no_grad()
    def forward(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """Features of each image; images of different sizes go through the module in separate
        groups, so an image's features never depend on which others share its batch."""
        if self.input_size is not None:
            size = (self.input_size, self.input_size)
            images = [np.asarray(_to_pil(image).resize(size, Image.BICUBIC)) for image in images]
        groups: dict[tuple[int, ...], list[int]] = {}
        for index, image in enumerate(images):
            groups.setdefault(image.shape, []).append(index)
        rows: list[torch.Tensor | None] = [None] * len(images)
        for indices in groups.values():
            batch = torch.from_numpy(np.stack([images[i] for i in indices])).permute(0, 3, 1, 2)
            features = self.module(batch.contiguous().to(self.device)).reshape(len(indices), -1)
            for index, row in zip(indices, features):
                rows[index] = row
        return torch.stack(rows)

    def extract(
        self, images: Sequence[np.ndarray], batch_size: int = 32, progress: bool = True
    ) -> np.ndarray:
        rows = encode_in_chunks(images, self, batch_size, desc=f"{self.name} features", progress=progress)
        return rows.double().numpy()


def load_inception(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageFeatureExtractor:
    """The FID Inception-v3 (2048-d pool features) of torchmetrics/torch-fidelity, from a local file."""
    state = read_state_dict(path, "FID Inception weights", INCEPTION_HINT)  # checked safe before the
    del state  # torch-fidelity loader below unpickles the same file without weights_only
    try:
        from torchmetrics.image.fid import NoTrainInceptionV3
    except ImportError as error:  # pragma: no cover - torchmetrics is a core dependency
        raise ModuleNotFoundError(f"FID Inception needs torchmetrics ({_one_line(error)})") from None
    try:
        module = NoTrainInceptionV3(
            name="inception-v3-compat", features_list=["2048"], feature_extractor_weights_path=os.fspath(path)
        )
    except RuntimeError as error:
        raise CheckpointMismatchError(
            f"FID Inception weights {path} do not fit Inception-v3 ({_one_line(error)})"
        ) from None
    return ImageFeatureExtractor(module.to(device), name="inception")


def load_torchscript_features(path: str | os.PathLike, device: str | torch.device = "cpu") -> ImageFeatureExtractor:
    """A TorchScript feature extractor (uint8 ``NCHW`` images -> ``(N, D)``) for FID/KID, from a local file.

    ``torch.jit.load`` runs no pickled Python code, so any scripted extractor can be used.
    """
    require_file(path, "TorchScript feature extractor (evaluation.backbones.inception.path)", INCEPTION_HINT)
    try:
        module = torch.jit.load(os.fspath(path), map_location=device)
    except RuntimeError as error:
        raise CheckpointMismatchError(f"{path}: not a TorchScript file ({_one_line(error)})") from None
    return ImageFeatureExtractor(module.eval(), name=f"torchscript:{Path(path).name}")


# --------------------------------------------------------------------------- CLIP (CLIP-T, CLIP-I)


@dataclass
class _ImageBackbone:
    """A frozen image model with its eval transform; subclasses say how pixels become features."""

    model: nn.Module
    transform: Any
    name: str

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model(pixels)

    def encode_images(
        self, images: Sequence[np.ndarray], batch_size: int = 32, progress: bool = True
    ) -> torch.Tensor:
        def encode(chunk):
            pixels = torch.stack([self.transform(_to_pil(image)) for image in chunk]).to(self.device)
            return self._features(pixels)

        return encode_in_chunks(
            images, encode, batch_size, desc=f"{self.name} image features", progress=progress
        )


@dataclass
class ClipBackbone(_ImageBackbone):
    """An open_clip model with its eval transform (``preprocess``) and tokenizer."""

    tokenizer: Any = None

    @property
    def preprocess(self) -> Any:
        return self.transform

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.model.encode_image(pixels)

    def encode_texts(self, texts: Sequence[str], batch_size: int = 64, progress: bool = True) -> torch.Tensor:
        def encode(chunk):
            return self.model.encode_text(self.tokenizer(list(chunk)).to(self.device))

        return encode_in_chunks(
            texts, encode, batch_size, desc=f"{self.name} text features", progress=progress
        )


def load_clip(
    model_name: str,
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model_config: str | os.PathLike | None = None,
) -> ClipBackbone:
    """``open_clip.create_model_and_transforms(model_name, pretrained=path)`` from a local checkpoint.

    ``model_config``: an open_clip JSON model config (``<model_name>.json``) for an architecture that
    open_clip does not ship; it is registered before the model is built.
    """
    require_file(path, f"CLIP weights for open_clip model {model_name!r}", CLIP_HINT)
    import open_clip

    if model_config is not None:
        require_file(model_config, "evaluation.backbones.clip.model_config (open_clip JSON model config)")
        if Path(model_config).stem != model_name:
            raise InvalidInputError(
                f"evaluation.backbones.clip.model_config: open_clip names a model after its config file, "
                f"so {model_config} defines {Path(model_config).stem!r}, not {model_name!r}"
            )
        open_clip.add_model_config(os.fspath(model_config))
    if model_name not in open_clip.list_models():
        raise InvalidInputError(
            f"evaluation.backbones.clip.model: unknown open_clip model {model_name!r} "
            "(for a custom architecture, set evaluation.backbones.clip.model_config to its JSON config)"
        )
    try:
        model, _, preprocess = open_clip.create_model_and_transforms(model_name, pretrained=os.fspath(path))
    except (RuntimeError, AssertionError, KeyError, ValueError) as error:
        raise CheckpointMismatchError(
            f"CLIP weights {path} do not fit open_clip {model_name!r} ({_one_line(error)})"
        ) from None
    tokenizer = open_clip.get_tokenizer(model_name)
    return ClipBackbone(model.to(device).eval(), preprocess, name=f"clip:{model_name}", tokenizer=tokenizer)


# --------------------------------------------------------------------------- DINO


class DinoBackbone(_ImageBackbone):
    """A timm ViT whose pooled output is the (normed) CLS token, with timm's eval transform."""


_DINO_PREFIXES = re.compile(r"^(module\.|backbone\.|teacher\.|student\.)+")


def load_dino(
    arch: str,
    path: str | os.PathLike,
    device: str | torch.device = "cpu",
    model_kwargs: dict | None = None,
) -> DinoBackbone:
    """A timm ViT (``arch``, e.g. ``vit_small_patch16_224.dino``) with a local state dict.

    ``model_kwargs`` are passed to ``timm.create_model`` (only needed for non-standard sizes).
    Accepts timm's ``model.safetensors`` and FAIR's DINO ``.pth`` files (``teacher``/``backbone``
    prefixes are stripped); the classifier head, if any, is ignored.
    """
    state = read_state_dict(path, f"DINO weights for timm {arch!r}", DINO_HINT)
    import timm
    from timm.data import create_transform, resolve_data_config

    try:
        model = timm.create_model(arch, pretrained=False, num_classes=0, **(model_kwargs or {}))
    except RuntimeError as error:
        raise InvalidInputError(
            f"evaluation.backbones.dino.arch: cannot build timm model {arch!r} ({_one_line(error)})"
        ) from None
    state = {
        _DINO_PREFIXES.sub("", key): value for key, value in state.items() if not key.startswith("head.")
    }
    try:
        from timm.models.vision_transformer import checkpoint_filter_fn

        state = checkpoint_filter_fn(state, model)  # e.g. resamples position embeddings
        missing, unexpected = model.load_state_dict(state, strict=False)
    except (RuntimeError, ValueError, KeyError) as error:  # tensors of other shapes
        raise CheckpointMismatchError(
            f"DINO weights {path} do not fit timm {arch!r} ({_one_line(error)})"
        ) from None
    if missing or unexpected:
        raise CheckpointMismatchError(
            f"DINO weights {path} do not fit timm {arch!r}: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    config = resolve_data_config({}, model=model)
    image_size = getattr(getattr(model, "patch_embed", None), "img_size", None)
    if image_size is not None:
        config["input_size"] = (3, *image_size)
    return DinoBackbone(model.to(device).eval(), create_transform(**config), name=f"dino:{arch}")


# --------------------------------------------------------------------------- LPIPS

_LPIPS_TRUNK_KEY = re.compile(r"^net\.slice\d+\.(\d+)\.(.+)$")


def load_lpips(net: str, path: str | os.PathLike, device: str | torch.device = "cpu") -> nn.Module:
    """An ``lpips.LPIPS`` (spatial) whose ImageNet trunk comes from a local torchvision state dict.

    The calibrated linear layers ship inside the lpips package; only the trunk (torchvision's
    ``features.*`` weights of alexnet / vgg16 / squeezenet1_1) is read from ``path``.
    """
    import warnings

    try:
        import lpips
    except ImportError as error:
        raise ModuleNotFoundError(
            f"LPIPS needs the lpips package: pip install lpips ({_one_line(error)})"
        ) from None
    if net not in ("alex", "vgg", "squeeze"):
        raise InvalidInputError(f"evaluation.backbones.lpips.net: expected alex, vgg or squeeze, got {net!r}")
    trunk = read_state_dict(path, f"LPIPS {net} trunk weights", LPIPS_HINT)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torchvision's deprecated `pretrained=` in lpips
        model = lpips.LPIPS(net=net, pnet_rand=True, spatial=True, verbose=False)
    state = model.state_dict()
    missing = []
    for key in state:
        match = _LPIPS_TRUNK_KEY.match(key)
        if match is None:
            continue
        source = f"features.{match.group(1)}.{match.group(2)}"
        if source not in trunk or trunk[source].shape != state[key].shape:
            missing.append(source)
        else:
            state[key] = trunk[source]
    if missing:
        raise CheckpointMismatchError(f"LPIPS {net} trunk weights {path} lack or misshape {missing[:5]}")
    model.load_state_dict(state)
    return model.to(device).eval()


__all__ = [
    "ClipBackbone",
    "DinoBackbone",
    "ImageFeatureExtractor",
    "encode_in_chunks",
    "load_clip",
    "load_dino",
    "load_inception",
    "load_lpips",
    "read_state_dict",
]
