"""kdreg: knowledge distillation for flexible networks, as recipes."""

from kdreg.api import (
    build_backbone,
    build_bridge,
    build_divergence,
    build_feature_loss,
    distillation_loss,
    get_teacher_graph,
)
from kdreg.backbone import FlexibleBackbone
from kdreg.bridge import Bridge, BridgeBatch
from kdreg.divergence import Divergence
from kdreg.graph import Edge, TeacherGraph
from kdreg.hookspecs import hookimpl
from kdreg.options import StageRef
from kdreg.stages import TeacherStage

__version__ = "0.1.0"

__all__ = [
    "Bridge",
    "BridgeBatch",
    "Divergence",
    "Edge",
    "FlexibleBackbone",
    "StageRef",
    "TeacherGraph",
    "TeacherStage",
    "__version__",
    "build_backbone",
    "build_bridge",
    "build_divergence",
    "build_feature_loss",
    "distillation_loss",
    "get_teacher_graph",
    "hookimpl",
]
