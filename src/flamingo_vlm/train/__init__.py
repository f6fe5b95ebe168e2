"""Training: AdamW on the perceiver, cross-attention and new-token rows (optionally LoRA on the LM),
mixtures of datasets with loss weights, fp32 / bf16 autocast / pure bf16, DDP and FSDP2 under
torchrun, exact resume from atomic checkpoints.

    from flamingo_vlm.train import TrainConfig, train
    result = train(TrainConfig.from_yaml("configs/train.yaml"))

Command line: ``flamingo-vlm train --config configs/train.yaml`` (``python -m flamingo_vlm.train``).
"""

from .config import ConfigError, DataConfig, LoraConfig, ModelConfig, OptimConfig, ScheduleConfig, TrainConfig
from .trainer import (
    Callback,
    DataError,
    Trainer,
    TrainResult,
    build_model,
    export_checkpoint,
    train,
)

__all__ = [
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
