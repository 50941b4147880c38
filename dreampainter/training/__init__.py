"""Training: config loading, the accelerate loop for both stages, checkpoints, validation, outputs."""

from dreampainter.training.config import load_config, save_config
from dreampainter.training.trainer import TrainingStoppedError, TrainResult, train

__all__ = ["TrainResult", "TrainingStoppedError", "load_config", "save_config", "train"]
