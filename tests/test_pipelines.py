"""Multi-stage pipelines: frozen teachers, kd and cohort graphs, TAKD chains, EKD and STC."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import kdreg
from kdreg import plugins
from kdreg.cli import main
from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.run import Run
from kdreg.engine.step import LossSettings, multi_pass_backward
from kdreg.errors import RecipeError
from kdreg.hookspecs import hookimpl
from kdreg.losses import cross_entropy, kd_loss
from kdreg.recipe import dump_recipe, parse_recipe
from kdreg.stages import TeacherStage, freeze

pytestmark = pytest.mark.usefixtures("one_thread")

HEAD = """
name = "pipe"
[data]
dataset = "cifar10-sample"
batch_size = 64
val_split = 100
train_limit = {limit}
test_limit = 100
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "constant" }}
log_interval = 4
"""


def write(tmp_path: Path, stages: str, epochs: int = 1, name: str = "r.toml", limit: int = 256) -> Path:
    """The recipe of ``stages`` on ``limit`` training images of the CIFAR-10 sample (batch 64)."""
    path = tmp_path / name
    path.write_text(HEAD.format(epochs=epochs, limit=limit) + stages)
    return path


def run(path: Path, out: Path, extra: list | None = None) -> tuple[Run, dict]:
    if extra:
        plugins.reset(plugins.make_plugin_manager(extra=extra))
    try:
        r = Run.start(path, out, progress=False)
        return r, r.execute()
    finally:
        if extra:
            plugins.reset()


def best(out: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(out / "checkpoints" / stage / "best.pt", weights_only=False)["model"]


def assert_bit_identical(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k].cpu(), b[k].cpu()), k


def metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# ----------------------------------------------------------------------------- graphs
def tiny(num_classes: int = 5, **options) -> kdreg.FlexibleBackbone:  # type: ignore[no-untyped-def]
    return kdreg.build_backbone("tiny_exits", num_classes=num_classes, input_size=(16, 16), **options)


def test_kd_graph_teaches_every_submodel_with_the_teachers_full_output() -> None:
    teacher = TeacherStage("teacher", tiny(exits=3))
    g = kdreg.get_teacher_graph("kd", 2, teacher=teacher)
    assert g.external == ("teacher:exit3",)
    assert sorted((e.student, e.teacher, e.weight) for e in g.edges) == [
        (0, "teacher:exit3", 1.0), (1, "teacher:exit3", 1.0)]
    other = TeacherStage("other", tiny(exits=1))
    ens = kdreg.get_teacher_graph("kd", 1, teacher=[teacher, other])
    assert sorted((e.teacher, e.weight) for e in ens.edges) == [("other:exit1", 0.5), ("teacher:exit3", 0.5)]
    with pytest.raises(RecipeError, match="more than once @ graph.teacher"):
        kdreg.get_teacher_graph("kd", 1, teacher=[teacher, teacher])
    # from Python a plain node name will do: the caller passes its logits under that name
    named = kdreg.get_teacher_graph("kd", 2, teacher="t56")
    assert named.external == ("t56",) and {e.teacher for e in named.edges} == {"t56"}
    x, y = torch.randn(4, 5), torch.randint(0, 5, (4,))
    t = torch.randn(4, 5)
    loss = kdreg.distillation_loss([x, x], y, named, lam=0.5, tau=2.0, external={"t56": t})
    torch.testing.assert_close(loss, 2 * (0.5 * cross_entropy(x, y) + 0.5 * kd_loss(x, t, tau=2.0)))
    with pytest.raises(RecipeError, match=r"must be an earlier stage .* @ graph.teacher"):
        kdreg.get_teacher_graph("cohort", 1, teacher="heads")


def test_cohort_graph_weights_every_output_by_one_over_k_plus_one() -> None:
    heads = TeacherStage("heads", tiny(exits=4))
    g = kdreg.get_teacher_graph("cohort", 1, teacher=heads)
    assert [(e.student, e.teacher, e.weight) for e in g.edges] == [
        (0, f"heads:exit{k}", 0.25) for k in range(1, 5)]


@settings(max_examples=30, deadline=None)
@given(k=st.integers(0, 4), lam=st.floats(0.0, 1.0), tau=st.floats(0.5, 8.0), seed=st.integers(0, 10_000),
       divergence=st.sampled_from(["kl", "ce"]))
def test_cohort_loss_is_ekd_eq_4_6_and_4_7(k: int, lam: float, tau: float, seed: int, divergence: str) -> None:
    """L = lam * 1/(K+1) sum_V KD(S|V) + (1 - lam) CE(S, y), written out term by term."""
    gen = torch.Generator().manual_seed(seed)
    student = torch.randn(6, 7, generator=gen, requires_grad=True)
    outputs = [torch.randn(6, 7, generator=gen) * 3 for _ in range(k + 1)]
    y = torch.randint(0, 7, (6,), generator=gen)
    heads = TeacherStage("heads", tiny(num_classes=7, exits=k + 1))
    g = kdreg.get_teacher_graph("cohort", 1, teacher=heads)
    external = dict(zip(heads.nodes(), outputs))
    loss = kdreg.distillation_loss([student], y, g, lam=lam, tau=tau, divergence=divergence, external=external)
    ekd = sum(kd_loss(student, o, tau=tau, divergence=divergence) for o in outputs) / (k + 1)
    expected = lam * ekd + (1 - lam) * cross_entropy(student, y)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)


@settings(max_examples=30, deadline=None)
@given(m=st.integers(2, 4), tau=st.floats(0.5, 8.0), seed=st.integers(0, 10_000),
       divergence=st.sampled_from(["kl", "ce"]))
def test_kd_ensemble_gradient_is_kd_against_the_averaged_soft_targets(m: int, tau: float, seed: int,
                                                                       divergence: str) -> None:
    gen = torch.Generator().manual_seed(seed)
    stages = [TeacherStage(f"t{i}", tiny(num_classes=4, exits=1)) for i in range(m)]
    g = kdreg.get_teacher_graph("kd", 1, teacher=stages)
    logits = [torch.randn(5, 4, generator=gen) * 2 for _ in range(m)]
    student = torch.randn(5, 4, generator=gen, requires_grad=True)
    y = torch.randint(0, 4, (5,), generator=gen)
    loss = kdreg.distillation_loss([student], y, g, lam=1.0, tau=tau, divergence=divergence,
                                   external={s.node(): a for s, a in zip(stages, logits)})
    (grad,) = torch.autograd.grad(loss, student)
    mean_p = torch.stack([torch.softmax(a / tau, -1) for a in logits]).mean(0)
    target = -tau * tau * (mean_p * torch.log_softmax(student / tau, -1)).sum(-1).mean()
    (expected,) = torch.autograd.grad(target, student)
    torch.testing.assert_close(grad, expected, rtol=1e-5, atol=1e-7)


# ----------------------------------------------------------------------------- chains
def test_a_chain_expands_into_one_kd_stage_per_link() -> None:
    r = parse_recipe("""
[[stages]]
name = "teacher"
backbone = "resnet20"
[[stages]]
name = "takd"
chain = ["teacher", "resnet14", { name = "resnet8", shortcut = "zero_pad" }]
lam = 0.7
tau = 4.0
""")
    assert [s.name for s in r.stages] == ["teacher", "takd_resnet14", "takd_resnet8"]
    a, b = r.stages[1:]
    assert a.graph.options == {"teacher": "teacher"} and b.graph.options == {"teacher": "takd_resnet14"}
    assert {a.graph.name, b.graph.name} == {"kd"} and a.link_of == b.link_of == "takd"
    assert (b.lam, b.tau, b.backbone.options) == (0.7, 4.0, {"shortcut": "zero_pad"})
    alone = parse_recipe('[[stages]]\nname = "c"\nchain = ["resnet20", "resnet8"]\n')
    assert [(s.name, s.graph.name) for s in alone.stages] == [("c_resnet20", "none"), ("c_resnet8", "kd")]
    assert parse_recipe(dump_recipe(r)) == r  # the run directory's resolved recipe resumes as is
    with pytest.raises(RecipeError) as exc:
        parse_recipe('[[stages]]\nname = "c"\nchain = ["resnet8"]\ngraph = "none"\n')
    assert len(exc.value.problems) == 2
    assert "a chain stage takes no graph" in exc.value.problems[0] and "@ recipe.stages.c.graph" in exc.value.problems[0]
    assert "at least two links" in exc.value.problems[1] and "@ recipe.stages.c.chain" in exc.value.problems[1]


def test_two_link_takd_chain_end_to_end(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[stages]]
name = "takd"
chain = ["resnet14", "resnet8", { name = "tiny_exits", exits = 2 }]
lam = 0.9
tau = 4.0
""")
    r, results = run(path, tmp_path / "run")
    names = [s["name"] for s in results["stages"]]
    assert names == ["takd_resnet14", "takd_resnet8", "takd_tiny_exits"]
    first, mid, last = results["stages"]
    assert (first["graph"], first["teachers"]) == ("none", [])
    assert (mid["graph"], mid["teachers"], mid["chain"]) == ("kd", ["takd_resnet14"], "takd")
    assert (last["teachers"], last["submodels"]) == (["takd_resnet8"], ["exit1", "exit2"])
    for stage in results["stages"]:
        assert len(stage["test_accuracy"]) == len(stage["params"]) == len(stage["submodels"])
    # both frozen links are bit-identical to their selected weights after everything ran
    assert_bit_identical(r.models["takd_resnet14"].state_dict(), best(tmp_path / "run", "takd_resnet14"))
    assert_bit_identical(r.models["takd_resnet8"].state_dict(), best(tmp_path / "run", "takd_resnet8"))


def test_an_ensemble_of_frozen_teachers_end_to_end(tmp_path: Path) -> None:
    path = write(tmp_path, """
[[stages]]
name = "a"
backbone = "resnet8"
[[stages]]
name = "b"
backbone = { name = "tiny_exits", exits = 2 }
[[stages]]
name = "student"
backbone = "resnet8"
graph = { name = "kd", teacher = ["a", "b"] }
""")
    r, results = run(path, tmp_path / "run")
    assert results["stages"][2]["teachers"] == ["a", "b"]
    plan = r.plans[2]
    assert plan.nodes == {"a:full": ("a", 0), "b:exit2": ("b", 1)}
    assert sorted((e.teacher, e.weight) for e in plan.graph.edges) == [("a:full", 0.5), ("b:exit2", 0.5)]
    for name in ("a", "b"):
        assert_bit_identical(r.models[name].state_dict(), best(tmp_path / "run", name))


# ----------------------------------------------------------------------------- frozen teachers
class Spy:
    """A real plugin: during the student's stage, counts the frozen heads model's forwards (and its
    trunk's) and checks each sees the batch the student sees next."""

    def __init__(self) -> None:
        self.calls = {"heads": 0, "trunk": 0, "student": 0}
        self.mismatch = 0
        self.counting = False
        self.seen: torch.Tensor | None = None

    @hookimpl
    def kdreg_run_started(self, run):  # type: ignore[no-untyped-def]
        heads, student = run.plans[1].model, run.plans[2].model

        def on_heads(module, args):  # type: ignore[no-untyped-def]
            if self.counting:
                self.calls["heads"] += 1
                self.seen = args[0]

        def on_trunk(module, args):  # type: ignore[no-untyped-def]
            self.calls["trunk"] += self.counting

        def on_student(module, args):  # type: ignore[no-untyped-def]
            if self.counting and module.training:
                self.calls["student"] += 1
                self.mismatch += self.seen is None or not torch.equal(args[0], self.seen)
                self.seen = None

        heads.register_forward_pre_hook(on_heads)
        heads.trunk.stem.register_forward_pre_hook(on_trunk)
        student.register_forward_pre_hook(on_student)

    @hookimpl
    def kdreg_stage_finished(self, run, stage, result):  # type: ignore[no-untyped-def]
        self.counting = stage == "heads"  # from here on the student's stage runs


EKD = """
[[stages]]
name = "teacher"
backbone = "resnet8"
[[stages]]
name = "heads"
backbone = { name = "exits", trunk = "teacher", points = ["layer1", "layer2"], head = "flatten_linear", freeze_trunk = true }
[[stages]]
name = "student"
backbone = "resnet8"
graph = { name = "cohort", teacher = "heads" }
lam = 0.9
tau = 5.0
"""


def test_ekd_with_two_heads_end_to_end(tmp_path: Path) -> None:
    spy = Spy()
    r, results = run(write(tmp_path, EKD), tmp_path / "run", extra=[spy])
    teacher, heads, student = results["stages"]
    assert heads["submodels"] == ["exit1", "exit2", "final"] and heads["builds_on"] == ["teacher"]
    assert (student["graph"], student["teachers"]) == ("cohort", ["heads"])
    plan = r.plans[2]
    assert plan.graph.external == ("heads:exit1", "heads:exit2", "heads:final")
    assert [e.weight for e in plan.graph.edges] == pytest.approx([1 / 3] * 3)
    # the teacher's weights (BN statistics included) are unchanged by the heads and student stages
    assert_bit_identical(r.plans[1].model.trunk.state_dict(), best(tmp_path / "run", "teacher"))
    assert_bit_identical(r.models["heads"].state_dict(), best(tmp_path / "run", "heads"))
    assert heads["test_accuracy"][-1] == teacher["test_accuracy"][0]
    # the frozen heads model runs once per student step (its trunk once for all heads), on the
    # student's own augmented batch, and not at all when the student is evaluated
    steps = 256 // 64  # train_limit images (val_split is held out besides), full batches
    assert spy.calls == {"heads": steps, "trunk": steps, "student": steps}
    assert spy.mismatch == 0


# ----------------------------------------------------------------------------- STC
STC = """
[[stages]]
name = "teacher"
backbone = "wrn16_2"
[[stages]]
name = "student"
backbone = "resnet8"
{student}
"""


def stc_plan(tmp_path: Path, student: str) -> tuple:  # type: ignore[type-arg]
    recipe = parse_recipe(STC.format(student=student))
    plans = assemble(recipe, DataShape(10), seed=0)
    freeze(plans[0].model)
    return plans


def test_stc_adapter_joins_other_channel_counts_and_rejects_other_ranks(tmp_path: Path) -> None:
    plans = stc_plan(tmp_path, 'bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2" }')
    bridge = plans[1].bridge
    assert bridge.shapes == ((32, 16, 16), (64, 16, 16))
    assert isinstance(bridge.adapter[0], torch.nn.Conv2d) and isinstance(bridge.adapter[1], torch.nn.BatchNorm2d)
    plans = stc_plan(tmp_path, 'bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer3" }')
    assert plans[1].bridge.shapes == ((32, 16, 16), (128, 8, 8))
    x = torch.randn(2, 32, 16, 16)
    assert plans[1].bridge.adapter(x).shape == (2, 128, 8, 8)
    assert not any(p is q for p in plans[1].bridge.parameters() for q in plans[0].model.parameters())


def test_stc_gradient_flows_through_the_frozen_teachers_back_part(tmp_path: Path) -> None:
    """alpha = 1: only L_STC. The student's front gets gradient (through the teacher), its back
    none, the teacher none; the value and gradients equal the collaboration network written out."""
    torch.manual_seed(0)
    plans = stc_plan(tmp_path, 'bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", alpha = 1.0 }')
    teacher, plan = plans[0].model, plans[1]
    student, bridge = plan.model, plan.bridge
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))
    with torch.no_grad():
        o_t = teacher(x)[0]
    student.train()
    out = multi_pass_backward(student, x, y, LossSettings(plan.graph, 0.0, 1.0, bridge=bridge), {}, bridge_logits=o_t)
    for name, p in student.named_parameters():
        if name.startswith(("stem", "layer1", "layer2")):
            assert p.grad is not None and p.grad.abs().sum() > 0, name
        else:
            assert p.grad is None or p.grad.abs().sum() == 0, name
    assert all(p.grad is None for p in teacher.parameters())
    got = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
    student.zero_grad(set_to_none=True)
    bridge.zero_grad(set_to_none=True)
    h = student.forward_front(x, "layer2")
    o_c = teacher.forward_back(bridge.adapter(h), "layer2")
    expected = -(torch.softmax(o_t, -1) * torch.log_softmax(o_c, -1)).sum(-1).mean()
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for n, g in got.items():
        ref = student.get_parameter(n).grad
        if ref is None:  # the student's back part: L_STC does not depend on it
            assert g.abs().sum() == 0, n
        else:
            torch.testing.assert_close(g, ref, msg=n)


@pytest.mark.parametrize("target", ["soft", "label"])
def test_stc_targets(tmp_path: Path, target: str) -> None:
    plans = stc_plan(tmp_path, f'tau = 3.0\nbridge = {{ name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", target = "{target}" }}')
    teacher, bridge, student = plans[0].model, plans[1].bridge, plans[1].model
    x, y = torch.randn(3, 3, 32, 32), torch.randint(0, 10, (3,))
    o_t = teacher(x)[0].detach()
    h = student.forward_front(x, "layer2")
    value = bridge(h, kdreg.BridgeBatch(y, o_t, 3.0))
    o_c = teacher.forward_back(bridge.adapter(h), "layer2")
    if target == "label":
        expected = torch.nn.functional.cross_entropy(o_c, y)
    else:
        expected = -9.0 * (torch.softmax(o_t / 3, -1) * torch.log_softmax(o_c / 3, -1)).sum(-1).mean()
    torch.testing.assert_close(value, expected)


def test_stc_hard_target_is_ce_against_the_teachers_argmax(tmp_path: Path) -> None:
    """``target = "hard"`` (stc Table 5: the output-tensor target as a hard target): the value is
    the mean of -log softmax(O_c)[argmax O_t], written out here with a gather, and alpha = 1 gives
    the student's front and the adapter that loss's gradients, through the teacher's back part."""
    torch.manual_seed(0)
    plans = stc_plan(tmp_path, 'bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", alpha = 1.0, target = "hard" }')
    teacher, plan = plans[0].model, plans[1]
    student, bridge = plan.model, plan.bridge
    x, y = torch.randn(6, 3, 32, 32), torch.randint(0, 10, (6,))
    with torch.no_grad():
        o_t = teacher(x)[0]
    predicted = o_t.argmax(-1)
    assert not torch.equal(predicted, y)            # the target is the teacher's class, not the label

    def written_out() -> torch.Tensor:
        o_c = teacher.forward_back(bridge.adapter(student.forward_front(x, "layer2")), "layer2")
        return -torch.log_softmax(o_c, -1).gather(1, predicted[:, None]).squeeze(1).mean()

    student.train()
    bridge.train()
    h = student.forward_front(x, "layer2")
    value = bridge(h, kdreg.BridgeBatch(y, o_t, 3.0))
    torch.testing.assert_close(value, written_out())
    soft = bridge_output_target(bridge, h, y, o_t)
    assert abs(value.item() - soft.item()) > 1e-3   # not the softmax reading of the same output

    student.zero_grad(set_to_none=True)
    bridge.zero_grad(set_to_none=True)
    out = multi_pass_backward(student, x, y, LossSettings(plan.graph, 0.0, 1.0, bridge=bridge), {}, bridge_logits=o_t)
    got = {n: p.grad.clone() for n, p in [*student.named_parameters(), *bridge.named_parameters(prefix="bridge")]
           if p.grad is not None}
    assert any(n.startswith("bridge.adapter.") for n in got)
    assert all(p.grad is None for p in teacher.parameters())
    student.zero_grad(set_to_none=True)
    bridge.zero_grad(set_to_none=True)
    expected = written_out()
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    reference = {n: p.grad for n, p in [*student.named_parameters(), *bridge.named_parameters(prefix="bridge")]
                 if p.grad is not None}
    assert set(reference) <= set(got) and len(reference) > 4
    for n, g in got.items():
        if n in reference:
            torch.testing.assert_close(g, reference[n], msg=n)
        else:                                           # the student's back part: no L_STC gradient
            assert g.abs().sum() == 0, n


def bridge_output_target(bridge: torch.nn.Module, h: torch.Tensor, y: torch.Tensor, o_t: torch.Tensor) -> torch.Tensor:
    """The same bridge's value with ``target = "output"`` (the softmax of the teacher's logits)."""
    target, bridge.target = bridge.target, "output"
    try:
        return bridge(h, kdreg.BridgeBatch(y, o_t, 3.0))
    finally:
        bridge.target = target


def test_validate_rejects_an_unknown_stc_target(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, STC.format(student='bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", target = "argmax" }'))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.splitlines()
    assert len(err) == 1, err
    assert err[0].endswith("expected one of 'output', 'hard', 'soft', 'label', got 'argmax' "
                           "@ recipe.stages.student.bridge.target"), err
    path.write_text(path.read_text().replace('"argmax"', '"hard"'))
    assert main(["validate", str(path)]) == 0


@pytest.mark.parametrize("kd", [False, True], ids=["stc", "stc+kd"])
def test_stc_end_to_end_leaves_the_teacher_bit_identical(tmp_path: Path, kd: bool) -> None:
    graph = 'graph = { name = "kd", teacher = "teacher" }\nlam = 0.9\ntau = 4.0\n' if kd else ""
    path = write(tmp_path, STC.format(student=graph + 'bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", alpha = 0.3 }'), limit=128)
    r, results = run(path, tmp_path / "run")
    teacher, student = results["stages"]
    assert student["bridge"] == "stc" and student["teachers"] == ["teacher"]
    assert student["graph"] == ("kd" if kd else "none")
    assert student["params"] == [78042]  # the student alone: no adapter, no teacher
    assert_bit_identical(r.models["teacher"].state_dict(), best(tmp_path / "run", "teacher"))
    assert all(not p.requires_grad for p in r.models["teacher"].parameters())
    # the student's checkpoint is the student alone; inference needs no teacher
    assert_bit_identical(r.models["student"].state_dict(), best(tmp_path / "run", "student"))
    last = torch.load(tmp_path / "run" / "checkpoints" / "student" / "last.pt", weights_only=False)
    assert set(last["bridge"]) == {"adapter.0.weight", "adapter.1.weight", "adapter.1.bias",
                                   "adapter.1.running_mean", "adapter.1.running_var",
                                   "adapter.1.num_batches_tracked"}


def test_no_teacher_parameter_is_in_the_optimizer(tmp_path: Path) -> None:
    from kdreg.data import load_data

    path = write(tmp_path, STC.format(student='graph = { name = "kd", teacher = "teacher" }\nbridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2" }'))
    r = Run.start(path, tmp_path / "run", progress=False)
    splits = load_data(r.recipe.data)
    r.plans = assemble(r.recipe, DataShape.of(splits), seed=0)
    trainer = r._trainer(r.plans[1], splits)
    in_opt = {id(p) for g in trainer.optimizer.param_groups for p in g["params"]}
    assert not in_opt & {id(p) for p in r.plans[0].model.parameters()}
    assert {id(p) for p in r.plans[1].bridge.parameters()} <= in_opt
    assert {id(p) for p in r.plans[1].model.parameters()} <= in_opt


def test_stc_with_alpha_zero_is_exactly_plain_training(tmp_path: Path) -> None:
    stages = STC.replace('backbone = "wrn16_2"\n', 'backbone = "wrn16_2"\nepochs = 1\n', 1)   # the student: 2
    plain = write(tmp_path, stages.format(student=""), epochs=2, name="plain.toml", limit=128)
    stc = write(tmp_path, stages.format(student='bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer3", alpha = 0.0 }'),
                epochs=2, name="stc.toml", limit=128)
    _, a = run(plain, tmp_path / "plain")
    _, b = run(stc, tmp_path / "stc")
    assert_bit_identical(best(tmp_path / "plain", "student"), best(tmp_path / "stc", "student"))
    assert a["stages"][1]["test_accuracy"] == b["stages"][1]["test_accuracy"]
    la = [m["train_loss"] for m in metrics(tmp_path / "plain") if m["stage"] == "student"]
    lb = [m["train_loss"] for m in metrics(tmp_path / "stc") if m["stage"] == "student"]
    assert la == lb


# ----------------------------------------------------------------------------- resume and loading
class InterruptStudent:
    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if stage == "student" and record["epoch"] == 1:
            raise KeyboardInterrupt


KD = """
[[stages]]
name = "teacher"
backbone = "resnet14"
[[stages]]
name = "student"
backbone = "resnet8"
graph = { name = "kd", teacher = "teacher" }
lam = 0.9
tau = 4.0
"""


def test_a_run_killed_in_its_second_stage_resumes_there(tmp_path: Path) -> None:
    path = write(tmp_path, KD, epochs=2, limit=128)
    _, full = run(path, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "cut", extra=[InterruptStudent()])
    teacher_best = tmp_path / "cut" / "checkpoints" / "teacher" / "best.pt"
    stamp = teacher_best.stat().st_mtime_ns
    resumed = Run.resume(tmp_path / "cut", progress=False).execute()
    assert teacher_best.stat().st_mtime_ns == stamp  # the finished stage was not retrained
    lines = [(m["stage"], m["epoch"]) for m in metrics(tmp_path / "cut")]
    assert lines == [("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2)]
    for a, b in zip(full["stages"], resumed["stages"]):
        assert a["test_accuracy"] == b["test_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
    assert_bit_identical(best(tmp_path / "full", "student"), best(tmp_path / "cut", "student"))


def test_an_stc_stage_killed_and_resumed_restores_its_adapter(tmp_path: Path) -> None:
    """An STC student whose adapter joins other channel counts (ResNet-8's 32 at layer2 to
    WRN-16-2's 64: a 1x1 conv + BN), stopped after its first epoch and resumed, ends with the
    uninterrupted run's weights bit for bit: the student's and the adapter's (BN statistics
    included)."""
    stc = STC.replace('backbone = "wrn16_2"\n', 'backbone = "wrn16_2"\nepochs = 1\n', 1)
    path = write(tmp_path, stc.format(student='bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", alpha = 0.5 }'),
                 epochs=2, limit=128)
    _, full = run(path, tmp_path / "full")
    with pytest.raises(KeyboardInterrupt):
        run(path, tmp_path / "cut", extra=[InterruptStudent()])
    cut_last = torch.load(tmp_path / "cut" / "checkpoints" / "student" / "last.pt", weights_only=False)
    full_last = torch.load(tmp_path / "full" / "checkpoints" / "student" / "last.pt", weights_only=False)
    assert cut_last["state"]["epoch"] == 1 and full_last["state"]["epoch"] == 2
    assert {k for k in cut_last["bridge"] if k.startswith("adapter.0.")} == {"adapter.0.weight"}
    # the adapter trains in both epochs: the second starts from the first's adapter
    assert not torch.equal(cut_last["bridge"]["adapter.0.weight"], full_last["bridge"]["adapter.0.weight"])
    resumed = Run.resume(tmp_path / "cut", progress=False).execute()
    assert [(m["stage"], m["epoch"]) for m in metrics(tmp_path / "cut")] == [("teacher", 1), ("student", 1), ("student", 2)]
    last = torch.load(tmp_path / "cut" / "checkpoints" / "student" / "last.pt", weights_only=False)
    assert_bit_identical(full_last["model"], last["model"])
    assert_bit_identical(full_last["bridge"], last["bridge"])
    assert_bit_identical(best(tmp_path / "full", "student"), best(tmp_path / "cut", "student"))
    for a, b in zip(full["stages"], resumed["stages"]):
        assert a["test_accuracy"] == b["test_accuracy"] and a["val_accuracy"] == b["val_accuracy"]


def test_a_loaded_teacher_with_zero_epochs_is_evaluated_not_trained(tmp_path: Path) -> None:
    path = write(tmp_path, KD, limit=128)
    _, first = run(path, tmp_path / "first")
    ckpt = tmp_path / "first" / "checkpoints" / "teacher" / "best.pt"
    loaded = KD.replace('backbone = "resnet14"\n', f'backbone = "resnet14"\ninit = "{ckpt}"\nepochs = 0\n', 1)
    r, second = run(write(tmp_path, loaded, epochs=3, name="loaded.toml", limit=128), tmp_path / "second")
    teacher = second["stages"][0]
    assert (teacher["epochs"], teacher["best_epoch"]) == (0, 0)
    assert teacher["test_accuracy"] == first["stages"][0]["test_accuracy"]
    assert teacher["val_accuracy"] == first["stages"][0]["val_accuracy"]
    assert second["stages"][1]["epochs"] == 3
    assert [m["stage"] for m in metrics(tmp_path / "second")] == ["student"] * 3
    assert_bit_identical(r.models["teacher"].state_dict(), torch.load(ckpt, weights_only=False)["model"])


# ----------------------------------------------------------------------------- validation
class OddClasses:
    """A plugin backbone that ignores the data's class count."""

    @hookimpl
    def kdreg_register_backbones(self, register):  # type: ignore[no-untyped-def]
        def seven(*, num_classes: int, **_):  # type: ignore[no-untyped-def]
            return kdreg.build_backbone("resnet8", num_classes=7)

        register("seven_classes", seven)


@pytest.mark.parametrize("case,stages,expected", [
    ("unknown stage", 'graph = { name = "kd", teacher = "techer" }',
     ["teacher = 'techer' names no earlier stage; earlier stages: teacher, vit, odd @ recipe.stages.student.graph.teacher"]),
    ("later stage", 'graph = { name = "kd", teacher = "later" }',
     ["teacher = 'later' names a later stage; a stage learns only from earlier stages @ recipe.stages.student.graph.teacher"]),
    ("itself", 'graph = { name = "kd", teacher = "student" }',
     ["teacher = 'student' names itself; a stage learns only from earlier stages @ recipe.stages.student.graph.teacher"]),
    ("unknown split", 'bridge = { name = "stc", teacher = "teacher", student_split = "layer9", teacher_split = "block" }',
     ["unknown split point 'layer9' of the student (CifarResNet); known: stem, layer1, layer2, layer3 @ recipe.stages.student.bridge.student_split"]),
    ("no adapter", 'bridge = { name = "stc", teacher = "vit", student_split = "layer2", teacher_split = "blocks.1" }',
     ["no adapter joins student features (32, 16, 16) to teacher features (5, 192)"]),
    ("classes differ", 'graph = { name = "kd", teacher = "odd" }',
     ["stage 'odd' predicts 7 classes but this stage 10; a teacher and its student must classify the same classes @ recipe.stages.student"]),
    ("epochs 0 without init", 'epochs = 0', ["epochs = 0 loads a stage instead of training it"]),
    ("bridge on several sub-models", 'bridge = { name = "stc", teacher = "teacher", student_split = "layer1", teacher_split = "layer1" }',
     ["a bridge joins a student with one sub-model; TinySlimmable has 4 @ recipe.stages.student.bridge.name"]),
])
def test_validate_reports_pipeline_mistakes(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str,
                                             stages: str, expected: list[str]) -> None:
    student = "tiny_slimmable" if case == "bridge on several sub-models" else "resnet8"
    text = HEAD.format(epochs=1, limit=256) + f"""
[[stages]]
name = "teacher"
backbone = "resnet14"
[[stages]]
name = "vit"
backbone = {{ name = "timm", model = "deit_tiny_patch16_224" }}
[[stages]]
name = "odd"
backbone = "seven_classes"
[[stages]]
name = "student"
backbone = "{student}"
{stages}
[[stages]]
name = "later"
backbone = "resnet8"
"""
    path = tmp_path / "bad.toml"
    path.write_text(text)
    plugins.reset(plugins.make_plugin_manager(extra=[OddClasses()]))
    try:
        code = main(["validate", str(path)])
    finally:
        plugins.reset()
    err = capsys.readouterr().err.splitlines()
    assert code == 2
    assert len(err) == len(expected), err
    for line, want in zip(err, expected):
        assert line.startswith(f"error: {path}: ") and want in line, line
    assert not (tmp_path / "runs").exists()


def test_validate_checks_an_init_checkpoint_against_the_backbone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    ckpt = tmp_path / "r14.pt"
    torch.save(kdreg.build_backbone("resnet14", num_classes=10).state_dict(), ckpt)
    path = write(tmp_path, f'[[stages]]\nname = "teacher"\nbackbone = "resnet8"\ninit = "{ckpt}"\nepochs = 0\n')
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"checkpoint {ckpt} has" in err and "@ recipe.stages.teacher.init" in err
    path.write_text(path.read_text().replace('"resnet8"', '"resnet14"'))
    assert main(["validate", str(path)]) == 0


def test_validate_builds_models_for_the_datas_real_shape(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A timm model that refuses 32x32 images validates against 80x80 data (no guessed shape)."""
    path = tmp_path / "big.toml"
    path.write_text("""
[data]
dataset = "synthetic"
val_split = 0
options = { image_size = 80, train_size = 20, test_size = 10 }
[[stages]]
name = "student"
backbone = { name = "timm", model = "inception_v3" }
""")
    assert main(["validate", str(path)]) == 0
    out = capsys.readouterr().out
    assert "models built for 10 classes of 3x80x80 images (the data's shape)" in out
