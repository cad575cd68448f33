"""Optimizers and learning-rate schedules (set per step, so resuming needs no scheduler state)."""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

from kdreg.recipe import OptimizerConfig, ScheduleConfig
from kdreg.weight_decay import no_decay_kind


def parameter_groups(model: nn.Module, cfg: OptimizerConfig) -> list[dict[str, Any]]:
    """Trainable parameters split into decayed and exempt groups (``cfg.no_decay``)."""
    decay: list[torch.Tensor] = []
    exempt: list[torch.Tensor] = []
    seen: set[int] = set()
    exempt_kinds = set(cfg.no_decay)
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if not p.requires_grad or id(p) in seen:
                continue
            seen.add(id(p))
            (exempt if no_decay_kind(module, name) in exempt_kinds else decay).append(p)
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}]
    if exempt:
        groups.append({"params": exempt, "weight_decay": 0.0})
    return groups


def build_optimizer(model: nn.Module, cfg: OptimizerConfig,
                    device: torch.device | None = None) -> torch.optim.Optimizer:
    """The recipe's optimizer over ``model``'s trainable parameters: the fused kernels on CUDA,
    the multi-tensor (``foreach``) ones elsewhere."""
    groups = parameter_groups(model, cfg)
    if not any(g["params"] for g in groups):
        raise ValueError("the model has no trainable parameters")
    cuda = device is not None and device.type == "cuda"
    fused, foreach = (True, None) if cuda else (None, True)
    if cfg.name == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=cfg.momentum,
                               nesterov=cfg.nesterov and cfg.momentum > 0, foreach=foreach, fused=fused)
    if cfg.name == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.lr, foreach=foreach, fused=fused)
    raise ValueError(f"unknown optimizer {cfg.name!r}")


def lr_factor(cfg: ScheduleConfig, epoch: float, epochs: int) -> float:
    """The learning-rate multiplier at (fractional) ``epoch`` of ``epochs``."""
    warm = 1.0
    if cfg.warmup_epochs > 0 and epoch < cfg.warmup_epochs:
        warm = (epoch + 1e-8) / cfg.warmup_epochs
    if cfg.name == "constant":
        base = 1.0
    elif cfg.name == "multistep":
        base = cfg.gamma ** sum(epoch >= m for m in cfg.milestones)
    elif cfg.name == "cosine":
        base = 0.5 * (1.0 + math.cos(math.pi * min(epoch / max(epochs, 1), 1.0)))
    else:
        raise ValueError(f"unknown schedule {cfg.name!r}")
    return base * warm


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
