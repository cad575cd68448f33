"""The training step, the stage loop, the run directory and resuming."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdreg
from kdreg import plugins
from kdreg.engine import step as step_module
from kdreg.engine.optim import build_optimizer, lr_factor, parameter_groups
from kdreg.engine.run import Run
from kdreg.engine.step import LossSettings, multi_pass_backward, single_pass_backward
from kdreg.hookspecs import hookimpl
from kdreg.recipe import OptimizerConfig, ScheduleConfig


def _grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("graph", ["none", "ipkd", "ipkd-ta-1", "ipkd-ta-m"])
@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_per_submodel_backward_equals_one_backward_of_the_summed_loss(graph: str, divergence: str) -> None:
    torch.manual_seed(0)
    model = kdreg.build_backbone("tiny_slimmable", num_classes=5, widths=[0.25, 0.5, 0.75, 1.0])
    x, y = torch.randn(6, 3, 16, 16), torch.randint(0, 5, (6,))
    g = kdreg.get_teacher_graph(graph, model.num_submodels)
    settings = LossSettings(g, lam=0.7, tau=3.0, divergence=divergence)
    model.train()
    out = multi_pass_backward(model, x, y, settings)
    step_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    total = kdreg.distillation_loss(model(x), y, g, lam=0.7, tau=3.0, divergence=divergence)
    total.backward()
    ref = _grads(model)
    assert step_grads.keys() == ref.keys()
    for name in ref:
        torch.testing.assert_close(step_grads[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)
    assert out.correct.shape == (4,)


def test_multi_pass_runs_largest_first_and_keeps_only_needed_teachers(monkeypatch: pytest.MonkeyPatch) -> None:
    model = kdreg.build_backbone("tiny_slimmable", num_classes=3, widths=[0.25, 0.5, 0.75, 1.0])
    order = []
    original = model.forward_submodel

    def spy(x, i):  # type: ignore[no-untyped-def]
        order.append(i)
        return original(x, i)

    model.forward_submodel = spy  # type: ignore[method-assign]
    alive: dict[int, list] = {}
    real_loss = step_module.submodel_loss

    def record(index, logits, labels, graph, teachers, **kw):  # type: ignore[no-untyped-def]
        alive[index] = sorted(teachers)  # the teacher logits kept while sub-model `index` runs
        return real_loss(index, logits, labels, graph, teachers, **kw)

    monkeypatch.setattr(step_module, "submodel_loss", record)
    x, y = torch.randn(2, 3, 8, 8), torch.tensor([0, 1])
    multi_pass_backward(model, x, y, LossSettings(kdreg.get_teacher_graph("ipkd-ta-1", 4), 0.5, 1.0))
    assert order == [3, 2, 1, 0]
    assert alive == {3: [], 2: [3], 1: [2], 0: [1]}   # each teacher dropped after its only student
    alive.clear()
    multi_pass_backward(model, x, y, LossSettings(kdreg.get_teacher_graph("ipkd", 4), 0.5, 1.0))
    assert alive == {3: [], 2: [3], 1: [3], 0: [3]}
    alive.clear()
    multi_pass_backward(model, x, y, LossSettings(kdreg.get_teacher_graph("subset", 4, teachers={"0": [2]}), 0.5, 1.0))
    assert alive == {3: [], 2: [], 1: [2], 0: [2]}   # 3 teaches nobody; 2 kept until 0 ran


@pytest.mark.parametrize("divergence", ["kl", "ce"])
def test_single_pass_step_is_the_papers_loss(divergence: str) -> None:
    """One step's loss and gradients equal ipkd-ta eq. 7 written out for 3 exits, lam 0.8, tau 5."""
    torch.manual_seed(0)
    model = kdreg.build_backbone("tiny_exits", num_classes=4, exits=3)
    x, y = torch.randn(4, 3, 16, 16), torch.tensor([0, 1, 2, 3])
    g = kdreg.get_teacher_graph("ipkd-ta-m", 3)
    out = single_pass_backward(model, x, y, LossSettings(g, 0.8, 5.0, divergence))
    got = _grads(model)
    model.zero_grad(set_to_none=True)
    a = model(x)

    def kd(s, t):  # type: ignore[no-untyped-def]
        pt = torch.softmax(t.detach() / 5.0, -1)
        own = (pt * torch.log_softmax(t.detach() / 5.0, -1)).sum(-1) if divergence == "kl" else 0.0
        return 25.0 * (own - (pt * torch.log_softmax(s / 5.0, -1)).sum(-1)).mean()

    ce = torch.nn.functional.cross_entropy
    expected = (0.2 * ce(a[0], y) + 0.8 * (kd(a[0], a[1]) / 2 + kd(a[0], a[2]) / 2)
                + 0.2 * ce(a[1], y) + 0.8 * kd(a[1], a[2]) + ce(a[2], y))
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    ref = _grads(model)
    assert got.keys() == ref.keys() and len(ref) == len(list(model.parameters()))
    for name in ref:
        torch.testing.assert_close(got[name], ref[name], rtol=1e-4, atol=1e-6, msg=name)


def _decay_of(groups: list[dict]) -> dict[int, float]:
    return {id(p): g["weight_decay"] for g in groups for p in g["params"]}


def test_weight_decay_exemptions() -> None:
    """Exactly the regular conv and linear weights are decayed with every exemption on; each kind
    is exempt only when named (a BatchNorm bias is a norm parameter, not a bias)."""
    model = kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=10)
    kinds: dict[int, str] = {}
    for module in model.modules():
        for name, p in module.named_parameters(recurse=False):
            if isinstance(module, torch.nn.BatchNorm2d):
                kinds[id(p)] = "norm"
            elif name == "bias":
                kinds[id(p)] = "bias"
            elif isinstance(module, torch.nn.Conv2d) and module.groups == module.in_channels > 1 or getattr(module, "depthwise", False):
                kinds[id(p)] = "depthwise"
            else:
                kinds[id(p)] = "weight"
    assert {"norm", "bias", "depthwise", "weight"} <= set(kinds.values())
    assert len(kinds) == len(list(model.parameters()))
    for exempt in [(), ("norm",), ("bias",), ("depthwise",), ("bias", "norm", "depthwise")]:
        decay = _decay_of(parameter_groups(model, OptimizerConfig(weight_decay=5e-4, no_decay=exempt)))
        assert decay.keys() == kinds.keys(), exempt
        for pid, kind in kinds.items():
            assert decay[pid] == (0.0 if kind in exempt else 5e-4), (exempt, kind)
    opt = build_optimizer(model, OptimizerConfig(nesterov=True, no_decay=("norm",)))
    assert opt.defaults["nesterov"] is True
    assert {id(p): g["weight_decay"] for g in opt.param_groups for p in g["params"]} == _decay_of(
        parameter_groups(model, OptimizerConfig(no_decay=("norm",))))


def test_schedules() -> None:
    ms = ScheduleConfig(name="multistep", milestones=(60, 120, 160), gamma=0.2)
    assert lr_factor(ms, 59.99, 200) == 1.0
    assert lr_factor(ms, 60.0, 200) == pytest.approx(0.2)
    assert lr_factor(ms, 161.0, 200) == pytest.approx(0.2**3)
    cos = ScheduleConfig(name="cosine")
    assert lr_factor(cos, 0, 10) == pytest.approx(1.0)
    assert lr_factor(cos, 5, 10) == pytest.approx(0.5)
    assert lr_factor(cos, 10, 10) == pytest.approx(0.0)
    warm = ScheduleConfig(name="constant", warmup_epochs=2)
    assert lr_factor(warm, 1.0, 10) == pytest.approx(0.5)


def _read_metrics(path: Path) -> list[dict]:
    return [json.loads(line) for line in (path / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.parametrize("backbone,n", [("tiny_slimmable", 4), ("tiny_exits", 3)])
def test_a_run_writes_its_directory(smoke_recipe, tmp_path: Path, backbone: str, n: int) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    run = Run.start(smoke_recipe(epochs=2, backbone=backbone), out, progress=False)
    results = run.execute()
    assert (out / "recipe.toml").is_file()
    saved = json.loads((out / "results.json").read_text())
    assert saved == json.loads(json.dumps(results))
    assert saved["finished"] is True and saved["seed"] == 0 and saved["recipe"] == "smoke"
    assert saved["plugins"]["kdreg"] == kdreg.__version__
    stage = saved["stages"][0]
    assert stage["name"] == "student" and stage["epochs"] == 2
    for key in ("submodels", "params", "macs", "val_accuracy", "test_accuracy"):
        assert len(stage[key]) == n, key
    assert stage["params"] == sorted(stage["params"]) and stage["macs"] == sorted(stage["macs"])
    metrics = _read_metrics(out)
    assert [m["epoch"] for m in metrics] == [1, 2]
    best = max(metrics, key=lambda m: m["mean_val_accuracy"])
    assert stage["best_epoch"] == best["epoch"]
    assert stage["val_accuracy"] == best["val_accuracy"]
    assert stage["mean_test_accuracy"] == pytest.approx(sum(stage["test_accuracy"]) / n)
    assert (out / "checkpoints" / "student" / "best.pt").is_file()
    assert (out / "checkpoints" / "student" / "last.pt").is_file()


def test_a_run_learns_above_chance(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    results = Run.start(smoke_recipe(epochs=4), tmp_path / "run", progress=False).execute()
    assert min(results["stages"][0]["test_accuracy"]) > 40.0  # 4 classes: chance is 25 %


def test_val_split_zero_reports_the_last_epoch(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    path = smoke_recipe(epochs=2)
    run = Run.start(path, tmp_path / "run", overrides=["data.val_split=0"], progress=False)
    stage = run.execute()["stages"][0]
    assert stage["best_epoch"] == 2 and stage["val_accuracy"] == []


class Interrupt:
    """A real plugin that stops the run after the first epoch, as Ctrl-C would."""

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if record["epoch"] == 1:
            raise KeyboardInterrupt


class DropoutNet:
    """A real plugin backbone whose training draws from the global RNG (dropout), so a resume
    that fails to restore the RNG state changes the run."""

    @hookimpl
    def kdreg_register_backbones(self, register):  # type: ignore[no-untyped-def]
        class Net(kdreg.FlexibleBackbone):
            submodel_labels = ("full",)

            def __init__(self, num_classes: int, in_chans: int):
                super().__init__()
                self.body = torch.nn.Sequential(torch.nn.Conv2d(in_chans, 8, 3, padding=1), torch.nn.ReLU(),
                                                torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                                torch.nn.Dropout(0.5), torch.nn.Linear(8, num_classes))

            def forward(self, x):  # type: ignore[no-untyped-def]
                return [self.body(x)]

        def build(*, num_classes: int, in_chans: int = 3, **_):  # type: ignore[no-untyped-def]
            return Net(num_classes, in_chans)

        register("dropout_net", build)


@pytest.mark.parametrize("backbone", ["tiny_slimmable", "dropout_net"])
def test_resume_continues_exactly(smoke_recipe, tmp_path: Path, backbone: str) -> None:  # type: ignore[no-untyped-def]
    path = smoke_recipe(epochs=3, backbone=backbone, graph="none" if backbone == "dropout_net" else "ipkd-ta-m")
    plugins.reset(plugins.make_plugin_manager(extra=[DropoutNet()]))
    try:
        full = Run.start(path, tmp_path / "full", progress=False).execute()
        plugins.reset(plugins.make_plugin_manager(extra=[DropoutNet(), Interrupt()]))
        with pytest.raises(KeyboardInterrupt):
            Run.start(path, tmp_path / "cut", progress=False).execute()
        torch.manual_seed(12345)  # whatever the RNG holds now must not matter
        plugins.reset(plugins.make_plugin_manager(extra=[DropoutNet()]))
        assert [m["epoch"] for m in _read_metrics(tmp_path / "cut")] == [1]
        resumed = Run.resume(tmp_path / "cut", progress=False).execute()
    finally:
        plugins.reset()
    assert [m["epoch"] for m in _read_metrics(tmp_path / "cut")] == [1, 2, 3]
    a, b = full["stages"][0], resumed["stages"][0]
    assert a["test_accuracy"] == b["test_accuracy"] and a["val_accuracy"] == b["val_accuracy"]
    la = _read_metrics(tmp_path / "full")
    lb = _read_metrics(tmp_path / "cut")
    assert [m["train_loss"] for m in la] == [m["train_loss"] for m in lb]  # bit for bit
    last = {k: torch.load(tmp_path / d / "checkpoints" / "student" / "last.pt", weights_only=False)["model"]
            for k, d in (("full", "full"), ("cut", "cut"))}
    for key in last["full"]:
        assert torch.equal(last["full"][key], last["cut"][key]), key


def test_a_run_never_overwrites_an_earlier_one(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    Run.start(smoke_recipe(epochs=1), out, progress=False).execute()
    before = (out / "results.json").read_text()
    with pytest.raises(kdreg.errors.UserError, match="not empty"):
        Run.start(smoke_recipe(epochs=1), out, progress=False)
    assert (out / "results.json").read_text() == before


def test_init_loads_weights_and_mismatch_is_a_recipe_error(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "first"
    Run.start(smoke_recipe(epochs=1), out, progress=False).execute()
    ckpt = out / "checkpoints" / "student" / "best.pt"
    recipe = smoke_recipe(epochs=1, graph="ipkd")
    run = Run.start(recipe, tmp_path / "second", overrides=[f"stages.student.init='{ckpt}'"], progress=False)
    assert run.recipe.stages[0].init == str(ckpt)
    run.execute()
    bad = smoke_recipe(epochs=1, backbone="tiny_exits")
    with pytest.raises(kdreg.errors.RecipeError, match=r"lacks .* @ recipe.stages.student.init"):
        Run.start(bad, tmp_path / "third", overrides=[f"stages.student.init='{ckpt}'"], progress=False).execute()
    with pytest.raises(kdreg.errors.RecipeError, match=r"checkpoint .*missing.pt does not exist @ recipe.stages.student.init"):
        Run.start(bad, tmp_path / "fourth", overrides=[f"stages.student.init='{tmp_path}/missing.pt'"], progress=False)


TWO_STAGES = """
name = "heads"
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = { train_size = 320, test_size = 64, num_classes = 4, image_size = 16 }
[train]
epochs = 1
optimizer = { lr = 0.05 }
[[stages]]
name = "teacher"
backbone = { name = "resnet8" }
[[stages]]
name = "heads"
backbone = { name = "exits", trunk = "teacher", points = ["layer1", "layer2", "layer3"], head = "flatten_linear", freeze_trunk = true }
graph = { name = "none" }
"""


def test_a_later_stage_builds_on_a_frozen_earlier_one(tmp_path: Path) -> None:
    """EKD's second stage: heads on the trained, frozen teacher; the teacher's weights stay."""
    path = tmp_path / "two.toml"
    path.write_text(TWO_STAGES)
    run = Run.start(path, tmp_path / "run", progress=False)
    results = run.execute()
    teacher, heads = results["stages"]
    assert teacher["submodels"] == ["full"] and heads["submodels"] == ["exit1", "exit2", "exit3", "final"]
    trained = torch.load(tmp_path / "run" / "checkpoints" / "teacher" / "best.pt", weights_only=False)["model"]
    after = run.models["heads"].trunk.state_dict()
    for key, value in trained.items():
        torch.testing.assert_close(after[key], value, msg=key)  # BN statistics included
    assert heads["test_accuracy"][-1] == pytest.approx(teacher["test_accuracy"][0])
    assert heads["params"][-1] == teacher["params"][0] + sum(
        p.numel() for p in run.models["heads"].heads.parameters())
    bad = tmp_path / "bad.toml"
    bad.write_text(TWO_STAGES.replace('trunk = "teacher"', 'trunk = "teachr"'))
    with pytest.raises(kdreg.errors.RecipeError,
                       match=r"trunk = 'teachr' names no earlier stage; earlier stages: teacher @ recipe.stages.heads.backbone.trunk"):
        Run.start(bad, tmp_path / "bad", progress=False)
