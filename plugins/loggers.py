"""Metrics loggers, as a run-event plugin: every epoch's record to the files the recipe asks for.

``[train] loggers`` names them (default ``["jsonl"]``):

- ``jsonl``: ``metrics.jsonl``, the record of every epoch as one JSON line (what ``kdreg report``
  reads);
- ``csv``: ``metrics-<stage>.csv``, one file per stage (stages differ in their sub-models), a row
  per epoch: a column per scalar of the record and one per sub-model accuracy,
  ``train_accuracy[x0.25]``, ``val_accuracy[x0.25]`` ...;
- ``tensorboard``: ``tensorboard/<stage>/``, one TensorBoard run per stage, with the scalars
  ``train/loss``, ``train/lr``, ``train/accuracy/<sub-model>``, ``val/accuracy/<sub-model>`` and
  ``val/mean_accuracy`` at step = epoch (needs ``pip install "kdreg[tensorboard]"``).

A resumed run appends. The first epoch a stage logs in a process is the one after its checkpoint,
so each logger first drops what it holds of that stage from that epoch on (lines, rows or events
of epochs that ran after the checkpoint before the run was stopped): the files then hold every
epoch once, as an uninterrupted run writes them.

Only rank 0 of a distributed run logs: every logger is a no-op in a process whose environment
variable ``RANK`` is set to anything but ``0`` (as ``torchrun`` sets it).
"""

from __future__ import annotations

import csv
import json
import re
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from kdreg.hookspecs import hookimpl
from kdreg.process import is_main

JSONL_FILE = "metrics.jsonl"
CSV_FILE = "metrics-{stage}.csv"
TENSORBOARD_DIR = "tensorboard"


def file_part(stage: str) -> str:
    """A stage name as a file or folder name (no separators, not ``.`` or ``..``)."""
    part = re.sub(r"[^\w.-]", "_", stage)
    return f"_{part}" if part.strip(".") == "" else part


class Logger(ABC):
    """Receives every epoch's record; ``first`` is true for the first record of a stage in this
    process (the one after the stage's checkpoint: what the logger holds from that epoch on is
    stale)."""

    def __init__(self, run: Any):
        self.directory: Path = run.directory
        self.labels = {plan.name: list(plan.model.submodel_labels) for plan in run.plans}
        #: the sub-models a training step trains, where they are not the evaluated ones (a width
        #: range trains its smallest, drawn and largest widths): ``train_accuracy``'s labels
        self.train_labels = {plan.name: list(plan.model.train_labels or plan.model.submodel_labels)
                             for plan in run.plans}

    def labels_of(self, stage: str, key: str, count: int) -> list[str]:
        """The labels of the list ``key`` of a record of ``stage`` (``count`` values)."""
        known = (self.train_labels if key == "train_accuracy" else self.labels).get(stage)
        return known or [str(i) for i in range(count)]

    @abstractmethod
    def epoch(self, stage: str, record: dict[str, Any], first: bool) -> None:
        """Write ``record``, an epoch of ``stage``."""

    def stage_finished(self, stage: str) -> None:  # noqa: B027 - most loggers need nothing here
        """Stage ``stage`` finished."""

    def close(self) -> None:  # noqa: B027 - most loggers hold nothing open
        """The run finished (or stopped)."""


class JsonlLogger(Logger):
    """``metrics.jsonl``: every record as a JSON line, all stages in one file."""

    def epoch(self, stage: str, record: dict[str, Any], first: bool) -> None:
        path = self.directory / JSONL_FILE
        if first and path.is_file():
            done = record["epoch"] - 1
            keep = [line for line in path.read_text().splitlines()
                    if line.strip() and not (json.loads(line)["stage"] == stage and json.loads(line)["epoch"] > done)]
            path.write_text("".join(line + "\n" for line in keep))
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")


class CsvLogger(Logger):
    """``metrics-<stage>.csv``: a row per epoch; a list of the record (one value per sub-model)
    becomes a column per sub-model, ``key[label]``, empty where the list is (no validation split)."""

    def columns(self, stage: str, record: dict[str, Any]) -> list[str]:
        out = []
        for key, value in record.items():
            if isinstance(value, list):
                out += [f"{key}[{label}]" for label in self.labels_of(stage, key, len(value))]
            else:
                out.append(key)
        return out

    def row(self, stage: str, record: dict[str, Any]) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, value in record.items():
            if isinstance(value, list):
                row.update({f"{key}[{label}]": v for label, v in zip(self.labels_of(stage, key, len(value)), value)})
            else:
                row[key] = "" if value is None else value
        return row

    def epoch(self, stage: str, record: dict[str, Any], first: bool) -> None:
        path = self.directory / CSV_FILE.format(stage=file_part(stage))
        columns = self.columns(stage, record)
        if first:   # rewrite: the header, and the rows of the epochs before this one
            kept = []
            if path.is_file():
                with open(path, newline="") as f:
                    kept = [r for r in csv.DictReader(f) if (r.get("epoch") or "").isdigit()
                            and int(r["epoch"]) < record["epoch"]]
            with open(path, "w", newline="") as f:
                writer = csv.DictWriter(f, columns, restval="", extrasaction="ignore")
                writer.writeheader()
                writer.writerows(kept)
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, columns, restval="", extrasaction="ignore").writerow(self.row(stage, record))


class TensorBoardLogger(Logger):
    """``tensorboard/<stage>/``: a ``SummaryWriter`` per stage, scalars at step = epoch. A resumed
    stage's writer purges the events of the epochs after its checkpoint (``purge_step``)."""

    def __init__(self, run: Any):
        super().__init__(run)
        self.writers: dict[str, Any] = {}

    def epoch(self, stage: str, record: dict[str, Any], first: bool) -> None:
        from torch.utils.tensorboard import SummaryWriter

        step = record["epoch"]
        writer = self.writers.get(stage)
        if writer is None:
            log_dir = self.directory / TENSORBOARD_DIR / file_part(stage)
            writer = self.writers[stage] = SummaryWriter(str(log_dir), purge_step=step)
        writer.add_scalar("train/loss", record["train_loss"], step)
        writer.add_scalar("train/lr", record["lr"], step)
        train = record["train_accuracy"]
        for label, acc in zip(self.labels_of(stage, "train_accuracy", len(train)), train):
            writer.add_scalar(f"train/accuracy/{label}", acc, step)
        val = record["val_accuracy"] or []
        for label, acc in zip(self.labels_of(stage, "val_accuracy", len(val)), val):
            writer.add_scalar(f"val/accuracy/{label}", acc, step)
        if record.get("mean_val_accuracy") is not None:
            writer.add_scalar("val/mean_accuracy", record["mean_val_accuracy"], step)
        writer.flush()

    def stage_finished(self, stage: str) -> None:
        writer = self.writers.pop(stage, None)
        if writer is not None:
            writer.close()

    def close(self) -> None:
        for stage in list(self.writers):
            self.stage_finished(stage)


LOGGERS: dict[str, type[Logger]] = {"jsonl": JsonlLogger, "csv": CsvLogger, "tensorboard": TensorBoardLogger}


class _RunLoggers:
    """The loggers of one run, and the stages that have logged in this process."""

    def __init__(self, run: Any):
        self.loggers = [LOGGERS[name](run) for name in run.recipe.train.loggers]
        self.started: set[str] = set()

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


_runs: dict[str, _RunLoggers] = {}   # by run directory: a run, or its resumption, at a time


def _start(run: Any) -> _RunLoggers:
    stopped = _runs.pop(str(run.directory), None)   # an earlier run there that was stopped
    if stopped is not None:
        stopped.close()
    state = _runs[str(run.directory)] = _RunLoggers(run)
    return state


@hookimpl
def kdreg_run_started(run: Any) -> None:
    if is_main():
        _start(run)


@hookimpl(tryfirst=True)   # before plugins that may stop the run (Ctrl-C in another plugin)
def kdreg_epoch_finished(run: Any, stage: str, record: dict[str, Any]) -> None:
    if not is_main():
        return
    state = _runs.get(str(run.directory)) or _start(run)
    first = stage not in state.started
    state.started.add(stage)
    for logger in state.loggers:
        logger.epoch(stage, record, first)


@hookimpl
def kdreg_stage_finished(run: Any, stage: str, result: dict[str, Any]) -> None:
    state = _runs.get(str(run.directory))
    if state is not None:
        for logger in state.loggers:
            logger.stage_finished(stage)


@hookimpl
def kdreg_run_finished(run: Any, results: dict[str, Any]) -> None:
    state = _runs.pop(str(run.directory), None)
    if state is not None:
        state.close()
