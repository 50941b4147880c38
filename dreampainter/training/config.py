"""Training configuration: OmegaConf YAML with an optional ``base`` file, dot-list overrides, a schema.

``load_config("configs/sd15_stage2.yaml", ["optim.lr=5e-5", "train.max_steps=1000"])`` merges, in
order: the schema defaults, the ``base`` file(s) (paths relative to the file naming them), the file
itself, then the overrides. Every key must exist in the schema: a typo is an error naming the key.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import ConfigAttributeError, ConfigKeyError, OmegaConfBaseException

from dreampainter.errors import InvalidInputError, MissingFileError
from dreampainter.utils import atomic_write_text


@dataclass
class RunConfig:
    output_dir: str = "runs/dreampainter"
    seed: int = 0
    stage: int = 2  # 1: product-preserving inpainting (text only), 2: reference control


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ReferenceEncoderConfig:
    backend: str = "open_clip"  # "open_clip" | "transformers"
    model_name: str = "ViT-H-14"  # open_clip architecture name
    path: str | None = None  # open_clip checkpoint file, or transformers folder
    resize_mode: str = "pad"  # "pad" | "crop"


@dataclass
class AdapterSection:
    projection: str = "linear"
    num_tokens: int = 4
    scale: float = 1.0
    resampler_dim: int | None = None
    resampler_depth: int = 4
    resampler_heads: int = 12
    resampler_dim_head: int = 64
    resampler_ff_mult: int = 4
    init_from: str | None = None  # an IP-Adapter file (.bin/.safetensors) or a DreamPainter adapter folder


@dataclass
class ModelConfig:
    pretrained: str = ""  # diffusers SD-inpainting folder or a DreamPainter pipeline folder
    reference_encoder: ReferenceEncoderConfig = field(default_factory=ReferenceEncoderConfig)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    unet_training: str = "auto"  # "full" | "lora" | "frozen"; auto: stage 1 full, stage 2 frozen
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = ""  # folder, index.json, brace pattern or URL(s) of the training shards
    validation: str | None = None  # shards whose first samples make the validation grid
    cache: str | None = None  # a latent cache folder (dreampainter cache-latents): steps run only the UNet
    num_workers: int = 2
    loader: dict[str, Any] = field(default_factory=dict)  # dreampainter.data.loading.loader.LoaderConfig fields


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    use_8bit_adam: str = "auto"  # "auto": when bitsandbytes is installed and a GPU is used | "yes" | "no"
    max_grad_norm: float = 1.0
    lr_scheduler: str = "constant"  # "constant" | "cosine" | "linear" (after warmup)
    warmup_steps: int = 0


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass
class TrainSection:
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    snr_gamma: float | None = None  # min-SNR weighting (e.g. 5.0)
    noise_offset: float = 0.0
    max_consecutive_bad_steps: int = 20  # NaN/inf losses in a row before the run stops
    ema: EmaConfig = field(default_factory=EmaConfig)


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder


@dataclass
class LoggingConfig:
    report_to: str = "wandb"  # "wandb" (offline unless wandb_mode says otherwise) | "tensorboard" | "none"
    wandb_mode: str = "offline"  # "offline" | "online" | "disabled"
    project: str = "dreampainter"
    every_steps: int = 10
    sample_keys: bool = False  # write the keys each rank trained on to sample_keys/rank-<i>.txt (debugging)


@dataclass
class ValidationConfig:
    every_steps: int = 0  # 0: only at the end
    num_samples: int = 4
    prompts: list[str] = field(default_factory=list)  # override the samples' own prompts
    num_inference_steps: int = 20
    text_guidance_scale: float = 5.0
    reference_guidance_scale: float | None = None
    seed: int = 0


@dataclass
class TrainConfig:
    base: str | None = None
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)


def _read_yaml(path: Path, seen: tuple[Path, ...] = ()) -> list[DictConfig]:
    """The chain of YAML files from the deepest ``base`` to ``path``."""
    path = path.resolve()
    if path in seen:
        raise InvalidInputError(f"{path}: circular 'base' chain")
    if not path.exists():
        raise MissingFileError(f"config file not found: {path}")
    try:
        node = OmegaConf.load(path)
    except Exception as error:  # noqa: BLE001 - YAML syntax errors come in several types
        raise InvalidInputError(f"{path}: cannot parse YAML ({error})") from None
    if not isinstance(node, DictConfig):
        raise InvalidInputError(f"{path}: a config file must be a mapping")
    chain = []
    if node.get("base"):
        chain = _read_yaml((path.parent / str(node.base)), (*seen, path))
    return [*chain, node]


def _merge(schema: DictConfig, node: DictConfig, source: str) -> DictConfig:
    try:
        return OmegaConf.merge(schema, node)
    except (ConfigKeyError, ConfigAttributeError) as error:
        raise InvalidInputError(f"{source}: unknown config key '{error.full_key}'") from None
    except OmegaConfBaseException as error:
        key = getattr(error, "full_key", None) or "?"
        message = str(getattr(error, "msg", error)).splitlines()[0]
        raise InvalidInputError(f"{source}: bad value for '{key}' ({message})") from None


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> DictConfig:
    """Schema defaults <- base files <- ``path`` <- ``overrides`` (``key=value`` dot-list)."""
    config = OmegaConf.structured(TrainConfig)
    if path is not None:
        for node in _read_yaml(Path(path)):
            config = _merge(config, node, str(path))
    for override in overrides or []:
        if "=" not in override:
            raise InvalidInputError(f"override {override!r} must look like key=value (e.g. optim.lr=1e-4)")
        config = _merge(config, OmegaConf.from_dotlist([override]), f"override {override!r}")
    validate_config(config)
    return config


CHOICES = {
    "model.unet_training": ("auto", "full", "lora", "frozen"),
    "model.reference_encoder.backend": ("open_clip", "transformers"),
    "optim.lr_scheduler": ("constant", "cosine", "linear"),
    "optim.use_8bit_adam": ("auto", "yes", "no"),
    "train.mixed_precision": ("no", "fp16", "bf16"),
    "logging.report_to": ("wandb", "tensorboard", "none"),
    "logging.wandb_mode": ("offline", "online", "disabled"),
}


def validate_config(config: DictConfig) -> None:
    """Value checks the schema's types cannot express; each error names the key."""
    for key, choices in CHOICES.items():
        value = OmegaConf.select(config, key)
        if value not in choices:
            raise InvalidInputError(f"config {key} must be one of {choices}, got {value!r}")
    if config.run.stage not in (1, 2):
        raise InvalidInputError(f"config run.stage must be 1 or 2, got {config.run.stage}")
    for key in ("train.batch_size", "train.gradient_accumulation_steps", "train.max_steps"):
        if OmegaConf.select(config, key) < 1:
            raise InvalidInputError(f"config {key} must be >= 1, got {OmegaConf.select(config, key)}")
    if config.optim.lr <= 0:
        raise InvalidInputError(f"config optim.lr must be > 0, got {config.optim.lr}")
    from dreampainter.data.loading.loader import LoaderConfig

    LoaderConfig.from_dict(OmegaConf.to_container(config.data.loader, resolve=True))
    if config.run.stage == 1 and config.model.unet_training == "frozen":
        raise InvalidInputError("config model.unet_training=frozen leaves nothing to train in stage 1")


def unet_training_mode(config: DictConfig) -> str:
    """``full`` / ``lora`` / ``frozen`` with ``auto`` resolved by stage."""
    mode = config.model.unet_training
    if mode == "auto":
        return "full" if config.run.stage == 1 else "frozen"
    return mode


def save_config(config: DictConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (YAML) atomically."""
    atomic_write_text(path, OmegaConf.to_yaml(config, resolve=True))
