"""The losses against the papers' equations, and their invariants (hypothesis)."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdreg
from kdreg.graph import Edge, TeacherGraph
from kdreg.losses import cross_entropy, kd_loss, submodel_loss

GRAPHS = ["none", "ipkd", "ipkd-ta-1", "ipkd-ta-m"]


def logits_of(seed: int, n: int, batch: int, classes: int, scale: float = 3.0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(scale * torch.randn(batch, classes, generator=g, dtype=torch.float64)).float() for _ in range(n)]


def labels_of(seed: int, batch: int, classes: int) -> torch.Tensor:
    return torch.randint(0, classes, (batch,), generator=torch.Generator().manual_seed(seed + 1))


def kd_by_hand(a_s: torch.Tensor, a_t: torch.Tensor, tau: float, divergence: str = "kl") -> float:
    """tau^2 * mean_b sum_c p_t (log p_t - log p_s) (or without the entropy term for ce)."""
    total = 0.0
    for row_s, row_t in zip(a_s.tolist(), a_t.tolist()):
        zs = [v / tau for v in row_s]
        zt = [v / tau for v in row_t]
        ls = [v - math.log(sum(math.exp(u) for u in zs)) for v in zs]
        lt = [v - math.log(sum(math.exp(u) for u in zt)) for v in zt]
        pt = [math.exp(v) for v in lt]
        total += sum(p * ((t if divergence == "kl" else 0.0) - s) for p, t, s in zip(pt, lt, ls))
    return tau * tau * total / len(a_s)


def ce_by_hand(a: torch.Tensor, y: torch.Tensor) -> float:
    total = 0.0
    for row, label in zip(a.tolist(), y.tolist()):
        total += math.log(sum(math.exp(v) for v in row)) - row[label]
    return total / len(a)


def paper_loss(logits, y, graph_name: str, lam: float, tau: float, divergence: str = "kl") -> float:
    """ipkd-ta equations (4)-(7) written out literally (1-based i in the paper, 0-based here)."""
    n = len(logits)
    ce = [ce_by_hand(a, y) for a in logits]
    kd = lambda i, j: kd_by_hand(logits[i], logits[j], tau, divergence)  # noqa: E731
    if graph_name == "none":                                             # eq. 4
        return sum(ce)
    rest = (1 - lam) * sum(ce[:-1])
    if graph_name == "ipkd":                                             # eq. 5
        return ce[-1] + rest + lam * sum(kd(i, n - 1) for i in range(n - 1))
    if graph_name == "ipkd-ta-1":                                        # eq. 6
        return ce[-1] + rest + lam * sum(kd(i, i + 1) for i in range(n - 1))
    if graph_name == "ipkd-ta-m":                                        # eq. 7
        return ce[-1] + rest + lam * sum(
            sum(kd(i, j) for j in range(i + 1, n)) / (n - 1 - i) for i in range(n - 1))
    raise AssertionError(graph_name)


@pytest.mark.parametrize("graph_name", GRAPHS)
@pytest.mark.parametrize("divergence", ["kl", "ce"])
@pytest.mark.parametrize("n", [1, 2, 4, 7])
def test_graph_loss_equals_paper_equations(graph_name: str, divergence: str, n: int) -> None:
    logits = logits_of(n, n, batch=5, classes=6)
    y = labels_of(n, 5, 6)
    g = kdreg.get_teacher_graph(graph_name, n)
    got = kdreg.distillation_loss(logits, y, g, lam=0.8, tau=5.0, divergence=divergence)
    assert got.item() == pytest.approx(paper_loss(logits, y, graph_name, 0.8, 5.0, divergence), rel=1e-4)


def test_kd_matches_hinton_formula_and_batch_mean() -> None:
    a_s, a_t = logits_of(0, 2, batch=8, classes=10)
    assert kd_loss(a_s, a_t, tau=4.0).item() == pytest.approx(kd_by_hand(a_s, a_t, 4.0), rel=1e-5)
    assert kd_loss(a_s, a_t, tau=4.0, divergence="ce").item() == pytest.approx(kd_by_hand(a_s, a_t, 4.0, "ce"), rel=1e-5)
    # batch mean, not a mean over classes too: doubling the batch with copies changes nothing
    assert kd_loss(torch.cat([a_s, a_s]), torch.cat([a_t, a_t]), tau=4.0).item() == pytest.approx(
        kd_loss(a_s, a_t, tau=4.0).item(), rel=1e-6)
    assert cross_entropy(a_s, labels_of(0, 8, 10)).item() == pytest.approx(ce_by_hand(a_s, labels_of(0, 8, 10)), rel=1e-5)


def test_unknown_divergence_is_an_error() -> None:
    a = torch.zeros(2, 3)
    with pytest.raises(ValueError, match="divergence must be one of kl, ce"):
        kd_loss(a, a, tau=1.0, divergence="js")


# ------------------------------------------------------------------------------ hypothesis
seeds = st.integers(0, 10_000)
taus = st.floats(0.5, 8.0)
lams = st.floats(0.0, 1.0)
sizes = st.integers(2, 7)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, tau=taus)
def test_kd_of_identical_logits_is_zero_and_kd_is_nonnegative(seed: int, tau: float) -> None:
    a_s, a_t = logits_of(seed, 2, batch=4, classes=5)
    assert abs(kd_loss(a_s, a_s, tau=tau).item()) < 1e-5
    assert kd_loss(a_s, a_t, tau=tau).item() >= -1e-6


@settings(max_examples=40, deadline=None)
@given(seed=seeds, tau=taus, shift_s=st.floats(-50, 50), shift_t=st.floats(-50, 50), row=st.integers(0, 3))
def test_kd_invariant_to_a_constant_added_to_a_row(seed: int, tau: float, shift_s: float, shift_t: float, row: int) -> None:
    a_s, a_t = logits_of(seed, 2, batch=4, classes=5)
    s2, t2 = a_s.clone(), a_t.clone()
    s2[row] += shift_s
    t2[row] += shift_t
    for div in ("kl", "ce"):
        assert kd_loss(s2, t2, tau=tau, divergence=div).item() == pytest.approx(
            kd_loss(a_s, a_t, tau=tau, divergence=div).item(), rel=1e-3, abs=1e-3)


@settings(max_examples=40, deadline=None)
@given(seed=seeds, tau=taus)
def test_kl_and_ce_give_the_same_student_gradient(seed: int, tau: float) -> None:
    a_s, a_t = logits_of(seed, 2, batch=4, classes=5)
    grads = []
    for div in ("kl", "ce"):
        s = a_s.clone().requires_grad_(True)
        kd_loss(s, a_t, tau=tau, divergence=div).backward()
        grads.append(s.grad)
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, n=sizes, lam=lams, tau=taus, name=st.sampled_from(GRAPHS))
def test_teachers_receive_no_gradient_from_kd_terms(seed: int, n: int, lam: float, tau: float, name: str) -> None:
    """The gradient reaching each sub-model's logits is that of its own L_i alone."""
    base = logits_of(seed, n, batch=3, classes=4)
    y = labels_of(seed, 3, 4)
    g = kdreg.get_teacher_graph(name, n)
    logits = [a.clone().requires_grad_(True) for a in base]
    kdreg.distillation_loss(logits, y, g, lam=lam, tau=tau).backward()
    for i in range(n):
        own = base[i].clone().requires_grad_(True)
        others = {j: base[j] for j in range(n)}
        submodel_loss(i, own, y, g, others, lam=lam, tau=tau).backward()
        torch.testing.assert_close(logits[i].grad, own.grad, rtol=1e-4, atol=1e-6)


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 12))
def test_ipkd_ta_m_weights_of_each_student_sum_to_one(n: int) -> None:
    g = kdreg.get_teacher_graph("ipkd-ta-m", n)
    for i in range(n - 1):
        teachers = g.teachers_of(i)
        assert sorted(t for t, _ in teachers) == list(range(i + 1, n))
        assert sum(w for _, w in teachers) == pytest.approx(1.0)
    assert g.teachers_of(n - 1) == []


@settings(max_examples=30, deadline=None)
@given(seed=seeds, lam=lams, tau=taus, div=st.sampled_from(["kl", "ce"]))
def test_ipkd_variants_coincide_for_two_submodels(seed: int, lam: float, tau: float, div: str) -> None:
    logits, y = logits_of(seed, 2, batch=4, classes=5), labels_of(seed, 4, 5)
    values = [kdreg.distillation_loss(logits, y, kdreg.get_teacher_graph(name, 2), lam=lam, tau=tau,
                                      divergence=div).item() for name in ("ipkd", "ipkd-ta-1", "ipkd-ta-m")]
    assert values[0] == pytest.approx(values[1], rel=1e-6) == pytest.approx(values[2], rel=1e-6)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, n=sizes, tau=taus, name=st.sampled_from(GRAPHS + ["subset"]))
def test_lam_zero_gives_equation_4(seed: int, n: int, tau: float, name: str) -> None:
    logits, y = logits_of(seed, n, batch=4, classes=5), labels_of(seed, 4, 5)
    options = {"teachers": {"0": [n - 1]}} if name == "subset" else {}
    g = kdreg.get_teacher_graph(name, n, **options)
    got = kdreg.distillation_loss(logits, y, g, lam=0.0, tau=tau).item()
    assert got == pytest.approx(sum(cross_entropy(a, y).item() for a in logits), rel=1e-5)


@st.composite
def subset_graphs(draw):  # type: ignore[no-untyped-def]
    n = draw(st.integers(2, 6))
    teachers = {}
    weights = {}
    for i in range(n - 1):
        ts = draw(st.lists(st.integers(i + 1, n - 1), unique=True, max_size=n - 1 - i))
        if ts:
            teachers[str(i)] = ts
            if draw(st.booleans()):
                weights[str(i)] = draw(st.lists(st.floats(0.05, 2.0), min_size=len(ts), max_size=len(ts)))
    return n, teachers, weights


@settings(max_examples=60, deadline=None)
@given(spec=subset_graphs(), seed=seeds, lam=lams, tau=taus, div=st.sampled_from(["kl", "ce"]))
def test_vectorised_loss_equals_per_edge_reference(spec, seed: int, lam: float, tau: float, div: str) -> None:  # type: ignore[no-untyped-def]
    n, teachers, weights = spec
    g = kdreg.get_teacher_graph("subset", n, teachers=teachers, weights=weights)
    logits, y = logits_of(seed, n, batch=3, classes=4), labels_of(seed, 3, 4)
    reference = 0.0
    for i in range(n):
        edges = g.teachers_of(i)
        ce = ce_by_hand(logits[i], y)
        if not edges:
            reference += ce
        else:
            reference += (1 - lam) * ce + lam * sum(w * kd_by_hand(logits[i], logits[t], tau, div) for t, w in edges)
        if str(i) in teachers and str(i) not in weights:
            assert all(w == pytest.approx(1 / len(teachers[str(i)])) for _, w in edges)
    got = kdreg.distillation_loss(logits, y, g, lam=lam, tau=tau, divergence=div).item()
    assert got == pytest.approx(reference, rel=1e-4, abs=1e-5)


def test_external_teacher_logits_are_used_and_detached() -> None:
    a, t = logits_of(3, 2, batch=4, classes=5)
    y = labels_of(3, 4, 5)
    g = TeacherGraph(1, (Edge(0, "teacher", 1.0),), external=("teacher",))
    a, t = a.clone().requires_grad_(True), t.clone().requires_grad_(True)
    loss = kdreg.distillation_loss([a], y, g, lam=0.5, tau=2.0, external={"teacher": t})
    assert loss.item() == pytest.approx(0.5 * ce_by_hand(a, y) + 0.5 * kd_by_hand(a, t.detach(), 2.0), rel=1e-5)
    loss.backward()
    assert t.grad is None and a.grad is not None
    with pytest.raises(KeyError, match="external teacher 'teacher'"):
        kdreg.distillation_loss([a], y, g, lam=0.5, tau=2.0)


def test_bad_arguments_are_rejected() -> None:
    logits, y = logits_of(0, 3, batch=2, classes=3), labels_of(0, 2, 3)
    g = kdreg.get_teacher_graph("ipkd", 3)
    with pytest.raises(ValueError, match="lam must be in"):
        kdreg.distillation_loss(logits, y, g, lam=1.5, tau=1.0)
    with pytest.raises(ValueError, match="2 logits given for a graph over 3"):
        kdreg.distillation_loss(logits[:2], y, g, lam=0.5, tau=1.0)
