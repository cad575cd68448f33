"""Wide ResNets WRN-d-k for CIFAR (Zagoruyko & Komodakis 2016), the RepDistiller/TAKD layout.

A 3x3 stem conv with 16 channels (no BN after it: the blocks are pre-activation), three stages of
``n = (d - 4) / 6`` wide basic blocks with ``16k``, ``32k`` and ``64k`` channels (the first block
of stages 2 and 3 has stride 2), a final BN - ReLU, global average pooling and a linear
classifier. A block is BN - ReLU - conv3x3 - BN - ReLU - [dropout] - conv3x3 plus the shortcut;
where the shape changes the shortcut is a 1x1 conv (no BN) on the pre-activated input. Parameter
counts on CIFAR-10 / CIFAR-100: WRN-16-1 175,066 / 180,916; WRN-16-2 691,674 / 703,284; WRN-40-1
563,930 / 569,780; WRN-40-2 2,243,546 / 2,255,156; WRN-28-2 1,467,610 / 1,479,220; WRN-46-4
10,499,290 / 10,522,420. RepDistiller's ``wrn_16_2`` and ``wrn_40_2`` (``models/wrn.py``) are
``wrn16_2`` and ``wrn40_2``, layer for layer.

Split points (channels and resolution for a 32x32 input):

======  ==============================  ========  ==========
name    content                         channels  resolution
======  ==============================  ========  ==========
stem    conv 3x3                        16        32x32
layer1  n blocks                        16k       32x32
layer2  n blocks, the first stride 2    32k       16x16
layer3  n blocks, the first stride 2    64k       8x8
======  ==============================  ========  ==========

Being pre-activation, every feature is a residual sum before BN - ReLU (RepDistiller's
``feat[0..3]``); the back from ``layer3`` is the final BN - ReLU, pooling and the classifier.
"""

from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.errors import OptionError
from kdreg_plugins.backbones.cifar_resnet import (
    PoolLinear,
    StagedBackbone,
    check_num_classes,
    init_weights,
)

#: (depth, widen factor) of the registered ``wrn{d}_{k}`` names.
VARIANTS = ((16, 1), (16, 2), (40, 1), (40, 2), (28, 2), (46, 4))


class WideBasicBlock(nn.Module):
    """Pre-activation wide basic block: BN - ReLU - conv - BN - ReLU - dropout - conv, + shortcut."""

    def __init__(self, cin: int, cout: int, stride: int, dropout: float = 0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(cin)
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.dropout = dropout
        self.shortcut = (
            nn.Conv2d(cin, cout, 1, stride, bias=False) if stride != 1 or cin != cout else None
        )

    def forward(self, x: Tensor) -> Tensor:
        act = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(act)))
        if self.dropout > 0:
            out = F.dropout(out, p=self.dropout, training=self.training)
        out = self.conv2(out)
        return out + (x if self.shortcut is None else self.shortcut(act))


class WideResNet(StagedBackbone):
    """WRN-``depth``-``widen_factor`` for CIFAR, ``depth = 6n + 4``."""

    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        num_classes: int,
        *,
        dropout: float = 0.0,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__()
        if isinstance(depth, bool) or not isinstance(depth, int) or depth < 10 or (depth - 4) % 6:
            raise OptionError(f"WRN depth must be 6n + 4 with n >= 1, got {depth!r}", key="depth")
        if isinstance(widen_factor, bool) or not isinstance(widen_factor, int) or widen_factor < 1:
            raise OptionError(f"widen_factor must be a positive integer, got {widen_factor!r}",
                              key="widen_factor")
        if not 0.0 <= dropout < 1.0:
            raise OptionError(f"dropout must lie in [0, 1), got {dropout!r}", key="dropout")
        self.depth, self.widen_factor = depth, widen_factor
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))
        n = (depth - 4) // 6
        self.stem = nn.Conv2d(in_chans, 16, 3, 1, 1, bias=False)
        cin = 16
        for k, base in enumerate((16, 32, 64)):
            cout = base * widen_factor
            blocks = [WideBasicBlock(cin if b == 0 else cout, cout, 2 if (k and b == 0) else 1,
                                     dropout) for b in range(n)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
            cin = cout
        self.head = PoolLinear(cin, check_num_classes(num_classes), pre_bn=True)
        init_weights(self)


def build_wrn(
    *,
    num_classes: int,
    in_chans: int = 3,
    input_size: tuple[int, int] = (32, 32),
    depth: int = 16,
    widen_factor: int = 1,
    dropout: float = 0.0,
) -> WideResNet:
    """WRN-``depth``-``widen_factor`` for CIFAR (``depth = 6n + 4``); ``dropout`` between convs."""
    return WideResNet(depth, widen_factor, num_classes, dropout=dropout, in_chans=in_chans,
                      input_size=input_size)


def _factory(depth: int, widen_factor: int):  # type: ignore[no-untyped-def]
    def build(
        *,
        num_classes: int,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
        dropout: float = 0.0,
    ) -> WideResNet:
        return WideResNet(depth, widen_factor, num_classes, dropout=dropout, in_chans=in_chans,
                          input_size=input_size)

    build.__name__ = build.__qualname__ = f"build_wrn{depth}_{widen_factor}"
    build.__doc__ = f"WRN-{depth}-{widen_factor} for CIFAR; ``dropout`` between the block's convs."
    return build


def register(register) -> None:  # type: ignore[no-untyped-def]
    register("wrn", build_wrn, "Wide ResNet for CIFAR; options depth (6n + 4), widen_factor, "
                               "dropout")
    for depth, k in VARIANTS:
        register(f"wrn{depth}_{k}", _factory(depth, k),
                 f"WRN-{depth}-{k} for CIFAR (pre-activation wide basic blocks)")
