"""recipes/cifar100-zoo: the RepDistiller / mdistiller CIFAR-100 pairs, each with KD, FitNet, AT,
SP, PKT, RKD, CRD, DKD and DIST.

Their settings against the published ones; each method's loss, points and weights against the
reference's (RepDistiller's commands and feat lists, mdistiller's DKD configs, DIST_KD's CIFAR
config), the rescaled DKD / DIST students taking the reference's SGD steps; the published figures
in the README and the recipes' headers; the generated recipes equal to what tools/cifar100_zoo.py
writes; the loaded-teacher variant (``init`` and ``epochs = 0`` set on the command line) validates
with a checkpoint of the right network and refuses another's; and one recipe runs end to end on
tiny synthetic data, its teacher trained, then loaded from that run's checkpoint, its resnet8x4
student exported with ``kdreg export``.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import Tensor

import kdreg
from kdreg.cli import main
from kdreg.engine.assemble import check_recipe
from kdreg.engine.run import Run
from kdreg.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "recipes" / "cifar100-zoo"

METHODS = ("kd", "fitnet", "at", "sp", "pkt", "rkd", "crd", "dkd", "dist")
LABELS = ("KD", "FitNet", "AT", "SP", "PKT", "RKD", "CRD", "DKD", "DIST")

# (teacher, student) -> published accuracies (%): teacher, student alone, then METHODS' order.
# Teacher to CRD: RepDistiller's README table 1 (CRD Table 1); DKD: mdistiller's README; DIST:
# DIST_KD's README (None: no published figure for the pair).
FIGURES = {
    ("resnet56", "resnet20"):
        ("72.34", "69.06", "70.66", "69.21", "70.55", "69.67", "70.34", "69.61", "71.16", "71.97", "71.75"),
    ("resnet110", "resnet32"):
        ("74.31", "71.14", "73.08", "71.06", "72.31", "72.69", "72.61", "71.82", "73.48", "74.11", None),
    ("resnet32x4", "resnet8x4"):
        ("79.42", "72.50", "73.33", "73.50", "73.44", "72.94", "73.64", "71.90", "75.51", "76.32", "76.31"),
    ("wrn40_2", "wrn16_2"):
        ("75.61", "73.26", "74.92", "73.58", "74.08", "73.83", "74.54", "73.35", "75.48", "76.23", None),
    ("vgg13", "vgg8"):
        ("74.64", "70.36", "72.98", "71.02", "71.43", "72.68", "72.88", "71.48", "73.94", "74.68", None),
}
# mdistiller's configs/cifar100/dkd/*.yaml: DKD.BETA (res32x4_res8x4 keeps CFG.DKD.BETA = 8.0)
DKD_BETA = {"resnet56": 2.0, "resnet110": 2.0, "resnet32x4": 8.0, "wrn40_2": 6.0, "vgg13": 6.0}
# RepDistiller's -b (scripts/run_cifar_distill.sh) and its options, under kdreg's names
BETA = {"fitnet": 100.0, "at": 1000.0, "sp": 3000.0, "pkt": 30000.0, "rkd": 1.0, "crd": 0.8}
OPTIONS = {"fitnet": {}, "at": {"p": 2.0}, "sp": {"pool": False}, "pkt": {"pool": True},
           "rkd": {"distance": 25.0, "angle": 50.0, "pool": True},
           "crd": {"dim": 128, "negatives": 16384, "t": 0.07, "momentum": 0.5, "pool": True}}
# RepDistiller's feat lists (models/resnet.py, wrn.py, vgg.py; preact=False) by kdreg's split
# points, with the shapes of RepDistiller's features for a 32x32 image: channels, size
FEAT = {
    "resnet20": ["stem", "layer1", "layer2", "layer3"], "vgg8": ["layer1", "layer2", "layer3", "layer4", "layer5"],
}
FEAT_SHAPES = {
    "resnet56": [(16, 32), (16, 32), (32, 16), (64, 8)], "resnet20": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet110": [(16, 32), (16, 32), (32, 16), (64, 8)], "resnet32": [(16, 32), (16, 32), (32, 16), (64, 8)],
    "resnet32x4": [(32, 32), (64, 32), (128, 16), (256, 8)], "resnet8x4": [(32, 32), (64, 32), (128, 16), (256, 8)],
    "wrn40_2": [(16, 32), (32, 32), (64, 16), (128, 8)], "wrn16_2": [(16, 32), (32, 32), (64, 16), (128, 8)],
    "vgg13": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)], "vgg8": [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4)],
}


def feat(net: str) -> list[str]:
    """kdreg's split points that are RepDistiller's feat[0..-2] of ``net`` (feat[-1] pools the last)."""
    return FEAT["vgg8" if net.startswith("vgg") else "resnet20"]


def points(method: str, net: str) -> list[str]:
    """RepDistiller's choice of features for ``method``: hint_layer 2, feat[1:-1], feat[-2], feat[-1]."""
    f = feat(net)
    return {"fitnet": [f[2]], "at": f[1:], "sp": [f[-1]]}.get(method, [f[-1]])


def recipe_name(method: str, teacher: str, student: str) -> str:
    return f"{method}-{teacher}-{student}.toml"


def comment(text: str) -> str:
    """The recipe's header comment as one line."""
    return " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))


ALL = [(m, t, s) for (t, s) in FIGURES for m in METHODS]


def test_every_pair_has_a_recipe_per_method() -> None:
    assert sorted(p.name for p in ZOO.glob("*.toml")) == sorted(recipe_name(*a) for a in ALL)


@pytest.mark.parametrize(("method", "teacher", "student"), ALL, ids=[recipe_name(*a) for a in ALL])
def test_every_recipe_has_the_published_setting(method: str, teacher: str, student: str) -> None:
    r = load_recipe(ZOO / recipe_name(method, teacher, student))
    assert r.data.dataset == "cifar100" and r.data.batch_size == 64 and r.data.val_split == 0
    assert [s.name for s in r.stages] == ["teacher", "student"]
    t, s = r.stages
    assert (t.backbone.name, t.graph.name, t.init) == (teacher, "none", None)
    assert (s.backbone.name, s.graph.to_dict()) == (student, {"name": "kd", "teacher": "teacher"})
    # DKD and DIST: the reference's CE + D is twice kdreg's loss: lr x2, weight decay / 2
    rescaled = {"lr": 0.1, "weight_decay": 2.5e-4} if method in ("dkd", "dist") else {}
    for stage, scaled in ((t, {}), (s, rescaled)):
        train = r.stage_train(stage)
        opt, sched = train.optimizer, train.schedule
        assert train.epochs == 240
        assert (opt.name, opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (
            "sgd", scaled.get("lr", 0.05), 0.9, scaled.get("weight_decay", 5e-4), False)
        assert opt.no_decay == () or list(opt.no_decay) == []
        assert (sched.name, sched.milestones, sched.gamma) == ("multistep", (150, 180, 210), 0.1)


@pytest.mark.parametrize(("method", "teacher", "student"), ALL, ids=[recipe_name(*a) for a in ALL])
def test_each_recipe_uses_its_method_as_the_reference_does(method: str, teacher: str, student: str) -> None:
    s = load_recipe(ZOO / recipe_name(method, teacher, student)).stages[1]
    divergence = getattr(s.divergence, "name", s.divergence)  # a name or a { name = ... } table
    options = getattr(s.divergence, "options", {})
    if method == "kd":        # -r 0.1 -a 0.9, kd_T 4
        assert (s.lam, s.tau, divergence, s.feature_losses) == (0.9, 4.0, "kl", ())
    elif method == "dkd":     # CE + DKD(alpha 1, beta per pair, T 4, warm-up 20) = 2 x kdreg's
        assert (s.lam, s.tau, divergence, s.feature_losses) == (0.5, 4.0, "dkd", ())
        assert options == {"alpha": 1.0, "beta": DKD_BETA[teacher], "warmup": 20}
    elif method == "dist":    # CE + 2 DIST(beta = gamma = 1, tau 4) = 2 x kdreg's
        assert (s.lam, s.tau, divergence, s.feature_losses) == (0.5, 4.0, "dist", ())
        assert options == {"beta": 2.0, "gamma": 2.0}
    else:                     # -r 1 -a 0 -b beta: CE + beta F
        assert s.lam == 0.0 and len(s.feature_losses) == 1
        f = s.feature_losses[0]
        assert (f.name, f.weight, f.options) == (method, BETA[method], OPTIONS[method])
        assert f.pairs == (tuple(points(method, student)), tuple(points(method, teacher)))


@pytest.mark.parametrize("net", sorted(FEAT_SHAPES))
def test_split_points_are_repdistillers_features(net: str) -> None:
    m = kdreg.build_backbone(net, num_classes=100)
    assert list(m.split_points()) == feat(net)
    shapes = m.feature_shapes()
    assert [(shapes[p][0], shapes[p][1]) for p in feat(net)] == FEAT_SHAPES[net]
    assert all(shapes[p][1] == shapes[p][2] for p in feat(net))


def test_readme_and_headers_give_the_published_figures() -> None:
    readme = (ZOO / "README.md").read_text()
    header = "| teacher -> student | teacher | student alone | " + " | ".join(LABELS) + " |"
    assert header in readme
    for (teacher, student), figures in FIGURES.items():
        row = f"| `{teacher}` -> `{student}` | " + " | ".join(f or "-" for f in figures) + " |"
        assert row in readme
        published = dict(zip(METHODS, figures[2:]))
        for method, label in zip(METHODS, LABELS):
            text = comment((ZOO / recipe_name(method, teacher, student)).read_text())
            assert f" {figures[0]}; " in text and f"trained alone {figures[1]};" in text
            assert f"KD {published['kd']}" in text and "HobbitLong/RepDistiller's README" in text
            if method in BETA:
                assert f"{label} {published[method]}. Source: HobbitLong/RepDistiller's README" in text
            elif method == "dkd":
                assert f"DKD {published['dkd']}. Source: megvii-research/mdistiller's README" in text
            elif method == "dist" and published["dist"]:
                assert f"DIST {published['dist']} (+-" in text and "Source: hunto/DIST_KD's README" in text
            elif method == "dist":
                assert "No published DIST figure for this pair" in text
                assert re.search(r"DIST \d", text) is None


def test_generated_recipes_are_the_shipped_ones() -> None:
    spec = importlib.util.spec_from_file_location("cifar100_zoo", ROOT / "tools" / "cifar100_zoo.py")
    assert spec is not None and spec.loader is not None
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    generated = tool.recipes()
    assert sorted(generated) == sorted(recipe_name(*a) for a in ALL if a[0] != "kd")
    for name, text in generated.items():
        assert (ZOO / name).read_text() == text, f"{name}: run python tools/cifar100_zoo.py"


# the references' losses, written out: mdistiller's dkd_loss (mdistiller/distillers/DKD.py) and
# DIST_KD's DIST (lib/models/losses/dist_kd.py), with their CE weight 1
def reference_dkd(s: Tensor, t: Tensor, y: Tensor, epoch: int, beta: float) -> Tensor:
    temp, gt = 4.0, F.one_hot(y, s.shape[1]).bool()
    ps, pt = (s / temp).softmax(1), (t / temp).softmax(1)
    bs = torch.stack([ps[gt], ps.masked_fill(gt, 0).sum(1)], 1)
    bt = torch.stack([pt[gt], pt.masked_fill(gt, 0).sum(1)], 1)
    tckd = F.kl_div(bs.log(), bt, reduction="sum") * temp**2 / len(y)
    nckd = F.kl_div(F.log_softmax(s / temp - 1000.0 * gt, 1), F.softmax(t / temp - 1000.0 * gt, 1),
                    reduction="sum") * temp**2 / len(y)
    return F.cross_entropy(s, y) + min(epoch / 20, 1.0) * (1.0 * tckd + beta * nckd)


def reference_dist(s: Tensor, t: Tensor, y: Tensor, epoch: int, beta: float) -> Tensor:
    def pearson(a: Tensor, b: Tensor) -> Tensor:
        a, b = a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True)
        return (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1) + 1e-8)
    tau = 4.0
    ps, pt = (s / tau).softmax(1), (t / tau).softmax(1)
    inter, intra = 1 - pearson(ps, pt).mean(), 1 - pearson(ps.t(), pt.t()).mean()
    return F.cross_entropy(s, y) + 2.0 * tau**2 * (inter + intra)   # kd_loss_weight 2


@pytest.mark.parametrize("method", ["dkd", "dist"])
@pytest.mark.usefixtures("one_thread")
def test_rescaled_students_take_the_references_sgd_steps(method: str) -> None:
    teacher, student = "wrn40_2", "wrn16_2"
    r = load_recipe(ZOO / recipe_name(method, teacher, student))
    stage = r.stages[1]
    opt = r.stage_train(stage).optimizer
    div = kdreg.build_divergence(stage.divergence.name, **stage.divergence.options)
    graph = kdreg.TeacherGraph(1, (kdreg.Edge(0, "teacher", 1.0),), external=("teacher",))
    reference = {"dkd": reference_dkd, "dist": reference_dist}[method]
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(32, 12, generator=gen, dtype=torch.float64)
    y = torch.randint(0, 10, (32,), generator=gen)
    t = 3 * torch.randn(32, 10, generator=gen, dtype=torch.float64)
    w0 = torch.randn(10, 12, generator=gen, dtype=torch.float64)

    def train(loss, lr: float, weight_decay: float) -> Tensor:
        w = w0.clone().requires_grad_(True)
        sgd = torch.optim.SGD([w], lr=lr, momentum=0.9, weight_decay=weight_decay, nesterov=False)
        for step in range(8):   # epochs 1..8 (DKD's warm-up), the schedule's x0.1 from step 5
            sgd.param_groups[0]["lr"] = lr * (0.1 if step >= 5 else 1.0)
            sgd.zero_grad()
            loss(x @ w.t(), step + 1).backward()
            sgd.step()
        return w.detach()

    def ours(s: Tensor, epoch: int) -> Tensor:
        return kdreg.distillation_loss([s], y, graph, lam=stage.lam, tau=stage.tau, divergence=div,
                                       external={"teacher": t}, epoch=epoch)

    want = train(lambda s, e: reference(s, t, y, e, DKD_BETA[teacher]), 0.05, 5e-4)
    # (kdreg's loss is computed in float32: equal to its rounding)
    torch.testing.assert_close(train(ours, opt.lr, opt.weight_decay), want, rtol=1e-5, atol=1e-6)
    assert (train(ours, 0.05, 5e-4) - want).abs().max() > 1e-2   # not rescaled: other steps


LOADED = ["stages.teacher.init={path}", "stages.teacher.epochs=0"]


def test_loaded_teacher_variant_validates_with_the_teachers_checkpoint(tmp_path: Path) -> None:
    name = "kd-resnet32x4-resnet8x4.toml"  # README.md's example
    teacher, student = "resnet32x4", "resnet8x4"
    right, wrong = tmp_path / "teacher.pt", tmp_path / "student.pt"
    torch.save(kdreg.build_backbone(teacher, num_classes=100).state_dict(), right)
    torch.save(kdreg.build_backbone(student, num_classes=100).state_dict(), wrong)
    recipe = load_recipe(ZOO / name, [o.format(path=right) for o in LOADED])
    assert (recipe.stages[0].init, recipe.stages[0].epochs) == (str(right), 0)
    assert check_recipe(recipe) == []
    problems = check_recipe(load_recipe(ZOO / name, [o.format(path=wrong) for o in LOADED]))
    assert problems and all(p.endswith("stages.teacher.init") for p in problems), problems
    missing = check_recipe(load_recipe(ZOO / name, [o.format(path=tmp_path / "none.pt") for o in LOADED]))
    assert any("does not exist" in p for p in missing), missing


BRIDGED = """
name = "bridged"
[data]
dataset = "cifar100"
[[stages]]
name = "teacher"
backbone = {{ name = "{teacher}" }}
graph = {{ name = "none" }}
[[stages]]
name = "student"
backbone = {{ name = "{student}" }}
graph = {{ name = "kd", teacher = "teacher" }}
bridge = {{ name = "stc", teacher = "teacher", student_split = "{split}", teacher_split = "{split}", alpha = 0.5 }}
[[stages]]
name = "exits"
backbone = {{ name = "exits", trunk = {{ name = "{student}" }} }}
graph = {{ name = "ipkd" }}
"""


@pytest.mark.parametrize(("teacher", "student", "split", "points"), [
    ("resnet32x4", "resnet8x4", "layer2", ["stem", "layer1", "layer2"]),
    ("vgg13", "vgg8", "layer3", ["layer1", "layer2", "layer3", "layer4"]),
])
def test_new_students_split_points_serve_stc_and_exits(teacher: str, student: str, split: str,
                                                       points: list[str]) -> None:
    recipe = parse_recipe(BRIDGED.format(teacher=teacher, student=student, split=split))
    assert check_recipe(recipe) == []
    exits = kdreg.build_backbone("exits", num_classes=100, trunk={"name": student})
    assert exits.submodel_labels == tuple(f"exit{i + 1}" for i in range(len(points))) + ("final",)
    outs = exits(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in outs] == [(2, 100)] * (len(points) + 1)
    bad = parse_recipe(BRIDGED.format(teacher=teacher, student=student, split="layer9"))
    assert any("layer9" in p for p in check_recipe(bad))


TINY = [
    "data.dataset=synthetic",
    "data.options={ train_size = 40, test_size = 20, num_classes = 10, image_size = 16 }",
    "data.batch_size=20",
    "train.epochs=1",
    "train.device=cpu",
    "stages.teacher.backbone.name=resnet8",  # a small teacher; the student stays resnet8x4
]


@pytest.mark.usefixtures("one_thread")
def test_a_zoo_recipe_runs_loads_its_teacher_and_exports_the_student(tmp_path: Path) -> None:
    recipe = ZOO / "kd-resnet32x4-resnet8x4.toml"
    trained = tmp_path / "trained"
    Run.start(recipe, trained, overrides=TINY, progress=False).execute()
    checkpoint = trained / "checkpoints" / "teacher" / "best.pt"
    loaded = tmp_path / "loaded"
    Run.start(recipe, loaded, overrides=TINY + [o.format(path=checkpoint) for o in LOADED],
              progress=False).execute()
    first = {s["name"]: s for s in json.loads((trained / "results.json").read_text())["stages"]}
    second = {s["name"]: s for s in json.loads((loaded / "results.json").read_text())["stages"]}
    # the loaded teacher is the first run's, evaluated and not trained
    assert second["teacher"]["init"] == str(checkpoint) and second["teacher"]["epochs"] == 0
    assert first["teacher"]["epochs"] == 1 and "init" not in first["teacher"]
    assert second["teacher"]["test_accuracy"] == first["teacher"]["test_accuracy"]
    assert second["student"]["teachers"] == ["teacher"]
    assert second["student"]["params"] == [1_210_410]  # resnet8x4, 10 classes

    out = tmp_path / "student.pt2"
    assert main(["export", str(loaded), "--out", str(out)]) == 0  # the last stage: the student
    info = json.loads(out.with_suffix(".json").read_text())
    assert (info["stage"], info["label"], info["params"]) == ("student", "full", 1_210_410)
    program = torch.export.load(str(out))
    assert sum(program.state_dict[n].numel() for n in program.graph_signature.parameters) == 1_210_410
    run = Run.resume(loaded, progress=False)
    run.device = torch.device("cpu")
    splits = kdreg.data.load_data(run.recipe.data)
    models = {plan.name: model for plan, model in run.trained_stages(splits)}
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = models["student"].forward_submodel((x - mean) / std, 0)
        got = program.module()(x)
    assert got.shape == (3, 10)
    torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
