"""Training: config loading, the accelerate loop for both stages, checkpoints, validation, outputs.

:func:`train` runs a stage; its pieces (``setup``, ``inputs``, ``step``, ``update``, ``checkpointing``,
``progress``, ``validation``, ``outputs``) are public modules of this package.
"""

from dreampainter.training.config import load_config, save_config
from dreampainter.training.trainer import TrainResult, train
from dreampainter.training.update import TrainingStoppedError

__all__ = ["TrainResult", "TrainingStoppedError", "load_config", "save_config", "train"]
