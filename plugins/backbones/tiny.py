"""Tiny networks for fast tests and CPU demos: a slimmable conv net and an early-exit conv net.

``tiny_slimmable``: three slimmable 3x3 conv stages (``channels``, 2x, 4x; the last two with
stride 2), each conv - switchable BN - ReLU, global average pooling, a slimmable linear.
Split points ``layer1``..``layer3`` are the stage outputs.

``tiny_exits``: ``exits`` conv stages (3x3 conv - BN - ReLU, stride 2 from the second on, channels
``channels * 2 ** min(k, 3)``), each followed by an exit head (global average pooling + linear).
One forward returns every exit's logits. As for MSDNet's anytime prediction, the parameters and
MACs of exit ``k`` are cumulative: the stages up to ``k`` and every head up to ``k``.
Split points ``layer1``..``layer{exits}`` are the stage outputs (the back part ends at the last exit).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone, segment_range
from kdreg.errors import OptionError
from kdreg.measure import count_macs
from kdreg.pruning import truncated_copy
from kdreg_plugins.backbones.slimmable import (
    DEFAULT_WIDTHS,
    SlimmableBackbone,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
)


def _check_positive(name: str, value: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise OptionError(f"{name} must be a positive integer, got {value!r}", key=name)


class TinySlimmable(SlimmableBackbone):
    """Three slimmable conv stages + switchable BN + pool + slimmable linear."""

    def __init__(
        self,
        num_classes: int,
        widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
        channels: int = 16,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__(widths, in_chans=in_chans, input_size=input_size)
        n = len(self.slot_widths)
        cin = [in_chans] * n
        self.stage_names = ("layer1", "layer2", "layer3")
        for k, name in enumerate(self.stage_names):
            cout = self.channels(channels * 2**k)
            self.add_module(name, nn.Sequential(
                SlimmableConv2d(cin, cout, 3, 1 if k == 0 else 2, 1, bias=False),
                SwitchableBatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ))
            cin = cout
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = SlimmableLinear(cin, [num_classes] * n)
        self.finish_widths()

    def classify(self, x: Tensor) -> Tensor:
        return self.classifier(self.pool(x).flatten(1))



class ExitHead(nn.Module):
    """Global average pooling + linear classifier."""

    def __init__(self, channels: int, num_classes: int):
        super().__init__()
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc(self.pool(x).flatten(1))


class TinyExits(FlexibleBackbone):
    """``exits`` conv stages, each with its own exit head; single pass."""

    single_pass = True

    def __init__(
        self,
        num_classes: int,
        exits: int = 3,
        channels: int = 16,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__()
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))
        self.submodel_labels = tuple(f"exit{k + 1}" for k in range(exits))
        self.stages = nn.ModuleList()
        self.heads = nn.ModuleList()
        cin = in_chans
        for k in range(exits):
            cout = channels * 2 ** min(k, 3)
            self.stages.append(nn.Sequential(
                nn.Conv2d(cin, cout, 3, 1 if k == 0 else 2, 1, bias=False),
                nn.BatchNorm2d(cout),
                nn.ReLU(inplace=True),
            ))
            self.heads.append(ExitHead(cout, num_classes))
            cin = cout

    def forward(self, x: Tensor) -> list[Tensor]:
        return self._run(x, len(self.stages) - 1, every_head=True)

    def forward_submodel(self, x: Tensor, index: int) -> Tensor:
        """Logits of exit ``index``: the stages up to it and its own head, nothing after."""
        return self._run(x, self.check_index(index), every_head=False)[-1]

    def _run(self, x: Tensor, last: int, *, every_head: bool) -> list[Tensor]:
        logits = []
        for k in range(last + 1):
            x = self.stages[k](x)
            if every_head or k == last:
                logits.append(self.heads[k](x))
        return logits

    def split_points(self) -> tuple[str, ...]:
        return tuple(f"layer{k + 1}" for k in range(len(self.stages)))

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        i, j = segment_range(self.split_points(), start, end)
        for stage in self.stages[i:j]:
            h = stage(h)
        return self.heads[-1](h) if end is None else h

    def count_params(self) -> list[int]:
        """Cumulative per exit: stages and heads up to and including exit ``k``."""
        per_exit = [
            sum(p.numel() for p in stage.parameters()) + sum(p.numel() for p in head.parameters())
            for stage, head in zip(self.stages, self.heads)
        ]
        return [sum(per_exit[: k + 1]) for k in range(len(per_exit))]

    def count_macs(self, input_size: Sequence[int] | None = None) -> list[int]:
        """Cumulative per exit, like :meth:`count_params` (every head up to exit ``k``)."""
        return self.probe(lambda x: [count_macs(lambda k=k: self._run(x, k, every_head=True))
                                     for k in range(self.num_submodels)], input_size)

    def export_submodel(self, index: int) -> nn.Module:
        """Exit ``index`` truncated at it: the stages and heads up to it (what
        :meth:`count_params` counts); its forward runs only the exit's own head."""
        index = self.check_index(index)
        return truncated_copy(self, index, lambda _m, x: self._run(x, index, every_head=True))


def build_tiny_slimmable(
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
    channels: int = 16,
) -> TinySlimmable:
    """Tiny slimmable conv net (3 conv stages, switchable BN) for tests and CPU demos."""
    _check_positive("num_classes", num_classes)
    _check_positive("channels", channels)
    return TinySlimmable(num_classes, widths, channels, in_chans=in_chans, input_size=input_size)


def build_tiny_exits(
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    exits: int = 3,
    channels: int = 16,
) -> TinyExits:
    """Tiny early-exit conv net (one head per conv stage, single pass) for tests and CPU demos."""
    _check_positive("num_classes", num_classes)
    _check_positive("exits", exits)
    _check_positive("channels", channels)
    return TinyExits(num_classes, exits, channels, in_chans=in_chans, input_size=input_size)


def register(register: Callable[..., None]) -> None:
    register("tiny_slimmable", build_tiny_slimmable,
             "Tiny slimmable conv net (3 stages, switchable BN) for tests and CPU demos")
    register("tiny_exits", build_tiny_exits,
             "Tiny early-exit conv net (one head per stage) for tests and CPU demos")
