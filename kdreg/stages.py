"""Earlier stages of a recipe as later stages see them: frozen teachers.

A graph or bridge factory that declares an option annotated as :class:`kdreg.StageRef` receives a
:class:`TeacherStage` for it: the earlier stage's name and its trained model, which the engine runs
in eval mode under ``no_grad`` (its parameters never change and are in no optimizer). A graph
names that stage's outputs as external teacher nodes with :meth:`TeacherStage.node`.
"""

from __future__ import annotations

import attrs

from kdreg.backbone import FlexibleBackbone
from kdreg.graph import external_node


@attrs.frozen(eq=False)
class TeacherStage:
    """A frozen earlier stage: its ``name`` and its trained ``model``."""

    name: str
    model: FlexibleBackbone

    @property
    def submodel_labels(self) -> tuple[str, ...]:
        return tuple(self.model.submodel_labels)

    @property
    def num_submodels(self) -> int:
        return self.model.num_submodels

    def node(self, index: int = -1) -> str:
        """The external node name of sub-model ``index`` (default: the full model, the last)."""
        return external_node(self.name, self.submodel_labels[self.model.check_index(index)])

    def nodes(self) -> tuple[str, ...]:
        """Every output of the stage as external node names, smallest first."""
        return tuple(external_node(self.name, label) for label in self.submodel_labels)


def freeze(model: FlexibleBackbone) -> FlexibleBackbone:
    """Eval mode and no parameter that requires a gradient: a frozen teacher."""
    model.eval()
    model.requires_grad_(False)
    return model
