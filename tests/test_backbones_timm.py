"""The timm adapter: any timm model as a plain backbone with split points, and early exits on it."""

from __future__ import annotations

import pytest
import torch

import kdreg
from kdreg.errors import OptionError, RecipeError
from kdreg_plugins.backbones.exits import build_exits
from kdreg_plugins.backbones.timm_adapter import TimmBackbone, build_timm

C = 5


pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = (32, 32)

# Ten families, smallest variants; every one trained as an early-exit model at 32x32.
FAMILIES = [
    "resnet10t",
    "tinynet_e",  # EfficientNet
    "mobilenetv3_small_050",
    "convnext_atto",
    "regnetx_002",
    "deit_tiny_patch16_224",  # built for 32x32 through img_size
    "densenet121",
    "ghostnet_050",
    "repvgg_a0",
    "mixer_s16_224",  # built for 32x32 through img_size
]


def timm_model(name: str, **options) -> TimmBackbone:  # type: ignore[no-untyped-def]
    return build_timm(num_classes=C, in_chans=3, input_size=SIZE, model=name, **options)


@pytest.mark.parametrize("name", FAMILIES)
def test_exits_on_timm_train_step_and_eval(name: str) -> None:
    torch.manual_seed(0)
    model = kdreg.build_backbone(
        "exits", num_classes=C, trunk={"name": "timm", "model": name}, points=[1, 3]
    )
    assert model.submodel_labels == ("exit1", "exit2", "final")
    assert model.num_submodels == 3
    trunk = model.trunk
    assert isinstance(trunk, TimmBackbone)
    params = model.count_params()
    head_params = [sum(p.numel() for p in h.parameters()) for h in model.heads]
    assert params[0] < params[1] < params[2]
    assert params[2] == sum(p.numel() for p in trunk.parameters()) + sum(head_params)

    graph = kdreg.get_teacher_graph("ipkd-ta-m", model.num_submodels)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    x, y = torch.randn(2, 3, *SIZE), torch.tensor([0, 3])
    model.train()
    logits = model(x)
    loss = kdreg.distillation_loss(logits, y, graph, lam=0.8, tau=1.0)
    assert torch.isfinite(loss)
    opt.zero_grad()
    loss.backward()
    # batch statistics of two samples on 1x1 maps make raw gradients huge at initialisation
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    opt.step()
    changed = {n for n, p in model.named_parameters() if not torch.equal(before[n], p)}
    assert {n for n, _ in model.heads.named_parameters(prefix="heads")} <= changed
    first = next(n for n, p in trunk.named_parameters(prefix="trunk") if p.grad is not None)
    assert first in changed  # the trunk's input side was trained as well
    classifier = trunk.net.get_classifier()
    assert not torch.equal(before[_name_in(model, classifier.weight)], classifier.weight)

    model.eval()
    with torch.no_grad():
        outs = model(x)
        one = model.forward_submodel(x, 0)
    assert [tuple(o.shape) for o in outs] == [(2, C)] * 3
    assert all(torch.isfinite(o).all() for o in outs)
    torch.testing.assert_close(one, outs[0])


def _name_in(model: torch.nn.Module, param: torch.Tensor) -> str:
    return next(n for n, p in model.named_parameters() if p is param)


@pytest.mark.parametrize(
    ("name", "points"),
    [
        ("resnet10t", ("act1", "layer1", "layer2", "layer3", "layer4")),
        ("vit_tiny_patch16_224", tuple(f"blocks.{i}" for i in range(12))),
        ("mobilenetv3_small_050", ("bn1", "blocks.0", "blocks.1", "blocks.3", "blocks.5")),
    ],
)
def test_front_back_equals_forward(name: str, points: tuple[str, ...]) -> None:
    torch.manual_seed(0)
    model = timm_model(name).eval()
    assert model.split_points() == points
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        full = model(x)[0]
        feats, logits = model.forward_stages(x)
        torch.testing.assert_close(logits, full)
        for p, f in zip(points, feats):
            front = model.forward_front(x, p)
            torch.testing.assert_close(front, f)
            torch.testing.assert_close(model.forward_back(front, p), full, atol=1e-5, rtol=1e-4)
        # a middle segment chains with the rest
        mid = model.forward_segment(feats[1], points[1], points[3])
        torch.testing.assert_close(mid, feats[3])


def test_back_segment_skips_the_front_and_carries_gradients() -> None:
    model = timm_model("resnet10t").train()
    calls = []
    model.net.conv1[0].register_forward_hook(lambda *a: calls.append("stem conv"))
    model.net.layer3.register_forward_hook(lambda *a: calls.append("layer3"))
    h = torch.randn(2, 128, 4, 4, requires_grad=True)
    before = model.net.bn1.running_mean.clone()
    out = model.forward_back(h, "layer2")
    out.sum().backward()
    assert calls == ["layer3"]  # the stem did not run on the placeholder input
    assert torch.equal(model.net.bn1.running_mean, before)
    assert h.grad is not None and h.grad.abs().sum() > 0


def test_feature_shapes_resolution_and_layouts() -> None:
    resnet = timm_model("resnet10t")
    assert resnet.feature_shapes() == {
        "act1": (64, 16, 16), "layer1": (64, 8, 8), "layer2": (128, 4, 4),
        "layer3": (256, 2, 2), "layer4": (512, 1, 1),
    }
    vit = timm_model("deit_tiny_patch16_224")
    assert vit.net.patch_embed.img_size == SIZE  # built for the data, not 224
    assert vit.feature_shapes()["blocks.0"] == (5, 192)  # 2x2 patches + the class token


def test_channels_last_stages_are_given_channels_first() -> None:
    swin = timm_model("swin_tiny_patch4_window7_224")
    assert set(swin.layouts.values()) == {"NHWC"}
    assert swin.feature_shapes()["layers.0"] == (96, 8, 8)
    x = torch.randn(2, 3, *SIZE)
    swin.eval()
    with torch.no_grad():
        full = swin(x)[0]
        back = swin.forward_back(swin.forward_front(x, "layers.1"), "layers.1")
    torch.testing.assert_close(back, full, atol=1e-5, rtol=1e-4)


def test_plain_backbone_counts_and_channels() -> None:
    model = kdreg.build_backbone("timm", num_classes=C, in_chans=1, model="resnet10t")
    assert model.submodel_labels == ("full",)
    assert model.net.conv1[0].in_channels == 1
    assert model.count_params() == [sum(p.numel() for p in model.net.parameters())]
    # resnet10t's 4,927,618 parameters at 10 classes, less the 5 fewer outputs and 2 fewer inputs
    assert model.count_params() == [4_927_618 - 5 * 513 - 2 * 24 * 9]
    macs = model.count_macs()
    assert len(macs) == 1 and macs[0] > 0


def test_unknown_model_lists_close_matches() -> None:
    with pytest.raises(OptionError) as err:
        timm_model("resnet1t8")
    assert err.value.key == "model"
    assert "unknown timm model 'resnet1t8'" in str(err.value)
    assert "resnet18" in str(err.value)
    with pytest.raises(RecipeError, match=r"close matches: .*convnext_atto.* @ backbone.model"):
        kdreg.build_backbone("timm", num_classes=C, model="convnext_ato")


def test_too_small_input_is_a_clear_error() -> None:
    with pytest.raises(OptionError) as err:
        timm_model("inception_v3")
    message = str(err.value)
    assert err.value.key == "model"
    assert "does not support input size 32x32" in message
    assert "smallest square input it supports is 75x75" in message


def test_reserved_and_bad_model_options() -> None:
    with pytest.raises(OptionError, match="model_options may not set num_classes") as err:
        timm_model("resnet10t", model_options={"num_classes": 3})
    assert err.value.key == "model_options"
    with pytest.raises(OptionError, match="rejects its options") as err:
        timm_model("resnet10t", model_options={"no_such_option": 1})
    assert err.value.key == "model_options"
    slim = timm_model("resnet10t", model_options={"drop_rate": 0.5})
    assert slim.net.drop_rate == 0.5


def test_pretrained_file_loads_strictly(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    """Every key must fit, but for the classifier of another class count (re-initialised, and the
    console says so; more in test_timm_pretrained.py)."""
    source = timm_model("regnetx_002")
    path = tmp_path / "weights.pth"
    torch.save(source.net.state_dict(), path)
    copy = timm_model("regnetx_002", pretrained_file=str(path))
    for (name, a), b in zip(source.net.state_dict().items(), copy.net.state_dict().values()):
        assert torch.equal(a, b), name

    from safetensors.torch import save_file

    st = tmp_path / "weights.safetensors"
    save_file({k: v.contiguous() for k, v in source.net.state_dict().items()}, str(st))
    again = timm_model("regnetx_002", pretrained_file=str(st))
    assert torch.equal(again.net.stem.conv.weight, source.net.stem.conv.weight)

    other = build_timm(num_classes=C + 1, in_chans=3, input_size=SIZE, model="regnetx_002")
    six = tmp_path / "six.pth"
    torch.save(other.net.state_dict(), six)
    refit = timm_model("regnetx_002", pretrained_file=str(six))
    assert torch.equal(refit.net.stem.conv.weight, other.net.stem.conv.weight)
    assert refit.net.head.fc.weight.shape == (C, 368)
    assert "the classifier head.fc in" in capsys.readouterr().err

    state = source.net.state_dict()
    state["stem.conv.weight"] = state["stem.conv.weight"][:, :, :1]   # misshapen, not adaptable
    state["extra.weight"] = torch.zeros(1)
    del state["stem.bn.weight"]
    wrong = tmp_path / "wrong.pth"
    torch.save(state, wrong)
    with pytest.raises(OptionError) as err:
        timm_model("regnetx_002", pretrained_file=str(wrong))
    assert err.value.key == "pretrained_file"
    assert str(wrong) in str(err.value)
    for what in ("missing keys: stem.bn.weight", "unexpected keys: extra.weight",
                 "stem.conv.weight (32, 3, 1, 3) vs (32, 3, 3, 3)"):
        assert what in str(err.value)
    with pytest.raises(OptionError, match="not found"):
        timm_model("regnetx_002", pretrained_file=str(tmp_path / "missing.pth"))


def test_non_sequential_stages_are_not_split_points() -> None:
    hrnet = timm_model("hrnet_w18_small")
    assert hrnet.split_points() == ()
    assert hrnet.rejected_points == {
        "stem": "timm's feature_info names a module the model lacks",
        "stage1": "timm's feature_info names a module the model lacks",
        "stage2": "its output is not a batched tensor",
        "stage3": "its output is not a batched tensor",
        "stage4": "its output is not a batched tensor",
    }
    with pytest.raises(OptionError, match="names no split points"):
        build_exits(num_classes=C, in_chans=3, input_size=SIZE, trunk=hrnet)


class _Toy(torch.nn.Module):
    """A timm-style network whose classifier also reads stage s1: s2 and s3 are not clean cuts."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.s1 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.s2 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.s3 = torch.nn.Conv2d(4, 4, 3, padding=1)
        self.fc = torch.nn.Linear(8, C)
        self.feature_info = [
            {"module": m, "num_chs": 4, "reduction": 1} for m in ("stem", "s1", "s2", "s3")
        ] + [{"module": "s9", "num_chs": 4, "reduction": 1}]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a = self.s1(self.stem(x))
        b = self.s3(self.s2(a))
        return self.fc(torch.cat([a.mean((2, 3)), b.mean((2, 3))], 1))


def test_inexact_cuts_are_rejected() -> None:
    toy = TimmBackbone(_Toy(), model_name="toy", in_chans=3, input_size=(8, 8))
    assert toy.split_points() == ("stem", "s1")
    assert toy.rejected_points == {
        "s9": "timm's feature_info names a module the model lacks",
        "s2": "later layers read activations from before it",
        "s3": "later layers read activations from before it",
    }
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(toy.forward_back(toy.forward_front(x, "s1"), "s1"), toy(x)[0])
