"""The example third-party distribution (examples/kdreg-example-plugin), built and installed with
pip and driven through the command line, which finds it by its entry point: in a fresh process,
and in this one (kdreg's plugin manager collected anew from the installed entry points).

pip installs it into the test environment (built from its pyproject.toml, with its dist-info
and entry points), exactly as a user would, and the fixture's teardown uninstalls it.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from kdreg import plugins
from kdreg.cli import main

EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "kdreg-example-plugin"
ENTRY_POINT, DIST, VERSION = "kdreg_example", "kdreg-example-plugin", "0.1.0"
BACKBONE, GRAPH, DIVERGENCE = "example_two_exit_mlp", "example-from-final", "example-js"
FEATURE_LOSS = "example-cosine"
RECIPE = EXAMPLE / "recipe.toml"  # synthetic 3x16x16 images, 4 classes, hidden = 32, 1 epoch
FEATURES = EXAMPLE / "recipe-features.toml"  # the same data, two built-in ResNets, 1 epoch


@pytest.fixture(scope="module")
def installed(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """The environment of a kdreg process that sees the pip-installed example distribution."""
    pytest.importorskip("setuptools", reason="pip --no-build-isolation builds with the installed setuptools")
    root = tmp_path_factory.mktemp("example-plugin")
    source = root / "source"
    # a copy, so that the build leaves no build/ or *.egg-info in the repository
    shutil.copytree(EXAMPLE, source, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__"))
    pip_env = {**os.environ, "PIP_DISABLE_PIP_VERSION_CHECK": "1", "PIP_NO_INPUT": "1",
               "PIP_ROOT_USER_ACTION": "ignore"}
    pip = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
         str(source)],
        capture_output=True, text=True, env=pip_env, timeout=300,
    )
    assert pip.returncode == 0, pip.stdout + pip.stderr
    importlib.invalidate_caches()      # this process sees the new dist-info and module too
    env = {k: v for k, v in os.environ.items() if k != "KDREG_DISABLE_PLUGINS"}
    try:
        yield env
    finally:
        subprocess.run([sys.executable, "-m", "pip", "uninstall", "-y", DIST],
                       capture_output=True, text=True, env=pip_env, timeout=300)
        importlib.invalidate_caches()
        plugins.reset()


def kdreg_cli(env: dict[str, str], *args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``kdreg ARGS`` in a fresh process with environment ``env``."""
    return subprocess.run([sys.executable, "-m", "kdreg.cli", *args], capture_output=True, text=True,
                          env=env, cwd=cwd, timeout=300)


@pytest.fixture
def kdreg(installed: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]):  # type: ignore[no-untyped-def]
    """``kdreg(*args, disable=None)``: the command line in this process, its plugins collected
    from the installed entry points (less those named in ``disable``, as KDREG_DISABLE_PLUGINS
    names them); returns ``(exit code, stdout, stderr)``."""

    def call(*args: str, disable: str | None = None) -> tuple[int, str, str]:
        if disable is None:
            monkeypatch.delenv("KDREG_DISABLE_PLUGINS", raising=False)
        else:
            monkeypatch.setenv("KDREG_DISABLE_PLUGINS", disable)
        capsys.readouterr()
        plugins.reset()
        try:
            code = main(list(args))
        finally:
            plugins.reset()
        out, err = capsys.readouterr()
        return code, out, err

    return call


def test_kdreg_plugins_lists_it_with_its_distribution(installed: dict[str, str], tmp_path: Path) -> None:
    proc = kdreg_cli(installed, "plugins", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    at = lines.index(f"{ENTRY_POINT}  ({DIST} {VERSION})")
    assert lines[at + 1:at + 5] == [f"    backbones: {BACKBONE}", f"    divergences: {DIVERGENCE}",
                                    f"    feature_losses: {FEATURE_LOSS}", f"    graphs: {GRAPH}"]
    assert "graphs  (kdreg " in proc.stdout  # the built-in plugins are there too


def test_its_backbone_graph_and_divergence_validate_and_train(kdreg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, out_, err = kdreg("list", "divergences")
    assert code == 0, err
    assert f"    {DIVERGENCE}  tau^2 Jensen-Shannon divergence between teacher and student" in out_
    code, out_, err = kdreg("validate", str(RECIPE))
    assert code == 0, err
    assert (f"stage student: {BACKBONE} (2 sub-models: early, final), graph {GRAPH}, divergence "
            f"{DIVERGENCE}, 1 epochs" in out_)
    out = tmp_path / "run"
    code, _, err = kdreg("run", str(RECIPE), "--out", str(out), "--no-progress")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    assert results["finished"] is True
    assert f'[stages.divergence]\nname = "{DIVERGENCE}"\n' in (out / "recipe.toml").read_text()
    # the same run distilling with kl instead (same data, same initial weights) trains otherwise
    code, _, err = kdreg("run", str(RECIPE), "--out", str(tmp_path / "kl"), "--no-progress",
                         "--set", "stages.student.divergence=kl")
    assert code == 0, err
    js, kl = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
              for d in (out, tmp_path / "kl"))
    assert len(js) == len(kl) == 1 and 0 < js[0]["train_loss"] != kl[0]["train_loss"]
    assert results["plugins"][DIST] == VERSION and results["plugins"]["kdreg"]
    (stage,) = results["stages"]
    assert stage["name"] == "student" and stage["submodels"] == ["early", "final"]
    # counted by kdreg's defaults: what each exit's logits depend on (3x16x16 inputs, hidden 32)
    stem, early, body, final = 768 * 32 + 32, 32 * 4 + 4, 32 * 32 + 32, 32 * 4 + 4
    assert stage["params"] == [stem + early, stem + body + final]
    assert stage["macs"] == [768 * 32 + 32 * 4, 768 * 32 + 32 * 32 + 32 * 4]
    assert len(stage["test_accuracy"]) == 2 and all(0 <= a <= 100 for a in stage["test_accuracy"])


def test_its_feature_loss_trains_its_connector_with_the_student(kdreg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    """The plugin's feature loss and divergence, from the installed distribution, between two
    built-in ResNets: the connector it owns trains with the student and is saved with it."""
    import torch

    code, listed, err = kdreg("list", "feature_losses")
    assert code == 0, err
    assert f"    {FEATURE_LOSS}  1 - cosine similarity of globally pooled features" in listed
    out = tmp_path / "run"
    code, _, err = kdreg("run", str(FEATURES), "--out", str(out), "--no-progress")
    assert code == 0, err
    results = json.loads((out / "results.json").read_text())
    student = results["stages"][1]
    assert student["feature_losses"] == [FEATURE_LOSS] and results["plugins"][DIST] == VERSION
    last = torch.load(out / "checkpoints" / "student" / "last.pt", weights_only=True)
    (state,) = last["feature_losses"]
    assert state["connector.weight"].shape == (64, 64)       # resnet8's and resnet14's layer3
    assert not any(k.startswith("connector") for k in last["model"])   # not the model's
    # without the feature loss (same data, same initial weights) the student trains otherwise
    code, _, err = kdreg("run", str(FEATURES), "--out", str(tmp_path / "plain"), "--no-progress",
                         "--set", "stages.student.feature_losses=[]")
    assert code == 0, err
    with_f, without = ([json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
                       for d in (out, tmp_path / "plain"))
    assert with_f[0]["train_loss"] == without[0]["train_loss"]      # the teacher's epoch
    assert with_f[1]["train_loss"] != without[1]["train_loss"]


def test_disabling_it_hides_it_and_fails_a_recipe_that_uses_it(kdreg, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    code, listed, err = kdreg("list")
    assert code == 0 and BACKBONE in listed and GRAPH in listed and DIVERGENCE in listed, err
    code, listed, err = kdreg("list", disable=ENTRY_POINT)
    assert code == 0, err
    assert "tiny_exits" in listed and "ipkd-ta-m" in listed
    assert BACKBONE not in listed and GRAPH not in listed and DIVERGENCE not in listed
    assert "dkd" in listed
    out = tmp_path / "run"
    code, _, err = kdreg("run", str(RECIPE), "--out", str(out), disable=ENTRY_POINT)
    assert code == 2, err
    assert f"unknown backbone {BACKBONE!r}" in err and "Traceback" not in err
    assert not out.exists()
    # its distribution's name disables it too
    code, listed, err = kdreg("plugins", disable=DIST)
    assert code == 0, err
    assert ENTRY_POINT not in listed and f"disabled by KDREG_DISABLE_PLUGINS: {DIST}" in listed
