"""A run directory evaluates and exports from its own checkpoints alone: offline, with the
Hugging Face cache emptied, and without the files its stages were initialised from."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from test_timm_pretrained import RECIPE, TAGGED, caches, hub  # noqa: F401 (fixtures)

from kdreg.cli import main
from kdreg.engine.run import Run


def test_eval_and_export_need_neither_the_hub_cache_nor_the_init_file(
        hub: dict[str, torch.Tensor], tmp_path: Path,  # noqa: F811
        capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(teacher=f'{{ name = "timm", model = "{TAGGED}" }}', epochs=0))
    out = tmp_path / "out"
    Run.start(recipe, out, progress=False).execute()
    results = json.loads((out / "results.json").read_text())
    student = tmp_path / "student.pt"          # a third stage initialised from a file, then gone
    shutil.copy(out / "checkpoints" / "student" / "best.pt", student)
    shutil.rmtree(tmp_path / "hf" / "hub")     # the pretrained teacher's weights: only in best.pt
    capsys.readouterr()

    assert main(["eval", str(out)]) == 0
    printed = capsys.readouterr()
    for stage in results["stages"]:
        accs = ", ".join(f"{label} {a:.2f}" for label, a in zip(stage["submodels"], stage["test_accuracy"]))
        assert f"stage {stage['name']} " in printed.out and accs in printed.out, printed.out
    assert "classifier" not in printed.err    # no adaptation notes: the weights come from best.pt
    assert main(["export", str(out), "--stage", "teacher", "--out", str(tmp_path / "t.pt2")]) == 0
    assert (tmp_path / "t.pt2").is_file()

    text = (out / "recipe.toml").read_text()
    (out / "recipe.toml").write_text(text + f'\n[[stages]]\nname = "again"\nbackbone = "resnet8"\n'
                                            f'init = "{student}"\nepochs = 0\n')
    again = out / "checkpoints" / "again"
    again.mkdir()
    shutil.copy(student, again / "best.pt")
    student.unlink()
    assert main(["eval", str(out)]) == 0
    assert "stage again " in capsys.readouterr().out
