"""What is distilled along one edge of the teacher graph: the :class:`Divergence` interface.

A divergence compares a student's logits with a (detached) teacher's, both ``[B, C]``, and returns
the edge's loss as a batch mean. The graph loss (:mod:`kdreg.losses`) applies it to every edge
``(i, t, w)`` inside the one rule

    L_i = (1 - lam) CE(a_i, y) + lam * sum_{(t, w) in T_i} w * D(a_i, sg(a_t))

Divergences are registered through the ``kdreg_register_divergences`` hook (the built-in ones by
``kdreg_plugins.divergences``) and built, like every other kind, by :func:`kdreg.create.create`.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod

import torch
from torch import Tensor

#: added to the standard deviation of logit standardisation (the authors' code does the same)
STANDARDISE_EPS = 1e-7


class Divergence(ABC):
    """The loss along one edge of the teacher graph; subclass it and implement :meth:`__call__`.

    A divergence has no parameters of its own (it is not trained) and keeps no state between
    calls: the same object serves every edge of a stage.
    """

    @abstractmethod
    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        """The edge's loss, a scalar: the batch mean of a per-sample term.

        ``student`` and ``teacher`` are fp32 logits ``[B, C]`` (autocast is off here); the
        teacher's are detached. ``tau`` is the stage's temperature; ``labels`` are the batch's
        targets, class indices ``[B]`` or soft targets ``[B, C]`` under mixup / CutMix; ``epoch``
        is the 1-based epoch being trained, or None outside training (a method with a warm-up
        then counts as warmed up).
        """


def standardise(logits: Tensor) -> Tensor:
    """Logit standardisation (Sun et al., CVPR 2024): each row z-scored, ``(z - mean(z)) /
    (std(z) + 1e-7)``, with the standard deviation of Bessel's correction (``torch.std``'s, as in
    the authors' code; the paper's 1/C form differs by the constant factor sqrt(C / (C - 1)), a
    change of temperature). In fp32."""
    z = logits.float()
    return (z - z.mean(-1, keepdim=True)) / (z.std(-1, keepdim=True) + STANDARDISE_EPS)


def warmup_factor(epoch: int | None, warmup: int) -> float:
    """``min(epoch / warmup, 1)``; 1 without a warm-up (``warmup = 0``) or outside training."""
    if epoch is None or warmup <= 0:
        return 1.0
    return min(epoch / warmup, 1.0)


def hard_targets(labels: Tensor) -> Tensor:
    """Class indices ``[B]``: ``labels`` themselves, or the dominant class of soft targets."""
    return labels if labels.dim() == 1 else labels.argmax(-1)


def divergence_problems(div: Divergence) -> list[str]:
    """What breaks the divergence contract, found by calling ``div`` once on a small probe batch:
    it must return a finite scalar tensor that depends on the student's logits."""
    gen = torch.Generator().manual_seed(0)
    student = torch.randn(4, 5, generator=gen, requires_grad=True)
    teacher = torch.randn(4, 5, generator=gen)
    labels = torch.tensor([0, 1, 2, 3])
    try:
        value = div(student, teacher, tau=2.0, labels=labels, epoch=1)
    except Exception as exc:  # noqa: BLE001 - reported as the plugin's broken contract
        return [f"calling it on logits [4, 5] raised {type(exc).__name__}: {exc}"]
    return loss_value_problems(value, "a scalar (the batch mean)", "the student's logits")


def loss_value_problems(value: object, scalar: str, depends_on: str) -> list[str]:
    """What a plugin's loss returned that is not a finite floating-point scalar tensor with a
    gradient: a divergence's (:func:`divergence_problems`) or a feature loss's. ``scalar`` names
    the scalar expected; ``depends_on``, what the value must have a gradient from."""
    if not isinstance(value, Tensor):
        return [f"it returned {type(value).__name__}, not a tensor"]
    if value.dim() != 0:
        return [f"it returned a tensor of shape {list(value.shape)}, not {scalar}"]
    problems = []
    if not value.is_floating_point() or not math.isfinite(float(value.detach())):
        problems.append(f"it returned {value.item()!r}, not a finite float")
    if not value.requires_grad:
        problems.append(f"its value does not depend on {depends_on} (no gradient)")
    return problems
