"""kdreg: knowledge distillation for flexible networks, as recipes."""

from kdreg.api import build_backbone, distillation_loss, get_teacher_graph
from kdreg.backbone import FlexibleBackbone
from kdreg.graph import Edge, TeacherGraph
from kdreg.hookspecs import hookimpl
from kdreg.options import StageRef

__version__ = "0.1.0"

__all__ = [
    "Edge",
    "FlexibleBackbone",
    "StageRef",
    "TeacherGraph",
    "__version__",
    "build_backbone",
    "distillation_loss",
    "get_teacher_graph",
    "hookimpl",
]
