"""Teacher graphs: who teaches whom, with what weight.

Nodes are the sub-models ``0..n-1`` of the model being trained (0 the smallest) plus named
external teachers (outputs of frozen models from earlier stages). An edge ``student <- teacher``
with weight ``w`` adds ``w * KD(a_student, sg(a_teacher))`` to that student's loss.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import attrs
import torch

from kdreg.errors import OptionError

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


# ----------------------------------------------------------------------------- built-in graphs
def no_distillation(num_submodels: int) -> TeacherGraph:
    """Every sub-model trained on labels alone (ipkd-ta eq. 4)."""
    return TeacherGraph(num_submodels, (), name="none")


def ipkd(num_submodels: int) -> TeacherGraph:
    """Inplace distillation: every sub-model taught by the largest (ipkd-ta eq. 5)."""
    n = num_submodels
    return TeacherGraph(n, tuple(Edge(i, n - 1, 1.0) for i in range(n - 1)), name="ipkd")


def ipkd_ta_1(num_submodels: int) -> TeacherGraph:
    """IPKD with one teacher assistant: sub-model i taught by i + 1 (ipkd-ta eq. 6)."""
    n = num_submodels
    return TeacherGraph(n, tuple(Edge(i, i + 1, 1.0) for i in range(n - 1)), name="ipkd-ta-1")


def ipkd_ta_m(num_submodels: int) -> TeacherGraph:
    """IPKD with multiple assistants: i taught by every larger j, weight 1/(n-1-i) (ipkd-ta eq. 7)."""
    n = num_submodels
    edges = tuple(Edge(i, j, 1.0 / (n - 1 - i)) for i in range(n - 1) for j in range(i + 1, n))
    return TeacherGraph(n, edges, name="ipkd-ta-m")


def subset(num_submodels: int, teachers: Mapping[str, Iterable[int]] | Iterable[Iterable[int]] = (),
           weights: Mapping[str, Iterable[float]] | None = None) -> TeacherGraph:
    """Teachers listed per student (ipkd-ta footnote 4); weights default to 1 / len(T_i).

    ``teachers`` maps a student index (a TOML key, so a string: ``{ "0" = [2, 3], "1" = [3] }``)
    to its teachers, or is a list with one teacher list per student, smallest first.
    """
    n = num_submodels
    table = _per_student(teachers, n, "teachers")
    wtable = _per_student(weights or {}, n, "weights")
    edges = []
    for s, ts in sorted(table.items()):
        ts = [int(t) for t in ts]
        if not ts:
            continue
        ws = [float(w) for w in wtable.get(s, [1.0 / len(ts)] * len(ts))]
        if len(ws) != len(ts):
            raise OptionError(f"student {s} has {len(ts)} teachers but {len(ws)} weights", key="weights")
        edges += [Edge(s, t, w) for t, w in zip(ts, ws)]
    extra = set(wtable) - set(table)
    if extra:
        raise OptionError(f"weights given for students without teachers: {sorted(extra)}", key="weights")
    try:
        return TeacherGraph(n, tuple(edges), name="subset")
    except OptionError as exc:
        raise OptionError(str(exc), key="teachers") from None


def _per_student(spec: Mapping[str, Iterable] | Iterable[Iterable], n: int, key: str) -> dict[int, list]:
    if isinstance(spec, Mapping):
        out = {}
        for k, v in spec.items():
            try:
                s = int(k)
            except (TypeError, ValueError):
                raise OptionError(f"student key {k!r} is not a sub-model index", key=key) from None
            if not 0 <= s < n:
                raise OptionError(f"student {s} does not exist (sub-models 0..{n - 1})", key=key)
            out[s] = list(v)
        return out
    rows = [list(r) for r in spec]
    if len(rows) > n:
        raise OptionError(f"{len(rows)} rows given for {n} sub-models", key=key)
    return dict(enumerate(rows))

