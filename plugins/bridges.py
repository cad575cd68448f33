"""Built-in collaboration bridge ``stc``: student-teacher collaboration (STC, stc.md eq. 1-5).

The student's front part, up to ``student_split``, feeds the frozen teacher's back part, from
``teacher_split`` on, through an adapter when the feature shapes differ (a 1x1 conv + BN when the
channel counts differ, bilinear resampling when the resolutions differ). The collaboration
network's output ``O_c`` is compared with the teacher's own output ``O_t``::

    L_STC = CE(O_c, target)        L = alpha * L_STC + (1 - alpha) * L_graph

``target`` (stc Table 5's columns): the paper's default target is the teacher's "output tensor"
``O_t``, which it reads two ways, so kdreg offers both:

- ``output``: the softmax of the teacher's logits, ``CE(O_c, softmax(O_t))`` (sec. 3.3: "the
  cross-entropy between the predictions from collaboration and teacher networks");
- ``hard``: the teacher's predicted class, ``CE(O_c, argmax(O_t))`` (Table 5's caption calls the
  output-tensor target "the hard target").

The paper's other two columns: ``soft``, the teacher's softmax at temperature ``tau``, compared at
``tau`` and scaled by ``tau^2`` as in Hinton's KD; ``label``, the ground truth. The teacher's
parameters never change and are in no optimizer, but the gradient of ``L_STC`` flows through the
teacher's back part into the student's front part; the adapter is trained with the student.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge, BridgeBatch
from kdreg.errors import OptionError
from kdreg.hookspecs import hookimpl
from kdreg.losses import cross_entropy, kd_loss
from kdreg.options import StageRef
from kdreg.stages import TeacherStage

Target = Literal["output", "hard", "soft", "label"]


class Resample(nn.Module):
    """Bilinear resampling of ``[B, C, H, W]`` features to a fixed resolution."""

    def __init__(self, size: Sequence[int]):
        super().__init__()
        self.size = (int(size[0]), int(size[1]))

    def forward(self, h: Tensor) -> Tensor:
        return F.interpolate(h, size=self.size, mode="bilinear", align_corners=False)


def make_adapter(student: Sequence[int], teacher: Sequence[int]) -> nn.Module:
    """The module that turns student features of shape ``student`` into ``teacher``'s shape.

    Raises :class:`OptionError` when no 1x1 conv + BN and resampling can join the two shapes.
    """
    student, teacher = tuple(student), tuple(teacher)
    if student == teacher:
        return nn.Identity()
    if len(student) != 3 or len(teacher) != 3:
        raise OptionError(
            f"no adapter joins student features {student} to teacher features {teacher}: "
            "only (C, H, W) feature maps of other channel counts or resolutions can be adapted; "
            "choose split points whose features match", key="teacher_split")
    layers: list[nn.Module] = []
    if student[0] != teacher[0]:
        layers += [nn.Conv2d(student[0], teacher[0], 1, bias=False), nn.BatchNorm2d(teacher[0])]
    if student[1:] != teacher[1:]:
        layers.append(Resample(teacher[1:]))
    return nn.Sequential(*layers)


class STCBridge(Bridge):
    """The student's front part joined to the frozen teacher's back part (stc eq. 1-5)."""

    def __init__(self, student: FlexibleBackbone, teacher: TeacherStage, *, student_split: str,
                 teacher_split: str, alpha: float, target: str = "output"):
        super().__init__()
        self.teacher = teacher.name
        self.student_split = _split(student, student_split, "student_split", "student")
        self.teacher_split = _split(teacher.model, teacher_split, "teacher_split", f"teacher stage {teacher.name!r}")
        self.alpha = alpha
        self.target = target
        self._stage = teacher  # not a submodule: the teacher is in no optimizer and no state dict
        s_shape = student.feature_shapes()[self.student_split]
        t_shape = teacher.model.feature_shapes()[self.teacher_split]
        self.adapter = make_adapter(s_shape, t_shape)
        self.shapes = (s_shape, t_shape)

    def forward(self, features: Tensor, batch: BridgeBatch) -> Tensor:  # type: ignore[override]
        collab = self._stage.model.forward_back(self.adapter(features), self.teacher_split)
        if self.target == "label":
            return cross_entropy(collab, batch.labels)
        if self.target == "hard":
            return cross_entropy(collab, batch.teacher_logits.detach().argmax(-1))
        tau = batch.tau if self.target == "soft" else 1.0
        return kd_loss(collab, batch.teacher_logits.detach(), tau=tau, divergence="ce")

    def extra_repr(self) -> str:
        return (f"teacher={self.teacher!r}, student_split={self.student_split!r}, "
                f"teacher_split={self.teacher_split!r}, alpha={self.alpha}, target={self.target!r}")


def _split(model: FlexibleBackbone, split: str, key: str, whose: str) -> str:
    points = model.split_points()
    if split not in points:
        raise OptionError(f"unknown split point {split!r} of the {whose} ({type(model).__name__}); "
                          f"known: {', '.join(points) or 'none'}", key=key)
    return split


def build_stc(*, student: FlexibleBackbone, teacher: StageRef, student_split: str,
              teacher_split: str, alpha: float = 0.3, target: Target = "output") -> STCBridge:
    """Student-teacher collaboration: the student's front part through the frozen teacher's back
    part (stc eq. 1-5); ``alpha`` weighs its term against the teacher-graph loss; ``target`` is
    ``output`` (the teacher's softmax), ``hard`` (its argmax), ``soft`` (its softmax at ``tau``)
    or ``label`` (the ground truth)."""
    if not 0.0 <= alpha <= 1.0:
        raise OptionError(f"alpha must be in [0, 1], got {alpha}", key="alpha")
    if not isinstance(teacher, TeacherStage):
        raise OptionError(f"teacher must name an earlier stage, got {teacher!r}", key="teacher")
    return STCBridge(student, teacher, student_split=student_split, teacher_split=teacher_split,
                     alpha=alpha, target=target)


@hookimpl
def kdreg_register_bridges(register: Any) -> None:
    register("stc", build_stc)
