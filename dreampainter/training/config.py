"""Training configuration: the :class:`TrainConfig` schema, loaded by the one config loader.

``load_config("configs/sd15_stage2.yaml", ["optim.lr=5e-5", "train.max_steps=1000"])`` merges, in
order: the schema defaults, the ``base`` file(s) (paths relative to the file naming them), the file
itself, then the overrides, and returns a typed :class:`TrainConfig` (see
:mod:`dreampainter.utils.config`). Every key must exist in the schema: a typo is an error naming
the key and the file or override it came from.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field

from dreampainter.data.loading.config import LoaderConfig, ReferenceMode
from dreampainter.errors import InvalidInputError
from dreampainter.models.adapter import AdapterConfig
from dreampainter.pipelines.settings import GenerationSettings
from dreampainter.utils import atomic_write_text
from dreampainter.utils.config import Choice, ConfigValueError, check_int, config_to_yaml
from dreampainter.utils.config import load_config as load_schema


class UnetTraining(Choice):
    auto = "auto"  # stage 1: full, stage 2: frozen
    full = "full"
    lora = "lora"
    frozen = "frozen"


class EncoderBackend(Choice):
    open_clip = "open_clip"
    transformers = "transformers"


class Use8bitAdam(Choice):
    auto = "auto"  # when bitsandbytes is installed and a GPU is used
    yes = "yes"
    no = "no"


class LrScheduler(Choice):
    constant = "constant"
    cosine = "cosine"
    linear = "linear"


class MixedPrecision(Choice):
    no = "no"
    fp16 = "fp16"
    bf16 = "bf16"


class ReportTo(Choice):
    wandb = "wandb"
    tensorboard = "tensorboard"
    none = "none"


class WandbMode(Choice):
    offline = "offline"
    online = "online"
    disabled = "disabled"


@dataclass
class RunConfig:
    output_dir: str = "runs/dreampainter"
    seed: int = 0
    stage: int = 2  # 1: product-preserving inpainting (text only), 2: reference control

    def __post_init__(self) -> None:
        if self.stage not in (1, 2):
            raise ConfigValueError("stage", f"must be 1 or 2, got {self.stage}")


@dataclass
class LoraConfig:
    rank: int = 16
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["to_q", "to_k", "to_v", "to_out.0"])


@dataclass
class ReferenceEncoderConfig:
    backend: EncoderBackend = EncoderBackend.open_clip
    model_name: str = "ViT-H-14"  # open_clip architecture name
    path: str | None = None  # open_clip checkpoint file, or transformers folder
    resize_mode: ReferenceMode = ReferenceMode.pad


@dataclass
class AdapterSection(AdapterConfig):
    """The adapter schema of :mod:`dreampainter.models.adapter`, plus what only training needs.

    ``image_embed_dim`` comes from the reference encoder; a value set here must agree with it.
    """

    POSITIVE_FIELDS = tuple(name for name in AdapterConfig.POSITIVE_FIELDS if name != "image_embed_dim")

    image_embed_dim: int | None = None
    init_from: str | None = None  # an IP-Adapter file (.bin/.safetensors) or a DreamPainter adapter folder

    def __post_init__(self) -> None:
        super().__post_init__()
        check_int(self.image_embed_dim, "image_embed_dim", 1, optional=True)

    def adapter_config(self, image_embed_dim: int) -> AdapterConfig:
        """The model's :class:`AdapterConfig` for an encoder whose features are ``image_embed_dim`` wide."""
        if self.image_embed_dim is not None and self.image_embed_dim != image_embed_dim:
            raise InvalidInputError(
                f"model.adapter.image_embed_dim is {self.image_embed_dim} but the reference encoder gives "
                f"{image_embed_dim} features (leave it unset)"
            )
        values = {f.name: getattr(self, f.name) for f in dataclasses.fields(AdapterConfig)}
        return AdapterConfig(**{**values, "image_embed_dim": image_embed_dim})


@dataclass
class ModelConfig:
    pretrained: str = ""  # diffusers SD-inpainting folder or a DreamPainter pipeline folder
    reference_encoder: ReferenceEncoderConfig = field(default_factory=ReferenceEncoderConfig)
    adapter: AdapterSection = field(default_factory=AdapterSection)
    unet_training: UnetTraining = UnetTraining.auto
    lora: LoraConfig = field(default_factory=LoraConfig)


@dataclass
class DataConfig:
    train: str = ""  # folder, index.json, brace pattern or URL(s) of the training shards
    validation: str | None = None  # shards whose first samples make the validation grid
    cache: str | None = None  # a latent cache folder (dreampainter cache-latents): steps run only the UNet
    num_workers: int = 2
    loader: LoaderConfig = field(default_factory=LoaderConfig)


@dataclass
class OptimConfig:
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    weight_decay: float = 1e-2
    eps: float = 1e-8
    use_8bit_adam: Use8bitAdam = Use8bitAdam.auto
    max_grad_norm: float = 1.0
    lr_scheduler: LrScheduler = LrScheduler.constant  # after warmup
    warmup_steps: int = 0

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ConfigValueError("lr", f"must be > 0, got {self.lr}")


@dataclass
class EmaConfig:
    enabled: bool = False
    decay: float = 0.9999


@dataclass
class TrainSection:
    batch_size: int = 4  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int = 1000  # optimizer steps
    mixed_precision: MixedPrecision = MixedPrecision.no
    gradient_checkpointing: bool = False
    allow_tf32: bool = True
    snr_gamma: float | None = None  # min-SNR weighting (e.g. 5.0)
    noise_offset: float = 0.0
    max_consecutive_bad_steps: int = 20  # NaN/inf losses in a row before the run stops
    ema: EmaConfig = field(default_factory=EmaConfig)

    def __post_init__(self) -> None:
        for name in ("batch_size", "gradient_accumulation_steps", "max_steps"):
            if getattr(self, name) < 1:
                raise ConfigValueError(name, f"must be >= 1, got {getattr(self, name)}")


@dataclass
class CheckpointConfig:
    every_steps: int = 500
    keep_last: int = 3
    resume_from_checkpoint: str | None = None  # "latest" or a checkpoint folder


@dataclass
class LoggingConfig:
    report_to: ReportTo = ReportTo.wandb  # wandb runs offline unless wandb_mode says otherwise
    wandb_mode: WandbMode = WandbMode.offline
    project: str = "dreampainter"
    every_steps: int = 10
    sample_keys: bool = False  # write the keys each rank trained on to sample_keys/rank-<i>.txt (debugging)


@dataclass
class ValidationConfig(GenerationSettings):
    """The validation grid: which samples, when, and the generation settings (pipeline keyword names)."""

    every_steps: int = 0  # 0: only at the end
    num_samples: int = 4
    prompts: list[str] = field(default_factory=list)  # override the samples' own prompts
    num_inference_steps: int = 20
    text_guidance_scale: float = 5.0


@dataclass
class TrainConfig:
    run: RunConfig = field(default_factory=RunConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainSection = field(default_factory=TrainSection)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    validation: ValidationConfig = field(default_factory=ValidationConfig)

    def __post_init__(self) -> None:
        if self.model.adapter.reference_mode != "decoupled" and self.train.gradient_checkpointing:
            raise ConfigValueError(
                "train.gradient_checkpointing",
                "is not supported with in-context reference conditioning (the recomputed self-attention "
                "would not see the reference pass)",
                related=("model.adapter.reference_mode",),
            )
        if self.run.stage == 1 and self.model.unet_training == UnetTraining.frozen:
            raise ConfigValueError(
                "model.unet_training", "frozen leaves nothing to train in stage 1", related=("run.stage",)
            )


def load_config(path: str | os.PathLike | None = None, overrides: Sequence[str] | None = None) -> TrainConfig:
    """Schema defaults <- base files <- ``path`` <- ``overrides`` (``key=value`` dot-list), typed."""
    return load_schema(TrainConfig, path, overrides or ())


def unet_training_mode(config: TrainConfig) -> UnetTraining:
    """``full`` / ``lora`` / ``frozen`` with ``auto`` resolved by stage."""
    mode = config.model.unet_training
    if mode == UnetTraining.auto:
        return UnetTraining.full if config.run.stage == 1 else UnetTraining.frozen
    return mode


def save_config(config: TrainConfig, path: str | os.PathLike) -> None:
    """Write the resolved config (YAML that :func:`load_config` reads back) atomically."""
    atomic_write_text(path, config_to_yaml(config))
