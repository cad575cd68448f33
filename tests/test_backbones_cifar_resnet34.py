"""CIFAR ResNet-18 / ResNet-34 (the EKD thesis's "Res18" and "Res34"): counts, shapes, split points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import kdreg
from kdreg import registry

NAMES = ["resnet18_cifar", "resnet34_cifar"]
BLOCKS = {"resnet18_cifar": (2, 2, 2, 2), "resnet34_cifar": (3, 4, 6, 3)}

# Counted by hand (cifar_params below) from the layout of the EKD thesis's code,
# aryanasadianuoit/Distilling-Knowledge-via-Intermediate-Classifiers @ 9bddcd9,
# models_repo/massive_resnets.py (ResNet18 / ResNet34): conv3x3(3, 64) + BN stem, BasicBlocks with
# 1x1 conv + BN shortcuts where the shape changes, Linear(512, C). The thesis's ratios (Table 5.3:
# Res34/Res8 266.50, Res34/Res20 76.14) match 21.32 M over counts rounded to 0.01 M (0.08 M, 0.28 M).
COUNTS = {
    "resnet18_cifar": (11_173_962, 11_220_132),
    "resnet34_cifar": (21_282_122, 21_328_292),
}


def build(name: str, num_classes: int = 10) -> kdreg.FlexibleBackbone:
    return kdreg.build_backbone(name, num_classes=num_classes)


def cifar_params(blocks: tuple[int, ...], classes: int) -> int:
    """Conv/BN/linear parameters: 3x3 stem, basic blocks at 64..512 channels, Linear(512, C)."""
    p = 3 * 64 * 9 + 2 * 64
    cin = 64
    for n, cout in zip(blocks, (64, 128, 256, 512)):
        for b in range(n):
            i = cin if b == 0 else cout
            p += 9 * i * cout + 2 * cout + 9 * cout * cout + 2 * cout
            if i != cout:
                p += i * cout + 2 * cout
        cin = cout
    return p + 512 * classes + classes


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("classes", [10, 100])
def test_parameter_counts(name: str, classes: int) -> None:
    expected = COUNTS[name][0 if classes == 10 else 1]
    assert cifar_params(BLOCKS[name], classes) == expected
    model = build(name, classes)
    assert model.count_params() == [expected]
    assert sum(p.numel() for p in model.parameters()) == expected
    assert model.submodel_labels == ("full",) and model.single_pass


def test_layout() -> None:
    model = build("resnet34_cifar", 100)
    assert [len(getattr(model, f"layer{k}")) for k in (1, 2, 3, 4)] == [3, 4, 6, 3]
    stem_conv = model.stem[0]
    assert isinstance(stem_conv, nn.Conv2d)
    assert (stem_conv.kernel_size, stem_conv.stride, stem_conv.out_channels) == ((3, 3), (1, 1), 64)
    assert not any(isinstance(m, nn.MaxPool2d) for m in model.modules())
    assert model.head.fc.in_features == 512 and model.head.fc.out_features == 100
    # projection shortcuts only at the first block of stages 2-4
    with_shortcut = [name for name, m in model.named_modules()
                     if getattr(m, "shortcut", None) is not None]
    assert with_shortcut == ["layer2.0", "layer3.0", "layer4.0"]


@pytest.mark.parametrize("name", NAMES)
def test_split_points_reproduce_the_forward(name: str) -> None:
    torch.manual_seed(0)
    model = build(name, 7)
    x = torch.randn(2, 3, 32, 32)
    model.train()
    train_out = model(x)  # updates BN statistics so eval mode is not an identity
    assert len(train_out) == 1 and train_out[0].shape == (2, 7)
    model.eval()
    with torch.no_grad():
        full = model(x)[-1]
        feats, logits = model.forward_stages(x)
        assert torch.allclose(logits, full, atol=1e-5)
        assert len(feats) == len(model.split_points()) == 5
        for point, feat in zip(model.split_points(), feats):
            front = model.forward_front(x, point)
            assert torch.allclose(front, feat, atol=1e-5)
            assert torch.allclose(model.forward_back(front, point), full, atol=1e-5)


@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes(name: str) -> None:
    model = build(name, 10)
    points = ("stem", "layer1", "layer2", "layer3", "layer4")
    shapes = [(64, 32, 32), (64, 32, 32), (128, 16, 16), (256, 8, 8), (512, 4, 4)]
    assert model.split_points() == points
    assert model.feature_shapes() == dict(zip(points, shapes))


def test_registered_in_the_backbone_list() -> None:
    assert {"resnet18_cifar", "resnet34_cifar"} <= set(registry.list_backbones())
