"""Recipe parsing, strictness, inheritance and overrides."""

from __future__ import annotations

from pathlib import Path

import pytest

from kdreg.engine.assemble import check_recipe
from kdreg.errors import RecipeError
from kdreg.recipe import dump_recipe, parse_recipe

BASE = """
name = "r"
[data]
dataset = "synthetic"
[train]
epochs = 10
optimizer = { lr = 0.05, weight_decay = 1e-4 }
schedule = { name = "multistep", milestones = [5, 8] }
[[stages]]
name = "student"
backbone = { name = "slimmable_mobilenet_v1", widths = [0.25, 0.5, 0.75, 1.0] }
graph = { name = "ipkd-ta-m" }
lam = 0.8
tau = 1.0
divergence = "ce"
"""


def problems_of(text: str, overrides: list[str] | None = None) -> list[str]:
    try:
        recipe = parse_recipe(text, source="r.toml", overrides=overrides or [])
    except RecipeError as exc:
        return exc.problems
    return check_recipe(recipe)


def test_a_good_recipe_structures_with_defaults() -> None:
    r = parse_recipe(BASE)
    s = r.stages[0]
    assert s.backbone.name == "slimmable_mobilenet_v1" and s.backbone.options == {"widths": [0.25, 0.5, 0.75, 1.0]}
    assert s.graph.name == "ipkd-ta-m" and s.divergence.name == "ce" and s.divergence.options == {}
    assert r.data.batch_size == 128 and r.data.val_split == 5000
    assert r.stage_train(s).optimizer.lr == 0.05 and r.stage_train(s).optimizer.nesterov is True
    assert check_recipe(r) == []


def test_stage_overrides_merge_with_train_defaults() -> None:
    r = parse_recipe(BASE + "epochs = 3\noptimizer = { lr = 0.01 }\n")
    eff = r.stage_train(r.stages[0])
    assert eff.epochs == 3 and eff.optimizer.lr == 0.01 and eff.optimizer.weight_decay == 1e-4
    assert eff.schedule.milestones == (5, 8)


def test_overrides_by_dotted_path_and_stage_name() -> None:
    r = parse_recipe(BASE, overrides=["train.epochs=1", "data.train_limit=512", "stages.student.lam=0.5",
                                      "stages.student.graph.name=ipkd", "data.root=/tmp/x y"])
    assert r.train.epochs == 1 and r.data.train_limit == 512 and r.data.root == "/tmp/x y"
    assert r.stages[0].lam == 0.5 and r.stages[0].graph.name == "ipkd"


def test_round_trip_of_the_resolved_recipe() -> None:
    r = parse_recipe(BASE)
    assert parse_recipe(dump_recipe(r)) == r


@pytest.mark.parametrize(
    "text,overrides,expected",
    [
        (BASE + "colour = 3\n", [], "unknown key(s) colour @ recipe.stages.student"),
        (BASE, ["train.optimizer.no_decay='bias'"], "expected a list, got str 'bias' @ recipe.train.optimizer.no_decay"),
        (BASE.replace("epochs = 10", "epochs = 2.5"), [], "expected an integer, got float 2.5 @ recipe.train.epochs"),
        (BASE.replace("epochs = 10", "epochs = '10'"), [], "expected an integer, got str '10' @ recipe.train.epochs"),
        (BASE.replace("lam = 0.8", "lam = 1.5"), [], "lam must be in [0, 1], got 1.5 @ recipe.stages.student.lam"),
        (BASE.replace("lam = 0.8", "lam = -0.1"), [], "lam must be in [0, 1], got -0.1 @ recipe.stages.student.lam"),
        (BASE.replace("tau = 1.0", "tau = 0"), [], "tau must be > 0, got 0 @ recipe.stages.student.tau"),
        (BASE.replace('divergence = "ce"', 'divergence = "js"'), [], "unknown divergence 'js'; registered: ce, dist, dkd, hard, kl @ recipe.stages.student.divergence.name"),
        (BASE.replace('divergence = "ce"', 'divergence = 3'), [], "expected a table with a `name` or a name string, got int 3 @ recipe.stages.student.divergence"),
        (BASE.replace("[train]", "[train]\nbatch = 3"), [], "unknown key(s) batch @ recipe.train"),
        (BASE.replace('"ipkd-ta-m"', '"ipkd-tam"'), [], "unknown graph 'ipkd-tam' (did you mean ipkd-ta-m"),
        (BASE.replace('"slimmable_mobilenet_v1"', '"mobilenet"'), [], "@ recipe.stages.student.backbone.name"),
        (BASE.replace('"synthetic"', '"cifar11"'), [], "unknown dataset 'cifar11'"),
        (BASE.replace("widths = [0.25, 0.5, 0.75, 1.0]", "widths = [0.5, 0.25]"), [], "@ recipe.stages.student.backbone.widths"),
        (BASE.replace("widths = [", "width = ["), [], "unknown option 'width' for backbone 'slimmable_mobilenet_v1'"),
        (BASE.replace('{ name = "ipkd-ta-m" }', '{ name = "subset", teachers = { "2" = [1] } }'), [],
         "teacher 1 is smaller than its student 2 @ recipe.stages.student.graph.teachers"),
        (BASE.replace('{ name = "ipkd-ta-m" }', '{ name = "subset", teachers = { "7" = [1] } }'), [],
         "student 7 does not exist (sub-models 0..3) @ recipe.stages.student.graph.teachers"),
        (BASE.replace("name = \"r\"", "name = \"r\"\n[data"), [], "broken TOML"),
        (BASE, ["stages.teacher.lam=0.1"], "no stage named 'teacher'; stages: student @ --set"),
        (BASE, ["train.epochs"], "override 'train.epochs' is not KEY=VALUE @ --set"),
        (BASE + "\n[[stages]]\nname = \"student\"\nbackbone = \"tiny_exits\"\n", [], "stage name 'student' is used more than once"),
        (BASE.replace("milestones = [5, 8]", "milestones = [8, 5]"), [], "milestones must increase"),
        (BASE.replace("[train]", "[train]\ndevice = \"gpu\""), [], "device must be auto, cpu, cuda or cuda:N"),
    ],
)
def test_bad_recipes_name_the_key(text: str, overrides: list[str], expected: str) -> None:
    problems = problems_of(text, overrides)
    assert any(expected in p for p in problems), problems


def test_every_problem_is_reported_on_its_own_line() -> None:
    text = BASE.replace("lam = 0.8", "lam = 2.0\nfoo = 1").replace("epochs = 10", "epochs = 'x'")
    problems = problems_of(text)
    assert len(problems) == 3, problems
    assert all(p.startswith("r.toml: ") and " @ recipe." in p for p in problems)


def test_an_unknown_plugin_lists_the_registered_names() -> None:
    problems = problems_of(BASE.replace('"ipkd-ta-m"', '"teacher-assistant"'))
    assert any("registered: cohort, deit, ipkd, ipkd-ta-1, ipkd-ta-m, kd, none, subset" in p for p in problems), problems


def test_tables_and_lists_of_the_wrong_kind() -> None:
    problems = problems_of('data = 3\nstages = 5\n[train]\noptimizer = "sgd"\n')
    assert problems == ["r.toml: expected a table @ recipe.data", "r.toml: expected a table @ recipe.train.optimizer",
                        "r.toml: expected a list, got int 5 @ recipe.stages"]


def test_a_run_parses_its_recipe_once(smoke_recipe, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """`kdreg run` (and `--resume`) read and structure the recipe once; the plan is built once."""
    import kdreg.recipe as recipe_module
    from kdreg.cli import main
    from kdreg.engine import assemble as assemble_module
    from kdreg.engine import run as run_module

    calls = {"structure": 0, "assemble": 0}
    structure, assemble = recipe_module.structure_recipe, assemble_module.assemble

    def counting_structure(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["structure"] += 1
        return structure(*args, **kwargs)

    def counting_assemble(*args, **kwargs):  # type: ignore[no-untyped-def]
        calls["assemble"] += 1
        return assemble(*args, **kwargs)

    monkeypatch.setattr(recipe_module, "structure_recipe", counting_structure)
    monkeypatch.setattr(run_module, "assemble", counting_assemble)
    path = smoke_recipe(epochs=1)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert calls == {"structure": 1, "assemble": 1}
    for key in calls:
        calls[key] = 0
    assert main(["run", "--resume", str(tmp_path / "run"), "--no-progress"]) == 0
    assert calls == {"structure": 1, "assemble": 1}
