"""The ImageNet-style recipes (recipes/imagenet/) run as shipped, tiny: generated photos of mixed
sizes instead of ImageNet, 32-pixel crops, one epoch, and an offline Hugging Face cache filled
here with random weights under the recipes' own timm tags (no download)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import timm
import torch
from test_streaming import photo_folder
from test_timm_pretrained import hub_layout, offline_cache

from kdreg.cli import main

ROOT = Path(__file__).resolve().parent.parent
TINY = ["--set", "data.image_size=32", "--set", "data.batch_size=6", "--set", "data.eval_batch_size=8",
        "--set", "data.workers=1", "--set", "train.epochs=1", "--set", "train.device=cpu",
        "--no-progress"]


def fill_cache(cache: Path, *tags: str) -> dict[str, dict[str, torch.Tensor]]:
    torch.manual_seed(7)
    states = {tag: timm.create_model(tag, pretrained=False).state_dict() for tag in tags}
    for tag, state in states.items():
        hub_layout(cache, tag, state)
    return states


def run(recipe: str, tmp_path: Path, *extra: str) -> dict:
    photos = photo_folder(tmp_path / "photos", train=4, test=2, sizes=(40, 90))
    out = tmp_path / "run"
    code = main(["run", str(ROOT / "recipes" / "imagenet" / recipe), "--out", str(out),
                 "--set", f"data.root={photos}", *TINY, *extra])
    assert code == 0
    return json.loads((out / "results.json").read_text())


def teacher_weights(tmp_path: Path, stage: str = "teacher") -> dict[str, torch.Tensor]:
    return torch.load(tmp_path / "run" / "checkpoints" / stage / "best.pt", weights_only=True)["model"]


def test_torchdistills_imagenet_kd_recipe_runs_tiny(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    states = fill_cache(offline_cache(monkeypatch, tmp_path / "hf"), "resnet34.tv_in1k")
    result = run("kd-resnet34-resnet18.toml", tmp_path)
    teacher, student = result["stages"]
    assert teacher["name"] == "teacher" and teacher["epochs"] == 0 and "resnet34.tv_in1k" in teacher["pretrained"]
    assert student["name"] == "student" and student["epochs"] == 1
    assert result["data"]["path"] == "streamed"
    loaded = teacher_weights(tmp_path)
    for key, value in states["resnet34.tv_in1k"].items():   # the cache's weights, classifier aside
        if not key.startswith("fc."):
            assert torch.equal(loaded[f"net.{key}"] if f"net.{key}" in loaded else loaded[key], value), key


def test_the_pretrained_teacher_folder_recipe_runs_tiny(tmp_path: Path,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    fill_cache(offline_cache(monkeypatch, tmp_path / "hf"), "resnet50.a1_in1k",
               "mobilenetv3_large_100.ra_in1k")
    result = run("folder-pretrained-teacher.toml", tmp_path, "--set", "stages.teacher.epochs=1")
    teacher, student = result["stages"]
    assert teacher["epochs"] == 1 and student["epochs"] == 1
    assert "resnet50.a1_in1k" in teacher["pretrained"]
    assert "mobilenetv3_large_100.ra_in1k" in student["pretrained"]
    assert result["data"]["augment"] == "imagenet"
