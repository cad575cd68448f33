"""Universally slimmable training (US-Nets, Yu & Huang ICCV 2019): a width range, the sandwich
rule, one BatchNorm per layer and BN calibration (``kdreg.calibrate``), for the hand-written
slimmable backbones and for ``slimmable`` over a trunk; the CLI's ``eval --widths`` and the
export of any width of the range. Tiny models and images throughout."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kdreg
from kdreg.calibrate import calibrate
from kdreg.cli import main
from kdreg.errors import OptionError
from kdreg_plugins.backbones.mobilenet_v1 import build_slimmable_mobilenet_v1
from kdreg_plugins.backbones.slimmable import (
    RangeBatchNorm2d,
    SlimmableBackbone,
    SlimmableConv2d,
    SwitchableBatchNorm2d,
    scale_channels,
    set_width_index,
)
from kdreg_plugins.backbones.slimmable_derived import build_slimmable
from kdreg_plugins.backbones.slimmable_resnet import SlimmableCifarResNet
from kdreg_plugins.backbones.tiny import build_tiny_slimmable

pytestmark = pytest.mark.usefixtures("one_thread")

ROOT = Path(__file__).resolve().parent.parent
RANGE = {"min": 0.25, "max": 1.0, "sampled": 2}
FIXED = [0.25, 0.5, 0.75, 1.0]


def tiny(widths: Any = RANGE, **kw: Any) -> SlimmableBackbone:
    return build_tiny_slimmable(num_classes=5, channels=8, input_size=(8, 8), widths=widths, **kw)


def resnet8(widths: Any = RANGE) -> SlimmableBackbone:
    return SlimmableCifarResNet(8, 5, widths, input_size=(8, 8))


def mobilenet(widths: Any = RANGE) -> SlimmableBackbone:
    return build_slimmable_mobilenet_v1(num_classes=5, input_size=(16, 16), widths=widths)


def derived(widths: Any = RANGE, trunk: nn.Module | None = None) -> SlimmableBackbone:
    trunk = trunk if trunk is not None else kdreg.build_backbone("resnet8", num_classes=5,
                                                                 input_size=(8, 8))
    return build_slimmable(num_classes=5, in_chans=3, input_size=(8, 8), trunk=trunk,
                           widths=widths)


BUILDERS = {"tiny": tiny, "resnet8": resnet8, "mobilenet": mobilenet}


def images(n: int, size: int = 8, seed: int = 0) -> Tensor:
    return torch.rand(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def first_conv_out(model: SlimmableBackbone) -> int:
    """Output channels the first slimmable conv ran with in the last forward."""
    conv = next(m for m in model.modules() if isinstance(m, SlimmableConv2d))
    return conv.out_list[conv.width_index]


def first_conv_base(model: SlimmableBackbone) -> int:
    conv = next(m for m in model.modules() if isinstance(m, SlimmableConv2d))
    return conv.channel_rules["out_list"].base


# ----------------------------------------------------------------------------- the sandwich rule
def test_the_sandwich_draw_is_deterministic_ordered_within_range_with_min_and_max() -> None:
    model = tiny({"min": 0.3, "max": 0.9, "sampled": 3})
    assert model.train_labels == ("min", "sampled1", "sampled2", "sampled3", "max")
    assert model.num_train_submodels == 5 and model.num_submodels == 4
    draws = {}
    for seed in range(20):
        model.begin_step(seed)
        w = model.train_widths
        assert len(w) == 5 and w[0] == 0.3 and w[-1] == 0.9
        assert list(w) == sorted(w) and all(0.3 < x < 0.9 for x in w[1:-1])
        draws[seed] = w
    assert len(set(draws.values())) == 20  # a new draw per seed
    twin = tiny({"min": 0.3, "max": 0.9, "sampled": 3})
    for seed in (7, 3, 7):
        twin.begin_step(seed)
        assert twin.train_widths == draws[seed]
    # the draw is the documented one: uniform from a CPU generator seeded with the seed, sorted
    u = torch.rand(3, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    model.begin_step(11)
    assert model.train_widths[1:-1] == tuple(sorted((0.3 + (0.9 - 0.3) * u).tolist()))
    # sampled = 0: the step trains min and max only
    assert tiny({"min": 0.5, "max": 1.0, "sampled": 0}).train_labels == ("min", "max")


@pytest.mark.parametrize("name", ["tiny", "resnet8", "mobilenet", "derived"])
def test_training_runs_the_drawn_widths_and_evaluation_the_evaluated(name: str) -> None:
    model = derived() if name == "derived" else BUILDERS[name]()
    size = 16 if name == "mobilenet" else 8
    x = images(4, size)
    base = first_conv_base(model)
    model.train()
    model.begin_step(5)
    drawn = model.train_widths
    for i, w in enumerate(drawn):
        assert model.forward_submodel(x, i).shape == (4, 5)
        assert first_conv_out(model) == scale_channels(base, w)
    assert len(model(x)) == len(drawn)  # forward in training: every width of the step
    if model.split_points():
        point = model.split_points()[0]
        feats, _ = model.forward_features(x, 1, [point])
        assert first_conv_out(model) == scale_channels(base, drawn[1])
    with pytest.raises(IndexError):
        model.forward_submodel(x, len(drawn))
    model.eval()
    for i, w in enumerate(model.widths):
        model.forward_submodel(x, i)
        assert first_conv_out(model) == scale_channels(base, w)
    assert model.submodel_labels == ("x0.25", "x0.5", "x0.75", "x1.0")


def test_a_drawn_width_trains_the_shared_weights_of_its_channels_only() -> None:
    model = tiny()
    model.train()
    model.begin_step(0)
    w = model.train_widths[1]
    model.zero_grad()
    model.forward_submodel(images(4), 1).sum().backward()
    conv = model.layer1[0]
    k = scale_channels(8, w)
    assert conv.weight.grad[:k].abs().sum() > 0 and conv.weight.grad[k:].abs().sum() == 0
    bn = model.layer1[1]
    assert isinstance(bn, RangeBatchNorm2d)
    assert bn.weight.grad[:k].abs().sum() > 0 and bn.weight.grad[k:].abs().sum() == 0
    # training keeps no statistics: only calibration writes them
    assert torch.equal(bn.running_mean, torch.zeros_like(bn.running_mean))
    assert model.needs_calibration() and not tiny(FIXED).needs_calibration()


def test_a_range_model_saves_loads_and_copies_with_its_statistics() -> None:
    import copy

    model = tiny()
    calibrate(model, [(images(6), None)], 6)
    model.eval()
    twin = tiny()
    twin.load_state_dict(model.state_dict())
    twin.eval()
    clone = copy.deepcopy(model)
    x = images(3, seed=4)
    with torch.no_grad():
        for i in range(model.num_submodels):
            assert torch.equal(twin.forward_submodel(x, i), model.forward_submodel(x, i))
            assert torch.equal(clone.forward_submodel(x, i), model.forward_submodel(x, i))
    # a fixed-width model: begin_step changes nothing, the step trains the evaluated widths
    fixed = tiny(FIXED)
    fixed.begin_step(3)
    assert fixed.train_labels is None and fixed.num_train_submodels == 4


# ----------------------------------------------------------------------------- width 1.0 = fixed
def _copy_fixed_into_range(fixed: SlimmableBackbone, ranged: SlimmableBackbone) -> None:
    """The fixed model's weights into the range model: shared layers as they are, each switchable
    BN's largest width into the one BN (its statistics into every evaluated width's row)."""
    state = ranged.state_dict()
    for name, m in fixed.named_modules():
        if isinstance(m, SwitchableBatchNorm2d):
            big = m.bn[-1]
            state[f"{name}.weight"] = big.weight.detach().clone()
            state[f"{name}.bias"] = big.bias.detach().clone()
            state[f"{name}.running_mean"] = big.running_mean.expand_as(state[f"{name}.running_mean"])
            state[f"{name}.running_var"] = big.running_var.expand_as(state[f"{name}.running_var"])
    for key, value in fixed.state_dict().items():
        if ".bn." not in key:
            state[key] = value
    ranged.load_state_dict(state)


@pytest.mark.parametrize("name", ["tiny", "resnet8", "mobilenet"])
def test_width_one_computes_what_the_fixed_width_model_computes(name: str) -> None:
    torch.manual_seed(0)
    fixed, ranged = BUILDERS[name](FIXED), BUILDERS[name](RANGE)
    x = images(6, 16 if name == "mobilenet" else 8)
    # statistics of their own in the fixed model's largest BNs, then the same in the range model
    fixed.train()
    with torch.no_grad():
        fixed.forward_submodel(x * 2 - 0.3, 3)
    for m in fixed.modules():
        if isinstance(m, SwitchableBatchNorm2d):
            with torch.no_grad():
                m.bn[-1].weight.uniform_(0.5, 1.5)
                m.bn[-1].bias.uniform_(-0.2, 0.2)
    _copy_fixed_into_range(fixed, ranged)
    fixed.eval()
    ranged.eval()
    with torch.no_grad():
        assert torch.equal(ranged.forward_submodel(x, 3), fixed.forward_submodel(x, 3))
        fixed.train()
        ranged.train()
        ranged.begin_step(1)
        # in training both normalise with the batch's statistics
        assert torch.equal(ranged.forward_submodel(x, 3), fixed.forward_submodel(x, 3))
    assert ranged.count_params() == fixed.count_params()
    assert ranged.count_macs() == fixed.count_macs()


def test_derived_width_one_computes_what_the_trunk_and_the_fixed_width_model_compute() -> None:
    trunk = kdreg.build_backbone("resnet8", num_classes=5, input_size=(8, 8))
    with torch.no_grad():  # statistics of its own
        trunk.train()
        trunk(images(8) * 3)
    trunk.eval()
    ranged, fixed = derived(RANGE, trunk), derived(FIXED, trunk)
    ranged.eval()
    fixed.eval()
    x = images(4, seed=1)
    with torch.no_grad():
        want = trunk(x)[0]
        assert torch.equal(ranged.forward_submodel(x, 3), fixed.forward_submodel(x, 3))
        assert torch.equal(ranged.forward_submodel(x, 3), want)
    assert ranged.count_params() == fixed.count_params()


# ----------------------------------------------------------------------------- calibration
def test_calibrate_recomputes_each_evaluated_width_as_the_plain_average_of_batch_statistics() -> None:
    torch.manual_seed(0)
    model = tiny()
    batches = [(images(5, seed=s), torch.zeros(5, dtype=torch.long)) for s in range(3)]
    bn = model.layer1[1]
    model.eval()
    # statistics of other images first: the second calibration starts them afresh
    calibrate(model, [(images(5, seed=9) * 3, None)] * 2, 10)
    calibrate(model, batches, 12)  # the third batch cut to 2 images
    assert not model.training and bn.momentum == 0.1  # mode and momentum restored
    assert bn.num_batches_tracked.tolist() == [3, 3, 3, 3]
    for j, w in enumerate(model.widths):
        k = scale_channels(8, w)
        set_width_index(model, model.eval_slot(j))
        with torch.no_grad():
            feats = [model.layer1[0](x[:n]) for (x, _), n in zip(batches, (5, 5, 2))]
        mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
        var = torch.stack([f.var(dim=(0, 2, 3), unbiased=True) for f in feats]).mean(0)
        torch.testing.assert_close(bn.running_mean[j, :k], mean, rtol=0, atol=1e-6)
        torch.testing.assert_close(bn.running_var[j, :k], var, rtol=1e-5, atol=1e-6)


def test_calibrate_a_fixed_width_model_and_a_model_without_batchnorm() -> None:
    model = tiny(FIXED)
    batches = [(images(4, seed=s), None) for s in range(2)]
    bns = model.layer1[1].bn
    model.train()
    with torch.no_grad():  # statistics of their own, by momentum, from other images
        for i in range(4):
            model.forward_submodel(images(4, seed=7) * 3, i)
    calibrate(model, batches, 8)
    assert model.training
    for i, bn in enumerate(bns):
        set_width_index(model, i)
        with torch.no_grad():
            feats = [model.layer1[0](x) for x, _ in batches]
        mean = torch.stack([f.mean(dim=(0, 2, 3)) for f in feats]).mean(0)
        torch.testing.assert_close(bn.running_mean, mean, rtol=0, atol=1e-6)
        assert int(bn.num_batches_tracked) == 2

    class NoNorm(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3)

        def forward(self, x: Tensor) -> Tensor:
            return self.conv(x)

    plain = NoNorm().eval()
    before = {k: v.clone() for k, v in plain.state_dict().items()}
    calibrate(plain, batches, 8)
    assert not plain.training
    assert all(torch.equal(before[k], v) for k, v in plain.state_dict().items())


# ----------------------------------------------------------------------------- export
@pytest.mark.parametrize("name", ["tiny", "resnet8", "mobilenet", "derived"])
def test_the_export_of_an_evaluated_width_equals_the_calibrated_model(name: str) -> None:
    torch.manual_seed(0)
    model = derived() if name == "derived" else BUILDERS[name]()
    size = 16 if name == "mobilenet" else 8
    batches = [(images(6, size, seed=s), None) for s in range(2)]
    calibrate(model, batches, 12)
    model.set_eval_widths([0.4, 0.7, 1.0])
    calibrate(model, batches, 12)
    model.eval()
    x = images(3, size, seed=9)
    params = model.count_params()
    for i in range(model.num_submodels):
        net = model.export_submodel(i).eval()
        assert not any(isinstance(m, RangeBatchNorm2d) for m in net.modules())
        assert sum(p.numel() for p in net.parameters()) == params[i]
        with torch.no_grad():
            # (MobileNet runs channels-last on the CPU, its export NCHW: summation order)
            torch.testing.assert_close(net(x), model.forward_submodel(x, i), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------- set_eval_widths
def test_set_eval_widths_replaces_the_evaluated_widths_uncalibrated() -> None:
    model = tiny()
    calibrate(model, [(images(4), None)], 4)
    before = model.count_params()
    model.set_eval_widths([0.3, 0.6])
    assert model.submodel_labels == ("x0.3", "x0.6") and model.widths == (0.3, 0.6)
    assert model.num_submodels == 2 and model.train_labels == ("min", "sampled1", "sampled2", "max")
    bn = model.layer1[1]
    assert bn.running_mean.shape == (2, 8)
    assert torch.equal(bn.running_mean, torch.zeros(2, 8))
    assert torch.equal(bn.running_var, torch.ones(2, 8))
    model.eval()
    assert len(model(images(2))) == 2
    assert model.count_params()[0] not in before and model.count_params()[0] > before[0]
    with pytest.raises(OptionError, match=r"outside the trained range \[0.25, 1\]") as info:
        model.set_eval_widths([0.2, 0.5])
    assert info.value.key == "widths"
    with pytest.raises(OptionError, match="strictly increasing"):
        model.set_eval_widths([0.5, 0.3])
    with pytest.raises(OptionError, match="only a width range"):
        tiny(FIXED).set_eval_widths([0.5])


def test_eval_widths_from_the_recipe_and_their_default() -> None:
    model = tiny({"min": 0.2, "max": 0.8, "sampled": 1, "eval": [0.2, 0.5, 0.8]})
    assert model.submodel_labels == ("x0.2", "x0.5", "x0.8")
    assert tiny({"min": 0.4, "max": 1.0}).submodel_labels == ("x0.4", "x0.6", "x0.8", "x1.0")
    assert tiny({"min": 0.5, "max": 0.5}).submodel_labels == ("x0.5",)


# ----------------------------------------------------------------------------- bad input
BAD_RECIPE = """
name = "bad"
[data]
dataset = "synthetic"
batch_size = 8
val_split = 8
options = {{ train_size = 32, test_size = 8, num_classes = 4, image_size = 16 }}
[[stages]]
name = "student"
backbone = {backbone}
graph = "ipkd"
"""


@pytest.mark.parametrize(("backbone", "expected"), [
    ('{ name = "slimmable_mobilenet_v1", widths = { min = 0.75, max = 0.5 } }',
     "widths.min (0.75) must not exceed widths.max (0.5)"),
    ('{ name = "slimmable_mobilenet_v1", widths = { min = 0.0, max = 1.0 } }',
     "widths.min must lie in (0, 1], got 0.0"),
    ('{ name = "slimmable_resnet20", widths = { min = 0.25, max = 1.5 } }',
     "widths.max must lie in (0, 1], got 1.5"),
    ('{ name = "tiny_slimmable", widths = { min = 0.25, max = 1.0, sampled = -1 } }',
     "widths.sampled must be an integer >= 0, got -1"),
    ('{ name = "tiny_slimmable", widths = { min = 0.25, max = 1.0, eval = [0.1, 0.5] } }',
     "evaluated widths 0.1 lie outside the trained range [0.25, 1]"),
    ('{ name = "tiny_slimmable", widths = { min = 0.25, max = 1.0, samples = 2 } }',
     "unknown key(s) 'samples' in the width range; accepted: min, max, set, sampled, eval"),
    ('{ name = "tiny_slimmable", widths = { max = 1.0 } }',
     "a width range needs min, e.g. widths = { min = 0.25, max = 1.0, sampled = 2 }"),
    ('{ name = "slimmable_mobilenet_v1", widths = { min = 0.03, max = 1.0 } }',
     "widths.min 0.03 leaves layer stem.0.0 no channel (int(32 x 0.03) = 0); the narrowest width "
     "this model allows is 0.03125"),
    ('{ name = "slimmable", trunk = { name = "resnet8" }, widths = { min = 0.05, max = 1.0 } }',
     "width 0.05 leaves layer stem.0 of trunk resnet8 no channel (int(16 x 0.05) = 0); the "
     "narrowest width this trunk allows is 0.0625"),
])
def test_bad_ranges_are_one_line_with_their_key_and_exit_2(
        backbone: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(BAD_RECIPE.format(backbone=backbone))
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.splitlines() == [
        f"error: {path}: {expected} @ recipe.stages.student.backbone.widths"], err


def test_bad_ranges_from_python_raise_option_errors() -> None:
    for widths in ({"min": 1.0, "max": 0.5}, {"min": 0.5, "max": 1.0, "sampled": True},
                   {"min": "0.5", "max": 1.0}, {"min": 0.5, "max": 1.0, "eval": [0.75, 0.6]}):
        with pytest.raises(OptionError) as info:
            tiny(widths)
        assert info.value.key == "widths"


# ----------------------------------------------------------------------------- the CLI
RUN_RECIPE = """
name = "us"
seed = 0
[data]
dataset = "synthetic"
batch_size = 16
val_split = 16
options = {{ train_size = 64, test_size = 32, num_classes = 4, image_size = 8 }}
[train]
epochs = {epochs}
optimizer = {{ lr = 0.05 }}
calibrate_images = 32
[[stages]]
name = "plain"
backbone = {{ name = "tiny_slimmable", channels = 4 }}
graph = "none"
[[stages]]
name = "us"
backbone = {{ name = "tiny_slimmable", channels = 4, widths = {{ min = 0.25, max = 1.0, sampled = 2 }} }}
graph = "ipkd"
"""


def _engine_calibrates() -> bool:
    import inspect

    from kdreg.engine import trainer

    return "begin_step" in inspect.getsource(trainer)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("us-run")
    recipe = root / "us.toml"
    recipe.write_text(RUN_RECIPE.format(epochs=1))
    if not _engine_calibrates():
        pytest.skip("the trainer does not call begin_step / calibrate yet (engine side)")
    assert main(["run", str(recipe), "--out", str(root / "run"), "--no-progress"]) == 0
    return root / "run"


def test_cli_eval_widths_recalibrates_and_evaluates_them(
        trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--widths", "0.35,0.6", "--calibrate", "32"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].startswith("stage plain (32 test images): x0.25 ")  # as it is
    assert "calibrated" not in lines[0]
    assert re.fullmatch(r"stage us \(32 test images\): x0\.35 [\d.]+, x0\.6 [\d.]+ \(mean [\d.]+\), "
                        r"BatchNorm calibrated on 32 training images", lines[1]), lines[1]
    # the evaluated widths of the run as they are, then recalibrated: what results.json says
    results = json.loads((trained_run / "results.json").read_text())["stages"][1]
    assert results["submodels"] == ["x0.25", "x0.5", "x0.75", "x1.0"]
    assert main(["eval", str(trained_run), "--stage", "us", "--calibrate", "32"]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith("stage us (32 test images): x0.25 ") and "calibrated on 32" in line


def test_cli_eval_widths_refuses_a_stage_without_a_range(
        trained_run: Path, capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    assert main(["eval", str(trained_run), "--widths", "0.5", "--stage", "plain"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --widths: stage 'plain' does not train a width range (backbone widths = "
                   "{ min, max, ... }); only a universally slimmable stage evaluates other widths"]
    assert main(["eval", str(trained_run), "--widths", "0.1,0.5"]) == 2
    err = capsys.readouterr().err.splitlines()
    assert err == ["error: --widths: evaluated widths 0.1 lie outside the trained range [0.25, 1] "
                   "(stage 'us')"]
    assert main(["eval", str(trained_run), "--widths", "a,b"]) == 2


def test_cli_export_of_any_width_of_the_range(
        trained_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "x0.4.safetensors"
    assert main(["export", str(trained_run), "--submodel", "x0.4", "--calibrate", "32",
                 "--out", str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    assert info["label"] == "x0.4" and info["test_accuracy"] is None
    out = tmp_path / "x0.5.safetensors"
    assert main(["export", str(trained_run), "--submodel", "x0.5", "--out", str(out)]) == 0
    info = json.loads(out.with_suffix(".json").read_text())
    results = json.loads((trained_run / "results.json").read_text())["stages"][1]
    assert info["params"] == results["params"][1]
    assert info["test_accuracy"] == results["test_accuracy"][1]
    capsys.readouterr()
    assert main(["export", str(trained_run), "--submodel", "x0.1", "--out",
                 str(tmp_path / "bad.safetensors")]) == 2
    assert "outside the trained range" in capsys.readouterr().err


def test_a_sandwich_of_another_size_than_the_evaluated_widths_trains(tmp_path: Path) -> None:
    text = RUN_RECIPE.format(epochs=1).replace("sampled = 2", "sampled = 1")
    recipe = tmp_path / "us1.toml"
    text = text.replace("calibrate_images = 32", 'calibrate_images = 32\nloggers = ["jsonl", "csv"]')
    recipe.write_text(text[:text.index('[[stages]]\nname = "plain"')]
                      + text[text.index('[[stages]]\nname = "us"'):])
    assert main(["run", str(recipe), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    # the training accuracy is the sandwich's (3 widths), labelled so; validation the evaluated 4
    header = (tmp_path / "run" / "metrics-us.csv").read_text().splitlines()[0].split(",")
    assert [c for c in header if c.startswith("train_accuracy")] == [
        "train_accuracy[min]", "train_accuracy[sampled1]", "train_accuracy[max]"]
    assert [c for c in header if c.startswith("val_accuracy")] == [
        f"val_accuracy[x{w}]" for w in ("0.25", "0.5", "0.75", "1.0")]


def test_the_shipped_recipe_is_us_nets_on_cifar10(tmp_path: Path) -> None:
    text = (ROOT / "recipes" / "us-nets-mobilenet-v1.toml").read_text()
    assert 'widths = { min = 0.25, max = 1.0, sampled = 2 }' in text and 'graph = "ipkd"' in text
    assert "kdreg eval" in text and "--widths" in text and "--calibrate 2000" in text
    assert main(["validate", str(ROOT / "recipes" / "us-nets-mobilenet-v1.toml")]) == 0
