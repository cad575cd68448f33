"""Teacher graphs: who teaches whom, with what weight.

Nodes are the sub-models ``0..n-1`` of the model being trained (0 the smallest) plus named
external teachers: outputs of frozen models from earlier stages, named ``"<stage>:<label>"``
(``"teacher:full"``, ``"heads:exit2"``; a bare ``"<stage>"`` is that stage's full output). An edge
``student <- teacher`` with weight ``w`` adds ``w * KD(a_student, sg(a_teacher))`` to that student's
loss. The built-in graphs live in the built-in graphs plugin; the core knows no method.
"""

from __future__ import annotations

import attrs
import torch

from kdreg.errors import OptionError

#: The smallest edge weight: float32's smallest normal number (the loss is computed in float32).
MIN_WEIGHT = float(torch.finfo(torch.float32).tiny)

Node = int | str


@attrs.frozen
class Edge:
    """``student <- teacher`` with weight ``weight``."""

    student: int
    teacher: Node
    weight: float = 1.0


@attrs.frozen
class TeacherGraph:
    """A validated set of weighted edges over ``num_submodels`` sub-models and named teachers.

    ``require_larger`` (the default) demands that an internal teacher be larger than its student,
    as every built-in graph does; ``external`` names the frozen teachers the edges may use.
    """

    num_submodels: int
    edges: tuple[Edge, ...] = ()
    external: tuple[str, ...] = ()
    name: str = "custom"
    require_larger: bool = True

    def __attrs_post_init__(self) -> None:
        problems = self.problems()
        if problems:
            raise OptionError("; ".join(problems))

    def problems(self) -> list[str]:
        """Why this graph is invalid (empty when it is valid)."""
        n, out = self.num_submodels, []
        if n < 1:
            out.append(f"a graph needs at least one sub-model, got {n}")
        seen = set()
        for e in self.edges:
            if not 0 <= e.student < n:
                out.append(f"student {e.student} does not exist (sub-models 0..{n - 1})")
            if isinstance(e.teacher, str):
                if e.teacher not in self.external:
                    out.append(f"teacher {e.teacher!r} of student {e.student} is not a known external teacher")
            elif not 0 <= e.teacher < n:
                out.append(f"teacher {e.teacher} of student {e.student} does not exist (sub-models 0..{n - 1})")
            elif e.teacher == e.student:
                out.append(f"sub-model {e.student} cannot teach itself")
            elif self.require_larger and e.teacher < e.student:
                out.append(f"teacher {e.teacher} is smaller than its student {e.student}")
            if not e.weight > 0:
                out.append(f"edge {e.student} <- {e.teacher} has weight {e.weight}; weights must be > 0")
            elif not MIN_WEIGHT <= e.weight < float("inf"):
                out.append(f"edge {e.student} <- {e.teacher} has weight {e.weight}; weights must be finite "
                           f"and at least {MIN_WEIGHT:.3g} (the smallest float32 the loss computes "
                           f"with: a smaller one would vanish)")
            if (e.student, e.teacher) in seen:
                out.append(f"edge {e.student} <- {e.teacher} is listed twice")
            seen.add((e.student, e.teacher))
        return out

    def teachers_of(self, student: int) -> list[tuple[Node, float]]:
        """``[(teacher, weight), ...]`` of ``student``."""
        return [(e.teacher, e.weight) for e in self.edges if e.student == student]

    def has_teachers(self, student: int) -> bool:
        return any(e.student == student for e in self.edges)

    def internal_teachers(self) -> set[int]:
        """Sub-models whose logits teach some other sub-model."""
        return {e.teacher for e in self.edges if isinstance(e.teacher, int)}

    def last_student_of(self, teacher: int) -> int | None:
        """The smallest student of ``teacher``: in a largest-first pass, its logits are needed
        until that student has been computed."""
        students = [e.student for e in self.edges if e.teacher == teacher]
        return min(students) if students else None

    def weight_matrix(self) -> torch.Tensor:
        """``W[s, t]``: the weight of internal edge ``s <- t`` (0 where there is none)."""
        w = torch.zeros(self.num_submodels, self.num_submodels)
        for e in self.edges:
            if isinstance(e.teacher, int):
                w[e.student, e.teacher] = e.weight
        return w

    def external_edges(self) -> list[Edge]:
        return [e for e in self.edges if isinstance(e.teacher, str)]

    def describe(self) -> str:
        """One line per student, e.g. ``0 <- 1 (0.333), 2 (0.333), 3 (0.333)``."""
        lines = []
        for s in range(self.num_submodels):
            t = self.teachers_of(s)
            lines.append(f"{s} <- " + (", ".join(f"{a} ({w:.3g})" for a, w in t) if t else "labels only"))
        return "\n".join(lines)


def external_node(stage: str, label: str) -> str:
    """The node name of output ``label`` of the frozen stage ``stage``: ``"teacher:full"``."""
    return f"{stage}:{label}"


def parse_external_node(node: str) -> tuple[str, str | None]:
    """``(stage, label)`` of an external node name; a bare stage name means its full output
    (label ``None``)."""
    stage, sep, label = node.rpartition(":")
    return (stage, label) if sep else (node, None)
