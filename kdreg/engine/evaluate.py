"""Evaluation of every sub-model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from kdreg.backbone import FlexibleBackbone
from kdreg.engine.device import autocast


@torch.no_grad()
def evaluate(
    model: FlexibleBackbone,
    batches: Iterable[tuple[Tensor, Tensor]],
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Top-1 accuracy (percent) of each sub-model, smallest first; one read from the device."""
    was_training = model.training
    model.eval()
    n = model.num_submodels
    correct = torch.zeros(n, dtype=torch.long, device=device)
    seen = 0
    try:
        for x, y in batches:
            with autocast(device, dtype):
                if model.single_pass:
                    outs = model(x)
                else:
                    outs = [model.forward_submodel(x, i) for i in range(n)]
            correct += torch.stack([(o.argmax(-1) == y).sum() for o in outs])
            seen += y.numel()
    finally:
        model.train(was_training)
    if seen == 0:
        return [float("nan")] * n
    return [100.0 * c / seen for c in correct.tolist()]
