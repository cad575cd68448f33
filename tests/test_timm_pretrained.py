"""Pretrained timm weights: through timm's loader and a Hugging Face cache filled here, offline.

The cache is built in ``tmp_path`` from a randomly initialised timm test model, in the hub's own
layout (``models--timm--<name>/snapshots/<commit>/model.safetensors`` and ``refs/main``), so a
load that does not go through timm's loader and that cache cannot produce its weights. Every test
runs with ``HF_HUB_OFFLINE=1``: nothing reaches the network.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import huggingface_hub
import pytest
import timm
import torch
from safetensors.torch import save_file

from kdreg import normalise
from kdreg.cli import main
from kdreg.engine.run import Run
from kdreg.errors import OptionError
from kdreg_plugins.backbones.exits import build_exits
from kdreg_plugins.backbones.timm_adapter import build_timm

pytestmark = pytest.mark.usefixtures("one_thread")

MODEL = "test_resnet"          # timm's own test model: 0.5 M parameters, one pretrained tag
TAG = "r160_in1k"
TAGGED = f"{MODEL}.{TAG}"
EFFNET = "test_efficientnet.r160_in1k"  # ImageNet statistics, a different value per channel
COMMIT = "0123456789abcdef0123456789abcdef01234567"
SIZE = (32, 32)


def hub_layout(cache: Path, name: str, state: dict[str, torch.Tensor]) -> Path:
    """Write ``state`` where the hub keeps timm/<name>'s weights at revision main."""
    repo = cache / f"models--timm--{name}"
    snapshot = repo / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(snapshot / "model.safetensors"))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    return snapshot / "model.safetensors"


def offline_cache(monkeypatch: pytest.MonkeyPatch, home: Path) -> Path:
    """``home``'s hub cache as the one in use, offline. huggingface_hub reads HF_HUB_CACHE and
    HF_HUB_OFFLINE into ``huggingface_hub.constants`` when imported, so a process that has imported
    it already (this one) gets them set there too; a new process reads the environment."""
    cache = home / "hub"
    cache.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    return cache


@pytest.fixture
def caches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, torch.Tensor]]:
    """A filled offline cache holding random weights of ``test_resnet.r160_in1k`` and
    ``test_efficientnet.r160_in1k`` (1000 classes each); returns those weights by name."""
    cache = offline_cache(monkeypatch, tmp_path / "hf")
    torch.manual_seed(1234)
    states = {name: timm.create_model(name, pretrained=False).state_dict() for name in (TAGGED, EFFNET)}
    for name, state in states.items():
        hub_layout(cache, name, state)
    return states


@pytest.fixture
def hub(caches: dict[str, dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """The filled offline cache; returns the weights of ``test_resnet.r160_in1k``."""
    return caches[TAGGED]


def cfg(name: str = TAGGED) -> timm.models.PretrainedCfg:
    found = timm.models.get_pretrained_cfg(name)
    assert found is not None
    return found


def build(num_classes: int = 1000, in_chans: int = 3, **options):  # type: ignore[no-untyped-def]
    return build_timm(num_classes=num_classes, in_chans=in_chans, input_size=SIZE, **options)


def assert_loaded(model: torch.nn.Module, state: dict[str, torch.Tensor], skip: tuple[str, ...] = ()) -> None:
    own = model.state_dict()
    assert own.keys() == state.keys()
    for k, v in state.items():
        if not k.startswith(skip):
            assert torch.equal(own[k], v), k


# ----------------------------------------------------------------------------- loading
@pytest.mark.parametrize("name", [TAGGED, EFFNET])
def test_pretrained_true_loads_the_cached_weights_and_their_statistics(
        caches: dict[str, dict[str, torch.Tensor]], name: str) -> None:
    net = build(model=name.split(".")[0], pretrained=True)  # the default tag
    assert_loaded(net.net, caches[name])             # every weight, the 1000-class classifier too
    assert net.pretrained == f"timm {name}"
    assert net.input_mean == tuple(cfg(name).mean) and net.input_std == tuple(cfg(name).std)
    assert normalise.input_stats(net) == (tuple(cfg(name).mean), tuple(cfg(name).std))


def test_a_tagged_name_is_pretrained_and_another_class_count_reinitialises_the_classifier(
        hub: dict[str, torch.Tensor], capsys: pytest.CaptureFixture[str]) -> None:
    net = build(num_classes=5, model=TAGGED)
    assert_loaded(net.net, hub, skip=("fc.",))
    assert net.net.fc.weight.shape == (5, hub["fc.weight"].shape[1])
    assert not torch.equal(net.net.fc.weight, hub["fc.weight"][:5])  # a fresh classifier
    err = capsys.readouterr().err
    assert (f"warning: timm model {TAGGED!r}: the pretrained classifier (fc) predicts 1000 classes "
            "and the data has 5: it is re-initialised at random") in err
    assert err.count("\n") == 1
    same = build(model=TAGGED)                        # 1000 classes: nothing to say
    assert_loaded(same.net, hub)
    assert capsys.readouterr().err == ""


def test_other_input_channels_adapt_the_first_conv_and_the_statistics(
        caches: dict[str, dict[str, torch.Tensor]], capsys: pytest.CaptureFixture[str]) -> None:
    state, mean, std = caches[EFFNET], cfg(EFFNET).mean, cfg(EFFNET).std
    first = cfg(EFFNET).first_conv
    gray = build(model=EFFNET, in_chans=1)
    assert torch.allclose(gray.net.get_submodule(first).weight, state[f"{first}.weight"].sum(dim=1, keepdim=True))
    assert_loaded(gray.net, state, skip=(first,))
    assert gray.input_mean == pytest.approx((sum(mean) / 3,)) and gray.input_std == pytest.approx((sum(std) / 3,))
    assert "takes 3 input channels and the data has 1: timm adapts its weights" in capsys.readouterr().err
    five = build(model=EFFNET, in_chans=5)           # timm repeats the channels (and scales them)
    assert torch.allclose(five.net.get_submodule(first).weight[:, 3:],
                          state[f"{first}.weight"][:, :2] * 3 / 5)
    assert five.input_mean == (*mean, *mean[:2]) and five.input_std == (*std, *std[:2])


def test_random_timm_backbones_carry_no_statistics(hub: dict[str, torch.Tensor]) -> None:
    for net in (build(model=MODEL), build(model=TAGGED, pretrained=False)):
        assert net.pretrained is None and net.input_mean is None and net.input_std is None
        assert not torch.equal(net.net.conv1[0].weight, hub["conv1.0.weight"])


def test_pretrained_file_sets_the_statistics_and_reinitialises_the_classifier(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    source = build(model=MODEL).net.state_dict()     # 1000 classes, the default tag's statistics
    path = tmp_path / "weights.pth"
    torch.save(source, path)
    net = build(num_classes=7, model=MODEL, pretrained_file=str(path))
    assert_loaded(net.net, source, skip=("fc.",))
    assert net.net.fc.weight.shape[0] == 7
    assert net.pretrained == str(path)
    assert net.input_mean == tuple(cfg().mean) and net.input_std == tuple(cfg().std)
    err = capsys.readouterr().err
    assert (f"the classifier fc in {str(path)!r} predicts 1000 classes and the data has 7: it is "
            "re-initialised at random") in err
    gray = build(num_classes=1000, in_chans=1, model=MODEL, pretrained_file=str(path))
    assert torch.allclose(gray.net.conv1[0].weight, source["conv1.0.weight"].sum(dim=1, keepdim=True))
    assert gray.input_mean == (sum(cfg().mean) / 3,)
    assert "the first convolution conv1.0" in capsys.readouterr().err


def test_exits_carry_the_statistics_of_their_trunk(hub: dict[str, torch.Tensor]) -> None:
    exits = build_exits(num_classes=5, in_chans=3, input_size=SIZE,
                        trunk={"name": "timm", "model": TAGGED}, points=[0])
    assert exits.input_mean == tuple(cfg().mean) and exits.input_std == tuple(cfg().std)
    assert exits.pretrained is None                  # its heads are new
    assert_loaded(exits.trunk.net, hub, skip=("fc.",))
    plain = build_exits(num_classes=5, in_chans=3, input_size=SIZE, trunk={"name": "resnet8"})
    assert plain.input_mean is None and plain.input_std is None


# ----------------------------------------------------------------------------- errors
def test_unknown_tag_no_weights_and_both_sources_are_clear_errors(hub: dict[str, torch.Tensor]) -> None:
    with pytest.raises(OptionError, match=f"timm model '{MODEL}' has no pretrained tag 'bogus'; "
                                          f"its tags with weights: {TAG}") as err:
        build(model=f"{MODEL}.bogus")
    assert err.value.key == "model"
    with pytest.raises(OptionError, match="timm model 'resnet50_mlp' has no pretrained weights") as err:
        build(model="resnet50_mlp", pretrained=True)
    assert err.value.key == "pretrained"
    with pytest.raises(OptionError, match="'resnet50_mlp.untrained' has no pretrained weights") as err:
        build(model="resnet50_mlp.untrained")
    assert err.value.key == "model"
    with pytest.raises(OptionError, match="give one of them") as err:
        build(model=MODEL, pretrained=True, pretrained_file="w.pth")
    assert err.value.key == "pretrained"


def test_offline_with_an_empty_cache_is_a_clear_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cache = offline_cache(monkeypatch, tmp_path / "empty")
    with pytest.raises(OptionError) as err:
        build(model=TAGGED)
    assert err.value.key == "model"
    assert str(err.value) == (f"the pretrained weights of timm model {TAGGED!r} (Hugging Face hub "
                              f"timm/{TAGGED}) are not in the Hugging Face cache {cache} and "
                              "HF_HUB_OFFLINE is set: fetch them once with the network (the same "
                              "HF_HOME / HF_HUB_CACHE), or give pretrained_file")


def test_a_failed_load_names_the_model_and_validation_never_downloads(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Online with an empty cache: validation builds the model without its weights and never asks
    the hub; a run that cannot fetch them says so."""
    offline_cache(monkeypatch, tmp_path / "empty")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    asked = []

    def no_network(*args, **kwargs):  # type: ignore[no-untyped-def]
        asked.append(args)
        raise ConnectionError("no network here")

    monkeypatch.setattr(timm.models._hub, "hf_hub_download", no_network)
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(teacher=f'{{ name = "timm", model = "{TAGGED}" }}', epochs=0))
    assert main(["validate", str(recipe)]) == 0
    assert asked == []
    with pytest.raises(OptionError, match=f"cannot load the pretrained weights of timm model {TAGGED!r}: "
                                          "no network here") as err:
        build(model=TAGGED)
    assert err.value.key == "model" and asked


# ----------------------------------------------------------------------------- recipes
RECIPE = """
name = "pretrained"
[data]
dataset = "synthetic"
batch_size = 16
val_split = 16
options = {{ num_classes = 4, train_size = 48, test_size = 16, image_size = 32 }}
[train]
epochs = 1
optimizer = {{ lr = 0.05 }}
schedule = {{ name = "constant" }}
[[stages]]
name = "teacher"
backbone = {teacher}
epochs = {epochs}
[[stages]]
name = "student"
backbone = "resnet8"
graph = {{ name = "kd", teacher = "teacher" }}
lam = 0.5
"""


def test_a_pretrained_stage_with_zero_epochs_validates_and_teaches(
        hub: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(teacher=f'{{ name = "timm", model = "{TAGGED}" }}', epochs=0))
    assert main(["validate", str(recipe)]) == 0
    assert "stage teacher: timm (1 sub-models: full), graph none, 0 epochs" in capsys.readouterr().out

    run = Run.start(recipe, tmp_path / "out", progress=False)
    results = run.execute()
    teacher, student = results["stages"]
    assert (teacher["epochs"], teacher["best_epoch"], teacher["pretrained"]) == (0, 0, f"timm {TAGGED}")
    assert student["teachers"] == ["teacher"] and student["epochs"] == 1
    frozen = run.models["teacher"]
    assert_loaded(frozen.net, hub, skip=("fc.",))     # evaluated, not trained
    assert not any(p.requires_grad for p in frozen.parameters())
    assert normalise.input_stats(frozen) == (tuple(cfg().mean), tuple(cfg().std))
    assert normalise.input_stats(run.models["student"]) != normalise.input_stats(frozen)
    saved = json.loads((tmp_path / "out" / "results.json").read_text())
    assert saved["stages"][0]["pretrained"] == f"timm {TAGGED}"
    out = capsys.readouterr()
    assert f"stage teacher: pretrained weights of timm {TAGGED}, not trained" in out.out
    assert "the pretrained classifier (fc) predicts 1000 classes and the data has 4" in out.err


def test_zero_epochs_without_init_or_pretrained_weights_is_refused(
        hub: dict[str, torch.Tensor], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    recipe = tmp_path / "r.toml"
    recipe.write_text(RECIPE.format(teacher=f'{{ name = "timm", model = "{TAGGED}", pretrained = false }}',
                                    epochs=0))
    assert main(["validate", str(recipe)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f'error: {recipe}: epochs = 0 loads a stage instead of training it: give it init = '
                   '"checkpoint.pt" or a backbone with pretrained weights @ recipe.stages.teacher.epochs']


def test_validate_reports_an_unknown_tag_and_an_empty_offline_cache_in_one_line(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> None:
    offline_cache(monkeypatch, tmp_path / "empty")
    recipe = tmp_path / "r.toml"
    for model, key, what in ((f"{MODEL}.bogus", "model", f"timm model '{MODEL}' has no pretrained tag 'bogus'"),
                             (TAGGED, "model", f"the pretrained weights of timm model {TAGGED!r}"),
                             ("resnet50_mlp", "pretrained", "timm model 'resnet50_mlp' has no pretrained weights")):
        pretrained = ", pretrained = true" if key == "pretrained" else ""
        recipe.write_text(RECIPE.format(teacher=f'{{ name = "timm", model = "{model}"{pretrained} }}', epochs=0))
        assert main(["validate", str(recipe)]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1, err
        assert err[0].startswith(f"error: {recipe}: {what}"), err
        assert err[0].endswith(f" @ recipe.stages.teacher.backbone.{key}"), err


def test_a_new_process_loads_from_the_cache_the_environment_names(tmp_path: Path) -> None:
    """HF_HOME and HF_HUB_OFFLINE=1 alone, read by huggingface_hub as a fresh process imports it."""
    home = tmp_path / "hf"
    torch.manual_seed(99)
    state = timm.create_model(TAGGED, pretrained=False).state_dict()
    file = hub_layout(home / "hub", TAGGED, state)
    code = (
        "import kdreg, torch\n"
        "from safetensors.torch import load_file\n"
        f"net = kdreg.build_backbone('timm', num_classes=1000, model={TAGGED!r})\n"
        f"saved = load_file({str(file)!r})\n"
        "own = net.net.state_dict()\n"
        "print(all(torch.equal(own[k], v) for k, v in saved.items()), net.pretrained)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HOME=str(home), HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"True timm {TAGGED}"
