"""AdamW with the paper's parameter groups, and warmup + constant/linear/cosine schedules."""

from __future__ import annotations

import math

import torch
from torch import nn

from .config import OptimConfig, ScheduleConfig

CROSS_ATTN_MARKER = "gated_cross_attn_layer"
GATE_NAMES = ("attn_gate", "ff_gate")


def trainable_named_parameters(model: nn.Module) -> list[tuple[str, nn.Parameter]]:
    """(raw name, parameter) of everything that trains, in module order (names as
    ``Flamingo.named_parameters`` gives them: what ``save_pretrained`` writes)."""
    return [(n, p) for n, p in model.named_parameters() if p.requires_grad]


def param_groups(model: nn.Module, cfg: OptimConfig) -> list[dict]:
    """Weight decay on the gated cross-attention blocks only (all their parameters, as
    OpenFlamingo's ``get_grouped_params``); none on the perceiver, new-token rows or LoRA."""
    decay, no_decay, gates = [], [], []
    separate_gates = cfg.gate_lr_scale != 1.0
    for name, p in trainable_named_parameters(model):
        if separate_gates and name.rsplit(".", 1)[-1] in GATE_NAMES:
            gates.append((name, p))
        else:
            (decay if CROSS_ATTN_MARKER in name else no_decay).append((name, p))
    groups = []
    if decay:
        groups.append({"params": [p for _, p in decay], "names": [n for n, _ in decay], "weight_decay": cfg.weight_decay})
    if no_decay:
        groups.append({"params": [p for _, p in no_decay], "names": [n for n, _ in no_decay], "weight_decay": 0.0})
    if gates:  # tanh gates start at 0 and move ~lr per Adam step: a larger lr, no decay toward 0
        groups.append({"params": [p for _, p in gates], "names": [n for n, _ in gates], "weight_decay": 0.0,
                       "lr": cfg.lr * cfg.gate_lr_scale})
    if not groups:
        raise ValueError("the model has no trainable parameters")
    return groups


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW; ``cfg.fused`` (default: on for CPU/CUDA) uses the fused kernel: one pass over the
    parameters, no temporary copies of the whole state (the foreach path allocates several)."""
    groups = param_groups(model, cfg)
    kwargs = dict(lr=cfg.lr, betas=tuple(cfg.betas), eps=cfg.eps)
    fused = cfg.fused
    if fused is None:
        devices = {p.device.type for g in groups for p in g["params"]}
        fused = devices <= {"cpu", "cuda"}
    if fused:
        try:
            return torch.optim.AdamW(groups, fused=True, **kwargs)
        except (RuntimeError, TypeError, ValueError):
            if cfg.fused:
                raise
    return torch.optim.AdamW(groups, **kwargs)


def lr_factor(step: int, cfg: ScheduleConfig, max_steps: int) -> float:
    """Multiplier of the peak lr for optimizer step ``step`` (0-based: the first update uses step 0)."""
    warmup = cfg.warmup_steps
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if cfg.kind == "constant":
        return 1.0
    decay_steps = max(1, max_steps - warmup)
    progress = min(1.0, (step - warmup) / decay_steps)
    floor = cfg.min_lr_ratio
    if cfg.kind == "linear":
        return floor + (1.0 - floor) * (1.0 - progress)
    if cfg.kind == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown schedule {cfg.kind!r}")


def build_scheduler(optimizer: torch.optim.Optimizer, cfg: ScheduleConfig, max_steps: int):
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: lr_factor(step, cfg, max_steps))
