"""Run directories as reports read them: a single run, or a repeat over seeds.

A *run* directory holds ``recipe.toml``, ``results.json`` and (with the ``jsonl`` logger)
``metrics.jsonl``. A *repeat* directory holds ``recipe.toml`` and one run directory per seed,
``seed-<s>/``. Either becomes one :class:`Column` of a report: one stage of every seed run, read
from the runs' own ``results.json`` (a single run is a repeat of one seed).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import attrs
import numpy as np
import tomli

from kdreg.errors import UserError

RECIPE_FILE, RESULTS_FILE, METRICS_FILE = "recipe.toml", "results.json", "metrics.jsonl"
SEED_DIR = re.compile(r"seed-(\d+)")
#: The ``[data]`` keys that decide which images a run trains, selects and tests on (and at what
#: size the models see them): runs that differ in one of them are not compared.
DATA_KEYS = ("dataset", "options", "val_split", "train_limit", "test_limit", "data_seed",
             "image_size")
DATA_DEFAULTS: dict[str, Any] = {"dataset": "cifar10", "options": {}, "val_split": 5000,
                                 "train_limit": 0, "test_limit": 0, "data_seed": 0,
                                 "image_size": 0}


def file_part(name: str) -> str:
    """A stage name as part of a file name (no path separators)."""
    return re.sub(r"[^\w.-]", "_", name)


def anytime_file(directory: Path, stage: str) -> Path:
    """Where ``kdreg eval --anytime`` writes a stage's curve by default."""
    return directory / f"anytime-{file_part(stage)}.json"


@attrs.frozen
class RunDir:
    """One run directory: its results, the ``[data]`` table of its recipe and its metrics file."""

    directory: Path
    results: dict[str, Any]
    data: dict[str, Any]

    @property
    def stage_names(self) -> list[str]:
        return [s["name"] for s in self.results.get("stages", [])]

    def stage(self, name: str) -> dict[str, Any] | None:
        return next((s for s in self.results.get("stages", []) if s.get("name") == name), None)

    def metrics(self, stage: str | None = None) -> list[dict[str, Any]]:
        """The epoch records of ``metrics.jsonl`` (of ``stage`` only, when given), one per epoch
        in epoch order; empty when the run wrote no ``metrics.jsonl``."""
        lines = read_metrics(self.directory) if (self.directory / METRICS_FILE).is_file() else []
        if stage is None:
            return lines
        by_epoch = {m["epoch"]: m for m in lines if m.get("stage") == stage}
        return [by_epoch[e] for e in sorted(by_epoch)]

    def anytime(self, stage: str) -> dict[str, Any] | None:
        """The anytime curve ``kdreg eval --anytime`` wrote for ``stage``, if any."""
        path = anytime_file(self.directory, stage)
        return _read_json(path) if path.is_file() else None


def read_metrics(directory: Path) -> list[dict[str, Any]]:
    """Every JSON line of ``directory/metrics.jsonl``; one error line per broken line."""
    path = directory / METRICS_FILE
    problems, metrics = [], []
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            metrics.append(json.loads(line))
        except json.JSONDecodeError as exc:
            problems.append(f"{path}:{n}: not JSON: {exc.msg}")
    if problems:
        raise UserError(problems)
    return metrics


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path}: not JSON: {exc.msg} (line {exc.lineno})") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object, got {type(data).__name__}")
    return data


def _read_data_table(path: Path) -> dict[str, Any]:
    try:
        raw = tomli.loads(path.read_text())
    except tomli.TOMLDecodeError as exc:
        raise UserError(f"{path}: broken TOML: {exc}") from None
    data = raw.get("data", {})
    return {key: data.get(key, DATA_DEFAULTS[key]) for key in DATA_KEYS}


def read_run(directory: Path) -> RunDir:
    """A finished or running run directory; a clear error when it is none."""
    results = directory / RESULTS_FILE
    if not results.is_file():
        if (directory / RECIPE_FILE).is_file():
            raise UserError(f"{directory} holds no {RESULTS_FILE} yet: no stage of the run has finished")
        raise UserError(f"{directory} is not a kdreg run directory: {results} is missing")
    recipe = directory / RECIPE_FILE
    data = _read_data_table(recipe) if recipe.is_file() else dict(DATA_DEFAULTS)
    return RunDir(directory, _read_json(results), data)


def seed_dirs(directory: Path) -> list[Path]:
    """The ``seed-<s>/`` run directories of a repeat, by seed (empty for a single run)."""
    found = []
    for path in directory.iterdir() if directory.is_dir() else ():
        match = SEED_DIR.fullmatch(path.name)
        if match and path.is_dir():
            found.append((int(match.group(1)), path))
    return [path for _, path in sorted(found)]


def is_repeat(directory: Path) -> bool:
    """A repeat directory: ``seed-<s>/`` runs and no ``results.json`` of its own."""
    return not (directory / RESULTS_FILE).is_file() and bool(seed_dirs(directory))


@attrs.frozen
class Column:
    """One stage of a run, or of every seed run of a repeat: a column of a report."""

    directory: Path
    stage: str
    runs: tuple[RunDir, ...]
    results: tuple[dict[str, Any], ...]   # the stage's entry of each run's results.json
    repeat: bool
    label: str = ""

    @property
    def recipe(self) -> str:
        return str(self.runs[0].results.get("recipe", self.directory.name))

    @property
    def method(self) -> str:
        """The stage's graph, ``+<bridge>`` when it has one: what tells methods apart."""
        first = self.results[0]
        graph = str(first.get("graph", "?"))
        return f"{graph}+{first['bridge']}" if first.get("bridge") else graph

    @property
    def seeds(self) -> list[int]:
        return [int(run.results.get("seed", 0)) for run in self.runs]

    @property
    def submodels(self) -> list[str]:
        return list(self.results[0]["submodels"])

    @property
    def params(self) -> list[int]:
        return list(self.results[0]["params"])

    @property
    def macs(self) -> list[int]:
        return list(self.results[0]["macs"])

    def test_accuracy(self) -> np.ndarray:
        """Test accuracy (%) of every seed run (rows) and sub-model (columns)."""
        return np.array([r["test_accuracy"] for r in self.results], dtype=float)


def mean_std(values: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """Mean and sample standard deviation (``ddof = 1``) over the first axis; no std for one row."""
    mean = values.mean(axis=0)
    return mean, (values.std(axis=0, ddof=1) if len(values) > 1 else None)


def load_column(directory: Path, stage: str | None = None) -> Column:
    """``directory`` (a run or a repeat) as a column: ``stage`` of each of its runs (default: the
    last finished stage)."""
    if not directory.is_dir():
        raise UserError(f"{directory} is not a kdreg run directory: no such directory")
    repeat = is_repeat(directory)
    runs = tuple(read_run(path) for path in seed_dirs(directory)) if repeat else (read_run(directory),)
    problems = []
    wanted = stage
    for run in runs:
        if not run.stage_names:
            problems.append(f"{run.directory} holds no finished stage yet")
        elif wanted is None:
            wanted = run.stage_names[-1]
    if problems:
        raise UserError(problems)
    assert wanted is not None
    results = []
    for run in runs:
        entry = run.stage(wanted)
        if entry is None:
            problems.append(f"{run.directory} has no finished stage {wanted!r}; its stages: "
                            f"{', '.join(run.stage_names)}" + ("" if stage else " (choose one with --stage NAME)"))
        else:
            results.append(entry)
    if problems:
        raise UserError(problems)
    singles = [Column(run.directory, wanted, (run,), (entry,), False) for run, entry in zip(runs, results)]
    for other in singles[1:]:   # the seeds of a repeat agree with each other
        problems += comparison_problems(singles[0], other)
    if problems:
        raise UserError(problems)
    return Column(directory, wanted, runs, tuple(results), repeat)


def comparison_problems(a: Column, b: Column) -> list[str]:
    """Why columns ``a`` and ``b`` cannot share a table (other architecture or other data), one line
    per difference; empty when they can."""
    head = f"{a.directory} and {b.directory} cannot be compared:"
    problems = []
    if a.submodels != b.submodels:
        problems.append(f"{head} sub-models {', '.join(a.submodels)} vs {', '.join(b.submodels)} "
                        f"(stages {a.stage!r}, {b.stage!r})")
    else:
        for what, x, y in (("parameters", a.params, b.params), ("MACs", a.macs, b.macs)):
            if x != y:
                problems.append(f"{head} {what} per sub-model {_ints(x)} vs {_ints(y)}: other architectures "
                                f"(stages {a.stage!r}, {b.stage!r})")
    for key, x, y in _data_differences(a.runs[0].data, b.runs[0].data):
        problems.append(f"{head} other data: data.{key} = {x!r} vs {y!r}")
    return problems


def _data_differences(a: dict[str, Any], b: dict[str, Any]) -> list[tuple[str, Any, Any]]:
    """``(key, a's value, b's value)`` for every :data:`DATA_KEYS` key (and option) that differs."""
    found = []
    for key in DATA_KEYS:
        x, y = a.get(key), b.get(key)
        if isinstance(x, dict) and isinstance(y, dict):
            found += [(f"{key}.{k}", x.get(k), y.get(k)) for k in sorted({*x, *y}) if x.get(k) != y.get(k)]
        elif x != y:
            found.append((key, x, y))
    return found


def _ints(values: list[int]) -> str:
    return ", ".join(f"{v:,}" for v in values)


def load_columns(directories: list[Path], stage: str | None = None) -> list[Column]:
    """The columns of a report, checked to be comparable, each with its :attr:`Column.label`.

    Labels: the method (stage graph, ``+bridge``) when that tells every column apart; else
    ``<recipe>: <method>``; else ``<recipe>/<stage>: <method>``; else the directory name; else the
    directory as given.
    """
    seen: dict[Path, Path] = {}
    problems = []
    for d in directories:
        key = d.resolve()
        if key in seen:
            problems.append(f"{d} is given twice (as {seen[key]})")
        seen[key] = d
    if problems:
        raise UserError(problems)
    columns = [load_column(d, stage) for d in directories]
    for other in columns[1:]:
        problems += comparison_problems(columns[0], other)
    if problems:
        raise UserError(problems)
    rules = (lambda c: c.method, lambda c: f"{c.recipe}: {c.method}",
             lambda c: f"{c.recipe}/{c.stage}: {c.method}", lambda c: c.directory.name, lambda c: str(c.directory))
    for rule in rules:
        labels = [rule(c) for c in columns]
        if len(set(labels)) == len(labels):
            break
    return [attrs.evolve(c, label=label) for c, label in zip(columns, labels)]
