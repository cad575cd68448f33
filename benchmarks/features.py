"""The feature-loss figures of ``benchmarks/run.py``: what feature losses cost in a KD step.

Three steps of a ``resnet20`` student taught by a frozen ``resnet56`` (graph ``kd``, lam 0.9,
tau 4), each a stage assembled from its recipe as ``kdreg run`` assembles it, on the same batch,
timed alternating in turn (:func:`probes.alternate`):

* ``kd``: the logits alone;
* ``kd_at``: plus attention transfer at ``layer1``, ``layer2`` and ``layer3`` (weight 1000): the
  teacher's maps come from the same forward as its logits;
* ``kd_crd``: plus CRD at the pooled ``layer3`` (128-d embeddings, 16,384 negatives per sample,
  memory banks of ``images`` samples).

``feature_loss_cost_ratio`` is ``kd_at / kd``; ``crd_cost_ratio`` (reported) ``kd_crd / kd``.
Each step is the trainer's: ``zero_grad``, :func:`kdreg.engine.step.stage_backward` through the
stage's runner, the SGD step.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from common import NUM_CLASSES, Family, Figure, Job, Settings
from probes import alternate, median

from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.runner import build_runner
from kdreg.engine.step import stage_backward
from kdreg.recipe import parse_recipe
from kdreg.stages import freeze

RECIPE = """
[[stages]]
name = "teacher"
backbone = "resnet56"
[[stages]]
name = "student"
backbone = "resnet20"
graph = {{ name = "kd", teacher = "teacher" }}
lam = 0.9
tau = 4.0
{features}
"""

VARIANTS = {
    "kd": "",
    "kd_at": 'feature_losses = [{ name = "at", points = ["layer1", "layer2", "layer3"], weight = 1000.0 }]',
    "kd_crd": 'feature_losses = [{ name = "crd", points = ["layer3"], weight = 0.8 }]',
}


def feature_steps(device: torch.device, *, batch: int, size: int, images: int, num_classes: int,
                  channels_last: bool = True) -> dict[str, Callable[[], Any]]:
    """One training step per variant, each with its own student (the same initial weights), its
    own optimizer and the same batch."""
    gen = torch.Generator().manual_seed(0)
    labels = torch.randint(0, num_classes, (images,), generator=gen)
    shape = DataShape(num_classes, input_size=(size, size), num_samples=images, train_labels=labels)
    index = torch.randperm(images, generator=gen)[:batch]
    x = torch.rand(batch, 3, size, size, generator=gen).to(device)
    y = labels[index].to(device)
    index = index.to(device)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    steps: dict[str, Callable[[], Any]] = {}
    for name, features in VARIANTS.items():
        teacher_plan, plan = assemble(parse_recipe(RECIPE.format(features=features)), shape, seed=0)
        assert len(plan.features) == (1 if features else 0), name      # one edge: the teacher's
        freeze(teacher_plan.model.to(device))
        plan.to(device)
        if channels_last:
            plan.model.to(memory_format=torch.channels_last)
        trained = torch.nn.ModuleList(plan.modules()).train()
        opt = torch.optim.SGD(trained.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4)
        loss, teachers = plan.loss, plan.frozen
        runner = build_runner(plan.model, loss.bridge, device, features=loss.features)
        indices = index if loss.needs_indices else None

        def step(opt: torch.optim.Optimizer = opt, runner: Any = runner, loss: Any = loss,
                 teachers: Any = teachers, indices: torch.Tensor | None = indices) -> None:
            opt.zero_grad(set_to_none=True)
            stage_backward(runner, x, y, loss, teachers, indices)
            opt.step()

        steps[name] = step
    return steps


def feature_cost(device: torch.device, *, batch: int = 128, size: int = 32, images: int = 50_000,
                 num_classes: int = 10, rounds: int = 20, warmup: int = 3,
                 channels_last: bool = True) -> tuple[float, float, dict[str, Any]]:
    """``(kd_at / kd, kd_crd / kd, details)``: medians of ``rounds`` alternating steps."""
    steps = feature_steps(device, batch=batch, size=size, images=images, num_classes=num_classes,
                          channels_last=channels_last)
    times = alternate(steps, rounds=rounds, warmup=warmup, device=device)
    med = {name: median(t) for name, t in times.items()}
    details = {f"{name}_step_s": value for name, value in med.items()}
    details["setting"] = (f"resnet56 -> resnet20, batch {batch}, {size}x{size}, kd lam 0.9 tau 4; at "
                          f"layer1-3 weight 1000; crd pooled layer3, 16384 negatives, {images} samples")
    return med["kd_at"] / med["kd"], med["kd_crd"] / med["kd"], details


def feature_losses(s: Settings) -> tuple[Figure, Figure]:
    """``feature_loss_cost_ratio`` (a KD + AT step / a KD step) and ``crd_cost_ratio`` (a KD +
    CRD step / a KD step): ResNet-56 -> ResNet-20 (:func:`feature_cost`)."""
    at, crd, details = feature_cost(s.device, batch=s.batch, size=s.size, images=s.images,
                                    num_classes=NUM_CLASSES, rounds=s.steps, warmup=s.warmup,
                                    channels_last=s.channels_last is not False)
    return Figure(at, details=details), Figure(crd, details=details)


FAMILY = Family(
    jobs=(Job(("feature_loss_cost_ratio", "crd_cost_ratio"), lambda s, work: feature_losses(s)),),
    targets={"feature_loss_cost_ratio": ("<=", 1.05)},
)
