"""kdreg.module_splits on a network that is not timm's: torchvision's ResNet-18 split by module."""

from __future__ import annotations

from collections.abc import Sequence

import pytest
import torch
from torch import Tensor, nn
from torchvision.models import resnet18

from kdreg.backbone import FlexibleBackbone
from kdreg.errors import OptionError
from kdreg.module_splits import ModuleSplits

POINTS = ("layer1", "layer2", "layer3", "layer4")
SIZE = (32, 32)


class Torchvision(FlexibleBackbone):
    """A torchvision classifier as a plain backbone, its split points named by module."""

    def __init__(self, net: nn.Module, points: Sequence[str]):
        super().__init__()
        self.net = net
        self.splits = ModuleSplits(net, points, in_chans=3, input_size=SIZE)

    def forward(self, x: Tensor) -> list[Tensor]:
        return [self.net(x)]

    def split_points(self) -> tuple[str, ...]:
        return self.splits.points

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        return self.splits.forward_segment(h, start, end)

    def forward_stages(self, x: Tensor, points: Sequence[str] | None = None) -> tuple[list[Tensor], Tensor]:
        return self.splits.forward_stages(x, self.ordered_points(points))


@pytest.fixture(scope="module")
def model() -> Torchvision:
    torch.manual_seed(0)
    return Torchvision(resnet18(weights=None, num_classes=10), POINTS).eval()


def hooked(net: nn.Module, x: Tensor) -> tuple[dict[str, Tensor], Tensor]:
    """The outputs of the POINTS modules and the logits of the plain model, by forward hooks."""
    feats: dict[str, Tensor] = {}
    handles = [net.get_submodule(p).register_forward_hook(
        lambda _m, _i, out, p=p: feats.__setitem__(p, out)) for p in POINTS]
    try:
        logits = net(x)
    finally:
        for handle in handles:
            handle.remove()
    return feats, logits


def test_features_and_logits_equal_the_plain_models(model: Torchvision) -> None:
    assert model.split_points() == POINTS and model.splits.rejected == {}
    assert set(model.splits.layouts.values()) == {"NCHW"}
    x = torch.randn(2, 3, *SIZE)
    with torch.no_grad():
        want, logits = hooked(model.net, x)
        assert torch.equal(model(x)[0], logits)
        feats, out = model.forward_stages(x)
        assert torch.equal(out, logits)
        for p, f in zip(POINTS, feats):
            assert torch.equal(f, want[p]), p
            assert torch.equal(model.forward_front(x, p), want[p]), p
            torch.testing.assert_close(model.forward_back(want[p], p), logits)
        torch.testing.assert_close(model.forward_segment(want["layer1"], "layer1", "layer3"),
                                   want["layer3"])
    assert model.feature_shapes() == {"layer1": (64, 8, 8), "layer2": (128, 4, 4),
                                      "layer3": (256, 2, 2), "layer4": (512, 1, 1)}


def test_a_back_segment_skips_the_front(model: Torchvision) -> None:
    ran: list[str] = []  # a skipped module is called (its hooks run) but not its own modules
    handles = [model.net.get_submodule(m).register_forward_hook(lambda *_a, m=m: ran.append(m))
               for m in ("layer1.0.conv1", "layer2.0.conv1", "layer3.0.conv1", "fc")]
    try:
        model.forward_back(torch.randn(2, 128, 4, 4), "layer2")
    finally:
        for handle in handles:
            handle.remove()
    assert ran == ["layer3.0.conv1", "fc"]


def test_bypassed_and_unknown_modules() -> None:
    class Skip(nn.Module):  # the head reads a's output as well: b is not a clean cut
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b, self.head = nn.Conv2d(3, 4, 1), nn.Conv2d(4, 4, 1), nn.Linear(8, 10)

        def forward(self, x: Tensor) -> Tensor:
            a = self.a(x)
            return self.head(torch.cat([a.mean((2, 3)), self.b(a).mean((2, 3))], 1))

    splits = ModuleSplits(Skip(), ["a", "b"], in_chans=3, input_size=SIZE)
    assert splits.points == ("a",)
    assert splits.rejected == {"b": "later layers read activations from before it"}
    with pytest.raises(OptionError, match="no module 'layer9'"):
        ModuleSplits(resnet18(num_classes=10), ["layer1", "layer9"], in_chans=3, input_size=SIZE)
