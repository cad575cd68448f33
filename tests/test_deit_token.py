"""DeiT's distillation token (Touvron et al. 2021): a distilled timm model as the sub-models
``cls``, ``dist`` and ``avg`` (``backbone = { name = "timm", distilled = true }``), the ``deit``
graph (the teacher teaches ``dist`` alone), the ``hard`` divergence, kdreg's token losses against
timm's ``TokenDistillationTask`` and DeiT's own loss (facebookresearch/deit, losses.py, written out
here), and the DeiT-Ti recipe run tiny."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import tomli
import torch
import torch.nn.functional as F
from torch import Tensor, nn

import kdreg
from kdreg.cli import main
from kdreg.errors import UserError
from kdreg.graph import Edge

ROOT = Path(__file__).resolve().parent.parent
RECIPE = ROOT / "recipes" / "deit" / "deit-tiny-distilled-regnety160.toml"
DEIT = "deit_tiny_distilled_patch16_224"
TINY = {"patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 4}
CLASSES = 10


def distilled(**options: object) -> kdreg.FlexibleBackbone:
    return kdreg.build_backbone("timm", num_classes=CLASSES, model=DEIT, distilled=True,
                                model_options={**TINY, **options})


def batch(seed: int = 0, n: int = 6) -> tuple[Tensor, Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randint(0, CLASSES, (n,), generator=gen)


# ------------------------------------------------------------------------------ the backbone
def test_a_distilled_deit_is_its_class_head_its_distillation_head_and_their_average() -> None:
    torch.manual_seed(0)
    model = distilled()
    assert model.submodel_labels == ("cls", "dist", "avg")
    assert model.train_labels == ("cls", "dist") and model.num_train_submodels == 2
    assert model.single_pass and model.split_points() == ()
    x, _ = batch()
    net = model.net
    model.train()
    cls, dist = model(x)
    feats = net.forward_features(x)
    assert torch.equal(cls, net.head(feats[:, 0])) and torch.equal(dist, net.head_dist(feats[:, 1]))
    model.eval()
    with torch.no_grad():
        e_cls, e_dist, avg = model(x)
        deployed = net(x)                     # timm's own prediction in eval mode
    assert torch.allclose(avg, (e_cls + e_dist) / 2) and torch.allclose(avg, deployed, atol=1e-6)
    assert net.distilled_training and not net.training      # the flag of the head is restored
    head, head_dist = (sum(p.numel() for p in m.parameters()) for m in (net.head, net.head_dist))
    total = sum(p.numel() for p in net.parameters())
    assert model.count_params() == [total - head_dist, total - head, total]


@pytest.mark.parametrize(("model", "why"), [
    ("deit_tiny_patch16_224", "no set_distilled_training"),
    ("pit_ti_224", "its head gives one output in distilled training"),
])
def test_a_model_without_a_distillation_head_is_refused_naming_it(model: str, why: str) -> None:
    options = TINY if model.startswith("deit") else {}
    with pytest.raises(UserError) as info:
        kdreg.build_backbone("timm", num_classes=CLASSES, model=model, distilled=True, model_options=options)
    (line,) = str(info.value).splitlines()
    assert line == (f"timm model {model!r} has no distillation head ({why}): distilled = true takes a "
                    f"model such as {DEIT} @ backbone.distilled")


# ------------------------------------------------------------------------------ graph and divergence
def test_the_deit_graph_teaches_the_distillation_head_alone() -> None:
    graph = kdreg.get_teacher_graph("deit", 2, teacher="teacher")
    assert graph.edges == (Edge(1, "teacher", 1.0),) and graph.external == ("teacher",)
    assert not graph.has_teachers(0)
    weighted = kdreg.get_teacher_graph("deit", 2, teacher=["a", "b"], weight=0.5)
    assert weighted.edges == (Edge(1, "a", 0.25), Edge(1, "b", 0.25))
    with pytest.raises(UserError, match=r"the deit graph teaches the distillation head of a backbone "
                       r"that trains two heads .*this backbone trains 3 sub-model\(s\) @ graph$"):
        kdreg.get_teacher_graph("deit", 3, teacher="teacher")
    with pytest.raises(UserError, match=r"weight must be a finite number > 0, got 0.0 @ graph.weight"):
        kdreg.get_teacher_graph("deit", 2, teacher="teacher", weight=0.0)


def test_hard_is_the_cross_entropy_with_the_teachers_argmax_at_any_temperature() -> None:
    gen = torch.Generator().manual_seed(3)
    s = torch.randn(5, 7, generator=gen, dtype=torch.float64, requires_grad=True)
    t = torch.randn(5, 7, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 7, (5,), generator=gen)
    hard = kdreg.build_divergence("hard")
    # DeiT eq. 3: -log softmax(s)[argmax t], batch mean; written from probabilities
    p = s.exp() / s.exp().sum(-1, keepdim=True)
    paper = -torch.stack([p[b, int(t[b].argmax())].log() for b in range(5)]).mean()
    for tau in (1.0, 4.0):
        value = hard(s, t, tau=tau, labels=y)
        assert torch.allclose(value, paper, atol=1e-12, rtol=0)
    (grad,) = torch.autograd.grad(hard(s, t, tau=1.0, labels=y), s)
    (want,) = torch.autograd.grad(paper, s)
    assert torch.allclose(grad, want, atol=1e-12, rtol=0)
    # only the teacher's argmax counts: a sharper teacher with the same argmax gives the same loss
    assert torch.equal(hard(s, 5.0 * t, tau=1.0, labels=y), hard(s, t, tau=1.0, labels=y))


# ------------------------------------------------------------------------------ against timm and DeiT
def deit_loss(cls: Tensor, dist: Tensor, y: Tensor, teacher: Tensor, kind: str, alpha: float, tau: float) -> Tensor:
    """facebookresearch/deit losses.py, DistillationLoss: base CE on the class token, then soft
    (KL of reduction 'sum' over ``numel``, times tau^2) or hard (CE with the teacher's argmax) on
    the distillation token; ``(1 - alpha) base + alpha distillation``."""
    base = F.cross_entropy(cls, y)
    if kind == "soft":
        d = F.kl_div(F.log_softmax(dist / tau, dim=1), F.log_softmax(teacher / tau, dim=1),
                     reduction="sum", log_target=True) * (tau * tau) / dist.numel()
    else:
        d = F.cross_entropy(dist, teacher.argmax(dim=1))
    return base * (1 - alpha) + d * alpha


def grads(model: nn.Module) -> dict[str, Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(("kind", "tau", "alpha"), [("hard", 1.0, 0.5), ("soft", 3.0, 0.1), ("soft", 1.0, 0.5)])
def test_kdregs_token_losses_are_timms_and_deits(kind: str, tau: float, alpha: float) -> None:
    """timm's TokenDistillationTask trains on ``(1 - alpha) CE(cls, y) + alpha D(dist, t)`` with
    ``D`` = ``tau^2 KL`` batch mean (soft, kdreg's ``kl``) or CE with the teacher's argmax (hard,
    kdreg's ``hard``). kdreg's rule with ``lam = 1`` and the ``deit`` graph's edge weight ``w`` is
    ``CE(cls, y) + w D(dist, t)``; so, on the same model, weights and batch:

    - timm's loss = ``(1 - alpha)`` x kdreg's with ``w = alpha / (1 - alpha)``;
    - DeiT's own soft loss divides ``tau^2 KL`` by the number of classes too (reduction 'sum'
      over ``numel``): DeiT's loss = ``(1 - alpha)`` x kdreg's with ``w = alpha / ((1 - alpha) C)``
      (hard: the same ``w`` as timm's);

    equal to float32 rounding, and so are the gradients of every parameter.
    """
    task_module = pytest.importorskip("timm.task", reason="timm's TokenDistillationTask (timm.task)")
    torch.manual_seed(1)
    model = distilled()
    # a teacher of the student's input statistics (timm's task would renormalise its input else)
    teacher = timm.create_model("deit_tiny_patch16_224", pretrained=False, num_classes=CLASSES,
                                img_size=32, patch_size=8, depth=1, embed_dim=32, num_heads=2).eval()
    assert teacher.pretrained_cfg["mean"] == model.net.pretrained_cfg["mean"]
    assert teacher.pretrained_cfg["std"] == model.net.pretrained_cfg["std"]
    x, y = batch(seed=2, n=8)
    task = task_module.TokenDistillationTask(model.net, teacher, criterion=nn.CrossEntropyLoss(),
                                 distill_type=kind, task_loss_weight=1 - alpha, temperature=tau,
                                 verbose=False)
    task.train()
    timm_loss = task(x, y)["loss"]
    timm_loss.backward()
    timm_grads = grads(model.net)
    model.zero_grad()

    model.train()
    logits = model(x)
    with torch.no_grad():
        t = teacher(x)
    divergence = "hard" if kind == "hard" else "kl"
    w = alpha / (1 - alpha)
    graph = kdreg.get_teacher_graph("deit", model.num_train_submodels, teacher="teacher", weight=w)
    ours = kdreg.distillation_loss(logits, y, graph, lam=1.0, tau=tau, divergence=divergence,
                                   external={"teacher": t})
    assert torch.allclose((1 - alpha) * ours, timm_loss.detach(), rtol=1e-6, atol=0)
    ((1 - alpha) * ours).backward()
    mine = grads(model.net)
    assert mine.keys() == timm_grads.keys()
    for name, g in mine.items():
        assert torch.allclose(g, timm_grads[name], rtol=1e-4, atol=1e-7), name

    if alpha == 0.5:   # timm's default weights (1 and 1): kdreg's loss itself, weight 1
        plain = task_module.TokenDistillationTask(model.net, teacher, criterion=nn.CrossEntropyLoss(),
                                      distill_type=kind, temperature=tau, verbose=False)
        plain.train()
        assert torch.allclose(plain(x, y)["loss"].detach(), ours.detach(), rtol=1e-6, atol=0)

    deit_w = w / CLASSES if kind == "soft" else w
    graph = kdreg.get_teacher_graph("deit", 2, teacher="teacher", weight=deit_w)
    with torch.no_grad():
        cls, dist = model(x)
        ours = kdreg.distillation_loss([cls, dist], y, graph, lam=1.0, tau=tau, divergence=divergence,
                                       external={"teacher": t})
        theirs = deit_loss(cls, dist, y, t, kind, alpha, tau)
    assert torch.allclose((1 - alpha) * ours, theirs, rtol=1e-6, atol=0)


# ------------------------------------------------------------------------------ the recipe
TINY_RUN = [
    "--set", "data.dataset=cifar10-sample", "--set", "data.image_size=32",
    "--set", "data.batch_size=16", "--set", "data.eval_batch_size=50", "--set", "data.workers=0",
    "--set", "data.train_limit=64", "--set", "data.test_limit=50",
    "--set", "train.epochs=1", "--set", "train.device=cpu",
    "--set", "stages.teacher.epochs=1",
    "--set", ('stages.teacher.backbone={ name = "timm", model = "vit_tiny_patch16_224", model_options = '
              '{ patch_size = 8, depth = 1, embed_dim = 32, num_heads = 2 } }'),
    "--set", ("stages.student.backbone.model_options={ drop_path_rate = 0.1, patch_size = 8, depth = 2, "
              "embed_dim = 64, num_heads = 4 }"),
]


def test_the_deit_tiny_recipe_validates_and_runs_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    # as shipped, its data absent (no ImageNet here): names, options and stage references checked
    assert main(["validate", str(RECIPE), "--set", f"data.root={tmp_path / 'imagenet'}"]) == 0
    assert "deit-tiny-distilled-regnety160.toml: ok" in capsys.readouterr().out
    assert main(["validate", str(RECIPE), *TINY_RUN]) == 0       # built, tiny
    out = tmp_path / "run"
    assert main(["run", str(RECIPE), "--out", str(out), *TINY_RUN, "--no-progress"]) == 0
    result = json.loads((out / "results.json").read_text())
    teacher, student = result["stages"]
    assert teacher["name"] == "teacher" and student["name"] == "student" and student["epochs"] == 1
    assert student["submodels"] == ["cls", "dist", "avg"] and len(student["test_accuracy"]) == 3
    assert student["graph"] == "deit" and student["teachers"] == ["teacher"]
    assert student["params"][2] - student["params"][0] == 64 * CLASSES + CLASSES   # the other head
    stage = tomli.loads((out / "recipe.toml").read_text())["stages"][1]
    assert stage["divergence"]["name"] == "hard" and stage["lam"] == 1.0
    assert stage["backbone"]["distilled"] is True
    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    (epoch,) = [m for m in metrics if m.get("stage") == "student"]
    assert len(epoch["train_accuracy"]) == 2             # cls and dist are trained; avg is not


def test_the_recipe_refuses_a_student_without_a_distillation_head(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["validate", str(RECIPE), *TINY_RUN, "--set", "stages.student.backbone.model=deit_tiny_patch16_224"])
    assert code == 2
    assert ("timm model 'deit_tiny_patch16_224' has no distillation head (no set_distilled_training)"
            in capsys.readouterr().err)
