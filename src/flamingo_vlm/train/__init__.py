"""Training: AdamW on the perceiver, cross-attention and new-token rows (optionally LoRA on the LM),
mixtures of datasets with loss weights, fp32 / bf16 autocast / pure bf16, DDP and FSDP2 under
torchrun, exact resume from atomic checkpoints, and the attention-aiming loss (``aim:``,
:mod:`.losses`). Modules: :mod:`.config` (the YAML tree), :mod:`.build` (model and data from it),
:mod:`.losses`, :mod:`.trainer` (the loop), :mod:`.checkpoint`, :mod:`.export`, :mod:`.grow`
(``flamingo-vlm grow-adapter``).

    from flamingo_vlm.train import TrainConfig, train
    result = train(TrainConfig.from_yaml("configs/train.yaml"))

Command line: ``flamingo-vlm train --config configs/train.yaml`` (``python -m flamingo_vlm.train``).
"""

from .build import DataError, build_model
from .config import (
    AimConfig,
    ConfigError,
    DataConfig,
    LoraConfig,
    ModelConfig,
    OptimConfig,
    ScheduleConfig,
    TrainConfig,
)
from .export import export_checkpoint
from .metrics import TrainResult
from .trainer import Callback, Trainer, train

__all__ = [
    "AimConfig",
    "Callback",
    "ConfigError",
    "DataConfig",
    "DataError",
    "LoraConfig",
    "ModelConfig",
    "OptimConfig",
    "ScheduleConfig",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "build_model",
    "export_checkpoint",
    "train",
]
