"""The recipe reference cannot go stale, and every shipped recipe validates."""

from __future__ import annotations

import re
from pathlib import Path

import attrs
import pytest

from kdreg import recipe as recipe_module
from kdreg.engine.assemble import check_recipe
from kdreg.recipe import load_recipe
from kdreg.recipe_docs import SECTIONS, reference_markdown

ROOT = Path(__file__).resolve().parent.parent
RECIPES = sorted((ROOT / "recipes").rglob("*.toml"))


def test_recipe_reference_is_up_to_date() -> None:
    doc = (ROOT / "docs" / "recipes.md").read_text()
    assert doc == reference_markdown(), "regenerate with: python -m kdreg.recipe_docs > docs/recipes.md"


def test_every_recipe_key_is_documented() -> None:
    doc = (ROOT / "docs" / "recipes.md").read_text()
    documented = {cls for _, _, cls in SECTIONS}
    for cls in documented:
        for f in attrs.fields(cls):
            assert f.metadata.get("doc"), f"{cls.__name__}.{f.name} has no doc"
            prefix = next(p for _, p, c in SECTIONS if c is cls)
            assert f"| `{prefix}{f.name}` |" in doc
    classes = {obj for obj in vars(recipe_module).values()
               if isinstance(obj, type) and attrs.has(obj) and obj.__module__ == recipe_module.__name__}
    assert classes - documented == {recipe_module.PluginSpec, recipe_module._FeatureKeys}


def test_recipes_are_shipped() -> None:
    names = {p.name for p in RECIPES}
    assert "quickstart.toml" in names
    for ds in ("cifar10", "cifar100"):
        for method in ("none", "ipkd", "ipkd-ta-1", "ipkd-ta-m"):
            assert f"table2-mobilenet-{ds}-{method}.toml" in names
            assert f"table1-msdnet-{ds}-{method}.toml" in names


@pytest.mark.parametrize("path", RECIPES, ids=[str(p.relative_to(ROOT / "recipes")) for p in RECIPES])
def test_shipped_recipe_validates(path: Path) -> None:
    recipe = load_recipe(path)
    assert check_recipe(recipe) == []


@pytest.mark.parametrize("path", [p for p in RECIPES if p.name.startswith("table")], ids=lambda p: p.name)
def test_paper_recipes_use_the_papers_hyperparameters(path: Path) -> None:
    r = load_recipe(path)
    stage = r.stages[0]
    method = path.stem.split("-", 3)[-1]
    assert stage.graph.name == method and stage.lam == 0.8
    train = r.stage_train(stage)
    assert train.optimizer.name == "sgd" and train.optimizer.lr == 0.1 and train.optimizer.momentum == 0.9
    text = path.read_text()          # the comments credit each setting the paper leaves open
    assert "reference.md" not in text and "# Augmentation: " in text
    if "mobilenet" in path.name:   # ipkd-ta section IV: 200 epochs, tau 1, CE divergence
        # not stated there: pytorch-cifar100's decay, batch and milestones; slimmable's Nesterov
        comment = " ".join(line[2:] for line in text.splitlines() if line.startswith("# "))
        assert ("(weiaicunzai/pytorch-cifar100): SGD momentum 0.9, weight decay 5e-4, batch 128, "
                "lr x0.2 at epochs 60, 120 and 160.") in comment
        assert train.optimizer.nesterov and set(train.optimizer.no_decay) == {"bias", "norm", "depthwise"}
        assert (train.epochs, stage.tau, stage.divergence.name) == (200, 1.0, "ce")
        assert stage.backbone.options["widths"] == [0.25, 0.5, 0.75, 1.0]
        assert train.schedule.milestones == (60, 120, 160) and train.schedule.gamma == 0.2
        assert r.data.batch_size == 128 and train.optimizer.weight_decay == 5e-4
    else:                          # 300 epochs, tau 5, KL; MSDNet's optimiser
        assert (train.epochs, stage.tau, stage.divergence.name) == (300, 5.0, "kl")
        assert train.schedule.milestones == (150, 225) and train.schedule.gamma == 0.1
        assert r.data.batch_size == 64 and train.optimizer.weight_decay == 1e-4
    assert r.data.dataset == path.stem.split("-")[2]


def test_ci_runs_the_readme_test_command() -> None:
    readme = (ROOT / "README.md").read_text()
    commands = [line.strip() for line in readme.splitlines() if line.startswith("python3 -m pip install")]
    assert len(commands) == 2, commands
    install_and_run, install_and_test = commands
    assert install_and_run.endswith("kdreg run recipes/quickstart.toml")
    install, test = install_and_test.split(" && ")
    ci = (ROOT / ".ci" / "run").read_text()
    assert install in ci and test in ci
    # into a fresh virtual environment: the newest releases the ranges allow, as a new user gets them
    assert ci.index("python3 -m venv") < ci.index("activate") < ci.index(install)
    # and the tests the README's command leaves out, as the README says to run them
    processes = "python3 -m pytest -q -m processes"
    assert f"\n{processes}\n" in readme and f"\n{processes}" in ci
    assert ci.index(f"{test}\n") < ci.index(processes)


def test_user_facing_files_point_nowhere_outside_the_repository() -> None:
    """README, docs, recipes, code, docstrings and tools send users to nothing they do not have."""
    roots = ["README.md", "docs", "recipes", "kdreg", "plugins", "tools", "examples", "benchmarks"]
    offenders = []
    for root in roots:
        path = ROOT / root
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()
                                                and p.suffix in (".md", ".py", ".toml", ".txt")]
        for f in files:
            for n, line in enumerate(f.read_text(errors="replace").splitlines(), 1):
                if "shared/" in line or re.search(r"design section \d", line):
                    offenders.append(f"{f.relative_to(ROOT)}:{n}: {line.strip()}")
    assert offenders == []
