"""Argument checks shared by several sub-commands."""

from __future__ import annotations

from dreampainter.errors import InvalidInputError

# The --dtype choices of the commands that load a pipeline (the names of torch dtypes).
DTYPES = ("float32", "float16", "bfloat16")


def add_device_arguments(parser, auto: str = "this process's accelerate device") -> None:
    """``--device`` (default ``auto``, described as ``auto``) and ``--dtype`` for the commands that load a pipeline."""
    parser.add_argument("--device", default="auto", help=f"cpu, cuda, cuda:1, ... (default: {auto})")
    parser.add_argument("--dtype", choices=DTYPES, default="float32", help="model dtype (default float32)")


def device_and_dtype(device_arg: str, dtype_arg: str, auto_device: str | None = None):
    """``--device`` / ``--dtype`` -> ``(torch.device, torch.dtype)``; ``auto`` is ``auto_device`` or CUDA if present."""
    import torch

    if device_arg == "auto":
        device_arg = auto_device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(device_arg)
    except RuntimeError as error:
        raise InvalidInputError(f"--device: {error}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise InvalidInputError(f"--device: {device} requested but CUDA is not available")
    dtype = getattr(torch, dtype_arg)
    if dtype == torch.float16 and device.type == "cpu":
        raise InvalidInputError("--dtype: float16 is not supported on the CPU; use float32 or bfloat16")
    return device, dtype
