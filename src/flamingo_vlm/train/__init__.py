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

from __future__ import annotations

from ..lazy import lazy_names

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

_LAZY = {
    "DataError": ".config",
    "build_model": ".build",
    "AimConfig": ".config",
    "ConfigError": ".config",
    "DataConfig": ".config",
    "LoraConfig": ".config",
    "ModelConfig": ".config",
    "OptimConfig": ".config",
    "ScheduleConfig": ".config",
    "TrainConfig": ".config",
    "export_checkpoint": ".export",
    "TrainResult": ".metrics",
    "Callback": ".trainer",
    "Trainer": ".trainer",
    "train": ".trainer",
}

# Loaded on first use: see flamingo_vlm.lazy.
__getattr__, __dir__ = lazy_names(__name__, _LAZY)
