"""Optimiser and per-step learning-rate schedule (linear warm-up, then cosine / step / constant).

The schedule depends only on ``trainer.epochs`` x batches per epoch, never on ``trainer.max_steps``,
so a run stopped early and resumed follows exactly the same learning rates.
"""

from __future__ import annotations

import math
from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn


def param_groups(model: nn.Module, optim: DictConfig) -> list[dict[str, Any]]:
    """The optimiser's parameter groups: weight decay on every trainable parameter, or not on BN and biases.

    With ``optim.decay_norm_and_bias=false`` (the default) 1-d parameters (every BN's weight and bias, every
    bias) and any ``*.bias`` get no weight decay, as in timm and the torchvision references
    (``timm.optim.param_groups_weight_decay``); the first group is the undecayed one.
    """
    if optim.decay_norm_and_bias or not optim.weight_decay:
        return [{"params": [p for p in model.parameters() if p.requires_grad]}]
    from timm.optim import param_groups_weight_decay

    groups: list[dict[str, Any]] = param_groups_weight_decay(model, optim.weight_decay)
    return [g for g in groups if g["params"]]


def build_optimizer(model: nn.Module, optim: DictConfig) -> torch.optim.Optimizer:
    """SGD (Nesterov by default) or AdamW from the ``optim`` section, over :func:`param_groups`."""
    params = param_groups(model, optim)
    if optim.name == "sgd":
        return torch.optim.SGD(
            params, lr=optim.lr, momentum=optim.momentum, nesterov=optim.nesterov, weight_decay=optim.weight_decay
        )
    return torch.optim.AdamW(params, lr=optim.lr, betas=tuple(optim.betas), weight_decay=optim.weight_decay)


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: DictConfig, base_lr: float) -> float:
    """Multiplier of the base learning rate at optimisation ``step`` (0-based)."""
    if warmup_steps > 0 and step < warmup_steps:
        return (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, total_steps - warmup_steps))
    if schedule.name == "cosine":
        floor = schedule.min_lr / base_lr
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule.name == "step":
        return schedule.gamma ** sum(progress >= m for m in schedule.milestones)
    return 1.0


def build_scheduler(
    optimizer: torch.optim.Optimizer, schedule: DictConfig, total_steps: int, steps_per_epoch: int
) -> torch.optim.lr_scheduler.LambdaLR:
    """A LambdaLR stepped once per optimisation step."""
    warmup = round(schedule.warmup_epochs * steps_per_epoch)
    base_lr = optimizer.param_groups[0]["lr"]
    return torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: lr_factor(step, total_steps, warmup, schedule, base_lr)
    )
