"""Sweeps (kdreg sweep): the grid's points as run directories, a shared teacher trained once and
copied bit for bit, resuming only what did not finish, the report, and refused grids."""

from __future__ import annotations

import json
import os
import signal
import statistics
from pathlib import Path
from typing import Any

import pytest
import torch

from kdreg import plugins
from kdreg.cli import main
from kdreg.errors import EXIT_RESUME
from kdreg.hookspecs import hookimpl
from kdreg.recipe import dump_recipe, load_recipe
from kdreg.sweep import labels, safe_name, split_values, stage_keys

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
name = "sw"
seed = 0
[data]
dataset = "synthetic"
batch_size = 32
val_split = 32
options = { train_size = 96, test_size = 32, num_classes = 4, image_size = 8 }
[train]
epochs = 1
optimizer = { lr = 0.05 }
[[stages]]
name = "teacher"
backbone = { name = "tiny_slimmable", widths = [1.0] }
epochs = 1
[[stages]]
name = "student"
backbone = { name = "tiny_slimmable", widths = [0.5, 1.0] }
graph = { name = "kd", teacher = "teacher" }
lam = 0.8
tau = 2.0
"""


@pytest.fixture
def recipe(tmp_path: Path) -> Path:
    path = tmp_path / "sw.toml"
    path.write_text(RECIPE)
    return path


class Epochs:
    """Records every epoch trained, as (run directory, stage, epoch); raises KeyboardInterrupt
    (Ctrl-C) after epoch ``stop_epoch`` of ``stop_stage`` in the run directory ending in ``stop_run``."""

    def __init__(self, stop_run: str | None = None, stop_stage: str = "student", stop_epoch: int = 1) -> None:
        self.seen: list[tuple[str, str, int]] = []
        self.stop = (stop_run, stop_stage, stop_epoch)

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        where = "/".join(Path(run.directory).parts[-2:])
        self.seen.append((where, stage, record["epoch"]))
        if self.stop == (where, stage, record["epoch"]):
            raise KeyboardInterrupt

    def of(self, stage: str) -> list[tuple[str, str, int]]:
        return [s for s in self.seen if s[1] == stage]


def _main_with(plugin: Epochs, argv: list[str]) -> int:
    plugins.reset(plugins.make_plugin_manager(extra=[plugin]))
    try:
        return main(argv)
    finally:
        plugins.reset()


def _json(path: Path) -> Any:
    return json.loads(path.read_text())


def _weights(run: Path, stage: str) -> dict[str, torch.Tensor]:
    return torch.load(run / "checkpoints" / stage / "best.pt", weights_only=False)["model"]  # type: ignore[no-any-return]


def _same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _stages(run: Path) -> list[dict[str, Any]]:
    """A run's results.json stages without their wall-clock seconds."""
    return [{k: v for k, v in s.items() if k != "seconds"} for s in _json(run / "results.json")["stages"]]


def _snapshot(directory: Path) -> dict[str, tuple[bytes, int]]:
    return {str(p.relative_to(directory)): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in sorted(directory.rglob("*")) if p.is_file()}


GRID = ["--grid", "stages.student.lam=0.1,0.5", "--grid", "stages.student.tau=1,4"]
POINTS = ["lam=0.1,tau=1", "lam=0.1,tau=4", "lam=0.5,tau=1", "lam=0.5,tau=4"]


# ----------------------------------------------------------------------------- a sweep
def test_a_sweep_trains_the_teacher_once_and_equals_separate_runs(recipe: Path, tmp_path: Path,  # noqa: PLR0915
                                                                  capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    seen = Epochs()
    assert _main_with(seen, ["sweep", str(recipe), *GRID, "--out", str(out), "--no-progress"]) == 0
    # the teacher trained once, in the first point; every point trained its student
    assert seen.of("teacher") == [("lam=0.1,tau=1/seed-0", "teacher", 1)]
    assert [s[0] for s in seen.of("student")] == [f"{p}/seed-0" for p in POINTS]
    assert sorted(p.name for p in out.iterdir()) == sorted([*POINTS, "sweep.json", "sweep.md", "sweep.png"])
    runs = [out / p / "seed-0" for p in POINTS]
    for run, point in zip(runs, POINTS):
        assert _json(run / "results.json")["finished"] is True
        assert (run / "checkpoints" / "teacher" / "best.pt").is_file()
        lam, tau = (float(v.split("=")[1]) for v in point.split(","))
        held = load_recipe(run / "recipe.toml")
        assert (held.stage("student").lam, held.stage("student").tau, held.seeds) == (lam, tau, ())
    teacher = _weights(runs[0], "teacher")
    assert all(_same_weights(_weights(run, "teacher"), teacher) for run in runs[1:])
    summary = _json(out / "sweep.json")
    assert summary["finished"] is True and summary["stage"] == "student" and summary["seeds"] == [0]
    assert [a["key"] for a in summary["axes"]] == ["stages.student.lam", "stages.student.tau"]
    assert [a["values"] for a in summary["axes"]] == [[0.1, 0.5], [1, 4]]
    assert [p["name"] for p in summary["points"]] == POINTS
    assert summary["shared"] == [{"stage": "teacher", "run": f"{p}/seed-0", "from": "lam=0.1,tau=1/seed-0"}
                                 for p in POINTS[1:]]
    # each point equals a separate `kdreg run` of it, bit for bit (the first point trained the
    # teacher; the last one was given a copy)
    for k in (0, 3):
        lam, tau = (v.split("=")[1] for v in POINTS[k].split(","))
        alone = tmp_path / f"alone-{k}"
        assert main(["run", str(recipe), "--set", f"stages.student.lam={lam}", "--set", f"stages.student.tau={tau}",
                     "--out", str(alone), "--no-progress"]) == 0
        assert _stages(alone) == _stages(runs[k])
        assert (alone / "recipe.toml").read_text() == (runs[k] / "recipe.toml").read_text()
        for stage in ("teacher", "student"):
            assert _same_weights(_weights(alone, stage), _weights(runs[k], stage)), (k, stage)
    # the report: a row per point, mean ± std of every sub-model, and the plot
    md = (out / "sweep.md").read_text()
    student = _json(runs[3] / "results.json")["stages"][1]
    assert "| lam | tau | x0.5 | x1.0 | mean | runs |" in md
    assert (f"| 0.5 | 4 | {student['test_accuracy'][0]:.2f} ± 0.00 | {student['test_accuracy'][1]:.2f} ± 0.00 | "
            f"{student['mean_test_accuracy']:.2f} ± 0.00 | 1 |") in md
    assert "`teacher` into 3 run(s)" in md
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    printed = capsys.readouterr().out
    assert "lam  tau" in printed and f"wrote {out / 'sweep.md'}" in printed


def test_seeds_give_every_point_a_mean_and_std(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    seen = Epochs()
    argv = ["sweep", str(recipe), "--grid", "stages.student.lam=0.2,0.7", "--seeds", "0,1", "--out", str(out),
            "--no-progress"]
    assert _main_with(seen, argv) == 0
    # a teacher per seed (seeds differ), each trained once
    assert sorted(s[0] for s in seen.of("teacher")) == ["lam=0.2/seed-0", "lam=0.2/seed-1"]
    assert len(seen.of("student")) == 4
    summary = _json(out / "sweep.json")
    for point in summary["points"]:
        results = [_json(out / point["name"] / f"seed-{s}" / "results.json")["stages"][1] for s in (0, 1)]
        student = point["stages"][1]
        assert student["runs"] == 2 and student["seeds"] == [0, 1]
        for i in range(2):
            column = [r["test_accuracy"][i] for r in results]
            assert student["test_accuracy_mean"][i] == pytest.approx(statistics.fmean(column))
            assert student["test_accuracy_std"][i] == pytest.approx(statistics.stdev(column))
        assert _json(out / point["name"] / "seed-1" / "results.json")["seed"] == 1
    # a point is a repeat directory to `kdreg report`
    assert main(["report", str(out / "lam=0.2"), "--out", str(tmp_path / "report")]) == 0
    assert "± " in (tmp_path / "report" / "report.md").read_text()


def test_an_interrupted_sweep_resumes_and_skips_what_finished(recipe: Path, tmp_path: Path) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", str(recipe), "--grid", "stages.student.lam=0.1,0.5,0.9", "--set", "stages.student.epochs=2",
            "--out", str(out), "--no-progress"]
    stop = Epochs(stop_run="lam=0.5/seed-0", stop_epoch=1)
    assert _main_with(stop, argv) == 130                       # Ctrl-C in the second point's student
    assert [s[:2] for s in stop.seen] == [("lam=0.1/seed-0", "teacher"), ("lam=0.1/seed-0", "student"),
                                          ("lam=0.1/seed-0", "student"), ("lam=0.5/seed-0", "student")]
    partial = _json(out / "sweep.json")
    assert partial["finished"] is False and [p["finished"] for p in partial["points"]] == [True, False, False]
    assert not (out / "lam=0.9").exists()
    first = _snapshot(out / "lam=0.1")
    again = Epochs()
    assert _main_with(again, argv) == 0
    # the interrupted student continues from its checkpoint (the engine's resume); the finished
    # point is not touched; the last point gets the teacher the first one trained
    assert again.seen == [("lam=0.5/seed-0", "student", 2), ("lam=0.9/seed-0", "student", 1),
                          ("lam=0.9/seed-0", "student", 2)]
    assert _snapshot(out / "lam=0.1") == first
    summary = _json(out / "sweep.json")
    assert summary["finished"] is True
    assert [(s["run"], s["from"]) for s in summary["shared"]] == [("lam=0.5/seed-0", "lam=0.1/seed-0"),
                                                                 ("lam=0.9/seed-0", "lam=0.1/seed-0")]
    metrics = [json.loads(line) for line in (out / "lam=0.5" / "seed-0" / "metrics.jsonl").read_text().splitlines()]
    assert [(m["stage"], m["epoch"]) for m in metrics if "epoch" in m] == [("student", 1), ("student", 2)]
    # a finished sweep run again trains nothing and gives the same summary
    idle = Epochs()
    assert _main_with(idle, argv) == 0
    assert idle.seen == [] and _json(out / "sweep.json") == summary


class Signal(Epochs):
    """Sends this process SIGUSR1 (a checkpoint request) in the first run's last epoch."""

    @hookimpl
    def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
        self.seen.append(("/".join(Path(run.directory).parts[-2:]), stage, record["epoch"]))
        if len(self.seen) == 2:
            os.kill(os.getpid(), signal.SIGUSR1)


def test_a_signal_checkpoints_the_sweep_and_the_same_command_resumes_it(recipe: Path, tmp_path: Path,
                                                                        capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", str(recipe), "--grid", "stages.student.lam=0.1,0.5", "--out", str(out), "--no-progress"]
    stop = Signal()
    assert _main_with(stop, argv) == EXIT_RESUME        # the engine saved and stopped after the epoch
    assert "checkpointed (stage student: after epoch 1 of 1, on SIGUSR1)" in capsys.readouterr().err
    assert [p["finished"] for p in _json(out / "sweep.json")["points"]] == [False, False]
    assert not (out / "lam=0.5").exists()
    again = Epochs()
    assert _main_with(again, argv) == 0                 # the first run finishes from its checkpoint
    assert again.seen == [("lam=0.5/seed-0", "student", 1)]
    assert _json(out / "sweep.json")["finished"] is True


# ----------------------------------------------------------------------------- bad input
@pytest.mark.parametrize(("grid", "message"), [
    (["stages.student.lamb=0.1,0.5"], "stages.student.lamb: unknown key(s) lamb (recipe.stages.student) @ --grid"),
    (["stages.pupil.lam=0.1,0.5"], "stages.pupil.lam: no stage named 'pupil'; stages: teacher, student @ --grid"),
    (["train.epochz=1,2"], "train.epochz: unknown key(s) epochz (recipe.train) @ --grid"),
    (["stages.student.lam=0.1,high"], "stages.student.lam=high: expected a number, got str 'high' "
                                      "(recipe.stages.student.lam) @ --grid"),
    (["train.epochs=1,1.5"], "train.epochs=1.5: expected an integer, got float 1.5 (recipe.train.epochs) @ --grid"),
    (["stages.student.lam=0.1,2"], "stages.student.lam=2: lam must be in [0, 1], got 2 (recipe.stages.student.lam) "
                                   "@ --grid"),
    (["stages.student.lam="], "stages.student.lam: empty value in ''"),
    (["stages.student.lam=0.1,,0.5"], "stages.student.lam: empty value in '0.1,,0.5'"),
    (["stages.student.lam=0.1,0.10"], "stages.student.lam: value(s) 0.10 listed more than once @ --grid"),
    (["stages.student.lam=0.1", "stages.student.lam=0.5"], "stages.student.lam is given twice"),
    (["stages.student.lam"], "'stages.student.lam' is not KEY=V1,V2,... @ --grid"),
    (["seed=1,2"], "seed: seeds are not a grid axis; give them with --seeds 0,1,2 @ --grid"),
    ([], "a sweep needs at least one --grid"),
    (["stages.student.divergence=kl,nodiv"], "point lam"),   # a point the engine's static checks refuse
])
def test_bad_grids_are_one_line_each_and_write_nothing(recipe: Path, tmp_path: Path, grid: list[str], message: str,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    argv = ["sweep", str(recipe), *(f"--grid={g}" for g in grid), "--out", str(out)]
    if message == "point lam":   # the point names the other axis too
        argv += ["--grid=stages.student.lam=0.1"]
        message = "point divergence=nodiv,lam=0.1: "
    assert main(argv) == 2
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and message in lines[0], err
    assert lines[0].endswith("@ --grid"), err
    assert not out.exists()


def test_every_bad_axis_is_reported_and_other_runs_are_not_overwritten(recipe: Path, tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "sweep"
    assert main(["sweep", str(recipe), "--grid=stages.student.lamb=1", "--grid=train.epochs=x", "--out", str(out)]) == 2
    assert len(capsys.readouterr().err.strip().splitlines()) == 2 and not out.exists()
    # a folder that is not a sweep's, or a point directory holding another recipe's run: refused
    (out / "lam=0.1" / "seed-0").mkdir(parents=True)
    (out / "notes.txt").write_text("mine")
    assert main(["sweep", str(recipe), "--grid=stages.student.lam=0.1", "--out", str(out)]) == 2
    assert "holds no sweep.json" in capsys.readouterr().err
    (out / "notes.txt").unlink()
    (out / "sweep.json").write_text("{}")
    (out / "lam=0.1" / "seed-0" / "recipe.toml").write_text(dump_recipe(load_recipe(recipe)))
    assert main(["sweep", str(recipe), "--grid=stages.student.lam=0.1", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "holds a run of another recipe (stages.student.lam: 0.8 there, 0.1 here)" in err, err
    assert sorted(p.name for p in (out / "lam=0.1" / "seed-0").iterdir()) == ["recipe.toml"]


# ----------------------------------------------------------------------------- pieces
def test_values_labels_and_directory_names() -> None:
    assert split_values("0.1, 0.5,0.9") == ["0.1", "0.5", "0.9"]
    assert split_values('[1, 2],{ name = "dkd", alpha = 1.0 },"a,b"') == ["[1, 2]", '{ name = "dkd", alpha = 1.0 }',
                                                                         '"a,b"']
    assert labels(["stages.student.lam", "stages.student.tau"]) == ["lam", "tau"]
    assert labels(["stages.student.lam", "stages.teacher.lam", "train.epochs"]) == ["student.lam", "teacher.lam",
                                                                                   "epochs"]
    assert safe_name("lam=0.1") == "lam=0.1"
    odd = safe_name('divergence={ name = "dkd" }')
    assert odd.startswith("divergence=__name_=__dkd___-") and "/" not in odd and " " not in odd
    assert odd != safe_name('divergence={ name = "dkk" }')


def test_a_stage_key_changes_with_what_it_depends_on(recipe: Path) -> None:
    base = stage_keys(load_recipe(recipe))
    assert stage_keys(load_recipe(recipe, ["stages.student.lam=0.1"]))["teacher"] == base["teacher"]
    assert stage_keys(load_recipe(recipe, ["stages.student.lam=0.1"]))["student"] != base["student"]
    for other in ("stages.teacher.epochs=2", "seed=1", "data.batch_size=16", "train.optimizer.lr=0.1"):
        keys = stage_keys(load_recipe(recipe, [other]))
        assert keys["teacher"] != base["teacher"] and keys["student"] != base["student"], other
    # a stage that names no earlier stage does not depend on them: shared when only they change
    three = recipe.with_name("three.toml")
    three.write_text(RECIPE + '[[stages]]\nname = "alone"\nbackbone = { name = "tiny_slimmable" }\n')
    a, b = stage_keys(load_recipe(three)), stage_keys(load_recipe(three, ["stages.teacher.epochs=2"]))
    assert a["alone"] == b["alone"] and a["student"] != b["student"]
