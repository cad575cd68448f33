"""MSDNet for CIFAR: architecture fidelity against kalviny/MSDNet-PyTorch, exits and split points."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import kdreg
from kdreg.backbone import FlexibleBackbone
from kdreg.errors import OptionError, RecipeError
from kdreg.measure import count_macs
from kdreg_plugins.backbones.msdnet import MSDNet, build_msdnet, scale_schedule

#: The reference's cumulative figures per exit on CIFAR-100 (blocks and heads 1..i).
REF_PARAMS_M = [0.43, 0.88, 1.28, 1.70, 2.18, 2.60, 3.07]
REF_MFLOPS = [15.1, 25.5, 37.1, 46.3, 57.3, 67.0, 75.9]
#: Conv + matmul MACs (FlopCounterMode) of this implementation; the reference's counter adds
#: ReLU, pooling and linear-bias ops, which explains the 0.5-1 % gap.
MACS = [14967296, 25259008, 36780544, 45972480, 56933888, 66529280, 75487744]


@pytest.fixture(scope="module")
def cifar100() -> MSDNet:
    torch.manual_seed(0)
    return build_msdnet(num_classes=100)


@pytest.fixture(scope="module")
def small() -> MSDNet:
    torch.manual_seed(0)
    return build_msdnet(num_classes=5).eval()


def test_cumulative_params_match_reference(cifar100: MSDNet) -> None:
    params = cifar100.count_params()
    assert len(params) == 7
    for ours, ref in zip(params, REF_PARAMS_M):
        assert abs(ours / 1e6 - ref) / ref < 0.02, (ours, ref)
    assert params[-1] == 3_067_960
    assert params[-1] == sum(p.numel() for p in cifar100.parameters())


def test_cifar10_total_params() -> None:
    total = build_msdnet(num_classes=10).count_params()[-1]
    assert abs(total / 2.99e6 - 1) < 0.02
    # Seven heads' linears shrink from 128x100+100 to 128x10+10.
    assert total == 3_067_960 - 7 * (128 * 90 + 90)


def _layer_macs(model: MSDNet) -> dict[str, int]:
    """MACs of every conv and linear layer for one 32x32 image, counted by hand from the shapes
    the layers see (out elements x in channels / groups x kernel area), independently of the
    FLOP counter the implementation uses."""
    macs: dict[str, int] = {}

    def hook(name):  # type: ignore[no-untyped-def]
        def count(module, args, out):  # type: ignore[no-untyped-def]
            if isinstance(module, torch.nn.Conv2d):
                k = module.kernel_size[0] * module.kernel_size[1]
                n = out[0].numel() * (module.in_channels // module.groups) * k
            else:
                n = module.in_features * module.out_features
            macs[name] = macs.get(name, 0) + n
        return count

    handles = [m.register_forward_hook(hook(n)) for n, m in model.named_modules()
               if isinstance(m, torch.nn.Conv2d | torch.nn.Linear)]
    with torch.no_grad():
        model.eval()(torch.zeros(1, 3, 32, 32))
    for h in handles:
        h.remove()
    return macs


def test_macs_per_exit_match_reference(cifar100: MSDNet) -> None:
    macs = cifar100.count_macs()
    layers = _layer_macs(cifar100)
    by_hand = [sum(n for name, n in layers.items()
                   if name.split(".")[0] in ("blocks", "heads") and int(name.split(".")[1]) <= i)
               for i in range(7)]
    assert macs == by_hand == MACS
    assert all(a < b for a, b in zip(macs, macs[1:]))
    # the reference also counts ReLU, pooling and bias ops: ours are 0.5-1.5 % below, never above
    for ours, ref in zip(macs, REF_MFLOPS):
        assert 0.0 < (ref - ours / 1e6) / ref < 0.015, (ours, ref)
    # Exit i alone (forward_submodel) skips heads 1..i-1, so it costs less from exit 2 on.
    alone = cifar100.count_exit_macs()
    assert alone[0] == macs[0]
    assert all(a < m for a, m in zip(alone[1:], macs[1:]))


def test_mac_table_agrees_with_running_each_submodel() -> None:
    model = build_msdnet(num_classes=10, blocks=3, channels=8, growth_rate=4)
    assert model.count_exit_macs() == FlexibleBackbone.count_macs(model)
    macs = model.count_macs()
    assert macs[-1] == count_macs(lambda: model(torch.zeros(1, 3, 32, 32)))


def test_scale_schedule_prunes_max_with_transitions() -> None:
    sched = scale_schedule(16)
    assert [o for _, o in sched] == [3] * 6 + [2] * 6 + [1] * 4
    assert [n for n, (i, o) in enumerate(sched, 1) if i > o] == [7, 13]


def test_forward_returns_every_exit(small: MSDNet) -> None:
    assert small.submodel_labels == tuple(f"exit{i}" for i in range(1, 8))
    assert small.single_pass and small.num_submodels == 7
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = small(x)
    assert len(out) == 7
    assert all(o.shape == (2, 5) for o in out)
    assert not torch.allclose(out[0], out[-1])


def test_forward_submodel_equals_forward(small: MSDNet) -> None:
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        out = small(x)
        for i in range(7):
            torch.testing.assert_close(small.forward_submodel(x, i), out[i])
    with pytest.raises(IndexError):
        small.forward_submodel(x, 7)


def test_exit1_gradient_reaches_first_layer_only_through_block1() -> None:
    torch.manual_seed(0)
    model = build_msdnet(num_classes=5).train()
    x = torch.randn(2, 3, 32, 32)
    loss = F.cross_entropy(model.forward_submodel(x, 0), torch.tensor([1, 3]))
    loss.backward()
    first_conv = model.blocks[0][0].convs[0][0].weight
    assert first_conv.grad is not None and first_conv.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.blocks[1].parameters())
    assert all(p.grad is None for p in model.heads[1].parameters())


def test_front_back_composition_equals_last_exit(small: MSDNet) -> None:
    x = torch.randn(2, 3, 32, 32)
    assert small.split_points() == tuple(f"block{i}" for i in range(1, 8))
    with torch.no_grad():
        final = small(x)[-1]
        stages, logits = small.forward_stages(x)
        torch.testing.assert_close(logits, final)
        assert [len(f) for f in stages] == [3, 3, 2, 2, 2, 1, 1]
        for j, split in enumerate(small.split_points()):
            # Every split: back from the forward_stages features; a few: the front on its own.
            torch.testing.assert_close(small.forward_back(stages[j], split), final)
            if split in ("block1", "block3", "block7"):
                front = small.forward_front(x, split)
                assert isinstance(front, list) and len(front) == len(stages[j])
                for a, b in zip(front, stages[j]):
                    torch.testing.assert_close(a, b)
    with pytest.raises(OptionError, match="unknown split point"):
        small.forward_front(x, "layer1")
    with pytest.raises(OptionError, match="does not come before"):
        small.forward_segment(x, "block3", "block2")


def test_feature_shapes(small: MSDNet) -> None:
    scales = small.scale_shapes()
    assert scales["block1"] == [(40, 32, 32), (80, 16, 16), (160, 8, 8)]
    assert scales["block3"] == [(70, 16, 16), (140, 8, 8)]
    assert scales["block7"] == [(200, 8, 8)]
    assert small.feature_shapes()["block5"] == (236, 8, 8)
    assert not small.training


def test_options_change_the_network() -> None:
    model = build_msdnet(num_classes=4, blocks=3, growth_rate=4, step=1, base=2, channels=8)
    assert model.submodel_labels == ("exit1", "exit2", "exit3")
    assert model.steps == [2, 1, 1]
    out = model(torch.randn(2, 3, 32, 32))
    assert [o.shape for o in out] == [(2, 4)] * 3
    linear = build_msdnet(num_classes=4, blocks=4, step_mode="linear")
    assert linear.steps == [4, 3, 5, 7]
    narrow = build_msdnet(num_classes=4, reduction=0.0)
    assert narrow.count_params()[-1] > build_msdnet(num_classes=4).count_params()[-1]
    plain = build_msdnet(num_classes=4, bottleneck=False)
    assert plain.count_params() != build_msdnet(num_classes=4).count_params()
    gray = build_msdnet(num_classes=3, in_chans=1, input_size=(64, 64), blocks=2)
    assert [o.shape for o in gray(torch.randn(2, 1, 64, 64))] == [(2, 3), (2, 3)]


@pytest.mark.parametrize(
    ("options", "key"),
    [
        ({"blocks": 0}, "blocks"),
        ({"growth_rate": 0}, "growth_rate"),
        ({"step": -1}, "step"),
        ({"channels": 0}, "channels"),
        ({"reduction": 1.5}, "reduction"),
        ({"reduction": 0.01}, "reduction"),
        ({"step_mode": "quadratic"}, "step_mode"),
    ],
)
def test_bad_options_name_their_key(options: dict, key: str) -> None:
    with pytest.raises(OptionError) as info:
        build_msdnet(num_classes=10, **options)
    assert info.value.key == key
    assert key in str(info.value)


def test_registered_and_built_through_the_api() -> None:
    model = kdreg.build_backbone("msdnet", num_classes=10, blocks=2)
    assert isinstance(model, MSDNet)
    assert model.num_submodels == 2
    with pytest.raises(RecipeError, match="growth_rate"):
        kdreg.build_backbone("msdnet", num_classes=10, growth_rate=0)
