"""Anytime evaluation (``kdreg eval DIR --anytime``): MSDNet's budgeted batch classification."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from kdreg import anytime
from kdreg.cli import main

RECIPE = """
name = "{name}"
seed = {seed}
[data]
dataset = "synthetic"
batch_size = 32
val_split = {val_split}
options = {{ train_size = 320, test_size = {test_size}, num_classes = 10, image_size = 8 }}
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "cosine" }}
[[stages]]
name = "student"
backbone = {backbone}
graph = {{ name = "{graph}" }}
lam = 0.8
tau = 2.0
"""


def train(directory: Path, *, name: str = "exits", seed: int = 0, graph: str = "ipkd-ta-m",
          backbone: str = '{ name = "tiny_exits" }', epochs: int = 2, val_split: int = 64,
          test_size: int = 256) -> Path:
    """A trained run of a tiny recipe on synthetic data (10 classes of 8x8 images: not all right)."""
    recipe = directory.parent / f"{directory.name}.toml"
    recipe.write_text(RECIPE.format(name=name, seed=seed, graph=graph, backbone=backbone, epochs=epochs,
                                    val_split=val_split, test_size=test_size))
    assert main(["run", str(recipe), "--out", str(directory), "--no-progress"]) == 0
    return directory


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Path:
    return train(tmp_path_factory.mktemp("anytime") / "run")


# ---------------------------------------------------------------------------- the procedure
def test_exit_proportions_follow_p_to_the_k() -> None:
    q = anytime.exit_proportions(0.5, 3)
    assert q == pytest.approx(np.array([0.5, 0.25, 0.125]) / 0.875)
    assert list(anytime.exit_proportions(0.0, 3)) == [1, 0, 0]
    assert list(anytime.exit_proportions(math.inf, 3)) == [0, 0, 1]
    assert anytime.exit_counts([0.3, 0.3, 0.4], 10) == [3, 3, 4]
    assert anytime.exit_counts([0.35, 0.35, 0.3], 10) == [3, 4, 3]   # cumulative: floor(3.5), floor(7.0)


def distinct_confidences(seed: int, exits: int, images: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.permutation(exits * images).reshape(exits, images) / (exits * images) + 1e-3


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), exits=st.integers(2, 6), images=st.integers(1, 80),
       p=st.floats(0.0, 3.0) | st.just(math.inf))
def test_the_validation_split_leaves_exactly_as_planned(seed: int, exits: int, images: int, p: float) -> None:
    """With distinct confidences, the thresholds fitted on a split make exactly the planned number
    of its images leave at every exit."""
    conf = distinct_confidences(seed, exits, images)
    counts = anytime.exit_counts(anytime.exit_proportions(p, exits), images)
    thresholds = anytime.fit_thresholds(conf, counts)
    assert all(0.0 <= t <= 1.0 for t in thresholds) and thresholds[-1] == 0.0
    taken = anytime.exits_taken(conf, thresholds)
    assert np.bincount(taken, minlength=exits).tolist() == counts


@settings(max_examples=60, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), exits=st.integers(2, 5), images=st.integers(1, 60),
       levels=st.integers(1, 4))
def test_ties_never_let_more_leave_than_planned(seed: int, exits: int, images: int, levels: int) -> None:
    """Confidences on a coarse grid (many ties): by every exit at most the planned number left."""
    rng = np.random.default_rng(seed)
    conf = rng.integers(1, levels + 1, size=(exits, images)) / levels
    for p in anytime.GRID[::4]:
        counts = anytime.exit_counts(anytime.exit_proportions(p, exits), images)
        taken = anytime.exits_taken(conf, anytime.fit_thresholds(conf, counts))
        left = np.cumsum(np.bincount(taken, minlength=exits))
        assert (left <= np.cumsum(counts)).all() and left[-1] == images


def test_images_tied_at_a_threshold_stay_and_the_next_exit_makes_up_for_them() -> None:
    conf = np.array([[0.9, 0.9, 0.5, 0.4],      # one should leave at exit 1, but two are tied
                     [0.8, 0.7, 0.6, 0.3],
                     [0.5, 0.5, 0.5, 0.5]])
    thresholds = anytime.fit_thresholds(conf, [1, 2, 1])
    assert thresholds == [0.9, 0.3, 0.0]
    assert np.bincount(anytime.exits_taken(conf, thresholds), minlength=3).tolist() == [0, 3, 1]


@settings(max_examples=30, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), exits=st.integers(2, 6), images=st.integers(1, 80))
def test_the_cost_grows_with_the_budget(seed: int, exits: int, images: int) -> None:
    conf = distinct_confidences(seed, exits, images)
    correct = np.random.default_rng(seed).random((exits, images)) < 0.5
    outputs = anytime.ExitOutputs(conf, correct)
    macs = sorted(np.random.default_rng(seed).integers(1, 10**6, size=exits).tolist())
    points = anytime.budget_curve(outputs, outputs, macs)
    for key in ("budget_macs", "val_avg_macs", "avg_macs"):
        values = [pt[key] for pt in points]
        assert all(a <= b + 1e-6 for a, b in zip(values, values[1:])), key
    assert points[0]["avg_macs"] == pytest.approx(macs[0]) and points[-1]["avg_macs"] == pytest.approx(macs[-1])


# ---------------------------------------------------------------------------- a trained run
def by_hand(logits: torch.Tensor, labels: torch.Tensor, thresholds: list[float]) -> tuple[float, list[int]]:
    """Accuracy (%) and exit counts of the rule, one image at a time."""
    right, counts = 0, [0] * len(logits)
    for i in range(logits.shape[1]):
        for k in range(len(logits)):
            probs = torch.softmax(logits[k, i].double(), dim=-1)
            if k == len(logits) - 1 or probs.max().item() > thresholds[k]:
                right += int(probs.argmax().item() == labels[i].item())
                counts[k] += 1
                break
    return 100.0 * right / logits.shape[1], counts


def saved_logits(directory: Path, part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Every exit's logits of the selected weights, computed here from the checkpoint."""
    from kdreg.api import build_backbone
    from kdreg.data import load_data
    from kdreg.engine import checkpoint
    from kdreg.engine.trainer import eval_loader
    from kdreg.recipe import load_recipe

    recipe = load_recipe(directory / "recipe.toml")
    splits = load_data(recipe.data)
    model = build_backbone("tiny_exits", num_classes=10, input_size=(8, 8))
    checkpoint.load_weights(model, directory / "checkpoints" / "student" / "best.pt")
    model.eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in (splits.mean, splits.std))
    outs, ys = [], []
    with torch.no_grad():
        for x, y in eval_loader(splits, part, 100, torch.device("cpu")):  # in [0, 1]
            outs.append(torch.stack(model((x - mean) / std)))
            ys.append(y)
    return torch.cat(outs, dim=1), torch.cat(ys)


def test_eval_anytime_writes_the_budgeted_curve(run_dir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(run_dir), "--anytime"]) == 0
    out = capsys.readouterr().out
    path = run_dir / "anytime-student.json"
    assert f"wrote {path}" in out and "thresholds chosen on 64 validation images, tested on 256" in out
    curve: dict[str, Any] = json.loads(path.read_text())
    stage = json.loads((run_dir / "results.json").read_text())["stages"][0]
    macs = stage["macs"]
    assert curve["macs"] == macs and curve["submodels"] == ["exit1", "exit2", "exit3"]
    assert [e["test_accuracy"] for e in curve["exits"]] == pytest.approx(stage["test_accuracy"])
    points = curve["points"]
    assert len(points) == len(anytime.GRID) == 41
    budgets = [pt["budget_macs"] for pt in points]
    assert budgets == sorted(budgets) and budgets[0] == macs[0] and budgets[-1] == macs[-1]
    val_macs = [pt["val_avg_macs"] for pt in points]
    assert val_macs == sorted(val_macs)
    for pt in points:
        assert sum(pt["exit_fractions"]) == pytest.approx(1.0)
        assert pt["avg_macs"] == pytest.approx(sum(f * m for f, m in zip(pt["exit_fractions"], macs)))
        assert pt["val_avg_macs"] == pytest.approx(sum(f * m for f, m in zip(pt["val_exit_fractions"], macs)))
    first, last = points[0], points[-1]
    assert first["p"] == 0.0 and first["exit_fractions"] == [1.0, 0.0, 0.0]
    assert first["accuracy"] == pytest.approx(stage["test_accuracy"][0])
    assert last["p"] is None and last["thresholds"] == [1.0, 1.0, 0.0]   # nobody leaves early
    assert last["exit_fractions"] == [0.0, 0.0, 1.0] and last["avg_macs"] == macs[-1]
    assert last["accuracy"] >= stage["test_accuracy"][-1] - 1e-9
    assert len({pt["accuracy"] for pt in points}) > 3          # a curve, not a constant

    logits, labels = saved_logits(run_dir, "test")
    for pt in points[::3]:
        accuracy, counts = by_hand(logits, labels, pt["thresholds"])
        assert pt["accuracy"] == pytest.approx(accuracy)
        assert pt["exit_fractions"] == pytest.approx([c / 256 for c in counts])
    val_logits, val_labels = saved_logits(run_dir, "val")
    for pt in points[1:-1:5]:   # on the validation split the planned shares leave
        _, counts = by_hand(val_logits, val_labels, pt["thresholds"])
        assert counts == anytime.exit_counts(pt["proportions"], 64)


def test_the_thresholds_come_from_the_validation_split(run_dir: Path, tmp_path: Path) -> None:
    """Other test images: the same thresholds; another validation split: other thresholds."""
    base = tmp_path / "base.json"
    assert main(["eval", str(run_dir), "--anytime", "--out", str(base)]) == 0
    other_test = tmp_path / "test.json"
    assert main(["eval", str(run_dir), "--anytime", "--out", str(other_test),
                 "--set", "data.options.test_size=128"]) == 0
    other_val = tmp_path / "val.json"
    assert main(["eval", str(run_dir), "--anytime", "--out", str(other_val), "--set", "data.data_seed=1"]) == 0
    a, b, c = (json.loads(p.read_text()) for p in (base, other_test, other_val))
    assert b["test_images"] == 128 and a["test_images"] == 256
    assert [pt["thresholds"] for pt in b["points"]] == [pt["thresholds"] for pt in a["points"]]
    assert [pt["accuracy"] for pt in b["points"]] != [pt["accuracy"] for pt in a["points"]]
    assert [pt["thresholds"] for pt in c["points"]] != [pt["thresholds"] for pt in a["points"]]


@pytest.mark.parametrize("case", ["one sub-model", "multi-pass", "no validation split", "unknown stage"])
def test_eval_anytime_refuses_what_cannot_exit_early(case: str, tmp_path: Path, run_dir: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    if case == "unknown stage":
        directory, extra = run_dir, ["--stage", "teacher"]
    else:
        backbone = {"one sub-model": '{ name = "tiny_exits", exits = 1 }',
                    "multi-pass": '{ name = "tiny_slimmable" }'}.get(case, '{ name = "tiny_exits" }')
        directory = train(tmp_path / "run", backbone=backbone, graph="none", epochs=1,
                          val_split=0 if case == "no validation split" else 64)
        extra = []
    capsys.readouterr()
    assert main(["eval", str(directory), "--anytime", *extra]) == 2
    err = capsys.readouterr().err
    expected = {"one sub-model": "stage 'student' has one sub-model (exit1): no exit to leave at early",
                "multi-pass": "stage 'student' is multi-pass (x0.25, x0.5, x0.75, x1.0",
                "no validation split": "no validation split to choose thresholds on @ recipe.data.val_split",
                "unknown stage": "has no trained stage 'teacher'; trained: student"}[case]
    assert expected in err and err.startswith("error: ") and "Traceback" not in err
    if directory != run_dir:
        assert not list(directory.glob("anytime-*.json"))
