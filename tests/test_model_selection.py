"""Model selection reads the validation split only: a run whose test labels disagree with the
training and validation labels still reports the epoch with the best mean validation accuracy, and
that epoch's test accuracy."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from kdreg import plugins
from kdreg.data import ImageData, load_data
from kdreg.engine.evaluate import evaluate
from kdreg.engine.run import Run
from kdreg.engine.trainer import eval_loader
from kdreg.hookspecs import hookimpl
from kdreg_plugins.datasets.synthetic import synthetic

RECIPE = """
name = "selection"
seed = 0
[data]
dataset = "permuted-test"
batch_size = 32
val_split = 96
options = { train_size = 416, test_size = 96, num_classes = 4, image_size = 12 }
[train]
epochs = 4
optimizer = { lr = 0.02, momentum = 0.0, weight_decay = 0.0, nesterov = false }
schedule = { name = "constant" }
[[stages]]
name = "student"
backbone = { name = "tiny_exits", exits = 2, channels = 4 }
"""


def permuted_test(*, root: Path | None = None, download: bool = False, **options: Any) -> ImageData:
    """Synthetic data whose test label of every image is the next class: the better a model is on
    the training distribution (and the validation split), the worse on this test set."""
    data = synthetic(**options)
    k = len(data.classes)
    return ImageData(train_images=data.train_images, train_labels=data.train_labels,
                     test_images=data.test_images, test_labels=(data.test_labels + 1) % k,
                     classes=data.classes, mean=data.mean, std=data.std)


class Probe:
    """Registers the data set and, after every epoch, evaluates the model being trained on the real
    validation and test splits (evaluation changes neither the weights nor any RNG)."""

    def __init__(self) -> None:
        self.val: list[list[float]] = []
        self.test: list[list[float]] = []
        self.splits: Any = None

    @hookimpl
    def kdreg_register_datasets(self, register: Any) -> None:
        register("permuted-test", permuted_test)

    @hookimpl
    def kdreg_epoch_finished(self, run: Any, stage: str, record: dict[str, Any]) -> None:
        if self.splits is None:
            self.splits = load_data(run.recipe.data)
        model = next(plan.model for plan in run.plans if plan.name == stage)
        for part, into in (("val", self.val), ("test", self.test)):
            into.append(evaluate(model, eval_loader(self.splits, part, 500, run.device), device=run.device))


def _mean(values: list[float]) -> float:
    return sum(values) / len(values)


def test_the_best_epoch_follows_validation_not_test(tmp_path: Path) -> None:
    recipe = tmp_path / "selection.toml"
    recipe.write_text(RECIPE)
    probe = Probe()
    plugins.reset(plugins.make_plugin_manager(extra=[probe]))
    try:
        stage = Run.start(recipe, tmp_path / "run", progress=False).execute()["stages"][0]
    finally:
        plugins.reset()
    metrics = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(metrics) == len(probe.val) == 4
    # what is logged as validation accuracy is the validation split's
    assert [m["val_accuracy"] for m in metrics] == probe.val
    by_val = max(range(4), key=lambda e: metrics[e]["mean_val_accuracy"]) + 1   # first best, 1-based
    by_test = max(range(4), key=lambda e: _mean(probe.test[e])) + 1
    assert by_val != by_test, "the data must make validation and test disagree"
    assert stage["best_epoch"] == by_val
    assert stage["val_accuracy"] == probe.val[by_val - 1]
    assert stage["test_accuracy"] == pytest.approx(probe.test[by_val - 1])
