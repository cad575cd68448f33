"""Divergences: what is distilled along each edge of a teacher graph.

Each built-in is checked against its paper's formula, written out here independently (in float64,
from probabilities, as the papers write them), for its value and its gradient; then invariants
(hypothesis), the graph rule with every divergence, the engine (every built-in graph with every
divergence, DKD's warm-up from the trainer's epoch), bad recipes through ``kdreg validate``, and
the plugin manager's place below the engine.
"""

from __future__ import annotations

import ast
import json
import math
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import Tensor

import kdreg
from kdreg import plugins
from kdreg.cli import main
from kdreg.divergence import Divergence
from kdreg.engine.run import Run
from kdreg.engine.step import LossSettings, backward
from kdreg.errors import RecipeError
from kdreg.losses import SoftmaxKD, cross_entropy

ROOT = Path(__file__).resolve().parent.parent
D = torch.float64


# ------------------------------------------------------------------------------ the papers' formulas
def softmax(a: Tensor) -> Tensor:
    e = (a - a.max(-1, keepdim=True).values).exp()
    return e / e.sum(-1, keepdim=True)


def z_score(a: Tensor) -> Tensor:
    """Sun et al. 2024: (z - mean) / std (the authors' std: Bessel's correction)."""
    c = a.shape[-1]
    mean = a.sum(-1, keepdim=True) / c
    std = (((a - mean) ** 2).sum(-1, keepdim=True) / (c - 1)).sqrt()
    return (a - mean) / std


def kl_paper(s: Tensor, t: Tensor, tau: float, standardise: bool = False, ce: bool = False) -> Tensor:
    """Hinton et al.: tau^2 * mean_b sum_c p_t (log p_t - log p_s) (ce: without p_t log p_t)."""
    if standardise:
        s, t = z_score(s), z_score(t)
    ps, pt = softmax(s / tau), softmax(t / tau)
    own = 0.0 if ce else pt * pt.log()
    return tau * tau * (own - pt * ps.log()).sum(-1).mean()


def dkd_paper(s: Tensor, t: Tensor, y: Tensor, tau: float, alpha: float, beta: float,
              scale: float = 1.0) -> Tensor:
    """Zhao et al. 2022, eq. 1-4: b = (p_gt, p_rest) and p_hat = p / p_rest over the non-target
    classes; TCKD = KL(b_T || b_S), NCKD = KL(p_hat_T || p_hat_S); tau^2 (alpha TCKD + beta NCKD)."""
    terms = []
    for b in range(s.shape[0]):
        ps, pt, g = softmax(s[b] / tau), softmax(t[b] / tau), int(y[b])
        rest = [c for c in range(s.shape[1]) if c != g]
        bs = torch.stack([ps[g], ps[rest].sum()])
        bt = torch.stack([pt[g], pt[rest].sum()])
        tckd = (bt * (bt.log() - bs.log())).sum()
        hs, ht = ps[rest] / bs[1], pt[rest] / bt[1]
        nckd = (ht * (ht.log() - hs.log())).sum()
        terms.append(alpha * tckd + beta * nckd)
    return scale * tau * tau * torch.stack(terms).mean()


def pearson(u: Tensor, v: Tensor) -> Tensor:
    du, dv = u - u.mean(), v - v.mean()
    return (du * dv).sum() / ((du * du).sum().sqrt() * (dv * dv).sum().sqrt())


def dist_paper(s: Tensor, t: Tensor, tau: float, beta: float, gamma: float) -> Tensor:
    """Huang et al. 2022, eq. 5-8: 1 - mean Pearson over samples (inter-class) and over classes
    (intra-class) of the softened probabilities, tau^2 (beta inter + gamma intra)."""
    ps, pt = softmax(s / tau), softmax(t / tau)
    inter = 1 - torch.stack([pearson(ps[b], pt[b]) for b in range(ps.shape[0])]).mean()
    intra = 1 - torch.stack([pearson(ps[:, c], pt[:, c]) for c in range(ps.shape[1])]).mean()
    return tau * tau * (beta * inter + gamma * intra)


def value_and_grad(fn: Callable[[Tensor], Tensor], s: Tensor) -> tuple[float, Tensor]:
    s = s.detach().clone().requires_grad_(True)
    value = fn(s)
    (grad,) = torch.autograd.grad(value, s)
    return value.item(), grad.to(D)


def logits(seed: int, b: int = 6, c: int = 7, scale: float = 3.0) -> tuple[Tensor, Tensor, Tensor]:
    g = torch.Generator().manual_seed(seed)
    s = torch.randn(b, c, generator=g, dtype=D) * scale
    t = torch.randn(b, c, generator=g, dtype=D) * scale
    y = torch.randint(0, c, (b,), generator=g)
    return s, t, y


CASES: list[tuple[str, dict[str, Any], Callable[..., Tensor]]] = [
    ("kl", {}, lambda s, t, y, tau: kl_paper(s, t, tau)),
    ("ce", {}, lambda s, t, y, tau: kl_paper(s, t, tau, ce=True)),
    ("kl", {"standardise": True}, lambda s, t, y, tau: kl_paper(s, t, tau, standardise=True)),
    ("ce", {"standardise": True}, lambda s, t, y, tau: kl_paper(s, t, tau, standardise=True, ce=True)),
    ("dkd", {}, lambda s, t, y, tau: dkd_paper(s, t, y, tau, 1.0, 8.0)),
    ("dkd", {"alpha": 0.5, "beta": 2.0, "warmup": 0}, lambda s, t, y, tau: dkd_paper(s, t, y, tau, 0.5, 2.0)),
    ("dist", {}, lambda s, t, y, tau: dist_paper(s, t, tau, 1.0, 1.0)),
    ("dist", {"beta": 2.0, "gamma": 0.5}, lambda s, t, y, tau: dist_paper(s, t, tau, 2.0, 0.5)),
]


@pytest.mark.parametrize("name,options,paper", CASES, ids=[f"{n}-{o}" for n, o, _ in CASES])
@pytest.mark.parametrize("tau", [1.0, 4.0])
def test_each_divergence_is_its_papers_formula_value_and_gradient(
        name: str, options: dict[str, Any], paper: Callable[..., Tensor], tau: float) -> None:
    div = kdreg.build_divergence(name, **options)
    for seed in range(3):
        s, t, y = logits(seed)
        got, got_grad = value_and_grad(lambda a, t=t, y=y: div(a.float(), t.float(), tau=tau, labels=y), s)
        want, want_grad = value_and_grad(lambda a, t=t, y=y: paper(a, t, y, tau), s)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-6), (seed, got, want)
        assert torch.allclose(got_grad, want_grad, rtol=1e-3, atol=1e-6), (seed, got_grad - want_grad)


def test_the_defaults_are_the_papers() -> None:
    dkd = kdreg.build_divergence("dkd")
    assert (dkd.alpha, dkd.beta, dkd.warmup) == (1.0, 8.0, 20)   # type: ignore[attr-defined]
    dist = kdreg.build_divergence("dist")
    assert (dist.beta, dist.gamma) == (1.0, 1.0)                   # type: ignore[attr-defined]
    assert isinstance(kdreg.build_divergence("kl"), SoftmaxKD)


def test_dkd_warm_up_scales_by_epoch_over_warmup() -> None:
    s, t, y = (x.float() if x.is_floating_point() else x for x in logits(5))
    dkd = kdreg.build_divergence("dkd", warmup=20)
    full = dkd(s, t, tau=4.0, labels=y, epoch=None).item()
    assert full == pytest.approx(dkd_paper(s.double(), t.double(), y, 4.0, 1.0, 8.0).item(), rel=1e-5)
    for epoch, factor in [(1, 1 / 20), (10, 0.5), (20, 1.0), (35, 1.0)]:
        assert dkd(s, t, tau=4.0, labels=y, epoch=epoch).item() == pytest.approx(factor * full, rel=1e-6)
    no_warmup = kdreg.build_divergence("dkd", warmup=0)
    assert no_warmup(s, t, tau=4.0, labels=y, epoch=1).item() == pytest.approx(full, rel=1e-6)


def test_dkd_takes_the_dominant_class_of_soft_targets() -> None:
    s, t, y = (x.float() if x.is_floating_point() else x for x in logits(6))
    soft = 0.7 * torch.nn.functional.one_hot(y, 7).float() + 0.3 / 7
    dkd = kdreg.build_divergence("dkd")
    assert dkd(s, t, tau=2.0, labels=soft).item() == dkd(s, t, tau=2.0, labels=y).item()


# ------------------------------------------------------------------------------ invariants
seeds = st.integers(0, 10_000)
taus = st.floats(0.5, 8.0)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, tau=taus, scale=st.floats(0.1, 6.0))
def test_kl_is_tckd_plus_teacher_rest_mass_times_nckd(seed: int, tau: float, scale: float) -> None:
    """DKD's eq. 5, per sample: KL = TCKD + (1 - p_T^gt) NCKD. So DKD with alpha = beta = 1 is not
    KL: it is at least KL (the NCKD term is not scaled down), equal only when NCKD = 0."""
    s, t, y = (x.float() if x.is_floating_point() else x for x in logits(seed, b=1, scale=scale))
    kl = kdreg.build_divergence("kl")(s, t, tau=tau, labels=y).item()
    tckd = kdreg.build_divergence("dkd", alpha=1.0, beta=0.0, warmup=0)(s, t, tau=tau, labels=y).item()
    nckd = kdreg.build_divergence("dkd", alpha=0.0, beta=1.0, warmup=0)(s, t, tau=tau, labels=y).item()
    p_gt = torch.softmax(t / tau, -1)[0, y[0]].item()
    assert kl == pytest.approx(tckd + (1 - p_gt) * nckd, rel=1e-4, abs=2e-5)
    both = kdreg.build_divergence("dkd", alpha=1.0, beta=1.0, warmup=0)(s, t, tau=tau, labels=y).item()
    assert both >= kl - 1e-5


@settings(max_examples=30, deadline=None)
@given(seed=seeds, tau=taus, kind=st.sampled_from(["kl", "ce"]), data=st.data())
def test_standardised_kd_ignores_each_samples_scale_and_shift(seed: int, tau: float, kind: str,
                                                              data: st.DataObject) -> None:
    """Logit standardisation: a positive affine map of either model's logits, per sample, changes
    nothing; without it the value moves."""
    s, t, y = (x.float() if x.is_floating_point() else x for x in logits(seed))
    a = torch.tensor(data.draw(st.lists(st.floats(0.3, 3.0), min_size=6, max_size=6)))[:, None]
    b = torch.tensor(data.draw(st.lists(st.floats(-5.0, 5.0), min_size=6, max_size=6)))[:, None]
    on, off = kdreg.build_divergence(kind, standardise=True), kdreg.build_divergence(kind)
    assert on(a * s + b, t, tau=tau, labels=y).item() == pytest.approx(on(s, t, tau=tau, labels=y).item(), rel=1e-4, abs=1e-5)
    assert on(s, a * t + b, tau=tau, labels=y).item() == pytest.approx(on(s, t, tau=tau, labels=y).item(), rel=1e-4, abs=1e-5)
    scaled = (a.max() / a.min()).item() > 1.5   # far from a plain shift: plain KD moves
    if scaled:
        assert off(a * s + b, t, tau=tau, labels=y).item() != pytest.approx(off(s, t, tau=tau, labels=y).item(), rel=1e-3)


@settings(max_examples=30, deadline=None)
@given(seed=seeds, tau=taus, shift=st.floats(-20.0, 20.0))
def test_dist_relations(seed: int, tau: float, shift: float) -> None:
    """DIST compares softmax probabilities: a shift of a sample's logits changes nothing; it is
    symmetric in student and teacher, and 0 when they agree."""
    s, t, y = (x.float() if x.is_floating_point() else x for x in logits(seed))
    dist = kdreg.build_divergence("dist")
    base = dist(s, t, tau=tau, labels=y).item()
    per_sample = shift * torch.linspace(-1, 1, 6)[:, None]
    assert dist(s + per_sample, t, tau=tau, labels=y).item() == pytest.approx(base, rel=1e-4, abs=1e-5)
    assert dist(t, s, tau=tau, labels=y).item() == pytest.approx(base, rel=1e-4, abs=1e-5)
    # the inter-class relation is 0 when they agree (the intra-class one too, but for classes
    # whose probability hardly varies over the batch: the 1e-8 added to the norms makes them count
    # as uncorrelated, as in the authors' code)
    inter = kdreg.build_divergence("dist", beta=1.0, gamma=0.0)
    assert abs(inter(t, t, tau=tau, labels=y).item()) < 1e-4 * tau * tau


# ------------------------------------------------------------------------------ the graph rule
class Wrapped(Divergence):
    """A divergence kdreg cannot recognise: it is called once per edge."""

    def __init__(self, inner: Divergence):
        self.inner = inner

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        return self.inner(student, teacher, tau=tau, labels=labels, epoch=epoch)


def rule(outs: list[Tensor], y: Tensor, graph: kdreg.TeacherGraph, lam: float, tau: float,
         div: Divergence, external: dict[str, Tensor], epoch: int | None = None) -> Tensor:
    """L = sum_i [(1 - lam) CE + lam sum_(t, w) w D(a_i, sg(a_t))], CE alone without teachers."""
    total = torch.zeros(())
    for i, a in enumerate(outs):
        edges = graph.teachers_of(i)
        if not edges:
            total = total + cross_entropy(a, y)
            continue
        kd = sum(w * div(a, (outs[t] if isinstance(t, int) else external[t]).detach(), tau=tau,
                         labels=y, epoch=epoch) for t, w in edges)
        total = total + (1 - lam) * cross_entropy(a, y) + lam * kd
    return total


@pytest.mark.parametrize("name,options", [("kl", {}), ("ce", {}), ("kl", {"standardise": True}),
                                          ("dkd", {}), ("dist", {})])
@pytest.mark.parametrize("graph", ["ipkd", "ipkd-ta-1", "ipkd-ta-m"])
def test_the_graph_loss_applies_every_divergence_per_edge(name: str, options: dict[str, Any], graph: str) -> None:
    torch.manual_seed(0)
    outs = [torch.randn(8, 5, requires_grad=True) for _ in range(4)]
    ext = {"teacher:full": torch.randn(8, 5)}
    y = torch.randint(0, 5, (8,))
    g = kdreg.get_teacher_graph(graph, 4)
    g = kdreg.TeacherGraph(4, (*g.edges, kdreg.Edge(0, "teacher:full", 0.5)), external=("teacher:full",))
    div = kdreg.build_divergence(name, **options)
    for d in (div, Wrapped(div)):    # the vectorised path of kl / ce and the per-edge one
        got = kdreg.distillation_loss(outs, y, g, lam=0.7, tau=3.0, divergence=d, external=ext, epoch=4)
        want = rule(outs, y, g, 0.7, 3.0, div, ext, epoch=4)
        assert got.item() == pytest.approx(want.item(), rel=1e-5)
        grads = torch.autograd.grad(got, outs)
        want_grads = torch.autograd.grad(want, outs)
        assert all(torch.allclose(a, b, rtol=1e-4, atol=1e-6) for a, b in zip(grads, want_grads))


def test_kl_and_ce_take_the_vectorised_path(monkeypatch: pytest.MonkeyPatch) -> None:
    """Internal edges of kl / ce never call the divergence per edge (one einsum for all)."""
    def refuse(*_: Any, **__: Any) -> Tensor:
        raise AssertionError("kl called per edge")

    torch.manual_seed(1)
    outs = [torch.randn(4, 3, requires_grad=True) for _ in range(3)]
    y = torch.randint(0, 3, (4,))
    g = kdreg.get_teacher_graph("ipkd-ta-m", 3)
    before = {d: kdreg.distillation_loss(outs, y, g, lam=0.5, tau=2.0, divergence=d) for d in ("kl", "ce")}
    monkeypatch.setattr(SoftmaxKD, "__call__", refuse)
    for d in ("kl", "ce"):
        assert torch.equal(kdreg.distillation_loss(outs, y, g, lam=0.5, tau=2.0, divergence=d), before[d])


def test_a_name_is_a_registered_divergence_with_its_defaults() -> None:
    torch.manual_seed(2)
    outs = [torch.randn(4, 3) for _ in range(2)]
    y = torch.randint(0, 3, (4,))
    g = kdreg.get_teacher_graph("ipkd", 2)
    for name in ("dkd", "dist"):
        by_name = kdreg.distillation_loss(outs, y, g, lam=0.5, tau=2.0, divergence=name, epoch=3)
        built = kdreg.distillation_loss(outs, y, g, lam=0.5, tau=2.0, divergence=kdreg.build_divergence(name), epoch=3)
        assert torch.equal(by_name, built)
    with pytest.raises(KeyError, match=r"unknown divergence 'dkdd' \(did you mean dkd\?\); registered: ce, dist, dkd, hard, kl"):
        kdreg.distillation_loss(outs, y, g, lam=0.5, tau=2.0, divergence="dkdd")


# ------------------------------------------------------------------------------ the engine
GRAPH_STAGES = """
[[stages]]
name = "heads"
backbone = {{ name = "tiny_exits", channels = 4 }}
graph = "ipkd-ta-m"
divergence = {div}
[[stages]]
name = "slim"
backbone = {{ name = "tiny_slimmable", channels = 4 }}
graph = "ipkd"
divergence = {div}
[[stages]]
name = "assist"
backbone = {{ name = "tiny_slimmable", channels = 4 }}
graph = "ipkd-ta-1"
divergence = {div}
[[stages]]
name = "some"
backbone = {{ name = "tiny_exits", channels = 4 }}
graph = {{ name = "subset", teachers = {{ "0" = [1, 2], "1" = [2] }} }}
divergence = {div}
[[stages]]
name = "student"
backbone = {{ name = "tiny_exits", channels = 4, exits = 2 }}
graph = {{ name = "kd", teacher = "heads" }}
divergence = {div}
[[stages]]
name = "ensemble"
backbone = {{ name = "tiny_exits", channels = 4, exits = 1 }}
graph = {{ name = "kd", teacher = ["heads", "slim"] }}
divergence = {div}
[[stages]]
name = "cohort"
backbone = {{ name = "tiny_exits", channels = 4, exits = 1 }}
graph = {{ name = "cohort", teacher = "heads" }}
divergence = {div}
[[stages]]
name = "chain"
chain = ["heads", {{ name = "tiny_exits", channels = 4, exits = 1 }}]
divergence = {div}
"""

TINY = """
name = "divergences"
seed = 0
[data]
dataset = "synthetic"
batch_size = 16
val_split = 0
options = {{ train_size = 32, test_size = 16, num_classes = 4, image_size = 16 }}
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "constant" }}
device = "cpu"
precision = "fp32"
"""

DIVERGENCES = ['"kl"', '"ce"', '{ name = "kl", standardise = true }', '{ name = "dkd", warmup = 0 }', '"dist"']


def train(tmp_path: Path, text: str, name: str) -> list[dict[str, Any]]:
    path = tmp_path / f"{name}.toml"
    path.write_text(text)
    run = Run.start(path, tmp_path / name, progress=False)
    assert run.execute()["finished"] is True
    return [json.loads(line) for line in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]


def test_every_graph_trains_with_every_divergence(tmp_path: Path, one_thread: None) -> None:
    losses: dict[str, dict[str, float]] = {}
    for k, div in enumerate(DIVERGENCES):
        records = train(tmp_path, TINY.format(epochs=1) + GRAPH_STAGES.format(div=div), f"d{k}")
        assert len(records) == 8
        for r in records:
            assert math.isfinite(r["train_loss"]), (div, r)
            losses.setdefault(r["stage"], {})[div] = r["train_loss"]
    for stage, by_div in losses.items():   # the same data and weights: each divergence trains its way
        values = list(by_div.values())
        assert len(set(values)) == len(values), (stage, by_div)


class Epochs(Divergence):
    """Records the epoch of every call."""

    seen: list[int | None] = []

    def __call__(self, student: Tensor, teacher: Tensor, *, tau: float, labels: Tensor,
                 epoch: int | None = None) -> Tensor:
        if student.shape[0] == 16:     # a training batch, not the probe kdreg calls when it builds it
            Epochs.seen.append(epoch)
        return kdreg.build_divergence("kl")(student, teacher, tau=tau, labels=labels)


class EpochPlugin:
    @staticmethod
    @kdreg.hookimpl
    def kdreg_register_divergences(register: Any) -> None:
        register("epochs", lambda: Epochs(), "records epochs")


def test_the_trainer_passes_each_epoch_to_the_divergence(tmp_path: Path, one_thread: None) -> None:
    plugins.reset(plugins.make_plugin_manager(extra=[EpochPlugin()]))
    try:
        Epochs.seen.clear()
        text = TINY.format(epochs=3) + '[[stages]]\nname = "s"\nbackbone = { name = "tiny_exits", channels = 4 }\n' \
                                       'graph = "ipkd"\ndivergence = "epochs"\n'
        train(tmp_path, text, "epochs")
        # two steps of each epoch, two edges (ipkd over three exits) each
        assert Epochs.seen == [1] * 4 + [2] * 4 + [3] * 4
    finally:
        plugins.reset()


@pytest.mark.parametrize("backbone", ["tiny_exits", "tiny_slimmable"])   # one pass, a pass each
def test_dkd_warm_up_changes_the_engines_loss_with_the_epoch(backbone: str) -> None:
    torch.manual_seed(3)
    model = kdreg.build_backbone(backbone, num_classes=4, input_size=(16, 16), channels=4)
    model.eval()   # the same BN statistics at every call
    g = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 4, (8,))
    dkd = kdreg.build_divergence("dkd", warmup=4)

    def loss_at(epoch: int | None) -> float:
        model.zero_grad()
        return backward(model, x, y, LossSettings(g, 1.0, 4.0, dkd, epoch=epoch)).loss.item()

    # CE of the largest exit (no teachers) + min(epoch / 4, 1) * (the DKD terms of the others)
    at = {e: loss_at(e) for e in (1, 2, 4, 9, None)}
    step = at[2] - at[1]
    assert step > 0 and at[4] - at[1] == pytest.approx(3 * step, rel=1e-2)   # differences of fp32 sums
    assert at[9] == pytest.approx(at[4], rel=1e-6) and at[None] == pytest.approx(at[4], rel=1e-6)


# ------------------------------------------------------------------------------ bad input
BAD = TINY.format(epochs=1) + """
[[stages]]
name = "teacher"
backbone = { name = "tiny_exits", channels = 4 }
[[stages]]
name = "student"
backbone = { name = "tiny_exits", channels = 4 }
graph = { name = "kd", teacher = "teacher" }
divergence = DIV
"""


@pytest.mark.parametrize("div,lines", [
    ('"dkdd"', ["unknown divergence 'dkdd' (did you mean dkd?); registered: ce, dist, dkd, hard, kl "
                "@ recipe.stages.student.divergence.name"]),
    ('{ name = "KL" }', ["unknown divergence 'KL'; registered: ce, dist, dkd, hard, kl @ recipe.stages.student.divergence.name"]),
    ('{ name = "dkd", alpha = -1.0, beta = -8.0, warmup = -2 }',
     ["alpha must be a finite weight >= 0, got -1.0 @ recipe.stages.student.divergence.alpha",
      "beta must be a finite weight >= 0, got -8.0 @ recipe.stages.student.divergence.beta",
      "warmup must be >= 0 epochs (0: none), got -2 @ recipe.stages.student.divergence.warmup"]),
    ('{ name = "dist", beta = 0.0, gamma = 0.0 }',
     ["beta and gamma are 0: the divergence would be 0 @ recipe.stages.student.divergence.gamma"]),
    ('{ name = "dist", gamma = inf }',
     ["gamma must be a finite weight >= 0, got inf @ recipe.stages.student.divergence.gamma"]),
    ('{ name = "dkd", beta = "8", tau = 4.0 }',
     ["expected a number, got str '8' @ recipe.stages.student.divergence.beta",
      "unknown option 'tau' for divergence 'dkd'; accepted: alpha, beta, warmup @ recipe.stages.student.divergence.tau"]),
    ('{ name = "kl", standardise = 1 }', ["@ recipe.stages.student.divergence.standardise"]),
    ('{ alpha = 1.0 }', ["@ recipe.stages.student.divergence"]),
    ('"kl"\ntau = -4.0', ["tau must be > 0, got -4.0 @ recipe.stages.student.tau"]),
])
def test_bad_divergences_are_one_line_each_and_nothing_is_written(
        tmp_path: Path, div: str, lines: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD.replace("DIV", div))
    for argv in (["validate", str(path)], ["run", str(path), "--out", str(tmp_path / "out"), "--no-progress"]):
        assert main(argv) == 2
        err = capsys.readouterr().err.splitlines()
        assert len(err) == len(lines), err
        for line, want in zip(err, lines):
            assert line.startswith(f"error: {path}: ") and line.endswith(want), (line, want)
    assert not (tmp_path / "out").exists()


def test_a_divergence_that_breaks_the_contract_is_reported() -> None:
    class Vector(Divergence):
        def __call__(self, student: Tensor, teacher: Tensor, **_: Any) -> Tensor:
            return (student - teacher).pow(2).mean(-1)   # per sample: no batch mean

    class Plugin:
        @staticmethod
        @kdreg.hookimpl
        def kdreg_register_divergences(register: Any) -> None:
            register("vector", Vector)
            register("not-one", lambda: "kl")

    plugins.reset(plugins.make_plugin_manager(extra=[Plugin()]))
    try:
        with pytest.raises(RecipeError, match=r"returned a Vector that breaks the contract of "
                           r"kdreg_register_divergences: it returned a tensor of shape \[4\], not a scalar"):
            kdreg.build_divergence("vector")
        with pytest.raises(RecipeError, match=r"returned str, not a kdreg.divergence.Divergence"):
            kdreg.build_divergence("not-one")
    finally:
        plugins.reset()


def test_kdreg_list_divergences(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "divergences"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "divergences:" and [line.split()[0] for line in out[1:]] == ["ce", "dist", "dkd", "hard", "kl"]
    assert any("Decoupled KD (Zhao et al. CVPR 2022)" in line for line in out)


# ------------------------------------------------------------------------------ layering
def test_the_plugin_manager_loads_no_engine() -> None:
    code = ("import sys, kdreg.plugins; bad = sorted(m for m in sys.modules if m.startswith('kdreg.engine')); "
            "assert not bad, bad")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def imports(path: Path) -> list[tuple[str, bool]]:
    """``(module, at the top level)`` of every kdreg import of ``path``, TYPE_CHECKING blocks too."""
    tree = ast.parse(path.read_text())
    top = {id(n) for n in tree.body}
    out = []
    for node in ast.walk(tree):
        names = ([node.module or ""] + [f"{node.module}.{a.name}" for a in node.names]
                 if isinstance(node, ast.ImportFrom) else
                 [a.name for a in node.names] if isinstance(node, ast.Import) else [])
        out += [(n, id(node) in top) for n in names if n.startswith("kdreg")]
    return out


def test_registry_imports_plugins_one_way() -> None:
    mine = imports(ROOT / "kdreg" / "plugins.py")
    assert not [m for m, _ in mine if "registry" in m or "engine" in m or "create" in m], mine
    theirs = imports(ROOT / "kdreg" / "registry.py")
    assert ("kdreg.plugins", True) in theirs and all(top for _, top in theirs), theirs
