"""Feature losses in the engine: which edges they follow, the step's value and gradients against
the rule written out, one teacher forward per step, sample indices, training, resume, bad input."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import kdreg
from kdreg import plugins
from kdreg.cli import main
from kdreg.data.batches import BatchLoader
from kdreg.engine import checkpoint
from kdreg.engine.assemble import DataShape, assemble
from kdreg.engine.run import Run
from kdreg.engine.step import stage_backward
from kdreg.hookspecs import hookimpl
from kdreg.recipe import parse_recipe
from kdreg.stages import freeze

KD = """
[[stages]]
name = "teacher"
backbone = "resnet14"
[[stages]]
name = "student"
backbone = "resnet8"
graph = {{ name = "kd", teacher = "teacher" }}
lam = 0.9
tau = 4.0
{extra}
"""


def plans_of(text: str, shape: DataShape | None = None) -> list:  # type: ignore[type-arg]
    plans = assemble(parse_recipe(text), shape or DataShape(10, num_samples=64,
                                                            train_labels=torch.arange(64) % 10), seed=0)
    freeze(plans[0].model)
    return plans


def at_map(f: torch.Tensor) -> torch.Tensor:
    """Zagoruyko & Komodakis eq. 2 (p = 2, channel mean), L2-normalised per sample."""
    q = (f ** 2).mean(1).flatten(1)
    return q / q.norm(dim=1, keepdim=True).clamp_min(1e-12)


def kd_term(s: torch.Tensor, t: torch.Tensor, tau: float) -> torch.Tensor:
    pt = torch.softmax(t / tau, -1)
    return tau * tau * (pt * (torch.log_softmax(t / tau, -1) - torch.log_softmax(s / tau, -1))).sum(-1).mean()


def test_kd_plus_at_step_equals_the_rule_written_out_value_and_gradient(one_thread) -> None:
    plans = plans_of(KD.format(extra='feature_losses = [{ name = "at", points = ["layer1", "layer2", "layer3"], weight = 1000.0 }]'))
    teacher, plan = plans[0].model, plans[1]
    student = plan.model.train()
    assert len(plan.features) == 1 and plan.features[0].teacher == "teacher:full"
    torch.manual_seed(1)
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = stage_backward(student, x, y, plan.loss, plan.frozen)
    got = {n: p.grad.clone() for n, p in student.named_parameters()}
    student.zero_grad(set_to_none=True)
    with torch.no_grad():     # no data statistics here: both models see x as it is
        t_feats, t_logits = teacher.forward_stages(x, ["layer1", "layer2", "layer3"])
    s_feats, s_logits = student.forward_stages(x, ["layer1", "layer2", "layer3"])
    at = sum((at_map(a) - at_map(b)).pow(2).mean() for a, b in zip(s_feats, t_feats))
    expected = 0.1 * F.cross_entropy(s_logits, y) + 0.9 * kd_term(s_logits, t_logits, 4.0) + 1000.0 * at
    expected.backward()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)
    for n, p in student.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-4, atol=1e-6, msg=n)
    assert all(p.grad is None for p in teacher.parameters())


def test_the_teacher_runs_once_per_step_its_features_from_the_logits_forward(one_thread) -> None:
    plans = plans_of(KD.format(extra='feature_losses = [{ name = "at", points = ["layer2"] }, '
                                     '{ name = "sp", points = ["layer3"] }]'))
    teacher, plan = plans[0].model, plans[1]
    calls = []
    teacher.stem.register_forward_hook(lambda *_: calls.append("stem"))
    teacher.head.register_forward_hook(lambda *_: calls.append("head"))
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    stage_backward(plan.model.train(), x, y, plan.loss, plan.frozen)
    assert calls == ["stem", "head"]     # one forward gives the logits and both losses' features


def test_inplace_at_follows_the_edges_between_widths(one_thread) -> None:
    """IPKD on a slimmable student: every width learns the largest's logits and attention maps."""
    plans = assemble(parse_recipe("""
[[stages]]
name = "s"
backbone = "tiny_slimmable"
graph = "ipkd"
lam = 0.5
tau = 2.0
feature_losses = [{ name = "at", points = ["layer2", "layer3"], weight = 10.0 }]
"""), DataShape(4, input_size=(16, 16)), seed=0)
    plan = plans[0]
    model = plan.model.train()
    n = model.num_submodels
    assert sorted((e.student, e.teacher) for e in plan.features) == [(i, n - 1) for i in range(n - 1)]
    torch.manual_seed(0)
    x, y = torch.rand(8, 3, 16, 16), torch.randint(0, 4, (8,))
    out = stage_backward(model, x, y, plan.loss)
    got = {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    total = torch.zeros(())
    feats = {}
    logits = {}
    for i in reversed(range(n)):
        f, a = model.forward_features(x, i, ["layer2", "layer3"])
        feats[i], logits[i] = f, a
    big_f = [f.detach() for f in feats[n - 1]]
    big_a = logits[n - 1].detach()
    total = F.cross_entropy(logits[n - 1], y)
    for i in range(n - 1):
        at = sum((at_map(a) - at_map(b)).pow(2).mean() for a, b in zip(feats[i], big_f))
        total = total + 0.5 * F.cross_entropy(logits[i], y) + 0.5 * kd_term(logits[i], big_a, 2.0) + 10.0 * at
    total.backward()
    assert out.loss.item() == pytest.approx(total.item(), rel=1e-5)
    for k, p in model.named_parameters():
        if k in got:
            torch.testing.assert_close(got[k], p.grad, rtol=1e-4, atol=1e-6, msg=k)


def test_fitnet_without_a_connector_is_the_hint_itself(one_thread) -> None:
    plans = plans_of(KD.format(extra='feature_losses = [{ name = "fitnet", points = ["layer3"], '
                                     'connector = false, weight = 5.0 }]').replace("lam = 0.9", "lam = 0.0"))
    teacher, plan = plans[0].model, plans[1]
    student = plan.model.train()
    assert not list(plan.features[0].loss.parameters())         # nothing of its own to train
    x, y = torch.rand(4, 3, 32, 32), torch.randint(0, 10, (4,))
    out = stage_backward(student, x, y, plan.loss, plan.frozen)
    with torch.no_grad():
        (t,), _ = teacher.forward_stages(x, ["layer3"])
        (s,), logits = student.forward_stages(x, ["layer3"])
    expected = F.cross_entropy(logits, y) + 5.0 * ((s - t) ** 2).mean()
    assert out.loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_batch_loader_hands_each_images_index(one_thread) -> None:
    images = torch.arange(10, dtype=torch.uint8).view(10, 1, 1, 1).expand(10, 1, 4, 4).contiguous()
    labels = torch.arange(10) * 3
    loader = BatchLoader(images, labels, batch_size=4, device="cpu", train=True, seed=0, padding=0)
    loader.with_indices = True
    seen = []
    for x, y, idx in loader:
        assert torch.equal(y, labels[idx])
        assert torch.equal((x[:, 0, 0, 0] * 255).round(), idx.float())   # the image itself (no padding)
        seen += idx.tolist()
    assert len(seen) == 8 and len(set(seen)) == 8


RUN = """
name = "features"
seed = 0
[data]
dataset = "synthetic"
batch_size = 16
val_split = 16
options = {{ train_size = 80, test_size = 16, num_classes = 4, image_size = 16 }}
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
loggers = []
[[stages]]
name = "teacher"
backbone = "resnet8"
{stages}
"""


def student(name: str, extra: str) -> str:
    return (f'[[stages]]\nname = "{name}"\nbackbone = "resnet8"\ngraph = {{ name = "kd", teacher = "teacher" }}\n'
            f"lam = 0.9\ntau = 4.0\n{extra}\n")


EVERY = "".join([
    student("at", 'feature_losses = [{ name = "at", points = ["layer1", "layer2", "layer3"] }]'),
    student("fitnet", 'feature_losses = [{ name = "fitnet", points = ["layer2"] }]'),
    student("sp", 'feature_losses = [{ name = "sp", points = ["layer3"] }]'),
    student("pkt", 'feature_losses = [{ name = "pkt", points = ["layer3"] }]'),
    student("rkd", 'feature_losses = [{ name = "rkd", points = ["layer3"] }]'),
    student("crd", 'feature_losses = [{ name = "crd", points = ["layer3"], negatives = 32 }]'),
    student("dkd", 'divergence = { name = "dkd", beta = 8.0, warmup = 1 }'),
    student("dist", 'divergence = "dist"'),
])


class InterruptCRD:
    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if stage == "crd" and record["epoch"] == 1:
            raise KeyboardInterrupt


def run(path: Path, out: Path, extra: list | None = None) -> dict:  # type: ignore[type-arg]
    if extra:
        plugins.reset(plugins.make_plugin_manager(extra=extra))
    try:
        return Run.start(path, out, progress=False).execute()
    finally:
        if extra:
            plugins.reset()


def test_every_built_in_method_trains_from_a_frozen_teacher(tmp_path: Path, one_thread) -> None:
    recipe = tmp_path / "every.toml"
    recipe.write_text(RUN.format(epochs=1, stages=EVERY))
    results = run(recipe, tmp_path / "run")
    stages = {s["name"]: s for s in results["stages"]}
    assert list(stages) == ["teacher", "at", "fitnet", "sp", "pkt", "rkd", "crd", "dkd", "dist"]
    for name in ("at", "fitnet", "sp", "pkt", "rkd", "crd"):
        assert stages[name]["feature_losses"] == [name]
    ckpt = tmp_path / "run" / "checkpoints"
    (crd,) = checkpoint.load(ckpt / "crd" / "last.pt")["feature_losses"]
    assert any("memory" in k for k in crd), sorted(crd)
    (fit,) = checkpoint.load(ckpt / "fitnet" / "last.pt")["feature_losses"]
    assert any(k.endswith("weight") for k in fit), sorted(fit)   # the regressor's own parameters
    plain = kdreg.build_backbone("resnet8", num_classes=4).state_dict()
    for name in ("fitnet", "crd"):           # the selected (exported) weights: the model's alone
        assert set(checkpoint.load(ckpt / name / "best.pt")["model"]) == set(plain)


def test_crd_stopped_and_resumed_ends_with_the_whole_runs_memory_and_weights(tmp_path: Path, one_thread) -> None:
    """Stopped after its first epoch and resumed: the weights, the embeddings and the memory bank
    of the uninterrupted run, bit for bit (the negatives are drawn from the saved RNG state)."""
    recipe = tmp_path / "crd.toml"
    recipe.write_text(RUN.format(epochs=2, stages=student(
        "crd", 'feature_losses = [{ name = "crd", points = ["layer3"], negatives = 32 }]')))
    run(recipe, tmp_path / "whole")
    with pytest.raises(KeyboardInterrupt):
        run(recipe, tmp_path / "cut", extra=[InterruptCRD()])
    ckpt = tmp_path / "cut" / "checkpoints" / "crd" / "last.pt"
    first = checkpoint.load(ckpt)
    assert first["state"]["epoch"] == 1
    Run.resume(tmp_path / "cut", progress=False).execute()
    a = checkpoint.load(tmp_path / "whole" / "checkpoints" / "crd" / "last.pt")
    b = checkpoint.load(ckpt)
    changed = [k for k in a["feature_losses"][0]
               if not torch.equal(first["feature_losses"][0][k], a["feature_losses"][0][k])]
    assert any("memory" in k for k in changed) and any("embed" in k for k in changed), changed
    for part in ("model",):
        for k in a[part]:
            assert torch.equal(a[part][k], b[part][k]), k
    for k in a["feature_losses"][0]:
        assert torch.equal(a["feature_losses"][0][k], b["feature_losses"][0][k]), k


@pytest.mark.parametrize(("extra", "line"), [
    ('feature_losses = [{ name = "att", points = ["layer1"] }]',
     "unknown feature_loss 'att' (did you mean at?); registered: at, crd, fitnet, pkt, rkd, sp "
     "@ recipe.stages.student.feature_losses[0].name"),
    ('feature_losses = [{ name = "at", points = ["layer9"] }]',
     "unknown split point 'layer9' of the student (CifarResNet); known: stem, layer1, layer2, layer3 "
     "@ recipe.stages.student.feature_losses[0].points"),
    ('feature_losses = [{ name = "at", student_points = ["layer3"], teacher_points = ["block9"] }]',
     "unknown split point 'block9' of teacher stage 'teacher' (CifarResNet); known: stem, layer1, layer2, "
     "layer3 @ recipe.stages.student.feature_losses[0].teacher_points"),
    ('feature_losses = [{ name = "at", points = ["layer1"], weight = -2.0 }]',
     "weight must be a finite number > 0, got -2.0 @ recipe.stages.student.feature_losses[0].weight"),
    ('feature_losses = [{ name = "at", points = ["layer1"], p = -1.0 }]',
     "@ recipe.stages.student.feature_losses[0].p"),
    ('feature_losses = [{ name = "at", points = ["layer3", "layer1"] }]',
     "split points ['layer3', 'layer1'] are not in network order ['stem', 'layer1', 'layer2', 'layer3'] "
     "@ recipe.stages.student.feature_losses[0].points"),
    ('feature_losses = [{ name = "fitnet", student_points = ["layer3"], teacher_points = ["layer1"] }]',
     "@ recipe.stages.student.feature_losses[0]"),
    ('feature_losses = [{ name = "fitnet", student_points = ["layer2"], teacher_points = ["layer3"], '
     'connector = false }]',
     "fitnet without a connector compares features of equal shapes; the student's are [32, 8, 8], the "
     "teacher's [64, 4, 4]: set connector = true (a regressor joins them) or choose other points "
     "@ recipe.stages.student.feature_losses[0].connector"),
    ('feature_losses = [{ name = "at" }]',
     "give the split points it reads: points = [...], or student_points and teacher_points "
     "@ recipe.stages.student.feature_losses[0].points"),
])
def test_bad_feature_losses_are_one_line_each_exit_2_nothing_written(tmp_path: Path, extra: str, line: str,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.toml"
    recipe.write_text(RUN.format(epochs=1, stages=student("student", extra)))
    for command in (["validate", str(recipe)], ["run", str(recipe), "--out", str(tmp_path / "run")]):
        assert main(command) == 2
        err = capsys.readouterr().err
        errors = [x for x in err.splitlines() if x.startswith("error")]
        assert len(errors) == 1 and errors[0].endswith(line), err
    assert not (tmp_path / "run").exists()


def test_no_edge_with_features_and_indices_under_mixup_are_refused(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "bad.toml"
    text = RUN.format(epochs=1, stages=student("student", 'feature_losses = [{ name = "crd", points = ["layer3"] }]'))
    recipe.write_text(text.replace('graph = { name = "kd", teacher = "teacher" }', 'graph = "none"'))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert ("no edge of graph 'none' joins two ends that give features at these points" in err
            and "@ recipe.stages.student.feature_losses[0]" in err), err
    recipe.write_text(text.replace("[train]", 'augment = { name = "cifar", mixup = 0.8 }\n[train]'))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err
    assert "crd reads each sample's index in the training set, and mixup / CutMix" in err, err
    assert "@ recipe.stages.student.feature_losses[0].name" in err


def test_build_feature_loss_names_a_bad_option_and_its_key() -> None:
    from kdreg.errors import UserError

    assert isinstance(kdreg.build_feature_loss("at", p=3.0), kdreg.feature_loss.FeatureLoss)
    with pytest.raises(UserError) as err:
        kdreg.build_feature_loss("at", p=-1.0)
    assert err.value.problems[0].endswith("@ feature_loss.p")
