"""Slimmable CIFAR ResNet-(6n+2): a cheap flexible model for CPU experiments.

The layout of :mod:`kdreg_plugins.backbones.cifar_resnet` (16/32/64 channels, basic blocks, a 1x1
conv + BN projection shortcut where the shape changes) built from slimmable layers: width ``w``
runs every conv on its first ``int(c * w)`` channels (the stem's input and the classifier's output
stay whole), every BN is private to its width, all other weights are shared. At width 1.0 the
parameter count equals the plain ResNet's (ResNet-20 on CIFAR-10: 272,474); ``count_params`` lists
each width's own count.

Split points are the plain ResNet's (``stem``, ``layer1``, ``layer2``, ``layer3``) and always run
the full width: :meth:`forward_segment` switches the model to its largest width.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.errors import OptionError
from kdreg_plugins.backbones.cifar_resnet import (
    DEPTHS,
    STAGE_CHANNELS,
    check_num_classes,
    init_weights,
)
from kdreg_plugins.backbones.slimmable import (
    DEFAULT_WIDTHS,
    SlimmableBackbone,
    SlimmableConv2d,
    SlimmableLinear,
    SwitchableBatchNorm2d,
)


class SlimmableBasicBlock(nn.Module):
    """Slimmable conv3x3 - BN - ReLU - conv3x3 - BN, plus the (projection) shortcut, then ReLU."""

    def __init__(self, in_list: Sequence[int], out_list: Sequence[int], stride: int):
        super().__init__()
        self.conv1 = SlimmableConv2d(in_list, out_list, 3, stride, 1, bias=False)
        self.bn1 = SwitchableBatchNorm2d(out_list)
        self.conv2 = SlimmableConv2d(out_list, out_list, 3, 1, 1, bias=False)
        self.bn2 = SwitchableBatchNorm2d(out_list)
        self.shortcut: nn.Module | None = None
        if stride != 1 or max(in_list) != max(out_list):
            self.shortcut = nn.Sequential(
                SlimmableConv2d(in_list, out_list, 1, stride, bias=False),
                SwitchableBatchNorm2d(out_list),
            )

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return F.relu(out + (x if self.shortcut is None else self.shortcut(x)))


class SlimmableCifarResNet(SlimmableBackbone):
    """Slimmable ResNet-``depth`` for CIFAR (``depth = 6n + 2``); sub-models are the widths."""

    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int,
        num_classes: int,
        widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__(widths, in_chans=in_chans, input_size=input_size)
        if depth < 8 or (depth - 2) % 6:
            raise OptionError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}", key="depth")
        self.depth = depth
        n_widths, n = len(self.slot_widths), (depth - 2) // 6
        c0 = self.channels(STAGE_CHANNELS[0])
        self.stem = nn.Sequential(
            SlimmableConv2d([in_chans] * n_widths, c0, 3, 1, 1, bias=False),
            SwitchableBatchNorm2d(c0),
            nn.ReLU(inplace=True),
        )
        cin = c0
        for k, base in enumerate(STAGE_CHANNELS):
            cout = self.channels(base)
            blocks = [SlimmableBasicBlock(cin if b == 0 else cout, cout, 2 if (k and b == 0) else 1)
                      for b in range(n)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
            cin = cout
        self.fc = SlimmableLinear(cin, [check_num_classes(num_classes)] * n_widths)
        init_weights(self)
        self.finish_widths()

    def classify(self, h: Tensor) -> Tensor:
        return self.fc(F.adaptive_avg_pool2d(h, 1).flatten(1))



def _factory(depth: int):  # type: ignore[no-untyped-def]
    def build(
        *,
        num_classes: int,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
        widths: Sequence[float] | Mapping[str, Any] = DEFAULT_WIDTHS,
    ) -> SlimmableCifarResNet:
        return SlimmableCifarResNet(depth, num_classes, widths, in_chans=in_chans,
                                    input_size=input_size)

    build.__name__ = build.__qualname__ = f"build_slimmable_resnet{depth}"
    build.__doc__ = (f"Slimmable CIFAR ResNet-{depth}; ``widths`` in (0, 1], increasing, "
                     "one private BN per width.")
    return build


def register(register) -> None:  # type: ignore[no-untyped-def]
    for depth in DEPTHS:
        register(
            f"slimmable_resnet{depth}",
            _factory(depth),
            f"Slimmable CIFAR ResNet-{depth} (widths x0.25..x1.0 by default, switchable BN)",
        )
