"""Each model normalises its own input.

Batches reach the models unnormalised (float images in [0, 1]). Every model the engine runs is
fed ``(x - mean) / std`` with its own statistics: :attr:`kdreg.FlexibleBackbone.input_mean` and
``input_std`` when its weights expect particular ones (a pretrained model's configuration), else
the data set's. So a teacher pretrained on ImageNet statistics and a student trained on the data
set's share one batch. :func:`attach` records a model's statistics (once it is built);
:func:`normalise` is what the engine calls where a batch enters a model (the training step, the
frozen teachers, evaluation, anytime evaluation); ``kdreg export`` embeds :func:`input_stats`.
The statistics are plain attributes, not buffers: state dicts and checkpoints keep their keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn

_STATS = "_kdreg_input_stats"
_CACHE = "_kdreg_input_tensors"

Stats = tuple[tuple[float, ...], tuple[float, ...]]


def resolve(model: nn.Module, data_mean: Sequence[float] | None,
            data_std: Sequence[float] | None) -> Stats | None:
    """The statistics ``model`` is fed: its own ``input_mean``/``input_std`` when set, else the
    data set's (None when neither is known)."""
    own_mean, own_std = getattr(model, "input_mean", None), getattr(model, "input_std", None)
    if own_mean is not None and own_std is not None:
        return tuple(float(v) for v in own_mean), tuple(float(v) for v in own_std)
    if data_mean is None or data_std is None:
        return None
    return tuple(float(v) for v in data_mean), tuple(float(v) for v in data_std)


def attach(model: nn.Module, data_mean: Sequence[float] | None,
           data_std: Sequence[float] | None) -> Stats | None:
    """Record on ``model`` the statistics it is fed (:func:`resolve`) and return them."""
    stats = resolve(model, data_mean, data_std)
    model.__dict__[_STATS] = stats
    model.__dict__[_CACHE] = {}
    return stats


def input_stats(model: nn.Module) -> Stats | None:
    """The statistics ``model`` is fed: those :func:`attach` recorded, else its own (if set)."""
    if _STATS in model.__dict__:
        stats: Stats | None = model.__dict__[_STATS]
        return stats
    return resolve(model, None, None)


def normalise(model: nn.Module, x: Tensor) -> Tensor:
    """``(x - mean) / std`` with ``model``'s statistics (:func:`input_stats`); ``x`` itself when
    it has none."""
    stats = input_stats(model)
    if stats is None:
        return x
    cache = model.__dict__.setdefault(_CACHE, {})
    key = (x.device, x.dtype)
    if key not in cache:
        mean, std = stats
        cache[key] = (torch.tensor(mean, dtype=x.dtype).view(1, -1, 1, 1).to(x.device),
                      torch.tensor(std, dtype=x.dtype).view(1, -1, 1, 1).to(x.device))
    mean_t, std_t = cache[key]
    return (x - mean_t) / std_t
