"""recipes/cifar100-zoo: the RepDistiller / mdistiller CIFAR-100 pairs as plain-KD recipes.

Their settings against the published ones; the loaded-teacher variant (``init`` and ``epochs = 0``
set on the command line) validates with a checkpoint of the right network and refuses another's;
and one recipe runs end to end on tiny synthetic data, its teacher trained, then loaded from that
run's checkpoint, its resnet8x4 student exported with ``kdreg export``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import kdreg
from kdreg.cli import main
from kdreg.engine.assemble import check_recipe
from kdreg.engine.run import Run
from kdreg.recipe import load_recipe, parse_recipe

ROOT = Path(__file__).resolve().parent.parent
ZOO = ROOT / "recipes" / "cifar100-zoo"

# recipe -> (teacher, student, published teacher / student alone / KD / DKD accuracies, %):
# RepDistiller's README table 1 (CRD Table 1) and mdistiller's README (DKD)
PAIRS = {
    "kd-resnet56-resnet20.toml": ("resnet56", "resnet20", ("72.34", "69.06", "70.66", "71.97")),
    "kd-resnet110-resnet32.toml": ("resnet110", "resnet32", ("74.31", "71.14", "73.08", "74.11")),
    "kd-resnet32x4-resnet8x4.toml": ("resnet32x4", "resnet8x4", ("79.42", "72.50", "73.33", "76.32")),
    "kd-wrn40_2-wrn16_2.toml": ("wrn40_2", "wrn16_2", ("75.61", "73.26", "74.92", "76.23")),
    "kd-vgg13-vgg8.toml": ("vgg13", "vgg8", ("74.64", "70.36", "72.98", "74.68")),
}
LOADED = ["stages.teacher.init={path}", "stages.teacher.epochs=0"]


def test_every_pair_has_a_recipe_with_the_published_setting() -> None:
    assert sorted(p.name for p in ZOO.glob("*.toml")) == sorted(PAIRS)
    readme = (ZOO / "README.md").read_text()
    for name, (teacher, student, published) in PAIRS.items():
        text = (ZOO / name).read_text()
        r = load_recipe(ZOO / name)
        assert r.data.dataset == "cifar100" and r.data.batch_size == 64 and r.data.val_split == 0
        assert [s.name for s in r.stages] == ["teacher", "student"]
        t, s = r.stages
        assert (t.backbone.name, t.graph.name, t.init) == (teacher, "none", None)
        assert (s.backbone.name, s.graph.to_dict()) == (student, {"name": "kd", "teacher": "teacher"})
        divergence = getattr(s.divergence, "name", s.divergence)  # a name or a { name = ... } table
        assert (s.lam, s.tau, divergence) == (0.9, 4.0, "kl")  # -r 0.1 -a 0.9, kd_T 4
        for stage in (t, s):
            train = r.stage_train(stage)
            opt, sched = train.optimizer, train.schedule
            assert train.epochs == 240
            assert (opt.name, opt.lr, opt.momentum, opt.weight_decay, opt.nesterov) == (
                "sgd", 0.05, 0.9, 5e-4, False)
            assert opt.no_decay == () or list(opt.no_decay) == []
            assert (sched.name, sched.milestones, sched.gamma) == ("multistep", (150, 180, 210), 0.1)
        # each recipe names its published numbers and their sources; the README's table too
        assert "RepDistiller's README" in text and "mdistiller's README" in text
        row = f"| `{name}` | `{teacher}` -> `{student}` | {' | '.join(published)} |"
        assert row in readme
        for number in published:
            assert number in text


def test_loaded_teacher_variant_validates_with_the_teachers_checkpoint(tmp_path: Path) -> None:
    name = "kd-resnet32x4-resnet8x4.toml"  # README.md's example
    teacher, student, _ = PAIRS[name]
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
