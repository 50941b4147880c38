"""Small helpers shared across the package: atomic writes, device and dtype choice, module fingerprints."""

from dreampainter.utils.io import atomic_path, atomic_write_json, atomic_write_text
from dreampainter.utils.torch_utils import (
    TORCH_DTYPES,
    accelerator_available,
    mixed_precision_dtype,
    module_fingerprint,
    use_cpu,
)

__all__ = [
    "TORCH_DTYPES",
    "atomic_path",
    "atomic_write_json",
    "atomic_write_text",
    "accelerator_available",
    "module_fingerprint",
    "use_cpu",
    "mixed_precision_dtype",
]
