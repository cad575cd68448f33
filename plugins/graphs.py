"""Built-in teacher graphs: none, ipkd, ipkd-ta-1, ipkd-ta-m, subset (ipkd-ta), kd (Hinton; a TAKD
link), deit (DeiT's distillation token) and cohort (EKD). Registered exactly as a third-party
plugin registers its own.

The inplace graphs (ipkd, ipkd-ta-1, ipkd-ta-m, subset) take ``teacher``: frozen earlier stages
that also teach the largest sub-model (:func:`with_teacher`), so that one graph holds inplace
edges and edges from frozen stages at once (Scala: each width taught by the next larger one, the
largest by a pretrained model)."""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from typing import Any

from kdreg.errors import OptionError
from kdreg.graph import Edge, TeacherGraph
from kdreg.hookspecs import hookimpl
from kdreg.options import StageRef
from kdreg.stages import TeacherStage


def no_distillation(num_submodels: int) -> TeacherGraph:
    """Every sub-model trained on labels alone (ipkd-ta eq. 4)."""
    return TeacherGraph(num_submodels, (), name="none")


def with_teacher(graph: TeacherGraph, teacher: StageRef | list[StageRef] | None,
                 weight: float = 1.0) -> TeacherGraph:
    """``graph`` plus an edge from the full output of every stage of ``teacher`` (or node name) to
    the largest sub-model, weight ``weight`` / (number of stages) each, as ``kd`` weighs an
    ensemble; ``graph`` itself when ``teacher`` is None."""
    if teacher is None:
        return graph
    if not (math.isfinite(weight) and weight > 0):
        raise OptionError(f"teacher_weight must be a finite number > 0, got {weight}",
                          key="teacher_weight")
    taught = _taught(graph.num_submodels, (graph.num_submodels - 1,), teacher, graph.name, weight)
    return TeacherGraph(graph.num_submodels, graph.edges + taught.edges,
                        external=taught.external, name=graph.name)


def ipkd(num_submodels: int, teacher: StageRef | list[StageRef] | None = None,
         teacher_weight: float = 1.0) -> TeacherGraph:
    """Inplace distillation: every sub-model taught by the largest (ipkd-ta eq. 5); ``teacher``:
    the largest taught by frozen stages too (:func:`with_teacher`)."""
    n = num_submodels
    graph = TeacherGraph(n, tuple(Edge(i, n - 1, 1.0) for i in range(n - 1)), name="ipkd")
    return with_teacher(graph, teacher, teacher_weight)


def ipkd_ta_1(num_submodels: int, teacher: StageRef | list[StageRef] | None = None,
              teacher_weight: float = 1.0) -> TeacherGraph:
    """IPKD with one teacher assistant: sub-model i taught by i + 1 (ipkd-ta eq. 6); ``teacher``:
    the largest taught by frozen stages too (:func:`with_teacher`; Scala's progressive knowledge
    transfer)."""
    n = num_submodels
    graph = TeacherGraph(n, tuple(Edge(i, i + 1, 1.0) for i in range(n - 1)), name="ipkd-ta-1")
    return with_teacher(graph, teacher, teacher_weight)


def ipkd_ta_m(num_submodels: int, teacher: StageRef | list[StageRef] | None = None,
              teacher_weight: float = 1.0) -> TeacherGraph:
    """IPKD with multiple assistants: i taught by every larger j, weight 1/(n-1-i) (ipkd-ta eq. 7);
    ``teacher``: the largest taught by frozen stages too (:func:`with_teacher`)."""
    n = num_submodels
    edges = tuple(Edge(i, j, 1.0 / (n - 1 - i)) for i in range(n - 1) for j in range(i + 1, n))
    return with_teacher(TeacherGraph(n, edges, name="ipkd-ta-m"), teacher, teacher_weight)


def subset(num_submodels: int, teachers: Mapping[str, Iterable[int]] | Iterable[Iterable[int]] = (),
           weights: Mapping[str, Iterable[float]] | None = None,
           teacher: StageRef | list[StageRef] | None = None,
           teacher_weight: float = 1.0) -> TeacherGraph:
    """Teachers listed per student (ipkd-ta footnote 4); weights default to 1 / len(T_i);
    ``teacher``: the largest taught by frozen stages too (:func:`with_teacher`).

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
        graph = TeacherGraph(n, tuple(edges), name="subset")
    except OptionError as exc:
        raise OptionError(str(exc), key="teachers") from None
    return with_teacher(graph, teacher, teacher_weight)


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


def kd(num_submodels: int, teacher: StageRef | list[StageRef]) -> TeacherGraph:
    """Every sub-model taught by the full output of a frozen earlier stage, weight 1 (Hinton; one
    TAKD link). Several stages form an ensemble: each teaches with weight 1 / (number of stages),
    which for every student gives the gradient of KD against the teachers' averaged soft targets.

    From Python, ``teacher`` may also be a node name (or names) of your choosing: pass the
    teachers' logits under those names in ``distillation_loss(..., external=...)``."""
    return _taught(num_submodels, range(num_submodels), teacher, "kd")


def deit(num_submodels: int, teacher: StageRef | list[StageRef], weight: float = 1.0) -> TeacherGraph:
    """DeiT's distillation token (Touvron et al. 2021): the distillation head taught by the frozen
    teacher with weight ``weight`` (several stages: ``weight`` / their number each, as ``kd``), the
    class head by the labels alone. For a backbone that trains the two heads, class head first:
    ``backbone = { name = "timm", model = "deit_tiny_distilled_patch16_224", distilled = true }``
    (cls, dist). With ``lam = 1``, DeiT's ``(1 - alpha) CE + alpha D`` is ``1 - alpha`` times this
    graph's loss with ``weight = alpha / (1 - alpha)`` (hard; soft: also ``/ num_classes``)."""
    if not (math.isfinite(weight) and weight > 0):
        raise OptionError(f"weight must be a finite number > 0, got {weight}", key="weight")
    if num_submodels != 2:
        raise OptionError(f"the deit graph teaches the distillation head of a backbone that trains two "
                          f"heads (cls, dist: a timm backbone with distilled = true); this backbone "
                          f"trains {num_submodels} sub-model(s)")
    return _taught(num_submodels, (1,), teacher, "deit", weight)


def _taught(num_submodels: int, students: Iterable[int], teacher: Any, name: str,
            weight: float = 1.0) -> TeacherGraph:
    """``students`` each taught by the full output of every stage of ``teacher`` (or node name),
    weight ``weight`` / (number of stages); the other sub-models by labels alone."""
    stages = _stages(teacher, names=True)
    nodes = [s if isinstance(s, str) else s.node() for s in stages]
    w = weight / len(nodes)
    edges = tuple(Edge(i, node, w) for i in students for node in nodes)
    return TeacherGraph(num_submodels, edges, external=tuple(nodes), name=name)


def cohort(num_submodels: int, teacher: StageRef) -> TeacherGraph:
    """Every sub-model taught by every output of a frozen multi-exit stage (K heads + the main
    output), each with weight 1 / (K + 1): the EKD cohort (ekd-thesis eq. 4.6-4.7)."""
    (stage,) = _stages(teacher, many=False)
    nodes = stage.nodes()
    w = 1.0 / len(nodes)
    edges = tuple(Edge(i, node, w) for i in range(num_submodels) for node in nodes)
    return TeacherGraph(num_submodels, edges, external=nodes, name="cohort")


def _stages(teacher: Any, many: bool = True, names: bool = False) -> list[Any]:
    """The teacher stages (or, with ``names``, plain node names too), checked."""
    stages = list(teacher) if isinstance(teacher, list | tuple) else [teacher]
    if not stages:
        raise OptionError("teacher lists no stage", key="teacher")
    if not many and len(stages) > 1:
        raise OptionError("a cohort is taught by one stage's outputs; name one stage", key="teacher")
    for s in stages:
        if not (isinstance(s, TeacherStage) or (names and isinstance(s, str))):
            raise OptionError(f"teacher must be an earlier stage (a kdreg.TeacherStage), got {s!r}",
                              key="teacher")
    labels = [s if isinstance(s, str) else s.name for s in stages]
    twice = sorted({n for n in labels if labels.count(n) > 1})
    if twice:
        raise OptionError(f"teacher lists stage(s) {', '.join(twice)} more than once", key="teacher")
    return stages


@hookimpl
def kdreg_register_graphs(register: Any) -> None:
    register("none", no_distillation)
    register("ipkd", ipkd)
    register("ipkd-ta-1", ipkd_ta_1)
    register("ipkd-ta-m", ipkd_ta_m)
    register("subset", subset)
    register("kd", kd)
    register("deit", deit)
    register("cohort", cohort)
