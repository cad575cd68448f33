"""CIFAR ResNet-18 and ResNet-34: the ImageNet ResNets' four stages on 32x32 inputs.

The layout of the EKD thesis's code (Asadian 2021, its "Res34" teacher and "Res18" teacher
assistant; the common CIFAR adaptation of He et al.'s ImageNet ResNets): a 3x3 stride-1 stem conv
with 64 channels (BN, ReLU; no 7x7 stride-2 conv and no max pooling), four stages of basic blocks
-- ``[2, 2, 2, 2]`` for ResNet-18, ``[3, 4, 6, 3]`` for ResNet-34 -- with 64, 128, 256 and 512
channels (the first block of stages 2, 3 and 4 has stride 2), global average pooling and
Linear(512, C). The blocks are :class:`~kdreg_plugins.backbones.cifar_resnet.BasicBlock`s; where
a block changes shape its shortcut is a 1x1 conv + BN (projection). Parameter counts on CIFAR-10 /
CIFAR-100: ResNet-18 11,173,962 / 11,220,132; ResNet-34 21,282,122 / 21,328,292. Multiply-
accumulates of one 32x32 image on CIFAR-10: ResNet-18 555,422,720; ResNet-34 1,159,402,496.

Split points (every one after a ReLU; channels and resolution for a 32x32 input):

======  =============================  ========  ==========
name    content                        channels  resolution
======  =============================  ========  ==========
stem    conv 3x3 - BN - ReLU           64        32x32
layer1  blocks, stride 1               64        32x32
layer2  blocks, the first stride 2     128       16x16
layer3  blocks, the first stride 2     256       8x8
layer4  blocks, the first stride 2     512       4x4
======  =============================  ========  ==========

The back from ``layer4`` is global average pooling and the classifier. The ImageNet layout is
``{ name = "timm", model = "resnet34" }`` (7x7 stride-2 stem and max pooling): a different network
on 32x32 images, with 2x2 features before its last stage.
"""

from __future__ import annotations

from torch import nn

from kdreg_plugins.backbones.cifar_resnet import (
    BasicBlock,
    PoolLinear,
    StagedBackbone,
    check_num_classes,
    init_weights,
)

#: Basic blocks per stage of the registered ``resnet{depth}_cifar`` names.
STAGE_BLOCKS = {18: (2, 2, 2, 2), 34: (3, 4, 6, 3)}
STAGE_CHANNELS = (64, 128, 256, 512)


class CifarResNet4(StagedBackbone):
    """Four-stage ResNet for CIFAR with ``blocks[k]`` basic blocks in stage ``k + 1``."""

    stage_names = ("stem", "layer1", "layer2", "layer3", "layer4")

    def __init__(
        self,
        blocks: tuple[int, int, int, int],
        num_classes: int,
        *,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ):
        super().__init__()
        self.blocks = tuple(blocks)
        self.in_chans = in_chans
        self.input_size = (int(input_size[0]), int(input_size[1]))
        c0 = STAGE_CHANNELS[0]
        self.stem = nn.Sequential(
            nn.Conv2d(in_chans, c0, 3, 1, 1, bias=False), nn.BatchNorm2d(c0), nn.ReLU(inplace=True)
        )
        cin = c0
        for k, (n, cout) in enumerate(zip(self.blocks, STAGE_CHANNELS)):
            stage = [BasicBlock(cin if b == 0 else cout, cout, 2 if (k and b == 0) else 1,
                                "projection") for b in range(n)]
            self.add_module(f"layer{k + 1}", nn.Sequential(*stage))
            cin = cout
        self.head = PoolLinear(cin, check_num_classes(num_classes))
        init_weights(self)


def _factory(depth: int):  # type: ignore[no-untyped-def]
    blocks = STAGE_BLOCKS[depth]

    def build(
        *,
        num_classes: int,
        in_chans: int = 3,
        input_size: tuple[int, int] = (32, 32),
    ) -> CifarResNet4:
        return CifarResNet4(blocks, num_classes, in_chans=in_chans, input_size=input_size)

    build.__name__ = build.__qualname__ = f"build_resnet{depth}_cifar"
    build.__doc__ = (f"ResNet-{depth} for CIFAR: 3x3 stride-1 stem with 64 channels, no max "
                     f"pooling, basic blocks {list(blocks)} with 64/128/256/512 channels.")
    return build


def register(register) -> None:  # type: ignore[no-untyped-def]
    for depth, blocks in STAGE_BLOCKS.items():
        register(
            f"resnet{depth}_cifar",
            _factory(depth),
            f"ResNet-{depth} for CIFAR (3x3 stem, 64-512 channels, basic blocks "
            f"{'/'.join(map(str, blocks))})",
        )
