"""CIFAR ResNet-(6n+2) (He et al. 2016, section 4.2), as used by TAKD, EKD and RepDistiller.

A 3x3 stem conv with 16 channels (BN, ReLU), three stages of ``n`` basic blocks with 16, 32 and 64
channels (the first block of stages 2 and 3 has stride 2), global average pooling and a linear
classifier. Where a block changes shape its shortcut is a 1x1 conv + BN (``shortcut =
"projection"``, the TAKD/RepDistiller layout) or He et al.'s parameter-free option A
(``"zero_pad"``: stride-2 subsampling and zero channels). Parameter counts with projections on
CIFAR-10 / CIFAR-100: ResNet-8 78,042 / 83,892; ResNet-20 272,474 / 278,324; ResNet-32
466,906 / 472,756; ResNet-56 855,770 / 861,620; ResNet-110 1,730,714 / 1,736,564 (option A:
2,752 fewer).

``resnet8x4`` and ``resnet32x4`` are RepDistiller's (``models/resnet.py``, ``num_filters = [32,
64, 128, 256]``): the same network with a 32-channel stem and stages of 64, 128 and 256 channels,
so that the first block of ``layer1`` changes the width too and has a projection shortcut (stride
1). Parameters on CIFAR-10 / CIFAR-100: ResNet-8x4 1,210,410 / 1,233,540; ResNet-32x4
7,410,730 / 7,433,860.

Split points (every one after a ReLU; channels (x4 variants in brackets) and resolution for a
32x32 input):

======  =============================  ==============  ==========
name    content                        channels        resolution
======  =============================  ==============  ==========
stem    conv 3x3 - BN - ReLU           16 (32)         32x32
layer1  n blocks                       16 (64)         32x32
layer2  n blocks, the first stride 2   32 (128)        16x16
layer3  n blocks, the first stride 2   64 (256)        8x8
======  =============================  ==============  ==========

The back from ``layer3`` is global average pooling and the classifier.

Also here: :class:`StagedBackbone`, the plain-network base shared by the CIFAR families, whose
split points are the names of its stage modules.
"""

from __future__ import annotations

from typing import Literal

import torch.nn.functional as F
from torch import Tensor, nn

from kdreg.backbone import FlexibleBackbone, segment_range
from kdreg.errors import OptionError

Shortcut = Literal["projection", "zero_pad"]
DEPTHS = (8, 14, 20, 32, 44, 56, 110)
STAGE_CHANNELS = (16, 32, 64)
#: RepDistiller's 4x wide variants: name -> (depth, stem channels, stage channels).
WIDE_VARIANTS = {
    "resnet8x4": (8, 32, (64, 128, 256)),
    "resnet32x4": (32, 32, (64, 128, 256)),
}


# ------------------------------------------------------------------------------ shared helpers
def init_weights(module: nn.Module, linear_std: float | None = None) -> None:
    """He (fan-out) normal convs, unit/zero BN, zero biases; linears N(0, ``linear_std``) when
    given, else PyTorch's default."""
    for m in module.modules():
        if isinstance(m, nn.Conv2d):
            nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.BatchNorm2d):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)
        elif isinstance(m, nn.Linear) and linear_std is not None:
            nn.init.normal_(m.weight, 0.0, linear_std)
            nn.init.zeros_(m.bias)


def check_num_classes(num_classes: int) -> int:
    if isinstance(num_classes, bool) or not isinstance(num_classes, int) or num_classes < 1:
        raise OptionError(f"num_classes must be a positive integer, got {num_classes!r}",
                          key="num_classes")
    return num_classes


class StagedBackbone(FlexibleBackbone):
    """A plain network (one sub-model, ``full``): named stage modules run in order, then ``head``.

    Subclasses set :attr:`stage_names` (attributes holding the stages, input side first) and
    ``self.head`` (features of the last stage -> logits). The split points are the stage names;
    the features at a split point are that stage's output.
    """

    submodel_labels = ("full",)
    single_pass = True
    stage_names: tuple[str, ...] = ()
    head: nn.Module

    def split_points(self) -> tuple[str, ...]:
        return self.stage_names

    def forward_segment(self, h: Tensor, start: str | None, end: str | None) -> Tensor:
        i, j = segment_range(self.stage_names, start, end)
        for name in self.stage_names[i:j]:
            h = getattr(self, name)(h)
        return self.head(h) if end is None else h

    def forward(self, x: Tensor) -> list[Tensor]:  # type: ignore[override]
        return [self.forward_segment(x, None, None)]


class PoolLinear(nn.Module):
    """Global average pooling and a linear classifier (optionally after BN - ReLU)."""

    def __init__(self, channels: int, num_classes: int, *, pre_bn: bool = False):
        super().__init__()
        self.bn = nn.BatchNorm2d(channels) if pre_bn else None
        self.fc = nn.Linear(channels, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        if self.bn is not None:
            x = F.relu(self.bn(x))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


# ------------------------------------------------------------------------------ the ResNet
class BasicBlock(nn.Module):
    """conv3x3 - BN - ReLU - conv3x3 - BN, plus the shortcut, then ReLU."""

    def __init__(self, cin: int, cout: int, stride: int, shortcut: Shortcut = "projection"):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.stride = stride
        self.pad = 0
        self.shortcut: nn.Module | None = None
        if stride != 1 or cin != cout:
            if shortcut == "projection":
                self.shortcut = nn.Sequential(
                    nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout)
                )
            else:
                self.pad = cout - cin

    def forward(self, x: Tensor) -> Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.shortcut is not None:
            x = self.shortcut(x)
        elif self.stride != 1 or self.pad:
            x = F.pad(x[:, :, :: self.stride, :: self.stride], (0, 0, 0, 0, 0, self.pad))
        return F.relu(out + x)


class CifarResNet(StagedBackbone):
    """ResNet-``depth`` for CIFAR, ``depth = 6n + 2``, with a ``stem_channels`` stem and stages
    of ``stage_channels`` (by default 16 and 16/32/64)."""

    stage_names = ("stem", "layer1", "layer2", "layer3")

    def __init__(
        self,
        depth: int,
        num_classes: int,
        *,
        shortcut: Shortcut = "projection",
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
        stem_channels: int = STAGE_CHANNELS[0],
        stage_channels: tuple[int, int, int] = STAGE_CHANNELS,
    ):
        super().__init__()
        if depth < 8 or (depth - 2) % 6:
            raise OptionError(f"ResNet depth must be 6n + 2 with n >= 1, got {depth}", key="depth")
        if shortcut not in ("projection", "zero_pad"):
            raise OptionError(f"shortcut must be 'projection' or 'zero_pad', got {shortcut!r}",
                              key="shortcut")
        self.depth = depth
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))
        n = (depth - 2) // 6
        c0 = stem_channels
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)
        )
        cin = c0
        for k, cout in enumerate(stage_channels):
            blocks = [BasicBlock(cin if b == 0 else cout, cout, 2 if (k and b == 0) else 1,
                                 shortcut) for b in range(n)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*blocks))
            cin = cout
        self.head = PoolLinear(cin, check_num_classes(num_classes))
        init_weights(self)


def _factory(depth: int):  # type: ignore[no-untyped-def]
    def build(
        *,
        num_classes: int,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
        shortcut: Shortcut = "projection",
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, shortcut=shortcut, in_chans=in_chans,
                           input_size=input_size)

    build.__name__ = build.__qualname__ = f"build_resnet{depth}"
    build.__doc__ = (f"CIFAR ResNet-{depth}; ``shortcut``: 'projection' (1x1 conv + BN) or "
                     "'zero_pad' (He et al.'s option A).")
    return build


def _wide_factory(name: str):  # type: ignore[no-untyped-def]
    depth, stem, stages = WIDE_VARIANTS[name]

    def build(
        *,
        num_classes: int,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
        shortcut: Shortcut = "projection",
    ) -> CifarResNet:
        return CifarResNet(depth, num_classes, shortcut=shortcut, in_chans=in_chans,
                           input_size=input_size, stem_channels=stem, stage_channels=stages)

    build.__name__ = build.__qualname__ = f"build_{name}"
    build.__doc__ = (f"RepDistiller's CIFAR ResNet-{depth}x4 ({stem}-channel stem, "
                     f"{'/'.join(map(str, stages))}-channel stages); ``shortcut``: 'projection' "
                     "(1x1 conv + BN) or 'zero_pad' (He et al.'s option A).")
    return build


#: Descriptions of the 4x wide variants (parameters and MACs of one 32x32 image, CIFAR-100).
WIDE_DESCRIPTIONS = {
    "resnet8x4": "RepDistiller's CIFAR ResNet-8x4 (32 stem, 64/128/256 channels, 1 basic block "
                 "per stage); 1.23 M params, 177 M MACs on CIFAR-100",
    "resnet32x4": "RepDistiller's CIFAR ResNet-32x4 (32 stem, 64/128/256 channels, 5 basic "
                  "blocks per stage); 7.43 M params, 1.08 G MACs on CIFAR-100",
}


def register(register) -> None:  # type: ignore[no-untyped-def]
    for depth in DEPTHS:
        register(
            f"resnet{depth}",
            _factory(depth),
            f"CIFAR ResNet-{depth} (16/32/64 channels, {(depth - 2) // 6} basic blocks per stage)",
        )
    for name in WIDE_VARIANTS:
        register(name, _wide_factory(name), WIDE_DESCRIPTIONS[name])
