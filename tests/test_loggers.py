"""The metrics loggers (plugins/loggers.py): real runs of a tiny synthetic two-stage recipe."""

from __future__ import annotations

import csv
import json
import shutil
import sys
from pathlib import Path
from typing import Any

import pytest

from kdreg import plugins
from kdreg.cli import main
from kdreg.engine.run import Run
from kdreg.hookspecs import hookimpl

RECIPE = """
name = "loggers"
seed = 0
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = {{ train_size = 192, test_size = 64, num_classes = 4, image_size = 16 }}
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "cosine" }}
log_interval = 2
{loggers}
[[stages]]
name = "teacher"
backbone = "tiny_exits"
graph = "ipkd"
[[stages]]
name = "student"
backbone = "tiny_slimmable"
graph = {{ name = "kd", teacher = "teacher" }}
lam = 0.8
tau = 2.0
"""
LABELS = {"teacher": ["exit1", "exit2", "exit3"], "student": ["x0.25", "x0.5", "x0.75", "x1.0"]}
SCALARS = ["stage", "epoch", "lr", "train_loss", "images_per_second", "mean_val_accuracy", "best_epoch", "seconds"]
TIMES = {"seconds", "images_per_second"}   # differ from run to run


@pytest.fixture(autouse=True)
def _one_thread(one_thread):  # type: ignore[no-untyped-def]
    yield


def recipe(tmp_path: Path, loggers: list[str] | None, epochs: int = 2) -> Path:
    path = tmp_path / f"recipe-{epochs}-{'-'.join(loggers or ['default'])}.toml"
    line = "" if loggers is None else f"loggers = {json.dumps(loggers)}"
    path.write_text(RECIPE.format(epochs=epochs, loggers=line))
    return path


def jsonl(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def csv_rows(out: Path, stage: str) -> tuple[list[str], list[dict[str, str]]]:
    with open(out / f"metrics-{stage}.csv", newline="") as f:
        reader = csv.DictReader(f)
        return list(reader.fieldnames or []), list(reader)


def scalars(out: Path, stage: str) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(out / "tensorboard" / stage))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def without_times(record: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in record.items() if k not in TIMES and not any(k.startswith(t) for t in TIMES)}


def flat(record: dict[str, Any]) -> dict[str, Any]:
    """``record`` with each entry of a list its own field (``train_accuracy[0]``, ...) and the
    list's length (``train_accuracy#``)."""
    out: dict[str, Any] = {}
    for key, value in record.items():
        if isinstance(value, list):
            out.update({f"{key}[{i}]": item for i, item in enumerate(value)})
            out[f"{key}#"] = len(value)
        else:
            out[key] = value
    return out


def assert_records_close(a: dict[str, Any], b: dict[str, Any], rel: float) -> None:
    """The same fields, every number within ``rel`` of the other's and everything else equal, field
    by field (pytest.approx of a whole record depends on the pytest release: 9.2 refuses nested
    records and strings)."""
    fa, fb = flat(a), flat(b)
    assert fa.keys() == fb.keys()
    for key, value in fa.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            assert value == pytest.approx(fb[key], rel=rel), key
        else:
            assert value == fb[key], key


def numbers(row: dict[str, str]) -> dict[str, float]:
    return {k: float(v) for k, v in row.items() if k != "stage"}


def test_the_default_is_metrics_jsonl_alone(tmp_path: Path) -> None:
    out = tmp_path / "run"
    Run.start(recipe(tmp_path, None), out, progress=False).execute()
    lines = (out / "metrics.jsonl").read_text().splitlines()
    assert [(r["stage"], r["epoch"]) for r in map(json.loads, lines)] == [
        ("teacher", 1), ("teacher", 2), ("student", 1), ("student", 2)]
    assert all(line == json.dumps(json.loads(line)) for line in lines)   # the format of json.dumps(record)
    assert list(json.loads(lines[0])) == ["stage", "epoch", "lr", "train_loss", "train_accuracy",
                                          "images_per_second", "val_accuracy", "mean_val_accuracy",
                                          "best_epoch", "seconds"]
    assert not list(out.glob("*.csv")) and not (out / "tensorboard").exists()


def test_csv_has_a_file_per_stage_a_row_per_epoch_and_a_column_per_submodel(tmp_path: Path) -> None:
    out = tmp_path / "run"
    Run.start(recipe(tmp_path, ["jsonl", "csv"]), out, progress=False).execute()
    records = jsonl(out)
    assert sorted(p.name for p in out.glob("*.csv")) == ["metrics-student.csv", "metrics-teacher.csv"]
    for stage, labels in LABELS.items():
        header, rows = csv_rows(out, stage)
        expected = (SCALARS[:4] + [f"train_accuracy[{label}]" for label in labels] + ["images_per_second"]
                    + [f"val_accuracy[{label}]" for label in labels] + SCALARS[5:])
        assert header == expected
        mine = [r for r in records if r["stage"] == stage]
        assert len(rows) == len(mine) == 2
        for row, record in zip(rows, mine):
            assert row["stage"] == stage and int(row["epoch"]) == record["epoch"]
            for key in ("lr", "train_loss", "mean_val_accuracy", "seconds", "images_per_second"):
                assert float(row[key]) == record[key], key
            for key in ("train_accuracy", "val_accuracy"):
                assert [float(row[f"{key}[{label}]"]) for label in labels] == record[key], key


def test_csv_leaves_validation_columns_empty_without_a_validation_split(tmp_path: Path) -> None:
    out = tmp_path / "run"
    Run.start(recipe(tmp_path, ["csv"]), out, overrides=["data.val_split=0"], progress=False).execute()
    header, rows = csv_rows(out, "student")
    assert "val_accuracy[x1.0]" in header and "mean_val_accuracy" in header
    assert all(r["val_accuracy[x1.0]"] == "" and r["mean_val_accuracy"] == "" for r in rows)
    assert not (out / "metrics.jsonl").exists()


class StopAfter:
    """Stops the run (as Ctrl-C would) after the student's epoch ``epoch``; with ``stale``, first
    puts back the checkpoint of the epoch before, as when a run is killed after the epoch's metrics
    were written but before its checkpoint was: the loggers then hold an epoch the resumed run
    trains again."""

    def __init__(self, epoch: int, stale: bool):
        self.epoch, self.stale = epoch, stale

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        if stage != "student":
            return
        last = run.directory / "checkpoints" / stage / "last.pt"
        if record["epoch"] == self.epoch - 1:
            shutil.copy(last, last.with_suffix(".keep"))
        if record["epoch"] == self.epoch:
            if self.stale:
                shutil.move(last.with_suffix(".keep"), last)
            raise KeyboardInterrupt


@pytest.mark.parametrize("stale", [False, True], ids=["clean-stop", "killed-before-checkpoint"])
def test_a_resumed_run_appends_and_holds_every_epoch_once(tmp_path: Path, stale: bool) -> None:
    pytest.importorskip("tensorboard", reason='the tensorboard logger needs pip install "kdreg[tensorboard]"')
    loggers = ["jsonl", "csv", "tensorboard"]
    path = recipe(tmp_path, loggers, epochs=3)
    Run.start(path, tmp_path / "full", progress=False).execute()
    plugins.reset(plugins.make_plugin_manager(extra=[StopAfter(2, stale)]))
    try:
        with pytest.raises(KeyboardInterrupt):
            Run.start(path, tmp_path / "cut", progress=False).execute()
    finally:
        plugins.reset()
    cut = tmp_path / "cut"
    assert [(r["stage"], r["epoch"]) for r in jsonl(cut)][-2:] == [("student", 1), ("student", 2)]
    assert len(csv_rows(cut, "student")[1]) == 2
    assert [step for step, _ in scalars(cut, "student")["train/loss"]] == [1, 2]
    Run.resume(cut, progress=False).execute()

    full = tmp_path / "full"
    expected = [(s, e) for s in ("teacher", "student") for e in (1, 2, 3)]
    assert [(r["stage"], r["epoch"]) for r in jsonl(cut)] == expected
    for a, b in zip(jsonl(full), jsonl(cut)):
        assert_records_close(without_times(a), without_times(b), rel=1e-6)
    for stage in LABELS:
        header_a, rows_a = csv_rows(full, stage)
        header_b, rows_b = csv_rows(cut, stage)
        assert header_a == header_b and [r["epoch"] for r in rows_b] == ["1", "2", "3"]
        for a, b in zip(rows_a, rows_b):
            assert a["stage"] == b["stage"] == stage
            assert numbers(without_times(a)) == pytest.approx(numbers(without_times(b)), rel=1e-6)
        tb_a, tb_b = scalars(full, stage), scalars(cut, stage)
        assert tb_a.keys() == tb_b.keys()
        for tag in tb_a:
            assert [s for s, _ in tb_b[tag]] == [1, 2, 3], tag
            assert [v for _, v in tb_a[tag]] == pytest.approx([v for _, v in tb_b[tag]], rel=1e-5), tag


def test_tensorboard_has_the_scalars_of_every_epoch_and_stage(tmp_path: Path) -> None:
    pytest.importorskip("tensorboard", reason='the tensorboard logger needs pip install "kdreg[tensorboard]"')
    out = tmp_path / "run"
    Run.start(recipe(tmp_path, ["tensorboard"]), out, progress=False).execute()
    assert sorted(p.name for p in (out / "tensorboard").iterdir()) == ["student", "teacher"]
    assert not (out / "metrics.jsonl").exists()
    jsonl_out = tmp_path / "jsonl"
    Run.start(recipe(tmp_path, ["jsonl"]), jsonl_out, progress=False).execute()
    records = jsonl(jsonl_out)   # the same seed: the same numbers
    for stage, labels in LABELS.items():
        tb = scalars(out, stage)
        assert sorted(tb) == sorted(["train/loss", "train/lr", "val/mean_accuracy"]
                                    + [f"{part}/accuracy/{label}" for part in ("train", "val") for label in labels])
        mine = [r for r in records if r["stage"] == stage]
        assert tb["train/loss"] == [(r["epoch"], pytest.approx(r["train_loss"], rel=1e-5)) for r in mine]
        assert tb["train/lr"] == [(r["epoch"], pytest.approx(r["lr"], rel=1e-5)) for r in mine]
        assert tb["val/mean_accuracy"] == [(r["epoch"], pytest.approx(r["mean_val_accuracy"], rel=1e-5)) for r in mine]
        for i, label in enumerate(labels):
            for part in ("train", "val"):
                assert tb[f"{part}/accuracy/{label}"] == [
                    (r["epoch"], pytest.approx(r[f"{part}_accuracy"][i], rel=1e-5)) for r in mine]


def test_tensorboard_without_the_package_is_a_recipe_error_naming_the_extra(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.setitem(sys.modules, "tensorboard", None)   # as if not installed: import fails
    path = recipe(tmp_path, ["jsonl", "tensorboard"])
    expected = ("logger 'tensorboard' needs the tensorboard package: pip install \"kdreg[tensorboard]\" "
                "@ recipe.train.loggers")
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("loggers,expected", [
    (["jsonl", "wandb"], "unknown logger(s) 'wandb'; known: csv, jsonl, tensorboard @ recipe.train.loggers"),
    (["csv", "csv"], "logger(s) 'csv' listed more than once @ recipe.train.loggers"),
    ("csv", "expected a list, got str 'csv' @ recipe.train.loggers"),
    ([3], "expected a string, got int 3 @ recipe.train.loggers[0]"),
])
def test_bad_loggers_are_recipe_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                       loggers: Any, expected: str) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE.format(epochs=1, loggers=f"loggers = {json.dumps(loggers)}"))
    assert main(["validate", str(path)]) == 2
    assert capsys.readouterr().err == f"error: {path}: {expected}\n"
