"""The stable Python API (a contract: tests outside this repo call these names)."""

from __future__ import annotations

from typing import Any

from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge
from kdreg.create import create
from kdreg.divergence import Divergence
from kdreg.feature_loss import FeatureLoss
from kdreg.graph import TeacherGraph
from kdreg.losses import distillation_loss

__all__ = ["build_backbone", "build_bridge", "build_divergence", "capacity_ratio", "distillation_loss",
           "get_teacher_graph"]


def build_backbone(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    **options: Any,
) -> FlexibleBackbone:
    """Build the registered backbone ``name``; ``forward(x)`` returns sub-model logits, smallest first."""
    provided = {"num_classes": num_classes, "in_chans": in_chans, "input_size": tuple(input_size)}
    model = create("backbone", name, options, provided=provided, path="backbone")
    model.in_chans = in_chans
    model.input_size = (int(input_size[0]), int(input_size[1]))
    return model


def get_teacher_graph(name: str, num_submodels: int, **options: Any) -> TeacherGraph:
    """Build the registered teacher graph ``name`` over ``num_submodels`` sub-models.

    Options naming an earlier stage (``teacher`` of ``kd`` and ``cohort``) take a
    :class:`kdreg.TeacherStage` here."""
    graph: TeacherGraph = create("graph", name, options, provided={"num_submodels": num_submodels},
                                 path="graph")
    return graph


def build_bridge(name: str, *, student: FlexibleBackbone, **options: Any) -> Bridge:
    """Build the registered collaboration bridge ``name`` for ``student``; its ``teacher`` option
    takes a :class:`kdreg.TeacherStage`."""
    bridge: Bridge = create("bridge", name, options, provided={"student": student}, path="bridge")
    return bridge


def build_divergence(name: str, **options: Any) -> Divergence:
    """Build the registered divergence ``name`` with ``options`` (``build_divergence("dkd",
    beta=6.0)``); pass it to :func:`distillation_loss` as ``divergence``."""
    divergence: Divergence = create("divergence", name, options, provided={}, path="divergence")
    return divergence


def build_feature_loss(name: str, **options: Any) -> FeatureLoss:
    """Build the registered feature loss ``name`` with ``options`` (``build_feature_loss("at",
    p=2.0)``); call its ``setup`` with the feature shapes (:class:`kdreg.feature_loss.FeatureSetup`)
    before its first ``forward(student_features, teacher_features, batch)``."""
    loss: FeatureLoss = create("feature_loss", name, options, provided={}, path="feature_loss")
    return loss


def capacity_ratio(teacher: FlexibleBackbone, student: FlexibleBackbone) -> dict[str, float]:
    """How much larger the teacher's full model is than the student's: parameters and MACs."""
    tp, sp = teacher.count_params()[-1], student.count_params()[-1]
    tm, sm = teacher.count_macs()[-1], student.count_macs()[-1]
    return {"params": tp / sp, "macs": tm / sm}
