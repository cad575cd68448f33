"""``kdreg export``: one sub-model of a trained run as a standalone network (.pt2 / safetensors).

Two tiny runs (synthetic data, one epoch): a pipeline of a slimmable net, an early-exit net and
an STC student with its teacher, and an ``exits`` backbone on a timm ResNet-18. Each export is
checked against the flexible model it came from (logits within 1e-5), results.json's parameter
count (for an exit the anytime count: its program holds the earlier exits' heads too) and test
accuracy, and loaded where kdreg, kdreg_plugins and timm cannot be imported.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import Tensor, nn

import kdreg
from kdreg.backbone import FlexibleBackbone
from kdreg.cli import main
from kdreg.data import Splits, load_data
from kdreg.engine.run import Run
from kdreg.errors import ExportError
from kdreg.measure import params_depended_on

pytestmark = pytest.mark.usefixtures("one_thread")

RECIPE = """
name = "export"
seed = 0
[data]
dataset = "synthetic"
batch_size = 32
val_split = 64
options = {{ train_size = 256, test_size = 100, num_classes = 10, image_size = 16 }}
[train]
epochs = 1
optimizer = {{ lr = 0.02 }}
schedule = {{ name = "cosine" }}
{stages}
"""
PIPELINE = """
[[stages]]
name = "slim"
backbone = { name = "tiny_slimmable", widths = [0.25, 0.5, 1.0] }
graph = { name = "ipkd-ta-m" }
[[stages]]
name = "exits"
backbone = { name = "tiny_exits" }
graph = { name = "ipkd" }
[[stages]]
name = "teacher"
backbone = "resnet8"
graph = { name = "none" }
[[stages]]
name = "stc"
backbone = "resnet8"
graph = { name = "kd", teacher = "teacher" }
bridge = { name = "stc", teacher = "teacher", student_split = "layer2", teacher_split = "layer2", alpha = 0.5 }
"""
TIMM = """
[[stages]]
name = "timm"
backbone = { name = "exits", trunk = { name = "timm", model = "resnet18" }, points = [1, 2] }
graph = { name = "ipkd" }
"""


class Trained:
    """A trained run directory, its data and its stages' flexible models (selected weights)."""

    def __init__(self, directory: Path):
        self.directory = directory
        run = Run.resume(directory, progress=False)
        run.device = torch.device("cpu")
        self.splits: Splits = load_data(run.recipe.data)
        self.models = {plan.name: model for plan, model in run.trained_stages(self.splits)}
        self.results = {s["name"]: s for s in json.loads((directory / "results.json").read_text())["stages"]}


def _train(root: Path, name: str, stages: str) -> Trained:
    recipe = root / f"{name}.toml"
    recipe.write_text(RECIPE.format(stages=stages))
    Run.start(recipe, root / name, progress=False).execute()
    return Trained(root / name)


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(tmp_path_factory.mktemp("export"), "pipeline", PIPELINE)


@pytest.fixture(scope="module")
def timm_run(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    return _train(tmp_path_factory.mktemp("export"), "timm", TIMM)


def export(run: Trained, *args: str) -> int:
    return main(["export", str(run.directory), *args])


def _normalise(x: Tensor, splits: Splits) -> Tensor:
    mean = torch.tensor(splits.mean).view(1, -1, 1, 1)
    std = torch.tensor(splits.std).view(1, -1, 1, 1)
    return (x - mean) / std


def check_program(run: Trained, stage: str, label: str, out: Path) -> dict[str, Any]:
    """The .pt2 at ``out`` against the flexible model, results.json and its model.json."""
    model, result = run.models[stage], run.results[stage]
    i = result["submodels"].index(label)
    program = torch.export.load(str(out))
    info = json.loads(out.with_suffix(".json").read_text())
    net = program.module()
    # logits of [0, 1] images, any batch size, equal the flexible model's on the normalised images
    for batch in (1, 5):
        x = torch.rand(batch, 3, 16, 16, generator=torch.Generator().manual_seed(batch))
        with torch.no_grad():
            want = model.forward_submodel(_normalise(x, run.splits), i)
            got = net(x)
        assert got.shape == (batch, 10)
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)
    params = sum(program.state_dict[name].numel() for name in program.graph_signature.parameters)
    assert params == info["params"] == result["params"][i] == model.count_params()[i]
    # the run's test accuracy of that sub-model, from the program on the test split's images
    test = run.splits.test
    with torch.no_grad():
        pred = net(test.images.float() / 255.0).argmax(-1)
    accuracy = 100.0 * int((pred == test.labels).sum()) / len(test.labels)
    assert accuracy == pytest.approx(result["test_accuracy"][i], abs=1e-9)
    assert info["test_accuracy"] == result["test_accuracy"][i]
    assert (info["label"], info["stage"], info["file_format"]) == (label, stage, "pt2")
    assert info["classes"] == [f"class{k}" for k in range(10)] == list(run.splits.classes)
    assert info["input_size"] == [3, 16, 16]
    assert info["run_macs"] == result["macs"][i] and "run_params" not in info
    return info


def test_a_slimmable_width_is_a_plain_network_of_its_own_channels(pipeline: Trained, tmp_path: Path) -> None:
    out = tmp_path / "slim.pt2"
    assert export(pipeline, "--stage", "slim", "--submodel", "x0.5", "--out", str(out)) == 0
    info = check_program(pipeline, "slim", "x0.5", out)
    result = pipeline.results["slim"]
    assert info["params"] == result["params"][1] < result["params"][2]
    assert info["macs"] == result["macs"][1]
    program = torch.export.load(str(out))
    shapes = {n: tuple(program.state_dict[n].shape) for n in program.graph_signature.parameters}
    assert shapes["net.layer1.0.weight"] == (8, 3, 3, 3)            # 16 channels at x0.5
    assert shapes["net.classifier.weight"] == (10, 32)
    assert not any(".bn." in n for n in program.state_dict)          # only the width's own BN


def _modules(program: torch.export.ExportedProgram, prefix: str) -> set[str]:
    """The first name after ``prefix`` of the program's parameters under ``prefix``."""
    return {n[len(prefix):].split(".")[0] for n in program.graph_signature.parameters
            if n.startswith(prefix)}


def test_an_early_exit_is_truncated_at_its_exit(pipeline: Trained, tmp_path: Path) -> None:
    out = tmp_path / "exit2.pt2"
    assert export(pipeline, "--stage", "exits", "--submodel", "exit2", "--out", str(out)) == 0
    info = check_program(pipeline, "exits", "exit2", out)  # params == results.json's, exactly
    model = pipeline.models["exits"]
    own = params_depended_on(model, lambda x: [model.forward_submodel(x, 1)])[0]
    head1 = sum(p.numel() for p in model.heads[0].parameters())
    # everything up to exit 2, exit 1's head included (anytime), though exit 2's logits skip it
    assert info["params"] == own + head1 < sum(p.numel() for p in model.parameters())
    program = torch.export.load(str(out))
    assert _modules(program, "net.model.stages.") == _modules(program, "net.model.heads.") == {"0", "1"}


def test_an_exit_on_a_timm_trunk(timm_run: Trained, tmp_path: Path) -> None:
    out = tmp_path / "timm-exit2.pt2"
    assert export(timm_run, "--submodel", "exit2", "--out", str(out)) == 0  # the only stage
    info = check_program(timm_run, "timm", "exit2", out)  # params == results.json's, exactly
    model = timm_run.models["timm"]
    own = params_depended_on(model, lambda x: [model.forward_submodel(x, 1)])[0]
    head1 = sum(p.numel() for p in model.heads[0].parameters())
    assert info["params"] == own + head1
    program = torch.export.load(str(out))
    assert _modules(program, "net.front.graph.") == {"conv1", "bn1", "layer1", "layer2"}  # no fc
    assert _modules(program, "net.heads.") == {"0", "1"}


def test_an_stc_student_is_exported_alone(pipeline: Trained, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "student.pt2"
    assert export(pipeline, "--out", str(out)) == 0  # the last stage, its full model
    assert "full of stage stc" in capsys.readouterr().out
    info = check_program(pipeline, "stc", "full", out)
    student = pipeline.models["stc"]
    assert info["params"] == pipeline.results["stc"]["params"][0] == sum(p.numel() for p in student.parameters())


def test_the_programs_load_without_kdreg(pipeline: Trained, timm_run: Trained, tmp_path: Path) -> None:
    cases = [(pipeline, "slim", "x0.25"), (pipeline, "exits", "exit1"), (timm_run, "timm", "exit1")]
    files = []
    for run, stage, label in cases:
        files.append(tmp_path / f"{stage}-{label}.pt2")
        assert export(run, "--stage", stage, "--submodel", label, "--out", str(files[-1])) == 0
    x = torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(7))
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys\n"
        "for name in ('kdreg', 'kdreg_plugins', 'timm'):\n"
        "    sys.modules[name] = None\n"
        "try:\n"
        "    import kdreg\n"
        "except ImportError:\n"
        "    pass\n"
        "else:\n"
        "    raise SystemExit('kdreg is importable')\n"
        "import torch\n"
        "x = torch.load(sys.argv[1])\n"
        "torch.save([torch.export.load(f).module()(x) for f in sys.argv[3:]], sys.argv[2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", script, str(tmp_path / "x.pt"), str(tmp_path / "y.pt"),
                           *map(str, files)], capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    outs = torch.load(tmp_path / "y.pt")
    for (run, stage, label), got in zip(cases, outs):
        model = run.models[stage]
        with torch.no_grad():
            want = model.forward_submodel(_normalise(x, run.splits), model.submodel_labels.index(label))
        torch.testing.assert_close(got, want, atol=1e-5, rtol=0)


def test_safetensors_round_trip(pipeline: Trained, tmp_path: Path) -> None:
    from safetensors import safe_open
    from safetensors.torch import load_file

    out = tmp_path / "slim.safetensors"
    assert export(pipeline, "--stage", "slim", "--submodel", "x0.5", "--out", str(out)) == 0
    info = json.loads((tmp_path / "slim.json").read_text())
    assert info["file_format"] == "safetensors" and info["params"] == pipeline.results["slim"]["params"][1]
    with safe_open(str(out), "pt") as f:
        assert f.metadata()["label"] == "x0.5"
    model = pipeline.models["slim"]
    fresh = kdreg.build_backbone("tiny_slimmable", num_classes=10, input_size=(16, 16), widths=[0.25, 0.5, 1.0])
    net = fresh.export_submodel(1)  # the same architecture with untrained weights
    state = load_file(str(out))
    assert set(state) == set(net.state_dict())
    net.load_state_dict(state)
    x = _normalise(torch.rand(4, 3, 16, 16), pipeline.splits)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model.forward_submodel(x, 1), atol=1e-5, rtol=0)
    # --format overrides the suffix
    other = tmp_path / "weights.bin"
    assert export(pipeline, "--stage", "slim", "--format", "safetensors", "--out", str(other)) == 0
    assert set(load_file(str(other))) == set(model.export_submodel(2).state_dict())
    # an exit's state dict holds exit 1's head too: its parameters are results.json's count
    out = tmp_path / "exit2.safetensors"
    assert export(pipeline, "--stage", "exits", "--submodel", "exit2", "--out", str(out)) == 0
    net = pipeline.models["exits"].export_submodel(1)
    state = load_file(str(out))
    assert set(state) == set(net.state_dict()) and "model.heads.0.fc.weight" in state
    params = sum(state[name].numel() for name, _ in net.named_parameters())
    assert params == pipeline.results["exits"]["params"][1] == json.loads(
        out.with_suffix(".json").read_text())["params"]


def test_refusals_exit_2_and_overwrite_nothing(pipeline: Trained, tmp_path: Path,
                                               capsys: pytest.CaptureFixture[str]) -> None:
    def refused(*args: str, directory: Path | None = None) -> str:
        capsys.readouterr()
        assert main(["export", str(directory or pipeline.directory), *args]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and "Traceback" not in err
        return err

    out = tmp_path / "m.pt2"
    err = refused("--stage", "slim", "--submodel", "x0.3", "--out", str(out))
    assert "stage 'slim' has no sub-model 'x0.3'; its sub-models: x0.25, x0.5, x1.0" in err
    err = refused("--stage", "student", "--out", str(out))
    assert "has no stage 'student'; its stages: slim, exits, teacher, stc" in err
    assert not out.exists() and not out.with_suffix(".json").exists()
    assert refused("--out", str(tmp_path / "m.json")).count("give the network a .pt2")

    out.write_bytes(b"earlier")
    assert f"{out} exists; choose another --out or pass --force" in refused("--out", str(out))
    assert out.read_bytes() == b"earlier" and not out.with_suffix(".json").exists()
    out.with_suffix(".json").write_text("earlier")
    assert export(pipeline, "--out", str(out), "--force") == 0
    assert json.loads(out.with_suffix(".json").read_text())["stage"] == "stc"
    assert not list(tmp_path.glob(".*tmp*"))

    assert "is not a kdreg run directory" in refused("--out", str(tmp_path / "a.pt2"), directory=tmp_path)
    (tmp_path / "repeat" / "seed-3").mkdir(parents=True)
    err = refused("--out", str(tmp_path / "a.pt2"), directory=tmp_path / "repeat")
    assert "is a repeat of 1 seed runs; export from one of them, e.g." in err and "seed-3" in err
    copy = tmp_path / "copy"
    shutil.copytree(pipeline.directory, copy)
    results = json.loads((copy / "results.json").read_text())
    results["stages"] = [s for s in results["stages"] if s["name"] != "stc"]
    (copy / "results.json").write_text(json.dumps(results))
    assert "stage 'stc' has not finished" in refused("--out", str(tmp_path / "b.pt2"), directory=copy)
    shutil.rmtree(copy / "checkpoints" / "exits")
    err = refused("--stage", "exits", "--out", str(tmp_path / "c.pt2"), directory=copy)
    assert "stage 'exits' has no selected weights yet" in err and "best.pt is missing" in err
    assert not list(tmp_path.glob("[abc].*"))


# ------------------------------------------------------------------------------ export_submodel
def _randomise(model: nn.Module) -> nn.Module:
    """Every BN with its own statistics and affine parameters, in eval mode."""
    gen = torch.Generator().manual_seed(0)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
            m.running_var.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
            with torch.no_grad():
                m.weight.copy_(torch.rand(m.num_features, generator=gen) + 0.5)
                m.bias.copy_(torch.rand(m.num_features, generator=gen) - 0.5)
    return model.eval()


PLAIN = (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.ReLU, nn.Sequential)


@pytest.mark.parametrize("name", ["slimmable_mobilenet_v1", "slimmable_resnet8", "tiny_slimmable"])
def test_every_width_exports_its_own_slices_and_bn(name: str) -> None:
    model = _randomise(kdreg.build_backbone(name, num_classes=10))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    counts = model.count_params()
    for i in range(model.num_submodels):
        net = model.export_submodel(i)
        assert not net.training
        assert sum(p.numel() for p in net.parameters()) == counts[i]
        inner = [m for m in net.modules() if m is not net and len(list(m.children())) == 0]
        assert all(isinstance(m, PLAIN) for m in inner), {type(m).__name__ for m in inner}
        with torch.no_grad():
            torch.testing.assert_close(net(x), model.forward_submodel(x, i), atol=1e-5, rtol=0)
        own = model.state_dict()
        for key, value in net.state_dict().items():  # a BN's x.weight is the model's x.bn.<i>.weight
            parent, _, leaf = key.rpartition(".")
            source = own.get(f"{parent}.bn.{i}.{leaf}", own.get(key))
            assert source is not None, key
            if source.dim() == 0 or source.shape == value.shape:
                torch.testing.assert_close(value, source)
            else:
                torch.testing.assert_close(value, source[tuple(slice(0, s) for s in value.shape)])


@pytest.mark.parametrize(("name", "options", "heads"), [
    ("tiny_exits", {"exits": 4}, "model.heads."),
    ("msdnet", {"blocks": 3, "base": 1, "step": 1, "channels": 4, "growth_rate": 2}, "model.heads."),
    ("exits", {"trunk": {"name": "resnet8"}}, "heads."),
])
def test_every_exit_exports_everything_up_to_it(name: str, options: dict[str, Any],
                                                heads: str) -> None:
    model = _randomise(kdreg.build_backbone(name, num_classes=10, **options))
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    counts = model.count_params()  # anytime: exit i counts heads 1..i
    exits = len(model.heads)
    for i in range(model.num_submodels):
        net = model.export_submodel(i)
        with torch.no_grad():
            torch.testing.assert_close(net(x), model.forward_submodel(x, i), atol=1e-5, rtol=0)
        assert sum(p.numel() for p in net.parameters()) == counts[i]
        held = {n[len(heads):].split(".")[0] for n, _ in net.named_parameters() if n.startswith(heads)}
        assert held == {str(k) for k in range(min(i + 1, exits))}  # final: every head
    program = torch.export.export(net, (x,))  # unused heads stay in the program
    assert sum(program.state_dict[n].numel() for n in program.graph_signature.parameters) == counts[-1]
    assert counts == sorted(set(counts))


def test_a_plain_network_exports_a_copy_and_its_front() -> None:
    model = _randomise(kdreg.build_backbone("resnet8", num_classes=10))
    net = model.export_submodel(0)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(net(x), model(x)[0])
        model.head.fc.weight.zero_()  # a copy: the model's later changes are not the network's
        assert not torch.equal(net(x), model(x)[0])
    front = model.export_front("layer2")
    with torch.no_grad():
        torch.testing.assert_close(front(x), model.forward_front(x, "layer2"))
    assert sum(p.numel() for p in front.parameters()) == params_depended_on(
        model, lambda x: [model.forward_front(x, "layer2")])[0]


class _TwoWidths(FlexibleBackbone):
    submodel_labels = ("small", "large")
    single_pass = False

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * 32 * 32, 10)

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        return self.fc(x.flatten(1)) * (index + 1)

    def count_params(self) -> list[int]:
        return [30730, 30730]


def test_a_backbone_without_export_submodel_is_a_clear_error() -> None:
    with pytest.raises(ExportError, match="_TwoWidths cannot export one of its 2 sub-models as a "
                                          "standalone network: it does not implement export_submodel"):
        _TwoWidths().export_submodel(0)
