"""Optimizers and learning-rate schedules (set per step, so resuming needs no scheduler state)."""

from __future__ import annotations

import math
from typing import Any, Literal

import torch
from torch import nn

from kdreg.recipe import OptimizerConfig, ScheduleConfig

NoDecayKind = Literal["depthwise", "norm", "bias", "other"]

_NORM_TYPES = (nn.modules.batchnorm._NormBase, nn.GroupNorm, nn.LayerNorm, nn.LocalResponseNorm)


def no_decay_kind(module: nn.Module, param_name: str) -> NoDecayKind | None:
    """Why parameter ``param_name`` of ``module`` (its direct owner) may be exempt from weight decay.

    ``"norm"`` for normalisation layers (BatchNorm, GroupNorm, LayerNorm, and the vectors of any
    class whose name contains ``Norm``, such as timm's RmsNorm; their biases too), ``"bias"`` for
    other biases, ``"depthwise"`` for the weight of a depthwise conv (``groups == in_channels >
    1``), ``"other"`` for any other parameter of at most one dimension (layer scales, tokens of
    size 1), and ``None`` for weights that always take weight decay (regular conv and linear
    weights). ``optimizer.no_decay`` names the kinds to exempt.
    """
    param = getattr(module, param_name)
    if isinstance(module, _NORM_TYPES) or (
            param.ndim <= 1 and "norm" in type(module).__name__.lower()):
        return "norm"
    if param_name == "bias" or param_name.endswith("_bias"):
        return "bias"
    if isinstance(module, nn.modules.conv._ConvNd) and param_name == "weight" and (
            getattr(module, "depthwise", False) is True
            or 1 < module.groups == module.in_channels):
        return "depthwise"
    if param.ndim <= 1:
        return "other"
    return None


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
