"""Slimmable layers, slimmable MobileNet-V1 and the tiny test networks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdreg
from kdreg.backbone import FlexibleBackbone
from kdreg.errors import OptionError, RecipeError
from kdreg.registry import get_registry
from kdreg_plugins.backbones.mobilenet_v1 import SlimmableMobileNetV1, build_slimmable_mobilenet_v1
from kdreg_plugins.backbones.slimmable import (
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
    count_params_at,
    no_decay_kind,
    no_decay_kinds,
    set_width_index,
    width_label,
)
from kdreg_plugins.backbones.tiny import TinyExits, TinySlimmable

# weiaicunzai/pytorch-cifar100 MobileNet, CIFAR-100, one network per width multiplier.
REFERENCE_PARAMS_C100 = {0.25: 240_260, 0.5: 872_868, 0.75: 1_897_924, 1.0: 3_315_428}
SIZE = 16  # input resolution of the functional tests (MACs are counted at 32x32)
MOBILENET_BLOCKS = [(64, 1), (128, 2), (128, 1), (256, 2), (256, 1), (512, 2)] + [(512, 1)] * 5 + [
    (1024, 2), (1024, 1)]


def registry_mobilenet(num_classes: int = 100, **options):
    factory = get_registry("backbone").get("slimmable_mobilenet_v1").factory
    return factory(num_classes=num_classes, in_chans=3, input_size=(32, 32), **options)


def calibrated(model: FlexibleBackbone) -> FlexibleBackbone:
    """``model`` in eval mode with every width's BN statistics estimated on random images.

    (With fresh statistics and the He fan-out init, eval-mode logits of a deep net are ~1e-19,
    which would make closeness checks vacuous.)
    """
    model.train()
    with torch.no_grad():
        for i in range(model.num_submodels):
            model.forward_submodel(torch.randn(4, model.in_chans, SIZE, SIZE), i)
    return model.eval()


@pytest.fixture(scope="module")
def mobilenet() -> SlimmableMobileNetV1:
    torch.manual_seed(0)
    return calibrated(registry_mobilenet(num_classes=100))


def analytic_macs(width: float, num_classes: int, size: int = 32) -> int:
    """Conv and linear MACs of the CIFAR MobileNet-V1 at ``width``, written out by hand."""
    c, h = int(32 * width), size
    macs = h * h * 3 * 9 * c
    for out, stride in MOBILENET_BLOCKS:
        out = int(out * width)
        h //= stride
        macs += h * h * 9 * c + h * h * c * out
        c = out
    return macs + c * num_classes


# ------------------------------------------------------------------------ MobileNet-V1 counts
def test_registered_names() -> None:
    names = get_registry("backbone").names()
    assert {"slimmable_mobilenet_v1", "tiny_slimmable", "tiny_exits"} <= set(names)


def test_mobilenet_params_match_reference_cifar100(mobilenet) -> None:
    assert mobilenet.submodel_labels == ("x0.25", "x0.5", "x0.75", "x1.0")
    assert mobilenet.count_params() == [240_260, 872_868, 1_897_924, 3_315_428]
    assert mobilenet.single_pass is False and mobilenet.num_submodels == 4


@pytest.mark.parametrize("width", [0.25, 0.5, 0.75, 1.0])
def test_single_width_network_is_the_reference_network(width: float) -> None:
    plain = build_slimmable_mobilenet_v1(num_classes=100, widths=[width])
    total = sum(p.numel() for p in plain.parameters())
    assert total == plain.count_params()[0] == REFERENCE_PARAMS_C100[width]


def test_mobilenet_params_cifar10_differ_by_the_classifier() -> None:
    model = build_slimmable_mobilenet_v1(num_classes=10)
    expected = [REFERENCE_PARAMS_C100[w] - 90 * (int(1024 * w) + 1) for w in (0.25, 0.5, 0.75, 1.0)]
    assert model.count_params() == expected == [217_130, 826_698, 1_828_714, 3_223_178]


def test_mobilenet_macs(mobilenet) -> None:
    macs = mobilenet.count_macs()
    assert macs == [analytic_macs(w, 100) for w in (0.25, 0.5, 0.75, 1.0)]
    assert abs(macs[-1] - 46.5e6) / 46.5e6 < 0.01
    assert macs == sorted(macs) and macs[0] < macs[1]


def test_build_backbone_api_and_custom_widths() -> None:
    model = kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=10, widths=[0.3, 1])
    assert model.submodel_labels == ("x0.3", "x1.0")
    assert model.count_params()[1] == 3_223_178
    stem = model.stem[0][0]
    assert stem.out_list == (9, 32) and stem.in_list == (3, 3)
    assert [width_label(w) for w in (0.25, 0.5, 1.0, 1)] == ["x0.25", "x0.5", "x1.0", "x1.0"]


def test_in_chans() -> None:
    model = build_slimmable_mobilenet_v1(num_classes=5, in_chans=1, widths=[0.25, 1.0])
    out = model(torch.randn(2, 1, SIZE, SIZE))
    assert [tuple(o.shape) for o in out] == [(2, 5), (2, 5)]
    assert model.count_params()[1] == REFERENCE_PARAMS_C100[1.0] - 2 * 9 * 32 - 95 * 1025


@pytest.mark.parametrize(
    "widths", [[], [0.5, 0.25], [0.5, 0.5], [0.0, 1.0], [0.5, 1.5], [-0.25, 1.0], ["a"], [True]]
)
def test_bad_widths(widths) -> None:
    with pytest.raises(OptionError) as info:
        build_slimmable_mobilenet_v1(num_classes=10, widths=widths)
    assert info.value.key == "widths"
    with pytest.raises(OptionError) as info:
        TinySlimmable(10, widths)
    assert info.value.key == "widths"


def test_bad_widths_through_public_api() -> None:
    with pytest.raises(RecipeError, match=r"strictly increasing.*@ backbone\.widths"):
        kdreg.build_backbone("slimmable_mobilenet_v1", num_classes=10, widths=[0.75, 0.5])
    with pytest.raises(RecipeError, match=r"backbone\.widths"):
        kdreg.build_backbone("tiny_slimmable", num_classes=10, widths=[0.5, 2.0])


# ------------------------------------------------------------------------ switchable BN
def _bns(model: nn.Module, index: int) -> list[nn.BatchNorm2d]:
    return [m.bn[index] for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]


def test_width_output_depends_only_on_its_own_bn() -> None:
    torch.manual_seed(0)
    model = calibrated(registry_mobilenet(num_classes=10))
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        before = model.forward_submodel(x, 0)
        assert before.abs().mean() > 1e-4
        for i in (1, 2, 3):
            for bn in _bns(model, i):
                bn.weight.mul_(3.0)
                bn.bias.add_(1.0)
                bn.running_mean.add_(2.0)
        assert torch.equal(model.forward_submodel(x, 0), before)
        for bn in _bns(model, 0):
            bn.bias.add_(1.0)
        assert not torch.allclose(model.forward_submodel(x, 0), before)


def test_private_bn_statistics_update_only_for_active_width() -> None:
    torch.manual_seed(0)
    model = TinySlimmable(10, channels=8).train()
    snapshot = {i: [bn.running_mean.clone() for bn in _bns(model, i)] for i in range(4)}
    model.forward_submodel(torch.randn(2, 3, 16, 16), 1)
    for i in range(4):
        changed = [not torch.equal(bn.running_mean, old) for bn, old in zip(_bns(model, i), snapshot[i])]
        tracked = [int(bn.num_batches_tracked) for bn in _bns(model, i)]
        assert changed == [i == 1] * 3
        assert tracked == [int(i == 1)] * 3


# ------------------------------------------------------------------------ weight sharing
def _slice_into(small: nn.Module, big: nn.Module) -> None:
    """Copy the leading slices of ``big``'s tensors into the (same-named) tensors of ``small``."""
    big_state = big.state_dict()
    with torch.no_grad():
        for name, tensor in small.state_dict().items():
            source = big_state[name]
            if tensor.ndim == 0:
                tensor.copy_(source)
            else:
                tensor.copy_(source[tuple(slice(0, s) for s in tensor.shape)])


def test_narrow_width_equals_separately_built_network() -> None:
    torch.manual_seed(0)
    model = calibrated(registry_mobilenet(num_classes=10))
    plain = build_slimmable_mobilenet_v1(num_classes=10, widths=[0.25]).eval()
    assert sum(p.numel() for p in plain.parameters()) == model.count_params()[0]
    _slice_into(plain, model)  # weights and width 0's BN statistics
    x = torch.randn(2, 3, SIZE, SIZE)
    with torch.no_grad():
        expected = plain(x)[0]
        assert expected.abs().mean() > 1e-4
        torch.testing.assert_close(model.forward_submodel(x, 0), expected)
        # the full width is a different network
        assert not torch.allclose(model.forward_submodel(x, 3), expected, atol=1e-3)
        # in training mode (batch statistics) too
        model.train()
        plain.train()
        torch.testing.assert_close(model.forward_submodel(x, 0), plain(x)[0])


def test_narrow_width_gradients_only_reach_used_slices(mobilenet) -> None:
    mobilenet.zero_grad(set_to_none=True)
    mobilenet.train()
    mobilenet.forward_submodel(torch.randn(2, 3, SIZE, SIZE), 0).square().sum().backward()
    block = mobilenet.layer3[1]  # a 512 -> 512 block: x0.25 uses 128 channels
    dw, pw = block.depthwise[0], block.pointwise[0]
    assert dw.depthwise and dw.groups == 512
    assert dw.weight.grad[:128].abs().sum() > 0 and dw.weight.grad[128:].abs().sum() == 0
    assert pw.weight.grad[:128, :128].abs().sum() > 0
    assert pw.weight.grad[128:].abs().sum() == 0 and pw.weight.grad[:, 128:].abs().sum() == 0
    assert pw.bias.grad[128:].abs().sum() == 0
    fc = mobilenet.classifier
    assert fc.weight.grad[:, :256].abs().sum() > 0 and fc.weight.grad[:, 256:].abs().sum() == 0
    for i in (1, 2, 3):
        assert all(bn.weight.grad is None for bn in _bns(mobilenet, i))
    assert all(bn.weight.grad.abs().sum() > 0 for bn in _bns(mobilenet, 0))
    mobilenet.zero_grad(set_to_none=True)


def test_slimmable_layers_count_and_switch() -> None:
    conv = SlimmableConv2d([2, 4], [3, 6], 3, padding=1)
    dw = SlimmableConv2d([3, 6], [3, 6], 3, padding=1, depthwise=True, bias=False)
    bn = SwitchableBatchNorm2d([3, 6])
    fc = SlimmableLinear([3, 6], [5, 5])
    net = nn.Sequential(conv, dw, bn, nn.AdaptiveAvgPool2d(1), nn.Flatten(), fc, nn.Linear(5, 2))
    assert [conv.params_at(i) for i in (0, 1)] == [3 * 2 * 9 + 3, 6 * 4 * 9 + 6]
    assert [dw.params_at(i) for i in (0, 1)] == [27, 54]
    assert [bn.params_at(i) for i in (0, 1)] == [6, 12]
    assert [fc.params_at(i) for i in (0, 1)] == [20, 35]
    assert [count_params_at(net, i) for i in (0, 1)] == [57 + 27 + 6 + 20 + 12, 222 + 54 + 12 + 35 + 12]
    set_width_index(net, 0)
    assert net(torch.randn(2, 2, 5, 5)).shape == (2, 2)
    with pytest.raises(ValueError, match="expects 2 input channels"):
        net(torch.randn(2, 4, 5, 5))
    with pytest.raises(IndexError):
        set_width_index(net, 2)


# ------------------------------------------------------------------------ split points
def test_mobilenet_split_points(mobilenet) -> None:
    mobilenet.eval()
    x = torch.randn(2, 3, SIZE, SIZE)
    # channels and resolution (for a 32x32 input) of each stage output
    sizes = {"stem": (64, 32), "layer1": (128, 16), "layer2": (256, 8), "layer3": (512, 4),
             "layer4": (1024, 2)}
    assert mobilenet.split_points() == tuple(sizes)
    with torch.no_grad():
        full = mobilenet(x)[-1]
        assert full.abs().mean() > 1e-4
        for split, (c, r) in sizes.items():
            mobilenet.set_width(0)  # forward_front/back always run the full width
            features = mobilenet.forward_front(x, split)
            assert features.shape == (2, c, r * SIZE // 32, r * SIZE // 32)
            torch.testing.assert_close(mobilenet.forward_back(features, split), full)
    with pytest.raises(OptionError, match="unknown split point 'layer5'"):
        mobilenet.forward_front(x, "layer5")


# ------------------------------------------------------------------------ weight decay kinds
def test_no_decay_kinds_mobilenet(mobilenet) -> None:
    kinds = no_decay_kinds(mobilenet)
    assert len(kinds) == len(list(mobilenet.parameters()))
    decayed = [n for n, k in kinds.items() if k is None]
    assert sorted(decayed) == sorted(
        ["stem.0.0.weight", "classifier.weight"]
        + [n for n in kinds if n.endswith("pointwise.0.weight")]
    )
    assert len(decayed) == 15
    assert sum(k == "depthwise" for k in kinds.values()) == 13
    assert sum(k == "bias" for k in kinds.values()) == 14  # 13 pointwise + classifier
    assert sum(k == "norm" for k in kinds.values()) == 2 * 27 * 4  # 27 BNs, 4 widths
    assert kinds["layer1.0.depthwise.1.bn.2.weight"] == "norm"


def test_no_decay_kind_generic_modules() -> None:
    timm = pytest.importorskip("timm")
    model = timm.create_model("mobilenetv3_small_050", pretrained=False, num_classes=10)
    kinds = no_decay_kinds(model)
    owners = dict(model.named_modules())
    for name, kind in kinds.items():
        owner_name, _, pname = name.rpartition(".")
        owner = owners[owner_name]
        if isinstance(owner, nn.BatchNorm2d):
            assert kind == "norm", name
        elif pname == "bias":
            assert kind == "bias", name
        elif isinstance(owner, nn.Conv2d) and owner.groups == owner.in_channels > 1:
            assert kind == "depthwise", name
        else:
            assert kind is None, name
    assert sum(k == "depthwise" for k in kinds.values()) == 11
    assert no_decay_kind(nn.LayerNorm(4), "weight") == "norm"
    assert no_decay_kind(nn.GroupNorm(2, 4), "bias") == "norm"
    assert no_decay_kind(nn.Conv2d(4, 8, 3, groups=2), "weight") is None
    assert no_decay_kind(nn.Conv2d(4, 8, 3, groups=4), "weight") == "depthwise"
    assert no_decay_kind(nn.Linear(4, 8), "bias") == "bias"

    class Scale(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.gamma = nn.Parameter(torch.ones(4))

    assert no_decay_kind(Scale(), "gamma") == "other"


# ------------------------------------------------------------------------ tiny networks
def test_tiny_slimmable() -> None:
    model = kdreg.build_backbone("tiny_slimmable", num_classes=10, channels=8)
    assert isinstance(model, TinySlimmable)
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert [tuple(o.shape) for o in out] == [(2, 10)] * 4
    sum(o.sum() for o in out).backward()
    # widths 0.25/0.5/0.75/1.0 of 8, 16, 32 channels, no conv bias; BN 2 per channel; fc 10 classes
    expected = []
    for c1, c2, c3 in [(2, 4, 8), (4, 8, 16), (6, 12, 24), (8, 16, 32)]:
        expected.append(3 * c1 * 9 + c1 * c2 * 9 + c2 * c3 * 9 + 2 * (c1 + c2 + c3) + c3 * 10 + 10)
    assert model.count_params() == expected
    assert model.split_points() == ("layer1", "layer2", "layer3")
    with pytest.raises(RecipeError, match=r"backbone\.channels"):
        kdreg.build_backbone("tiny_slimmable", num_classes=10, channels=0)


def test_tiny_exits() -> None:
    torch.manual_seed(0)
    model = kdreg.build_backbone("tiny_exits", num_classes=7, exits=4, channels=4)
    assert isinstance(model, TinyExits) and model.single_pass
    assert model.submodel_labels == ("exit1", "exit2", "exit3", "exit4")
    x = torch.randn(2, 3, SIZE, SIZE)
    out = model(x)
    assert len(out) == 4 and all(o.shape == (2, 7) for o in out)
    params = model.count_params()
    assert all(a < b for a, b in zip(params, params[1:]))
    assert params[-1] == sum(p.numel() for p in model.parameters())
    assert params[0] == 3 * 4 * 9 + 2 * 4 + 4 * 7 + 7
    macs = model.count_macs()
    assert all(a < b for a, b in zip(macs, macs[1:]))
    assert macs[0] == 32 * 32 * 27 * 4 + 4 * 7
    model.eval()
    called: list[int] = []
    for k, stage in enumerate(model.stages):
        stage.register_forward_hook(lambda *_, k=k: called.append(k))
    with torch.no_grad():
        full = model(x)
        called.clear()
        torch.testing.assert_close(model.forward_submodel(x, 1), full[1])
    assert called == [0, 1]
    with torch.no_grad():
        features = model.forward_front(x, "layer2")
        torch.testing.assert_close(model.forward_back(features, "layer2"), full[-1])
    with pytest.raises(RecipeError, match=r"backbone\.exits"):
        kdreg.build_backbone("tiny_exits", num_classes=10, exits=0)


def test_tiny_exits_default_options() -> None:
    model = get_registry("backbone").get("tiny_exits").factory(
        num_classes=10, in_chans=3, input_size=(32, 32))
    assert model.num_submodels == 3
    out = model(torch.randn(2, 3, SIZE, SIZE))
    assert len(out) == 3
    sum(o.sum() for o in out).backward()
    assert all(p.grad is not None for p in model.parameters())
