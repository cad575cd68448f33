"""The command line, run as a user runs it: exit codes, messages, no tracebacks."""

from __future__ import annotations

import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kdreg import plugins
from kdreg.cli import main
from kdreg.hookspecs import hookimpl

ROOT = Path(__file__).resolve().parent.parent


def kdreg(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "kdreg.cli", *args], capture_output=True, text=True, cwd=cwd)


def test_validate_accepts_a_good_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["validate", str(ROOT / "recipes" / "quickstart.toml")]) == 0
    out = capsys.readouterr().out
    assert "stage student: slimmable_resnet8 (4 sub-models: x0.25, x0.5, x0.75, x1.0), graph ipkd-ta-m" in out
    assert out.rstrip().endswith(": ok")


BAD = {
    "unknown key": ("[data]\nbatchsize = 3\n", "unknown key(s) batchsize @ recipe.data"),
    "wrong type": ("[data]\nbatch_size = 'big'\n", "expected an integer, got str 'big' @ recipe.data.batch_size"),
    "unknown plugin": ("", "unknown graph 'ipkd-tm'"),
    "lam out of range": ("", "lam must be in [0, 1], got 1.2 @ recipe.stages.student.lam"),
    "subset teacher smaller": ("", "teacher 0 is smaller than its student 1 @ recipe.stages.student.graph.teachers"),
    "broken toml": ("[data\n", "broken TOML"),
}
STAGE = """
[[stages]]
name = "student"
backbone = {{ name = "tiny_slimmable", widths = [0.25, 0.5, 1.0] }}
graph = {graph}
lam = {lam}
"""


@pytest.mark.parametrize("case", list(BAD))
def test_validate_rejects_a_bad_recipe_with_exit_2(case: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    head, expected = BAD[case]
    graph = {"unknown plugin": '{ name = "ipkd-tm" }',
             "subset teacher smaller": '{ name = "subset", teachers = { "1" = [0] } }'}.get(case, '"ipkd"')
    lam = "1.2" if case == "lam out of range" else "0.5"
    path = tmp_path / "bad.toml"
    path.write_text(head + STAGE.format(graph=graph, lam=lam))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert expected in err, err
    assert all(line.startswith(f"error: {path}: ") for line in err.splitlines()), err
    assert "Traceback" not in err
    if case == "unknown plugin":
        assert "registered: cohort, deit, ipkd, ipkd-ta-1, ipkd-ta-m, kd, none, subset" in err


def test_run_of_a_bad_recipe_exits_2_without_traceback_and_writes_nothing(tmp_path: Path) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(STAGE.format(graph='"ipkd"', lam="7"))
    proc = kdreg("run", str(path), "--out", str(tmp_path / "out"))
    assert proc.returncode == 2
    assert "lam must be in [0, 1], got 7 @ recipe.stages.student.lam" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()


def test_run_end_to_end_and_refuse_to_overwrite(smoke_recipe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "out"
    assert main(["run", str(smoke_recipe(epochs=1)), "--out", str(out), "--set", "train.epochs=2",
                 "--no-progress"]) == 0
    stdout = capsys.readouterr().out
    assert "sub-model  params  MMACs  val acc  test acc" in stdout
    assert "student epoch 2/2" in stdout
    results = json.loads((out / "results.json").read_text())
    assert results["stages"][0]["epochs"] == 2
    assert main(["run", str(smoke_recipe(epochs=1)), "--out", str(out)]) == 2   # another recipe there
    err = capsys.readouterr().err
    assert "holds a run of another recipe (train.epochs: 2 there, 1 here)" in err and "--resume" in err
    assert main(["run", str(smoke_recipe(epochs=1)), "--out", str(out), "--set", "train.epochs=2"]) == 2
    assert "holds a finished run of this recipe" in capsys.readouterr().err
    assert json.loads((out / "results.json").read_text()) == results
    assert main(["run", "--resume", str(out), "--no-progress"]) == 0   # nothing left to do
    assert json.loads((out / "results.json").read_text())["stages"] == results["stages"]


def test_command_line_errors_exit_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run"]) == 2
    assert "kdreg run needs a RECIPE (or --resume DIR)" in capsys.readouterr().err
    with pytest.raises(SystemExit) as stop:     # argparse's own usage error
        main(["frobnicate"])
    assert stop.value.code == 2
    assert main(["run", "--resume", str(tmp_path)]) == 2
    assert "is not a kdreg run directory" in capsys.readouterr().err
    assert main(["run", str(tmp_path / "missing.toml")]) == 2
    assert "cannot read the recipe" in capsys.readouterr().err
    assert main(["run", str(ROOT / "recipes" / "quickstart.toml"), "--set", "train.epochs"]) == 2
    assert "is not KEY=VALUE" in capsys.readouterr().err


def test_a_failing_run_exits_1_with_a_message(smoke_recipe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                              capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["run", str(smoke_recipe(epochs=1)), "--out", str(tmp_path / "nan"), "--no-progress",
                 "--set", "train.optimizer.lr=1e30"]) == 1
    err = capsys.readouterr().err
    assert "the loss became nan" in err.lower() or "the loss became inf" in err.lower()
    assert "Traceback" not in err


def test_list_and_plugins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["list", "graphs"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("graphs:") and "ipkd-ta-m" in out and "(ipkd-ta eq. 7)" in out
    assert main(["list", "backbones", "--details", "slimmable_mobilenet_v1", "resnet8"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == "backbones:" and out[1].split()[0] == "slimmable_mobilenet_v1"
    assert "        x1.0: 3,223,178 params, 46.4 M MACs" in out
    assert [line.split()[0] for line in out if not line.startswith("        ")] == [
        "backbones:", "slimmable_mobilenet_v1", "resnet8"]                     # those named alone
    assert main(["list", "backbones", "--details", "resnet9"]) == 2
    assert "unknown backbone 'resnet9' (did you mean" in capsys.readouterr().err
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "graphs  (kdreg 0.1.0)" in out and "graphs: cohort, deit, ipkd, ipkd-ta-1, ipkd-ta-m, kd, none, subset" in out and "bridges: stc" in out
    assert "events: kdreg_epoch_finished" in out


def test_capacity_ratio_of_a_teacher_student_pair(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["capacity", "resnet110", "resnet8"]) == 0
    out = capsys.readouterr().out
    assert "teacher resnet110: 1,730,714 params" in out and "student resnet8: 78,042 params" in out
    assert f"{1730714 / 78042:.2f}x params" in out
    assert main(["capacity", "resnet110", "resnet9"]) == 2
    assert "unknown backbone 'resnet9' (did you mean" in capsys.readouterr().err


def test_report_plots_a_run(smoke_recipe, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    out = tmp_path / "run"
    assert main(["run", str(smoke_recipe(epochs=2)), "--out", str(out), "--no-progress"]) == 0
    assert main(["report", str(out)]) == 0
    assert "| x0.25 |" in (out / "report.md").read_text()
    for name in ("accuracy.png", "accuracy_vs_macs.png", "curves.png"):
        png = out / name
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000
    assert main(["report", str(tmp_path)]) == 2
    assert "is not a kdreg run directory" in capsys.readouterr().err


def test_a_missing_data_folder_exits_2_and_leaves_no_run_directory(tmp_path: Path,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "r.toml"
    path.write_text(f'[data]\ndataset = "imagefolder"\nroot = "{tmp_path}/nowhere"\n'
                    + STAGE.format(graph='"ipkd"', lam="0.5"))
    assert main(["run", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "nowhere" in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_eval_reproduces_the_reported_test_accuracy(smoke_recipe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "run"
    assert main(["run", str(smoke_recipe(epochs=1)), "--out", str(out), "--no-progress"]) == 0
    capsys.readouterr()
    stage = json.loads((out / "results.json").read_text())["stages"][0]
    assert main(["eval", str(out)]) == 0
    line = capsys.readouterr().out.strip()
    expected = ", ".join(f"{label} {a:.2f}" for label, a in zip(stage["submodels"], stage["test_accuracy"]))
    assert line == f"stage student (64 test images): {expected} (mean {stage['mean_test_accuracy']:.2f})"
    assert main(["eval", str(out), "--set", "data.test_limit=32"]) == 0
    assert "(32 test images)" in capsys.readouterr().out


def test_no_progress_bar_redraws_when_stderr_is_not_a_terminal(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    # bytes: text mode would read every "\r" as a newline
    proc = subprocess.run([sys.executable, "-m", "kdreg.cli", "run", str(smoke_recipe(epochs=2)),
                           "--out", str(tmp_path / "out")], capture_output=True)   # no --no-progress
    assert proc.returncode == 0, proc.stderr
    assert b"\r" not in proc.stderr and b"\r" not in proc.stdout, proc.stderr[:300]
    assert b"batch/s" not in proc.stderr and b"batch]" not in proc.stderr, proc.stderr[:300]
    epochs = [line for line in proc.stdout.decode().splitlines() if line.startswith("student epoch ")]
    assert [line.split()[2] for line in epochs] == ["1/2", "2/2"]   # a line per epoch is the progress


def test_a_terminal_gets_the_progress_bar(smoke_recipe, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The other side of the test above: on a terminal (a pseudo-terminal here) the bar is drawn."""
    pty = pytest.importorskip("pty")
    import fcntl
    import os
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 100, 0, 0))   # 24 x 100, not 0 x 0
    with open(tmp_path / "stdout", "w") as stdout:
        proc = subprocess.Popen([sys.executable, "-m", "kdreg.cli", "run", str(smoke_recipe(epochs=1)),
                                 "--out", str(tmp_path / "out")], stdout=stdout, stderr=slave)
    os.close(slave)
    drawn = b""
    while True:
        try:
            chunk = os.read(master, 4096)
        except OSError:   # the child closed the terminal
            break
        if not chunk:
            break
        drawn += chunk
    os.close(master)
    assert proc.wait() == 0, drawn.decode(errors="replace")
    assert b"\r" in drawn and b"student 1/1" in drawn


@pytest.mark.parametrize("command", ["run", "validate"])
def test_debug_after_the_command_shows_the_traceback(command: str, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    from kdreg.errors import RecipeError

    path = tmp_path / "bad.toml"
    path.write_text(STAGE.format(graph='"ipkd"', lam="7"))
    args = [command, str(path), *(["--out", str(tmp_path / "out")] if command == "run" else [])]
    assert main(args) == 2 and "Traceback" not in capsys.readouterr().err
    for debug in ([command, "--debug", *args[1:]], [*args, "--debug"], ["--debug", *args]):
        with pytest.raises(RecipeError, match=r"lam must be in \[0, 1\], got 7"):   # raised, not one line
            main(debug)
    if command == "run":     # what a user sees: Python's traceback, exit 1
        proc = kdreg(*args, "--debug")
        assert proc.returncode == 1, proc.stderr
        assert "Traceback (most recent call last)" in proc.stderr
        assert "RecipeError" in proc.stderr and "lam must be in [0, 1], got 7" in proc.stderr
    assert not (tmp_path / "out").exists()


class _LogFile(io.RawIOBase):
    """A file stdout may be redirected to (block-buffered on top): what has reached it."""

    def __init__(self) -> None:
        self.data = b""

    def writable(self) -> bool:
        return True

    def write(self, b) -> int:  # type: ignore[no-untyped-def,override]
        self.data += bytes(b)
        return len(b)


def test_each_epoch_line_reaches_a_log_file_when_the_epoch_ends(smoke_recipe, tmp_path: Path,  # type: ignore[no-untyped-def]
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    log = _LogFile()
    monkeypatch.setattr(sys, "stdout", io.TextIOWrapper(io.BufferedWriter(log, buffer_size=1 << 16)))
    seen: dict[int, bytes] = {}

    class Look:   # what the log file holds when an epoch ends (after the console's line of it)
        @hookimpl(trylast=True)
        def kdreg_epoch_finished(self, run, stage, record):  # type: ignore[no-untyped-def]
            seen[record["epoch"]] = log.data

    plugins.reset(plugins.make_plugin_manager(extra=[Look()]))
    try:
        assert main(["run", str(smoke_recipe(epochs=2)), "--out", str(tmp_path / "out")]) == 0
    finally:
        plugins.reset()
    assert b"student epoch 1/2" in seen[1] and b"student epoch 2/2" in seen[2]
