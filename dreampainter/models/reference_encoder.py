"""The frozen reference-image encoder: CLIP vision via open_clip or transformers, behind one interface.

``ReferenceEncoder(pixel_values)`` returns the global image embedding (``image_embeds``, what IP-Adapter's
linear projection reads) and the penultimate layer's tokens (``hidden_states``, what the IP-Adapter Plus
resampler reads; CLS token included, as in IP-Adapter Plus). ``preprocess`` prepares images at the encoder's resolution and normalisation without
distorting non-square references: ``pad`` to square (default) or ``crop``.

The encoder is a diffusers ``ModelMixin`` so that a pipeline folder saves and loads it offline; its
config holds the architecture, so loading needs no network and no open_clip registry lookup.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from diffusers.utils import BaseOutput
from PIL import Image
from torch import nn

from dreampainter.errors import CheckpointMismatchError, InvalidInputError, require_file
from dreampainter.models.state_dicts import check_state_dict

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
BACKENDS = ("open_clip", "transformers")
RESIZE_MODES = ("pad", "crop")

OPEN_CLIP_HINT = (
    "download the open_clip checkpoint, e.g. ViT-H-14 'open_clip_pytorch_model.bin' from "
    "laion/CLIP-ViT-H-14-laion2B-s32B-b79K, and set its local path in the config"
)
TRANSFORMERS_HINT = (
    "download a CLIPVisionModelWithProjection folder (config.json + model.safetensors), e.g. the "
    "'models/image_encoder' folder of h94/IP-Adapter, and set its local path in the config"
)


@dataclass
class ReferenceEncoderOutput(BaseOutput):
    """``image_embeds``: (B, D) projected global embedding; ``hidden_states``: (B, T, C) penultimate tokens."""

    image_embeds: torch.Tensor
    hidden_states: torch.Tensor


def _to_float_chw(image: Any, index: int) -> torch.Tensor:
    """One image as a float (3, H, W) tensor in [0, 1]."""
    if isinstance(image, Image.Image):
        from dreampainter.data.decode import load_image

        image = torch.from_numpy(np.array(load_image(image), dtype=np.uint8)).permute(2, 0, 1)
    elif isinstance(image, np.ndarray):
        array = image if image.ndim == 3 else np.repeat(image[..., None], 3, axis=-1)
        if array.shape[-1] == 4:
            array = array[..., :3]
        image = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    if not isinstance(image, torch.Tensor):
        raise InvalidInputError(f"reference image {index}: expected a PIL image, array or tensor, got {type(image)}")
    if image.ndim != 3 or image.shape[0] not in (1, 3):
        raise InvalidInputError(f"reference image {index}: expected (3, H, W), got shape {tuple(image.shape)}")
    image = image.expand(3, -1, -1) if image.shape[0] == 1 else image
    return image.float() / 255.0 if image.dtype == torch.uint8 else image.float()


def prepare_reference(
    image: torch.Tensor, size: int, mode: str = "pad", mean=OPENAI_CLIP_MEAN, std=OPENAI_CLIP_STD
) -> torch.Tensor:
    """A (3, H, W) [0, 1] image -> (3, size, size), normalised, without distortion.

    ``pad``: pad the short side symmetrically with the mean colour (normalised value 0), then resize.
    ``crop``: resize the short side to ``size``, then centre-crop (CLIP's own preprocessing).
    """
    if mode not in RESIZE_MODES:
        raise InvalidInputError(f"reference resize mode must be one of {RESIZE_MODES}, got {mode!r}")
    mean_t = torch.tensor(mean, dtype=image.dtype).view(3, 1, 1)
    std_t = torch.tensor(std, dtype=image.dtype).view(3, 1, 1)
    _, height, width = image.shape
    if mode == "pad":
        side = max(height, width)
        top, left = (side - height) // 2, (side - width) // 2
        canvas = mean_t.expand(3, side, side).clone()
        canvas[:, top : top + height, left : left + width] = image
        image = canvas
        new_size = (size, size)
    else:
        scale = size / min(height, width)
        new_size = (max(size, round(height * scale)), max(size, round(width * scale)))
    if tuple(image.shape[1:]) != new_size:
        image = F.interpolate(image[None], size=new_size, mode="bicubic", antialias=True, align_corners=False)[0]
    if mode == "crop":
        top, left = (image.shape[1] - size) // 2, (image.shape[2] - size) // 2
        image = image[:, top : top + size, left : left + size]
    return (image.clamp(0, 1) - mean_t) / std_t


def build_open_clip_vision_tower(embed_dim: int, vision_cfg: dict, quick_gelu: bool = False) -> nn.Module:
    """open_clip's vision tower (``CLIP.visual``) for ``vision_cfg``, built through the public ``open_clip.CLIP``.

    The text tower that ``CLIP`` also builds is a minimal one, discarded at once. Construction runs under a
    forked RNG: the vision tower's random weights are those ``open_clip`` would draw from the current
    state, and the global RNG is left untouched.
    """
    import open_clip

    minimal_text = open_clip.CLIPTextCfg(context_length=2, vocab_size=2, width=8, heads=1, layers=1)
    with torch.random.fork_rng(devices=[]):
        clip = open_clip.CLIP(embed_dim, vision_cfg, minimal_text, quick_gelu=quick_gelu)
    visual = clip.visual
    del clip
    return visual


class ReferenceEncoder(ModelMixin, ConfigMixin):
    """Frozen CLIP vision tower (open_clip or transformers) returning global and penultimate features."""

    config_name = "config.json"

    @register_to_config
    def __init__(
        self,
        backend: str = "transformers",
        model_config: dict | None = None,
        image_size: int = 224,
        image_mean: tuple = OPENAI_CLIP_MEAN,
        image_std: tuple = OPENAI_CLIP_STD,
        resize_mode: str = "pad",
    ):
        super().__init__()
        if backend not in BACKENDS:
            raise InvalidInputError(f"reference encoder backend must be one of {BACKENDS}, got {backend!r}")
        if resize_mode not in RESIZE_MODES:
            raise InvalidInputError(f"reference resize_mode must be one of {RESIZE_MODES}, got {resize_mode!r}")
        if model_config is None:
            raise InvalidInputError("reference encoder needs a model_config (use from_open_clip / from_transformers)")
        if backend == "transformers":
            from transformers import CLIPVisionConfig, CLIPVisionModelWithProjection

            self.model = CLIPVisionModelWithProjection(CLIPVisionConfig(**model_config))
        else:
            self.model = build_open_clip_vision_tower(
                model_config["embed_dim"], model_config["vision_cfg"], quick_gelu=model_config.get("quick_gelu", False)
            )
        self.requires_grad_(False)
        self.eval()

    # ----------------------------------------------------------------- construction from real weights
    @classmethod
    def from_open_clip(
        cls, model_name: str, pretrained: str | os.PathLike, *, resize_mode: str = "pad"
    ) -> ReferenceEncoder:
        """Build from an open_clip model name (e.g. ``"ViT-H-14"``) and a local checkpoint file."""
        import open_clip
        from open_clip.factory import load_state_dict

        require_file(pretrained, f"open_clip weights for {model_name}", OPEN_CLIP_HINT)
        model_cfg = open_clip.get_model_config(model_name)
        if model_cfg is None:
            raise InvalidInputError(f"unknown open_clip model name {model_name!r} (see open_clip.list_models())")
        vision_cfg = dict(model_cfg["vision_cfg"])
        if vision_cfg.get("timm_model_name"):
            raise InvalidInputError(f"open_clip model {model_name!r} has a timm vision tower; only ViT towers are supported")
        image_size = vision_cfg.get("image_size", 224)
        image_size = image_size[0] if isinstance(image_size, (list, tuple)) else image_size
        preprocess = model_cfg.get("preprocess_cfg", {})
        encoder = cls(
            backend="open_clip",
            model_config={
                "embed_dim": model_cfg["embed_dim"],
                "vision_cfg": vision_cfg,
                "quick_gelu": bool(model_cfg.get("quick_gelu", False)),
            },
            image_size=int(image_size),
            image_mean=tuple(preprocess.get("mean", OPENAI_CLIP_MEAN)),
            image_std=tuple(preprocess.get("std", OPENAI_CLIP_STD)),
            resize_mode=resize_mode,
        )
        try:
            state = load_state_dict(str(pretrained), weights_only=True)
        except Exception as error:  # noqa: BLE001 - any unreadable file is the user's to fix
            raise InvalidInputError(f"{pretrained}: cannot read open_clip checkpoint ({error})") from None
        visual = {k.removeprefix("visual."): v for k, v in state.items() if k.startswith("visual.")}
        if not visual:
            raise CheckpointMismatchError(f"{pretrained}: no 'visual.*' weights in this file; is it an open_clip CLIP checkpoint?")
        _load_exact(encoder.model, visual, source=str(pretrained))
        return encoder

    @classmethod
    def from_transformers(cls, folder: str | os.PathLike, *, resize_mode: str = "pad") -> ReferenceEncoder:
        """Build from a local ``CLIPVisionModelWithProjection`` folder (config.json + weights)."""
        from transformers import CLIPVisionModelWithProjection

        folder = Path(folder)
        require_file(folder / "config.json", "CLIP vision config", TRANSFORMERS_HINT)
        try:
            model = CLIPVisionModelWithProjection.from_pretrained(str(folder), local_files_only=True)
        except (OSError, ValueError) as error:
            raise InvalidInputError(f"{folder}: cannot load CLIPVisionModelWithProjection ({error})") from None
        mean, std = OPENAI_CLIP_MEAN, OPENAI_CLIP_STD
        processor_file = folder / "preprocessor_config.json"
        if processor_file.exists():
            processor = json.loads(processor_file.read_text())
            mean, std = processor.get("image_mean", mean), processor.get("image_std", std)
        config = model.config.to_dict()
        encoder = cls(
            backend="transformers",
            model_config={k: v for k, v in config.items() if k not in ("architectures", "transformers_version")},
            image_size=int(model.config.image_size),
            image_mean=tuple(mean),
            image_std=tuple(std),
            resize_mode=resize_mode,
        )
        _load_exact(encoder.model, model.state_dict(), source=str(folder))
        return encoder

    # ----------------------------------------------------------------- features
    @property
    def image_embed_dim(self) -> int:
        """Size of ``image_embeds`` (what a ``linear`` projection reads)."""
        if self.config.backend == "transformers":
            return self.model.config.projection_dim
        return self.config.model_config["embed_dim"]

    @property
    def hidden_size(self) -> int:
        """Size of the penultimate tokens (what a ``resampler`` reads)."""
        if self.config.backend == "transformers":
            return self.model.config.hidden_size
        return self.config.model_config["vision_cfg"]["width"]

    def feature_dim(self, feature_type: str) -> int:
        return self.image_embed_dim if feature_type == "global" else self.hidden_size

    def preprocess(self, images: Any) -> torch.Tensor:
        """PIL image(s), HxWx3 uint8 array(s) or a (B, 3, H, W) / (3, H, W) [0, 1] tensor -> pixel_values."""
        if isinstance(images, torch.Tensor) and images.ndim == 4:
            images = list(images)
        elif not isinstance(images, (list, tuple)):
            images = [images]
        if not images:
            raise InvalidInputError("reference images: got an empty list")
        c = self.config
        prepared = [
            prepare_reference(_to_float_chw(image, i), c.image_size, c.resize_mode, c.image_mean, c.image_std)
            for i, image in enumerate(images)
        ]
        return torch.stack(prepared).to(device=self.device, dtype=self.dtype)

    def forward(self, pixel_values: torch.Tensor) -> ReferenceEncoderOutput:
        pixel_values = pixel_values.to(device=self.device, dtype=self.dtype)
        if self.config.backend == "transformers":
            out = self.model(pixel_values=pixel_values, output_hidden_states=True)
            return ReferenceEncoderOutput(image_embeds=out.image_embeds, hidden_states=out.hidden_states[-2])
        return self._forward_open_clip(pixel_values)

    def _forward_open_clip(self, pixel_values: torch.Tensor) -> ReferenceEncoderOutput:
        captured = {}
        transformer = self.model.transformer

        def hook(_module, _inputs, output):
            captured["tokens"] = output if getattr(transformer, "batch_first", False) else output.transpose(0, 1)

        handle = transformer.resblocks[-2].register_forward_hook(hook)
        try:
            pooled = self.model(pixel_values)
        finally:
            handle.remove()
        pooled = pooled[0] if isinstance(pooled, tuple) else pooled
        return ReferenceEncoderOutput(image_embeds=pooled, hidden_states=captured["tokens"])

    @torch.no_grad()
    def encode(self, images: Any) -> ReferenceEncoderOutput:
        """``preprocess`` + forward, without gradients."""
        return self(self.preprocess(images))


def _load_exact(module: torch.nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load ``state`` into ``module`` requiring the same keys and shapes; errors name key and shapes."""
    check_state_dict(module.state_dict(), state, source)
    module.load_state_dict(state, strict=True)
