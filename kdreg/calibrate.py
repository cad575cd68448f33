"""BatchNorm calibration (US-Nets, Yu & Huang ICCV 2019, sec. 3.3 and 4): the running statistics
of each evaluated sub-model recomputed on training images.

A universally slimmable backbone trains widths drawn per step, whose BatchNorm statistics no step
keeps; before an evaluated width is evaluated its statistics are the plain average of the batch
statistics over a few thousand training images (``momentum = None``). :func:`calibrate` does that
for any model: a fixed-width slimmable model's private BNs, a range model's per-width statistics,
a plain network's BNs; a model without BatchNorm is left as it is.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from kdreg.normalise import normalise


def _norm_layers(model: nn.Module) -> list[nn.Module]:
    """Layers with running statistics that :func:`calibrate` recomputes: every BatchNorm and
    every layer with a ``reset_running_stats`` method and a ``momentum`` (a range model's)."""
    return [m for m in model.modules()
            if (isinstance(m, _BatchNorm) and m.track_running_stats)
            or (not isinstance(m, _BatchNorm) and hasattr(m, "momentum")
                and callable(getattr(m, "reset_running_stats", None))
                and getattr(m, "running_mean", None) is not None)]


def calibrate(model: nn.Module, batches: Iterable[Sequence[Any]], images: int) -> None:
    """Recompute the normalisation statistics of every evaluated sub-model of ``model`` from
    ``images`` training images.

    ``batches`` yields ``(x, y)`` (or ``(x, y, ...)``: the first is read) with ``x`` in [0, 1], unnormalised, on the model's device (fed
    as :func:`kdreg.normalise.normalise` makes it); the first ``images`` of them are used (one
    pass over ``batches``, the last batch cut to fit). Each batch runs through every sub-model
    ``i`` (``model.forward_evaluated(x, i)`` when the model has it, else ``forward_submodel``);
    every BatchNorm (a range model's: each evaluated width's row) is reset the first time it runs
    and then averages the batch statistics (``momentum = None``), with the model in training
    mode under ``no_grad``; the modes and momenta are restored after. A BatchNorm that several
    sub-models share averages the same batch statistics once per sub-model, which is the same
    average. Nothing happens for a model without BatchNorm or for ``images <= 0``.
    """
    layers = _norm_layers(model)
    if not layers or images <= 0:
        return
    run: Any = getattr(model, "forward_evaluated", None) or getattr(model, "forward_submodel", None)
    count = int(getattr(model, "num_submodels", 1))
    if run is None or (getattr(model, "single_pass", False) is True
                       and not hasattr(model, "forward_evaluated")):
        count = 1  # one forward computes every sub-model

        def run(x: Tensor, _i: int) -> Any:
            return model(x)
    modes = {m: m.training for m in model.modules()}
    momenta = {m: m.momentum for m in layers}
    reset: set[tuple[int, Any]] = set()

    def first_run(module: nn.Module, _args: Any) -> None:
        # a range model's one BN holds a row of statistics per evaluated width: the active one
        key = (id(module), getattr(module, "width_index", None))
        if key not in reset:
            reset.add(key)
            module.reset_running_stats()  # type: ignore[operator]
            setattr(module, "momentum", None)  # noqa: B010 - any norm layer's

    handles = [m.register_forward_pre_hook(first_run) for m in layers]
    try:
        model.train()
        seen = 0
        with torch.no_grad():
            for batch in batches:
                x = batch[0]
                take = min(int(x.shape[0]), images - seen)
                if take <= 0:
                    break
                x = normalise(model, x[:take])
                for i in range(count):
                    run(x, i)
                seen += take
        if seen == 0:
            raise ValueError("calibration found no training images")
    finally:
        for handle in handles:
            handle.remove()
        for m, momentum in momenta.items():
            m.momentum = momentum
        for m, training in modes.items():
            m.training = training


def calibrate_on_training_images(model: nn.Module, splits: Any, *, images: int, batch_size: int,
                                 device: torch.device, seed: int, rank: int = 0,
                                 world_size: int = 1) -> None:
    """:func:`calibrate` ``model`` on ``images`` images of ``splits``' training part (this
    process's shard under torchrun), drawn and augmented from ``stream_seed(seed, "calibration")``
    (``seed``: the stage's batch seed): the trainer's calibration and ``kdreg eval`` / ``kdreg
    export``'s draw the same batches."""
    calibrate(model, calibration_batches(splits, batch_size=batch_size, device=device, seed=seed,
                                         rank=rank, world_size=world_size), images)


def calibration_batches(splits: Any, *, batch_size: int, device: torch.device, seed: int,
                        rank: int = 0, world_size: int = 1) -> Any:
    """The training batches calibration reads (see :func:`calibrate_on_training_images`); a
    loader that is kept and iterated again gives the same batches each time (its epoch 0)."""
    from kdreg.data.loading import batches
    from kdreg.streams import stream_seed

    return batches(splits, "train", batch_size=batch_size, device=device, train=True,
                   seed=stream_seed(seed, "calibration"), rank=rank, world_size=world_size)
