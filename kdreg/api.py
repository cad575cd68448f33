"""The stable Python API (a contract: tests outside this repo call these names)."""

from __future__ import annotations

from typing import Any

from kdreg.backbone import FlexibleBackbone
from kdreg.graph import TeacherGraph
from kdreg.losses import distillation_loss
from kdreg.options import bind, call
from kdreg.registry import get_registry

__all__ = ["build_backbone", "capacity_ratio", "distillation_loss", "get_teacher_graph"]


def build_backbone(
    name: str,
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    **options: Any,
) -> FlexibleBackbone:
    """Build the registered backbone ``name``; ``forward(x)`` returns sub-model logits, smallest first."""
    entry = get_registry("backbone").get(name)
    provided = {"num_classes": num_classes, "in_chans": in_chans, "input_size": tuple(input_size)}
    kwargs = bind(entry.factory, options, provided=provided, path="backbone", what=f"backbone {name!r}")
    model = call(entry.factory, kwargs, path="backbone")
    if not isinstance(model, FlexibleBackbone):
        raise TypeError(
            f"backbone {name!r} of plugin {entry.plugin!r} returned {type(model).__name__}, "
            "not a kdreg.FlexibleBackbone"
        )
    model.in_chans = in_chans
    model.input_size = tuple(input_size)  # type: ignore[assignment]
    return model


def get_teacher_graph(name: str, num_submodels: int, **options: Any) -> TeacherGraph:
    """Build the registered teacher graph ``name`` over ``num_submodels`` sub-models."""
    entry = get_registry("graph").get(name)
    kwargs = bind(entry.factory, options, provided={"num_submodels": num_submodels},
                  path="graph", what=f"graph {name!r}")
    g = call(entry.factory, kwargs, path="graph")
    if not isinstance(g, TeacherGraph):
        raise TypeError(f"graph {name!r} of plugin {entry.plugin!r} returned {type(g).__name__}, not a TeacherGraph")
    return g


def capacity_ratio(teacher: FlexibleBackbone, student: FlexibleBackbone) -> dict[str, float]:
    """How much larger the teacher's full model is than the student's: parameters and MACs."""
    tp, sp = teacher.count_params()[-1], student.count_params()[-1]
    tm, sm = teacher.count_macs()[-1], student.count_macs()[-1]
    return {"params": tp / sp, "macs": tm / sm}
