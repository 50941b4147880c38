"""Tiny randomly initialised metric backbones, written in the real on-disk formats.

Tests and the CPU toy demo save these to a folder and then load them through the real loaders
in :mod:`dreampainter.evaluation.backbones`, so the loading code is exercised without downloads.
Scores computed with random backbones are only meaningful relative to each other (e.g. true vs
shuffled reference), never as absolute numbers.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

TINY_CLIP_NAME = "dreampainter-tiny-clip"
TINY_CLIP_CONFIG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 32, "head_width": 16, "patch_size": 8},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_DINO_ARCH = "vit_small_patch16_224.dino"
TINY_DINO_KWARGS = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}

_registered_folder: Path | None = None


def register_tiny_clip() -> str:
    """Register the tiny open_clip config under :data:`TINY_CLIP_NAME` (idempotent); returns the name."""
    global _registered_folder
    import open_clip

    if TINY_CLIP_NAME not in open_clip.list_models():
        _registered_folder = Path(tempfile.mkdtemp(prefix="dreampainter-open-clip-"))
        (_registered_folder / f"{TINY_CLIP_NAME}.json").write_text(json.dumps(TINY_CLIP_CONFIG))
        open_clip.add_model_config(_registered_folder)
    return TINY_CLIP_NAME


def save_tiny_clip(path: str | os.PathLike, seed: int = 0) -> str:
    """Save a random tiny open_clip CLIP state dict with ``torch.save``; returns its model name."""
    import open_clip

    name = register_tiny_clip()
    torch.manual_seed(seed)
    model = open_clip.create_model(name)
    torch.save(model.state_dict(), path)
    return name


def save_tiny_dino(path: str | os.PathLike, seed: int = 0) -> tuple[str, dict]:
    """Save a random tiny timm ViT as safetensors; returns ``(arch, model_kwargs)`` for :func:`load_dino`."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(TINY_DINO_ARCH, pretrained=False, num_classes=0, **TINY_DINO_KWARGS)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, os.fspath(path))
    return TINY_DINO_ARCH, dict(TINY_DINO_KWARGS)


def save_random_inception(path: str | os.PathLike, seed: int = 0) -> None:
    """Save a randomly initialised FID Inception-v3 (same keys and shapes as torch-fidelity's file).

    The architecture is fixed, so this one is full size (~95 MB, a few seconds per image batch on CPU).
    """
    import torchvision

    torch.manual_seed(seed)
    model = torchvision.models.inception_v3(
        weights=None, aux_logits=False, num_classes=1008, init_weights=True
    )
    torch.save(model.state_dict(), path)


def save_random_lpips_trunk(path: str | os.PathLike, net: str = "alex", seed: int = 0) -> None:
    """Save a random torchvision trunk (only its ``features.*`` tensors, which is all LPIPS reads)."""
    import torchvision

    builders = {"alex": torchvision.models.alexnet, "vgg": torchvision.models.vgg16}
    torch.manual_seed(seed)
    model = builders[net](weights=None)
    torch.save({k: v for k, v in model.state_dict().items() if k.startswith("features.")}, path)


class TinyFeatureNet(nn.Module):
    """A small fixed random conv net: uint8 ``NCHW`` images -> ``(N, features)``, for toy FID/KID."""

    def __init__(self, features: int = 16, seed: int = 0) -> None:
        super().__init__()
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(seed)
        self.body = nn.Sequential(
            nn.Conv2d(3, 16, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(16, features, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.AdaptiveAvgPool2d(1),
            nn.Flatten(),
        )
        torch.random.set_rng_state(generator_state)
        self.num_features = features

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.body(images.float() / 127.5 - 1.0)


def save_tiny_features(path: str | os.PathLike, seed: int = 0) -> None:
    """Save :class:`TinyFeatureNet` as TorchScript (``inception: {kind: torchscript, path: ...}``)."""
    torch.jit.script(TinyFeatureNet(seed=seed)).save(os.fspath(path))


def write_tiny_backbones(folder: str | os.PathLike, seed: int = 0) -> dict[str, dict]:
    """Write tiny feature-net, CLIP (+ its open_clip config), DINO and LPIPS-trunk files to ``folder``;
    return the ``evaluation.backbones`` config that loads them.

    For toy runs and tests only: these scores are not comparable with published numbers.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    save_tiny_features(folder / "tiny_features.pt", seed=seed)
    clip_config = folder / f"{TINY_CLIP_NAME}.json"
    clip_config.write_text(json.dumps(TINY_CLIP_CONFIG))
    clip_name = save_tiny_clip(folder / "tiny_clip.bin", seed=seed)
    arch, kwargs = save_tiny_dino(folder / "tiny_dino.safetensors", seed=seed)
    save_random_lpips_trunk(folder / "random_alexnet_features.pth", "alex", seed=seed)
    return {
        "inception": {"kind": "torchscript", "path": str(folder / "tiny_features.pt")},
        "clip": {"model": clip_name, "path": str(folder / "tiny_clip.bin"), "model_config": str(clip_config)},
        "dino": {"arch": arch, "path": str(folder / "tiny_dino.safetensors"), "model_kwargs": kwargs},
        "lpips": {"net": "alex", "path": str(folder / "random_alexnet_features.pth")},
    }
