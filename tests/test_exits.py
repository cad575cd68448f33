"""The ``exits`` wrapper: heads at split points of any trunk, frozen trunks (EKD), counts, errors."""

from __future__ import annotations

import pytest
import torch

import kdreg
from kdreg.errors import OptionError, RecipeError
from kdreg_plugins.backbones.exits import ExitsBackbone, MSDNetConvHead, build_exits

C = 10


pytestmark = pytest.mark.usefixtures("one_thread")


def exits(trunk, **options) -> ExitsBackbone:  # type: ignore[no-untyped-def]
    return build_exits(num_classes=C, in_chans=3, input_size=(32, 32), trunk=trunk, **options)


def test_default_points_labels_and_single_pass() -> None:
    model = kdreg.build_backbone("exits", num_classes=C, trunk={"name": "resnet8"})
    assert isinstance(model, ExitsBackbone)
    assert model.points == ("stem", "layer1", "layer2")  # every split point but the last
    assert model.submodel_labels == ("exit1", "exit2", "exit3", "final")
    assert model.single_pass
    assert model.split_points() == model.trunk.split_points()
    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32)
    model.eval()
    with torch.no_grad():
        outs = model(x)
        assert [tuple(o.shape) for o in outs] == [(2, C)] * 4
        for i, out in enumerate(outs):
            torch.testing.assert_close(model.forward_submodel(x, i), out)
        torch.testing.assert_close(outs[-1], model.trunk(x)[-1])
        torch.testing.assert_close(model.forward_front(x, "layer2"), model.trunk.forward_front(x, "layer2"))


def test_ekd_heads_counts_on_resnet8_cifar100() -> None:
    """Three flattened-linear heads after the three stages of ResNet-8 (ekd-thesis, CIFAR-100)."""
    model = kdreg.build_backbone(
        "exits", num_classes=100, trunk={"name": "resnet8"},
        points=["layer1", "layer2", "layer3"], head="flatten_linear",
    )
    heads = [16 * 32 * 32 * 100 + 100, 32 * 16 * 16 * 100 + 100, 64 * 8 * 8 * 100 + 100]
    assert [sum(p.numel() for p in h.parameters()) for h in model.heads] == heads
    trunk = [464 + 4672, 464 + 4672 + 14528, 464 + 4672 + 14528 + 57728]  # stem, layer1..3
    assert model.count_params() == [
        trunk[0] + heads[0],
        trunk[1] + heads[0] + heads[1],
        trunk[2] + sum(heads),
        83_892 + sum(heads),  # ResNet-8 on CIFAR-100 (reference.md) plus every head
    ]


def test_macs_follow_the_anytime_convention() -> None:
    model = exits({"name": "resnet8"}, points=[1, 3])
    macs = model.count_macs()
    full = model.trunk.count_macs()[0]
    head1 = 16 * C  # pooled linear on 16 channels
    head2 = 64 * C
    assert macs[-1] == full + head1 + head2
    assert macs[0] < macs[1] < macs[2]
    layer3_front = macs[1] - head1 - head2
    assert layer3_front == full - 64 * C  # the trunk's back after layer3 is its own pooled Linear


@pytest.mark.parametrize(
    ("head", "params"),
    [
        ("linear", [16 * C + C, 32 * C + C]),
        ("flatten_linear", [16 * 32 * 32 * C + C, 32 * 16 * 16 * C + C]),
        (
            "msdnet_conv",
            [
                16 * 128 * 9 + 256 + 128 * 128 * 9 + 256 + 128 * C + C,
                32 * 128 * 9 + 256 + 128 * 128 * 9 + 256 + 128 * C + C,
            ],
        ),
    ],
)
def test_head_variants(head: str, params: list[int]) -> None:
    model = exits({"name": "resnet8"}, points=["layer1", "layer2"], head=head)
    assert [sum(p.numel() for p in h.parameters()) for h in model.heads] == params
    outs = model(torch.randn(2, 3, 32, 32))
    assert [tuple(o.shape) for o in outs] == [(2, C)] * 3


def test_msdnet_head_strides_follow_the_map_size() -> None:
    def strides(shape):  # type: ignore[no-untyped-def]
        head = MSDNetConvHead(shape, C)
        return [m.stride[0] for m in head.features if isinstance(m, torch.nn.Conv2d)]

    assert strides((64, 8, 8)) == [2, 2]  # MSDNet's CIFAR exit: 8 -> 4 -> 2, then pooled
    assert strides((64, 4, 4)) == [2, 1]
    assert strides((64, 2, 2)) == [1, 1]
    assert strides((64, 1, 1)) == [1, 1]
    out = MSDNetConvHead((64, 1, 1), C).eval()(torch.randn(1, 64, 1, 1))
    assert out.shape == (1, C)


def test_token_features_on_a_vit_trunk() -> None:
    trunk = {"name": "timm", "model": "vit_tiny_patch16_224"}
    model = exits(trunk, points=["blocks.2", "blocks.5"])
    assert model.heads[0].fc.in_features == 192  # pooled over the 5 tokens
    flat = exits(trunk, points=[2], head="flatten_linear", include_final=False)
    assert flat.heads[0].fc.in_features == 5 * 192
    assert flat.submodel_labels == ("exit1",)
    assert [tuple(o.shape) for o in flat(torch.randn(2, 3, 32, 32))] == [(2, C)]
    with pytest.raises(OptionError, match=r"'msdnet_conv' needs \(C, H, W\) features.*\(5, 192\)"):
        exits(trunk, points=[2], head="msdnet_conv")


def test_freeze_trunk_trains_only_the_heads() -> None:
    torch.manual_seed(0)
    model = exits({"name": "resnet8"}, points=[1, 2, 3], freeze_trunk=True)
    trunk = model.trunk
    assert not any(p.requires_grad for p in trunk.parameters())
    model.train()
    assert not trunk.training and all(not m.training for m in trunk.modules())
    assert model.heads.training
    stats = {n: b.clone() for n, b in trunk.named_buffers()}
    weights = {n: p.clone() for n, p in trunk.named_parameters()}
    graph = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    x, y = torch.randn(4, 3, 32, 32), torch.tensor([0, 1, 2, 3])
    loss = kdreg.distillation_loss(model(x), y, graph, lam=0.8, tau=1.0)
    loss.backward()
    opt.step()
    assert all(p.grad is None for p in trunk.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.heads.parameters())
    for n, b in trunk.named_buffers():
        assert torch.equal(b, stats[n]), n  # BN running statistics untouched
    for n, p in trunk.named_parameters():
        assert torch.equal(p, weights[n]), n
    # the heads see detached features: no graph reaches into the trunk
    assert all(f.requires_grad is False for f in _features(model, x))
    assert all(len(c) == model.num_submodels for c in (model.count_params(), model.count_macs()))


def _features(model: ExitsBackbone, x: torch.Tensor) -> list[torch.Tensor]:
    captured: list[torch.Tensor] = []
    handles = [h.register_forward_pre_hook(lambda _m, i: captured.append(i[0])) for h in model.heads]
    model(x)
    for handle in handles:
        handle.remove()
    return captured


def test_trunk_instance_is_shared_and_unfrozen_trunk_trains() -> None:
    trunk = kdreg.build_backbone("resnet8", num_classes=C)
    model = exits(trunk, points=["layer2"])
    assert model.trunk is trunk
    assert model.submodel_labels == ("exit1", "final")
    outs = model(torch.randn(2, 3, 32, 32))
    sum(o.sum() for o in outs).backward()
    assert trunk.stem[0].weight.grad is not None


def test_bad_points_name_the_valid_range() -> None:
    trunk = {"name": "timm", "model": "resnet10t"}
    with pytest.raises(OptionError) as err:
        exits(trunk, points=[1, 7])
    assert err.value.key == "points"
    assert "stage index 7 out of range 0..4 for trunk timm resnet10t" in str(err.value)
    with pytest.raises(RecipeError, match=r"stage index -1 out of range 0\.\.3 for trunk resnet8.* @ backbone.points"):
        kdreg.build_backbone("exits", num_classes=C, trunk={"name": "resnet8"}, points=[-1])
    with pytest.raises(OptionError, match="unknown split point 'layer9' for trunk resnet8; known: stem, layer1"):
        exits({"name": "resnet8"}, points=["layer9"])
    with pytest.raises(OptionError, match="not in network order"):
        exits({"name": "resnet8"}, points=["layer2", "layer1"])
    with pytest.raises(OptionError, match="twice"):
        exits({"name": "resnet8"}, points=[1, "layer1"])
    with pytest.raises(OptionError, match="empty"):
        exits({"name": "resnet8"}, points=[])


def test_bad_trunks() -> None:
    with pytest.raises(OptionError, match="names a recipe stage") as err:
        exits("teacher")
    assert err.value.key == "trunk"
    with pytest.raises(OptionError, match="'name' key"):
        exits({"model": "resnet18"})
    with pytest.raises(OptionError, match=r"unknown timm model 'resnet1t8'.* @ trunk\.model") as err:
        exits({"name": "timm", "model": "resnet1t8"})
    assert err.value.key == "trunk"
    with pytest.raises(OptionError, match=r"unknown option 'depth'"):
        exits({"name": "resnet8", "depth": 3})
    with pytest.raises(OptionError, match="names no split points"):
        exits(kdreg.FlexibleBackbone())
