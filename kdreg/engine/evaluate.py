"""Evaluation of every sub-model."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import Tensor

from kdreg.backbone import FlexibleBackbone
from kdreg.engine import distributed
from kdreg.engine.device import autocast
from kdreg.normalise import normalise


@torch.no_grad()
def evaluate(
    model: FlexibleBackbone,
    batches: Iterable[tuple[Tensor, ...]],
    *,
    device: torch.device,
    dtype: torch.dtype | None = None,
) -> list[float]:
    """Top-1 accuracy (percent) of each sub-model, smallest first; one read from the device.
    ``batches`` are unnormalised; the model is fed them with its own statistics (:mod:`kdreg.normalise`).

    Under torchrun every process evaluates its shard of ``batches`` and the counts are summed."""
    was_training = model.training
    model.eval()
    n = model.num_submodels
    correct = torch.zeros(n, dtype=torch.long, device=device)
    seen = torch.zeros((), dtype=torch.long, device=device)
    try:
        for x, y, *_ in batches:
            x = normalise(model, x)
            with autocast(device, dtype):
                if model.single_pass:
                    outs = model(x)
                else:
                    outs = [model.forward_submodel(x, i) for i in range(n)]
            correct += torch.stack([(o.argmax(-1) == y).sum() for o in outs])
            seen += y.numel()
    finally:
        model.train(was_training)
    counts = distributed.all_reduce_sum(torch.cat([correct, seen.view(1)])).tolist()
    if counts[-1] == 0:
        return [float("nan")] * n
    return [100.0 * c / counts[-1] for c in counts[:-1]]
