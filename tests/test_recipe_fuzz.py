"""Malformed recipes, generated: every problem is one ``error: ... @ key.path`` line, exit code 2,
no traceback, and a run writes nothing.

Each example injects problems into a valid recipe, at most one per key (and one unknown key per
table), so the number of lines and their key paths are known. Problems of the recipe's structure
(types, unknown keys, ranges, choices) are found when it is read; stage references only once it
reads, so an example with both expects the first kind alone (as with a divergence no plugin
builds: an unknown name, an option unknown or out of range).
"""

from __future__ import annotations

import contextlib
import copy
import io
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import tomli_w
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from kdreg.cli import main

BASE: dict[str, Any] = {
    "name": "fuzz",
    "seed": 0,
    "data": {"dataset": "synthetic", "batch_size": 16, "val_split": 16,
             "options": {"train_size": 64, "test_size": 32, "num_classes": 4, "image_size": 16}},
    "train": {"epochs": 1, "optimizer": {"name": "sgd", "lr": 0.05, "momentum": 0.9},
              "schedule": {"name": "cosine", "gamma": 0.2, "warmup_epochs": 0}, "log_interval": 2,
              "precision": "fp32", "device": "cpu", "loggers": ["jsonl"]},
    "stages": [
        {"name": "teacher", "backbone": {"name": "tiny_slimmable", "widths": [0.5, 1.0]}},
        {"name": "student", "backbone": {"name": "tiny_slimmable"}, "graph": {"name": "kd", "teacher": "teacher"},
         "lam": 0.8, "tau": 2.0, "divergence": "kl", "epochs": 1},
    ],
}
STAGES = {"teacher": 0, "student": 1}

# values of the wrong type for a key of each type (none of them a number, so no range check fires)
NOT_INT = st.sampled_from(["ten", True, [1], {"n": 1}, "1"])
NOT_FLOAT = st.sampled_from(["high", False, [0.5], {"v": 0.5}, "0.5"])
NOT_STR = st.sampled_from([3, 2.5, True, ["kl"], {"n": "kl"}])
NOT_BOOL = st.sampled_from([1, 0, "yes", "true", [True]])
BELOW_ZERO_INT = st.integers(-10**6, -1)
NOT_POSITIVE_INT = st.integers(-10**6, 0)
NOT_POSITIVE = st.one_of(st.just(0), st.just(0.0), st.floats(-1e6, -1e-6))
ABOVE_1 = st.floats(1.000001, 1e6)
BELOW_0 = st.floats(-1e6, -1e-6)
UNKNOWN_KEY = st.from_regex(r"[a-z][a-z0-9]{0,7}_x", fullmatch=True)   # no real key ends with _x


def at(raw: dict[str, Any], path: tuple[str, ...]) -> dict[str, Any]:
    """The table ``path`` names (stages by name)."""
    node: Any = raw
    for part in path:
        node = node["stages"][STAGES[part]] if part in STAGES else node[part]
    return node  # type: ignore[no-any-return]


def key_path(path: tuple[str, ...]) -> str:
    return ".".join(["recipe", *(f"stages.{p}" if p in STAGES else p for p in path)])


# Problems found when the recipe is read: (table, key, strategy of the bad value). The key path of
# the line is the key's, except for an unknown key: the table's.
VALUES: list[tuple[tuple[str, ...], str, st.SearchStrategy[Any]]] = [
    ((), "seed", NOT_INT), ((), "seed", BELOW_ZERO_INT), ((), "name", NOT_STR),
    (("data",), "batch_size", NOT_INT), (("data",), "batch_size", NOT_POSITIVE_INT),
    (("data",), "val_split", NOT_INT), (("data",), "val_split", BELOW_ZERO_INT),
    (("data",), "download", NOT_BOOL), (("data",), "dataset", NOT_STR),
    (("train",), "epochs", NOT_INT), (("train",), "epochs", NOT_POSITIVE_INT),
    (("train",), "log_interval", NOT_POSITIVE_INT), (("train",), "precision", st.sampled_from(["fp8", "half", ""])),
    (("train",), "device", st.sampled_from(["gpu", "cuda:x", "tpu"])),
    (("train",), "loggers", st.sampled_from(["jsonl", 3, ["wandb"], ["csv", "csv"], {"a": "csv"}])),
    (("train", "optimizer"), "lr", NOT_FLOAT), (("train", "optimizer"), "lr", NOT_POSITIVE),
    (("train", "optimizer"), "momentum", ABOVE_1), (("train", "optimizer"), "momentum", BELOW_0), (("train", "optimizer"), "name", st.sampled_from(["adam", "SGD"])),
    (("train", "schedule"), "gamma", NOT_POSITIVE), (("train", "schedule"), "warmup_epochs", BELOW_ZERO_INT),
    (("train", "schedule"), "name", st.sampled_from(["step", 7])),
    (("student",), "lam", NOT_FLOAT), (("student",), "lam", ABOVE_1), (("student",), "lam", BELOW_0),
    (("student",), "tau", NOT_POSITIVE), (("student",), "divergence", st.sampled_from([1, 2.5, True, ["kl"]])),
    (("student",), "epochs", NOT_INT), (("student",), "epochs", BELOW_ZERO_INT),
]
TABLES = [(), ("data",), ("train",), ("train", "optimizer"), ("train", "schedule"), ("teacher",), ("student",)]


def _set(table: tuple[str, ...], key: str, value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        at(raw, table)[key] = value
    return mutate


@st.composite
def read_problems(draw: st.DrawFn) -> list[tuple[Callable[[dict[str, Any]], None], str]]:
    """Problems of types, ranges, choices and unknown keys, at most one per key and per table's
    unknown keys; each with the key path its line names."""
    picks = draw(st.lists(st.sampled_from(range(len(VALUES))), max_size=4,
                          unique_by=lambda i: (VALUES[i][0], VALUES[i][1])))
    out = []
    for i in picks:
        table, key, values = VALUES[i]
        out.append((_set(table, key, draw(values)), key_path((*table, key))))
    for table in draw(st.lists(st.sampled_from(TABLES), max_size=2, unique=True)):
        out.append((_set(table, draw(UNKNOWN_KEY), 1), key_path(table)))
    return out


def _graph(stage: str, teacher: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        at(raw, (stage,))["graph"] = {"name": "kd", "teacher": teacher}
    return mutate


def _third(teacher: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        raw["stages"].append({"name": "third", "backbone": "tiny_slimmable",
                              "graph": {"name": "kd", "teacher": teacher}})
    return mutate


MISSING = st.sampled_from(["ghost", "teachr", "Student", "third"])


REFERENCES = ["missing", "later", "itself", "third", "divergence", "divergence-option"]

# divergence tables that read but name no divergence, or give one an option out of range
BAD_DIVERGENCES = st.one_of(
    st.sampled_from(["js", "KL", "dkdd", "ghost"]).map(lambda n: (n, "name")),
    st.sampled_from([({"name": "dkd", "beta": -1.0}, "beta"), ({"name": "dkd", "alpha": -0.5}, "alpha"),
                     ({"name": "dkd", "warmup": -3}, "warmup"), ({"name": "dist", "gamma": -2.0}, "gamma"),
                     ({"name": "kl", "standardise": "yes"}, "standardise"),
                     ({"name": "dkd", "temperature": 4.0}, "temperature")]))


def _divergence(value: Any) -> Callable[[dict[str, Any]], None]:
    def mutate(raw: dict[str, Any]) -> None:
        at(raw, ("student",))["divergence"] = value
    return mutate


def reference(kind: str, draw: Callable[[st.SearchStrategy[Any]], Any]) -> tuple[Callable[[dict[str, Any]], None], str]:
    """A broken stage reference of ``kind`` (or a divergence no plugin builds), and the key path
    of its line."""
    if kind.startswith("divergence"):   # an unknown name, or an option out of range or unknown
        value, key = draw(BAD_DIVERGENCES)
        return _divergence(value), f"recipe.stages.student.divergence.{key}"
    if kind == "missing":   # a name no stage has
        return _graph("student", draw(MISSING)), "recipe.stages.student.graph.teacher"
    if kind == "later":
        return _graph("teacher", "student"), "recipe.stages.teacher.graph.teacher"
    if kind == "itself":
        return _graph("teacher", "teacher"), "recipe.stages.teacher.graph.teacher"
    # an ensemble with one teacher that is no earlier stage
    return _third(draw(st.permutations(["teacher", "nobody"]))), "recipe.stages.third.graph.teacher"


@st.composite
def reference_problems(draw: st.DrawFn) -> list[tuple[Callable[[dict[str, Any]], None], str]]:
    """Broken stage references (a graph naming a missing stage, a later one or itself) and
    divergences no plugin builds."""
    kinds = draw(st.lists(st.sampled_from(REFERENCES), min_size=1, max_size=3,
                          unique_by=lambda k: "teacher" if k in ("later", "itself") else k.split("-")[0]))
    return [reference(kind, draw) for kind in kinds]


LINE = re.compile(r"^error: (?P<file>\S+?): .* @ (?P<key>\S+)$")


def check(raw: dict[str, Any], expected: list[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bad.toml"
        path.write_text(tomli_w.dumps(raw))
        out = Path(tmp) / "out"
        for argv in (["validate", str(path)], ["run", str(path), "--out", str(out), "--no-progress"]):
            err, std = io.StringIO(), io.StringIO()
            with contextlib.redirect_stderr(err), contextlib.redirect_stdout(std):
                code = main(argv)
            lines = err.getvalue().splitlines()
            assert code == 2, (argv[0], code, err.getvalue(), std.getvalue())
            assert "Traceback" not in err.getvalue()
            for line in lines:
                match = LINE.match(line)
                assert match and match["file"] == str(path), line
            assert sorted(LINE.match(line)["key"] for line in lines) == sorted(expected), lines  # type: ignore[index]
            assert not out.exists(), argv


def test_the_base_recipe_is_valid(capsys: pytest.CaptureFixture[str]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "good.toml"
        path.write_text(tomli_w.dumps(BASE))
        assert main(["validate", str(path)]) == 0, capsys.readouterr().err
    assert capsys.readouterr().out.rstrip().endswith(": ok")


@pytest.mark.parametrize("index", range(len(VALUES)),
                         ids=[".".join((*t, k)) + f"-{i}" for i, (t, k, _) in enumerate(VALUES)])
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_every_kind_of_problem_alone(index: int, data: st.DataObject) -> None:
    table, key, values = VALUES[index]
    raw = copy.deepcopy(BASE)
    _set(table, key, data.draw(values, label=key))(raw)
    check(raw, [key_path((*table, key))])


@pytest.mark.parametrize("table", TABLES, ids=lambda t: ".".join(t) or "top")
def test_an_unknown_key_alone(table: tuple[str, ...]) -> None:
    raw = copy.deepcopy(BASE)
    _set(table, "colour_x", 1)(raw)
    check(raw, [key_path(table)])


@pytest.mark.parametrize("kind", REFERENCES)
@settings(max_examples=3, deadline=None)
@given(data=st.data())
def test_every_kind_of_broken_reference_alone(kind: str, data: st.DataObject) -> None:
    raw = copy.deepcopy(BASE)
    mutate, where = reference(kind, data.draw)
    mutate(raw)
    check(raw, [where])


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(read=read_problems(), refs=st.one_of(st.just([]), reference_problems()))
def test_malformed_recipes_are_reported_one_line_per_problem(read: list[Any], refs: list[Any]) -> None:
    assume(read or refs)
    raw = copy.deepcopy(BASE)
    for mutate, _ in refs + read:   # a read problem where a reference broke replaces it
        mutate(raw)
    # stage references are checked once the recipe reads
    expected = [where for _, where in read] if read else [where for _, where in refs]
    check(raw, expected)
