"""Teacher-graph validation and structure (hypothesis)."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdreg
from kdreg.errors import OptionError, RecipeError
from kdreg.graph import MIN_WEIGHT, Edge, TeacherGraph

edges = st.lists(st.tuples(st.integers(-1, 6), st.integers(-1, 6),
                           st.floats(-1.0, 2.0) | st.sampled_from([1e-300, MIN_WEIGHT / 2, MIN_WEIGHT])),
                 max_size=10)


@settings(max_examples=150, deadline=None)
@given(n=st.integers(1, 6), spec=edges)
def test_a_graph_is_accepted_exactly_when_every_edge_is_valid(n: int, spec) -> None:  # type: ignore[no-untyped-def]
    pairs = [(s, t) for s, t, _ in spec]
    valid = (all(0 <= s < n and 0 <= t < n and t > s and w >= MIN_WEIGHT for s, t, w in spec)
             and len(set(pairs)) == len(pairs))
    if valid:
        g = TeacherGraph(n, tuple(Edge(s, t, w) for s, t, w in spec))
        w = g.weight_matrix()
        for s, t, weight in spec:
            assert w[s, t].item() == pytest.approx(weight)
        assert int((w > 0).sum()) == len(spec)
        for t in g.internal_teachers():
            assert g.last_student_of(t) == min(s for s, tt, _ in spec if tt == t)
    else:
        with pytest.raises(OptionError):
            TeacherGraph(n, tuple(Edge(s, t, w) for s, t, w in spec))


@pytest.mark.parametrize("name", ["none", "ipkd", "ipkd-ta-1", "ipkd-ta-m"])
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_builtin_graphs_have_the_papers_edges(name: str, n: int) -> None:
    g = kdreg.get_teacher_graph(name, n)
    expected = {
        "none": [],
        "ipkd": [(i, n - 1, 1.0) for i in range(n - 1)],
        "ipkd-ta-1": [(i, i + 1, 1.0) for i in range(n - 1)],
        "ipkd-ta-m": [(i, j, 1.0 / (n - 1 - i)) for i in range(n - 1) for j in range(i + 1, n)],
    }[name]
    got = sorted((e.student, e.teacher, e.weight) for e in g.edges)
    assert [(s, t) for s, t, _ in got] == [(s, t) for s, t, _ in sorted(expected)]
    assert [w for *_, w in got] == pytest.approx([w for *_, w in sorted(expected)])
    assert not g.has_teachers(n - 1)


def test_subset_graph_options() -> None:
    g = kdreg.get_teacher_graph("subset", 4, teachers=[[1, 3], [], [3]])
    assert g.teachers_of(0) == [(1, 0.5), (3, 0.5)] and g.teachers_of(1) == [] and g.teachers_of(2) == [(3, 1.0)]
    g = kdreg.get_teacher_graph("subset", 4, teachers={"0": [2, 3]}, weights={"0": [0.25, 0.75]})
    assert g.teachers_of(0) == [(2, 0.25), (3, 0.75)]
    torch.testing.assert_close(g.weight_matrix()[0], torch.tensor([0.0, 0.0, 0.25, 0.75]))
    for options, message in [
        ({"teachers": {"0": [0]}}, "sub-model 0 cannot teach itself"),
        ({"teachers": {"2": [1]}}, "teacher 1 is smaller than its student 2"),
        ({"teachers": {"0": [9]}}, "teacher 9 of student 0 does not exist"),
        ({"teachers": {"x": [1]}}, "student key 'x' is not a sub-model index"),
        ({"teachers": {"0": [1, 2]}, "weights": {"0": [1.0]}}, "student 0 has 2 teachers but 1 weights"),
        ({"teachers": {"0": [1]}, "weights": {"1": [1.0]}}, "weights given for students without teachers"),
    ]:
        with pytest.raises(RecipeError, match=message):
            kdreg.get_teacher_graph("subset", 4, **options)


def test_describe_lists_teachers_per_student() -> None:
    assert kdreg.get_teacher_graph("ipkd-ta-m", 3).describe() == "0 <- 1 (0.5), 2 (0.5)\n1 <- 2 (1)\n2 <- labels only"


@pytest.mark.parametrize("weight", [1e-300, MIN_WEIGHT / 2, float("inf")])
def test_a_weight_the_float32_loss_cannot_hold_is_refused(weight: float) -> None:
    with pytest.raises(OptionError, match=r"edge 0 <- 1 has weight .*; weights must be finite and at least 1.18e-38"):
        TeacherGraph(2, (Edge(0, 1, weight),))
    assert TeacherGraph(2, (Edge(0, 1, MIN_WEIGHT),)).weight_matrix()[0, 1] > 0
