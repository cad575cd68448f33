"""Collaboration bridges: a student's front part joined to a frozen teacher's back part (STC).

A bridge factory (hook ``kdreg_register_bridges``) returns a :class:`Bridge`. The engine takes the
student's features at :attr:`Bridge.student_split` from the same forward pass that gives its
logits, calls the bridge with them and mixes its term with the teacher-graph loss::

    L = alpha * L_bridge + (1 - alpha) * L_graph

The bridge's own parameters (an adapter, say) are trained with the student's; the teacher's are
not. At inference the student is used alone.
"""

from __future__ import annotations

import attrs
from torch import Tensor, nn


@attrs.frozen(eq=False)
class BridgeBatch:
    """What a bridge gets besides the student's features, for one training batch.

    ``teacher_logits`` are the frozen teacher's own logits ``O_t`` on the same augmented batch
    (computed once, under ``no_grad``, in fp32); ``labels`` the ground truth; ``tau`` the stage's
    distillation temperature.
    """

    labels: Tensor
    teacher_logits: Tensor
    tau: float


class Bridge(nn.Module):
    """Base class of collaboration bridges.

    Subclasses set :attr:`teacher` (the name of the earlier stage they join), :attr:`student_split`
    (the student's split point whose features they take) and :attr:`alpha` (the weight of their
    term, in [0, 1]), and implement :meth:`forward`.
    """

    teacher: str = ""
    student_split: str = ""
    alpha: float = 0.0

    def forward(self, features: Tensor, batch: BridgeBatch) -> Tensor:
        """The bridge's loss term (a scalar) from the student's features at ``student_split``."""
        raise TypeError(f"{type(self).__name__} must implement forward(features, batch)")
