"""``kdreg report RUN_DIR... --out DIR``: the paper-style table and the plots of runs and repeats."""

from __future__ import annotations

import json
import shutil
import statistics
from pathlib import Path

import numpy as np
import pytest
from test_anytime import train

from kdreg.cli import main
from kdreg.report import learning_curves
from kdreg.rundirs import load_columns

PNG = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> dict[str, Path]:
    """Two methods on the same backbone: ``none`` (one run) and ``ipkd-ta-m`` (a repeat laid out by
    hand from two runs of other seeds), and runs that cannot be compared with them."""
    base = tmp_path_factory.mktemp("report")
    none = train(base / "none", name="none", graph="none")
    seeds = [train(base / f"tam-{s}", name="tam", seed=s) for s in (0, 1)]
    repeat = base / "tam"
    repeat.mkdir()
    shutil.copy(seeds[0] / "recipe.toml", repeat / "recipe.toml")
    for s, run in zip((0, 1), seeds):
        shutil.copytree(run, repeat / f"seed-{s}")
    slim = train(base / "slim", name="slim", graph="none", backbone='{ name = "tiny_slimmable" }', epochs=1)
    other_data = train(base / "other-data", name="none", graph="none", epochs=1, test_size=128)
    return {"none": none, "repeat": repeat, "seed-0": seeds[0], "seed-1": seeds[1], "slim": slim,
            "other-data": other_data}


def rows(md: str) -> dict[str, list[str]]:
    """The table of report.md: its cells by the row's first cell."""
    lines = [line for line in md.splitlines() if line.startswith("| ")]
    return {cells[0]: cells[1:] for cells in ([c.strip() for c in line.strip("|").split("|")] for line in lines)}


def stage(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())["stages"][-1]


def test_two_methods_one_table_and_the_plots(runs: dict[str, Path], tmp_path: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "report"
    assert main(["report", str(runs["none"]), str(runs["repeat"]), "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    for name in ("report.md", "accuracy.png", "accuracy_vs_macs.png", "curves.png"):
        assert f"wrote {out / name}" in printed
        if name.endswith(".png"):
            data = (out / name).read_bytes()
            assert data[:8] == PNG and len(data) > 10_000, name
    assert not (out / "anytime.png").exists()
    md = (out / "report.md").read_text()
    table = rows(md)
    assert table["sub-model"] == ["params", "MMACs", "none", "ipkd-ta-m"]
    single, seeds = stage(runs["none"]), [stage(runs["seed-0"]), stage(runs["seed-1"])]
    assert list(table) == ["sub-model", "exit1", "exit2", "exit3", "mean"]
    for i, label in enumerate(["exit1", "exit2", "exit3"]):
        params, mmacs, a, b = table[label]
        assert params == f"{single['params'][i]:,}" and mmacs == f"{single['macs'][i] / 1e6:.3g}"
        values = [s["test_accuracy"][i] for s in seeds]
        expected_b = f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"
        expected_a = f"{single['test_accuracy'][i]:.2f}"
        best_is_a = round(single["test_accuracy"][i], 2) >= round(statistics.mean(values), 2)
        best_is_b = round(single["test_accuracy"][i], 2) <= round(statistics.mean(values), 2)
        assert a == (f"**{expected_a}**" if best_is_a else expected_a), (label, a)
        assert b == (f"**{expected_b}**" if best_is_b else expected_b), (label, b)
    means = [statistics.mean(s["test_accuracy"]) for s in seeds]
    assert f"{statistics.mean(means):.2f} ± {statistics.stdev(means):.2f}" in table["mean"][3]
    assert f"{single['mean_test_accuracy']:.2f}" in table["mean"][2]
    assert sum("**" in cell for cells in list(table.values())[1:] for cell in cells) >= 4   # a best per row
    assert f"`{runs['repeat']}`: repeat of 2 runs, seeds 0, 1" in md and f"`{runs['none']}`: one run, seed 0" in md
    assert "No anytime curve" in md


def test_the_learning_curves_are_the_mean_over_seeds(runs: dict[str, Path]) -> None:
    none, repeat = load_columns([runs["none"], runs["repeat"]])
    curves = learning_curves(repeat)
    assert curves is not None
    key, epochs, acc, loss = curves
    assert key == "val_accuracy" and epochs.tolist() == [1, 2]
    for s in (0, 1):
        lines = [json.loads(line) for line in (runs[f"seed-{s}"] / "metrics.jsonl").read_text().splitlines()]
        assert acc[s].tolist() == [m["val_accuracy"] for m in lines]
        assert loss[s].tolist() == [m["train_loss"] for m in lines]
    assert acc.shape == (2, 2, 3)
    assert none.label == "none" and repeat.label == "ipkd-ta-m"
    assert repeat.test_accuracy().mean(axis=0) == pytest.approx(
        np.mean([stage(runs["seed-0"])["test_accuracy"], stage(runs["seed-1"])["test_accuracy"]], axis=0))


def test_anytime_curves_are_plotted_one_line_per_method(runs: dict[str, Path], tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["eval", str(runs["repeat"]), "--anytime"]) == 0     # each seed run of the repeat
    assert main(["eval", str(runs["none"]), "--anytime"]) == 0
    printed = capsys.readouterr().out
    for run in (runs["repeat"] / "seed-0", runs["repeat"] / "seed-1", runs["none"]):
        assert f"wrote {run / 'anytime-student.json'}" in printed
    out = tmp_path / "report"
    assert main(["report", str(runs["none"]), str(runs["repeat"]), "--out", str(out)]) == 0
    data = (out / "anytime.png").read_bytes()
    assert data[:8] == PNG and len(data) > 10_000
    md = (out / "report.md").read_text()
    assert "[anytime.png](anytime.png)" in md and "No anytime curve" not in md
    table = rows(md.split("Anytime (")[1])
    assert table["exit"] == ["MMACs", "none: exit alone / anytime", "ipkd-ta-m: exit alone / anytime"]
    exit1 = json.loads((runs["none"] / "anytime-student.json").read_text())["exits"][0]["test_accuracy"]
    assert table["exit1"][1] == f"{exit1:.2f} / {exit1:.2f}"   # the curve starts at exit 1 alone


def test_one_directory_without_out_reports_into_it(runs: dict[str, Path], tmp_path: Path) -> None:
    run = tmp_path / "run"
    shutil.copytree(runs["slim"], run)
    assert main(["report", str(run)]) == 0
    assert {"report.md", "accuracy.png", "accuracy_vs_macs.png", "curves.png"} <= {p.name for p in run.iterdir()}
    assert rows((run / "report.md").read_text())["x0.25"][2] == f"{stage(run)['test_accuracy'][0]:.2f}"  # no bold alone


def test_columns_that_would_share_a_name_are_told_apart(runs: dict[str, Path]) -> None:
    a, b = load_columns([runs["seed-0"], runs["seed-1"]])          # same recipe, same method
    assert (a.label, b.label) == ("tam-0", "tam-1")
    a, b = load_columns([runs["none"], runs["seed-0"]])
    assert (a.label, b.label) == ("none", "ipkd-ta-m")


@pytest.mark.parametrize("case", ["other backbone", "other data", "bad repeat", "no stage", "twice", "no --out",
                                  "not a run"])
def test_runs_that_cannot_be_compared_are_refused(case: str, runs: dict[str, Path], tmp_path: Path,
                                                  capsys: pytest.CaptureFixture[str]) -> None:
    none = str(runs["none"])
    out = tmp_path / "report"
    args = {"other backbone": [none, str(runs["slim"])], "other data": [none, str(runs["other-data"])],
            "no stage": [none, "--stage", "teacher"], "twice": [none, str(runs["none"].parent / ".." / runs["none"].parent.name / "none")],
            "not a run": [str(tmp_path)]}.get(case, [])
    if case == "bad repeat":
        repeat = tmp_path / "repeat"
        shutil.copytree(runs["repeat"], repeat)
        shutil.rmtree(repeat / "seed-1")
        shutil.copytree(runs["slim"], repeat / "seed-1")
        args = [str(repeat)]
    if case == "no --out":
        assert main(["report", none, str(runs["repeat"])]) == 2
    else:
        assert main(["report", *args, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    expected = {
        "other backbone": f"error: {none} and {runs['slim']} cannot be compared: sub-models exit1, exit2, "
                          "exit3 vs x0.25, x0.5, x0.75, x1.0",
        "other data": f"error: {none} and {runs['other-data']} cannot be compared: other data: "
                      "data.options.test_size = 256 vs 128",
        "bad repeat": f"error: {tmp_path / 'repeat' / 'seed-0'} and {tmp_path / 'repeat' / 'seed-1'} cannot be "
                      "compared: sub-models exit1, exit2, exit3 vs x0.25",
        "no stage": f"error: {none} has no finished stage 'teacher'; its stages: student",
        "twice": f"/../{runs['none'].parent.name}/none is given twice (as {none})",
        "no --out": "error: several run directories need --out DIR",
        "not a run": f"error: {tmp_path} is not a kdreg run directory",
    }[case]
    assert expected in err, err
    assert "Traceback" not in err
    if case == "other data":
        assert len(err.splitlines()) == 1        # the same architecture: only the data differs
    assert not out.exists()


def test_the_stage_compared_is_the_last_or_the_one_named(tmp_path: Path) -> None:
    recipe = tmp_path / "two.toml"
    recipe.write_text("""
name = "two"
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = { train_size = 320, test_size = 64, num_classes = 10, image_size = 8 }
[train]
epochs = 1
[[stages]]
name = "teacher"
backbone = { name = "tiny_exits", exits = 2 }
graph = { name = "none" }
[[stages]]
name = "student"
backbone = { name = "tiny_exits" }
graph = { name = "kd", teacher = "teacher" }
""")
    run = tmp_path / "run"
    assert main(["run", str(recipe), "--out", str(run), "--no-progress"]) == 0
    stages = json.loads((run / "results.json").read_text())["stages"]
    assert main(["report", str(run), "--out", str(tmp_path / "last")]) == 0
    last = (tmp_path / "last" / "report.md").read_text()
    assert "stage `student` (graph `kd`)" in last and list(rows(last))[1:] == ["exit1", "exit2", "exit3", "mean"]
    assert main(["report", str(run), "--out", str(tmp_path / "teacher"), "--stage", "teacher"]) == 0
    teacher = (tmp_path / "teacher" / "report.md").read_text()
    assert "stage `teacher` (graph `none`)" in teacher
    assert rows(teacher)["exit2"][2] == f"{stages[0]['test_accuracy'][1]:.2f}"
