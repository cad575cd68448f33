"""CIFAR ResNets, WRNs, VGGs and slimmable ResNets: parameter counts, shapes, split points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdreg
from kdreg.errors import OptionError, RecipeError
from kdreg_plugins.backbones.slimmable import SwitchableBatchNorm2d

# reference.md, "CIFAR ResNets and WRNs": (name, CIFAR-10, CIFAR-100)
REFERENCE_COUNTS = [
    ("resnet8", 78_042, 83_892),
    ("resnet20", 272_474, 278_324),
    ("resnet56", 855_770, 861_620),
    ("resnet110", 1_730_714, 1_736_564),
    ("wrn16_1", 175_066, 180_916),
    ("wrn16_2", 691_674, 703_284),
    ("wrn40_1", 563_930, 569_780),
    ("wrn40_2", 2_243_546, 2_255_156),
    ("wrn28_2", 1_467_610, 1_479_220),
]

DEPTHS = [8, 14, 20, 32, 44, 56, 110]

# The backbones of RepDistiller's / mdistiller's CIFAR-100 table (CRD paper Table 1; DKD's
# table): parameters for 100 classes, counted by hand from HobbitLong/RepDistiller
# models/resnet.py, models/vgg.py and models/wrn.py (mdistiller's mdistiller/models/cifar/ has the
# same layers). Every conv is bias-free but VGG's; every BN holds 2 parameters per channel; the
# classifier is Linear(C, 100), C * 100 + 100.
#   ResNet(depth, num_filters = [f0, f1, f2, f3]): conv1 3x3 3 -> f0 + BN; layer k (planes f_k,
#   n = (depth - 2) / 6 basic blocks, stride 2 in layers 2 and 3): each block 3x3 in -> f_k + BN,
#   3x3 f_k -> f_k + BN; the first block's downsample (1x1 conv + BN) where stride != 1 or
#   in != f_k. resnet20/32/56/110: [16, 16, 32, 64]; resnet8x4/32x4: [32, 64, 128, 256], so
#   layer1's first block downsamples 32 -> 64 at stride 1 too.
#   resnet8x4 = 928 (stem) + 57,728 (layer1: 18,432 + 36,864 + 2,048 conv, 384 BN) + 230,144
#   (layer2) + 919,040 (layer3) + 25,700 (fc) = 1,233,540; resnet32x4 adds 4 blocks per layer,
#   2 * (9 f^2 + 2 f) each: + 295,936 + 1,181,696 + 4,722,688 = 7,433,860.
#   vgg8_bn (configuration "S": one conv per group, 64, 128, 256, 512, 512): each conv
#   9 * in * out + out (bias) + 2 * out (BN): 1,920 + 74,112 + 295,680 + 1,181,184 + 2,360,832
#   + fc 51,300 = 3,965,028. vgg13_bn ("B", two convs per group): 9,462,180.
#   WideResNet(depth, widen_factor k): conv1 3x3 3 -> 16; n = (depth - 4) / 6 pre-activation
#   blocks per stage (BN(in), 3x3 in -> out, BN(out), 3x3 out -> out, a 1x1 convShortcut where
#   in != out) with 16k, 32k, 64k channels; final BN(64k); fc. wrn40_2 2,255,156; wrn16_2 703,284.
REPDISTILLER_CIFAR100 = [
    ("resnet20", 278_324),
    ("resnet32", 472_756),
    ("resnet56", 861_620),
    ("resnet110", 1_736_564),
    ("resnet8x4", 1_233_540),
    ("resnet32x4", 7_433_860),
    ("wrn16_2", 703_284),
    ("wrn40_2", 2_255_156),
    ("vgg8", 3_965_028),
    ("vgg13", 9_462_180),
]
X4 = (32, (64, 128, 256))  # resnet8x4 / resnet32x4: stem and stage channels


def build(name: str, num_classes: int = 10, **options: object) -> kdreg.FlexibleBackbone:
    return kdreg.build_backbone(name, num_classes=num_classes, **options)


def total(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------ hand computations
def resnet_params(depth: int, classes: int, base: int = 16, projection: bool = True) -> int:
    """Conv/BN/linear parameters of a CIFAR ResNet with ``base``/2``base``/4``base`` channels."""
    n = (depth - 2) // 6
    c = [base, 2 * base, 4 * base]
    p = 3 * c[0] * 9 + 2 * c[0]
    cin = c[0]
    for cout in c:
        for b in range(n):
            i = cin if b == 0 else cout
            p += 9 * i * cout + 2 * cout + 9 * cout * cout + 2 * cout
            if b == 0 and i != cout and projection:
                p += i * cout + 2 * cout
        cin = cout
    return p + cin * classes + classes


def repdistiller_resnet_params(depth: int, filters: list[int], classes: int) -> int:
    """RepDistiller's ResNet(depth, num_filters) layer by layer (its _make_layer's downsample rule)."""
    n = (depth - 2) // 6
    p = 9 * 3 * filters[0] + 2 * filters[0]
    inplanes = filters[0]
    for k, planes in enumerate(filters[1:]):
        stride = 1 if k == 0 else 2
        if stride != 1 or inplanes != planes:
            p += inplanes * planes + 2 * planes
        for b in range(n):
            i = inplanes if b == 0 else planes
            p += 9 * i * planes + 2 * planes + 9 * planes * planes + 2 * planes
        inplanes = planes
    return p + filters[3] * classes + classes


def vgg_params(groups: list[list[int]], classes: int) -> int:
    """3x3 convs with bias and BN, then one linear layer."""
    p, cin = 0, 3
    for group in groups:
        for cout in group:
            p += 9 * cin * cout + cout + 2 * cout
            cin = cout
    return p + cin * classes + classes


def resnet_macs(depth: int, classes: int, stem: int = 16,
                stages: tuple[int, ...] = (16, 32, 64)) -> int:
    """Multiply-accumulates of convs and the classifier for one 32x32 image."""
    n = (depth - 2) // 6
    macs = 3 * stem * 9 * 32 * 32
    cin, side = stem, 32
    for k, cout in enumerate(stages):
        for b in range(n):
            stride = 2 if (k and b == 0) else 1
            side //= stride
            i = cin if b == 0 else cout
            macs += (9 * i * cout + 9 * cout * cout) * side * side
            if i != cout:
                macs += i * cout * side * side
        cin = cout
    return macs + cin * classes


def vgg_macs(groups: list[list[int]], classes: int) -> int:
    """Convs and classifier of a CIFAR VGG on one 32x32 image (pools before groups 2, 3, 4)."""
    macs, cin = 0, 3
    for k, group in enumerate(groups):
        side = 32 >> min(k, 3)
        for cout in group:
            macs += 9 * cin * cout * side * side
            cin = cout
    return macs + cin * classes


# ------------------------------------------------------------------------------ parameter counts
@pytest.mark.parametrize(("name", "c10", "c100"), REFERENCE_COUNTS)
@pytest.mark.parametrize("classes", [10, 100])
def test_reference_parameter_counts(name: str, c10: int, c100: int, classes: int) -> None:
    model = build(name, classes)
    expected = c10 if classes == 10 else c100
    assert model.count_params() == [expected]
    assert total(model) == expected


@pytest.mark.parametrize(("name", "expected"), REPDISTILLER_CIFAR100)
def test_repdistiller_table_backbones_have_the_reference_counts(name: str, expected: int) -> None:
    model = build(name, 100)
    assert model.count_params() == [expected]
    assert total(model) == expected


def test_repdistiller_resnet_counts_follow_its_layers() -> None:
    assert repdistiller_resnet_params(8, [32, 64, 128, 256], 100) == 1_233_540
    assert repdistiller_resnet_params(32, [32, 64, 128, 256], 100) == 7_433_860
    assert repdistiller_resnet_params(32, [32, 64, 128, 256], 10) == 7_410_730
    for depth in (20, 32, 56, 110):
        assert repdistiller_resnet_params(depth, [16, 16, 32, 64], 100) == resnet_params(depth, 100)
    assert build("resnet8x4", 10).count_params() == [1_210_410]
    assert vgg_params([[64], [128], [256], [512], [512]], 100) == 3_965_028
    assert build("vgg8", 10).count_params() == [3_918_858]


@pytest.mark.parametrize(("classes", "expected"), [(10, 1_166_506), (100, 1_189_636)])
def test_x4_zero_pad_drops_the_three_projections(classes: int, expected: int) -> None:
    # layer1 32 -> 64 (stride 1), layer2 64 -> 128, layer3 128 -> 256: 1x1 convs and their BN
    projections = (32 * 64 + 128) + (64 * 128 + 256) + (128 * 256 + 512)
    assert projections == 43_904
    model = build("resnet8x4", classes, shortcut="zero_pad")
    assert model.count_params() == [expected] == [build("resnet8x4", classes).count_params()[0]
                                                  - projections]
    assert model(torch.randn(2, 3, 32, 32))[0].shape == (2, classes)


@pytest.mark.parametrize("depth", DEPTHS)
def test_every_resnet_depth_matches_hand_count(depth: int) -> None:
    model = build(f"resnet{depth}", 100)
    assert model.count_params() == [resnet_params(depth, 100)]
    assert model.submodel_labels == ("full",) and model.single_pass


@pytest.mark.parametrize(("classes", "expected"), [(10, 269_722), (100, 275_572)])
def test_zero_pad_shortcut_has_2752_fewer_parameters(classes: int, expected: int) -> None:
    model = build("resnet20", classes, shortcut="zero_pad")
    assert model.count_params() == [expected]
    assert build("resnet20", classes).count_params()[0] - expected == 2_752
    assert expected == resnet_params(20, classes, projection=False)


@pytest.mark.parametrize(
    ("name", "groups", "c10", "c100"),
    [
        ("vgg11", [[64], [128], [256, 256], [512, 512], [512, 512]], 9_231_114, 9_277_284),
        ("vgg13", [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], 9_416_010, 9_462_180),
    ],
)
def test_vgg_parameter_counts(name: str, groups: list[list[int]], c10: int, c100: int) -> None:
    assert vgg_params(groups, 10) == c10 and vgg_params(groups, 100) == c100
    assert build(name, 10).count_params() == [c10]
    assert build(name, 100).count_params() == [c100]


def test_wrn46_4_and_generic_wrn() -> None:
    assert build("wrn46_4", 10).count_params() == [10_499_290]
    assert build("wrn", 10, depth=28, widen_factor=2).count_params() == [1_467_610]
    assert build("wrn", 100, depth=40, widen_factor=1).count_params() == [569_780]


def test_bad_options_are_reported_by_key() -> None:
    with pytest.raises(RecipeError, match=r"6n \+ 4.*@ backbone\.depth"):
        build("wrn", 10, depth=27)
    with pytest.raises(RecipeError, match=r"dropout.*@ backbone\.dropout"):
        build("wrn16_1", 10, dropout=1.0)
    with pytest.raises(RecipeError, match=r"'projection', 'zero_pad'.*@ backbone\.shortcut"):
        build("resnet20", 10, shortcut="B")
    with pytest.raises(RecipeError, match=r"unknown option 'widths'"):
        build("resnet20", 10, widths=[0.5, 1.0])


# ------------------------------------------------------------------------------ MACs
def test_resnet_macs() -> None:
    assert build("resnet20", 10).count_macs() == [resnet_macs(20, 10)] == [40_813_184]
    assert build("resnet56", 10).count_macs() == [resnet_macs(56, 10)] == [125_747_840]


def test_repdistiller_x4_and_vgg8_macs() -> None:
    assert build("resnet8x4", 100).count_macs() == [resnet_macs(8, 100, *X4)] == [177_071_104]
    assert build("resnet32x4", 100).count_macs() == [resnet_macs(32, 100, *X4)] == [1_083_040_768]
    assert build("vgg8", 100).count_macs() == [vgg_macs([[64], [128], [256], [512], [512]], 100)] \
        == [96_192_512]
    assert build("vgg13", 100).count_macs() == [vgg_macs(
        [[64, 64], [128, 128], [256, 256], [512, 512], [512, 512]], 100)]


# ------------------------------------------------------------------------------ forward, splits
SPLIT_CASES = [
    ("resnet8", {}),
    ("resnet8", {"shortcut": "zero_pad"}),
    ("wrn16_1", {"dropout": 0.3}),
    ("vgg11", {}),
    ("slimmable_resnet8", {}),
    ("resnet8x4", {}),
    ("resnet8x4", {"shortcut": "zero_pad"}),
    ("vgg8", {}),
]


@pytest.mark.parametrize(("name", "options"), SPLIT_CASES)
def test_split_points_reproduce_the_forward(name: str, options: dict) -> None:
    torch.manual_seed(0)
    model = build(name, 7, **options)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    train_out = model(x)  # updates BN statistics so eval mode is not an identity
    assert len(train_out) == model.num_submodels
    assert all(o.shape == (2, 7) for o in train_out)
    model.eval()
    with torch.no_grad():
        full = model(x)[-1]
        feats, logits = model.forward_stages(x)
        assert torch.allclose(logits, full, atol=1e-5)
        assert len(feats) == len(model.split_points())
        for point, feat in zip(model.split_points(), feats):
            front = model.forward_front(x, point)
            assert torch.allclose(front, feat, atol=1e-5)
            assert torch.allclose(model.forward_back(front, point), full, atol=1e-5)
        # a subset of the points, in order, in one pass
        sub, logits2 = model.forward_stages(x, model.split_points()[1::2])
        assert torch.allclose(sub[0], feats[1], atol=1e-5)
        assert torch.allclose(logits2, full, atol=1e-5)


@pytest.mark.parametrize(
    ("name", "shapes"),
    [
        ("resnet8", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]),
        ("wrn16_2", [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]),
        ("vgg13", [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
        ("vgg8", [(64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4), (512, 4, 4)]),
        ("resnet8x4", [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]),
        ("resnet32x4", [(32, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8)]),
        ("wrn40_2", [(16, 32, 32), (32, 32, 32), (64, 16, 16), (128, 8, 8)]),
        ("slimmable_resnet8", [(16, 32, 32), (16, 32, 32), (32, 16, 16), (64, 8, 8)]),
    ],
)
def test_feature_shapes(name: str, shapes: list[tuple[int, ...]]) -> None:
    model = build(name, 10)
    points = ("layer1", "layer2", "layer3", "layer4", "layer5") if name.startswith("vgg") else (
        "stem", "layer1", "layer2", "layer3")
    assert model.split_points() == points
    assert model.feature_shapes() == dict(zip(points, shapes))


def test_vgg_pools_before_the_last_group_on_64_pixel_inputs() -> None:
    model = kdreg.build_backbone("vgg11", num_classes=5, input_size=(64, 64))
    shapes = model.feature_shapes()
    assert shapes["layer4"] == (512, 8, 8) and shapes["layer5"] == (512, 4, 4)
    assert model(torch.randn(2, 3, 64, 64))[0].shape == (2, 5)


def test_segment_order_and_names_are_checked() -> None:
    model = build("resnet8", 10)
    x = torch.randn(2, 3, 32, 32)
    with pytest.raises(OptionError, match="does not come before"):
        model.forward_segment(model.forward_front(x, "layer2"), "layer2", "layer1")
    with pytest.raises(OptionError, match="unknown split point 'layer4'"):
        model.forward_front(x, "layer4")
    with pytest.raises(OptionError, match="not in network order"):
        model.forward_stages(x, ["layer2", "stem"])


def test_wrn_dropout_acts_in_training_only() -> None:
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model = build("wrn16_1", 10, dropout=0.5).train()
    assert not torch.allclose(model(x)[0], model(x)[0])
    plain = build("wrn16_1", 10).train()
    assert torch.equal(plain(x)[0], plain(x)[0])
    model.eval()
    assert torch.equal(model(x)[0], model(x)[0])


def test_gradients_flow_through_back_into_front_features() -> None:
    model = build("resnet8", 10)
    feats = model.forward_front(torch.randn(2, 3, 32, 32), "layer2").detach().requires_grad_()
    model.forward_back(feats, "layer2").sum().backward()
    assert feats.grad is not None and feats.grad.abs().sum() > 0


# ------------------------------------------------------------------------------ slimmable ResNets
@pytest.mark.parametrize("depth", DEPTHS)
@pytest.mark.parametrize("classes", [10, 100])
def test_slimmable_counts_increase_and_full_width_equals_plain(depth: int, classes: int) -> None:
    model = build(f"slimmable_resnet{depth}", classes)
    counts = model.count_params()
    assert model.submodel_labels == ("x0.25", "x0.5", "x0.75", "x1.0")
    assert not model.single_pass
    assert all(a < b for a, b in zip(counts, counts[1:]))
    assert counts[-1] == build(f"resnet{depth}", classes).count_params()[0]
    assert counts == [resnet_params(depth, classes, base=b) for b in (4, 8, 12, 16)]


def test_slimmable_widths_option_and_macs() -> None:
    model = build("slimmable_resnet20", 10, widths=[0.5, 1.0])
    assert model.submodel_labels == ("x0.5", "x1.0")
    assert model.count_params() == [68_786, 272_474]
    macs = model.count_macs()
    assert macs[1] == 40_813_184 and macs[0] < macs[1] / 3
    with pytest.raises(RecipeError, match="strictly increasing"):
        build("slimmable_resnet20", 10, widths=[1.0, 0.5])


def test_slimmable_forward_per_width() -> None:
    model = build("slimmable_resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        outs = model(x)
        assert [o.shape for o in outs] == [(2, 10)] * 4
        for i, out in enumerate(outs):
            assert torch.allclose(model.forward_submodel(x, i), out, atol=1e-5)
        assert not torch.allclose(outs[0], outs[-1])


def test_narrow_width_leaves_unused_channels_without_gradient() -> None:
    torch.manual_seed(0)
    model = build("slimmable_resnet8", 10).train()
    model.forward_submodel(torch.randn(2, 3, 32, 32), 0).logsumexp(1).sum().backward()
    stem = model.stem[0]
    assert stem.weight.grad[:4].abs().sum() > 0
    assert torch.count_nonzero(stem.weight.grad[4:]) == 0
    conv = model.layer3[0].conv1  # 32 -> 64 channels at full width, 8 -> 16 at x0.25
    assert conv.weight.grad[:16, :8].abs().sum() > 0
    assert torch.count_nonzero(conv.weight.grad[16:]) == 0
    assert torch.count_nonzero(conv.weight.grad[:, 8:]) == 0
    assert model.fc.weight.grad[:, :16].abs().sum() > 0
    assert torch.count_nonzero(model.fc.weight.grad[:, 16:]) == 0
    for m in model.modules():
        if isinstance(m, SwitchableBatchNorm2d):
            assert m.bn[0].weight.grad is not None
            assert all(bn.weight.grad is None for bn in m.bn[1:])


def test_slimmable_split_points_run_the_full_width() -> None:
    model = build("slimmable_resnet8", 10).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        model.set_width(0)
        assert model.forward_front(x, "layer1").shape == (2, 16, 32, 32)
        model.set_width(0)
        front = model.forward_front(x, "layer2")
        model.set_width(0)
        assert torch.allclose(model.forward_back(front, "layer2"), model(x)[-1], atol=1e-5)
