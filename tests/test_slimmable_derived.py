"""``slimmable`` over any trunk: a traced network made slimmable (plugins/backbones/slimmable_derived/)."""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import pytest
import timm
import torch
from torch import Tensor, nn

import kdreg
from kdreg import plugins
from kdreg.backbone import FlexibleBackbone
from kdreg.cli import main
from kdreg.engine.step import LossSettings, backward
from kdreg.errors import OptionError, RecipeError
from kdreg.export import Normalised, standalone, to_program
from kdreg.hookspecs import hookimpl
from kdreg.measure import count_macs
from kdreg_plugins.backbones.cifar_resnet import PoolLinear, StagedBackbone
from kdreg_plugins.backbones.exits import build_exits
from kdreg_plugins.backbones.slimmable import SlimmableMixin, SwitchableBatchNorm2d
from kdreg_plugins.backbones.slimmable_derived import (
    DerivedSlimmable,
    TensorHolder,
    build_slimmable,
)
from kdreg_plugins.backbones.timm_adapter import TimmBackbone, build_timm

ROOT = Path(__file__).resolve().parent.parent
C = 5
SIZE = (32, 32)
WIDTHS = (0.25, 0.5, 0.75, 1.0)

pytestmark = pytest.mark.usefixtures("one_thread")

#: The family table of the README: family -> (timm model, None when it is made slimmable, else
#: (the layer named in the refusal, the reason given)).
FAMILIES: dict[str, tuple[str, tuple[str, str] | None]] = {
    "resnet": ("resnet18", None),
    "resnet-d": ("resnet10t", None),
    "mobilenetv2": ("mobilenetv2_035", None),
    "mobilenetv3": ("mobilenetv3_small_050", None),
    "efficientnet": ("efficientnet_b0", None),
    "regnet": ("regnetx_002", None),
    "convnext": ("convnext_atto", None),
    "repvgg": ("repvgg_a0", None),
}


def family_table() -> str:
    """The README's table, as this test's results make it."""
    lines = ["| family | timm model in the test | made slimmable |", "|---|---|---|"]
    for family, (model, refusal) in FAMILIES.items():
        result = ("yes: every width trained one IPKD-TA-M step" if refusal is None else
                  f"refused: layer `{refusal[0]}` {refusal[1]}")
        lines.append(f"| {family} | `{model}` | {result} |")
    return "\n".join(lines)


_CACHE: dict[str, TimmBackbone] = {}


def timm_trunk(model: str) -> TimmBackbone:
    """A timm backbone built once per test session (random weights, seeded)."""
    if model not in _CACHE:
        torch.manual_seed(0)
        _CACHE[model] = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model=model)
    return _CACHE[model]


def slim(model: str) -> DerivedSlimmable:
    return DerivedSlimmable(timm_trunk(model), WIDTHS, name=model, input_size=SIZE)


def batch(n: int = 2, seed: int = 0) -> Tensor:
    return torch.randn(n, 3, *SIZE, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------ the family table
@pytest.mark.parametrize("family", list(FAMILIES))
def test_family_is_made_slimmable_and_trains_one_ipkd_ta_m_step_or_is_refused(family: str) -> None:
    model_name, refusal = FAMILIES[family]
    torch.manual_seed(0)
    if refusal is not None:
        with pytest.raises(RecipeError) as err:
            kdreg.build_backbone("slimmable", num_classes=C, input_size=SIZE,
                                 trunk={"name": "timm", "model": model_name})
        assert len(err.value.problems) == 1
        message = err.value.problems[0]
        assert f"layer {refusal[0]} {refusal[1]}" in message, message
        assert message.endswith(" @ backbone.trunk") and "\n" not in message
        return
    model = kdreg.build_backbone("slimmable", num_classes=C, input_size=SIZE, widths=list(WIDTHS),
                                 trunk={"name": "timm", "model": model_name})
    assert isinstance(model, DerivedSlimmable)
    assert model.submodel_labels == ("x0.25", "x0.5", "x0.75", "x1.0")
    params, macs = model.count_params(), model.count_macs()
    assert params == sorted(params) and len(set(params)) == 4
    assert macs == sorted(macs) and len(set(macs)) == 4
    graph = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = batch(4), torch.tensor([0, 1, 2, 3])
    model.train()
    out = backward(model, x, y, LossSettings(graph, lam=0.8, tau=1.0, divergence="ce"))
    assert torch.isfinite(out.loss)
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    first = next(n for n, p in model.named_parameters() if p.dim() == 4)
    assert first in changed  # the stem, which every width runs
    norms = [n for n, m in model.named_modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert bool(norms) == (family != "convnext")  # ConvNeXt normalises with LayerNorm
    for i in range(4 if norms else 0):  # every width ran and trained its own BatchNorm
        assert any(n.startswith(f"{name}.bn.{i}.") for n in changed for name in norms), i
    model.eval()
    with torch.no_grad():
        assert all(torch.isfinite(model.forward_submodel(x, i)).all() for i in range(4))


def test_the_readme_family_table_is_this_tests() -> None:
    readme = (ROOT / "README.md").read_text()
    assert family_table() in readme, "README's family table differs from:\n" + family_table()


# ------------------------------------------------------------------------------ correctness
@pytest.mark.parametrize("name", ["resnet10t", "convnext_atto"])
def test_full_width_is_the_trunk_parameters_macs_and_outputs(name: str) -> None:
    trunk = timm_trunk(name)
    model = slim(name)
    assert model.count_params()[-1] == sum(p.numel() for p in trunk.parameters())
    assert model.count_macs()[-1] == trunk.count_macs()[0]
    x = batch()
    model.eval()
    trunk.eval()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 3), trunk(x)[0], rtol=0, atol=0)
    # another network's weights, given to the slimmable model, give that network's outputs
    torch.manual_seed(7)
    other = timm.create_model(name, num_classes=C).eval()
    with torch.no_grad():  # norms and layer scales start as constants: make each entry its own
        for p in other.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    model.load_plain_state_dict({f"net.{k}": v for k, v in other.state_dict().items()})
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 3), other(x), rtol=0, atol=0)


@pytest.mark.parametrize(("index", "width"), [(0, 0.25), (2, 0.75)])
def test_a_narrow_resnet_is_the_plain_timm_resnet_of_its_channels(index: int, width: float) -> None:
    model = slim("resnet10t")
    for i in range(4):  # different BNs per width, as after training
        for bn in (m.bn[i] for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)):
            bn.running_mean.uniform_(-0.5, 0.5)
            bn.running_var.uniform_(0.5, 2.0)
    plain = timm.create_model("resnet10t", num_classes=C, stem_width=int(32 * width),
                              channels=tuple(int(c * width) for c in (64, 128, 256, 512)))
    exported = model.export_submodel(index)
    plain.load_state_dict(exported.graph.state_dict())  # strict: the same layers and shapes
    assert sum(p.numel() for p in plain.parameters()) == model.count_params()[index]
    x = batch()
    for train in (False, True):
        model.train(train)
        plain.train(train)
        with torch.no_grad():
            torch.testing.assert_close(model.forward_submodel(x, index), plain(x))


@pytest.mark.parametrize("name", ["mobilenetv2_035", "mobilenetv3_small_050", "convnext_atto",
                                  "tf_mobilenetv3_small_minimal_100"])
def test_a_narrow_network_is_the_eager_network_with_its_first_channels(name: str) -> None:
    """Depthwise convolutions and squeeze-excitation (MobileNets), LayerNorm and layer scale
    (ConvNeXt), TensorFlow's 'same' padding (timm's Conv2dSame): the width's layers, put into
    timm's own (untraced) network, give its logits."""
    model = slim(name).eval()
    with torch.no_grad():  # norms and layer scales start as constants: make each entry its own
        for p in model.parameters():
            if p.dim() == 1:
                p.uniform_(0.5, 1.5)
    index = 1
    exported = model.export_submodel(index).graph
    # the exported layers hold the first channels of the shared weights, and their own BN
    full = dict(model.net.named_modules())
    for path, layer in exported.named_modules():
        if isinstance(layer, nn.Conv2d):
            w = full[path].weight
            want = w[:layer.out_channels] if layer.groups > 1 else w[:layer.out_channels, :layer.in_channels]
            assert torch.equal(layer.weight, want), path
        elif isinstance(layer, (nn.LayerNorm, TensorHolder)):
            assert torch.equal(layer.weight, full[path].weight[:layer.weight.shape[0]]), path
        elif isinstance(layer, nn.BatchNorm2d) and isinstance(full[path], SwitchableBatchNorm2d):
            assert torch.equal(layer.weight, full[path].bn[index].weight), path
    # timm's own (untraced) forward of the network with those layers in place
    eager = timm.create_model(name, num_classes=C).eval()
    for path, layer in exported.named_modules():
        if isinstance(layer, (nn.Conv2d, nn.BatchNorm2d, nn.Linear, nn.LayerNorm)):
            eager.set_submodule(path, layer)
        elif isinstance(layer, TensorHolder):  # a layer scale: a parameter of its block
            parent, _, attr = path.rpartition(".")
            setattr(eager.get_submodule(parent), attr, layer.weight)
    assert sum(p.numel() for p in eager.parameters()) == model.count_params()[index]
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, index), eager(x))


class _GroupNormTrunk(FlexibleBackbone):
    """A trunk of GroupNorms: 4 groups of 4 channels, and one group of 8 (the LayerNorm-like)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, padding=1)
        self.gn1 = nn.GroupNorm(4, 16)
        self.conv2 = nn.Conv2d(16, 8, 3, stride=2, padding=1)
        self.gn2 = nn.GroupNorm(1, 8)
        self.fc = nn.Linear(8, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        h = torch.relu(self.gn1(self.conv1(x)))
        h = torch.relu(self.gn2(self.conv2(h)))
        return [self.fc(h.mean((2, 3)))]


def test_a_width_too_narrow_names_the_layer_that_limits_the_model() -> None:
    # conv1's 16 channels would have none at 0.05 too, but conv2's 8 decide: 0.125 at least
    with pytest.raises(OptionError) as err:
        build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=_GroupNormTrunk(),
                        widths=[0.05, 1.0])
    assert str(err.value) == ("width 0.05 leaves layer conv2 of trunk _GroupNormTrunk no channel "
                              "(int(8 x 0.05) = 0); the narrowest width this trunk allows is 0.125")
    assert err.value.key == "widths"
    assert build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=_GroupNormTrunk(),
                           widths=[0.125, 1.0]).layer_channels("conv2")[1] == (1, 8)


class _LinearSETrunk(FlexibleBackbone):
    """Squeeze-excitation by linear layers, reshaped with the channel count written out."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.reduce = nn.Linear(16, 4)
        self.expand = nn.Linear(4, 16)
        self.fc = nn.Linear(16, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        h = torch.relu(self.conv(x))
        b = h.shape[0]
        gate = torch.sigmoid(self.expand(torch.relu(self.reduce(h.mean((2, 3)).view(b, 16)))))
        h = h * gate.view(b, 16, 1, 1)
        return [self.fc(h.mean((2, 3)))]


def test_a_reshape_to_a_written_channel_count_follows_the_width() -> None:
    torch.manual_seed(0)
    trunk = _LinearSETrunk()
    model = build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=trunk).eval()
    assert model.layer_channels("reduce") == ((4, 8, 12, 16), (1, 2, 3, 4))  # the ratio kept
    assert model.same_group("expand", "conv")
    plain = model.export_submodel(0).graph
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 0), plain(x))
        h = torch.relu(plain.conv(x))
        gate = torch.sigmoid(plain.expand(torch.relu(plain.reduce(h.mean((2, 3))))))
        torch.testing.assert_close(model.forward_submodel(x, 0), plain.fc((h * gate[..., None, None]).mean((2, 3))))


class _SpatialGateTrunk(FlexibleBackbone):
    """A spatial attention gate (CBAM's): a conv over the channels' mean and maximum."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.bn = nn.BatchNorm2d(16)
        self.gate = nn.Conv2d(2, 1, 3, padding=1)
        self.fc = nn.Linear(16, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        h = torch.relu(self.bn(self.conv(x)))
        pooled = torch.cat([h.mean(1, keepdim=True), h.amax(1, keepdim=True)], dim=1)
        h = h * torch.sigmoid(self.gate(pooled))
        return [self.fc(h.mean((2, 3)))]


def test_a_gate_over_the_channels_keeps_its_channels_whole() -> None:
    torch.manual_seed(0)
    trunk = _SpatialGateTrunk()
    model = build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=trunk).eval()
    assert model.layer_channels("gate") == ((2,) * 4, (1,) * 4)
    assert model.layer_channels("conv")[1] == (4, 8, 12, 16)
    plain = model.export_submodel(1).graph
    eager = copy.deepcopy(trunk).eval()
    for name in ("conv", "bn", "gate", "fc"):
        setattr(eager, name, plain.get_submodule(name))
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 1), eager(x)[0])


def test_group_norm_keeps_its_group_size_or_its_single_group() -> None:
    torch.manual_seed(0)
    trunk = _GroupNormTrunk()
    for gn in (trunk.gn1, trunk.gn2):
        nn.init.normal_(gn.weight)
        nn.init.normal_(gn.bias)
    model = build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=trunk,
                            widths=[0.3, 0.5, 1.0]).eval()
    assert model.layer_channels("gn1")[1] == (4, 8, 16)  # int(4.8) = 4: one whole group of 4
    assert model.layer_channels("gn2")[1] == (2, 4, 8)
    plain = model.export_submodel(1).graph
    assert (plain.gn1.num_groups, plain.gn1.num_channels) == (2, 8)
    assert (plain.gn2.num_groups, plain.gn2.num_channels) == (1, 4)
    eager = copy.deepcopy(trunk).eval()
    for name in ("conv1", "gn1", "conv2", "gn2", "fc"):
        setattr(eager, name, plain.get_submodule(name))
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 1), eager(x)[0])


def test_residual_additions_share_a_slice_depthwise_follows_and_gates_keep_their_ratio() -> None:
    resnet = slim("resnet10t")
    assert resnet.same_group("layer1.0.conv2", "conv1.6")  # identity shortcut
    assert resnet.same_group("layer2.0.conv2", "layer2.0.downsample.1")  # projection shortcut
    assert not resnet.same_group("layer1.0.conv1", "layer1.0.conv2")
    assert resnet.layer_channels("fc") == ((128, 256, 384, 512), (C,) * 4)  # logits whole
    assert resnet.layer_channels("conv1.0")[0] == (3,) * 4  # the image whole
    v2 = slim("mobilenetv2_035")
    assert v2.same_group("blocks.2.0.conv_pwl", "blocks.2.1.conv_pwl")
    dw_in, dw_out = v2.layer_channels("blocks.2.0.conv_dw")
    assert dw_in == dw_out == v2.layer_channels("blocks.2.0.conv_pw")[1]
    v3 = slim("mobilenetv3_small_050")
    assert v3.same_group("blocks.0.0.se.conv_expand", "blocks.0.0.conv_dw")  # the gate's product
    reduce = v3.net.get_submodule("blocks.0.0.se.conv_reduce")
    assert v3.layer_channels("blocks.0.0.se.conv_reduce")[1] == tuple(
        int(reduce.out_channels * w) for w in WIDTHS)
    regnet = slim("regnetx_002")  # grouped 3x3 convs of 8 channels per group keep whole groups
    conv = regnet.net.get_submodule("s1.b1.conv2.conv")
    assert conv.group_width == 8 and all(c % 8 == 0 for c in regnet.layer_channels("s1.b1.conv2.conv")[0])


def test_each_width_has_its_own_batch_norm() -> None:
    model = slim("resnet10t").train()
    norms = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    stats = [[bn.running_mean.clone() for bn in m.bn] for m in norms]
    with torch.no_grad():
        model.forward_submodel(batch(), 1)
    for m, before in zip(norms, stats):
        assert len({id(bn) for bn in m.bn}) == 4
        assert [not torch.equal(bn.running_mean, b) for bn, b in zip(m.bn, before)] == [
            False, True, False, False]


def test_split_points_work_per_width_and_for_exits() -> None:
    trunk = timm_trunk("resnet10t").eval()
    model = slim("resnet10t").eval()
    assert model.split_points() == trunk.split_points()
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_front(x, "layer2"), trunk.forward_front(x, "layer2"))
        for i, width in enumerate(WIDTHS):
            front = model.forward_segment(x, None, "layer2", i)
            assert front.shape[1] == int(128 * width)
            back = model.forward_segment(front, "layer2", None, i)
            torch.testing.assert_close(back, model.forward_submodel(x, i))
    exits = build_exits(num_classes=C, in_chans=3, input_size=SIZE, trunk=model, points=["layer2"])
    with torch.no_grad():
        assert [tuple(o.shape) for o in exits(x)] == [(2, C), (2, C)]
    # a copy (as the engine copies an earlier stage) cuts its own graph, on its own weights
    twin = copy.deepcopy(model)
    with torch.no_grad():
        torch.testing.assert_close(twin.forward_front(x, "layer2"), model.forward_front(x, "layer2"))
        twin.net.get_submodule("conv1.0").weight.mul_(2)
        assert not torch.equal(twin.forward_front(x, "layer2"), model.forward_front(x, "layer2"))
        torch.testing.assert_close(model.forward_front(x, "layer2"), trunk.forward_front(x, "layer2"))


def test_dropout_follows_the_models_mode_not_the_mode_it_was_traced_in() -> None:
    torch.manual_seed(0)
    trunk = build_timm(num_classes=C, in_chans=3, input_size=SIZE, model="resnet10t",
                       model_options={"drop_rate": 0.5})
    model = DerivedSlimmable(trunk, WIDTHS, input_size=SIZE).eval()
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 3), trunk.eval()(x)[0], rtol=0, atol=0)
        model.train()
        assert not torch.equal(model.forward_submodel(x, 0), model.forward_submodel(x, 0))


class _ScaledInput(StagedBackbone):
    """Two stages after a scale the graph reads directly (a buffer, not a layer)."""

    stage_names = ("stem", "body")

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("scale", torch.full((1, 3, 1, 1), 2.0))
        self.stem = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.body = nn.Sequential(nn.Conv2d(16, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU())
        self.head = PoolLinear(16, C)

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        return super().forward_segment(h * self.scale if start is None else h, start, end)


def test_segments_follow_the_model_to_another_device() -> None:
    model = build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=_ScaledInput())
    assert model.split_points() == ("stem", "body")
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_back(model.forward_front(x, "stem"), "stem"),
                                   model.forward_submodel(x, 3))
        model.to("meta")  # the segments cut before read the scale where it was
        assert model.forward_front(x.to("meta"), "stem").device.type == "meta"


def test_builtin_trunks_slice_as_the_hand_written_slimmable_resnets() -> None:
    derived = kdreg.build_backbone("slimmable", num_classes=10, trunk={"name": "resnet20"})
    written = kdreg.build_backbone("slimmable_resnet20", num_classes=10)
    assert derived.count_params() == written.count_params()
    assert derived.count_macs() == written.count_macs()


def test_a_trunk_loaded_after_the_build_reaches_the_slimmable_model() -> None:
    trunk = kdreg.build_backbone("resnet8", num_classes=C)
    model = build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=trunk).eval()
    trained = kdreg.build_backbone("resnet8", num_classes=C).eval()
    trunk.load_state_dict(trained.state_dict())  # as the engine loads an earlier stage's weights
    x = batch()
    with torch.no_grad():
        torch.testing.assert_close(model.forward_submodel(x, 3), trained(x)[0], rtol=0, atol=0)


STAGES = """
name = "stages"
seed = 0
[data]
dataset = "synthetic"
batch_size = 8
val_split = 8
options = { train_size = 32, test_size = 8, num_classes = 5, image_size = 32 }
[[stages]]
name = "teacher"
backbone = "resnet8"
[[stages]]
name = "student"
backbone = { name = "slimmable", trunk = "teacher" }
graph = { name = "ipkd-ta-m" }
"""


def test_a_stage_as_trunk_gives_the_slimmable_model_its_trained_weights() -> None:
    from kdreg.engine.assemble import DataShape, assemble
    from kdreg.recipe import parse_recipe

    teacher, student = assemble(parse_recipe(STAGES), DataShape(C))
    assert isinstance(student.model, DerivedSlimmable)
    with torch.no_grad():  # "trained": other weights than the copy the student was built from
        for p in teacher.model.parameters():
            p.normal_(0, 0.2)
    (stage, twin), = student.copies
    assert stage == "teacher"
    twin.load_state_dict(teacher.model.state_dict())  # what the engine does before training
    x = batch()
    teacher.model.eval()
    student.model.eval()
    with torch.no_grad():
        torch.testing.assert_close(student.model.forward_submodel(x, 3), teacher.model(x)[0])


# ------------------------------------------------------------------------------ refusals
class _Trunk(FlexibleBackbone):
    def __init__(self, body: nn.Module):
        super().__init__()
        self.body = body
        self.fc = nn.Linear(16, C)

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [self.fc(self.body(x).mean((2, 3)))]


class _Shuffle(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        b, c, hh, ww = h.shape
        return h.view(b, 4, c // 4, hh, ww).transpose(1, 2).reshape(b, c, hh, ww)


class _Attention(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        t = h.flatten(2)
        a = torch.softmax(t.transpose(1, 2) @ t, -1)
        return (t @ a).view_as(h)


class _Token(nn.Module):
    """A token whose channels are reversed (one read as it is, as a ViT's, is sliced)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)
        self.token = nn.Parameter(torch.zeros(1, 16, 1, 32))

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        return torch.cat([self.token.flip(1).expand(h.shape[0], -1, -1, -1), h], dim=2)


class _Untraceable(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 16, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv(x)
        if h.sum() > 0:  # depends on the data: fx cannot trace it
            return h
        return -h


@pytest.mark.parametrize(("body", "expected"), [
    (_Shuffle, "layer body reshapes channels together with other dimensions"),
    (_Attention, "layer body multiplies activations as matrices"),
    (_Token, "layer body concatenates the channels' tensors with a tensor of 16 fixed channels"),
    (_Untraceable, "torch.fx cannot trace it"),
])
def test_unsliceable_networks_are_refused_naming_the_layer(body: type[nn.Module], expected: str) -> None:
    with pytest.raises(OptionError) as err:
        build_slimmable(num_classes=C, in_chans=3, input_size=SIZE, trunk=_Trunk(body()))
    assert expected in str(err.value) and err.value.key == "trunk"


# ------------------------------------------------------------------------------ export
def test_one_width_exports_as_a_plain_network() -> None:
    model = slim("mobilenetv3_small_050").eval()
    index = 1
    mean, std = (0.5, 0.5, 0.5), (0.25, 0.25, 0.25)
    net = standalone(model, index, mean, std)  # checked to reproduce the width's logits
    assert not any(isinstance(m, SlimmableMixin) for m in net.modules())
    assert sum(p.numel() for p in net.parameters()) == model.count_params()[index]
    assert count_macs(lambda: net(torch.zeros(1, 3, *SIZE))) == model.count_macs()[index]
    program = to_program(Normalised(net, mean, std).eval(), (3, *SIZE))
    x = torch.rand(3, 3, *SIZE)
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), Normalised(net, mean, std)(x))


# ------------------------------------------------------------------------------ recipes
RECIPE = """
name = "bad"
seed = 0
[data]
dataset = "synthetic"
batch_size = 8
val_split = 8
options = {{ train_size = 32, test_size = 8, num_classes = 4, image_size = 16 }}
[[stages]]
name = "student"
backbone = {backbone}
graph = {{ name = "ipkd-ta-m" }}
"""


class _UntraceablePlugin:
    @hookimpl
    def kdreg_register_backbones(self, register) -> None:  # type: ignore[no-untyped-def]
        register("untraceable_test_net", lambda **_: _Trunk(_Untraceable()), "untraceable")


@pytest.mark.parametrize(("backbone", "expected"), [
    ('{ name = "slimmable", trunk = { name = "resnet8" }, widths = [0.0, 1.0] }',
     "every width must lie in (0, 1], got 0.0 @ recipe.stages.student.backbone.widths"),
    ('{ name = "slimmable", trunk = { name = "resnet8" }, widths = [0.01, 1.0] }',
     "width 0.01 leaves layer stem.0 of trunk resnet8 no channel (int(16 x 0.01) = 0); the "
     "narrowest width this trunk allows is 0.0625 @ recipe.stages.student.backbone.widths"),
    ('{ name = "slimmable", trunk = { name = "untraceable_test_net" } }',
     "trunk untraceable_test_net cannot be made slimmable: torch.fx cannot trace it (TraceError: "
     "symbolically traced variables cannot be used as inputs to control flow) "
     "@ recipe.stages.student.backbone.trunk"),
])
def test_bad_input_is_one_line_with_its_key_and_exit_2(
        backbone: str, expected: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "bad.toml"
    path.write_text(RECIPE.format(backbone=backbone))
    plugins.reset(plugins.make_plugin_manager(extra=[_UntraceablePlugin()]))
    try:
        assert main(["validate", str(path)]) == 2
    finally:
        plugins.reset()
    err = capsys.readouterr().err
    assert err.splitlines() == [f"error: {path}: {expected}"], err


def test_the_shipped_recipe_runs_tiny(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    text = (ROOT / "recipes" / "timm-slimmable-ipkd-ta-m.toml").read_text()
    assert 'trunk = { name = "timm", model = "resnet18" }' in text and 'name = "ipkd-ta-m"' in text
    tiny = re.sub(r"\[data\][^\[]*", '[data]\ndataset = "synthetic"\nbatch_size = 8\nval_split = 8\n'
                  "options = { train_size = 24, test_size = 8, num_classes = 3, image_size = 32 }\n\n",
                  text)
    tiny = re.sub(r"epochs = \d+", "epochs = 1", tiny)
    path = tmp_path / "tiny.toml"
    path.write_text(tiny)
    assert main(["run", str(path), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert all(label in out for label in ("x0.25", "x0.5", "x0.75", "x1.0")), out
    # one width of the trained run as a plain network, through kdreg export's own checks
    net = tmp_path / "x0.5.pt2"
    assert main(["export", str(tmp_path / "run"), "--submodel", "x0.5", "--out", str(net)]) == 0
    info = json.loads(net.with_suffix(".json").read_text())
    results = json.loads((tmp_path / "run" / "results.json").read_text())["stages"][0]
    assert info["label"] == "x0.5" and info["params"] == results["params"][1]
    program = torch.export.load(net).module()
    assert tuple(program(torch.rand(2, 3, *SIZE)).shape) == (2, 3)
