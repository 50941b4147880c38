"""Device, dtype and identity helpers for torch modules."""

from __future__ import annotations

import hashlib
import json
import os

import torch

MIXED_PRECISION_DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# torch dtypes by their names, as configs spell them (``float32`` / ``float16`` / ``bfloat16``).
TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def accelerator_available() -> bool:
    """Whether torch sees any accelerator (CUDA, ROCm, XPU, MPS, ...)."""
    api = getattr(torch, "accelerator", None)
    if api is not None and hasattr(api, "is_available"):
        return api.is_available()
    return torch.cuda.is_available()


def use_cpu() -> bool:
    """Whether processes started by ``accelerate launch`` / torchrun should run on the CPU (gloo).

    True without an accelerator, or when accelerate was told ``--cpu`` (it sets ``ACCELERATE_USE_CPU``).
    """
    forced = os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    return forced or not accelerator_available()


def mixed_precision_dtype(mixed_precision: str) -> torch.dtype:
    """The dtype frozen weights run in under accelerate's ``mixed_precision`` (``no`` / ``fp16`` / ``bf16``)."""
    return MIXED_PRECISION_DTYPES.get(str(mixed_precision), torch.float32)


def module_fingerprint(module: torch.nn.Module, length: int | None = None) -> str:
    """sha256 of a module's config and of every parameter and buffer (as float32 values).

    Two modules with the same architecture and the same weights have the same fingerprint, whatever
    the device; caches of what a module computed (latents, metric features) are keyed by it.
    ``length`` truncates the hex digest (e.g. for file names).
    """
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = config.to_dict() if hasattr(config, "to_dict") else dict(config)
        as_dict = {k: v for k, v in as_dict.items() if not k.startswith("_") and k != "transformers_version"}
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in module.state_dict().items():
        array = tensor.detach().to(device="cpu", dtype=torch.float32).contiguous().numpy()
        digest.update(f"{name}:{tuple(array.shape)}".encode())
        digest.update(array.data)
    return digest.hexdigest()[:length]
